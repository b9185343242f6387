//! Member configuration: etcd's flag names, each also read from its `ETCD_*` environment
//! variable (a flag beats its variable), with etcd 3.5's defaults.

use std::path::PathBuf;

use clap::Parser;
use url::Url;

/// etcd's defaults, shared by clap and by code that builds a `Config` by hand.
pub mod defaults {
    /// `--name`.
    pub const NAME: &str = "default";
    /// `--listen-client-urls` and `--advertise-client-urls`.
    pub const CLIENT_URL: &str = "http://localhost:2379";
    /// `--listen-peer-urls` and `--initial-advertise-peer-urls`.
    pub const PEER_URL: &str = "http://localhost:2380";
    /// `--initial-cluster-token`.
    pub const CLUSTER_TOKEN: &str = "etcd-cluster";
    /// `--snapshot-count`, entries (etcd 3.5).
    pub const SNAPSHOT_COUNT: u64 = 100_000;
    /// `--heartbeat-interval`, ms.
    pub const HEARTBEAT_MS: u64 = 100;
    /// `--election-timeout`, ms.
    pub const ELECTION_MS: u64 = 1000;
    /// `--max-request-bytes`: 1.5 MiB.
    pub const MAX_REQUEST_BYTES: usize = 1_572_864;
    /// `--max-txn-ops`.
    pub const MAX_TXN_OPS: usize = 128;
    /// What `--quota-backend-bytes 0` means: 2 GiB.
    pub const QUOTA_BACKEND_BYTES: u64 = 2 * 1024 * 1024 * 1024;
    /// Extra room gRPC allows over `--max-request-bytes` for framing (etcd's grpcOverheadBytes).
    pub const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;
    /// `--max-snapshots`: snapshot files kept (etcd's DefaultMaxSnapshots).
    pub const MAX_SNAPSHOTS: usize = 5;
    /// `--max-wals`: WAL segment files kept (etcd's DefaultMaxWALs).
    pub const MAX_WALS: usize = 5;
    /// `--experimental-max-learners`: learners a cluster may have (etcd's DefaultMaxLearners).
    pub const MAX_LEARNERS: usize = 1;
}

/// `--initial-cluster-state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ClusterState {
    /// Bootstrapping a new cluster.
    New,
    /// Joining an existing cluster.
    Existing,
}

/// `--rocksdb-compression`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Compression {
    /// LZ4 block compression.
    Lz4,
    /// No compression.
    None,
}

/// `--log-level`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogLevel {
    /// Everything, including raft-rs's debug output.
    Debug,
    /// Normal operation.
    Info,
    /// Warnings and errors.
    Warn,
    /// Errors only.
    Error,
    /// Treated as error (etcd accepts it).
    Panic,
    /// Treated as error (etcd accepts it).
    Fatal,
}

/// A comma-separated URL list flag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UrlList(pub Vec<Url>);

impl std::ops::Deref for UrlList {
    type Target = [Url];
    fn deref(&self) -> &[Url] {
        &self.0
    }
}

fn parse_urls(s: &str) -> Result<UrlList, String> {
    s.split(',')
        .map(|u| {
            let url = Url::parse(u.trim()).map_err(|e| format!("invalid URL {u:?}: {e}"))?;
            // etcd's `types.NewURLs` rules and messages.
            if !matches!(url.scheme(), "http" | "https" | "unix" | "unixs") {
                return Err(format!(
                    "URL scheme must be http, https, unix, or unixs: {}",
                    u.trim()
                ));
            }
            if url.host_str().is_none() || url.port_or_known_default().is_none() {
                return Err(format!(
                    "URL address does not have the form \"host:port\": {}",
                    u.trim()
                ));
            }
            if !matches!(url.path(), "" | "/") {
                return Err(format!("URL must not contain a path: {}", u.trim()));
            }
            Ok(url)
        })
        .collect::<Result<_, _>>()
        .map(UrlList)
}

/// A Go `time.Duration` flag value (`"5s"`, `"10m"`, `"1h30m"`, `"100ms"`; `"0"` or `""` for zero),
/// as etcd's duration flags take.
fn parse_go_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    // Go prints a zero duration flag's default as "" or "0" (no unit needed for zero).
    if s.is_empty() || s == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s {
        "true" | "1" | "" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(format!("invalid boolean {s:?}")),
    }
}

/// Everything a member is started with.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "metastore",
    about = "An etcd v3 compatible key-value store",
    args_override_self = true
)]
pub struct Config {
    /// A YAML file of settings keyed by flag name (etcd's `--config-file`); flags given on
    /// the command line beat it.
    #[arg(long, env = "ETCD_CONFIG_FILE")]
    pub config_file: Option<PathBuf>,

    /// Print the version in etcd's layout ([`crate::version::describe`]) and exit.
    #[arg(long)]
    pub version: bool,

    /// Human-readable name for this member.
    #[arg(long, env = "ETCD_NAME", default_value = defaults::NAME)]
    pub name: String,

    /// Path to the data directory [default: ${name}.etcd].
    #[arg(long, env = "ETCD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Comma-separated URLs to serve client traffic on.
    #[arg(long, env = "ETCD_LISTEN_CLIENT_URLS", default_value = defaults::CLIENT_URL, value_parser = parse_urls)]
    pub listen_client_urls: UrlList,

    /// Comma-separated client URLs advertised to the cluster.
    #[arg(long, env = "ETCD_ADVERTISE_CLIENT_URLS", default_value = defaults::CLIENT_URL, value_parser = parse_urls)]
    pub advertise_client_urls: UrlList,

    /// Comma-separated URLs to serve peer traffic on.
    #[arg(long, env = "ETCD_LISTEN_PEER_URLS", default_value = defaults::PEER_URL, value_parser = parse_urls)]
    pub listen_peer_urls: UrlList,

    /// Comma-separated peer URLs advertised to the cluster.
    #[arg(long, env = "ETCD_INITIAL_ADVERTISE_PEER_URLS", default_value = defaults::PEER_URL, value_parser = parse_urls)]
    pub initial_advertise_peer_urls: UrlList,

    /// Initial cluster configuration: `name=peer-url,...` [default: ${name}=<advertise peer url>].
    #[arg(long, env = "ETCD_INITIAL_CLUSTER")]
    pub initial_cluster: Option<String>,

