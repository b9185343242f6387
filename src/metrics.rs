//! The Prometheus metrics served at `/metrics`, named as etcd 3.5 names them (etcd
//! `server/etcdserver/metrics.go`, `server/mvcc/metrics.go`, `server/mvcc/metrics_txn.go`,
//! go-grpc-prometheus for `grpc_server_*`, client_golang's process collector for `process_*`).
//!
//! Counters are fed from the code paths that do the work: the apply dispatcher counts puts,
//! deletes, ranges and txns as etcd's `metricsTxnWrite` does, the front end counts ranges it
//! serves, [`crate::server::http`] counts gRPC calls. Gauges that mirror state kept elsewhere
//! (leader, Raft indexes, database size, key count) are read from that state when scraped, by
//! [`gather`]'s caller through [`ServerState`].

use std::sync::LazyLock;

use prometheus::{
    exponential_buckets, Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec,
    IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric below, plus the process collector (Linux).
pub static REGISTRY: LazyLock<Registry> = LazyLock::new(|| {
    let r = Registry::new();
    let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
        Box::new(HAS_LEADER.clone()),
        Box::new(IS_LEADER.clone()),
        Box::new(IS_LEARNER.clone()),
        Box::new(SERVER_ID.clone()),
        Box::new(LEADER_CHANGES.clone()),
        Box::new(PROPOSALS_COMMITTED.clone()),
        Box::new(PROPOSALS_APPLIED.clone()),
        Box::new(PROPOSALS_PENDING.clone()),
        Box::new(PROPOSALS_FAILED.clone()),
        Box::new(QUOTA_BACKEND_BYTES.clone()),
        Box::new(SERVER_VERSION.clone()),
        Box::new(CLUSTER_VERSION.clone()),
        Box::new(HEALTH_SUCCESS.clone()),
        Box::new(HEALTH_FAILURES.clone()),
        Box::new(HEALTHCHECK.clone()),
        Box::new(HEALTHCHECKS_TOTAL.clone()),
        Box::new(DB_TOTAL_SIZE.clone()),
        Box::new(DB_TOTAL_SIZE_IN_USE.clone()),
        Box::new(MVCC_RANGE.clone()),
        Box::new(MVCC_PUT.clone()),
        Box::new(MVCC_DELETE.clone()),
        Box::new(MVCC_TXN.clone()),
        Box::new(KEYS_TOTAL.clone()),
        Box::new(GRPC_STARTED.clone()),
        Box::new(GRPC_HANDLED.clone()),
        Box::new(GRPC_MSG_RECEIVED.clone()),
        Box::new(GRPC_MSG_SENT.clone()),
        Box::new(WAL_FSYNC_SECONDS.clone()),
        Box::new(BACKEND_COMMIT_SECONDS.clone()),
        Box::new(PEER_SENT_BYTES.clone()),
        Box::new(PEER_RECEIVED_BYTES.clone()),
        Box::new(PEER_SENT_FAILURES.clone()),
        Box::new(PEER_ROUND_TRIP_SECONDS.clone()),
        Box::new(WATCH_STREAMS.clone()),
        Box::new(WATCHERS.clone()),
        Box::new(SLOW_WATCHERS.clone()),
        Box::new(LEASE_EXPIRED.clone()),
        Box::new(LEASE_GRANTED.clone()),
        Box::new(LEASE_REVOKED.clone()),
        Box::new(LEASE_RENEWED.clone()),
        Box::new(SHARD_APPLY_QUEUE_DEPTH.clone()),
        Box::new(SHARD_KEYS.clone()),
    ];
    for c in collectors {
        r.register(c).expect("metric names are unique");
    }
    #[cfg(target_os = "linux")]
    r.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))
    .expect("process metrics register once");
    r
});

fn gauge(namespace: &str, subsystem: &str, name: &str, help: &str) -> IntGauge {
    IntGauge::with_opts(
        Opts::new(name, help)
            .namespace(namespace)
            .subsystem(subsystem),
    )
    .expect("valid metric")
}

