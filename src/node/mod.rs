//! One member's life: [`Node::start`] recovers it and starts its threads and listeners,
//! [`NodeHandle::ready`] waits until it serves, and [`NodeHandle::shutdown`] stops it in
//! etcd's order, ending with the shards' engines flushed and closed and their threads joined.
//! [`run`] is all three, with SIGTERM/SIGINT and fatal errors deciding when.
//!
//! ```text
//!  thread          owns                                   joined to the others by
//!  raft            raft-rs RawNode, WAL, membership        NodeMsg inbox (flume) <- services,
//!                  table, peer transport; after each       peer service, this module;
//!                  round, the apply Dispatcher (state      ApplyMsg (flume, log order) from
//!                  machine): revisions, leases, alarms,    Raft to the Dispatcher, drained on
//!                  auth                                    the same thread
//!  shard 0..N      one glommio executor per CPU, each      ApplyCmd queues (flume, FIFO) <-
//!                  an mvcc::Store over its engine          the Dispatcher, and the Close that
//!                                                          ends it <- this module; read
//!                                                          queues <- services
//!  tokio runtime   gRPC services, HTTP, peer service,      AppliedState (watch) <- the shard
//!                  lease clock, compactor, this module     passing a batch's barrier last;
//!                                                          fatal errors (FatalTx) <- raft,
//!                                                          shards
//! ```

mod error;
mod listeners;
mod recovery;
mod shutdown;
mod ticks;

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;

use crate::apply::alarms::SharedAlarms;
use crate::apply::{Dispatcher, SnapshotPolicy, StartState};
use crate::config::{defaults, ClusterState, Config};
use crate::consensus::transport::{Faults, Transport, MAX_PEER_MESSAGE_BYTES};
use crate::consensus::{
    election_ticks, recover_log, NodeConfig, NodeMsg, RaftHandle, RaftNode, RecoveredLog,
};
use crate::fatal::{run_reporting_panics, FatalError, FatalRx, FatalTx};
use crate::identity::{self as member, url_string, Member};
use crate::lease::{min_ttl_secs, LeaseTable};
use crate::proto::etcdserverpb::{
    auth_server::AuthServer, cluster_server::ClusterServer, kv_server::KvServer,
    lease_server::LeaseServer, maintenance_server::MaintenanceServer, watch_server::WatchServer,
};
use crate::proto::metastorepb::{peer_server::PeerServer, MemberRecord};
use crate::proto::v3electionpb::election_server::ElectionServer;
use crate::proto::v3lockpb::lock_server::LockServer;
use crate::server::{
    auth, cluster, compactor, corrupt, gate, http, kv, lease, maintenance, peer, recipes, watch,
    Core, CoreParts,
};
use crate::shard::Shards;
use crate::state_machine::snapshot::Snapshotter;
use crate::state_machine::{AppliedState, ApplyMsg, Pending, SnapshotTaken};
use crate::tls::MemberTls;
pub use error::NodeError;
use listeners::{bind_all, client_server_builder, serve};
use shutdown::Worker;

/// The servers one listener kind runs (each ends when its listener stops).
type Servers = JoinSet<Result<(), tonic::transport::Error>>;

/// Starts members (see [`Node::start`]).
pub struct Node;

/// A started member: its services, threads and listeners. Dropping it without
/// [`NodeHandle::shutdown`] leaves its threads to the process exit.
pub struct NodeHandle {
    core: Arc<Core>,
    cfg: Arc<Config>,
    /// Closed last by [`NodeHandle::shutdown`].
    shards: Shards,
    raft: Worker,
    /// Peer listeners: they serve until the process exits, since a stopping leader still needs
    /// them to hand over leadership.
    peer_servers: Servers,
    /// Client and metrics listeners: drained on stop.
    client_servers: Servers,
    fatal: FatalRx,
    auto_compaction: Option<compactor::Retention>,
    /// The data directory's lock, held while the member runs.
    _lock: std::fs::File,
}

