//! `metastore-loadgen` against a real MetaStore node and a real etcd: every subcommand runs
//! briefly and its report's counts are checked, and where a workload leaves state behind (keys,
//! counters, leases) the state is checked through an independent client.

use clap::Parser;
use etcd_client::{Client, GetOptions};
use metastore_loadgen::cli::Cli;
use metastore_loadgen::report::Report;
use tokio::sync::watch;

use crate::harness::{Etcd, Server};
use crate::util::Rev;

/// Runs loadgen with `args` (global flags and a subcommand) against `endpoint`.
async fn loadgen(endpoint: &str, args: &str) -> Report {
    let mut argv = vec!["metastore-loadgen", "--endpoints", endpoint];
    argv.extend(args.split_whitespace());
    let cli = Cli::try_parse_from(&argv).expect("valid loadgen flags");
    let (_stop_tx, stop) = watch::channel(false);
    metastore_loadgen::run(&cli, stop).await.expect("run")
}

fn assert_clean(r: &Report, count: u64) {
    assert_eq!(r.summary.count, count, "{}", r.text());
    assert_eq!(r.errors, 0, "{}", r.text());
    assert!(!r.interrupted);
    assert!(r.summary.requests_per_sec > 0.0);
    assert!(r.summary.fastest_ms <= r.summary.latency_ms["p50"]);
    assert!(r.summary.latency_ms["p50"] <= r.summary.slowest_ms);
}

async fn count_prefix(c: &mut Client, prefix: &str) -> i64 {
    c.get(
        prefix,
        Some(GetOptions::new().with_prefix().with_count_only()),
    )
    .await
    .unwrap()
    .count()
}

