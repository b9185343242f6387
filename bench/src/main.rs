//! `metastore-compare`: the side-by-side comparison of MetaStore with etcd on this machine.
//!
//! For each round it starts etcd and MetaStore one after the other (the order alternates
//! between rounds), each single-member on loopback with fsync on and a fresh temporary data dir,
//! and runs the standard workloads against each with `metastore-loadgen --output json`. It
//! then takes the median of each figure over the rounds, measures each server's peak RSS after
//! loading 1M keys of 256-byte values, and writes `RESULTS.md`, `results.json` and SVG charts
//! (throughput per workload, latency CDFs) into the output directory.
//!
//! Each round also runs the put and range workloads against `metastore-grpc-floor`, the gRPC
//! stack with no work behind it, and the put and watch workloads against it once more with each
//! Put group-committed to a file with `fdatasync` (the durable floor): their server CPU per
//! request is the least any server built on that stack spends here, and RESULTS.md sets it
//! against the goals.
//!
//! Run it through `bench/compare.sh`, which installs etcd and builds the binaries first.

mod charts;
mod server;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};
use clap::Parser;
use serde::{Deserialize, Serialize};

use charts::{Figures, Memory};
use server::{Binaries, Kind, Server};

/// Flags.
#[derive(Parser, Debug)]
#[command(name = "metastore-compare", about = "MetaStore vs etcd, side by side")]
struct Args {
    /// etcd binary.
    #[arg(long, default_value = "etcd")]
    etcd: PathBuf,
    /// MetaStore binary.
    #[arg(long, default_value = "target/release/metastore")]
    metastore: PathBuf,
    /// metastore-loadgen binary.
    #[arg(long, default_value = "target/release/metastore-loadgen")]
    loadgen: PathBuf,
    /// metastore-grpc-floor binary.
    #[arg(long, default_value = "target/release/metastore-grpc-floor")]
    grpc_floor: PathBuf,
    /// Extra MetaStore flags, space-separated (e.g. "--storage-engine rocksdb").
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    metastore_args: String,
    /// Rounds; each figure is the median over them.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Multiplies every workload's request count (0.1 for a quick look).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Only these workloads (comma-separated names); all by default.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Keys loaded before reading peak RSS (0 skips the memory measurement).
    #[arg(long, default_value_t = 1_000_000)]
    rss_keys: u64,
    /// Where RESULTS.md, results.json and the charts go.
    #[arg(long, default_value = "bench")]
    out_dir: PathBuf,
}

/// One standard workload: a name and its loadgen arguments.
struct Workload {
    name: &'static str,
    /// Global flags (clients, conns), then the subcommand and its flags; the request count
    /// (`--total`, or `--put-total` for watch) is added by `run_loadgen`.
    args: Vec<String>,
    total: u64,
    /// What one "request" is in the throughput column.
    unit: &'static str,
    /// Whether the gRPC floor serves it (Put and Range only).
    floor: bool,
    /// Whether the durable floor serves it (Put, and the watch fan-out).
    durable_floor: bool,
}

fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

/// The standard workloads of the comparison (issue: put at 1/100/1000 clients with 256-byte
/// values; linearizable and serializable range at 100 clients; txn-put of 4 ops at 100 clients;
/// a watch fan-out; lease keep-alive).
fn workloads() -> Vec<Workload> {
    let put = "put --key-size 8 --val-size 256 --key-space-size 100000 --sequential-keys";
    let w = |name: &'static str, args: String, total, unit| Workload {
        name,
        args: words(&args),
        total,
        unit,
        floor: name.starts_with("put") || name.starts_with("range"),
        durable_floor: name.starts_with("put") || name.starts_with("watch"),
    };
    vec![
        w("put, 1 client", format!("--clients 1 --conns 1 {put}"), 3_000, "puts"),
        w("put, 100 clients", format!("--clients 100 --conns 10 {put}"), 40_000, "puts"),
        w("put, 1000 clients", format!("--clients 1000 --conns 100 {put}"), 60_000, "puts"),
        w(
            "range linearizable, 100 clients",
            "--clients 100 --conns 10 range 00000001 --consistency l".into(),
            40_000,
            "ranges",
        ),
        w(
            "range serializable, 100 clients",
            "--clients 100 --conns 10 range 00000001 --consistency s".into(),
            40_000,
            "ranges",
        ),
        w(
            "txn-put 4 ops, 100 clients",
            "--clients 100 --conns 10 txn-put --txn-ops 4 --key-size 8 --val-size 256 --key-space-size 100000".into(),
            15_000,
            "txns",
        ),
        w(
            "watch fan-out, 1000 watchers",
            "watch --streams 10 --watch-per-stream 100 --watched-key-total 10 --put-rate 1000 --key-size 8 --val-size 256".into(),
            3_000,
            "events",
        ),
        w(
            "lease keep-alive, 100 clients",
            "--clients 100 --conns 10 lease-keepalive".into(),
            40_000,
            "keep-alives",
        ),
    ]
}