fn counter(namespace: &str, subsystem: &str, name: &str, help: &str) -> IntCounter {
    IntCounter::with_opts(
        Opts::new(name, help)
            .namespace(namespace)
            .subsystem(subsystem),
    )
    .expect("valid metric")
}

/// `etcd_server_has_leader`: 1 while this member knows a leader, else 0.
pub static HAS_LEADER: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "etcd",
        "server",
        "has_leader",
        "Whether or not a leader exists. 1 is existence, 0 is not.",
    )
});
/// `etcd_server_is_leader`: 1 while this member is the leader, else 0.
pub static IS_LEADER: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "etcd",
        "server",
        "is_leader",
        "Whether or not this member is a leader. 1 if is, 0 otherwise.",
    )
});
/// `etcd_server_is_learner`: 1 while this member is a learner, else 0.
pub static IS_LEARNER: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "etcd",
        "server",
        "is_learner",
        "Whether or not this member is a learner. 1 if is, 0 otherwise.",
    )
});
/// `etcd_server_id{server_id}`: 1 for this member's ID in hexadecimal.
pub static SERVER_ID: LazyLock<GaugeVec> = LazyLock::new(|| {
    GaugeVec::new(
        Opts::new(
            "id",
            "Server or member ID in hexadecimal format. 1 for 'server_id' label with current ID.",
        )
        .namespace("etcd")
        .subsystem("server"),
        &["server_id"],
    )
    .expect("valid metric")
});
/// `etcd_server_leader_changes_seen_total`: times this member saw a new leader (counted by the
/// Raft thread as etcd's `raftNode` counts it: a ready whose leader is set and differs).
pub static LEADER_CHANGES: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "etcd",
        "server",
        "leader_changes_seen_total",
        "The number of leader changes seen.",
    )
});
/// `etcd_server_proposals_committed_total`: the Raft commit index (a gauge in etcd too).
pub static PROPOSALS_COMMITTED: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "etcd",
        "server",
        "proposals_committed_total",
        "The total number of consensus proposals committed.",
    )
});
/// `etcd_server_proposals_applied_total`: the Raft index applied (a gauge in etcd too).
pub static PROPOSALS_APPLIED: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "etcd",
        "server",
        "proposals_applied_total",
        "The total number of consensus proposals applied.",
    )
});
/// `etcd_server_proposals_pending`: proposals of this member waiting to be applied.
pub static PROPOSALS_PENDING: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "etcd",
        "server",
        "proposals_pending",
        "The current number of pending proposals to commit.",
    )
});
/// `etcd_server_proposals_failed_total`: proposals that timed out or found the node stopped.
pub static PROPOSALS_FAILED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "etcd",
        "server",
        "proposals_failed_total",
        "The total number of failed proposals seen.",
    )
});
/// `etcd_server_quota_backend_bytes`: `--quota-backend-bytes` (or its default), bytes.
pub static QUOTA_BACKEND_BYTES: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "etcd",
        "server",
        "quota_backend_bytes",
        "Current backend storage quota size in bytes.",
    )
});
/// `etcd_server_version{server_version}`: 1 for the version this member reports.
pub static SERVER_VERSION: LazyLock<GaugeVec> = LazyLock::new(|| {
    GaugeVec::new(
        Opts::new(
            "version",
            "Which version is running. 1 for 'server_version' label with current version.",
        )
        .namespace("etcd")
        .subsystem("server"),
        &["server_version"],
    )
    .expect("valid metric")
});
/// `etcd_cluster_version{cluster_version}`: 1 for the cluster version.
pub static CLUSTER_VERSION: LazyLock<GaugeVec> = LazyLock::new(|| {
    GaugeVec::new(
        Opts::new(
            "version",
            "Which version is running. 1 for 'cluster_version' label with current cluster version",
        )
        .namespace("etcd")
        .subsystem("cluster"),
        &["cluster_version"],
    )
    .expect("valid metric")
});
/// `etcd_server_health_success`: `/health` requests answered healthy.
pub static HEALTH_SUCCESS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "etcd",
        "server",
        "health_success",
        "The total number of successful health checks",
    )
});
/// `etcd_server_health_failures`: `/health` requests answered unhealthy.
pub static HEALTH_FAILURES: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "etcd",
        "server",
        "health_failures",
        "The total number of failed health checks",
    )
});
/// `etcd_server_healthcheck{type,name}`: 1 if the last `/livez` or `/readyz` check `name` of
/// `type` (`livez`, `readyz`) passed, else 0 (etcd 3.5.11 `recordMetrics`).
pub static HEALTHCHECK: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    IntGaugeVec::new(
        Opts::new("healthcheck", "The result of each kind of healthcheck.")
            .namespace("etcd")
            .subsystem("server"),
        &["type", "name"],
    )
    .expect("valid metric")
});
/// `etcd_server_healthchecks_total{type,name,status}`: `/livez` and `/readyz` checks run, by
/// outcome (`success`, `error`).
pub static HEALTHCHECKS_TOTAL: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new(
            "healthchecks_total",
            "The total number of each kind of healthcheck.",
        )
        .namespace("etcd")
        .subsystem("server"),
        &["type", "name", "status"],
    )
    .expect("valid metric")
});
/// `grpc_server_handling_seconds{grpc_type,grpc_service,grpc_method}`: seconds from a gRPC
/// call's start to its end, with go-grpc-prometheus's buckets (Prometheus' default ones).
/// Only under `--metrics extensive` ([`enable_handling_time`]), as etcd.
pub static GRPC_HANDLING_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    HistogramVec::new(
        HistogramOpts::new(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
        ),
        &["grpc_type", "grpc_service", "grpc_method"],
    )
    .expect("valid metric")
});

