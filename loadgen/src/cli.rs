//! Command-line flags, named and defaulted as in etcd's `benchmark` tool
//! (`tools/benchmark/cmd/*.go` in the etcd repository), so a run of one compares directly with a
//! run of the other.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// `metastore-loadgen [global flags] <workload> [workload flags]`.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "metastore-loadgen",
    version,
    about = "Load generator for etcd v3 endpoints (MetaStore or etcd), with etcd benchmark's flags and report"
)]
pub struct Cli {
    /// Global flags.
    #[command(flatten)]
    pub global: Global,
    /// The workload.
    #[command(subcommand)]
    pub workload: Workload,
}

/// Flags shared by every workload.
#[derive(Args, Debug, Clone)]
pub struct Global {
    /// gRPC endpoints, host:port, comma-separated.
    #[arg(
        long,
        global = true,
        value_delimiter = ',',
        default_value = "127.0.0.1:2379"
    )]
    pub endpoints: Vec<String>,
    /// Number of gRPC connections; clients share them round-robin.
    #[arg(long, global = true, default_value_t = 1)]
    pub conns: usize,
    /// Number of concurrent clients (each has at most one request in flight).
    #[arg(long, global = true, default_value_t = 1)]
    pub clients: usize,
    /// Total number of requests (the watch workloads use --put-total instead).
    #[arg(long, global = true, default_value_t = 10_000)]
    pub total: u64,
    /// Requests per second over all clients; 0 is unlimited (closed loop). Otherwise open loop:
    /// request i is due at start + i/rate and its latency counts from then, so a stall shows
    /// up in the latency of every request it delays (no coordinated omission).
    #[arg(long, global = true, default_value_t = 0.0)]
    pub rate: f64,
    /// Connect only to the current leader (found with Maintenance.Status).
    #[arg(long, global = true)]
    pub target_leader: bool,
    /// Dial timeout for each connection.
    #[arg(long, global = true, value_parser = humantime::parse_duration, default_value = "30s")]
    pub dial_timeout: Duration,
    /// Username\[:password\] for authentication; the password is prompted for if absent.
    #[arg(long, global = true)]
    pub user: Option<String>,
    /// CA bundle to verify the server's certificate (enables TLS).
    #[arg(long, global = true)]
    pub cacert: Option<PathBuf>,
    /// Client certificate for TLS (with --key).
    #[arg(long, global = true)]
    pub cert: Option<PathBuf>,
    /// Client private key for TLS (with --cert).
    #[arg(long = "key", id = "tls_key", global = true)]
    pub key: Option<PathBuf>,
    /// Report format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub output: Output,
    /// Write a per-second CSV (second, requests, errors, avg/p50/p99/max ms) to this file, or
    /// to stdout after the report when given without a value.
    #[arg(long, global = true, num_args = 0..=1, default_missing_value = "-")]
    pub sample: Option<String>,
}

/// Report formats.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// etcd benchmark's layout.
    Text,
    /// One JSON object (see `report::Report`).
    Json,
}

/// Read consistency, as etcd's `--consistency` flag.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// Linearizable (ReadIndex).
    L,
    /// Serializable (local).
    S,
}

/// Workloads.
#[derive(Subcommand, Debug, Clone)]
pub enum Workload {
    /// Put keys (etcd `benchmark put`).
    Put(PutArgs),
    /// Range a key or key range (etcd `benchmark range`).
    Range(RangeArgs),
    /// Txns of `--txn-ops` puts (etcd `benchmark txn-put`).
    TxnPut(TxnPutArgs),
    /// Txns that are reads or writes in `--rw-ratio` (etcd `benchmark txn-mixed`).
    TxnMixed(TxnMixedArgs),
    /// Watch event delivery latency under a put rate (etcd `benchmark watch`).
    Watch(WatchArgs),
    /// One put at a time, each timed until every watcher has its event (etcd
    /// `benchmark watch-latency`).
    WatchLatency(WatchLatencyArgs),
    /// Lease keep-alives, one lease per client (etcd `benchmark lease-keepalive`).
    LeaseKeepalive,
    /// Read-modify-write transactions with optimistic retries (etcd `benchmark stm`).
    Stm(StmArgs),
}

impl Workload {
    /// The subcommand's name.
    pub fn name(&self) -> &'static str {
        match self {
            Workload::Put(_) => "put",
            Workload::Range(_) => "range",
            Workload::TxnPut(_) => "txn-put",
            Workload::TxnMixed(_) => "txn-mixed",
            Workload::Watch(_) => "watch",
            Workload::WatchLatency(_) => "watch-latency",
            Workload::LeaseKeepalive => "lease-keepalive",
            Workload::Stm(_) => "stm",
        }
    }
}

/// Key and value shape shared by the writing workloads.
#[derive(Args, Debug, Clone)]
pub struct KeyValueArgs {
    /// Key size, bytes.
    #[arg(long, default_value_t = 8)]
    pub key_size: usize,
    /// Value size, bytes.
    #[arg(long, default_value_t = 8)]
    pub val_size: usize,
    /// Number of distinct keys written.
    #[arg(long, default_value_t = 1)]
    pub key_space_size: u64,
    /// Write keys in sequence (i mod key-space-size) instead of at random.
    #[arg(long)]
    pub sequential_keys: bool,
}

/// `put` flags.
#[derive(Args, Debug, Clone)]
pub struct PutArgs {
    /// Key and value shape.
    #[command(flatten)]
    pub kv: KeyValueArgs,
    /// Compact every interval (0 = never), keeping `--compact-index-delta` revisions.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    pub compact_interval: Duration,
    /// Revisions kept behind the latest on each compaction.
    #[arg(long, default_value_t = 1000)]
    pub compact_index_delta: i64,
}

