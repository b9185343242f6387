//! etcd's command line: every flag of etcd 3.4.23's and 3.5's `etcd --help` is accepted
//! (the TLS flags too; their behaviour is tested in `tls.rs`); flags without effect are logged
//! once as ignored; the flags that work are checked for their effect.

use std::path::Path;
use std::time::Duration;

use clap::CommandFactory;
use metastore::config::{Config, IGNORED};

use crate::harness::{free_port, wait_until_async, Server};

/// Every flag of etcd 3.5's and etcd 3.4.23's `etcd --help` (plus 3.5 patch-release
/// and 3.6 additions kubeadm and etcd's e2e suite pass), without the dashes.
const ETCD_FLAGS: &[&str] = &[
    // Member
    "name",
    "data-dir",
    "wal-dir",
    "snapshot-count",
    "heartbeat-interval",
    "election-timeout",
    "initial-election-tick-advance",
    "listen-peer-urls",
    "listen-client-urls",
    "listen-client-http-urls",
    "max-snapshots",
    "max-wals",
    "quota-backend-bytes",
    "backend-bbolt-freelist-type",
    "backend-batch-interval",
    "backend-batch-limit",
    "max-txn-ops",
    "max-request-bytes",
    "max-concurrent-streams",
    "enable-grpc-gateway",
    "grpc-keepalive-min-time",
    "grpc-keepalive-interval",
    "grpc-keepalive-timeout",
    "socket-reuse-port",
    "socket-reuse-address",
    "raft-read-timeout",
    "raft-write-timeout",
    // Clustering
    "initial-advertise-peer-urls",
    "initial-cluster",
    "initial-cluster-state",
    "initial-cluster-token",
    "advertise-client-urls",
    "discovery",
    "discovery-fallback",
    "discovery-proxy",
    "discovery-srv",
    "discovery-srv-name",
    "strict-reconfig-check",
    "pre-vote",
    "auto-compaction-retention",
    "auto-compaction-mode",
    "enable-v2",
    "v2-deprecation",
    // Security (non-TLS)
    "cors",
    "host-whitelist",
    // Auth
    "auth-token",
    "bcrypt-cost",
    "auth-token-ttl",
    // Profiling and monitoring
    "enable-pprof",
    "metrics",
    "listen-metrics-urls",
    // Logging
    "logger",
    "log-outputs",
    "log-level",
    "log-format",
    "enable-log-rotation",
    "log-rotation-config-json",
    "debug",
    "log-package-levels",
    // Distributed tracing
    "experimental-enable-distributed-tracing",
    "experimental-distributed-tracing-address",
    "experimental-distributed-tracing-service-name",
    "experimental-distributed-tracing-instance-id",
    "experimental-distributed-tracing-sampling-rate",
    // v2 proxy
    "proxy",
    "proxy-failure-wait",
    "proxy-refresh-interval",
    "proxy-dial-timeout",
    "proxy-write-timeout",
    "proxy-read-timeout",
    // Experimental
    "experimental-initial-corrupt-check",
    "experimental-corrupt-check-time",
    "experimental-compact-hash-check-enabled",
    "experimental-compact-hash-check-time",
    "experimental-enable-v2v3",
    "experimental-backend-bbolt-freelist-type",
    "experimental-enable-lease-checkpoint",
    "experimental-enable-lease-checkpoint-persist",
    "experimental-lease-checkpoint-interval",
    "experimental-compaction-batch-limit",
    "experimental-compaction-sleep-interval",
    "experimental-peer-skip-client-san-verification",
    "experimental-watch-progress-notify-interval",
    "experimental-downgrade-check-time",
    "experimental-memory-mlock",
    "experimental-warning-apply-duration",
    "experimental-warning-unary-request-duration",
    "experimental-txn-mode-write-with-shared-buffer",
    "experimental-bootstrap-defrag-threshold-megabytes",
    "experimental-stop-grpc-service-on-defrag",
    "experimental-snapshot-catchup-entries",
    "experimental-max-learners",
    "experimental-wait-cluster-ready-timeout",
    // Unsafe
    "force-new-cluster",
    "unsafe-no-fsync",
    // Configuration file
    "config-file",
    // Security (TLS; their behaviour is tested in tls.rs)
    "cert-file",
    "key-file",
    "client-cert-auth",
    "client-crl-file",
    "client-cert-allowed-hostname",
    "trusted-ca-file",
    "auto-tls",
    "self-signed-cert-validity",
    "cipher-suites",
    "tls-min-version",
    "tls-max-version",
    "client-cert-file",
    "client-key-file",
    "peer-cert-file",
    "peer-key-file",
    "peer-client-cert-auth",
    "peer-trusted-ca-file",
    "peer-auto-tls",
    "peer-cert-allowed-cn",
    "peer-cert-allowed-hostname",
    "peer-crl-file",
    "peer-client-cert-file",
    "peer-client-key-file",
];