    /// `new` to bootstrap a cluster, `existing` to join one.
    #[arg(
        long,
        env = "ETCD_INITIAL_CLUSTER_STATE",
        value_enum,
        default_value = "new"
    )]
    pub initial_cluster_state: ClusterState,

    /// Cluster token: keeps member and cluster IDs unique across clusters.
    #[arg(long, env = "ETCD_INITIAL_CLUSTER_TOKEN", default_value = defaults::CLUSTER_TOKEN)]
    pub initial_cluster_token: String,

    /// Reject membership changes that could cost the cluster its quorum (etcd's strict
    /// reconfiguration check).
    #[arg(long, env = "ETCD_STRICT_RECONFIG_CHECK", num_args = 0..=1, default_missing_value = "true",
          default_value = "true", value_parser = parse_bool)]
    pub strict_reconfig_check: bool,

    /// Entries the leader keeps behind a snapshot so that a slow follower catches up from the
    /// log instead of needing the snapshot.
    #[arg(
        long,
        env = "ETCD_EXPERIMENTAL_SNAPSHOT_CATCHUP_ENTRIES",
        default_value_t = 5000
    )]
    pub experimental_snapshot_catchup_entries: u64,

    /// Promote a learner to voter once it has caught up with the leader (MetaStore only).
    #[arg(long, env = "METASTORE_AUTO_PROMOTE_LEARNERS", num_args = 0..=1, default_missing_value = "true",
          default_value = "false", value_parser = parse_bool)]
    pub auto_promote_learners: bool,

    /// Serve linearizable reads from the leader's lease instead of a heartbeat round
    /// (MetaStore only). Safe only while clocks on all members run at the same rate: a leader
    /// trusts its lease for an election timeout after its last quorum contact.
    #[arg(long, env = "METASTORE_LEADER_LEASE_READS", num_args = 0..=1, default_missing_value = "true",
          default_value = "false", value_parser = parse_bool)]
    pub leader_lease_reads: bool,

    /// Applied entries between snapshots (after which the WAL before them is released).
    #[arg(long, env = "ETCD_SNAPSHOT_COUNT", default_value_t = defaults::SNAPSHOT_COUNT)]
    pub snapshot_count: u64,

    /// Raft heartbeat interval (one tick), ms.
    #[arg(long, env = "ETCD_HEARTBEAT_INTERVAL", default_value_t = defaults::HEARTBEAT_MS)]
    pub heartbeat_interval: u64,

    /// Raft election timeout, ms.
    #[arg(long, env = "ETCD_ELECTION_TIMEOUT", default_value_t = defaults::ELECTION_MS)]
    pub election_timeout: u64,

    /// Largest client request accepted, bytes.
    #[arg(long, env = "ETCD_MAX_REQUEST_BYTES", default_value_t = defaults::MAX_REQUEST_BYTES)]
    pub max_request_bytes: usize,

    /// Most compares, or ops per branch, in one txn.
    #[arg(long, env = "ETCD_MAX_TXN_OPS", default_value_t = defaults::MAX_TXN_OPS)]
    pub max_txn_ops: usize,

    /// Backend size above which writes fail with "database space exceeded", bytes (0 = 2 GiB).
    #[arg(long, env = "ETCD_QUOTA_BACKEND_BYTES", default_value_t = 0)]
    pub quota_backend_bytes: u64,

    /// Log level.
    #[arg(long, env = "ETCD_LOG_LEVEL", value_enum, default_value = "info")]
    pub log_level: LogLevel,

    /// Skip fsync of the WAL and snapshots: acknowledged writes may be lost on a crash.
    #[arg(long, env = "ETCD_UNSAFE_NO_FSYNC", num_args = 0..=1, default_missing_value = "true",
          default_value = "false", value_parser = parse_bool)]
    pub unsafe_no_fsync: bool,

    /// How often watchers created with `progress_notify` get a progress notification.
    #[arg(long, env = "ETCD_EXPERIMENTAL_WATCH_PROGRESS_NOTIFY_INTERVAL", default_value = "10m",
          value_parser = humantime::parse_duration)]
    pub experimental_watch_progress_notify_interval: std::time::Duration,

    /// How often the leader checkpoints leases' remaining TTLs through Raft (with
    /// `--experimental-enable-lease-checkpoint`), so that a restart or leader change does not
    /// extend them by more than this (Go duration).
    #[arg(long, env = "ETCD_EXPERIMENTAL_LEASE_CHECKPOINT_INTERVAL", default_value = "5m",
          value_parser = humantime::parse_duration)]
    pub experimental_lease_checkpoint_interval: std::time::Duration,

    /// Storage engine for the shards.
    #[arg(
        long,
        env = "METASTORE_STORAGE_ENGINE",
        value_enum,
        default_value = "memory"
    )]
    pub storage_engine: EngineKind,

    /// RocksDB block cache per shard, bytes.
    #[arg(long, env = "METASTORE_ROCKSDB_BLOCK_CACHE_BYTES", default_value_t = 64 << 20)]
    pub rocksdb_block_cache_bytes: usize,

    /// RocksDB write buffer (memtable) per shard, bytes.
    #[arg(long, env = "METASTORE_ROCKSDB_WRITE_BUFFER_BYTES", default_value_t = 64 << 20)]
    pub rocksdb_write_buffer_bytes: usize,

    /// RocksDB block compression: `lz4` or `none`.
    #[arg(
        long,
        env = "METASTORE_ROCKSDB_COMPRESSION",
        value_enum,
        default_value = "lz4"
    )]
    pub rocksdb_compression: Compression,

    /// RocksDB bloom filter bits per key (0 = no bloom filter).
    #[arg(
        long,
        env = "METASTORE_ROCKSDB_BLOOM_BITS_PER_KEY",
        default_value_t = 10.0
    )]
    pub rocksdb_bloom_bits_per_key: f64,

    /// Number of shards, each pinned to a core [default: one per online CPU].
    #[arg(long, env = "METASTORE_SHARDS")]
    pub shards: Option<usize>,

    // ---------------------------------------------------------------------------------------
    // etcd flags beyond the core set, for drop-in command lines (flags branch). The TLS
    // flags (`--cert-file`, `--peer-*`, ...) live in their own group; none is declared here.
    // Flags that are accepted without effect are listed, with the reason, in [`IGNORED`].
    // ---------------------------------------------------------------------------------------

    // -- Storage: WAL and snapshot files ---------------------------------------------------
    /// Dedicated WAL directory [default: `<data-dir>/member/wal`].
    #[arg(long, env = "ETCD_WAL_DIR")]
    pub wal_dir: Option<PathBuf>,

    /// Snapshot files kept on disk (0 = unlimited).
    #[arg(long, env = "ETCD_MAX_SNAPSHOTS", default_value_t = defaults::MAX_SNAPSHOTS)]
    pub max_snapshots: usize,

    /// WAL segment files kept on disk (0 = unlimited); a segment an older kept snapshot still
    /// needs is never removed.
    #[arg(long, env = "ETCD_MAX_WALS", default_value_t = defaults::MAX_WALS)]
    pub max_wals: usize,

    /// bbolt freelist type: `map` or `array`.
    #[arg(long, env = "ETCD_BACKEND_BBOLT_FREELIST_TYPE", default_value = "map")]
    pub backend_bbolt_freelist_type: String,

    /// bbolt freelist type (etcd 3.4 name): `map` or `array`.
    #[arg(
        long,
        env = "ETCD_EXPERIMENTAL_BACKEND_BBOLT_FREELIST_TYPE",
        default_value = "array"
    )]
    pub experimental_backend_bbolt_freelist_type: String,

    /// Longest time before the backend commits its batch (Go duration; empty or 0 = etcd's
    /// 100ms).
    #[arg(long, env = "ETCD_BACKEND_BATCH_INTERVAL", default_value = "",
          value_parser = parse_go_duration)]
    pub backend_batch_interval: std::time::Duration,

    /// Most operations before the backend commits its batch (0 = etcd's 10000).
    #[arg(long, env = "ETCD_BACKEND_BATCH_LIMIT", default_value_t = 0)]
    pub backend_batch_limit: u64,

    /// Keep the backend's pages locked in RAM (mlock).
    #[arg(long, env = "ETCD_EXPERIMENTAL_MEMORY_MLOCK", num_args = 0..=1, default_missing_value = "true",
          default_value = "false", value_parser = parse_bool)]
    pub experimental_memory_mlock: bool,

    /// Defragment at start-up if it frees at least this much, MB (0 = never).
    #[arg(
        long,
        env = "ETCD_EXPERIMENTAL_BOOTSTRAP_DEFRAG_THRESHOLD_MEGABYTES",
        default_value_t = 0
    )]
    pub experimental_bootstrap_defrag_threshold_megabytes: u64,

    /// Stop serving gRPC while a defragmentation runs.
    #[arg(long, env = "ETCD_EXPERIMENTAL_STOP_GRPC_SERVICE_ON_DEFRAG", num_args = 0..=1,
          default_missing_value = "true", default_value = "false", value_parser = parse_bool)]
    pub experimental_stop_grpc_service_on_defrag: bool,

    /// Let write txns share the read buffer in their read-only checks.
    #[arg(long, env = "ETCD_EXPERIMENTAL_TXN_MODE_WRITE_WITH_SHARED_BUFFER", num_args = 0..=1,
          default_missing_value = "true", default_value = "true", value_parser = parse_bool)]
    pub experimental_txn_mode_write_with_shared_buffer: bool,

    /// Most revisions deleted per compaction batch.
    #[arg(
        long,
        env = "ETCD_EXPERIMENTAL_COMPACTION_BATCH_LIMIT",
        default_value_t = 1000
    )]
    pub experimental_compaction_batch_limit: i64,

    /// Pause between compaction batches (Go duration).
    #[arg(long, env = "ETCD_EXPERIMENTAL_COMPACTION_SLEEP_INTERVAL", default_value = "10ms",
          value_parser = parse_go_duration)]
    pub experimental_compaction_sleep_interval: std::time::Duration,

    /// Auto compaction retention: a Go duration or a whole number of hours (`periodic`), or
    /// revisions (`revision`); 0 disables it. Run by the leader (`server::compactor`).
    #[arg(long, env = "ETCD_AUTO_COMPACTION_RETENTION", default_value = "0")]
    pub auto_compaction_retention: String,

    /// How `--auto-compaction-retention` is read: `periodic` or `revision`.
    #[arg(long, env = "ETCD_AUTO_COMPACTION_MODE", default_value = "periodic",
          value_parser = clap::builder::PossibleValuesParser::new(["periodic", "revision"]))]
    pub auto_compaction_mode: String,

    // -- gRPC server -----------------------------------------------------------------------
    /// Concurrent HTTP/2 streams (gRPC calls) each client connection may have open.
    #[arg(long, env = "ETCD_MAX_CONCURRENT_STREAMS", default_value_t = u32::MAX)]
    pub max_concurrent_streams: u32,

    /// Shortest interval at which a client may ping the server (Go duration).
    #[arg(long, env = "ETCD_GRPC_KEEPALIVE_MIN_TIME", default_value = "5s",
          value_parser = parse_go_duration)]
    pub grpc_keepalive_min_time: std::time::Duration,

    /// How often the server pings an idle client connection (Go duration; 0 disables).
    #[arg(long, env = "ETCD_GRPC_KEEPALIVE_INTERVAL", default_value = "2h",
          value_parser = parse_go_duration)]
    pub grpc_keepalive_interval: std::time::Duration,

    /// How long the server waits for a ping's answer before closing the connection (Go
    /// duration; 0 disables).
    #[arg(long, env = "ETCD_GRPC_KEEPALIVE_TIMEOUT", default_value = "20s",
          value_parser = parse_go_duration)]
    pub grpc_keepalive_timeout: std::time::Duration,

    /// Serve the HTTP/JSON gRPC gateway.
    #[arg(long, env = "ETCD_ENABLE_GRPC_GATEWAY", num_args = 0..=1, default_missing_value = "true",
          default_value = "true", value_parser = parse_bool)]
    pub enable_grpc_gateway: bool,

    /// Comma-separated URLs for HTTP-only client traffic (gateway, health).
    #[arg(long, env = "ETCD_LISTEN_CLIENT_HTTP_URLS", value_parser = parse_urls)]
    pub listen_client_http_urls: Option<UrlList>,

    /// Set SO_REUSEPORT on the listeners.
    #[arg(long, env = "ETCD_SOCKET_REUSE_PORT", num_args = 0..=1, default_missing_value = "true",
          default_value = "false", value_parser = parse_bool)]
    pub socket_reuse_port: bool,

    /// Set SO_REUSEADDR on the listeners.
    #[arg(long, env = "ETCD_SOCKET_REUSE_ADDRESS", num_args = 0..=1, default_missing_value = "true",
          default_value = "false", value_parser = parse_bool)]
    pub socket_reuse_address: bool,

    /// Read timeout of each rafthttp peer connection (Go duration).
    #[arg(long, env = "ETCD_RAFT_READ_TIMEOUT", default_value = "5s",
          value_parser = parse_go_duration)]
    pub raft_read_timeout: std::time::Duration,

    /// Write timeout of each rafthttp peer connection (Go duration).
    #[arg(long, env = "ETCD_RAFT_WRITE_TIMEOUT", default_value = "5s",
          value_parser = parse_go_duration)]
    pub raft_write_timeout: std::time::Duration,

    /// Comma-separated origins allowed by CORS (`*` = all).
    #[arg(long, env = "ETCD_CORS", default_value = "*")]
    pub cors: String,

    /// Comma-separated host names accepted from HTTP clients (`*` = all).
    #[arg(long, env = "ETCD_HOST_WHITELIST", default_value = "*")]
    pub host_whitelist: String,

    // -- Raft and clustering ---------------------------------------------------------------
    /// Run Raft's pre-vote phase before an election, so a partitioned member rejoining does
    /// not depose the leader.
    #[arg(long, env = "ETCD_PRE_VOTE", num_args = 0..=1, default_missing_value = "true",
          default_value = "true", value_parser = parse_bool)]
    pub pre_vote: bool,

    /// Fast-forward the election ticks at boot for a faster first election (etcd
    /// `--initial-election-tick-advance`, default true). As etcd 3.5's `adjustTicks`
    /// (`server/etcdserver/server.go`): a member of a multi-member cluster advances its
    /// election clock by `election ticks - 2` ticks (an election tick is one
    /// `--heartbeat-interval`) once it can reach more than one peer, checked every 50 ms for up
    /// to 5 s after start-up; with `false` it waits a whole randomized election timeout before
    /// its first campaign. A cluster of one member always starts its campaign at once, whatever
    /// this flag says (etcd advances `election ticks - 1` ticks there regardless of it).
    #[arg(long, env = "ETCD_INITIAL_ELECTION_TICK_ADVANCE", num_args = 0..=1,
          default_missing_value = "true", default_value = "true", value_parser = parse_bool)]
    pub initial_election_tick_advance: bool,

    /// Most learners the cluster may have at once.
    #[arg(long, env = "ETCD_EXPERIMENTAL_MAX_LEARNERS", default_value_t = defaults::MAX_LEARNERS)]
    pub experimental_max_learners: usize,

    /// Force a new one-member cluster from this member's data (etcd `--force-new-cluster`,
    /// unsafe; for disaster recovery after a quorum loss). On a data dir that already holds a
    /// log, start-up does what etcd 3.5's `restartAsStandaloneNode`
    /// (`server/etcdserver/raft.go`) does: log entries after the commit index are discarded;
    /// conf changes that add this member (if the log does not list it) and remove every other
    /// member (voters and learners) are appended at the commit index's term and committed
    /// locally; the member then starts as the only voter of its cluster, with the same cluster
    /// ID and all its keys, revisions and leases. The removed IDs can never rejoin; new members
    /// are added with `member add` and `--initial-cluster-state existing`. The change is in the
    /// log, so later restarts without the flag stay a one-member cluster. On an empty data dir
    /// the flag has no effect (a normal new cluster starts).
    ///
    /// Errors at start-up: this member's own ID was removed from the cluster (etcd would fail
    /// its own re-add with `membership: ID removed`); the WAL cannot be written.
    #[arg(long, env = "ETCD_FORCE_NEW_CLUSTER", num_args = 0..=1, default_missing_value = "true",
          default_value = "false", value_parser = parse_bool)]
    pub force_new_cluster: bool,

    /// How long to wait for the cluster to be ready before serving clients (Go duration).
    #[arg(long, env = "ETCD_EXPERIMENTAL_WAIT_CLUSTER_READY_TIMEOUT", default_value = "5s",
          value_parser = parse_go_duration)]
    pub experimental_wait_cluster_ready_timeout: std::time::Duration,

    /// Interval between two downgrade status checks (Go duration).
    #[arg(long, env = "ETCD_EXPERIMENTAL_DOWNGRADE_CHECK_TIME", default_value = "5s",
          value_parser = parse_go_duration)]
    pub experimental_downgrade_check_time: std::time::Duration,

    // -- Discovery -------------------------------------------------------------------------
    /// Discovery URL used to bootstrap the cluster.
    #[arg(long, env = "ETCD_DISCOVERY", default_value = "")]
    pub discovery: String,

    /// What to do when discovery fails: `exit` or `proxy`.
    #[arg(long, env = "ETCD_DISCOVERY_FALLBACK", default_value = "proxy",
          value_parser = clap::builder::PossibleValuesParser::new(["exit", "proxy"]))]
    pub discovery_fallback: String,

    /// HTTP proxy for traffic to the discovery service.
    #[arg(long, env = "ETCD_DISCOVERY_PROXY", default_value = "")]
    pub discovery_proxy: String,

    /// DNS SRV domain used to bootstrap the cluster.
    #[arg(long, env = "ETCD_DISCOVERY_SRV", default_value = "")]
    pub discovery_srv: String,

    /// Suffix of the DNS SRV name queried when bootstrapping.
    #[arg(long, env = "ETCD_DISCOVERY_SRV_NAME", default_value = "")]
    pub discovery_srv_name: String,

    // -- v2 API and v2 proxy ---------------------------------------------------------------
    /// Serve etcd v2 client requests.
    #[arg(long, env = "ETCD_ENABLE_V2", num_args = 0..=1, default_missing_value = "true",
          default_value = "false", value_parser = parse_bool)]
    pub enable_v2: bool,

    /// Serve v2 requests through the v3 backend under this prefix.
    #[arg(long, env = "ETCD_EXPERIMENTAL_ENABLE_V2V3", default_value = "")]
    pub experimental_enable_v2v3: String,

    /// Phase of the v2store deprecation.
    #[arg(long, env = "ETCD_V2_DEPRECATION", default_value = "not-yet",
          value_parser = clap::builder::PossibleValuesParser::new(["not-yet", "write-only", "write-only-drop-data", "gone"]))]
    pub v2_deprecation: String,

    /// v2 proxy mode: `off`, `readonly` or `on`.
    #[arg(long, env = "ETCD_PROXY", default_value = "off",
          value_parser = clap::builder::PossibleValuesParser::new(["off", "readonly", "on"]))]
    pub proxy: String,

    /// v2 proxy: time an endpoint stays failed, ms.
    #[arg(long, env = "ETCD_PROXY_FAILURE_WAIT", default_value_t = 5000)]
    pub proxy_failure_wait: u64,

    /// v2 proxy: endpoints refresh interval, ms.
    #[arg(long, env = "ETCD_PROXY_REFRESH_INTERVAL", default_value_t = 30000)]
    pub proxy_refresh_interval: u64,

    /// v2 proxy: dial timeout, ms (0 = none).
    #[arg(long, env = "ETCD_PROXY_DIAL_TIMEOUT", default_value_t = 1000)]
    pub proxy_dial_timeout: u64,

    /// v2 proxy: write timeout, ms (0 = none).
    #[arg(long, env = "ETCD_PROXY_WRITE_TIMEOUT", default_value_t = 5000)]
    pub proxy_write_timeout: u64,

    /// v2 proxy: read timeout, ms (0 = none).
    #[arg(long, env = "ETCD_PROXY_READ_TIMEOUT", default_value_t = 0)]
    pub proxy_read_timeout: u64,

    // -- Auth ------------------------------------------------------------------------------
    /// Auth token type and options: `simple` or `jwt,...`.
    #[arg(long, env = "ETCD_AUTH_TOKEN", default_value = "simple")]
    pub auth_token: String,

    /// bcrypt cost for hashing auth passwords (4 to 31).
    #[arg(long, env = "ETCD_BCRYPT_COST", default_value_t = 10)]
    pub bcrypt_cost: u32,

    /// Lifetime of a simple auth token, seconds.
    #[arg(long, env = "ETCD_AUTH_TOKEN_TTL", default_value_t = 300)]
    pub auth_token_ttl: u64,

    // -- Profiling, monitoring and tracing -------------------------------------------------
    /// Serve Go's pprof runtime profiles at `/debug/pprof/`.
    #[arg(long, env = "ETCD_ENABLE_PPROF", num_args = 0..=1, default_missing_value = "true",
          default_value = "false", value_parser = parse_bool)]
    pub enable_pprof: bool,

    /// Detail of exported metrics: `basic`, or `extensive` (adds the
    /// `grpc_server_handling_seconds` histograms).
    #[arg(long, env = "ETCD_METRICS", default_value = "basic",
          value_parser = clap::builder::PossibleValuesParser::new(["basic", "extensive"]))]
    pub metrics: String,

    /// Comma-separated URLs serving `/metrics`, `/health`, `/livez` and `/readyz` (see
    /// `server::http`).
    #[arg(long, env = "ETCD_LISTEN_METRICS_URLS", value_parser = parse_urls)]
    pub listen_metrics_urls: Option<UrlList>,

    /// Enable OpenTelemetry distributed tracing.
    #[arg(long, env = "ETCD_EXPERIMENTAL_ENABLE_DISTRIBUTED_TRACING", num_args = 0..=1,
          default_missing_value = "true", default_value = "false", value_parser = parse_bool)]
    pub experimental_enable_distributed_tracing: bool,

    /// Distributed tracing collector address (`host:port`).
    #[arg(
        long,
        env = "ETCD_EXPERIMENTAL_DISTRIBUTED_TRACING_ADDRESS",
        default_value = "localhost:4317"
    )]
    pub experimental_distributed_tracing_address: String,

    /// Distributed tracing service name.
    #[arg(
        long,
        env = "ETCD_EXPERIMENTAL_DISTRIBUTED_TRACING_SERVICE_NAME",
        default_value = "etcd"
    )]
    pub experimental_distributed_tracing_service_name: String,

    /// Distributed tracing instance ID (unique per member).
    #[arg(
        long,
        env = "ETCD_EXPERIMENTAL_DISTRIBUTED_TRACING_INSTANCE_ID",
        default_value = ""
    )]
    pub experimental_distributed_tracing_instance_id: String,

    /// Spans sampled per million.
    #[arg(
        long,
        env = "ETCD_EXPERIMENTAL_DISTRIBUTED_TRACING_SAMPLING_RATE",
        default_value_t = 0
    )]
    pub experimental_distributed_tracing_sampling_rate: u32,

    /// Warn when applying an entry takes longer than this (Go duration).
    #[arg(long, env = "ETCD_EXPERIMENTAL_WARNING_APPLY_DURATION", default_value = "100ms",
          value_parser = parse_go_duration)]
    pub experimental_warning_apply_duration: std::time::Duration,

    /// Warn when a unary request takes longer than this (Go duration).
    #[arg(long, env = "ETCD_EXPERIMENTAL_WARNING_UNARY_REQUEST_DURATION", default_value = "300ms",
          value_parser = parse_go_duration)]
    pub experimental_warning_unary_request_duration: std::time::Duration,

    // -- Corruption checks -----------------------------------------------------------------
    /// Compare this member's HashKV with every peer's before serving clients, and refuse to
    /// start on a mismatch (`server::corrupt`).
    #[arg(long, env = "ETCD_EXPERIMENTAL_INITIAL_CORRUPT_CHECK", num_args = 0..=1,
          default_missing_value = "true", default_value = "false", value_parser = parse_bool)]
    pub experimental_initial_corrupt_check: bool,

    /// Interval between the leader's periodic corruption checks (Go duration; 0 = never, the
    /// default). Every interval the leader compares its HashKV with every peer's at its
    /// revision (etcd 3.5 `corruptionMonitor.periodicCheck`) and raises a CORRUPT alarm through
    /// Raft for a member whose data differs; while it is active, writes fail with
    /// "etcdserver: corrupt cluster" (`server::corrupt`, `apply::alarms`).
    #[arg(long, env = "ETCD_EXPERIMENTAL_CORRUPT_CHECK_TIME", default_value = "0s",
          value_parser = parse_go_duration)]
    pub experimental_corrupt_check_time: std::time::Duration,

    /// Have the leader check followers' compaction hashes periodically.
    #[arg(long, env = "ETCD_EXPERIMENTAL_COMPACT_HASH_CHECK_ENABLED", num_args = 0..=1,
          default_missing_value = "true", default_value = "false", value_parser = parse_bool)]
    pub experimental_compact_hash_check_enabled: bool,

    /// Interval between compaction hash checks (Go duration).
    #[arg(long, env = "ETCD_EXPERIMENTAL_COMPACT_HASH_CHECK_TIME", default_value = "1m",
          value_parser = parse_go_duration)]
    pub experimental_compact_hash_check_time: std::time::Duration,

    // -- Leases ----------------------------------------------------------------------------
    /// Have the leader checkpoint leases' remaining TTLs through Raft (every
    /// `--experimental-lease-checkpoint-interval`), so a leader change or restart does not
    /// renew long-lived leases to their full TTL.
    #[arg(long, env = "ETCD_EXPERIMENTAL_ENABLE_LEASE_CHECKPOINT", num_args = 0..=1,
          default_missing_value = "true", default_value = "false", value_parser = parse_bool)]
    pub experimental_enable_lease_checkpoint: bool,

    /// Persist checkpointed remaining TTLs.
    #[arg(long, env = "ETCD_EXPERIMENTAL_ENABLE_LEASE_CHECKPOINT_PERSIST", num_args = 0..=1,
          default_missing_value = "true", default_value = "false", value_parser = parse_bool)]
    pub experimental_enable_lease_checkpoint_persist: bool,

    // -- Peer TLS verification -------------------------------------------------------------
    /// Skip verifying the SAN of client certificates on peer connections.
    #[arg(long, env = "ETCD_EXPERIMENTAL_PEER_SKIP_CLIENT_SAN_VERIFICATION", num_args = 0..=1,
          default_missing_value = "true", default_value = "false", value_parser = parse_bool)]
    pub experimental_peer_skip_client_san_verification: bool,

    // -- Logging ---------------------------------------------------------------------------
    /// Logger: `zap` (etcd 3.5's: JSON lines unless `--log-format console`) or `capnslog`
    /// (3.4's: text lines, in tracing's layout rather than capnslog's).
    #[arg(long, env = "ETCD_LOGGER", default_value = "zap",
          value_parser = clap::builder::PossibleValuesParser::new(["zap", "capnslog"]))]
    pub logger: String,

    /// Comma-separated log targets: `default` or `stderr` (standard error), `stdout`, or file
    /// paths (appended to).
    #[arg(
        long,
        env = "ETCD_LOG_OUTPUTS",
        default_value = "default",
        value_delimiter = ','
    )]
    pub log_outputs: Vec<String>,

    /// Log format of the `zap` logger: `json` (etcd's zap encoding) or `console` (text).
    #[arg(long, env = "ETCD_LOG_FORMAT", default_value = "json",
          value_parser = clap::builder::PossibleValuesParser::new(["json", "console"]))]
    pub log_format: String,

    /// Rotate a single file target of `--log-outputs`.
    #[arg(long, env = "ETCD_ENABLE_LOG_ROTATION", num_args = 0..=1, default_missing_value = "true",
          default_value = "false", value_parser = parse_bool)]
    pub enable_log_rotation: bool,

    /// Log rotation settings (JSON: maxsize MB, maxage days, maxbackups, localtime, compress).
    #[arg(
        long,
        env = "ETCD_LOG_ROTATION_CONFIG_JSON",
        default_value = r#"{"maxsize": 100, "maxage": 0, "maxbackups": 0, "localtime": false, "compress": false}"#
    )]
    pub log_rotation_config_json: String,

    /// Log at debug level (etcd 3.4; same as `--log-level debug`).
    #[arg(long, env = "ETCD_DEBUG", num_args = 0..=1, default_missing_value = "true",
          default_value = "false", value_parser = parse_bool)]
    pub debug: bool,

    /// capnslog per-package log levels (`etcdserver=WARNING,...`; etcd 3.4).
    #[arg(long, env = "ETCD_LOG_PACKAGE_LEVELS", default_value = "")]
    pub log_package_levels: String,

    // ---- TLS (etcd's security flags; see src/tls.rs and README "TLS") ----
    /// Client server TLS certificate file (PEM).
    #[arg(long, env = "ETCD_CERT_FILE")]
    pub cert_file: Option<PathBuf>,

    /// Client server TLS key file (PEM).
    #[arg(long, env = "ETCD_KEY_FILE")]
    pub key_file: Option<PathBuf>,

    /// Client server TLS trusted CA certificate file, for client certificate authentication.
    #[arg(long, env = "ETCD_TRUSTED_CA_FILE")]
    pub trusted_ca_file: Option<PathBuf>,

    /// Enable client certificate authentication (mutual TLS) on `https://` client URLs.
    #[arg(long, env = "ETCD_CLIENT_CERT_AUTH", num_args = 0..=1, default_missing_value = "true",
          default_value = "false", value_parser = parse_bool)]
    pub client_cert_auth: bool,

    /// Path to the client certificate revocation list file (PEM or DER).
    #[arg(long, env = "ETCD_CLIENT_CRL_FILE")]
    pub client_crl_file: Option<PathBuf>,

    /// Allowed TLS hostname (SAN) for client certificate authentication.
    #[arg(long, env = "ETCD_CLIENT_CERT_ALLOWED_HOSTNAME")]
    pub client_cert_allowed_hostname: Option<String>,

    /// Client TLS using a generated self-signed certificate (under `<data-dir>/fixtures/client`).
    #[arg(long, env = "ETCD_AUTO_TLS", num_args = 0..=1, default_missing_value = "true",
          default_value = "false", value_parser = parse_bool)]
    pub auto_tls: bool,

    /// Validity of the auto-TLS self-signed certificates, years.
    #[arg(long, env = "ETCD_SELF_SIGNED_CERT_VALIDITY", default_value_t = 1)]
    pub self_signed_cert_validity: u32,

    /// Comma-separated TLS 1.2 cipher suites for both ports (Go/IANA names; empty = rustls's
    /// defaults).
    #[arg(long, env = "ETCD_CIPHER_SUITES", default_value = "")]
    pub cipher_suites: String,

    /// Minimum TLS version on both ports: TLS1.2 or TLS1.3 (TLS1.0/1.1 are refused).
    #[arg(long, env = "ETCD_TLS_MIN_VERSION", default_value = "TLS1.2")]
    pub tls_min_version: String,

    /// Maximum TLS version on both ports: TLS1.2 or TLS1.3 (empty = the highest, TLS1.3).
    #[arg(long, env = "ETCD_TLS_MAX_VERSION", default_value = "")]
    pub tls_max_version: String,

    /// Peer server TLS certificate file (PEM); also this member's client certificate when it
    /// dials peers.
    #[arg(long, env = "ETCD_PEER_CERT_FILE")]
    pub peer_cert_file: Option<PathBuf>,

    /// Peer server TLS key file (PEM).
    #[arg(long, env = "ETCD_PEER_KEY_FILE")]
    pub peer_key_file: Option<PathBuf>,

    /// Peer server TLS trusted CA file: peers' certificates must chain to it.
    #[arg(long, env = "ETCD_PEER_TRUSTED_CA_FILE")]
    pub peer_trusted_ca_file: Option<PathBuf>,

    /// Enable peer client certificate authentication.
    #[arg(long, env = "ETCD_PEER_CLIENT_CERT_AUTH", num_args = 0..=1, default_missing_value = "true",
          default_value = "false", value_parser = parse_bool)]
    pub peer_client_cert_auth: bool,

    /// Path to the peer certificate revocation list file (PEM or DER).
    #[arg(long, env = "ETCD_PEER_CRL_FILE")]
    pub peer_crl_file: Option<PathBuf>,

    /// Allowed CommonName for peer client certificates.
    #[arg(long, env = "ETCD_PEER_CERT_ALLOWED_CN")]
    pub peer_cert_allowed_cn: Option<String>,

    /// Allowed TLS hostname (SAN) for peer client certificates.
    #[arg(long, env = "ETCD_PEER_CERT_ALLOWED_HOSTNAME")]
    pub peer_cert_allowed_hostname: Option<String>,

    /// Peer TLS using generated self-signed certificates (under `<data-dir>/fixtures/peer`);
    /// peers then accept each other's certificates without CA verification, as etcd does.
    #[arg(long, env = "ETCD_PEER_AUTO_TLS", num_args = 0..=1, default_missing_value = "true",
          default_value = "false", value_parser = parse_bool)]
    pub peer_auto_tls: bool,

    /// Client certificate (PEM) for when this member dials its own client port, with
    /// `--client-key-file` (etcd 3.5: the gateway and proxies). Accepted; see [`IGNORED`].
    #[arg(long, env = "ETCD_CLIENT_CERT_FILE")]
    pub client_cert_file: Option<PathBuf>,

    /// Key (PEM) of `--client-cert-file`. Accepted; see [`IGNORED`].
    #[arg(long, env = "ETCD_CLIENT_KEY_FILE")]
    pub client_key_file: Option<PathBuf>,

    /// Client certificate (PEM) this member presents when it dials peers, instead of
    /// `--peer-cert-file` (etcd 3.5). Needs `--peer-client-key-file`.
    #[arg(long, env = "ETCD_PEER_CLIENT_CERT_FILE")]
    pub peer_client_cert_file: Option<PathBuf>,

    /// Key (PEM) of `--peer-client-cert-file`.
    #[arg(long, env = "ETCD_PEER_CLIENT_KEY_FILE")]
    pub peer_client_key_file: Option<PathBuf>,
}

