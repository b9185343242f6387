//! `etcdctl check perf --load=s`: 150 puts/s from 50 clients for 60 s, which etcdctl passes only
//! with zero errors, >90% of the target rate, slowest request <= 0.5 s and stddev <= 0.1 s.

use std::sync::Mutex;

use crate::harness::Server;

/// Held by each test here: datascale's 10,000 puts at full speed would slow `check perf`'s
/// requests past its 0.5 s verdict if both ran at once.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn etcdctl_check_perf_small_load_passes() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let server = Server::start();
    let out = server.etcdctl(&["check", "perf", "--load=s"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let verdict: Vec<&str> = stdout
        .lines()
        .flat_map(|l| l.split('\r'))
        .filter(|l| l.contains("PASS") || l.contains("FAIL"))
        .collect();
    assert!(
        out.status.success(),
        "check perf failed: {verdict:?}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!verdict.iter().any(|l| l.contains("FAIL")), "{verdict:?}");
    assert!(
        verdict.iter().any(|l| l.contains("PASS: Throughput")),
        "{verdict:?}"
    );
}

/// `etcdctl check datascale --load=s`: 10,000 puts of 1 KiB from 50 clients, then the member's
/// memory use read from its `/metrics` (`process_resident_memory_bytes`), then the keys
/// deleted. etcdctl fails when it cannot read the metric.
#[test]
fn etcdctl_check_datascale_small_load_reads_metrics() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let server = Server::start();
    let out = server.etcdctl(&["check", "datascale", "--load=s"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("PASS: Approximate system memory used"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
