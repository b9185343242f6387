//! The gRPC front end and member start-up.
//!
//! One file per etcd service (`kv.rs`, `watch.rs`, `lease.rs`, `recipes.rs` for v3lock and
//! v3election, `maintenance.rs`, `cluster.rs`, `auth.rs`) and the HTTP endpoints (`http.rs`).
//! They share [`Core`]:
//! writes are validated, proposed through the Raft node and answered once applied; reads go
//! straight to the shards at a revision every shard has applied.

pub mod auth;
mod cluster;
pub mod codec;
pub mod compactor;
mod corrupt;
pub mod gate;
pub mod http;
pub mod keepalive;
mod kv;
mod lease;
mod maintenance;
pub mod peer;
mod recipes;
pub mod validate;
mod watch;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prost::Message;
use tokio::sync::watch as state_watch;

use crate::apply::alarms::SharedAlarms;
use crate::apply::{Dispatcher, SnapshotPolicy, StartState};
use crate::config::{defaults, ClusterState, Config};
use crate::consensus::transport::{Faults, Transport, MAX_PEER_MESSAGE_BYTES};
use crate::consensus::{
    election_ticks, initial_tick_advance, recover_log, NodeConfig, NodeHandle, NodeMsg, RaftNode,
    RecoveredLog, TickAdvance,
};
use crate::error::EtcdError;
use crate::identity::{self as member, url_string, Member};
use crate::lease::{min_ttl_secs, LeaseTable};
use crate::mvcc::range::merge;
use crate::proto::etcdserverpb::{
    alarm_request::AlarmAction, cluster_server::ClusterServer, kv_server::KvServer,
    lease_server::LeaseServer, maintenance_server::MaintenanceServer, watch_server::WatchServer,
    AlarmRequest, AlarmType, RangeRequest, RangeResponse, ResponseHeader,
};
use crate::proto::metastorepb::{
    peer_server::PeerServer, proposal::Request as Proposed, MemberRecord, Proposal, StateSnapshot,
};
use crate::proto::v3electionpb::election_server::ElectionServer;
use crate::proto::v3lockpb::lock_server::LockServer;
use crate::shard::{ApplyCmd, EngineConfig, EngineKind, ShardSet, Shards};
use crate::state_machine::snapshot::Snapshotter;
use crate::state_machine::{AppliedState, ApplyResponse, Pending};

/// What every service needs: identity, the Raft node, the shards and the applied state.
pub struct Core {
    /// Settings.
    pub cfg: Arc<Config>,
    /// This member.
    pub member: Member,
    /// The Raft node.
    pub node: NodeHandle,
    /// The shards' read queues.
    pub shards: ShardSet,
    /// The latest state every shard has applied.
    pub applied: state_watch::Receiver<AppliedState>,
    /// Granted leases and their deadlines.
    pub leases: LeaseTable,
    pending: Arc<Pending>,
    next_proposal: AtomicU64,
    next_lease_seed: AtomicU64,
    /// The replicated alarm table (etcd's alarm store), as the dispatcher last applied it.
    pub alarms: SharedAlarms,
    /// The replicated auth store, as the dispatcher last applied it, and this member's tokens.
    pub auth: crate::auth::SharedAuth,
    /// A NOSPACE alarm for this member is being proposed: the next writes over quota do not
    /// propose it again meanwhile.
    raising_nospace: std::sync::atomic::AtomicBool,
    /// A Peer client to the current leader, for requests only the leader answers.
    leader_peer: tokio::sync::Mutex<
        Option<(
            u64,
            crate::proto::metastorepb::peer_client::PeerClient<tonic::transport::Channel>,
        )>,
    >,
    /// This core itself, for tasks that outlive a borrowed `&Core` (lock cleanup).
    this: std::sync::Weak<Core>,
    /// Cancelled when the member begins to stop (the first SIGTERM/SIGINT, or its removal
    /// from the cluster; see [`stop`]): the client listeners stop accepting, and every open
    /// Watch and LeaseKeepAlive stream ends with "etcdserver: server stopped"
    /// ([`EtcdError::Stopped`]), as etcd's `EtcdServer.Stop` ends its streams.
    pub stopping: tokio_util::sync::CancellationToken,
    request_timeout: Duration,
}

