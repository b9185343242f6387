//! The gRPC front end and member start-up.
//!
//! One file per etcd service (`kv.rs`, `maintenance.rs`, `cluster.rs`). They share [`Core`]:
//! writes are validated, proposed through the Raft node and answered once applied; reads go
//! straight to the shards at a revision every shard has applied.

mod cluster;
mod kv;
mod lease;
mod maintenance;
pub mod member;
mod recipes;
pub mod validate;
mod watch;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prost::Message;
use tokio::sync::watch as state_watch;

use crate::apply::{
    self, AppliedState, ApplyResponse, Dispatcher, Pending, SnapshotPolicy, StartState,
};
use crate::config::{defaults, Config};
use crate::consensus::snapshot::Snapshotter;
use crate::consensus::wal::Wal;
use crate::consensus::{NodeConfig, NodeHandle, NodeMsg, RaftNode};
use crate::error::EtcdError;
use crate::lease::{min_ttl_secs, LeaseTable};
use crate::mvcc::range::merge;
use crate::proto::etcdserverpb::{
    cluster_server::ClusterServer, kv_server::KvServer, lease_server::LeaseServer,
    maintenance_server::MaintenanceServer, watch_server::WatchServer, RangeRequest, RangeResponse,
    ResponseHeader,
};
use crate::proto::metastorepb::{proposal::Request as Proposed, Proposal, StateSnapshot};
use crate::proto::v3electionpb::election_server::ElectionServer;
use crate::proto::v3lockpb::lock_server::LockServer;
use crate::shard::{ApplyCmd, EngineConfig, EngineKind, ShardSet, Shards};
use member::{url_string, Member};

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
    /// The NOSPACE alarm: raised when the backend passes its quota, cleared by Alarm DEACTIVATE.
    pub nospace: std::sync::atomic::AtomicBool,
    /// This core itself, for tasks that outlive a borrowed `&Core` (lock cleanup).
    this: std::sync::Weak<Core>,
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
    pub async fn propose(&self, request: Proposed) -> Result<ApplyResponse, EtcdError> {
        let id = self.next_proposal.fetch_add(1, Ordering::Relaxed);
        let data = Proposal {
            id,
            request: Some(request),
        }
        .encode_to_vec();
        if data.len() > self.cfg.max_request_bytes {
            return Err(EtcdError::RequestTooLarge);
        }
        // The guard removes the waiter however this future ends: reply, timeout or the
        // client going away.
        let (_guard, rx) = self.pending.register(id);
        let work = async {
            self.node
                .tx
                .send_async(NodeMsg::Propose { id, data })
                .await
                .map_err(|_| EtcdError::Stopped)?;
            rx.await.map_err(|_| EtcdError::Stopped)?
        };
        tokio::time::timeout(self.request_timeout, work)
            .await
            .map_err(|_| EtcdError::Timeout)?
    }

    /// Fails with "database space exceeded" while the NOSPACE alarm is raised; raises it when
    /// the backend has grown past `--quota-backend-bytes`. Reads are never refused.
    pub fn check_quota(&self) -> Result<(), EtcdError> {
        if !self.nospace.load(Ordering::Relaxed) && self.shards.db_size() <= self.cfg.quota_bytes()
        {
            return Ok(());
        }
        if !self.nospace.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                quota = self.cfg.quota_bytes(),
                "backend over quota: NOSPACE alarm raised"
            );
        }
        Err(EtcdError::NoSpace)
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
/// placed by `shard_for(key, count)`: reopening with another count would misplace them.
fn engine_config(cfg: &Config, member_dir: &Path) -> anyhow::Result<EngineConfig> {
    let dir = member_dir.join("shards");
    if cfg.storage_engine == EngineKind::Rocksdb {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
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
            Err(_) => std::fs::write(&count_file, count.to_string())
                .with_context(|| format!("cannot write {}", count_file.display()))?,
        }
    }
    Ok(EngineConfig {
        kind: cfg.storage_engine,
        dir,
        rocks: cfg.rocks_options(),
    })
}

/// Where the state machine resumes. Memory engine: the snapshot (its keys go to the shards).
/// RocksDB: the lowest applied index any shard has on disk, with the dispatcher state stored
/// beside it; shards that are further ahead skip the entries they already hold.
async fn recover_start(
    shards: &ShardSet,
    engine: &EngineConfig,
    snap: Option<&StateSnapshot>,
) -> StartState {
    let snapshot_index = snap.map_or(0, |s| s.index);
    if engine.kind == EngineKind::Memory {
        let Some(s) = snap else {
            return StartState::default();
        };
        apply::restore_shards(shards, s).await;
        return StartState {
            index: s.index,
            term: s.term,
            revision: s.revision,
            compact_revision: s.compact_revision,
            leases: s.leases.clone(),
            snapshot_index,
            replay_until: 0,
            durable: false,
        };
    }
    let mut states = Vec::new();
    for i in 0..shards.len() {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let _ = shards.get(i).apply.send(ApplyCmd::Recover { reply });
        states.push(rx.await.ok().flatten());
    }
    let replay_until = states
        .iter()
        .map(|s| s.as_ref().map_or(0, |s| s.applied_index))
        .max()
        .unwrap_or(0);
    let lowest = states
        .into_iter()
        .min_by_key(|s| s.as_ref().map_or(0, |s| s.applied_index))
        .flatten();
    match lowest {
        Some(r) => StartState {
            index: r.applied_index,
            term: r.applied_term,
            revision: r.revision,
            compact_revision: r.compact_revision,
            leases: r.leases,
            snapshot_index,
            replay_until,
            durable: true,
        },
        None => StartState {
            snapshot_index,
            replay_until,
            durable: true,
            ..Default::default()
        },
    }
}