/// Why a member stopped serving.
#[derive(Debug)]
pub enum StopReason {
    /// SIGINT or SIGTERM ("SIGINT"/"SIGTERM").
    Signal(&'static str),
    /// The member was removed from the cluster.
    Removed,
    /// A condition the member cannot go on after (see [`FatalError`]).
    Fatal(FatalError),
}

impl Node {
    /// Recovers the member `cfg` describes (data directory, identity, snapshot, WAL, shards)
    /// and starts it: the Raft thread (which applies too), the shards, and every listener.
    /// Clients are answered from here on ("no leader" until there is one);
    /// [`NodeHandle::ready`] waits until the member serves.
    ///
    /// Errors: invalid flags; a data directory in use, unreadable or damaged; ports that
    /// cannot be bound; a cluster that cannot be joined; `--experimental-initial-corrupt-check`
    /// finding this member's data different from its peers'. Nothing is left running.
    pub async fn start(cfg: Config) -> Result<NodeHandle, NodeError> {
        cfg.validate()?;
        crate::tls::validate(&cfg).map_err(crate::config::ConfigError::Tls)?;
        let auto_compaction =
            compactor::retention(&cfg.auto_compaction_mode, &cfg.auto_compaction_retention)
                .map_err(NodeError::AutoCompaction)?;
        let cfg = Arc::new(cfg);
        let data_dir = cfg.data_dir();
        let lock = recovery::prepare_data_dir(&data_dir)?;
        // Before anything dials a peer (a joining member asks the cluster for its members).
        let tls = crate::tls::setup(&cfg, &data_dir)?;
        let (member, initial, seed_peers) = identify(&cfg).await?;
        let mut handle = launch(cfg, member, initial, seed_peers, tls, lock).await?;
        handle.auto_compaction = auto_compaction;
        Ok(handle)
    }
}

/// This member's identity (created on its first boot), the `--initial-cluster` members, and,
/// for a member joining an existing cluster, that cluster's members.
async fn identify(
    cfg: &Config,
) -> Result<(Member, Vec<MemberRecord>, Vec<MemberRecord>), NodeError> {
    let member_dir = cfg.data_dir().join("member");
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
        crate::backup::restore::adopt_etcd_data_dir(cfg)?;
    }
    let first_boot = !Member::exists(&member_dir);
    let (id, cluster_id, seed_peers) = if first_boot {
        recovery::first_boot_identity(cfg, &initial, &peer_urls).await?
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
        cluster_id = %format!("{:x}", member.cluster_id), data_dir = %cfg.data_dir().display(),
        "starting member");
    Ok((member, initial, seed_peers))
}

/// Client and metrics listeners, bound before anything else starts (see [`launch`]).
struct Bound {
    client: Vec<crate::net::Listener>,
    metrics: Vec<crate::net::Listener>,
}

