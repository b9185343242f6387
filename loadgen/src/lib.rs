//! `metastore-loadgen`: drives a workload against any etcd v3 endpoint (MetaStore or etcd
//! itself) and reports latency and throughput the way etcd's `benchmark` tool does, so the two
//! servers are measured with one client and one set of conventions.
//!
//! * [`cli`]: flags and subcommands, named and defaulted as in etcd's `benchmark`.
//! * [`driver`]: the client loop, open-loop pacing ([`driver::Schedule`]) and early stop.
//! * [`workloads`]: the request/response workloads (put, range, txn-put, txn-mixed,
//!   lease-keepalive, stm).
//! * [`watch`]: the watch workloads (event delivery latency).
//! * [`report`]: HDR-histogram latencies per client, merged into etcd's summary layout, JSON
//!   or a per-second CSV.
//!
//! [`run`] is the whole program minus printing; the binary and the integration tests call it.

pub mod cli;
pub mod driver;
pub mod report;
pub mod watch;
pub mod workloads;

use std::io::IsTerminal;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;

use anyhow::{bail, Context};
use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::time::Instant;

use cli::{Cli, Global, Output, Workload};
use driver::{drive, Run, Schedule, Stop};
use report::Report;
use workloads::{KeepAliveWorker, PutWorker, RangeWorker, StmWorker, TxnMixedWorker, TxnPutWorker};