/// A flag MetaStore accepts, for etcd command lines, without acting on it.
#[derive(Debug, Clone, Copy)]
pub struct IgnoredFlag {
    /// The flag's name without the dashes (`enable-v2`).
    pub flag: &'static str,
    /// Why it has no effect, as logged: `ignored: <why>`.
    pub reason: &'static str,
    /// Whether the value given needs the warning (most flags: always; `--logger` only when it
    /// asks for the logger MetaStore does not have).
    pub applies: fn(&Config) -> bool,
}

const fn always(_: &Config) -> bool {
    true
}

const fn ignored(flag: &'static str, reason: &'static str) -> IgnoredFlag {
    IgnoredFlag {
        flag,
        reason,
        applies: always,
    }
}

const NO_V2: &str = "the v2 API is not served";
const NO_V2_PROXY: &str = "the v2 proxy is not provided (deprecated in etcd 3.5)";
const NO_DISCOVERY: &str = "discovery bootstrapping is not supported; use --initial-cluster";
const NO_BBOLT: &str = "no bbolt backend (the shards are in memory or in RocksDB)";
const NO_TRACING: &str = "no OpenTelemetry distributed tracing";
const NO_HTTP: &str =
    "the JSON gateway and the HTTP endpoints are always served on the client URLs";
const NO_CORRUPT_CHECK: &str = "no compaction hash check yet";