static HANDLING_TIME: std::sync::OnceLock<()> = std::sync::OnceLock::new();

/// `--metrics extensive`: registers [`GRPC_HANDLING_SECONDS`] (etcd calls go-grpc-prometheus'
/// `EnableHandlingTimeHistogram`).
pub fn enable_handling_time() {
    HANDLING_TIME.get_or_init(|| {
        REGISTRY
            .register(Box::new(GRPC_HANDLING_SECONDS.clone()))
            .expect("registered once");
    });
}

/// Whether [`enable_handling_time`] was called.
pub fn handling_time_enabled() -> bool {
    HANDLING_TIME.get().is_some()
}

/// `etcd_mvcc_db_total_size_in_bytes`: storage over all shards, bytes.
pub static DB_TOTAL_SIZE: LazyLock<Gauge> = LazyLock::new(|| {
    Gauge::with_opts(
        Opts::new(
            "db_total_size_in_bytes",
            "Total size of the underlying database physically allocated in bytes.",
        )
        .namespace("etcd")
        .subsystem("mvcc"),
    )
    .expect("valid metric")
});
/// `etcd_mvcc_db_total_size_in_use_in_bytes`: live data over all shards, bytes.
pub static DB_TOTAL_SIZE_IN_USE: LazyLock<Gauge> = LazyLock::new(|| {
    Gauge::with_opts(
        Opts::new(
            "db_total_size_in_use_in_bytes",
            "Total size of the underlying database logically in use in bytes.",
        )
        .namespace("etcd")
        .subsystem("mvcc"),
    )
    .expect("valid metric")
});
/// `etcd_mvcc_range_total`: range operations (Range calls, ranges and compares in txns).
pub static MVCC_RANGE: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "etcd",
        "mvcc",
        "range_total",
        "Total number of ranges seen by this member.",
    )
});
/// `etcd_mvcc_put_total`: put operations applied (Put calls and puts in txns).
pub static MVCC_PUT: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "etcd",
        "mvcc",
        "put_total",
        "Total number of puts seen by this member.",
    )
});
/// `etcd_mvcc_delete_total`: delete-range operations applied (whether or not they deleted).
pub static MVCC_DELETE: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "etcd",
        "mvcc",
        "delete_total",
        "Total number of deletes seen by this member.",
    )
});
/// `etcd_mvcc_txn_total`: applied transactions of more than one operation.
pub static MVCC_TXN: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "etcd",
        "mvcc",
        "txn_total",
        "Total number of txns seen by this member.",
    )
});
/// `etcd_debugging_mvcc_keys_total`: live keys at the latest revision.
pub static KEYS_TOTAL: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "etcd_debugging",
        "mvcc",
        "keys_total",
        "Total number of keys.",
    )
});
/// `grpc_server_started_total{grpc_type,grpc_service,grpc_method}`: gRPC calls started.
pub static GRPC_STARTED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new(
            "grpc_server_started_total",
            "Total number of RPCs started on the server.",
        ),
        &["grpc_type", "grpc_service", "grpc_method"],
    )
    .expect("valid metric")
});
/// `grpc_server_handled_total{grpc_type,grpc_service,grpc_method,grpc_code}`: gRPC calls
/// finished, by status code.
pub static GRPC_HANDLED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new(
            "grpc_server_handled_total",
            "Total number of RPCs completed on the server, regardless of success or failure.",
        ),
        &["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
    )
    .expect("valid metric")
});