/// Connection options from the global flags: dial timeout, user and TLS.
///
/// Errors: `--user` without a password, `--cert` without `--key` (or the reverse), unreadable
/// certificate files.
pub fn connect_options(g: &Global) -> anyhow::Result<ConnectOptions> {
    let mut opts = ConnectOptions::new().with_connect_timeout(g.dial_timeout);
    if let Some(user) = &g.user {
        let Some((name, password)) = user.split_once(':') else {
            bail!("--user must be name:password");
        };
        opts = opts.with_user(name, password);
    }
    if g.cacert.is_some() || g.cert.is_some() || g.key.is_some() {
        let mut tls = TlsOptions::new();
        if let Some(ca) = &g.cacert {
            let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        match (&g.cert, &g.key) {
            (Some(cert), Some(key)) => {
                let cert =
                    std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
                let key =
                    std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            (None, None) => {}
            _ => bail!("--cert and --key go together"),
        }
        opts = opts.with_tls(tls);
    }
    Ok(opts)
}

/// Opens `--conns` connections to the endpoints (or to the leader alone with
/// `--target-leader`).
pub async fn connect(g: &Global) -> anyhow::Result<Vec<Client>> {
    let opts = connect_options(g)?;
    let mut endpoints = g.endpoints.clone();
    if g.target_leader {
        endpoints = vec![find_leader(&g.endpoints, &opts).await?];
    }
    let mut conns = Vec::with_capacity(g.conns.max(1));
    for _ in 0..g.conns.max(1) {
        let c = Client::connect(endpoints.clone(), Some(opts.clone()))
            .await
            .with_context(|| format!("connecting to {}", endpoints.join(",")))?;
        conns.push(c);
    }
    Ok(conns)
}

/// The endpoint whose member is the leader, asked with Maintenance.Status.
async fn find_leader(endpoints: &[String], opts: &ConnectOptions) -> anyhow::Result<String> {
    for ep in endpoints {
        let Ok(mut c) = Client::connect([ep.as_str()], Some(opts.clone())).await else {
            continue;
        };
        if let Ok(s) = c.status().await {
            if s.header().is_some_and(|h| h.member_id() == s.leader()) {
                return Ok(ep.clone());
            }
        }
    }
    bail!("no leader among {}", endpoints.join(","))
}

/// A progress bar of `len` steps, drawn only when stdout and stderr are both terminals and the
/// report is text (so nothing is drawn into a pipe or a JSON consumer).
pub fn progress_bar(len: u64, g: &Global) -> ProgressBar {
    let on_terminal = std::io::stdout().is_terminal() && std::io::stderr().is_terminal();
    if !on_terminal || g.output != Output::Text {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} [{elapsed_precise}] {per_sec}")
            .expect("valid template"),
    );
    bar
}

/// Runs the workload `cli` describes until it completes or `stop` turns true, and returns the
/// report (partial if stopped).
///
/// Errors: connection failures and failures of a workload's set-up (watch creation, lease
/// grant); failures of individual requests are counted in the report instead.
pub async fn run(cli: &Cli, stop: Stop) -> anyhow::Result<Report> {
    let g = &cli.global;
    let conns = connect(g).await?;
    let clients = g.clients.max(1);
    let conn = |c: usize| conns[c % conns.len()].clone();
    let sample = g.sample.is_some();
    let name = cli.workload.name();

    if let Workload::Watch(args) = &cli.workload {
        let watchers = (args.streams * args.watch_per_stream) as u64;
        let bar = progress_bar(args.put_total * watchers / args.watched_key_total.max(1), g);
        let out = watch::run_watch(&conns, args, sample, bar.clone(), stop).await?;
        bar.finish_and_clear();
        return Ok(Report::new(name, out.rec, out.elapsed, out.interrupted));
    }
    if let Workload::WatchLatency(args) = &cli.workload {
        let watchers = (args.streams * args.watchers_per_stream) as u64;
        let bar = progress_bar(args.put_total * watchers, g);
        let out = watch::run_watch_latency(&conns, args, sample, bar.clone(), stop).await?;
        bar.finish_and_clear();
        return Ok(Report::new(name, out.rec, out.elapsed, out.interrupted));
    }

    let bar = progress_bar(g.total, g);
    let make_run = |start: Instant| Run {
        total: g.total,
        schedule: Schedule::new(start, g.rate),
        sample,
        progress: bar.clone(),
        stop: stop.clone(),
    };
    let seed = |c: usize| 0x5eed_0000 + c as u64;
    let (rec, interrupted, elapsed) = match &cli.workload {
        Workload::Put(args) => {
            let latest = Arc::new(AtomicI64::new(0));
            let workers = (0..clients)
                .map(|c| PutWorker::new(conn(c).kv_client(), &args.kv, seed(c), latest.clone()))
                .collect();
            let compactor = (!args.compact_interval.is_zero()).then(|| {
                tokio::spawn(compact_periodically(
                    conn(0),
                    args.compact_interval,
                    args.compact_index_delta,
                    latest.clone(),
                ))
            });
            let start = Instant::now();
            let (rec, interrupted) = drive(make_run(start), workers).await;
            if let Some(c) = compactor {
                c.abort();
            }
            (rec, interrupted, start.elapsed())
        }
        Workload::Range(args) => {
            let workers = (0..clients)
                .map(|c| RangeWorker::new(conn(c).kv_client(), args))
                .collect();
            timed(make_run, workers).await
        }
        Workload::TxnPut(args) => {
            let workers = (0..clients)
                .map(|c| TxnPutWorker::new(conn(c).kv_client(), &args.kv, args.txn_ops, seed(c)))
                .collect();
            timed(make_run, workers).await
        }
        Workload::TxnMixed(args) => {
            let workers = (0..clients)
                .map(|c| TxnMixedWorker::new(conn(c).kv_client(), args, seed(c)))
                .collect();
            timed(make_run, workers).await
        }
        Workload::LeaseKeepalive => {
            let mut workers = Vec::with_capacity(clients);
            for c in 0..clients {
                let w = KeepAliveWorker::new(&mut conn(c).lease_client())
                    .await
                    .context("granting the lease to keep alive")?;
                workers.push(w);
            }
            let ids: Vec<i64> = workers.iter().map(KeepAliveWorker::id).collect();
            let out = timed(make_run, workers).await;
            let mut lease = conn(0).lease_client();
            for id in ids {
                // Best effort: leases left behind expire after their TTL anyway.
                let _ = lease.revoke(id).await;
            }
            out
        }
        Workload::Stm(args) => {
            let workers = (0..clients)
                .map(|c| StmWorker::new(conn(c).kv_client(), args, seed(c)))
                .collect();
            timed(make_run, workers).await
        }
        Workload::Watch(_) | Workload::WatchLatency(_) => unreachable!("handled above"),
    };
    bar.finish_and_clear();
    Ok(Report::new(name, rec, elapsed, interrupted))
}

/// The report as the binary prints it: text or JSON per `--output`, followed by the
/// per-second CSV when `--sample` has no file; with a file, the CSV is written there.
///
/// Errors: the sample file cannot be written.
pub fn render(report: &Report, g: &Global) -> anyhow::Result<String> {
    let mut out = match g.output {
        Output::Text => report.text(),
        Output::Json => serde_json::to_string(report)? + "\n",
    };
    match g.sample.as_deref() {
        Some("-") => {
            out.push('\n');
            out.push_str(&report.csv());
        }
        Some(path) => std::fs::write(path, report.csv())
            .with_context(|| format!("writing the sample CSV to {path}"))?,
        None => {}
    }
    Ok(out)
}

async fn timed<W: driver::Worker>(
    make_run: impl Fn(Instant) -> Run,
    workers: Vec<W>,
) -> (report::Recorder, bool, std::time::Duration) {
    let start = Instant::now();
    let (rec, interrupted) = drive(make_run(start), workers).await;
    (rec, interrupted, start.elapsed())
}

/// `put --compact-interval`: every interval, compacts to the latest revision seen minus
/// `delta`, as etcd's benchmark does.
async fn compact_periodically(
    client: Client,
    every: std::time::Duration,
    delta: i64,
    latest: Arc<AtomicI64>,
) {
    let mut kv = client.kv_client();
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let rev = latest.load(std::sync::atomic::Ordering::Relaxed) - delta;
        if rev > 0 {
            let _ = kv.compact(rev, None).await;
        }
    }
}
