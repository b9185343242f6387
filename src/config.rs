//! Member configuration: etcd's flag names, each also read from its `ETCD_*` environment
//! variable (a flag beats its variable), with etcd 3.5's defaults.

use std::path::PathBuf;

use clap::Parser;
use url::Url;

use crate::shard::EngineKind;

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
            if url.scheme() != "http" && url.scheme() != "https" {
                return Err(format!("URL scheme must be http or https: {u:?}"));
            }
            if url.host_str().is_none() || url.port_or_known_default().is_none() {
                return Err(format!("URL needs a host and port: {u:?}"));
            }
            Ok(url)
        })
        .collect::<Result<_, _>>()
        .map(UrlList)
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
    version,
    about = "An etcd v3 compatible key-value store",
    args_override_self = true
)]
pub struct Config {
    /// A YAML file of settings keyed by flag name (etcd's `--config-file`); flags given on
    /// the command line beat it.
    #[arg(long, env = "ETCD_CONFIG_FILE")]
    pub config_file: Option<PathBuf>,

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

    /// How often the leader checkpoints leases' remaining TTLs through Raft, so that a restart
    /// or leader change does not extend them by more than this.
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
    pub fn rocks_options(&self) -> crate::mvcc::rocks::RocksOptions {
        crate::mvcc::rocks::RocksOptions {
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
        crate::tls::validate(self).map_err(ConfigError::Tls)?;
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
    fn flags_and_bools() {
        let c = parse(&["--unsafe-no-fsync", "--shards", "3", "--name", "n1"]).unwrap();
        assert!(c.unsafe_no_fsync);
        assert_eq!(c.shard_count(), 3);
        assert_eq!(c.data_dir(), PathBuf::from("n1.etcd"));
    }
}