/// Every accepted flag that has no effect, with its reason. A flag the user sets (on the
/// command line, through its `ETCD_*` variable or in `--config-file`) is logged once at
/// start-up by [`startup_warnings`].
pub const IGNORED: &[IgnoredFlag] = &[
    ignored(
        "client-cert-file",
        "nothing dials the client port from inside the member (no gateway or proxy)",
    ),
    ignored(
        "client-key-file",
        "nothing dials the client port from inside the member (no gateway or proxy)",
    ),
    ignored("enable-v2", NO_V2),
    ignored("experimental-enable-v2v3", NO_V2),
    ignored("v2-deprecation", NO_V2),
    ignored("proxy", NO_V2_PROXY),
    ignored("proxy-failure-wait", NO_V2_PROXY),
    ignored("proxy-refresh-interval", NO_V2_PROXY),
    ignored("proxy-dial-timeout", NO_V2_PROXY),
    ignored("proxy-write-timeout", NO_V2_PROXY),
    ignored("proxy-read-timeout", NO_V2_PROXY),
    ignored("discovery", NO_DISCOVERY),
    ignored("discovery-fallback", NO_DISCOVERY),
    ignored("discovery-proxy", NO_DISCOVERY),
    ignored("discovery-srv", NO_DISCOVERY),
    ignored("discovery-srv-name", NO_DISCOVERY),
    ignored("backend-bbolt-freelist-type", NO_BBOLT),
    ignored("experimental-backend-bbolt-freelist-type", NO_BBOLT),
    ignored("backend-batch-interval", NO_BBOLT),
    ignored("backend-batch-limit", NO_BBOLT),
    ignored("experimental-memory-mlock", NO_BBOLT),
    ignored(
        "experimental-bootstrap-defrag-threshold-megabytes",
        NO_BBOLT,
    ),
    ignored("experimental-txn-mode-write-with-shared-buffer", NO_BBOLT),
    ignored(
        "experimental-stop-grpc-service-on-defrag",
        "defragmentation does not pause serving here (no bbolt backend)",
    ),
    ignored(
        "experimental-compaction-batch-limit",
        "compaction runs per shard, not in bbolt batches",
    ),
    ignored(
        "experimental-compaction-sleep-interval",
        "compaction runs per shard, not in bbolt batches",
    ),
    ignored("enable-pprof", "no pprof: it profiles the Go runtime"),
    ignored("enable-grpc-gateway", NO_HTTP),
    ignored("listen-client-http-urls", NO_HTTP),
    ignored("experimental-enable-distributed-tracing", NO_TRACING),
    ignored("experimental-distributed-tracing-address", NO_TRACING),
    ignored("experimental-distributed-tracing-service-name", NO_TRACING),
    ignored("experimental-distributed-tracing-instance-id", NO_TRACING),
    ignored("experimental-distributed-tracing-sampling-rate", NO_TRACING),
    ignored("experimental-compact-hash-check-enabled", NO_CORRUPT_CHECK),
    ignored("experimental-compact-hash-check-time", NO_CORRUPT_CHECK),
    ignored(
        "experimental-warning-apply-duration",
        "no slow-apply warnings yet",
    ),
    ignored(
        "experimental-warning-unary-request-duration",
        "no slow-request warnings yet",
    ),
    ignored(
        "experimental-downgrade-check-time",
        "members never run a downgrade's target version, so no check ends it; it lasts until \
         Downgrade CANCEL",
    ),
    ignored(
        "experimental-wait-cluster-ready-timeout",
        "a member waits for a leader without a timeout before it is ready",
    ),
    ignored(
        "experimental-peer-skip-client-san-verification",
        "peer TLS is configured by the TLS flags",
    ),
    ignored(
        "raft-read-timeout",
        "peer traffic is gRPC, not rafthttp; its deadlines are fixed",
    ),
    ignored(
        "raft-write-timeout",
        "peer traffic is gRPC, not rafthttp; its deadlines are fixed",
    ),
    ignored("socket-reuse-port", "listeners do not set SO_REUSEPORT"),
    ignored(
        "socket-reuse-address",
        "listeners always set SO_REUSEADDR (tokio's default on Unix)",
    ),
    ignored(
        "experimental-enable-lease-checkpoint-persist",
        "checkpointed remaining TTLs are always persisted with the leases (as in etcd 3.6)",
    ),
    IgnoredFlag {
        flag: "logger",
        reason: "capnslog's layout is not reproduced: lines are written as --log-format console",
        applies: |c| c.logger == "capnslog",
    },
    ignored(
        "enable-log-rotation",
        "no log rotation: rotate with logrotate's copytruncate",
    ),
    ignored(
        "log-rotation-config-json",
        "no log rotation: rotate with logrotate's copytruncate",
    ),
    ignored(
        "log-package-levels",
        "capnslog's package levels: use --log-level",
    ),
];