/// The fields of a loadgen JSON report this tool uses.
#[derive(Deserialize, Serialize, Clone, Debug)]
struct LoadReport {
    count: u64,
    errors: u64,
    requests_per_sec: f64,
    total_secs: f64,
    latency_ms: std::collections::BTreeMap<String, f64>,
    cdf: Vec<(f64, f64)>,
    #[serde(default)]
    error_distribution: std::collections::BTreeMap<String, u64>,
}

/// One measurement.
#[derive(Serialize, Clone, Debug)]
struct Sample {
    server: &'static str,
    workload: &'static str,
    round: usize,
    report: LoadReport,
    /// The server's CPU time (user + system) during the workload, seconds.
    server_cpu_secs: f64,
}

fn run_loadgen(
    bins: &Binaries,
    endpoint: &str,
    w: &Workload,
    total: u64,
) -> anyhow::Result<LoadReport> {
    let mut cmd = Command::new(&bins.loadgen);
    cmd.args(["--endpoints", endpoint, "--output", "json"]);
    if w.name.starts_with("watch") {
        cmd.args(&w.args).args(["--put-total", &total.to_string()]);
    } else {
        cmd.args(["--total", &total.to_string()]).args(&w.args);
    }
    let out = cmd.output().context("running metastore-loadgen")?;
    if !out.status.success() {
        bail!(
            "loadgen failed on {}: {}",
            w.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("parsing loadgen JSON")
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Server CPU microseconds per request: `cpu_secs` spread over `count` requests.
fn cpu_us_per_request(cpu_secs: f64, count: u64) -> f64 {
    if count == 0 {
        return 0.0;
    }
    cpu_secs * 1e6 / count as f64
}

fn figures(samples: &[&Sample]) -> Figures {
    Figures {
        cpu_us: median(
            samples
                .iter()
                .map(|s| cpu_us_per_request(s.server_cpu_secs, s.report.count))
                .collect(),
        ),
        rps: median(samples.iter().map(|s| s.report.requests_per_sec).collect()),
        p50: median(samples.iter().map(|s| s.report.latency_ms["p50"]).collect()),
        p99: median(samples.iter().map(|s| s.report.latency_ms["p99"]).collect()),
        errors: samples.iter().map(|s| s.report.errors).sum(),
    }
}

fn measure_memory(kind: Kind, bins: &Binaries, keys: u64) -> anyhow::Result<Memory> {
    let server = Server::start(kind, bins)?;
    let w = Workload {
        name: "load",
        args: words(&format!(
            "--clients 100 --conns 10 put --key-size 8 --val-size 256 --key-space-size {keys} --sequential-keys"
        )),
        total: keys,
        unit: "puts",
        floor: false,
        durable_floor: false,
    };
    let r = run_loadgen(bins, &server.endpoint, &w, keys)?;
    let (peak_rss, rss) = server.rss()?;
    Ok(Memory {
        server: kind.name().to_string(),
        keys,
        peak_rss,
        rss,
        data_dir_bytes: server::dir_size(&server.data_dir()),
        load_rps: r.requests_per_sec,
    })
}

fn version(cmd: &PathBuf, arg: &str) -> String {
    Command::new(cmd)
        .arg(arg)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(str::trim)
        .unwrap_or("unknown CPU");
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    format!(
        "{cpus} CPUs ({model}), {:.0} GiB RAM",
        mem as f64 / 1048576.0
    )
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bins = Binaries {
        etcd: args.etcd.clone(),
        metastore: args.metastore.clone(),
        metastore_args: words(&args.metastore_args),
        loadgen: args.loadgen.clone(),
        grpc_floor: args.grpc_floor.clone(),
    };
    let plan: Vec<Workload> = workloads()
        .into_iter()
        .filter(|w| {
            args.only.is_empty() || args.only.iter().any(|o| w.name.starts_with(o.as_str()))
        })
        .collect();
    let samples = run_rounds(&args, &bins, &plan)?;
    let memory = if args.rss_keys > 0 {
        measure_memories(&args, &bins)?
    } else {
        Vec::new()
    };
    let rows = median_rows(&plan, &samples);
    write_outputs(&args, &rows, &samples, &memory)?;
    eprintln!("wrote {}", args.out_dir.join("RESULTS.md").display());
    Ok(())
}

/// Runs every workload of `plan` against each server, `args.rounds` times, and returns one
/// sample per (round, server, workload), logging each to stderr as it completes. The floors run
/// last in each round, and only the workloads they serve.
fn run_rounds(args: &Args, bins: &Binaries, plan: &[Workload]) -> anyhow::Result<Vec<Sample>> {
    let mut samples: Vec<Sample> = Vec::new();
    for round in 0..args.rounds {
        // Alternate which server goes first, so neither always runs on a warmer machine.
        let order = if round % 2 == 0 {
            [
                Kind::Etcd,
                Kind::MetaStore,
                Kind::GrpcFloor,
                Kind::DurableFloor,
            ]
        } else {
            [
                Kind::MetaStore,
                Kind::Etcd,
                Kind::GrpcFloor,
                Kind::DurableFloor,
            ]
        };
        for kind in order {
            let mine: Vec<&Workload> = plan
                .iter()
                .filter(|w| match kind {
                    Kind::GrpcFloor => w.floor,
                    Kind::DurableFloor => w.durable_floor,
                    Kind::Etcd | Kind::MetaStore => true,
                })
                .collect();
            if mine.is_empty() {
                continue;
            }
            let server = Server::start(kind, bins)?;
            for w in mine {
                let total = ((w.total as f64 * args.scale) as u64).max(1);
                let cpu_before = server.cpu_secs()?;
                let report = run_loadgen(bins, &server.endpoint, w, total)
                    .with_context(|| format!("{} on {}", w.name, kind.name()))?;
                let server_cpu_secs = server.cpu_secs()? - cpu_before;
                eprintln!(
                    "round {} {:>9} {:<34} {:>10.0} {}/s  p50 {:.2} ms  p99 {:.2} ms  errors {}  server CPU {:.1} us/req",
                    round + 1,
                    kind.name(),
                    w.name,
                    report.requests_per_sec,
                    w.unit,
                    report.latency_ms["p50"],
                    report.latency_ms["p99"],
                    report.errors,
                    cpu_us_per_request(server_cpu_secs, report.count),
                );
                samples.push(Sample {
                    server: kind.name(),
                    workload: w.name,
                    round,
                    report,
                    server_cpu_secs,
                });
            }
        }
    }
    Ok(samples)
}

/// Peak RSS and data dir size of each server after loading `args.rss_keys` keys, logged to
/// stderr as each completes.
fn measure_memories(args: &Args, bins: &Binaries) -> anyhow::Result<Vec<Memory>> {
    let mut memory = Vec::new();
    // MetaStore with the flags under test and, unless those already choose an engine, with
    // the RocksDB engine too: the two engines keep history in very different places.
    let mut runs = vec![
        (Kind::Etcd, bins.clone(), "etcd".to_string()),
        (Kind::MetaStore, bins.clone(), "MetaStore".to_string()),
    ];
    if !args.metastore_args.contains("--storage-engine") {
        let mut rocks = bins.clone();
        rocks
            .metastore_args
            .extend(["--storage-engine".into(), "rocksdb".into()]);
        runs.push((Kind::MetaStore, rocks, "MetaStore (rocksdb)".into()));
    }
    for (kind, bins, label) in runs {
        let mut m = measure_memory(kind, &bins, args.rss_keys)?;
        m.server = label;
        eprintln!(
            "{:>19} after {} keys: peak RSS {:.0} MiB, data dir {:.0} MiB",
            m.server,
            m.keys,
            m.peak_rss as f64 / 1048576.0,
            m.data_dir_bytes as f64 / 1048576.0
        );
        memory.push(m);
    }
    Ok(memory)
}

/// Medians per (workload, server): one chart row per workload of `plan`.
fn median_rows(plan: &[Workload], samples: &[Sample]) -> Vec<charts::Row> {
    let mut rows = Vec::new();
    for w in plan {
        let pick = |server: &str| -> Vec<&Sample> {
            samples
                .iter()
                .filter(|s| s.workload == w.name && s.server == server)
                .collect()
        };
        let (e, m) = (pick("etcd"), pick("MetaStore"));
        let floor = pick(Kind::GrpcFloor.name());
        let durable = pick(Kind::DurableFloor.name());
        rows.push(charts::Row {
            floor: (!floor.is_empty()).then(|| figures(&floor)),
            durable_floor: (!durable.is_empty()).then(|| figures(&durable)),
            workload: w.name.to_string(),
            unit: w.unit,
            etcd: figures(&e),
            metastore: figures(&m),
            etcd_cdf: median_round_cdf(&e),
            metastore_cdf: median_round_cdf(&m),
        });
    }
    rows
}

/// The CDF of the median round (by throughput) of each server.
fn median_round_cdf(v: &[&Sample]) -> Vec<(f64, f64)> {
    let mut v = v.to_vec();
    v.sort_by(|a, b| {
        a.report
            .requests_per_sec
            .total_cmp(&b.report.requests_per_sec)
    });
    v.get(v.len() / 2)
        .map(|s| s.report.cdf.clone())
        .unwrap_or_default()
}

/// Trimmed stdout of `program` run with `args`; empty when it cannot run.
fn command_stdout(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// What RESULTS.md says about the run: date, machine, versions and settings.
fn run_meta(args: &Args) -> charts::Meta {
    charts::Meta {
        date: command_stdout("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        machine: machine(),
        etcd_version: version(&args.etcd, "--version"),
        metastore_version: format!(
            "{} {}",
            version(&args.metastore, "--version"),
            command_stdout("git", &["rev-parse", "--short", "HEAD"])
        ),
        metastore_args: args.metastore_args.clone(),
        rounds: args.rounds,
        scale: args.scale,
    }
}

/// Writes the charts, RESULTS.md and results.json into `args.out_dir` (created if missing).
fn write_outputs(
    args: &Args,
    rows: &[charts::Row],
    samples: &[Sample],
    memory: &[Memory],
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out_dir)?;
    charts::throughput(&args.out_dir.join("throughput.svg"), rows)?;
    charts::cdfs(&args.out_dir.join("latency-cdf.svg"), rows)?;
    let meta = run_meta(args);
    std::fs::write(
        args.out_dir.join("RESULTS.md"),
        charts::markdown(&meta, rows, memory),
    )?;
    std::fs::write(
        args.out_dir.join("results.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "samples": samples.iter().map(|s| serde_json::json!({
                "server": s.server, "workload": s.workload, "round": s.round,
                "requests_per_sec": s.report.requests_per_sec, "count": s.report.count,
                "errors": s.report.errors, "total_secs": s.report.total_secs,
                "latency_ms": s.report.latency_ms, "error_distribution": s.report.error_distribution,
            })).collect::<Vec<_>>(),
            "memory": memory,
        }))?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_per_request_is_microseconds_per_answered_request() {
        assert_eq!(cpu_us_per_request(2.0, 1_000_000), 2.0);
        assert_eq!(cpu_us_per_request(0.5, 0), 0.0);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
    }

    #[test]
    fn every_standard_workload_parses_as_loadgen_flags() {
        use metastore_loadgen::cli::Cli;
        for w in workloads() {
            let mut argv = vec!["metastore-loadgen".to_string(), "--total=1".into()];
            argv.extend(w.args.clone());
            Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{}: {e}", w.name));
        }
    }
}