/// `grpc_server_msg_received_total{grpc_type,grpc_service,grpc_method}`: gRPC request
/// messages received (one per unary call, each message of a client stream).
pub static GRPC_MSG_RECEIVED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new(
            "grpc_server_msg_received_total",
            "Total number of RPC stream messages received on the server.",
        ),
        &["grpc_type", "grpc_service", "grpc_method"],
    )
    .expect("valid metric")
});
/// `grpc_server_msg_sent_total{grpc_type,grpc_service,grpc_method}`: gRPC response messages
/// sent (one per successful unary call, each message of a server stream).
pub static GRPC_MSG_SENT: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new(
            "grpc_server_msg_sent_total",
            "Total number of gRPC stream messages sent by the server.",
        ),
        &["grpc_type", "grpc_service", "grpc_method"],
    )
    .expect("valid metric")
});

/// etcd's disk-latency buckets (`prometheus.ExponentialBuckets(0.001, 2, 14)`): 1 ms to
/// 8.192 s, seconds.
fn disk_buckets() -> Vec<f64> {
    exponential_buckets(0.001, 2.0, 14).expect("valid buckets")
}

fn histogram(namespace: &str, subsystem: &str, name: &str, help: &str) -> Histogram {
    Histogram::with_opts(
        HistogramOpts::new(name, help)
            .namespace(namespace)
            .subsystem(subsystem)
            .buckets(disk_buckets()),
    )
    .expect("valid metric")
}

/// `etcd_disk_wal_fsync_duration_seconds`: seconds each fdatasync of the Raft WAL took, one
/// observation per [`crate::consensus::wal::Wal::sync`] that syncs (none with
/// `--unsafe-no-fsync`, as etcd's `WAL.sync`). etcd `server/storage/wal/metrics.go`.
pub static WAL_FSYNC_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "etcd",
        "disk",
        "wal_fsync_duration_seconds",
        "The latency distributions of fsync called by WAL.",
    )
});

/// `etcd_disk_backend_commit_duration_seconds`: seconds a shard took to commit what was
/// applied since the previous barrier, one observation per shard per barrier (the shard's
/// `Engine::flush`: one RocksDB write batch holding the data and the applied state, which is
/// what etcd's backend batch-transaction commit is; the memory engine has applied the writes
/// already and commits nothing more, so it observes near-zero times). etcd
/// `server/storage/backend/metrics.go`.
pub static BACKEND_COMMIT_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "etcd",
        "disk",
        "backend_commit_duration_seconds",
        "The latency distributions of commit called by backend.",
    )
});