/// A value for `flag` on the command line: `true` for booleans, the etcd default otherwise,
/// except where the default is empty or would not trigger the warning.
fn sample_value(flag: &str) -> String {
    let special = match flag {
        "listen-metrics-urls" | "listen-client-http-urls" => {
            Some(format!("http://127.0.0.1:{}", free_port()))
        }
        "logger" => Some("capnslog".into()),
        "discovery" => Some("https://discovery.etcd.io/x".into()),
        "discovery-fallback" => Some("exit".into()),
        "proxy" => Some("off".into()),
        "auth-token" => Some("simple".into()),
        "client-cert-file" | "peer-client-cert-file" => Some("/etc/etcd/client.crt".into()),
        "client-key-file" | "peer-client-key-file" => Some("/etc/etcd/client.key".into()),
        _ => None,
    };
    if let Some(v) = special {
        return v;
    }
    let cmd = Config::command();
    let arg = cmd
        .get_arguments()
        .find(|a| a.get_long() == Some(flag))
        .unwrap_or_else(|| panic!("--{flag} is declared"));
    let default = arg
        .get_default_values()
        .first()
        .map(|v| v.to_string_lossy().into_owned());
    // Booleans: set, whatever the default.
    if matches!(default.as_deref(), Some("true" | "false")) {
        return "true".into();
    }
    default.unwrap_or_else(|| panic!("--{flag} needs a sample value"))
}

/// Puts a key and reads it back through `server`.
async fn put_get(server: &Server) {
    let mut c = server.client().await;
    c.put("flags-k", "v", None).await.expect("put");
    let got = c.get("flags-k", None).await.expect("get");
    assert_eq!(got.kvs()[0].value(), b"v");
}

fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

#[test]
fn every_etcd_flag_is_declared_with_its_env_var() {
    let cmd = Config::command();
    for flag in ETCD_FLAGS {
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(flag))
            .unwrap_or_else(|| panic!("--{flag} is not accepted"));
        let env = format!("ETCD_{}", flag.to_uppercase().replace('-', "_"));
        assert_eq!(
            arg.get_env().map(|e| e.to_string_lossy().into_owned()),
            Some(env),
            "--{flag}'s environment variable"
        );
    }
    for i in IGNORED {
        assert!(
            ETCD_FLAGS.contains(&i.flag),
            "--{} is not an etcd flag",
            i.flag
        );
    }
}

/// One start with every ignored flag set on the command line: it serves, and each flag is
/// logged once with its reason.
#[tokio::test]
async fn ignored_flags_start_and_are_logged_once() {
    let dir = tempfile::tempdir().unwrap();
    let args: Vec<String> = IGNORED
        .iter()
        .map(|i| format!("--{}={}", i.flag, sample_value(i.flag)))
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::try_start(dir.path(), &args).expect("starts with every ignored flag");
    put_get(&server).await;
    let log = server.startup_log.clone();
    for i in IGNORED {
        let line = format!("--{} ignored: {}", i.flag, i.reason);
        assert_eq!(count(&log, &line), 1, "{line:?} once in:\n{log}");
    }
    assert_eq!(count(&log, " ignored: "), IGNORED.len(), "{log}");
}