/// Recovers the state machine and the Raft log, starts the shards and the Raft thread, and
/// serves every listener.
async fn launch(
    cfg: Arc<Config>,
    member: Member,
    initial: Vec<MemberRecord>,
    seed_peers: Vec<MemberRecord>,
    tls: MemberTls,
    lock: std::fs::File,
) -> Result<NodeHandle, NodeError> {
    let member_dir = cfg.data_dir().join("member");
    let snapshotter = Snapshotter::new(member_dir.join("snap"))?.with_keep(cfg.max_snapshots);
    // Everything that can fail on bad input (ports, snapshots, the WAL) is checked before the
    // shards start: a failing start-up then leaves no storage engine half-open behind it.
    let metrics_urls = cfg.listen_metrics_urls.as_deref().unwrap_or_default();
    let bound = Bound {
        client: bind_all(&cfg.listen_client_urls, "client").await?,
        metrics: bind_all(metrics_urls, "metrics").await?,
    };
    let peer_listeners = bind_all(&cfg.listen_peer_urls, "peer").await?;
    let log = recover_log(&snapshotter, &cfg.wal_dir(), !cfg.unsafe_no_fsync)?;
    let engine = recovery::engine_config(&cfg, &member_dir, member.id)?;
    // Fatal errors (a shard's engine failing, the Raft log that cannot be written) come to
    // the handle and stop the member (see `run`).
    let (fatal_tx, mut fatal_rx) = FatalTx::channel();
    let shards = Shards::spawn(cfg.shard_count(), &engine, fatal_tx.clone())?;
    let resumed = unless_fatal(
        &mut fatal_rx,
        recovery::resume(&shards, &engine, &snapshotter, &log),
    );
    let start = match resumed.await {
        Ok(start) => start,
        Err(e) => {
            // Close the shards' databases before the process exits with the error.
            shutdown::close_shards(shards).await;
            return Err(e);
        }
    };
    tracing::info!(index = start.index, revision = start.revision, replay_until = start.replay_until,
        engine = ?engine.kind, "recovered state machine");
    tracing::info!(entries = log.recovered.entries.len(), "replaying WAL");
    // What this member knew to be committed when it stopped: the state machine (and with it
    // the membership table) is whole once it has applied that far.
    let committed_at_start = log.recovered.hard_state.as_ref().map_or(0, |h| h.commit);
    let started = start_threads(
        &cfg, &member, initial, seed_peers, log, start, &shards, fatal_tx,
    );
    let started = match started {
        Ok(started) => started,
        Err(e) => {
            shutdown::close_shards(shards).await;
            return Err(e);
        }
    };
    let Started {
        core,
        raft,
        faults,
        start_index,
    } = started;
    let peer_servers = serve_peers(&cfg, &core, peer_listeners, &tls, &faults);
    tokio::spawn(ticks::adjust_ticks(
        core.node.clone(),
        core.member.id,
        cfg.initial_election_tick_advance,
        election_ticks(cfg.election_timeout, cfg.heartbeat_interval),
        faults,
    ));
    let mut handle = NodeHandle {
        core,
        cfg,
        shards,
        raft,
        peer_servers,
        client_servers: JoinSet::new(),
        fatal: fatal_rx,
        auto_compaction: None,
        _lock: lock,
    };
    // A snapshot still being loaded into the shards: clients wait until it is all there.
    let core = handle.core.clone();
    let loaded = async {
        let _ = core
            .reader
            .applied_changes()
            .wait_for(|a| a.index >= start_index)
            .await;
        // As etcd, the check runs once this member's state machine holds what it recovered,
        // and before any client is served.
        if handle.cfg.experimental_initial_corrupt_check {
            corrupt::initial_check(&core, committed_at_start).await?;
        }
        Ok(())
    };
    if let Err(e) = unless_fatal(&mut handle.fatal, loaded).await {
        handle.shutdown(false).await;
        return Err(e);
    }
    handle.client_servers = serve_clients(&handle.cfg, &handle.core, bound, &tls);
    Ok(handle)
}

/// Runs `step`, a part of start-up that waits on the shards or on what is applied, unless a
/// fatal error comes first: then that error ([`NodeError::Fatal`]). A shard whose engine fails
/// (a corrupt SST block read while recovering, say) stops serving and never answers, so
/// start-up would otherwise wait for it for ever.
async fn unless_fatal<T>(
    fatal: &mut FatalRx,
    step: impl std::future::Future<Output = Result<T, NodeError>>,
) -> Result<T, NodeError> {
    tokio::select! {
        done = step => done,
        Some(e) = fatal.recv() => {
            tracing::error!(error = %e, "fatal error while starting; stopping the member");
            Err(NodeError::Fatal(e))
        }
    }
}

/// What [`start_threads`] started.
struct Started {
    core: Arc<Core>,
    raft: Worker,
    faults: Faults,
    /// The index the state machine starts from: clients wait until it is applied.
    start_index: u64,
}