fn counter_vec(name: &str, help: &str, label: &str) -> IntCounterVec {
    IntCounterVec::new(
        Opts::new(name, help).namespace("etcd").subsystem("network"),
        &[label],
    )
    .expect("valid metric")
}

/// `etcd_network_peer_sent_bytes_total{To}`: bytes of Raft messages (encoded) and snapshot
/// data handed to the stream to member `To` (hex ID). etcd
/// `server/etcdserver/api/rafthttp/metrics.go`.
pub static PEER_SENT_BYTES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "peer_sent_bytes_total",
        "The total number of bytes sent to peers.",
        "To",
    )
});
/// `etcd_network_peer_received_bytes_total{From}`: bytes of Raft messages (encoded) and
/// snapshot data received from member `From` (hex ID). etcd
/// `server/etcdserver/api/rafthttp/metrics.go`.
pub static PEER_RECEIVED_BYTES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "peer_received_bytes_total",
        "The total number of bytes received from peers.",
        "From",
    )
});
/// `etcd_network_peer_sent_failures_total{To}`: Raft messages to member `To` (hex ID) that were
/// not sent: its queue was full, it could not be dialed, its stream broke, or a snapshot send
/// failed. etcd `server/etcdserver/api/rafthttp/metrics.go`.
pub static PEER_SENT_FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "peer_sent_failures_total",
        "The total number of send failures from peers.",
        "To",
    )
});
/// `etcd_network_peer_round_trip_time_seconds{To}`: seconds a probe of member `To` (hex ID)
/// took, a unary call on the connection that carries the Raft stream, made when the link
/// connects and every few seconds after (etcd probes its peers too; see
/// `consensus::transport`). Buckets 0.1 ms to 3.2768 s. etcd
/// `server/etcdserver/api/rafthttp/metrics.go`.
pub static PEER_ROUND_TRIP_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    HistogramVec::new(
        HistogramOpts::new(
            "peer_round_trip_time_seconds",
            "Round-Trip-Time histogram between peers",
        )
        .namespace("etcd")
        .subsystem("network")
        .buckets(exponential_buckets(0.0001, 2.0, 16).expect("valid buckets")),
        &["To"],
    )
    .expect("valid metric")
});

/// The network metrics of one remote member, resolved once per link so that sending does no
/// label lookups.
#[derive(Clone)]
pub struct PeerMetrics {
    /// [`PEER_SENT_BYTES`] for this member.
    pub sent_bytes: IntCounter,
    /// [`PEER_SENT_FAILURES`] for this member.
    pub sent_failures: IntCounter,
    /// [`PEER_ROUND_TRIP_SECONDS`] for this member.
    pub round_trip: Histogram,
}

impl PeerMetrics {
    /// The metrics of traffic to member `id`, labelled with its hex ID as etcd labels them.
    pub fn to(id: u64) -> PeerMetrics {
        let to = format!("{id:x}");
        PeerMetrics {
            sent_bytes: PEER_SENT_BYTES.with_label_values(&[to.as_str()]),
            sent_failures: PEER_SENT_FAILURES.with_label_values(&[to.as_str()]),
            round_trip: PEER_ROUND_TRIP_SECONDS.with_label_values(&[to.as_str()]),
        }
    }
}

/// [`PEER_RECEIVED_BYTES`] for member `id` (hex ID label).
pub fn received_from(id: u64) -> IntCounter {
    PEER_RECEIVED_BYTES.with_label_values(&[format!("{id:x}").as_str()])
}