/// Whether the user set `long` (command line, `ETCD_*` variable or `--config-file`) rather
/// than leaving etcd's default.
fn user_set(matches: &clap::ArgMatches, long: &str) -> bool {
    use clap::parser::ValueSource;
    matches!(
        matches.value_source(&long.replace('-', "_")),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

/// The `ignored:` warnings for the flags of [`IGNORED`] the user set, one per flag, in table
/// order.
pub fn ignored_flag_warnings(matches: &clap::ArgMatches, cfg: &Config) -> Vec<String> {
    IGNORED
        .iter()
        .filter(|i| user_set(matches, i.flag) && (i.applies)(cfg))
        .map(|i| format!("--{} ignored: {}", i.flag, i.reason))
        .collect()
}

/// etcd's warnings for `ETCD_*` variables no flag reads (etcd 3.5 `pkg/flags`:
/// "unrecognized environment variable"). `ETCD_VERSION` gets etcd's special warning.
pub fn unrecognized_env_warnings(vars: impl IntoIterator<Item = (String, String)>) -> Vec<String> {
    use clap::CommandFactory;
    let cmd = Config::command();
    let known: Vec<String> = cmd
        .get_arguments()
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
        .collect();
    let mut out: Vec<String> = vars
        .into_iter()
        .filter(|(k, _)| k.starts_with("ETCD_") && !known.iter().any(|n| n == k))
        .map(|(k, v)| {
            if k == "ETCD_VERSION" {
                format!("cannot set special environment variable {k}={v}")
            } else {
                format!("unrecognized environment variable {k}={v}")
            }
        })
        .collect();
    out.sort();
    out
}

/// Parses the command line (after [`args_with_config_file`]) into a `Config`, with the
/// warnings to log once logging is up: unrecognized `ETCD_*` variables and ignored flags.
///
/// Errors: clap's, for an unknown flag or a bad value (print with `Error::exit`).
pub fn parse_with_warnings(
    args: Vec<std::ffi::OsString>,
) -> Result<(Config, Vec<String>), clap::Error> {
    use clap::{CommandFactory, FromArgMatches};
    let matches = Config::command().try_get_matches_from(args)?;
    let cfg = Config::from_arg_matches(&matches)?;
    let mut warnings = unrecognized_env_warnings(std::env::vars());
    warnings.extend(ignored_flag_warnings(&matches, &cfg));
    Ok((cfg, warnings))
}

/// Expands `--config-file` (or `ETCD_CONFIG_FILE`): the file's settings become flags placed
/// before the command line's, so that the command line wins. Keys are flag names without the
/// dashes (`data-dir: /var/lib/metastore`), as in etcd's YAML config files; lists are joined
/// with commas. Keys this binary does not know are reported and skipped.
///
/// Errors: the file cannot be read, is not YAML, or is not a mapping.
pub fn args_with_config_file(
    args: Vec<std::ffi::OsString>,
) -> Result<Vec<std::ffi::OsString>, String> {
    use clap::CommandFactory;
    use yaml_rust2::{Yaml, YamlLoader};

    let strings: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let from_flag = strings.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix("--config-file=")
            .map(str::to_string)
            .or_else(|| {
                (a == "--config-file")
                    .then(|| strings.get(i + 1).cloned())
                    .flatten()
            })
    });
    let Some(path) = from_flag.or_else(|| std::env::var("ETCD_CONFIG_FILE").ok()) else {
        return Ok(args);
    };
    let text = std::fs::read_to_string(&path).map_err(|e| format!("--config-file {path}: {e}"))?;
    let docs =
        YamlLoader::load_from_str(&text).map_err(|e| format!("--config-file {path}: {e}"))?;
    let Some(Yaml::Hash(map)) = docs.into_iter().next() else {
        return Err(format!(
            "--config-file {path}: expected a mapping of flag names to values"
        ));
    };
    let known: Vec<String> = Config::command()
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_string))
        .collect();
    let scalar = |v: &Yaml| -> Option<String> {
        match v {
            Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
            Yaml::Integer(i) => Some(i.to_string()),
            Yaml::Boolean(b) => Some(b.to_string()),
            _ => None,
        }
    };
    let mut out = vec![args[0].clone()];
    for (k, v) in map {
        let Some(key) = k.as_str() else { continue };
        if !known.iter().any(|n| n == key) || key == "config-file" {
            eprintln!("metastore: --config-file {path}: ignoring unknown setting {key:?}");
            continue;
        }
        let value = match &v {
            Yaml::Array(items) => Some(
                items
                    .iter()
                    .filter_map(scalar)
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            Yaml::Null => None,
            other => scalar(other),
        };
        if let Some(value) = value {
            out.push(format!("--{key}={value}").into());
        }
    }
    out.extend(args.into_iter().skip(1));
    Ok(out)
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The election timeout must be at least 5 heartbeats (etcd's rule).
    #[error("--election-timeout[{election}ms] should be at least as 5 times as --heartbeat-interval[{heartbeat}ms]")]
    ElectionTooShort {
        /// Election timeout, ms.
        election: u64,
        /// Heartbeat, ms.
        heartbeat: u64,
    },
    /// A zero heartbeat.
    #[error("--heartbeat-interval must be greater than 0")]
    ZeroHeartbeat,
    /// Shard count out of range.
    #[error("--shards must be between 1 and 1024, got {0}")]
    Shards(usize),
    /// `--initial-cluster` does not name this member, or is malformed.
    #[error("--initial-cluster: {0}")]
    InitialCluster(String),
    /// A feature another issue brings.
    #[error("{0} is not supported yet")]
    Unsupported(&'static str),
    /// A TLS flag that cannot work (versions, cipher suites, allowed CN and hostname).
    #[error("{0}")]
    Tls(String),
    /// `--max-txn-ops` or `--max-request-bytes` of zero.
    #[error("{0} must be greater than 0")]
    Zero(&'static str),
}

impl Config {
    /// The data directory: `--data-dir`, or `<name>.etcd` like etcd.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("{}.etcd", self.name)))
    }

    /// The WAL directory: `--wal-dir`, or `<data-dir>/member/wal` like etcd.
    pub fn wal_dir(&self) -> PathBuf {
        self.wal_dir
            .clone()
            .unwrap_or_else(|| self.data_dir().join("member").join("wal"))
    }

    /// The shard count: `--shards`, or one per online CPU.
    pub fn shard_count(&self) -> usize {
        self.shards
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// The watch progress-notify interval (never zero).
    pub fn watch_progress_notify_interval(&self) -> std::time::Duration {
        self.experimental_watch_progress_notify_interval
            .max(std::time::Duration::from_millis(1))
    }

    /// RocksDB tuning from the `--rocksdb-*` flags.
    pub fn rocks_options(&self) -> RocksOptions {
        RocksOptions {
            block_cache_bytes: self.rocksdb_block_cache_bytes,
            write_buffer_bytes: self.rocksdb_write_buffer_bytes,
            compression: self.rocksdb_compression == Compression::Lz4,
            bloom_bits_per_key: self.rocksdb_bloom_bits_per_key,
        }
    }

    /// The backend quota in bytes, with 0 meaning etcd's default.
    pub fn quota_bytes(&self) -> u64 {
        if self.quota_backend_bytes == 0 {
            defaults::QUOTA_BACKEND_BYTES
        } else {
            self.quota_backend_bytes
        }
    }

    /// `--initial-cluster` as (name, peer URLs), defaulting to this member alone.
    pub fn initial_members(&self) -> Result<Vec<(String, Vec<Url>)>, ConfigError> {
        let Some(spec) = &self.initial_cluster else {
            return Ok(vec![(
                self.name.clone(),
                self.initial_advertise_peer_urls.to_vec(),
            )]);
        };
        let mut members: Vec<(String, Vec<Url>)> = Vec::new();
        for part in spec.split(',').filter(|p| !p.is_empty()) {
            let (name, url) = part
                .split_once('=')
                .ok_or_else(|| ConfigError::InitialCluster(format!("{part:?} is not name=url")))?;
            let url = Url::parse(url)
                .map_err(|e| ConfigError::InitialCluster(format!("{url:?}: {e}")))?;
            match members.iter_mut().find(|(n, _)| n == name) {
                Some((_, urls)) => urls.push(url),
                None => members.push((name.to_string(), vec![url])),
            }
        }
        if !members.iter().any(|(n, _)| *n == self.name) {
            return Err(ConfigError::InitialCluster(format!(
                "couldn't find local name {:?} in the initial cluster configuration",
                self.name
            )));
        }
        Ok(members)
    }

    /// Checks the combination of settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.heartbeat_interval == 0 {
            return Err(ConfigError::ZeroHeartbeat);
        }
        if self.election_timeout < 5 * self.heartbeat_interval {
            return Err(ConfigError::ElectionTooShort {
                election: self.election_timeout,
                heartbeat: self.heartbeat_interval,
            });
        }
        let shards = self.shard_count();
        if !(1..=1024).contains(&shards) {
            return Err(ConfigError::Shards(shards));
        }
        if self.max_txn_ops == 0 {
            return Err(ConfigError::Zero("--max-txn-ops"));
        }
        if self.max_request_bytes == 0 {
            return Err(ConfigError::Zero("--max-request-bytes"));
        }
        let members = self.initial_members()?;
        if self.initial_cluster.is_some() {
            let (_, urls) = members
                .iter()
                .find(|(n, _)| *n == self.name)
                .expect("initial_members checks the local name");
            let mut listed: Vec<&str> = urls.iter().map(Url::as_str).collect();
            let mut advertised: Vec<&str> = self
                .initial_advertise_peer_urls
                .iter()
                .map(Url::as_str)
                .collect();
            listed.sort_unstable();
            advertised.sort_unstable();
            if listed != advertised {
                return Err(ConfigError::InitialCluster(format!(
                    "{:?} has {} but --initial-advertise-peer-urls is {}",
                    self.name,
                    listed.join(","),
                    advertised.join(",")
                )));
            }
        }
        Ok(())
    }
}

/// Which storage engine shards use (`--storage-engine`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    /// Everything in memory; rebuilt from snapshot plus WAL on restart.
    Memory,
    /// RocksDB on disk, one database per shard; restarts resume from the applied index.
    Rocksdb,
}