/// Builds the Raft node and the apply dispatcher from what was recovered, starts the Raft
/// thread that runs both, and the services' shared state.
#[allow(clippy::too_many_arguments)]
fn start_threads(
    cfg: &Arc<Config>,
    member: &Member,
    initial: Vec<MemberRecord>,
    seed_peers: Vec<MemberRecord>,
    log: RecoveredLog,
    start: StartState,
    shards: &Shards,
    fatal: FatalTx,
) -> Result<Started, NodeError> {
    let pending = Arc::new(Pending::new(member.id));
    let (applied_tx, applied_rx) = tokio::sync::watch::channel(AppliedState::default());
    let (snap_tx, snap_rx) = flume::unbounded();
    // Unbounded: its one consumer is the thread that fills it, after each round.
    let (committed_tx, committed_rx) = flume::unbounded();
    let faults = Faults::from_env(&tokio::runtime::Handle::current());
    let (node, raft_handle) = new_raft_node(
        cfg,
        &node_config(cfg, member, initial, seed_peers),
        log,
        start.index,
        raft_transport(member, &faults),
        committed_tx,
        snap_rx,
    )?;
    let start = StartState {
        membership: raft_handle.membership.borrow().clone(),
        ..start
    };
    let tables = Tables::new(cfg)?;
    let dispatcher = new_dispatcher(
        cfg,
        shards,
        &start,
        pending.clone(),
        applied_tx,
        snap_tx,
        &tables,
    );
    let raft = spawn_raft(dispatcher, committed_rx, node, fatal)?;
    let core = Core::new(CoreParts {
        cfg: cfg.clone(),
        member: member.clone(),
        node: raft_handle,
        shards: shards.set.clone(),
        applied: applied_rx,
        leases: tables.leases,
        pending,
        alarms: tables.alarms,
        auth: tables.auth,
        downgrade: tables.downgrade,
        events: tables.events,
    });
    Ok(Started {
        core,
        raft,
        faults,
        start_index: start.index,
    })
}

/// The Raft node's settings, from the flags and this member's identity. `initial` (the
/// `--initial-cluster` members) bootstraps only a new cluster; `seed_peers` are the members
/// of the cluster a new member joins.
fn node_config(
    cfg: &Config,
    member: &Member,
    initial: Vec<MemberRecord>,
    seed_peers: Vec<MemberRecord>,
) -> NodeConfig {
    NodeConfig {
        id: member.id,
        this_member: MemberRecord {
            id: member.id,
            name: member.name.clone(),
            peer_urls: member.peer_urls.clone(),
            client_urls: member.client_urls.clone(),
            is_learner: false,
        },
        bootstrap: if cfg.initial_cluster_state == ClusterState::New {
            initial
        } else {
            Vec::new()
        },
        seed_peers,
        heartbeat_ms: cfg.heartbeat_interval,
        election_ms: cfg.election_timeout,
        lease_reads: cfg.leader_lease_reads,
        catch_up_entries: cfg.experimental_snapshot_catchup_entries,
        request_timeout: Duration::from_millis(5000 + 2 * cfg.election_timeout),
        snap_dir: cfg.data_dir().join("member").join("snap"),
        max_snapshots: cfg.max_snapshots,
        pre_vote: cfg.pre_vote,
        max_learners: cfg.experimental_max_learners,
        force_new_cluster: cfg.force_new_cluster,
    }
}

/// Makes the Raft node's peer transport, given the node's inbox: it runs on the current
/// runtime, with the fault injection `faults` describes.
fn raft_transport(
    member: &Member,
    faults: &Faults,
) -> impl FnOnce(flume::Sender<NodeMsg>) -> Transport {
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
}

/// Builds the Raft node from the recovered log (its WAL keeping at most `--max-wals`
/// segments), `applied` being the index the state machine starts from. It hands committed
/// entries to `committed` and takes the dispatcher's snapshots from `snapshots`.
///
/// Errors: the Raft node's (a WAL that cannot be written, a log that does not fit the
/// snapshot).
fn new_raft_node(
    cfg: &Config,
    node_cfg: &NodeConfig,
    log: RecoveredLog,
    applied: u64,
    transport: impl FnOnce(flume::Sender<NodeMsg>) -> Transport,
    committed: flume::Sender<ApplyMsg>,
    snapshots: flume::Receiver<SnapshotTaken>,
) -> Result<(RaftNode, RaftHandle), NodeError> {
    let RecoveredLog {
        snapshot,
        mut wal,
        recovered,
        ..
    } = log;
    wal.set_max_segments(cfg.max_wals);
    let built = RaftNode::new(
        node_cfg,
        snapshot.as_ref(),
        applied,
        wal,
        recovered,
        transport,
        committed,
        snapshots,
    )?;
    Ok(built)
}