/// Ignored flags set through `ETCD_*` variables and `--config-file` are logged too; flags
/// left at their defaults are not; unknown `ETCD_*` variables are warned about as etcd does.
#[tokio::test]
async fn env_and_config_file_settings_and_unknown_env_vars() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("etcd.yml");
    std::fs::write(&file, "enable-pprof: true\nlog-format: json\n").unwrap();
    let file = file.display().to_string();
    let data = dir.path().join("data");
    let server = Server::try_start_with_env(
        &data,
        &["--config-file", &file],
        &[
            ("ETCD_ENABLE_V2", "true"),
            ("ETCD_FOO", "1"),
            ("ETCD_EXPERIMENTAL_MEMORY_MLOCK", "false"),
        ],
    )
    .expect("starts");
    put_get(&server).await;
    let log = server.startup_log.clone();
    for line in [
        "unrecognized environment variable ETCD_FOO=1",
        "--enable-v2 ignored: the v2 API is not served",
        "--experimental-memory-mlock ignored: ",
        "--enable-pprof ignored: ",
    ] {
        assert_eq!(count(&log, line), 1, "{line:?} once in:\n{log}");
    }
    assert_eq!(count(&log, " ignored: "), 3, "{log}");
    assert_eq!(count(&log, "unrecognized environment variable"), 1, "{log}");
}

fn files_with_ext(dir: &Path, ext: &str) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| {
        d.flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == ext))
            .count()
    })
}

/// The flags that work, in one start: nothing is logged as ignored, the WAL is in
/// `--wal-dir`, the log goes to the `--log-outputs` file as well, and snapshots are capped by
/// `--max-snapshots`.
#[tokio::test]
async fn working_flags() {
    let dir = tempfile::tempdir().unwrap();
    let wal = dir.path().join("wal-elsewhere");
    let log_file = dir.path().join("metastore.log");
    let outputs = format!("stderr,{}", log_file.display());
    let wal_arg = wal.display().to_string();
    let data = dir.path().join("data");
    let server = Server::try_start(
        &data,
        &[
            "--wal-dir",
            &wal_arg,
            "--log-outputs",
            &outputs,
            "--logger=zap",
            "--debug=false",
            "--max-snapshots=2",
            "--max-wals=0",
            "--snapshot-count=5",
            "--max-concurrent-streams=64",
            "--grpc-keepalive-interval=1s",
            "--grpc-keepalive-timeout=1s",
            "--pre-vote=false",
            "--experimental-max-learners=2",
            "--experimental-enable-lease-checkpoint",
        ],
    )
    .expect("starts");
    let mut c = server.client().await;
    for i in 0..40 {
        c.put(format!("k{i}"), "v", None).await.unwrap();
    }
    put_get(&server).await;
    assert_eq!(
        count(&server.startup_log, " ignored: "),
        0,
        "{}",
        server.startup_log
    );
    assert!(
        files_with_ext(&wal, "wal") >= 1,
        "WAL segments in --wal-dir"
    );
    assert_eq!(
        files_with_ext(&data.join("member").join("wal"), "wal"),
        0,
        "no WAL in the data dir"
    );
    let snaps = data.join("member").join("snap");
    // Snapshots are taken as entries are applied: give it a moment after the last put.
    wait_until_async(Duration::from_secs(10), async || {
        files_with_ext(&snaps, "snap") >= 2
    })
    .await;
    // Not waiting for a state: a moment more, in which a purge that failed would let a
    // third file stay.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(files_with_ext(&snaps, "snap"), 2, "--max-snapshots=2");
    let logged = std::fs::read_to_string(&log_file).unwrap();
    assert!(
        logged.contains("ready to serve client requests"),
        "{logged}"
    );
}

/// Without `--max-snapshots`, etcd's 5 are kept.
#[tokio::test]
async fn default_max_snapshots_is_five() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::try_start(dir.path(), &["--snapshot-count=5"]).expect("starts");
    let mut c = server.client().await;
    for i in 0..80 {
        c.put(format!("k{i}"), "v", None).await.unwrap();
    }
    let snaps = dir.path().join("member").join("snap");
    wait_until_async(Duration::from_secs(10), async || {
        files_with_ext(&snaps, "snap") >= 5
    })
    .await;
    // Not waiting for a state: a moment more, in which a purge that failed would let a
    // sixth file stay.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(files_with_ext(&snaps, "snap"), 5);
}