impl Core {
    /// A response header at `revision`, with this member's IDs and the current term.
    pub fn header(&self, revision: i64) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            cluster_id: self.member.cluster_id,
            member_id: self.member.id,
            revision,
            raft_term: self.node.status.term.load(Ordering::Relaxed),
        })
    }

    /// Proposes a write and waits until it is applied.
    ///
    /// Errors: "request is too large" above `--max-request-bytes`; "request timed out" when it
    /// does not apply within etcd's request timeout (5 s + 2 election timeouts; the outcome is
    /// then unknown); "no leader"; "server stopped"; and whatever applying it reports.
    /// The member's own requests (lease expiry, alarms, lock cleanup) act as root, as etcd's
    /// `WithRoot`; clients' go through [`Core::propose_as`].
    pub async fn propose(&self, request: Proposed) -> Result<ApplyResponse, EtcdError> {
        self.propose_with(request, None).await
    }

    /// [`Core::propose`] with the caller's auth header (`None`: the member itself).
    async fn propose_with(
        &self,
        request: Proposed,
        auth: Option<crate::proto::metastorepb::AuthHeader>,
    ) -> Result<ApplyResponse, EtcdError> {
        let id = self.next_proposal.fetch_add(1, Ordering::Relaxed);
        let data = Proposal {
            id,
            origin: self.member.id,
            request: Some(request),
            auth,
        }
        .encode_to_vec();
        if data.len() > self.cfg.max_request_bytes {
            return Err(EtcdError::RequestTooLarge);
        }
        self.submit(id, NodeMsg::Propose { id, data }).await
    }

    /// Hands `msg` (proposal `id`) to the Raft node and waits until it is applied, within the
    /// request timeout.
    ///
    /// Errors: "request timed out", "server stopped", and whatever applying it reports.
    async fn submit(&self, id: u64, msg: NodeMsg) -> Result<ApplyResponse, EtcdError> {
        // The guard removes the waiter however this future ends: reply, timeout or the
        // client going away.
        let (_guard, rx) = self.pending.register(id);
        let work = async {
            self.node
                .tx
                .send_async(msg)
                .await
                .map_err(|_| EtcdError::Stopped)?;
            rx.await.map_err(|_| EtcdError::Stopped)?
        };
        let result = tokio::time::timeout(self.request_timeout, work)
            .await
            .unwrap_or(Err(EtcdError::Timeout));
        // etcd counts proposals that time out or cannot be proposed, not apply errors.
        if matches!(result, Err(EtcdError::Timeout | EtcdError::Stopped)) {
            crate::metrics::PROPOSALS_FAILED.inc();
        }
        result
    }

    /// The front end's quota check for a request that grows the backend (Put, a Txn with a
    /// put, LeaseGrant), as etcd's `quotaKVServer`/`quotaLeaseServer`: while any member's
    /// NOSPACE alarm is active, or when this member's backend has grown past
    /// `--quota-backend-bytes`, the request is refused. In the latter case this member also
    /// proposes a NOSPACE alarm for itself through Raft (etcd's Alarm ACTIVATE with its member
    /// ID), so that every member refuses such requests until it is disarmed. The dispatcher
    /// refuses them again as it applies them (the alarm may be raised meanwhile). Reads and
    /// deletes are never refused.
    ///
    /// Errors: "etcdserver: mvcc: database space exceeded" (etcd `ErrGRPCNoSpace`).
    pub fn check_quota(&self) -> Result<(), EtcdError> {
        let raised = self
            .alarms
            .read(|t| t.is_active(crate::proto::etcdserverpb::AlarmType::Nospace));
        if raised {
            return Err(EtcdError::NoSpace);
        }
        if self.shards.db_size() <= self.cfg.quota_bytes() {
            return Ok(());
        }
        if !self.raising_nospace.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                quota = self.cfg.quota_bytes(),
                db_size = self.shards.db_size(),
                "backend over quota: raising the NOSPACE alarm"
            );
            if let Some(core) = self.this.upgrade() {
                tokio::spawn(async move {
                    let id = core.member.id;
                    if let Err(e) = core.raise_alarm(id, AlarmType::Nospace).await {
                        tracing::warn!(error = %e, "cannot raise the NOSPACE alarm");
                    }
                    core.raising_nospace.store(false, Ordering::Relaxed);
                });
            }
        }
        Err(EtcdError::NoSpace)
    }

    /// Proposes an Alarm ACTIVATE of `alarm` for `member` and waits until it is applied.
    ///
    /// Errors: those of [`Core::propose`].
    pub async fn raise_alarm(&self, member: u64, alarm: AlarmType) -> Result<(), EtcdError> {
        self.propose(Proposed::Alarm(AlarmRequest {
            action: AlarmAction::Activate as i32,
            member_id: member,
            alarm: alarm as i32,
        }))
        .await
        .map(|_| ())
    }

    /// The applied state a linearizable read may use: ReadIndex (Raft paper section 6.4), then
    /// wait until every shard has applied that index.
    pub async fn linearizable_state(&self) -> Result<AppliedState, EtcdError> {
        let work = async {
            let (tx, rx) = tokio::sync::oneshot::channel();
            self.node
                .tx
                .send_async(NodeMsg::ReadIndex(tx))
                .await
                .map_err(|_| EtcdError::Stopped)?;
            let index = rx.await.map_err(|_| EtcdError::Stopped)??;
            let mut applied = self.applied.clone();
            let state = applied
                .wait_for(|a| a.index >= index)
                .await
                .map_err(|_| EtcdError::Stopped)?;
            Ok(*state)
        };
        tokio::time::timeout(self.request_timeout, work)
            .await
            .map_err(|_| EtcdError::Timeout)?
    }

    /// Serves a Range: scatter over the shards at one revision, merge in key order.
    ///
    /// Errors: ErrFutureRev above the current revision, ErrCompacted below the compaction
    /// revision, plus the validation errors of [`validate::check_range`].
    pub async fn range(&self, req: RangeRequest) -> Result<RangeResponse, EtcdError> {
        validate::check_range(&req)?;
        if !req.serializable && self.node.status.is_learner.load(Ordering::Relaxed) {
            return Err(EtcdError::NotSupportedForLearner);
        }
        let state = if req.serializable {
            *self.applied.borrow()
        } else {
            self.linearizable_state().await?
        };
        if req.revision > state.revision {
            return Err(EtcdError::FutureRev);
        }
        let rev = if req.revision <= 0 {
            state.revision
        } else {
            req.revision
        };
        if rev < state.compact_revision {
            return Err(EtcdError::Compacted);
        }
        crate::metrics::MVCC_RANGE.inc();
        let req = Arc::new(req);
        let parts = self.shards.read_range(req.clone(), rev).await?;
        let merged = merge(&req, parts);
        Ok(RangeResponse {
            header: self.header(state.revision),
            kvs: merged.kvs,
            more: merged.more,
            count: merged.count,
        })
    }
}

fn prepare_data_dir(dir: &Path) -> anyhow::Result<std::fs::File> {
    let member_dir = dir.join("member");
    std::fs::create_dir_all(&member_dir)
        .with_context(|| format!("cannot access data directory {}", dir.display()))?;
    let lock_path = member_dir.join("lock");
    let lock = std::fs::File::create(&lock_path)
        .with_context(|| format!("cannot write to data directory {}", dir.display()))?;
    lock.try_lock().map_err(|_| {
        anyhow::anyhow!(
            "data directory {} is in use by another process",
            dir.display()
        )
    })?;
    Ok(lock)
}

/// The engine configuration. A RocksDB data dir records its shard count, because keys are
/// placed by `shard_for(key, count)`: reopening with another count would misplace them. The
/// count file also marks the data dir as initialised: without it the shards' databases are
/// created (see [`record_shard_count`]); with it, a missing shard database is an error.
fn engine_config(cfg: &Config, member_dir: &Path, member_id: u64) -> anyhow::Result<EngineConfig> {
    let dir = member_dir.join("shards");
    let mut create = false;
    if cfg.storage_engine == EngineKind::Rocksdb {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        crate::mvcc::ballast::prepare(&dir);
        let count_file = dir.join("count");
        let count = cfg.shard_count();
        match std::fs::read_to_string(&count_file) {
            Ok(text) => {
                let existing: usize = text
                    .trim()
                    .parse()
                    .with_context(|| format!("malformed {}", count_file.display()))?;
                anyhow::ensure!(
                    existing == count,
                    "the RocksDB data in {} was written with --shards {existing}; start with --shards {existing}",
                    dir.display()
                );
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => create = true,
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read {}", count_file.display()))
            }
        }
    }
    Ok(EngineConfig {
        kind: cfg.storage_engine,
        dir,
        rocks: cfg.rocks_options(),
        member_id,
        create,
    })
}