/// `range` flags.
#[derive(Args, Debug, Clone)]
pub struct RangeArgs {
    /// The key (or start of the range).
    pub key: String,
    /// End of the range (exclusive); absent for a single key.
    pub end: Option<String>,
    /// l (linearizable) or s (serializable).
    #[arg(long, value_enum, default_value = "l")]
    pub consistency: Consistency,
    /// Maximum keys returned (0 = no limit).
    #[arg(long, default_value_t = 0)]
    pub limit: i64,
    /// Return only the count.
    #[arg(long)]
    pub count_only: bool,
}

/// `txn-put` flags.
#[derive(Args, Debug, Clone)]
pub struct TxnPutArgs {
    /// Key and value shape.
    #[command(flatten)]
    pub kv: KeyValueArgs,
    /// Puts per txn.
    #[arg(long, default_value_t = 1)]
    pub txn_ops: usize,
}

/// `txn-mixed` flags.
#[derive(Args, Debug, Clone)]
pub struct TxnMixedArgs {
    /// The key range read (start).
    pub key: String,
    /// End of the read range (exclusive); absent for a single key.
    pub end: Option<String>,
    /// Key and value shape of the writes.
    #[command(flatten)]
    pub kv: KeyValueArgs,
    /// Reads per write.
    #[arg(long, default_value_t = 1.0)]
    pub rw_ratio: f64,
    /// l (linearizable) or s (serializable) reads.
    #[arg(long, value_enum, default_value = "l")]
    pub consistency: Consistency,
}

/// `watch` flags.
#[derive(Args, Debug, Clone)]
pub struct WatchArgs {
    /// Watch streams.
    #[arg(long, default_value_t = 10)]
    pub streams: usize,
    /// Watchers per stream.
    #[arg(long, default_value_t = 10)]
    pub watch_per_stream: usize,
    /// Distinct keys watched; watchers and puts cycle over them.
    #[arg(long, default_value_t = 1)]
    pub watched_key_total: u64,
    /// Puts per second (open loop).
    #[arg(long, default_value_t = 100.0)]
    pub put_rate: f64,
    /// Total puts.
    #[arg(long, default_value_t = 1000)]
    pub put_total: u64,
    /// Key size, bytes.
    #[arg(long, default_value_t = 32)]
    pub key_size: usize,
    /// Value size, bytes (at least 8: the put's sequence number).
    #[arg(long, default_value_t = 32)]
    pub val_size: usize,
}

/// `watch-latency` flags.
#[derive(Args, Debug, Clone)]
pub struct WatchLatencyArgs {
    /// Watch streams.
    #[arg(long, default_value_t = 10)]
    pub streams: usize,
    /// Watchers per stream.
    #[arg(long, default_value_t = 10)]
    pub watchers_per_stream: usize,
    /// Puts per second at most (0 = back to back).
    #[arg(long, default_value_t = 100.0)]
    pub put_rate: f64,
    /// Total puts.
    #[arg(long, default_value_t = 1000)]
    pub put_total: u64,
    /// Value size, bytes (at least 8).
    #[arg(long, default_value_t = 32)]
    pub val_size: usize,
    /// Ask for the previous key-value with each event.
    #[arg(long)]
    pub prev_kv: bool,
}

/// Isolation of `stm` transactions.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// Repeatable reads: each read is linearizable; commit checks every read key's
    /// mod_revision.
    R,
    /// Serializable snapshot: all reads at the first read's revision; commit checks every read
    /// key's mod_revision.
    S,
}

/// `stm` flags.
#[derive(Args, Debug, Clone)]
pub struct StmArgs {
    /// Distinct keys (counters).
    #[arg(long, default_value_t = 8)]
    pub keys: u64,
    /// Keys read and incremented per transaction.
    #[arg(long, default_value_t = 2)]
    pub keys_per_txn: u64,
    /// r (repeatable reads) or s (serializable snapshot).
    #[arg(long, value_enum, default_value = "r")]
    pub isolation: Isolation,
    /// Key prefix of the counters.
    #[arg(long, default_value = "stm/")]
    pub prefix: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_benchmark_command_lines_parse() {
        let cli = Cli::try_parse_from([
            "metastore-loadgen",
            "--endpoints=a:1,b:2",
            "--clients=100",
            "--conns=10",
            "--total=5",
            "put",
            "--key-size=8",
            "--val-size=256",
            "--sequential-keys",
            "--key-space-size=1000",
            "--compact-interval=1s",
        ])
        .unwrap();
        assert_eq!(cli.global.endpoints, ["a:1", "b:2"]);
        assert_eq!((cli.global.clients, cli.global.conns), (100, 10));
        let Workload::Put(p) = cli.workload else {
            panic!("put")
        };
        assert!(p.kv.sequential_keys);
        assert_eq!(p.compact_interval, Duration::from_secs(1));
        // Global flags may also follow the subcommand, as with etcd's cobra flags.
        let cli = Cli::try_parse_from([
            "metastore-loadgen",
            "range",
            "foo",
            "--consistency=s",
            "--total=7",
            "--sample",
        ])
        .unwrap();
        assert_eq!(cli.global.total, 7);
        assert_eq!(cli.global.sample.as_deref(), Some("-"));
        assert!(matches!(cli.workload, Workload::Range(ref r) if r.consistency == Consistency::S));
    }
}