/// Every subcommand once, with the state each leaves behind checked.
async fn every_subcommand(endpoint: &str) {
    let mut c = Client::connect([endpoint], None).await.unwrap();

    // put: 200 puts over 50 sequential keys "00000000".."00000049".
    let r = loadgen(
        endpoint,
        "--clients 10 --conns 2 --total 200 put --key-size 8 --val-size 16 --key-space-size 50 --sequential-keys",
    )
    .await;
    assert_clean(&r, 200);
    assert_eq!(count_prefix(&mut c, "000000").await, 50);
    let kv = c.get("00000049", None).await.unwrap();
    assert_eq!(kv.kvs()[0].value(), &[b'v'; 16]);
    assert_eq!(kv.kvs()[0].version(), 4, "each key written 200/50 times");

    // range, both consistencies.
    for consistency in ["l", "s"] {
        let r = loadgen(
            endpoint,
            &format!("--clients 4 --total 100 range 00000001 --consistency {consistency}"),
        )
        .await;
        assert_clean(&r, 100);
    }

    // txn-put: 30 txns of 4 puts, one revision each.
    let before = c.get("x", None).await.unwrap().rev();
    let r = loadgen(
        endpoint,
        "--clients 3 --total 30 txn-put --txn-ops 4 --key-space-size 100000 --key-size 10",
    )
    .await;
    assert_clean(&r, 30);
    let after = c.get("x", None).await.unwrap().rev();
    assert_eq!(after - before, 30);

    // txn-mixed: every txn is a read or a write.
    let r = loadgen(
        endpoint,
        "--clients 4 --total 100 txn-mixed 00000001 --key-space-size 50 --rw-ratio 1",
    )
    .await;
    assert_clean(&r, 100);
    let (reads, writes) = (r.breakdown["read"].count, r.breakdown["write"].count);
    assert_eq!(reads + writes, 100);
    assert!(reads > 0 && writes > 0, "{reads} reads, {writes} writes");

    // lease-keepalive: one lease per client, revoked at the end.
    let leases_before = c.leases().await.unwrap().leases().len();
    let r = loadgen(endpoint, "--clients 4 --total 40 lease-keepalive").await;
    assert_clean(&r, 40);
    assert_eq!(c.leases().await.unwrap().leases().len(), leases_before);

    // stm: contended read-modify-write; no increment may be lost.
    let r = loadgen(
        endpoint,
        "--clients 8 --total 40 stm --keys 4 --keys-per-txn 2 --prefix stmtest/",
    )
    .await;
    assert_clean(&r, 40);
    let counters = c
        .get("stmtest/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    let sum: u64 = counters
        .kvs()
        .iter()
        .map(|kv| kv.value_str().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(sum, 80, "40 txns each incremented 2 counters");

    // watch: 2 streams x 5 watchers over 2 keys; 20 puts reach 5 watchers each.
    let r = loadgen(
        endpoint,
        "watch --streams 2 --watch-per-stream 5 --watched-key-total 2 --put-rate 200 --put-total 20",
    )
    .await;
    assert_clean(&r, 100);
    assert_eq!(r.breakdown["put"].count, 20);
    assert_eq!(r.breakdown["create"].count, 2);

    // watch-latency: 6 watchers on one key, 10 puts back to back.
    let r = loadgen(
        endpoint,
        "watch-latency --streams 2 --watchers-per-stream 3 --put-rate 0 --put-total 10 --prev-kv",
    )
    .await;
    assert_clean(&r, 60);
    assert_eq!(r.breakdown["put"].count, 10);
}

/// Failed requests are counted by gRPC status and message, never dropped.
async fn errors_are_counted(endpoint: &str) {
    // Two puts of the same key in one txn: etcd rejects every one of them.
    let r = loadgen(
        endpoint,
        "--clients 2 --total 10 txn-put --txn-ops 2 --key-space-size 1",
    )
    .await;
    assert_eq!(r.summary.count, 0);
    assert_eq!(r.errors, 10);
    assert_eq!(
        r.error_distribution
            .get("InvalidArgument: etcdserver: duplicate key given in txn request"),
        Some(&10),
        "{:?}",
        r.error_distribution
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_subcommand_against_metastore() {
    let s = Server::start();
    every_subcommand(&s.endpoint).await;
    errors_are_counted(&s.endpoint).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_subcommand_against_etcd() {
    let e = Etcd::start();
    every_subcommand(&e.endpoint).await;
    errors_are_counted(&e.endpoint).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn open_loop_rate_paces_requests() {
    let s = Server::start();
    // At 200 requests/s, request 99 is not due before 495 ms: a lower bound set by the
    // schedule, not a performance figure.
    let r = loadgen(&s.endpoint, "--clients 4 --total 100 --rate 200 put").await;
    assert_clean(&r, 100);
    assert!(r.total_secs >= 0.495, "{}", r.total_secs);
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_returns_a_partial_report_and_samples() {
    let s = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("samples.csv");
    let argv = [
        "metastore-loadgen",
        "--endpoints",
        &s.endpoint,
        "--clients",
        "2",
        "--total",
        "1000000",
        "--rate",
        "200",
        "--output",
        "json",
        "--sample",
        csv.to_str().unwrap(),
        "put",
    ];
    let cli = Cli::try_parse_from(argv).unwrap();
    let (stop_tx, stop) = watch::channel(false);
    let run = tokio::spawn(async move { (metastore_loadgen::run(&cli, stop).await, cli) });
    // Stop once the server has applied 20 of the puts (Ctrl-C does the same in the binary).
    let mut c = s.client().await;
    loop {
        let rev = c.get("x", None).await.unwrap().rev();
        if rev > 20 {
            break;
        }
        tokio::task::yield_now().await;
    }
    stop_tx.send(true).unwrap();
    let (report, cli) = run.await.unwrap();
    let report = report.unwrap();
    assert!(report.interrupted);
    // The server had applied 20 puts; the replies to the last ones (at most one per client,
    // so 2) may still have been on their way back when the run stopped.
    assert!(
        report.summary.count >= 18 && report.summary.count < 1_000_000,
        "{}",
        report.summary.count
    );
    assert_eq!(report.errors, 0);

    let out = metastore_loadgen::render(&report, &cli.global).unwrap();
    let json: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
    assert_eq!(json["count"], report.summary.count);
    assert_eq!(json["interrupted"], true);
    let rows = std::fs::read_to_string(&csv).unwrap();
    let mut lines = rows.lines();
    assert_eq!(
        lines.next(),
        Some("second,requests,errors,avg_ms,p50_ms,p99_ms,max_ms")
    );
    let total: u64 = lines
        .map(|l| l.split(',').nth(1).unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(
        total, report.summary.count,
        "every request is in one second's row"
    );
}