/// Writes the shard count of a RocksDB data dir being initialised, once every shard database
/// exists (so a start-up that stops before that simply initialises again).
///
/// Errors: the count file cannot be written.
fn record_shard_count(engine: &EngineConfig, count: usize) -> anyhow::Result<()> {
    if engine.kind != EngineKind::Rocksdb || !engine.create {
        return Ok(());
    }
    let count_file = engine.dir.join("count");
    std::fs::write(&count_file, count.to_string())
        .with_context(|| format!("cannot write {}", count_file.display()))
}

/// Where the state machine resumes. Memory engine: the snapshot (the dispatcher loads its
/// keys into the shards before anything else). RocksDB: the lowest applied index any shard
/// has on disk, with the dispatcher state stored beside it; shards that are further ahead skip
/// the entries they already hold. A complete snapshot newer than that (one a leader sent,
/// whose installation a crash interrupted) is installed again from the start.
///
/// `log_last_index` is the last Raft index the snapshot and the WAL hold.
///
/// Errors (RocksDB): a shard whose applied index is below the snapshot index (the entries it
/// lacks are no longer in the WAL: its data is stale or was replaced) or more than one entry
/// above `log_last_index` (it holds writes the log does not know). Either way the shard's
/// directory does not belong with this log, and serving from it would lose acknowledged writes.
async fn recover_start(
    shards: &ShardSet,
    engine: &EngineConfig,
    snap: Option<&StateSnapshot>,
    log_last_index: u64,
) -> anyhow::Result<StartState> {
    let snapshot_index = snap.map_or(0, |s| s.index);
    let from_snapshot = |s: &StateSnapshot| StartState {
        index: s.index,
        term: s.term,
        revision: s.revision,
        compact_revision: s.compact_revision,
        leases: s.leases.clone(),
        snapshot_index,
        replay_until: 0,
        durable: engine.kind != EngineKind::Memory,
        membership: Default::default(),
        restore: Some(Arc::new(s.clone())),
        alarms: s.alarms.clone(),
        auth: s.auth.clone(),
        alarm_index: s.index,
    };
    if engine.kind == EngineKind::Memory {
        return Ok(snap.map(from_snapshot).unwrap_or_default());
    }
    let mut states = Vec::new();
    for i in 0..shards.len() {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let _ = shards.get(i).apply.send(ApplyCmd::Recover { reply });
        states.push(rx.await.ok().flatten());
    }
    let applied: Vec<u64> = states
        .iter()
        .map(|s| s.as_ref().map_or(0, |s| s.applied_index))
        .collect();
    let replay_until = applied.iter().copied().max().unwrap_or(0);
    let lowest = states
        .into_iter()
        .min_by_key(|s| s.as_ref().map_or(0, |s| s.applied_index))
        .flatten();
    let lowest_index = lowest.as_ref().map_or(0, |r| r.applied_index);
    if let Some(s) = snap.filter(|s| s.complete && s.index > lowest_index) {
        tracing::info!(
            index = s.index,
            "installing the snapshot received from the leader"
        );
        // Every shard is emptied and loaded from the snapshot: what they held does not matter.
        return Ok(from_snapshot(s));
    }
    for (shard, &index) in applied.iter().enumerate() {
        let dir = engine.dir.join(shard.to_string());
        anyhow::ensure!(
            index >= snapshot_index,
            "shard directory {} has applied Raft entries only up to index {index}, but the log \
             starts after the snapshot at index {snapshot_index}: the entries it lacks are gone \
             (its data is stale or was replaced); restore the data directory from a backup, or \
             remove this member and add it again with an empty data directory",
            dir.display()
        );
        // One entry of slack: the WAL truncates a torn final record at start-up, and if that
        // record was an entry the shards had applied (a disk that lost part of an fsynced
        // write), they are one entry ahead. That entry was committed, so nothing is lost by
        // skipping the entry the log gets at its index again: in a cluster the leader sends
        // the same committed entry, and a lone member's next entry is its new term's empty
        // one. Further ahead, the shard holds writes the log never had.
        anyhow::ensure!(
            index <= log_last_index + 1,
            "shard directory {} has applied Raft entries up to index {index}, past the last \
             index {log_last_index} of the WAL and snapshot: it holds writes the log does not \
             know (it belongs to another data directory, or the WAL lost entries)",
            dir.display()
        );
    }
    // The alarm table is only in snapshots and the log: it starts from the snapshot the WAL
    // follows, whatever the shards hold, and the dispatcher replays the alarm requests after it.
    let alarms = snap.map(|s| s.alarms.clone()).unwrap_or_default();
    // So is the auth store.
    let auth = snap.and_then(|s| s.auth.clone());
    Ok(match lowest {
        Some(r) => StartState {
            index: r.applied_index,
            term: r.applied_term,
            revision: r.revision,
            compact_revision: r.compact_revision,
            leases: r.leases,
            snapshot_index,
            replay_until,
            durable: true,
            membership: Default::default(),
            restore: None,
            alarms,
            auth,
            alarm_index: snapshot_index,
        },
        None => StartState {
            snapshot_index,
            replay_until,
            durable: true,
            alarms,
            auth,
            alarm_index: snapshot_index,
            ..Default::default()
        },
    })
}