/// Starts a member and serves until SIGINT/SIGTERM.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    cfg.validate()?;
    let cfg = Arc::new(cfg);
    let data_dir = cfg.data_dir();
    let _lock = prepare_data_dir(&data_dir)?;
    let member_dir = data_dir.join("member");
    let member = Member::load_or_create(
        &member_dir,
        &cfg.name,
        cfg.initial_advertise_peer_urls
            .iter()
            .map(url_string)
            .collect(),
        cfg.advertise_client_urls.iter().map(url_string).collect(),
        &cfg.initial_cluster_token,
    )?;
    tracing::info!(name = %member.name, member_id = %format!("{:x}", member.id),
        cluster_id = %format!("{:x}", member.cluster_id), data_dir = %data_dir.display(), "starting member");

    let snapshotter = Snapshotter::new(member_dir.join("snap"))?;
    let snap = snapshotter.load_latest()?;
    // Everything that can fail on bad input (ports, the WAL) is checked before the shards
    // start: a failing start-up then leaves no storage engine half-open behind it.
    let mut listeners = Vec::new();
    for url in cfg.listen_client_urls.iter() {
        let host = url
            .host_str()
            .unwrap_or("localhost")
            .trim_matches(['[', ']']);
        let port = url.port_or_known_default().unwrap_or(2379);
        let listener = tokio::net::TcpListener::bind((host, port))
            .await
            .with_context(|| format!("cannot listen on client URL {url}"))?;
        listeners.push(listener);
    }
    let (wal, recovered) = Wal::open(
        &member_dir.join("wal"),
        snap.as_ref().map_or(0, |s| s.index),
        !cfg.unsafe_no_fsync,
    )?;
    let engine = engine_config(&cfg, &member_dir)?;
    let shards = Shards::spawn(cfg.shard_count(), &engine)?;
    let start = recover_start(&shards.set, &engine, snap.as_ref()).await;
    tracing::info!(index = start.index, revision = start.revision, replay_until = start.replay_until,
        engine = ?engine.kind, "recovered state machine");
    tracing::info!(entries = recovered.entries.len(), "replaying WAL");

    let pending = Arc::new(Pending::default());
    let (applied_tx, applied_rx) = state_watch::channel(AppliedState::default());
    let (snap_tx, snap_rx) = flume::unbounded();
    let (committed_tx, committed_rx) = flume::bounded(1024);
    let voters = vec![member.id];
    let policy = SnapshotPolicy {
        snapshotter,
        count: cfg.snapshot_count,
        voters: voters.clone(),
        notify: snap_tx,
    };
    let leases = LeaseTable::default();
    let dispatcher = Dispatcher::new(
        shards.set.clone(),
        &start,
        pending.clone(),
        applied_tx,
        policy,
        leases.clone(),
        min_ttl_secs(cfg.election_timeout),
    );
    std::thread::Builder::new()
        .name("apply".into())
        .spawn(move || dispatcher.run(committed_rx))?;

    let node_cfg = NodeConfig {
        id: member.id,
        voters,
        heartbeat_ms: cfg.heartbeat_interval,
        election_ms: cfg.election_timeout,
    };
    let (node, handle) = RaftNode::new(
        &node_cfg,
        snap.as_ref(),
        start.index,
        wal,
        recovered,
        pending.clone(),
        committed_tx,
        snap_rx,
    )?;
    std::thread::Builder::new()
        .name("raft".into())
        .spawn(move || node.run())?;

    let core = Arc::new_cyclic(|this| Core {
        this: this.clone(),
        request_timeout: Duration::from_millis(5000 + 2 * cfg.election_timeout),
        next_proposal: AtomicU64::new(member.boot << 48),
        next_lease_seed: AtomicU64::new(member.id ^ (member.boot << 32)),
        nospace: Default::default(),
        cfg: cfg.clone(),
        member,
        node: handle,
        shards: shards.set.clone(),
        applied: applied_rx,
        leases,
        pending,
    });

    let max_recv = cfg.max_request_bytes + defaults::GRPC_OVERHEAD_BYTES;
    let mut servers = tokio::task::JoinSet::new();
    for listener in listeners {
        let addr: SocketAddr = listener.local_addr()?;
        tracing::info!(address = %addr, "serving client requests on {addr}");
        let router = tonic::transport::Server::builder()
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
            );
        // Without TCP_NODELAY, Nagle plus the client's delayed ACK add ~40 ms to small replies.
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        servers.spawn(router.serve_with_incoming(incoming));
    }
    // Lease deadlines are right before the first client asks: replay done, then promotion.
    let promoted = core.promote_leases().await;
    tokio::spawn(lease::run_lease_clock(core.clone(), promoted));
    tracing::info!("ready to serve client requests");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("received SIGINT, stopping"),
        _ = term.recv() => tracing::info!("received SIGTERM, stopping"),
        Some(r) = servers.join_next() => {
            r??;
            anyhow::bail!("a client listener stopped");
        }
    }
    // Every acknowledged write is already fsynced; nothing else needs flushing.
    Ok(())
}