/// The tables the dispatcher keeps and the services read: leases, alarms, auth (with the
/// token provider `--auth-token` names) and the downgrade state.
struct Tables {
    leases: LeaseTable,
    alarms: SharedAlarms,
    auth: crate::auth::SharedAuth,
    downgrade: crate::apply::downgrade::SharedDowngrade,
    /// Each applied batch's watch events, from the dispatcher to the watch feed.
    events: Arc<crate::apply::events::EventHandoff>,
}

impl Tables {
    /// Empty tables (the dispatcher restores them from the start state).
    ///
    /// Errors: an `--auth-token` that does not name a usable token provider.
    fn new(cfg: &Config) -> Result<Tables, NodeError> {
        let auth = crate::auth::SharedAuth::new(crate::auth::token::Tokens::from_flag(
            &cfg.auth_token,
            Duration::from_secs(cfg.auth_token_ttl),
        )?);
        Ok(Tables {
            leases: LeaseTable::default(),
            alarms: SharedAlarms::default(),
            auth,
            downgrade: Default::default(),
            events: Default::default(),
        })
    }
}

/// The apply dispatcher over `shards`, from the start state, publishing what it applied on
/// `applied_tx` and handing its snapshots (every `--snapshot-count` entries) to `snapshots`.
fn new_dispatcher(
    cfg: &Config,
    shards: &Shards,
    start: &StartState,
    pending: Arc<Pending>,
    applied_tx: tokio::sync::watch::Sender<AppliedState>,
    snapshots: flume::Sender<SnapshotTaken>,
    tables: &Tables,
) -> Dispatcher {
    Dispatcher::new(
        shards.set.clone(),
        start,
        pending,
        applied_tx,
        SnapshotPolicy {
            snap_dir: cfg.data_dir().join("member").join("snap"),
            count: cfg.snapshot_count,
            notify: snapshots,
        },
        tables.leases.clone(),
        min_ttl_secs(cfg.election_timeout),
        tables.alarms.clone(),
        crate::apply::ReplicatedTables {
            auth: tables.auth.clone(),
            downgrade: tables.downgrade.clone(),
            events: tables.events.clone(),
        },
    )
}

/// Starts the Raft thread, which runs the dispatcher over `committed` after each of its
/// rounds ([`RaftNode::apply_here`]); its failure is reported on `fatal`.
///
/// Errors: the OS refuses a thread.
fn spawn_raft(
    mut dispatcher: Dispatcher,
    committed: flume::Receiver<ApplyMsg>,
    mut node: RaftNode,
    fatal: FatalTx,
) -> Result<Worker, NodeError> {
    node.apply_here(Box::new(move || dispatcher.drain(&committed)));
    Worker::spawn("raft", move || {
        if let Some(Err(e)) = run_reporting_panics("raft", &fatal, || node.run()) {
            fatal.report(FatalError::Raft(e));
        }
    })
    .map_err(|source| NodeError::Os {
        context: "cannot start the raft thread",
        source,
    })
}

/// Serves the peer service on every peer listener.
fn serve_peers(
    cfg: &Config,
    core: &Arc<Core>,
    listeners: Vec<crate::net::Listener>,
    tls: &MemberTls,
    faults: &Faults,
) -> Servers {
    let mut servers = JoinSet::new();
    // Never cancelled: the peer listeners serve until the process exits.
    let never = tokio_util::sync::CancellationToken::new();
    for (listener, url) in listeners.into_iter().zip(cfg.listen_peer_urls.iter()) {
        let addr = listener.address();
        tracing::info!(address = %addr, "serving peer traffic on {addr}");
        let service = peer::PeerService::new(core, faults.clone());
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
            never
        );
    }
    servers
}