/// `etcd_debugging_mvcc_watch_stream_total`: open Watch streams. etcd
/// `server/storage/mvcc/metrics.go`.
pub static WATCH_STREAMS: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "etcd_debugging",
        "mvcc",
        "watch_stream_total",
        "Total number of watch streams.",
    )
});
/// `etcd_debugging_mvcc_watcher_total`: watchers on all open Watch streams. etcd
/// `server/storage/mvcc/metrics.go`.
pub static WATCHERS: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "etcd_debugging",
        "mvcc",
        "watcher_total",
        "Total number of watchers.",
    )
});
/// `etcd_debugging_mvcc_slow_watcher_total`: watchers that still owe their client events up to
/// the applied revision after their stream's last catch-up pass (cut at a batch, or waiting on
/// a slow client): etcd's unsynced watchers. etcd `server/storage/mvcc/metrics.go`.
pub static SLOW_WATCHERS: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "etcd_debugging",
        "mvcc",
        "slow_watcher_total",
        "Total number of unsynced slow watchers.",
    )
});

/// `etcd_debugging_server_lease_expired_total`: leases the leader revoked because they
/// expired, counted when the revoke was applied. etcd `server/etcdserver/metrics.go` (this is
/// etcd's exact name; there is no `etcd_server_lease_expired_total`).
pub static LEASE_EXPIRED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "etcd_debugging",
        "server",
        "lease_expired_total",
        "The total number of expired leases.",
    )
});
/// `etcd_debugging_lease_granted_total`: lease grants applied on this member. etcd
/// `server/lease/metrics.go`.
pub static LEASE_GRANTED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "etcd_debugging",
        "lease",
        "granted_total",
        "The total number of granted leases.",
    )
});
/// `etcd_debugging_lease_revoked_total`: lease revokes (by clients or by expiry) applied on
/// this member. etcd `server/lease/metrics.go`.
pub static LEASE_REVOKED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "etcd_debugging",
        "lease",
        "revoked_total",
        "The total number of revoked leases.",
    )
});
/// `etcd_debugging_lease_renewed_total`: keep-alives that renewed a lease on this member while
/// it was the leader. etcd `server/lease/metrics.go`.
pub static LEASE_RENEWED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "etcd_debugging",
        "lease",
        "renewed_total",
        "The number of renewed leases seen by the leader.",
    )
});

/// `metastore_shard_apply_queue_depth{shard}`: commands waiting in shard `shard`'s apply
/// queue (writes, compares, barriers sent by the apply dispatcher), read when scraped.
/// MetaStore's own.
pub static SHARD_APPLY_QUEUE_DEPTH: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    IntGaugeVec::new(
        Opts::new(
            "apply_queue_depth",
            "Commands waiting in each shard's apply queue.",
        )
        .namespace("metastore")
        .subsystem("shard"),
        &["shard"],
    )
    .expect("valid metric")
});
/// `metastore_shard_keys{shard}`: live keys of shard `shard` at the latest applied revision,
/// counted when scraped (their sum is `etcd_debugging_mvcc_keys_total`). MetaStore's own.
pub static SHARD_KEYS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    IntGaugeVec::new(
        Opts::new("keys", "Live keys in each shard.")
            .namespace("metastore")
            .subsystem("shard"),
        &["shard"],
    )
    .expect("valid metric")
});

/// The mvcc operations of one applied request, counted as etcd's `metricsTxnWrite.End`
/// counts them: every range, put and delete-range call, and one txn when there was more than
/// one call.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TxnOps {
    /// Range calls (a txn's compares are ranges too).
    pub ranges: u64,
    /// Put calls.
    pub puts: u64,
    /// DeleteRange calls.
    pub deletes: u64,
}

impl TxnOps {
    /// Adds these operations to the counters.
    pub fn record(self) {
        if self.ranges + self.puts + self.deletes > 1 {
            MVCC_TXN.inc();
        }
        MVCC_RANGE.inc_by(self.ranges);
        MVCC_PUT.inc_by(self.puts);
        MVCC_DELETE.inc_by(self.deletes);
    }
}