/// kubeadm's etcd static pod command line, without its TLS flags and https URLs.
#[tokio::test]
async fn kubeadm_command_line_starts() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = format!("http://127.0.0.1:{}", free_port());
    let server = Server::try_start(
        dir.path(),
        &[
            "--experimental-initial-corrupt-check=true",
            "--experimental-watch-progress-notify-interval=5s",
            "--listen-metrics-urls",
            &metrics,
            "--snapshot-count=10000",
            "--name=kube-node",
        ],
    )
    .expect("kubeadm's command line starts");
    put_get(&server).await;
    // Nothing is ignored (the metrics URL serves /metrics); the corruption check ran.
    assert_eq!(
        count(&server.startup_log, " ignored: "),
        0,
        "{}",
        server.startup_log
    );
    assert!(
        server
            .startup_log
            .contains("initial corruption check passed"),
        "{}",
        server.startup_log
    );
}

/// Opens a connection that pings every `interval` while idle (as a grpc-go client with
/// `PermitWithoutStream`), after one request.
async fn pinging_client(server: &Server, interval: Duration) -> tonic::transport::Channel {
    use metastore::proto::etcdserverpb::{kv_client::KvClient, RangeRequest};
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.endpoint))
        .unwrap()
        .http2_keep_alive_interval(interval)
        .keep_alive_while_idle(true)
        .connect()
        .await
        .expect("connects");
    let range = RangeRequest {
        key: b"k".to_vec(),
        ..Default::default()
    };
    KvClient::new(channel.clone())
        .range(range)
        .await
        .expect("range");
    channel
}

/// `--grpc-keepalive-min-time`: a client that pings too often gets grpc-go's GOAWAY
/// ("too_many_pings") and loses its connection; with the policy off (0) it does not, and other
/// clients are served throughout.
#[tokio::test]
async fn grpc_keepalive_min_time_sends_away_clients_that_ping_too_often() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::try_start(dir.path(), &[]).expect("starts");
    let _eager = pinging_client(&server, Duration::from_millis(100)).await;
    // Async: the pinging client runs on this (current-thread) runtime, which a blocking
    // Server::wait_log would stall.
    let sent_away = wait_until_async(Duration::from_secs(20), async || {
        server.log().contains("Got too many pings from the client")
    })
    .await;
    assert!(
        sent_away,
        "no GOAWAY for 10 pings a second:\n{}",
        server.log()
    );
    put_get(&server).await;

    // Off: the same client pings on, unanswered by any GOAWAY, until well past the point
    // where the policy sent the first one away (its 4th ping); a normal request on the same
    // connection still answers.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::try_start(dir.path(), &["--grpc-keepalive-min-time=0"]).expect("starts");
    let channel = pinging_client(&server, Duration::from_millis(100)).await;
    // Time is the subject: 2 s of pings, far past the policy's limit.
    tokio::time::sleep(Duration::from_secs(2)).await;
    use metastore::proto::etcdserverpb::{kv_client::KvClient, RangeRequest};
    KvClient::new(channel)
        .range(RangeRequest {
            key: b"k".to_vec(),
            ..Default::default()
        })
        .await
        .expect("the pinging connection still serves");
    assert!(!server.log().contains("too many pings"), "{}", server.log());
}

/// The README's "Accepted but ignored" list is the `IGNORED` table, reasons included, and
/// nothing else.
#[test]
fn readme_lists_exactly_the_ignored_flags() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme.find("### Accepted but ignored").expect("section");
    let section = &readme[start..];
    let section = &section[..section[4..].find("\n#").map_or(section.len(), |i| i + 4)];
    for i in IGNORED {
        let line = section
            .lines()
            .find(|l| l.starts_with("- ") && l.contains(&format!("`--{}`", i.flag)))
            .unwrap_or_else(|| panic!("--{} is not in the README's ignored list", i.flag));
        assert!(
            line.ends_with(i.reason),
            "--{}: {line:?} vs {:?}",
            i.flag,
            i.reason
        );
    }
    let items = section
        .lines()
        .filter(|l| l.starts_with("- "))
        .flat_map(|l| l.split(": ").next().unwrap_or("").split('`'));
    for flag in items.filter(|w| w.starts_with("--")) {
        assert!(
            IGNORED.iter().any(|i| format!("--{}", i.flag) == flag),
            "{flag} is listed as ignored but works"
        );
    }
}