/// etcd's eight client services over `core`'s handles, each refusing requests larger than
/// `max_recv` bytes (etcd `--max-request-bytes` plus gRPC's overhead).
fn client_services(core: &Core, max_recv: usize) -> tonic::service::Routes {
    /// Registers a service with the request size limit.
    macro_rules! limited {
        ($routes:expr, $server:ident, $service:expr) => {
            $routes.add_service($server::new($service).max_decoding_message_size(max_recv))
        };
    }
    let routes = tonic::service::Routes::default();
    let routes = limited!(routes, KvServer, kv::KvService::new(core));
    let routes = limited!(
        routes,
        MaintenanceServer,
        maintenance::MaintenanceService::new(core)
    );
    let routes = limited!(routes, LockServer, recipes::LockService::new(core));
    let routes = limited!(routes, ElectionServer, recipes::ElectionService::new(core));
    let routes = limited!(routes, LeaseServer, lease::LeaseService::new(core));
    let routes = limited!(routes, WatchServer, watch::WatchService::new(core));
    let routes = limited!(routes, ClusterServer, cluster::ClusterService::new(core));
    limited!(routes, AuthServer, auth::AuthService::new(core))
}

/// Serves the gRPC services and HTTP endpoints on every client listener, and the HTTP
/// endpoints on every metrics listener. They stop accepting once [`Core::stopping`] is
/// cancelled.
fn serve_clients(cfg: &Config, core: &Arc<Core>, bound: Bound, tls: &MemberTls) -> Servers {
    let max_recv = cfg.max_request_bytes + defaults::GRPC_OVERHEAD_BYTES;
    // HTTP on the client port (and the metrics URLs), and grpc.health.v1.Health.
    let (health, _) = tonic_health::server::health_reporter();
    tokio::spawn(http::run_health_reporter(core.clone(), health.clone()));
    http::init_grpc_metrics();
    if cfg.metrics == "extensive" {
        crate::metrics::enable_handling_time();
    }
    let mut servers = JoinSet::new();
    for (listener, url) in bound.client.into_iter().zip(cfg.listen_client_urls.iter()) {
        let addr = listener.address();
        tracing::info!(address = %addr, scheme = url.scheme(), "serving client requests on {addr}");
        let router = client_server_builder(cfg)
            .layer(http::HttpLayer::new(
                core.clone(),
                &health,
                http::Endpoints::Client,
                tls.client.is_some() && crate::net::is_tls(url),
            ))
            .layer(gate::GateLayer::new(
                core.node.status.clone(),
                core.in_flight.clone(),
            ))
            .add_routes(client_services(core, max_recv));
        serve!(
            servers,
            router,
            listener,
            url,
            tls.client.as_ref(),
            cfg.grpc_keepalive_min_time,
            core.stopping
        );
    }
    let metrics_urls = cfg.listen_metrics_urls.as_deref().unwrap_or_default();
    for (listener, url) in bound.metrics.into_iter().zip(metrics_urls.iter()) {
        let addr = listener.address();
        tracing::info!(address = %addr, "serving metrics on {addr}");
        let router = tonic::transport::Server::builder()
            .accept_http1(true)
            .layer(http::HttpLayer::new(
                core.clone(),
                &health,
                http::Endpoints::Metrics,
                tls.client.is_some() && crate::net::is_tls(url),
            ))
            .add_routes(tonic::service::Routes::default());
        serve!(
            servers,
            router,
            listener,
            url,
            tls.client.as_ref(),
            Duration::ZERO,
            core.stopping
        );
    }
    servers
}

impl NodeHandle {
    /// The services' shared state.
    pub fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// Waits until the member serves, as etcd's `readych`: it is part of a cluster with a
    /// leader (a lone member elects itself at once), its lease deadlines are set, and its name
    /// and client URLs are in the membership table. Starts the lease clock, the auto
    /// compactor, the periodic corruption check and learner promotion on the way. Logs "ready
    /// to serve client requests".
    pub async fn ready(&self) {
        become_ready(&self.core, &self.cfg, self.auto_compaction).await;
    }

