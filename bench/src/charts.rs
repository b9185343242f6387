//! The comparison's outputs: SVG charts drawn with plotters (throughput per workload, latency
//! CDFs) and the RESULTS.md table.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

/// Median figures of one workload on one server.
#[derive(Serialize, Clone, Debug, Default)]
pub struct Figures {
    /// Requests (or events) per second.
    pub rps: f64,
    /// Median latency, ms.
    pub p50: f64,
    /// 99th percentile latency, ms.
    pub p99: f64,
    /// Failed requests over all rounds.
    pub errors: u64,
    /// Server CPU time (user + system, from `/proc/<pid>/stat`) per request, microseconds.
    pub cpu_us: f64,
}

/// One workload's comparison.
pub struct Row {
    /// Workload name.
    pub workload: String,
    /// What one request is (puts, ranges, events...).
    pub unit: &'static str,
    /// etcd's medians.
    pub etcd: Figures,
    /// MetaStore's medians.
    pub metastore: Figures,
    /// etcd's latency CDF `(percentile, ms)` in its median round.
    pub etcd_cdf: Vec<(f64, f64)>,
    /// MetaStore's latency CDF in its median round.
    pub metastore_cdf: Vec<(f64, f64)>,
    /// The gRPC floor's medians (`metastore-grpc-floor`), for the workloads it serves.
    pub floor: Option<Figures>,
    /// The durable floor's medians (`metastore-grpc-floor --wal-dir`), for the put workloads
    /// and the watch fan-out.
    pub durable_floor: Option<Figures>,
}

impl Row {
    /// MetaStore's throughput over etcd's.
    pub fn ratio(&self) -> f64 {
        if self.etcd.rps > 0.0 {
            self.metastore.rps / self.etcd.rps
        } else {
            0.0
        }
    }
}

/// Memory of one server after loading keys.
#[derive(Serialize, Clone, Debug)]
pub struct Memory {
    /// Server name (and engine, for MetaStore's second run).
    pub server: String,
    /// Keys loaded.
    pub keys: u64,
    /// Peak resident set size (VmHWM), bytes.
    pub peak_rss: u64,
    /// Resident set size at the end (VmRSS), bytes.
    pub rss: u64,
    /// Data dir size, bytes.
    pub data_dir_bytes: u64,
    /// Put throughput of the load, puts/s.
    pub load_rps: f64,
}

/// Run metadata for the header.
pub struct Meta {
    /// When it ran.
    pub date: String,
    /// CPUs and memory.
    pub machine: String,
    /// `etcd --version`'s first line.
    pub etcd_version: String,
    /// MetaStore's version and git commit.
    pub metastore_version: String,
    /// Extra MetaStore flags.
    pub metastore_args: String,
    /// Rounds.
    pub rounds: usize,
    /// Request-count multiplier.
    pub scale: f64,
}

const ETCD_COLOR: RGBColor = RGBColor(0x41, 0x9e, 0xda);
const METASTORE_COLOR: RGBColor = RGBColor(0xe0, 0x6c, 0x2c);

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing chart: {e:?}")
}

/// Grouped bars: throughput of each server per workload, with MetaStore's ratio over etcd.
pub fn throughput(path: &Path, rows: &[Row]) -> anyhow::Result<()> {
    let height = 120 + 60 * rows.len() as u32;
    let root = SVGBackend::new(path, (960, height)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let max = rows
        .iter()
        .flat_map(|r| [r.etcd.rps, r.metastore.rps])
        .fold(1.0, f64::max);
    let n = rows.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Throughput (median of rounds), requests/s",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(260)
        .build_cartesian_2d(0.0..max * 1.25, 0.0..n)
        .map_err(plot_err)?;
    let names: Vec<String> = rows.iter().map(|r| r.workload.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(rows.len() * 2 + 1)
        .y_label_formatter(&|y| {
            // Label each band at its centre.
            let i = (n - y - 0.5).round();
            if (n - y - 0.5 - i).abs() < 0.01 && i >= 0.0 && (i as usize) < names.len() {
                names[i as usize].clone()
            } else {
                String::new()
            }
        })
        .x_desc("requests/s")
        .x_label_formatter(&|v| format!("{:.0}k", v / 1000.0))
        .draw()
        .map_err(plot_err)?;
    for (i, r) in rows.iter().enumerate() {
        let top = n - i as f64;
        for (k, (v, color, label)) in [
            (r.etcd.rps, ETCD_COLOR, "etcd"),
            (r.metastore.rps, METASTORE_COLOR, "MetaStore"),
        ]
        .into_iter()
        .enumerate()
        {
            let y0 = top - 0.1 - 0.4 * k as f64;
            let bar = chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(0.0, y0 - 0.35), (v, y0)],
                    color.filled(),
                )))
                .map_err(plot_err)?;
            if i == 0 {
                bar.label(label).legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 14, y + 5)], color.filled())
                });
            }
        }
        chart
            .draw_series(std::iter::once(Text::new(
                format!("{:.2}x", r.ratio()),
                (r.etcd.rps.max(r.metastore.rps) + max * 0.02, top - 0.45),
                ("sans-serif", 15),
            )))
            .map_err(plot_err)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