/// State read when `/metrics` is scraped, for the gauges that mirror it.
#[derive(Clone, Debug, Default)]
pub struct ServerState {
    /// Whether a leader is known.
    pub has_leader: bool,
    /// Whether this member is the leader.
    pub is_leader: bool,
    /// Whether this member is a learner.
    pub is_learner: bool,
    /// This member's ID.
    pub member_id: u64,
    /// Raft commit index.
    pub committed: u64,
    /// Raft index applied.
    pub applied: u64,
    /// Proposals waiting to be applied.
    pub pending: u64,
    /// Storage size, bytes.
    pub db_size: u64,
    /// Live data size, bytes.
    pub db_size_in_use: u64,
    /// Backend quota, bytes.
    pub quota: u64,
    /// Live keys, when they could be counted.
    pub keys: Option<u64>,
    /// Live keys per shard, in shard order, when they could be counted.
    pub shard_keys: Option<Vec<u64>>,
    /// Commands queued to each shard's apply queue, in shard order.
    pub shard_apply_queue: Vec<u64>,
    /// Server version (`/version`'s `etcdserver`).
    pub server_version: String,
    /// Cluster version (`/version`'s `etcdcluster`).
    pub cluster_version: String,
}

/// Sets the state gauges from `state`, then encodes every metric in the Prometheus text
/// exposition format (version 0.0.4).
pub fn gather(state: &ServerState) -> Vec<u8> {
    HAS_LEADER.set(state.has_leader.into());
    IS_LEADER.set(state.is_leader.into());
    IS_LEARNER.set(state.is_learner.into());
    SERVER_ID.reset();
    SERVER_ID
        .with_label_values(&[format!("{:x}", state.member_id).as_str()])
        .set(1.0);
    PROPOSALS_COMMITTED.set(state.committed as i64);
    PROPOSALS_APPLIED.set(state.applied as i64);
    PROPOSALS_PENDING.set(state.pending as i64);
    DB_TOTAL_SIZE.set(state.db_size as f64);
    DB_TOTAL_SIZE_IN_USE.set(state.db_size_in_use as f64);
    QUOTA_BACKEND_BYTES.set(state.quota as i64);
    if let Some(keys) = state.keys {
        KEYS_TOTAL.set(keys as i64);
    }
    if let Some(shard_keys) = &state.shard_keys {
        for (shard, keys) in shard_keys.iter().enumerate() {
            SHARD_KEYS
                .with_label_values(&[shard.to_string().as_str()])
                .set(*keys as i64);
        }
    }
    for (shard, depth) in state.shard_apply_queue.iter().enumerate() {
        SHARD_APPLY_QUEUE_DEPTH
            .with_label_values(&[shard.to_string().as_str()])
            .set(*depth as i64);
    }
    SERVER_VERSION.reset();
    SERVER_VERSION
        .with_label_values(&[state.server_version.as_str()])
        .set(1.0);
    CLUSTER_VERSION.reset();
    CLUSTER_VERSION
        .with_label_values(&[state.cluster_version.as_str()])
        .set(1.0);
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&REGISTRY.gather(), &mut out)
        .expect("text encoding into a Vec cannot fail");
    out
}