    /// Gets ready ([`NodeHandle::ready`]) and serves until something stops the member:
    /// `stop_asked` completing (the signals, in [`run`]), its removal from the cluster, or a
    /// fatal error (which may come while it is still getting ready).
    ///
    /// Errors: a listener that stopped on its own.
    pub async fn serve(
        &mut self,
        stop_asked: impl std::future::Future<Output = StopReason>,
    ) -> Result<StopReason, NodeError> {
        let mut changes = self.core.node.status.subscribe();
        let (core, cfg, auto_compaction) =
            (self.core.clone(), self.cfg.clone(), self.auto_compaction);
        let serving = async {
            become_ready(&core, &cfg, auto_compaction).await;
            tokio::select! {
                reason = stop_asked => Ok(reason),
                _ = changes.wait_for(|l| l.removed) => {
                    // As etcd: answer what is in flight for a moment, then stop for good.
                    tracing::warn!("the member has been permanently removed from the cluster; stopping in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    Ok(StopReason::Removed)
                }
            }
        };
        let listener_died = async {
            let r = tokio::select! {
                Some(r) = self.peer_servers.join_next() => r,
                Some(r) = self.client_servers.join_next() => r,
            };
            let cause: Option<Box<dyn std::error::Error + Send + Sync>> = match r {
                Err(e) => Some(Box::new(e)),
                Ok(Err(e)) => Some(Box::new(e)),
                Ok(Ok(())) => None,
            };
            Err(NodeError::ListenerStopped(cause))
        };
        tokio::select! {
            reason = serving => reason,
            e = listener_died => e,
            Some(e) = self.fatal.recv() => {
                tracing::error!(error = %e, "fatal error; stopping the member");
                Ok(StopReason::Fatal(e))
            }
        }
    }

    /// A graceful stop, in etcd's order (embed `Etcd.Close`, then `EtcdServer.Stop`, which is
    /// `TransferLeadership` followed by `HardStop`; `server/etcdserver/server.go`):
    ///
    /// 1. [`Core::stopping`] is cancelled: the client and metrics listeners stop accepting,
    ///    their connections are told to go away (HTTP/2 GOAWAY), and every open Watch and
    ///    LeaseKeepAlive stream ends with "etcdserver: server stopped".
    /// 2. Requests in flight are answered: the stop waits until none is left (or every
    ///    client connection has closed), at most 5 s, then stops the listeners; a connection
    ///    still open closes once its client acknowledges the GOAWAY, or at the exit.
    /// 3. When `transfer` is set, a leader with other voters hands leadership over so that the
    ///    cluster does not wait an election timeout for a new one (not after a fatal error:
    ///    this member's log or state can no longer be trusted to hand over).
    /// 4. The Raft thread is asked to stop after the round it is in (its WAL writes done and
    ///    what it handed over applied), and is waited for, at most 5 s.
    ///
    /// 5. The shards, idle once the Raft thread has finished, are closed: each syncs its
    ///    engine's files (RocksDB: its WAL synced, its memtables flushed to SST files), closes
    ///    its engine and ends its thread, which is joined; at most 10 s in all
    ///    ([`Shards::close`]). Requests that still reach a shard afterwards (through the
    ///    services' handles, which live on) are answered "server stopped".
    ///
    /// Every step is logged. Every acknowledged write was in the fsynced Raft WAL before its
    /// answer, so the sync only spares the next start RocksDB's own log replay. Returns once
    /// the engines are closed: a storage engine is never left to be torn down by the process
    /// exit (RocksDB aborts the process when that happens). The peer listeners keep serving
    /// until the process exits.
    pub async fn shutdown(mut self, transfer: bool) {
        tracing::info!("stopping: no new client requests; ending watch and keep-alive streams");
        self.core.stopping.cancel();
        let servers = &mut self.client_servers;
        let in_flight = self.core.in_flight.clone();
        // What a stop waits for is the requests, not the connections: a connection closes only
        // once its client acknowledges the GOAWAY, which an idle client may be slow to do.
        let drained = tokio::time::timeout(shutdown::DRAIN_TIMEOUT, async {
            tokio::select! {
                _ = async { while servers.join_next().await.is_some() {} } => {}
                _ = in_flight.idle() => {}
            }
        })
        .await;
        match drained {
            Ok(()) => tracing::info!("stopping: client requests in flight answered"),
            Err(_) => tracing::warn!(
                timeout = ?shutdown::DRAIN_TIMEOUT,
                in_flight = self.core.in_flight.count(),
                "stopping: client requests still in flight; cutting them"
            ),
        }
        // Stops the listeners; each open connection is still closed gracefully, on its own.
        self.client_servers.abort_all();
        if transfer {
            shutdown::transfer_leadership(&self.core).await;
        }
        shutdown::stop_raft(&self.core).await;
        self.raft.join(shutdown::THREADS_TIMEOUT).await;
        // After the Raft thread: until it has finished, its dispatcher may still send to the
        // shards.
        shutdown::close_shards(self.shards).await;
        tracing::info!("stopped");
    }
}

/// See [`NodeHandle::ready`].
async fn become_ready(
    core: &Arc<Core>,
    cfg: &Config,
    auto_compaction: Option<compactor::Retention>,
) {
    let mut changes = core.node.status.subscribe();
    let leader = async { changes.wait_for(|l| l.leader != 0).await.is_ok() };
    tokio::pin!(leader);
    let mut waited = 0;
    // Client listeners already answer meanwhile, with "no leader".
    while tokio::time::timeout(Duration::from_secs(5), &mut leader)
        .await
        .is_err()
    {
        waited += 5;
        tracing::info!(waited_ms = waited * 1000, "waiting for a Raft leader");
    }
    // Lease deadlines are right before the first client asks: replay done, then promotion.
    let promoted = core.leases.promote().await;
    tokio::spawn(lease::run_lease_clock(core.clone(), promoted));
    if let Some(retention) = auto_compaction {
        tokio::spawn(compactor::run(core.clone(), retention));
    }
    if !cfg.experimental_corrupt_check_time.is_zero() {
        let every = cfg.experimental_corrupt_check_time;
        tokio::spawn(corrupt::run_periodic_check(core.clone(), every));
    }
    // As etcd (`publish` closes `readych`), a member is ready only once its name and client
    // URLs are in the membership table: a client that lists members right after every
    // member said so sees each one's client URLs (etcd's e2e `memberToRemove` relies on it).
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
}

/// Starts a member and serves until SIGINT/SIGTERM, its removal from the cluster, or a fatal
/// error, then stops it ([`NodeHandle::shutdown`]). A second signal while stopping ends it at
/// once.
///
/// Errors: those of [`Node::start`]; a listener that stopped; a fatal error (the process
/// should exit non-zero); a second signal.
pub async fn run(cfg: Config) -> Result<(), NodeError> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| NodeError::Os {
            context: "cannot handle SIGTERM",
            source,
        })?;
    let mut node = Node::start(cfg).await?;
    let signal = async {
        let signal = tokio::select! {
            _ = tokio::signal::ctrl_c() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        };
        tracing::info!("received {signal}, stopping gracefully");
        StopReason::Signal(signal)
    };
    let reason = node.serve(signal).await?;
    let second_signal = async {
        let signal = tokio::select! {
            _ = tokio::signal::ctrl_c() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        };
        tracing::warn!(signal, "second signal while stopping; exiting at once");
    };
    let transfer = !matches!(reason, StopReason::Fatal(_));
    tokio::select! {
        _ = node.shutdown(transfer) => {}
        _ = second_signal => return Err(NodeError::SecondSignal),
    }
    match reason {
        // Printed by main as "metastore: error: {e}"; the process exits 1.
        StopReason::Fatal(e) => Err(NodeError::Fatal(e)),
        StopReason::Signal(_) | StopReason::Removed => Ok(()),
    }
}