/// This member's identity on its first boot: from `--initial-cluster` for a new cluster (IDs
/// computed as etcd computes them), or from the cluster itself when joining (the ID MemberAdd
/// minted for this member's peer URLs).
///
/// Returns (member ID, cluster ID, the cluster's members when joining).
///
/// Errors: the cluster cannot be reached, or does not list this member's peer URLs.
async fn first_boot_identity(
    cfg: &Config,
    initial: &[MemberRecord],
    peer_urls: &[String],
) -> anyhow::Result<(u64, u64, Vec<MemberRecord>)> {
    if cfg.initial_cluster_state == ClusterState::New {
        let me = initial
            .iter()
            .find(|m| m.name == cfg.name)
            .expect("validate checks the local name");
        let ids: Vec<u64> = initial.iter().map(|m| m.id).collect();
        return Ok((me.id, member::cluster_id(&ids), Vec::new()));
    }
    let others: Vec<String> = initial
        .iter()
        .filter(|m| m.name != cfg.name)
        .flat_map(|m| m.peer_urls.clone())
        .collect();
    let (cluster_id, members) = peer::fetch_members(&others).await?;
    let mut mine = peer_urls.to_vec();
    mine.sort();
    let me = members.iter().find(|m| {
        let mut urls = m.peer_urls.clone();
        urls.sort();
        urls == mine
    });
    match me {
        Some(m) => Ok((m.id, cluster_id, members.clone())),
        None => anyhow::bail!(
            "cannot join the cluster: no member has peer URLs {}; add this member first \
             (etcdctl member add {} --peer-urls={})",
            mine.join(","),
            cfg.name,
            mine.join(",")
        ),
    }
}