/// One latency-CDF panel per workload: percentile against latency (log scale), both servers.
pub fn cdfs(path: &Path, rows: &[Row]) -> anyhow::Result<()> {
    let cols = 2;
    let panels = rows.len().max(1);
    let lines = panels.div_ceil(cols) as u32;
    let root = SVGBackend::new(path, (1000, 300 * lines)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let areas = root.split_evenly((lines as usize, cols));
    for (r, area) in rows.iter().zip(areas) {
        let all = r.etcd_cdf.iter().chain(&r.metastore_cdf).map(|p| p.1);
        let lo = all
            .clone()
            .filter(|v| *v > 0.0)
            .fold(f64::MAX, f64::min)
            .min(1.0)
            * 0.8;
        let hi = all.fold(0.0, f64::max).max(lo * 10.0) * 1.2;
        let mut chart = ChartBuilder::on(&area)
            .caption(&r.workload, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(32)
            .y_label_area_size(44)
            .build_cartesian_2d((lo..hi).log_scale(), 0.0..100.0)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("latency, ms (log)")
            .y_desc("percentile")
            .x_label_formatter(&|v| format!("{v}"))
            .draw()
            .map_err(plot_err)?;
        for (cdf, color, label) in [
            (&r.etcd_cdf, ETCD_COLOR, "etcd"),
            (&r.metastore_cdf, METASTORE_COLOR, "MetaStore"),
        ] {
            chart
                .draw_series(LineSeries::new(
                    cdf.iter().map(|(p, ms)| (ms.max(lo), *p)),
                    color.stroke_width(2),
                ))
                .map_err(plot_err)?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(plot_err)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

impl Row {
    /// The CPU goal: a third of etcd's server CPU per request, microseconds.
    pub fn cpu_goal_us(&self) -> f64 {
        self.etcd.cpu_us / 3.0
    }

    /// The floor under this workload: the durable floor where it was measured (a put, the
    /// watch fan-out), else the gRPC floor, with its name; `None` when neither was measured.
    pub fn nearest_floor(&self) -> Option<(&'static str, &Figures)> {
        match (&self.durable_floor, &self.floor) {
            (Some(d), _) => Some(("durable floor", d)),
            (None, Some(f)) => Some(("gRPC floor", f)),
            (None, None) => None,
        }
    }

    /// Whether the floor under this workload ([`Row::nearest_floor`]) alone costs more per
    /// request than the CPU goal allows (false when no floor was measured).
    pub fn goal_below_floor(&self) -> bool {
        self.nearest_floor()
            .is_some_and(|(_, f)| f.cpu_us > self.cpu_goal_us())
    }

    /// The goals of this row ([`goals`]) that MetaStore misses and the floor under it
    /// ([`Row::nearest_floor`]) misses as well, each with the goal and the floor's figure.
    pub fn goals_beyond_floor(&self) -> Vec<String> {
        let Some((floor, f)) = self.nearest_floor() else {
            return Vec::new();
        };
        let (w, e, m) = (&self.workload, &self.etcd, &self.metastore);
        let mut out = Vec::new();
        if self.goal_below_floor() {
            out.push(format!(
                "{w}: the goal is {:.1} us per request; the {floor} costs {:.1}",
                self.cpu_goal_us(),
                f.cpu_us
            ));
        }
        if w.starts_with("put, 1 client") && !lone_p50_met(m, e) && !lone_p50_met(f, e) {
            out.push(format!(
                "{w}: the goal is a p50 of at most {:.2} ms; the {floor}'s is {:.2} ms",
                e.p50 * 2.0 / 3.0,
                f.p50
            ));
        }
        if w.contains("00 clients") && !throughput_met(m, e) && !throughput_met(f, e) {
            out.push(format!(
                "{w}: the goal is {:.0} {}/s or more with a p99 under {:.2} ms; the {floor} \
                 does {:.0} with a p99 of {:.2} ms",
                2.0 * e.rps,
                self.unit,
                e.p99,
                f.rps,
                f.p99
            ));
        }
        if w.starts_with("watch") && !watch_p50_met(m, e) && !watch_p50_met(f, e) {
            out.push(format!(
                "{w}: the goal is an event p50 of at most {:.2} ms; the {floor}'s is {:.2} ms",
                e.p50, f.p50
            ));
        }
        out
    }

    /// etcd's server CPU per request over MetaStore's (above 1: MetaStore spends less).
    pub fn cpu_ratio(&self) -> f64 {
        if self.metastore.cpu_us > 0.0 {
            self.etcd.cpu_us / self.metastore.cpu_us
        } else {
            0.0
        }
    }
}

/// Issue 17's latency goal for a lone client's put: a p50 at most two thirds of etcd's.
fn lone_p50_met(x: &Figures, etcd: &Figures) -> bool {
    x.p50 <= etcd.p50 * 2.0 / 3.0
}

/// Issue 17's throughput goal at 100 or more clients: 2x etcd's, with a lower p99.
fn throughput_met(x: &Figures, etcd: &Figures) -> bool {
    x.rps >= 2.0 * etcd.rps && x.p99 < etcd.p99
}

/// Issue 17's watch latency goal: an event p50 no worse than etcd's.
fn watch_p50_met(x: &Figures, etcd: &Figures) -> bool {
    x.p50 <= etcd.p50
}

/// Issue 17's goals, checked against the medians: `(goal, met)`, `None` when this run did not
/// measure it.
///
/// - every workload: server CPU per request at most a third of etcd's;
/// - put with 1 client: p50 at most two thirds of etcd's;
/// - every workload with 100 or more clients: at least 2x etcd's throughput, with a lower p99
///   (the watch row is excluded: its throughput is the fixed put rate times the watchers);
/// - watch fan-out: event p50 no worse than etcd's;
/// - peak RSS after loading the keys no higher than etcd's, for each MetaStore engine.
pub fn goals(rows: &[Row], memory: &[Memory]) -> Vec<(String, Option<bool>)> {
    let find = |name: &str| rows.iter().find(|r| r.workload.starts_with(name));
    let mut out = Vec::new();
    for r in rows {
        out.push((
            format!(
                "{}: server CPU per request at most a third of etcd's",
                r.workload
            ),
            Some(r.cpu_ratio() >= 3.0),
        ));
    }
    out.push((
        "put, 1 client: p50 latency at most two thirds of etcd's".into(),
        find("put, 1 client").map(|r| lone_p50_met(&r.metastore, &r.etcd)),
    ));
    let many_clients = |r: &&Row| r.workload.contains("00 clients");
    for r in rows.iter().filter(many_clients) {
        out.push((
            format!(
                "{}: 2x etcd's throughput or more, with a lower p99",
                r.workload
            ),
            Some(throughput_met(&r.metastore, &r.etcd)),
        ));
    }
    out.push((
        "watch fan-out: event p50 no worse than etcd's".into(),
        find("watch").map(|r| watch_p50_met(&r.metastore, &r.etcd)),
    ));
    let e = memory.iter().find(|m| m.server == "etcd");
    for m in memory.iter().filter(|m| m.server.starts_with("MetaStore")) {
        out.push((
            format!(
                "peak RSS after the key load no higher than etcd's, {}",
                m.server
            ),
            e.map(|e| m.peak_rss <= e.peak_rss),
        ));
    }
    if e.is_none() {
        out.push((
            "peak RSS after the key load no higher than etcd's".into(),
            None,
        ));
    }
    out
}

/// RESULTS.md.
pub fn markdown(meta: &Meta, rows: &[Row], memory: &[Memory]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# MetaStore vs etcd: side-by-side results\n");
    let _ = writeln!(
        s,
        "Generated by `bench/compare.sh` (see bench/README.md); do not edit by hand. Each figure \
         is the median of {} rounds; in each round both servers ran the same workloads one after \
         the other (alternating which went first), single-member on loopback, fsync on, each \
         with a fresh data dir, driven by `metastore-loadgen`.\n",
        meta.rounds
    );
    let _ = writeln!(s, "- Date: {}", meta.date);
    let _ = writeln!(s, "- Machine: {}", meta.machine);
    let _ = writeln!(s, "- etcd: {}", meta.etcd_version);
    let _ = writeln!(s, "- MetaStore: {}", meta.metastore_version);
    if !meta.metastore_args.is_empty() {
        let _ = writeln!(s, "- MetaStore flags: `{}`", meta.metastore_args);
    }
    if (meta.scale - 1.0).abs() > f64::EPSILON {
        let _ = writeln!(s, "- Request counts scaled by {}", meta.scale);
    }
    let _ = writeln!(s, "\n## Throughput and latency\n");
    let _ = writeln!(
        s,
        "| workload | etcd req/s | MetaStore req/s | ratio | etcd p50 / p99 ms | MetaStore p50 / p99 ms |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|");
    for r in rows {
        let errs = |f: &Figures| {
            if f.errors > 0 {
                format!(" ({} errors)", f.errors)
            } else {
                String::new()
            }
        };
        let _ = writeln!(
            s,
            "| {} ({}) | {:.0}{} | {:.0}{} | {:.2}x | {:.2} / {:.2} | {:.2} / {:.2} |",
            r.workload,
            r.unit,
            r.etcd.rps,
            errs(&r.etcd),
            r.metastore.rps,
            errs(&r.metastore),
            r.ratio(),
            r.etcd.p50,
            r.etcd.p99,
            r.metastore.p50,
            r.metastore.p99
        );
    }
    let _ = writeln!(
        s,
        "\nThe watch row counts delivered events per second at a fixed put rate, so its \
         throughput is set by the load; compare its latencies.\n"
    );
    cpu_table(&mut s, rows);
    floor_table(&mut s, rows);
    let _ = writeln!(s, "![throughput](throughput.svg)\n");
    let _ = writeln!(s, "![latency CDFs](latency-cdf.svg)\n");
    if !memory.is_empty() {
        let _ = writeln!(
            s,
            "## Memory after loading keys (256-byte values, 8-byte keys)\n"
        );
        let _ = writeln!(
            s,
            "| server | keys | peak RSS MiB | RSS at end MiB | data dir MiB | load puts/s |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|");
        for m in memory {
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} |",
                m.server,
                m.keys,
                mib(m.peak_rss),
                mib(m.rss),
                mib(m.data_dir_bytes),
                m.load_rps
            );
        }
        s.push('\n');
    }
    let _ = writeln!(s, "## Goals (issue 17)\n");
    for (goal, met) in goals(rows, memory) {
        let verdict = match met {
            Some(true) => "met",
            Some(false) => "**not met**",
            None => "not measured in this run",
        };
        let _ = writeln!(s, "- {goal}: {verdict}");
    }
    let beyond: Vec<String> = rows.iter().flat_map(Row::goals_beyond_floor).collect();
    if !beyond.is_empty() {
        let _ = writeln!(
            s,
            "\nGoals that no server on MetaStore's gRPC stack can meet here, because the floor \
             under them misses them too: the stack alone, doing no work, or, for a put and the \
             watch fan-out, doing only what makes a put durable and delivers its events (see \
             \"The gRPC floor\"):\n"
        );
        for line in beyond {
            let _ = writeln!(s, "- {line}");
        }
    }
    let _ = writeln!(
        s,
        "\nWhere the time goes, and what the shortfalls come from: bench/README.md."
    );
    s
}

/// The floor table of RESULTS.md: what the gRPC stack alone costs per request, and with each
/// put made durable, against the CPU goal and MetaStore. Nothing when no row measured a floor.
fn floor_table(s: &mut String, rows: &[Row]) {
    let measured: Vec<(&Row, f64)> = rows
        .iter()
        .filter_map(|r| r.nearest_floor().map(|(_, f)| (r, f.cpu_us)))
        .collect();
    if measured.is_empty() {
        return;
    }
    let _ = writeln!(s, "## The gRPC floor\n");
    let _ = writeln!(
        s,
        "`metastore-grpc-floor` serves MetaStore's KV service on the same stack (tonic, hyper, \
         h2, prost, tokio), with one current-thread runtime per CPU, but a Put or a Range does \
         no work: nothing is replicated, stored or fsynced. Its CPU per request is the least \
         any server on this stack spends here.\n\n\
         The durable floor (`metastore-grpc-floor --wal-dir`) answers a Put only once its \
         request is in a file, made durable by `fdatasync`: group-committed, one write and one \
         sync for every Put queued meanwhile, run on the thread of the Put that leads it, and \
         under load held a millisecond for more Puts to join. For the watch fan-out it also \
         hands each Put's event, built once, to every watch stream, which sends it to each of \
         its watchers on that key. Nothing is replicated, indexed or stored. Its CPU per \
         request is the least any server on this stack spends for a put it may not lose, and \
         for an event of such a put. The goal column is a third of etcd's CPU; the last column \
         is MetaStore above the durable floor where it was measured, else above the gRPC \
         floor.\n"
    );
    let _ = writeln!(
        s,
        "| workload | gRPC floor req/s | gRPC floor CPU us/req | durable floor req/s | durable floor CPU us/req | goal CPU us/req | MetaStore CPU us/req | MetaStore above the floor |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|");
    let cells = |f: &Option<Figures>| match f {
        Some(f) => (format!("{:.0}", f.rps), format!("{:.1}", f.cpu_us)),
        None => ("-".into(), "-".into()),
    };
    for (r, floor_cpu) in measured {
        let (grpc_rps, grpc_cpu) = cells(&r.floor);
        let (durable_rps, durable_cpu) = cells(&r.durable_floor);
        let _ = writeln!(
            s,
            "| {} ({}) | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} |",
            r.workload,
            r.unit,
            grpc_rps,
            grpc_cpu,
            durable_rps,
            durable_cpu,
            r.cpu_goal_us(),
            r.metastore.cpu_us,
            r.metastore.cpu_us - floor_cpu
        );
    }
    let _ = writeln!(s);
}

/// The server-CPU-per-request table of RESULTS.md.
fn cpu_table(s: &mut String, rows: &[Row]) {
    let _ = writeln!(s, "## Server CPU per request\n");
    let _ = writeln!(
        s,
        "User + system CPU of the server process during the workload (`/proc/<pid>/stat`), \
         divided by the requests it answered: the headline figure, since on a small machine \
         the load generator's own CPU caps any throughput ratio. The ratio is etcd's over \
         MetaStore's (above 1: MetaStore spends less).\n"
    );
    let _ = writeln!(
        s,
        "| workload | etcd CPU us/req | MetaStore CPU us/req | etcd / MetaStore |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|");
    for r in rows {
        let ratio = if r.metastore.cpu_us > 0.0 {
            format!("{:.2}x", r.etcd.cpu_us / r.metastore.cpu_us)
        } else {
            "-".to_string()
        };
        let _ = writeln!(
            s,
            "| {} ({}) | {:.1} | {:.1} | {} |",
            r.workload, r.unit, r.etcd.cpu_us, r.metastore.cpu_us, ratio
        );
    }
    let _ = writeln!(s);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Medians with no errors.
    fn figures(rps: f64, p50: f64, p99: f64, cpu_us: f64) -> Figures {
        Figures {
            rps,
            p50,
            p99,
            errors: 0,
            cpu_us,
        }
    }

    fn row(name: &str, e: (f64, f64), m: (f64, f64)) -> Row {
        let f = |(rps, p99)| Figures {
            rps,
            p50: p99 / 2.0,
            p99,
            errors: 0,
            cpu_us: 100.0 / rps,
        };
        Row {
            workload: name.into(),
            unit: "puts",
            etcd: f(e),
            metastore: f(m),
            etcd_cdf: vec![(0.0, 0.1), (50.0, 1.0), (100.0, 9.0)],
            metastore_cdf: vec![(0.0, 0.2), (50.0, 0.5), (100.0, 4.0)],
            floor: None,
            durable_floor: None,
        }
    }

    #[test]
    fn goals_are_issue_17s() {
        let rows = [
            row("put, 1 client", (1000.0, 10.0), (1200.0, 6.0)),
            row("put, 100 clients", (1000.0, 10.0), (3500.0, 9.0)),
            row("put, 1000 clients", (1000.0, 10.0), (3500.0, 11.0)),
            row(
                "range serializable, 100 clients",
                (1000.0, 1.0),
                (1900.0, 1.0),
            ),
        ];
        let g = goals(&rows, &[]);
        let verdict = |goal: &str| {
            g.iter()
                .find(|(name, _)| name == goal)
                .unwrap_or_else(|| panic!("no goal {goal:?} in {g:?}"))
                .1
        };
        // `row` makes CPU per request 100 / rps: 1.2x, 3.5x, 3.5x, 1.9x.
        let cpu = |w: &str| format!("{w}: server CPU per request at most a third of etcd's");
        assert_eq!(verdict(&cpu("put, 1 client")), Some(false));
        assert_eq!(verdict(&cpu("put, 100 clients")), Some(true));
        // p50 is half the p99: 3.0 against 5.0 is at most two thirds.
        let p50 = "put, 1 client: p50 latency at most two thirds of etcd's";
        assert_eq!(verdict(p50), Some(true));
        let tput = |w: &str| format!("{w}: 2x etcd's throughput or more, with a lower p99");
        assert_eq!(verdict(&tput("put, 100 clients")), Some(true));
        assert_eq!(
            verdict(&tput("put, 1000 clients")),
            Some(false),
            "p99 worse"
        );
        assert_eq!(
            verdict(&tput("range serializable, 100 clients")),
            Some(false),
            "1.9x < 2x"
        );
        assert!(!g.iter().any(|(n, _)| n == &tput("put, 1 client")));
        assert_eq!(
            verdict("watch fan-out: event p50 no worse than etcd's"),
            None
        );
        assert_eq!(
            verdict("peak RSS after the key load no higher than etcd's"),
            None
        );
    }

    #[test]
    fn charts_and_table_render() {
        let dir = tempfile::tempdir().unwrap();
        let rows = [
            row("put, 100 clients", (1000.0, 10.0), (3500.0, 9.0)),
            row(
                "range serializable, 100 clients",
                (2000.0, 1.0),
                (1900.0, 1.0),
            ),
            row("txn-put 4 ops, 100 clients", (500.0, 1.0), (1500.0, 1.0)),
        ];
        throughput(&dir.path().join("t.svg"), &rows).unwrap();
        cdfs(&dir.path().join("c.svg"), &rows).unwrap();
        let t = std::fs::read_to_string(dir.path().join("t.svg")).unwrap();
        assert!(t.contains("<svg") && t.contains("3.50x") && t.contains("MetaStore"));
        let c = std::fs::read_to_string(dir.path().join("c.svg")).unwrap();
        assert!(c.contains("<polyline") && c.contains("txn-put"));
        let md = markdown(
            &Meta {
                date: "d".into(),
                machine: "m".into(),
                etcd_version: "etcd".into(),
                metastore_version: "ms".into(),
                metastore_args: String::new(),
                rounds: 3,
                scale: 1.0,
            },
            &rows,
            &[],
        );
        assert!(
            md.contains(
                "| put, 100 clients (puts) | 1000 | 3500 | 3.50x | 5.00 / 10.00 | 4.50 / 9.00 |"
            ),
            "{md}"
        );
        assert!(
            md.contains("- put, 100 clients: 2x etcd's throughput or more, with a lower p99: met")
        );
        assert!(!md.contains("## The gRPC floor"), "no floor measured: {md}");
    }

    /// A latency or throughput goal MetaStore misses is named as beyond reach only when the
    /// floor under it misses it too.
    #[test]
    fn latency_and_throughput_goals_beyond_the_floor_are_named() {
        // MetaStore and the floor at 1 us, far under a third of etcd's 30, so that no CPU
        // goal is named.
        let etcd = |rps, p50, p99| figures(rps, p50, p99, 30.0);
        let ours = |rps, p50, p99| figures(rps, p50, p99, 1.0);
        let mut lone = row("put, 1 client", (1.0, 1.0), (1.0, 1.0));
        lone.etcd = etcd(2000.0, 0.45, 0.9);
        lone.metastore = ours(1800.0, 0.5, 0.8);
        lone.durable_floor = Some(ours(2200.0, 0.4, 0.7));
        assert_eq!(
            lone.goals_beyond_floor(),
            ["put, 1 client: the goal is a p50 of at most 0.30 ms; the durable floor's is 0.40 ms"]
        );
        let mut many = row("put, 100 clients", (1.0, 1.0), (1.0, 1.0));
        many.etcd = etcd(20000.0, 4.0, 12.0);
        many.metastore = ours(25000.0, 3.5, 8.0);
        many.durable_floor = Some(ours(26000.0, 3.4, 9.0));
        assert_eq!(
            many.goals_beyond_floor(),
            [
                "put, 100 clients: the goal is 40000 puts/s or more with a p99 under 12.00 ms; \
              the durable floor does 26000 with a p99 of 9.00 ms"
            ]
        );
        // A floor that would meet it: MetaStore's shortfall is its own.
        many.durable_floor = Some(ours(45000.0, 2.0, 5.0));
        assert!(many.goals_beyond_floor().is_empty());
        let mut watch = row("watch fan-out, 1000 watchers", (1.0, 1.0), (1.0, 1.0));
        watch.etcd = etcd(100000.0, 1.5, 10.0);
        watch.metastore = ours(100000.0, 1.6, 3.0);
        watch.durable_floor = Some(ours(100000.0, 2.0, 12.0));
        assert_eq!(
            watch.goals_beyond_floor(),
            [
                "watch fan-out, 1000 watchers: the goal is an event p50 of at most 1.50 ms; \
              the durable floor's is 2.00 ms"
            ]
        );
    }

    /// The floor table sets the floors against the goal (a third of etcd's CPU) and MetaStore,
    /// and a CPU goal the floor under it alone exceeds (the durable one for a put) is named
    /// under the goals.
    #[test]
    fn the_grpc_floor_is_set_against_the_goal() {
        let floor = |rps, cpu_us| figures(rps, 0.1, 0.2, cpu_us);
        // `row` makes CPU per request 100 / rps: etcd 100 us (goal 33.3), MetaStore 50.
        let mut above = row("put, 1000 clients", (1.0, 10.0), (2.0, 9.0));
        above.floor = Some(floor(4000.0, 40.0));
        // etcd 200 us (goal 66.7), MetaStore 25, the floor 10.
        let mut under = row("range serializable, 100 clients", (0.5, 1.0), (4.0, 1.0));
        under.floor = Some(floor(9000.0, 10.0));
        // etcd 100 us (goal 33.3), MetaStore 50; the gRPC floor 20 is under the goal, the
        // durable floor 45 above it.
        let mut durable = row("put, 100 clients", (1.0, 10.0), (2.0, 9.0));
        durable.floor = Some(floor(8000.0, 20.0));
        durable.durable_floor = Some(floor(5000.0, 45.0));
        // The watch fan-out has a durable floor only.
        let mut watch = row("watch fan-out, 1000 watchers", (1.0, 10.0), (2.0, 9.0));
        watch.durable_floor = Some(floor(1000.0, 20.0));
        assert!(above.goal_below_floor());
        assert!(!under.goal_below_floor());
        assert!(durable.goal_below_floor());
        assert!(!watch.goal_below_floor());
        let meta = Meta {
            date: "d".into(),
            machine: "m".into(),
            etcd_version: "etcd".into(),
            metastore_version: "ms".into(),
            metastore_args: String::new(),
            rounds: 1,
            scale: 1.0,
        };
        let md = markdown(&meta, &[above, under, durable, watch], &[]);
        assert!(md.contains("## The gRPC floor"), "{md}");
        assert!(
            md.contains("| put, 1000 clients (puts) | 4000 | 40.0 | - | - | 33.3 | 50.0 | 10.0 |"),
            "{md}"
        );
        // MetaStore is set against the durable floor where there is one.
        assert!(
            md.contains(
                "| put, 100 clients (puts) | 8000 | 20.0 | 5000 | 45.0 | 33.3 | 50.0 | 5.0 |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| watch fan-out, 1000 watchers (puts) | - | - | 1000 | 20.0 | 33.3 | 50.0 | 30.0 |"),
            "{md}"
        );
        let named =
            "- put, 1000 clients: the goal is 33.3 us per request; the gRPC floor costs 40.0";
        assert!(md.contains(named), "{md}");
        let named =
            "- put, 100 clients: the goal is 33.3 us per request; the durable floor costs 45.0";
        assert!(md.contains(named), "{md}");
        // Its throughput goal (2 puts/s, p99 under 10 ms) the durable floor meets: not named.
        assert!(
            !md.contains("put, 100 clients: the goal is 2 puts/s"),
            "{md}"
        );
        assert!(
            !md.contains("- range serializable, 100 clients: the goal is"),
            "{md}"
        );
    }
}