/// The content type of [`gather`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    /// Held by tests that call [`gather`]: it resets and sets the process-wide gauges, so two
    /// at once would see each other's values.
    static GATHER: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn txn_counts_only_multi_op_requests() {
        let _one = GATHER.lock().unwrap_or_else(|e| e.into_inner());
        let before = MVCC_TXN.get();
        TxnOps {
            puts: 1,
            ..Default::default()
        }
        .record();
        assert_eq!(MVCC_TXN.get(), before);
        TxnOps {
            ranges: 1,
            puts: 1,
            deletes: 0,
        }
        .record();
        assert_eq!(MVCC_TXN.get(), before + 1);
        let text = String::from_utf8(gather(&ServerState {
            server_version: "3.5.0".into(),
            cluster_version: "3.5.0".into(),
            ..Default::default()
        }))
        .unwrap();
        assert!(text.contains("etcd_server_version{server_version=\"3.5.0\"} 1"));
        assert!(text.contains("# TYPE etcd_mvcc_put_total counter"));
    }

    /// The `# TYPE` of `name` in `text`.
    fn type_of<'a>(text: &'a str, name: &str) -> Option<&'a str> {
        text.lines().find_map(|l| {
            l.strip_prefix("# TYPE ")?
                .strip_prefix(name)?
                .strip_prefix(' ')
        })
    }

    #[test]
    fn etcd_disk_network_watch_lease_and_shard_metrics_are_exposed() {
        let _one = GATHER.lock().unwrap_or_else(|e| e.into_inner());
        // Labelled families appear once a child exists, as in etcd.
        let peer = PeerMetrics::to(0xabc);
        peer.sent_bytes.inc_by(10);
        peer.round_trip.observe(0.0003);
        received_from(0xabc).inc_by(5);
        BACKEND_COMMIT_SECONDS.observe(0.002);
        let text = String::from_utf8(gather(&ServerState {
            shard_keys: Some(vec![4, 7]),
            shard_apply_queue: vec![0, 3],
            ..Default::default()
        }))
        .unwrap();
        for (name, kind) in [
            ("etcd_disk_wal_fsync_duration_seconds", "histogram"),
            ("etcd_disk_backend_commit_duration_seconds", "histogram"),
            ("etcd_network_peer_sent_bytes_total", "counter"),
            ("etcd_network_peer_received_bytes_total", "counter"),
            ("etcd_network_peer_sent_failures_total", "counter"),
            ("etcd_network_peer_round_trip_time_seconds", "histogram"),
            ("etcd_debugging_mvcc_watcher_total", "gauge"),
            ("etcd_debugging_mvcc_watch_stream_total", "gauge"),
            ("etcd_debugging_mvcc_slow_watcher_total", "gauge"),
            ("etcd_debugging_server_lease_expired_total", "counter"),
            ("etcd_debugging_lease_granted_total", "counter"),
            ("etcd_debugging_lease_revoked_total", "counter"),
            ("etcd_debugging_lease_renewed_total", "counter"),
            ("metastore_shard_apply_queue_depth", "gauge"),
            ("metastore_shard_keys", "gauge"),
        ] {
            assert_eq!(type_of(&text, name), Some(kind), "{name}");
        }
        // etcd's buckets: 1 ms x 2^13 = 8.192 s for disks, 0.1 ms x 2^15 = 3.2768 s for peers.
        for bucket in [
            "etcd_disk_wal_fsync_duration_seconds_bucket{le=\"0.001\"}",
            "etcd_disk_wal_fsync_duration_seconds_bucket{le=\"8.192\"}",
            "etcd_disk_backend_commit_duration_seconds_bucket{le=\"8.192\"}",
            "etcd_network_peer_round_trip_time_seconds_bucket{To=\"abc\",le=\"0.0001\"} 0",
            "etcd_network_peer_round_trip_time_seconds_bucket{To=\"abc\",le=\"0.0004\"}",
            "etcd_network_peer_round_trip_time_seconds_bucket{To=\"abc\",le=\"3.2768\"}",
            "etcd_network_peer_sent_bytes_total{To=\"abc\"}",
            "etcd_network_peer_sent_failures_total{To=\"abc\"} 0",
            "etcd_network_peer_received_bytes_total{From=\"abc\"}",
            "metastore_shard_keys{shard=\"0\"} 4",
            "metastore_shard_keys{shard=\"1\"} 7",
            "metastore_shard_apply_queue_depth{shard=\"1\"} 3",
        ] {
            assert!(text.contains(bucket), "{bucket} not in:\n{text}");
        }
        assert!(!text.contains("le=\"16.384\""), "14 disk buckets only");
        assert!(!text.contains("le=\"6.5536\""), "16 peer buckets only");
    }
}