async fn bind_all(urls: &[url::Url], what: &str) -> anyhow::Result<Vec<crate::net::Listener>> {
    let mut listeners = Vec::new();
    for url in urls {
        let listener = crate::net::Listener::bind(url)
            .await
            .with_context(|| format!("cannot listen on {what} URL {url}"))?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// A gRPC server builder for client traffic with etcd's HTTP/2 settings:
/// `--max-concurrent-streams` per connection, and server pings every
/// `--grpc-keepalive-interval` (0 = none) that close the connection when unanswered within
/// `--grpc-keepalive-timeout` (0 keeps the 20 s default, as grpc-go does).
/// `--grpc-keepalive-min-time` is enforced on each connection by [`keepalive::PingGuard`].
fn client_server_builder(cfg: &Config) -> tonic::transport::Server {
    let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
    tonic::transport::Server::builder()
        // HTTP/1.1 for the HTTP endpoints (`http::HttpLayer`).
        .accept_http1(true)
        .max_concurrent_streams(cfg.max_concurrent_streams)
        .http2_keepalive_interval(nonzero(cfg.grpc_keepalive_interval))
        .http2_keepalive_timeout(nonzero(cfg.grpc_keepalive_timeout))
}

/// Serves `$router` on `$listener` into `$servers`: TCP or a Unix socket, with TLS for an
/// `https://` or `unixs://` URL, each connection under the `$min_ping` keepalive policy
/// ([`keepalive::PingGuard`]; zero for none). A macro because the client and peer routers have
/// different layer types. Once the `$stop` token is cancelled, the listener stops accepting
/// and each connection is closed gracefully (HTTP/2 GOAWAY) once its requests are answered.
macro_rules! serve {
    ($servers:expr, $router:expr, $listener:expr, $url:expr, $tls:expr, $min_ping:expr, $stop:expr) => {
        use tokio_stream::StreamExt as _;
        let tls = $tls.filter(|_| crate::net::is_tls($url)).cloned();
        let min_ping: Duration = $min_ping;
        match ($listener, tls) {
            (crate::net::Listener::Tcp(l), Some(acceptor)) => {
                let incoming = crate::net::tls_incoming(l, acceptor)
                    .map(move |c| keepalive::guard(c, min_ping));
                $servers.spawn(
                    $router.serve_with_incoming_shutdown(incoming, $stop.clone().cancelled_owned()),
                );
            }
            (crate::net::Listener::Tcp(l), None) => {
                // Without TCP_NODELAY, Nagle plus the client's delayed ACK add ~40 ms to small
                // replies.
                let incoming = tonic::transport::server::TcpIncoming::from(l)
                    .with_nodelay(Some(true))
                    .map(move |c| keepalive::guard(c, min_ping));
                $servers.spawn(
                    $router.serve_with_incoming_shutdown(incoming, $stop.clone().cancelled_owned()),
                );
            }
            (crate::net::Listener::Unix(l, _), Some(acceptor)) => {
                let incoming = crate::net::tls_incoming(l, acceptor)
                    .map(move |c| keepalive::guard(c, min_ping));
                $servers.spawn(
                    $router.serve_with_incoming_shutdown(incoming, $stop.clone().cancelled_owned()),
                );
            }
            (crate::net::Listener::Unix(l, _), None) => {
                let incoming = tokio_stream::wrappers::UnixListenerStream::new(l)
                    .map(move |c| keepalive::guard(c, min_ping));
                $servers.spawn(
                    $router.serve_with_incoming_shutdown(incoming, $stop.clone().cancelled_owned()),
                );
            }
        }
    };
}

/// How often, and for how long, [`adjust_ticks`] looks for reachable peers (etcd: every 50 ms
/// for `rafthttp.ConnReadTimeout`, 5 s).
const TICK_ADVANCE_POLL: Duration = Duration::from_millis(50);
/// See [`TICK_ADVANCE_POLL`].
const TICK_ADVANCE_WAIT: Duration = Duration::from_secs(5);

/// `--initial-election-tick-advance` at start-up (etcd 3.5 `EtcdServer.adjustTicks`,
/// `server/etcdserver/server.go`): once the Raft thread has replayed the log it started with
/// as committed, the membership table decides (see
/// [`initial_tick_advance`]). In a multi-member cluster with the flag on, the peers' URLs are
/// dialed every 50 ms for up to 5 s; as soon as more than one peer answers (etcd's
/// `transport.ActivePeers() > 1`) the election clock is advanced by `election_ticks - 2`, so
/// the first campaign does not wait a whole election timeout. Peers cut by the test fault hook
/// (`faults`) count as unreachable. A member that does not know its cluster yet (a joiner
/// whose log is empty) does nothing: the leader contacts it.
async fn adjust_ticks(
    node: NodeHandle,
    id: u64,
    enabled: bool,
    election_ticks: usize,
    faults: Faults,
) {
    // The commit index the Raft node started with (bootstrap and --force-new-cluster entries
    // included): the membership table is whole once Raft has handed over that much.
    let committed_at_start = node.status.commit.load(Ordering::Relaxed);
    let deadline = tokio::time::Instant::now() + TICK_ADVANCE_WAIT;
    while node.status.applied.load(Ordering::Relaxed) < committed_at_start {
        if tokio::time::Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let membership = node.membership.borrow().clone();
    if membership.members.is_empty() {
        tracing::info!("membership not known yet; no initial election tick advance");
        return;
    }
    match initial_tick_advance(membership.members.len(), election_ticks, enabled) {
        TickAdvance::SingleNode(ticks) => {
            // The Raft thread campaigns at once as the only voter: nothing left to advance.
            tracing::info!(
                local_member_id = %format!("{id:x}"),
                forward_ticks = ticks,
                election_ticks,
                "started as single-node; fast-forwarding election ticks"
            );
        }
        TickAdvance::Skip => {
            tracing::info!(election_ticks, "skipping initial election tick advance");
        }
        TickAdvance::AfterPeersConnect(ticks) => {
            tracing::info!(election_ticks, "starting initial election tick advance");
            let deadline = tokio::time::Instant::now() + TICK_ADVANCE_WAIT;
            let mut active = std::collections::BTreeSet::new();
            while tokio::time::Instant::now() < deadline {
                tokio::time::sleep(TICK_ADVANCE_POLL).await;
                for m in membership.members.values() {
                    if m.id == id || active.contains(&m.id) || faults.blocks(m.id) {
                        continue;
                    }
                    if crate::consensus::transport::reachable(&m.peer_urls, TICK_ADVANCE_POLL * 4)
                        .await
                    {
                        active.insert(m.id);
                    }
                }
                if active.len() > 1 {
                    tracing::info!(
                        local_member_id = %format!("{id:x}"),
                        forward_ticks = ticks,
                        election_ticks,
                        active_remote_members = active.len(),
                        "initialized peer connections; fast-forwarding election ticks"
                    );
                    let _ = node.tx.send_async(NodeMsg::AdvanceTicks(ticks)).await;
                    return;
                }
            }
            tracing::info!(
                active_remote_members = active.len(),
                "fewer than two peers reachable; no initial election tick advance"
            );
        }
    }
}

/// Starts a member and serves until SIGINT/SIGTERM, or until it is removed from the cluster.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    cfg.validate()?;
    crate::tls::validate(&cfg).map_err(crate::config::ConfigError::Tls)?;
    let auto_compaction =
        compactor::retention(&cfg.auto_compaction_mode, &cfg.auto_compaction_retention)
            .map_err(anyhow::Error::msg)?;
    let cfg = Arc::new(cfg);
    let data_dir = cfg.data_dir();
    let _lock = prepare_data_dir(&data_dir)?;
    // Before anything dials a peer (a joining member asks the cluster for its members).
    let tls = crate::tls::setup(&cfg, &data_dir)?;
    let member_dir = data_dir.join("member");
    let peer_urls: Vec<String> = cfg
        .initial_advertise_peer_urls
        .iter()
        .map(url_string)
        .collect();
    let mut initial: Vec<MemberRecord> = cfg
        .initial_members()?
        .into_iter()
        .map(|(name, urls)| {
            let urls: Vec<String> = urls.iter().map(url_string).collect();
            MemberRecord {
                id: member::member_id(&urls, &cfg.initial_cluster_token),
                name,
                peer_urls: urls,
                client_urls: Vec::new(),
                is_learner: false,
            }
        })
        .collect();
    initial.sort_by_key(|m| m.id);
    // An etcd member's data directory (etcd stopped, or `etcdctl snapshot restore`): take it
    // over from its backend database (see `backup::restore::adopt_etcd_data_dir`).
    if crate::backup::restore::is_etcd_member_dir(&member_dir) {
        crate::backup::restore::adopt_etcd_data_dir(&cfg)?;
    }
    let first_boot = !Member::exists(&member_dir);
    let (id, cluster_id, seed_peers) = if first_boot {
        first_boot_identity(&cfg, &initial, &peer_urls).await?
    } else {
        (0, 0, Vec::new())
    };
    let member = Member::load_or_create(
        &member_dir,
        &cfg.name,
        peer_urls,
        cfg.advertise_client_urls.iter().map(url_string).collect(),
        (id, cluster_id),
    )?;
    tracing::info!(name = %member.name, member_id = %format!("{:x}", member.id),
        cluster_id = %format!("{:x}", member.cluster_id), data_dir = %data_dir.display(), "starting member");

    let snapshotter = Snapshotter::new(member_dir.join("snap"))?.with_keep(cfg.max_snapshots);
    // Everything that can fail on bad input (ports, snapshots, the WAL) is checked before the
    // shards start: a failing start-up then leaves no storage engine half-open behind it.
    let listeners = bind_all(&cfg.listen_client_urls, "client").await?;
    let metrics_urls = cfg.listen_metrics_urls.as_deref().unwrap_or_default();
    let metrics_listeners = bind_all(metrics_urls, "metrics").await?;
    let peer_listeners = bind_all(&cfg.listen_peer_urls, "peer").await?;
    let RecoveredLog {
        snapshot: snap,
        broken,
        mut wal,
        recovered,
    } = recover_log(&snapshotter, &cfg.wal_dir(), !cfg.unsafe_no_fsync)?;
    wal.set_max_segments(cfg.max_wals);
    let engine = engine_config(&cfg, &member_dir, member.id)?;
    // Fatal errors (a shard's engine failing, the Raft log that cannot be written) come here
    // and stop the member (see the end of this function).
    let (fatal_tx, mut fatal_rx) = crate::fatal::FatalTx::channel();
    let shards = Shards::spawn(cfg.shard_count(), &engine, fatal_tx.clone())?;
    let snapshot_index = snap.as_ref().map_or(0, |s| s.index);
    let log_last_index = recovered.entries.last().map_or(snapshot_index, |e| e.index);
    let start = match record_shard_count(&engine, cfg.shard_count()) {
        Ok(()) => recover_start(&shards.set, &engine, snap.as_ref(), log_last_index).await,
        Err(e) => Err(e),
    };
    let start = start.and_then(|start| {
        let Some(newest) = broken.first() else {
            return Ok(start);
        };
        // Durable shards resume from their own applied index, and the WAL only reaches back to
        // the older snapshot: shards below it (emptied by an interrupted install of a leader's
        // snapshot, say) would skip entries nobody can replay.
        anyhow::ensure!(
            start.restore.is_some() || start.index >= snapshot_index,
            "snapshot {} is corrupt and cannot be skipped: the shards hold only up to index {}, \
             below the older snapshot at index {snapshot_index} the WAL starts from",
            newest.path.display(),
            start.index
        );
        for b in &broken {
            snapshotter.mark_broken(b)?;
        }
        Ok(start)
    });
    let start = match start {
        Ok(start) => start,
        Err(e) => {
            // Close the shards' databases before the process exits with the error.
            shards.join();
            return Err(e);
        }
    };
    tracing::info!(index = start.index, revision = start.revision, replay_until = start.replay_until,
        engine = ?engine.kind, "recovered state machine");
    tracing::info!(entries = recovered.entries.len(), "replaying WAL");
    // What this member knew to be committed when it stopped: the state machine (and with it
    // the membership table) is whole once it has applied that far.
    let committed_at_start = recovered.hard_state.as_ref().map_or(0, |h| h.commit);

    let request_timeout = Duration::from_millis(5000 + 2 * cfg.election_timeout);
    let pending = Arc::new(Pending::new(member.id));
    let (applied_tx, applied_rx) = state_watch::channel(AppliedState::default());
    let (snap_tx, snap_rx) = flume::unbounded();
    let (committed_tx, committed_rx) = flume::bounded(1024);
    let this_member = MemberRecord {
        id: member.id,
        name: member.name.clone(),
        peer_urls: member.peer_urls.clone(),
        client_urls: member.client_urls.clone(),
        is_learner: false,
    };
    let bootstrap = if cfg.initial_cluster_state == ClusterState::New {
        initial.clone()
    } else {
        Vec::new()
    };
    let node_cfg = NodeConfig {
        id: member.id,
        this_member,
        bootstrap,
        seed_peers,
        heartbeat_ms: cfg.heartbeat_interval,
        election_ms: cfg.election_timeout,
        lease_reads: cfg.leader_lease_reads,
        catch_up_entries: cfg.experimental_snapshot_catchup_entries,
        request_timeout,
        snap_dir: member_dir.join("snap"),
        max_snapshots: cfg.max_snapshots,
        pre_vote: cfg.pre_vote,
        max_learners: cfg.experimental_max_learners,
        force_new_cluster: cfg.force_new_cluster,
    };
    let faults = Faults::from_env(&tokio::runtime::Handle::current());
    let transport = {
        let (id, cluster_id, faults) = (member.id, member.cluster_id, faults.clone());
        move |node| {
            Transport::new(
                id,
                cluster_id,
                tokio::runtime::Handle::current(),
                faults,
                node,
            )
        }
    };
    let (node, handle) = RaftNode::new(
        &node_cfg,
        snap.as_ref(),
        start.index,
        wal,
        recovered,
        transport,
        committed_tx,
        snap_rx,
    )?;
    let start = StartState {
        membership: handle.membership.borrow().clone(),
        ..start
    };
    let policy = SnapshotPolicy {
        snapshotter,
        count: cfg.snapshot_count,
        notify: snap_tx,
    };
    let leases = LeaseTable::default();
    let alarms = SharedAlarms::default();
    let auth = crate::auth::SharedAuth::new(crate::auth::token::Tokens::from_flag(
        &cfg.auth_token,
        Duration::from_secs(cfg.auth_token_ttl),
    )?);
    let dispatcher = Dispatcher::new(
        shards.set.clone(),
        &start,
        pending.clone(),
        applied_tx,
        policy,
        leases.clone(),
        min_ttl_secs(cfg.election_timeout),
        alarms.clone(),
        auth.clone(),
    );
    let apply_thread = std::thread::Builder::new()
        .name("apply".into())
        .spawn(move || dispatcher.run(committed_rx))?;
    let raft_fatal = fatal_tx.clone();
    let raft_thread = std::thread::Builder::new()
        .name("raft".into())
        .spawn(move || {
            if let Err(e) = node.run() {
                raft_fatal.report(crate::fatal::FatalError::Raft(e));
            }
        })?;

    let core = Arc::new_cyclic(|this| Core {
        this: this.clone(),
        request_timeout,
        // Proposal IDs only need to differ from those of earlier starts that the log may still
        // replay: 4096 IDs per microsecond since the start before this one is more than any
        // start can use (the shift stays within 64 bits until the year 2112).
        next_proposal: AtomicU64::new(member.boot_stamp << 12),
        next_lease_seed: AtomicU64::new(member.id ^ member.boot_stamp),
        alarms,
        auth,
        raising_nospace: Default::default(),
        leader_peer: Default::default(),
        stopping: tokio_util::sync::CancellationToken::new(),
        cfg: cfg.clone(),
        member,
        node: handle,
        shards: shards.set.clone(),
        applied: applied_rx,
        leases,
        pending,
    });

    let mut servers = tokio::task::JoinSet::new();
    // The peer listeners serve until the process exits: a stopping leader still needs them
    // to hand over leadership.
    let peer_stop = tokio_util::sync::CancellationToken::new();
    for (listener, url) in peer_listeners.into_iter().zip(cfg.listen_peer_urls.iter()) {
        let addr = listener.address();
        tracing::info!(address = %addr, "serving peer traffic on {addr}");
        let service = peer::PeerService::new(core.clone(), faults.clone());
        let router = tonic::transport::Server::builder().add_service(
            PeerServer::new(service)
                .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES),
        );
        // The peer port is ours alone: no ping policy.
        serve!(
            servers,
            router,
            listener,
            url,
            tls.peer.as_ref(),
            Duration::ZERO,
            peer_stop
        );
    }
    tokio::spawn(adjust_ticks(
        core.node.clone(),
        core.member.id,
        cfg.initial_election_tick_advance,
        election_ticks(cfg.election_timeout, cfg.heartbeat_interval),
        faults.clone(),
    ));
    // A snapshot still being loaded into the shards: clients wait until it is all there.
    let _ = core
        .applied
        .clone()
        .wait_for(|a| a.index >= start.index)
        .await;
    // As etcd, the check runs once this member's state machine holds what it recovered, and
    // before any client is served.
    if cfg.experimental_initial_corrupt_check {
        corrupt::initial_check(&core, committed_at_start).await?;
    }
    let max_recv = cfg.max_request_bytes + defaults::GRPC_OVERHEAD_BYTES;
    // HTTP on the client port (and the metrics URLs), and grpc.health.v1.Health.
    let (health, _) = tonic_health::server::health_reporter();
    tokio::spawn(http::run_health_reporter(core.clone(), health.clone()));
    http::init_grpc_metrics();
    if cfg.metrics == "extensive" {
        crate::metrics::enable_handling_time();
    }
    // Client and metrics listeners: drained on stop (see [`stop`]).
    let mut client_servers = tokio::task::JoinSet::new();
    for (listener, url) in listeners.into_iter().zip(cfg.listen_client_urls.iter()) {
        let addr = listener.address();
        tracing::info!(address = %addr, scheme = url.scheme(), "serving client requests on {addr}");
        let router = client_server_builder(&cfg)
            .layer(http::HttpLayer::new(
                core.clone(),
                &health,
                http::Endpoints::Client,
            ))
            .layer(gate::GateLayer::new(core.node.status.clone()))
            .add_service(
                KvServer::new(kv::KvService::new(core.clone())).max_decoding_message_size(max_recv),
            )
            .add_service(
                MaintenanceServer::new(maintenance::MaintenanceService::new(core.clone()))
                    .max_decoding_message_size(max_recv),
            )
            .add_service(
                LockServer::new(recipes::LockService::new(core.clone()))
                    .max_decoding_message_size(max_recv),
            )
            .add_service(
                ElectionServer::new(recipes::ElectionService::new(core.clone()))
                    .max_decoding_message_size(max_recv),
            )
            .add_service(
                LeaseServer::new(lease::LeaseService::new(core.clone()))
                    .max_decoding_message_size(max_recv),
            )
            .add_service(
                WatchServer::new(watch::WatchService::new(core.clone()))
                    .max_decoding_message_size(max_recv),
            )
            .add_service(
                ClusterServer::new(cluster::ClusterService::new(core.clone()))
                    .max_decoding_message_size(max_recv),
            )
            .add_service(
                crate::proto::etcdserverpb::auth_server::AuthServer::new(auth::AuthService::new(
                    core.clone(),
                ))
                .max_decoding_message_size(max_recv),
            );
        serve!(
            client_servers,
            router,
            listener,
            url,
            tls.client.as_ref(),
            cfg.grpc_keepalive_min_time,
            core.stopping
        );
    }
    for (listener, url) in metrics_listeners.into_iter().zip(metrics_urls.iter()) {
        let addr = listener.address();
        tracing::info!(address = %addr, "serving metrics on {addr}");
        let router = tonic::transport::Server::builder()
            .accept_http1(true)
            .layer(http::HttpLayer::new(
                core.clone(),
                &health,
                http::Endpoints::Metrics,
            ))
            .add_routes(tonic::service::Routes::default());
        serve!(
            client_servers,
            router,
            listener,
            url,
            tls.client.as_ref(),
            Duration::ZERO,
            core.stopping
        );
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // Everything from here until a stop is asked for races the fatal-error channel: a member
    // that hit one never serves again, whether it was still starting or already serving.
    let serve = async {
        // As etcd, a member is ready once it is part of a cluster with a leader (a lone member
        // elects itself at once). Client listeners already answer meanwhile, with "no leader".
        let mut waited = 0u64;
        while core.node.status.leader.load(Ordering::Relaxed) == 0 {
            if waited.is_multiple_of(5000) && waited > 0 {
                tracing::info!(waited_ms = waited, "waiting for a Raft leader");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            waited += 10;
        }
        // Lease deadlines are right before the first client asks: replay done, then promotion.
        let promoted = core.promote_leases().await;
        tokio::spawn(lease::run_lease_clock(core.clone(), promoted));
        if let Some(retention) = auto_compaction {
            tokio::spawn(compactor::run(core.clone(), retention));
        }
        if !cfg.experimental_corrupt_check_time.is_zero() {
            let every = cfg.experimental_corrupt_check_time;
            tokio::spawn(corrupt::run_periodic_check(core.clone(), every));
        }
        // As etcd (`publish` closes `readych`), a member is ready only once its name and client
        // URLs are in the membership table: a client that lists members right after every member
        // said so sees each one's client URLs (etcd's e2e `memberToRemove` relies on it).
        cluster::publish_attributes(core.clone()).await;
        // etcd logs this once the cluster version is known (MetaStore's is fixed); etcd's e2e
        // TestIssue6361 waits for it from a joining member.
        tracing::info!(
            cluster_version = "3.5",
            "enabled capabilities for version 3.5"
        );
        if cfg.auto_promote_learners {
            tokio::spawn(cluster::auto_promote_learners(core.clone()));
        }
        tracing::info!("ready to serve client requests");

        let removed = async {
            let mut every = tokio::time::interval(Duration::from_millis(100));
            while !core.node.status.removed.load(Ordering::Relaxed) {
                every.tick().await;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("received SIGINT, stopping gracefully"),
            _ = term.recv() => tracing::info!("received SIGTERM, stopping gracefully"),
            _ = removed => {
                // As etcd: answer what is in flight for a moment, then stop for good.
                tracing::warn!("the member has been permanently removed from the cluster; stopping in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Some(r) = servers.join_next() => {
                r??;
                anyhow::bail!("a listener stopped");
            }
            Some(r) = client_servers.join_next() => {
                r??;
                anyhow::bail!("a listener stopped");
            }
        }
        anyhow::Ok(())
    };
    let fatal = tokio::select! {
        served = serve => {
            served?;
            None
        }
        Some(e) = fatal_rx.recv() => {
            tracing::error!(error = %e, "fatal error; stopping the member");
            Some(e)
        }
    };
    // A second signal while draining: stop at once (run returns, and the process exits 1).
    let second_signal = async {
        let signal = tokio::select! {
            _ = tokio::signal::ctrl_c() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        };
        tracing::warn!(signal, "second signal while stopping; exiting at once");
    };
    // After a fatal error no leader transfer: this member's log or state can no longer be
    // trusted to hand over, and the Raft thread may be gone.
    tokio::select! {
        _ = stop(&core, client_servers, raft_thread, apply_thread, fatal.is_none()) => {}
        _ = second_signal => anyhow::bail!("second signal while stopping"),
    }
    drop(servers);
    // The shards' queues stay open until the process exits, as they did before the Raft and
    // apply threads could stop: the last queue sender going away (the runtime dropping the
    // tasks that hold `core`) would have the shard threads close RocksDB while the process
    // exits, which aborts. Everything acknowledged is in the fsynced WAL, and the shards are
    // idle once the apply thread has finished.
    std::mem::forget(shards);
    match fatal {
        // Printed by main as "metastore: error: {e}"; the process exits 1.
        Some(e) => Err(anyhow::Error::msg(e.to_string())),
        None => Ok(()),
    }
}

/// How long [`stop`] lets the client connections finish their requests (etcd's `stopServers`
/// gives gRPC's `GracefulStop` the request timeout before `Stop`); requests still unanswered
/// then are cut.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`stop`] waits for the Raft and apply threads to finish what they hold.
const THREADS_TIMEOUT: Duration = Duration::from_secs(5);

/// A graceful stop, in etcd's order (embed `Etcd.Close`, then `EtcdServer.Stop`, which is
/// `TransferLeadership` followed by `HardStop`; `server/etcdserver/server.go`):
///
/// 1. [`Core::stopping`] is cancelled: the client and metrics listeners stop accepting, their
///    connections are told to go away (HTTP/2 GOAWAY), and every open Watch and
///    LeaseKeepAlive stream ends with "etcdserver: server stopped".
/// 2. Requests in flight are answered: the client servers are waited for, at most
///    [`DRAIN_TIMEOUT`], then aborted.
/// 3. A leader with other voters hands leadership over ([`transfer_leadership`]) so that the
///    cluster does not wait an election timeout for a new one; skipped when `transfer` is
///    false (a stop on a fatal error).
/// 4. The Raft thread is asked to stop ([`NodeMsg::Stop`]) after the round it is in (its WAL
///    writes done); the apply thread then ends once it has applied what it was handed. Both
///    are waited for, at most [`THREADS_TIMEOUT`] each.
///
/// Every step is logged. Every acknowledged write was fsynced before its answer, so nothing
/// needs flushing. The shard threads (and the peer listeners) are left to the process exit,
/// as before: other tasks still hold the shard set.
async fn stop(
    core: &Arc<Core>,
    mut client_servers: tokio::task::JoinSet<Result<(), tonic::transport::Error>>,
    raft_thread: std::thread::JoinHandle<()>,
    apply_thread: std::thread::JoinHandle<()>,
    transfer: bool,
) {
    tracing::info!("stopping: no new client requests; ending watch and keep-alive streams");
    core.stopping.cancel();
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while client_servers.join_next().await.is_some() {}
    })
    .await;
    match drained {
        Ok(()) => tracing::info!("stopping: client requests in flight answered"),
        Err(_) => {
            tracing::warn!(
                timeout = ?DRAIN_TIMEOUT,
                "stopping: client requests still in flight; cutting them"
            );
            client_servers.abort_all();
        }
    }
    if transfer {
        transfer_leadership(core).await;
    }
    tracing::info!("stopping: stopping the raft thread");
    let (tx, rx) = tokio::sync::oneshot::channel();
    if core.node.tx.send_async(NodeMsg::Stop(tx)).await.is_ok() {
        let _ = tokio::time::timeout(THREADS_TIMEOUT, rx).await;
    }
    // Polled rather than joined on the blocking pool: the runtime's exit would wait for a
    // blocking join of a thread that does not finish.
    for (name, thread) in [("raft", raft_thread), ("apply", apply_thread)] {
        let deadline = tokio::time::Instant::now() + THREADS_TIMEOUT;
        while !thread.is_finished() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if thread.is_finished() {
            let _ = thread.join();
            tracing::info!(thread = name, "stopping: thread finished");
        } else {
            tracing::warn!(
                thread = name,
                "stopping: thread still busy; leaving it to the exit"
            );
        }
    }
    tracing::info!("stopped");
}

/// etcd's `EtcdServer.TransferLeadership` on stop (`server/etcdserver/server.go`): when this
/// member leads and the cluster has other voters, hands leadership to the most caught-up voter
/// the leader hears from (highest matched index, then the longest connected; etcd picks the
/// longest connected) and waits until another member leads, at most two election timeouts
/// (raft-rs abandons a transfer after one; it is asked once more). Nothing to do otherwise.
/// A transfer that does not land is logged, and the member stops anyway: the others then
/// elect a leader after an election timeout, as on a crash.
async fn transfer_leadership(core: &Arc<Core>) {
    let me = core.member.id;
    let status = &core.node.status;
    if status.leader.load(Ordering::Relaxed) != me {
        return;
    }
    let voters = core.node.membership.borrow().voters();
    if !voters.iter().any(|&v| v != me) {
        return;
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    if core
        .node
        .tx
        .send_async(NodeMsg::Progress(tx))
        .await
        .is_err()
    {
        return;
    }
    let progress = rx.await.unwrap_or_default();
    let target = progress
        .iter()
        .filter(|p| p.id != me && voters.contains(&p.id) && p.connected_for.is_some())
        .max_by_key(|p| (p.matched, p.connected_for))
        .map(|p| p.id);
    let Some(target) = target else {
        tracing::warn!(
            "stopping: leader, but no other voter is reachable; not transferring leadership"
        );
        return;
    };
    tracing::info!(
        from = %format!("{me:x}"),
        to = %format!("{target:x}"),
        "stopping: leader; transferring leadership"
    );
    let election = Duration::from_millis(core.cfg.election_timeout.max(1));
    let tick = Duration::from_millis(core.cfg.heartbeat_interval.max(1));
    let deadline = tokio::time::Instant::now() + 2 * election;
    let mut asked: Option<tokio::time::Instant> = None;
    loop {
        let leader = status.leader.load(Ordering::Relaxed);
        if leader != me && leader != 0 {
            tracing::info!(
                from = %format!("{me:x}"),
                to = %format!("{leader:x}"),
                "stopping: transferred leadership"
            );
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                to = %format!("{target:x}"),
                "stopping: leadership transfer did not finish in time; stopping anyway"
            );
            return;
        }
        if asked.is_none_or(|at| at.elapsed() >= election) {
            if core
                .node
                .tx
                .send_async(NodeMsg::TransferLeader(target))
                .await
                .is_err()
            {
                return;
            }
            asked = Some(tokio::time::Instant::now());
        }
        tokio::time::sleep(tick).await;
    }
}