/// RocksDB tuning, per shard (`--rocksdb-*` flags).
#[derive(Clone, Debug)]
pub struct RocksOptions {
    /// Block cache size, bytes.
    pub block_cache_bytes: usize,
    /// Memtable (write buffer) size, bytes.
    pub write_buffer_bytes: usize,
    /// Compress SST blocks with LZ4.
    pub compression: bool,
    /// Bloom filter bits per key (0 = no filter).
    pub bloom_bits_per_key: f64,
}

impl Default for RocksOptions {
    fn default() -> Self {
        RocksOptions {
            block_cache_bytes: 64 << 20,
            write_buffer_bytes: 64 << 20,
            compression: true,
            bloom_bits_per_key: 10.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("metastore").chain(args.iter().copied()))
    }

    #[test]
    fn etcd_defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.data_dir(), PathBuf::from("default.etcd"));
        assert_eq!(c.listen_client_urls[0].as_str(), "http://localhost:2379/");
        assert_eq!((c.max_txn_ops, c.max_request_bytes), (128, 1_572_864));
        assert_eq!(c.quota_bytes(), 2 * 1024 * 1024 * 1024);
        assert!(!c.unsafe_no_fsync);
        c.validate().unwrap();
    }

    #[test]
    fn bad_values_are_errors() {
        assert!(parse(&["--snapshot-count", "x"]).is_err());
        assert!(parse(&["--no-such-flag"]).is_err());
        assert!(parse(&["--listen-client-urls", "localhost:2379"]).is_err());
        let c = parse(&["--election-timeout", "100"]).unwrap();
        assert!(matches!(
            c.validate(),
            Err(ConfigError::ElectionTooShort { .. })
        ));
        let c = parse(&[
            "--name",
            "a",
            "--initial-cluster",
            "b=http://127.0.0.1:2380",
        ])
        .unwrap();
        assert!(matches!(c.validate(), Err(ConfigError::InitialCluster(_))));
    }

    #[test]
    fn config_file_settings_yield_to_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metastore.yml");
        std::fs::write(
            &path,
            "name: from-file\nsnapshot-count: 42\nunsafe-no-fsync: true\nrocksdb-block-cache-bytes: 1048576\n\
             listen-client-urls: [\"http://127.0.0.1:1\", \"http://127.0.0.1:2\"]\nenable-v2: true\n",
        )
        .unwrap();
        let args = [
            "metastore",
            "--config-file",
            path.to_str().unwrap(),
            "--snapshot-count",
            "7",
        ];
        let expanded = args_with_config_file(args.iter().map(Into::into).collect()).unwrap();
        let c = Config::try_parse_from(expanded).unwrap();
        assert_eq!(c.name, "from-file");
        assert_eq!(c.snapshot_count, 7, "the command line beats the file");
        assert!(c.unsafe_no_fsync);
        assert_eq!(c.rocksdb_block_cache_bytes, 1 << 20);
        assert_eq!(c.listen_client_urls.len(), 2);
        let missing = ["metastore", "--config-file", "/nonexistent/x.yml"];
        assert!(args_with_config_file(missing.iter().map(Into::into).collect()).is_err());
    }

    #[test]
    fn etcd_flags_parse_with_etcds_defaults_and_forms() {
        let c = parse(&[]).unwrap();
        assert_eq!((c.max_snapshots, c.max_wals), (5, 5));
        assert!(c.pre_vote, "etcd 3.5 default");
        assert_eq!(c.experimental_max_learners, 1);
        assert_eq!(c.max_concurrent_streams, u32::MAX);
        assert_eq!(
            c.grpc_keepalive_interval,
            std::time::Duration::from_secs(7200)
        );
        assert_eq!(c.grpc_keepalive_timeout, std::time::Duration::from_secs(20));
        assert_eq!(c.wal_dir(), PathBuf::from("default.etcd/member/wal"));
        assert_eq!(c.log_outputs, vec!["default".to_string()]);
        assert!(!c.experimental_enable_lease_checkpoint);
        // Booleans: bare, =true, =false.
        for (args, want) in [
            (&["--experimental-initial-corrupt-check"][..], true),
            (&["--experimental-initial-corrupt-check=true"][..], true),
            (&["--experimental-initial-corrupt-check=false"][..], false),
        ] {
            assert_eq!(
                parse(args).unwrap().experimental_initial_corrupt_check,
                want
            );
        }
        let c = parse(&[
            "--pre-vote=false",
            "--grpc-keepalive-min-time=1h30m",
            "--backend-batch-interval=",
            "--experimental-corrupt-check-time=0",
            "--log-outputs=stdout,/tmp/x.log",
            "--wal-dir=/w",
            "--proxy-read-timeout=250",
        ])
        .unwrap();
        assert!(!c.pre_vote);
        assert_eq!(
            c.grpc_keepalive_min_time,
            std::time::Duration::from_secs(5400)
        );
        assert_eq!(c.backend_batch_interval, std::time::Duration::ZERO);
        assert_eq!(c.experimental_corrupt_check_time, std::time::Duration::ZERO);
        assert_eq!(c.log_outputs, vec!["stdout", "/tmp/x.log"]);
        assert_eq!(c.wal_dir(), PathBuf::from("/w"));
        assert_eq!(c.proxy_read_timeout, 250);
        assert!(
            parse(&["--grpc-keepalive-interval=5"]).is_err(),
            "Go durations need a unit"
        );
        assert!(parse(&["--auto-compaction-mode=hourly"]).is_err());
        assert!(parse(&["--logger=glog"]).is_err());
    }

    #[test]
    fn ignored_flags_warn_only_when_set() {
        use clap::{CommandFactory, FromArgMatches};
        let warnings = |args: &[&str]| {
            let m = Config::command()
                .try_get_matches_from(std::iter::once("metastore").chain(args.iter().copied()))
                .unwrap();
            ignored_flag_warnings(&m, &Config::from_arg_matches(&m).unwrap())
        };
        assert!(warnings(&[]).is_empty());
        assert!(warnings(&["--logger=zap", "--pre-vote"]).is_empty());
        assert_eq!(
            warnings(&["--enable-v2=false", "--logger", "capnslog"]),
            [
                "--enable-v2 ignored: the v2 API is not served",
                "--logger ignored: capnslog's layout is not reproduced: lines are written as \
                 --log-format console"
            ]
        );
        // Every entry names a declared flag.
        let cmd = Config::command();
        for i in IGNORED {
            assert!(
                cmd.get_arguments().any(|a| a.get_long() == Some(i.flag)),
                "{}",
                i.flag
            );
        }
    }

    #[test]
    fn unknown_etcd_env_vars_are_reported() {
        let vars = [
            ("ETCD_FOO", "1"),
            ("ETCD_NAME", "n"),
            ("ETCD_ENABLE_V2", "true"),
            ("ETCDCTL_API", "3"),
            ("METASTORE_SHARDS", "2"),
            ("ETCD_VERSION", "3.5"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        assert_eq!(
            unrecognized_env_warnings(vars),
            [
                "cannot set special environment variable ETCD_VERSION=3.5",
                "unrecognized environment variable ETCD_FOO=1"
            ]
        );
    }

    #[test]
    fn flags_and_bools() {
        let c = parse(&["--unsafe-no-fsync", "--shards", "3", "--name", "n1"]).unwrap();
        assert!(c.unsafe_no_fsync);
        assert_eq!(c.shard_count(), 3);
        assert_eq!(c.data_dir(), PathBuf::from("n1.etcd"));
    }
}
