//! Latency recording and the report: per-client recorders merged into one summary, printed in
//! the layout of etcd's `benchmark` tool (`tools/benchmark/cmd/util.go` and `pkg/report` in the
//! etcd repository), as JSON, or as a per-second CSV.
//!
//! Latencies are kept in nanoseconds. Percentiles come from an HDR histogram of microseconds with
//! 3 significant digits (an error of at most 0.1%, reported as the low end of the bucket so an
//! exactly recorded value reads back exactly); the count, fastest, slowest, mean and standard
//! deviation are exact.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// The percentiles etcd's benchmark prints under "Latency distribution".
pub const PERCENTILES: [f64; 8] = [10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.9];

/// Latency statistics of one stream of requests: exact moments plus an HDR histogram.
#[derive(Clone, Debug)]
pub struct Stats {
    hist: Histogram<u64>,
    count: u64,
    sum_ns: u128,
    sum_sq_ns: f64,
    min_ns: u64,
    max_ns: u64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            // Auto-resizing, so any latency fits; 3 significant digits.
            hist: Histogram::new(3).expect("3 significant digits is a valid histogram"),
            count: 0,
            sum_ns: 0,
            sum_sq_ns: 0.0,
            min_ns: u64::MAX,
            max_ns: 0,
        }
    }
}

impl Stats {
    /// Records one successful request's latency.
    pub fn record(&mut self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX).max(1);
        let us = (ns / 1_000).max(1);
        // `record` grows the histogram as needed; it only fails past u64 range.
        if self.hist.record(us).is_err() {
            self.hist.saturating_record(us);
        }
        self.count += 1;
        self.sum_ns += u128::from(ns);
        self.sum_sq_ns += (ns as f64) * (ns as f64);
        self.min_ns = self.min_ns.min(ns);
        self.max_ns = self.max_ns.max(ns);
    }

    /// Adds another client's statistics to these.
    pub fn merge(&mut self, other: &Stats) {
        if other.count == 0 {
            return;
        }
        self.hist
            .add(&other.hist)
            .expect("auto-resizing histograms always merge");
        self.count += other.count;
        self.sum_ns += other.sum_ns;
        self.sum_sq_ns += other.sum_sq_ns;
        self.min_ns = self.min_ns.min(other.min_ns);
        self.max_ns = self.max_ns.max(other.max_ns);
    }

    /// Number of latencies recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The latency at `pct` percent (0..=100), in ms; 0 when empty.
    pub fn percentile_ms(&self, pct: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let us = self
            .hist
            .lowest_equivalent(self.hist.value_at_percentile(pct));
        // The histogram is in µs; the exact extremes bound it.
        ns_to_ms((us * 1_000).clamp(self.min_ns, self.max_ns))
    }

    /// Summarises these latencies over `elapsed` of wall-clock time.
    pub fn summary(&self, elapsed: Duration) -> Summary {
        let n = self.count as f64;
        let (mean, stddev) = if self.count == 0 {
            (0.0, 0.0)
        } else {
            let mean = self.sum_ns as f64 / n;
            // Population variance, as etcd's report computes it.
            let var = (self.sum_sq_ns / n - mean * mean).max(0.0);
            (mean, var.sqrt())
        };
        let secs = elapsed.as_secs_f64();
        Summary {
            count: self.count,
            fastest_ms: if self.count == 0 {
                0.0
            } else {
                ns_to_ms(self.min_ns)
            },
            slowest_ms: ns_to_ms(self.max_ns),
            average_ms: mean / 1e6,
            stddev_ms: stddev / 1e6,
            requests_per_sec: if secs > 0.0 { n / secs } else { 0.0 },
            latency_ms: PERCENTILES
                .iter()
                .map(|&p| (percentile_label(p), self.percentile_ms(p)))
                .collect(),
        }
    }

    /// Points of the latency CDF, `(percentile, ms)`, for plotting: 0..99 in steps of 1, then
    /// 99.1..99.9 and 99.99, 99.999 and 100.
    pub fn cdf(&self) -> Vec<(f64, f64)> {
        if self.count == 0 {
            return Vec::new();
        }
        let mut pcts: Vec<f64> = (0..100).map(f64::from).collect();
        pcts.extend((1..10).map(|i| 99.0 + f64::from(i) / 10.0));
        pcts.extend([99.99, 99.999, 100.0]);
        pcts.into_iter()
            .map(|p| (p, self.percentile_ms(p)))
            .collect()
    }

    /// etcd's "Response time histogram": ten equal-width buckets from fastest to slowest, each
    /// `(upper bound ms, count)`.
    pub fn buckets(&self) -> Vec<(f64, u64)> {
        if self.count == 0 {
            return Vec::new();
        }
        let (lo, hi) = (self.min_ns, self.max_ns.max(self.min_ns + 1));
        let width = (hi - lo) as f64 / 10.0;
        let mut out: Vec<(f64, u64)> = (0..=10)
            .map(|i| (ns_to_ms(lo) + width * f64::from(i) / 1e6, 0))
            .collect();
        for v in self.hist.iter_recorded() {
            let x = (self.hist.lowest_equivalent(v.value_iterated_to()) * 1_000).clamp(lo, hi);
            let idx = (((x.saturating_sub(lo)) as f64 / width).ceil() as usize).min(10);
            out[idx].1 += v.count_at_value();
        }
        out
    }
}

fn ns_to_ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// `"p99.9"` for 99.9, `"p50"` for 50.
pub fn percentile_label(p: f64) -> String {
    format!("p{p}")
}

/// The summary of one stream of requests, in milliseconds.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// Successful requests.
    pub count: u64,
    /// Fastest request, ms.
    pub fastest_ms: f64,
    /// Slowest request, ms.
    pub slowest_ms: f64,
    /// Mean latency, ms.
    pub average_ms: f64,
    /// Standard deviation of latency, ms.
    pub stddev_ms: f64,
    /// Successful requests per second of wall-clock time.
    pub requests_per_sec: f64,
    /// Latency at each of [`PERCENTILES`], keyed `"p10"` .. `"p99.9"`, ms.
    pub latency_ms: BTreeMap<String, f64>,
}

/// One client's (or one stream's) record of a run.
#[derive(Default, Debug)]
pub struct Recorder {
    /// Latencies of successful requests.
    pub stats: Stats,
    /// Latencies by sub-operation (e.g. `read`/`write` in `txn-mixed`, `put` in `watch`).
    pub breakdown: BTreeMap<&'static str, Stats>,
    /// Failed requests by error text (gRPC code and message).
    pub errors: BTreeMap<String, u64>,
    /// Named event counts (e.g. `retries` in `stm`).
    pub counters: BTreeMap<&'static str, u64>,
    /// `(second since start, latency ns, failed)` of every request, kept only with `--sample`.
    pub samples: Option<Vec<(u32, u64, bool)>>,
}

impl Recorder {
    /// A recorder that also keeps per-request samples when `sample` is set.
    pub fn new(sample: bool) -> Self {
        Recorder {
            samples: sample.then(Vec::new),
            ..Default::default()
        }
    }

    /// Records a success with its latency, `at` time since the run started.
    pub fn success(&mut self, at: Duration, latency: Duration) {
        self.stats.record(latency);
        if let Some(s) = &mut self.samples {
            s.push((at.as_secs() as u32, latency.as_nanos() as u64, false));
        }
    }

    /// Records a failure under its error text.
    pub fn failure(&mut self, at: Duration, error: String) {
        *self.errors.entry(error).or_default() += 1;
        if let Some(s) = &mut self.samples {
            s.push((at.as_secs() as u32, 0, true));
        }
    }

    /// Records a sub-operation's latency under `label`.
    pub fn sub(&mut self, label: &'static str, latency: Duration) {
        self.breakdown.entry(label).or_default().record(latency);
    }

    /// Adds `n` to counter `name`.
    pub fn count(&mut self, name: &'static str, n: u64) {
        *self.counters.entry(name).or_default() += n;
    }

    /// Adds another recorder into this one.
    pub fn merge(&mut self, other: Recorder) {
        self.stats.merge(&other.stats);
        for (k, v) in &other.breakdown {
            self.breakdown.entry(k).or_default().merge(v);
        }
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        for (k, v) in other.counters {
            *self.counters.entry(k).or_default() += v;
        }
        if let (Some(mine), Some(theirs)) = (&mut self.samples, other.samples) {
            mine.extend(theirs);
        }
    }
}

/// One row of the per-second CSV (`--sample`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SampleRow {
    /// Second since the start of the run (0-based).
    pub second: u32,
    /// Successful requests completed in this second.
    pub requests: u64,
    /// Failed requests completed in this second.
    pub errors: u64,
    /// Mean latency of this second's successes, ms.
    pub avg_ms: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// Slowest request, ms.
    pub max_ms: f64,
}

/// Buckets per-request samples into per-second rows, including empty seconds up to the last
/// one seen.
pub fn per_second(samples: &[(u32, u64, bool)]) -> Vec<SampleRow> {
    let Some(last) = samples.iter().map(|s| s.0).max() else {
        return Vec::new();
    };
    let mut secs: Vec<(Stats, u64)> = (0..=last).map(|_| (Stats::default(), 0)).collect();
    for &(sec, ns, failed) in samples {
        let slot = &mut secs[sec as usize];
        if failed {
            slot.1 += 1;
        } else {
            slot.0.record(Duration::from_nanos(ns));
        }
    }
    secs.into_iter()
        .enumerate()
        .map(|(i, (stats, errors))| {
            let s = stats.summary(Duration::from_secs(1));
            SampleRow {
                second: i as u32,
                requests: stats.count(),
                errors,
                avg_ms: s.average_ms,
                p50_ms: stats.percentile_ms(50.0),
                p99_ms: stats.percentile_ms(99.0),
                max_ms: s.slowest_ms,
            }
        })
        .collect()
}

/// The whole result of a run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The subcommand that ran (`put`, `range`, ...).
    pub workload: String,
    /// Wall-clock time of the measured phase, s.
    pub total_secs: f64,
    /// Whether the run was interrupted (Ctrl-C) before it finished.
    pub interrupted: bool,
    /// Failed requests.
    pub errors: u64,
    /// The main summary.
    #[serde(flatten)]
    pub summary: Summary,
    /// Failed requests by error text.
    pub error_distribution: BTreeMap<String, u64>,
    /// Summaries of sub-operations.
    pub breakdown: BTreeMap<String, Summary>,
    /// Named event counts.
    pub counters: BTreeMap<String, u64>,
    /// The latency CDF, `(percentile, ms)`.
    pub cdf: Vec<(f64, f64)>,
    /// The response-time histogram, `(upper bound ms, count)`.
    #[serde(skip)]
    pub buckets: Vec<(f64, u64)>,
    /// Per-second rows, when sampling.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub samples: Option<Vec<SampleRow>>,
}

impl Report {
    /// Builds the report from the merged recorder of a run that took `elapsed`.
    pub fn new(workload: &str, rec: Recorder, elapsed: Duration, interrupted: bool) -> Report {
        Report {
            workload: workload.to_string(),
            total_secs: elapsed.as_secs_f64(),
            interrupted,
            errors: rec.errors.values().sum(),
            summary: rec.stats.summary(elapsed),
            error_distribution: rec.errors,
            breakdown: rec
                .breakdown
                .iter()
                .map(|(k, v)| (k.to_string(), v.summary(elapsed)))
                .collect(),
            counters: rec
                .counters
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            cdf: rec.stats.cdf(),
            buckets: rec.stats.buckets(),
            samples: rec.samples.as_deref().map(per_second),
        }
    }

    /// The text report in etcd benchmark's layout (seconds, 4 decimals).
    pub fn text(&self) -> String {
        let mut out = String::new();
        if self.interrupted {
            out.push_str("Interrupted: partial results.\n\n");
        }
        write_summary(&mut out, "Summary", &self.summary, self.total_secs);
        if !self.buckets.is_empty() {
            out.push_str("\nResponse time histogram:\n");
            let max = self.buckets.iter().map(|b| b.1).max().unwrap_or(1).max(1);
            for (upper, n) in &self.buckets {
                let bar = "∎".repeat((n * 40 / max) as usize);
                let _ = writeln!(out, "  {:.4} [{n}]\t|{bar}", upper / 1e3);
            }
        }
        write_distribution(&mut out, &self.summary);
        for (name, s) in &self.breakdown {
            out.push('\n');
            write_summary(&mut out, &format!("{name} summary"), s, self.total_secs);
            write_distribution(&mut out, s);
        }
        if !self.counters.is_empty() {
            out.push_str("\nCounters:\n");
            for (k, v) in &self.counters {
                let _ = writeln!(out, "  {k}:\t{v}");
            }
        }
        if !self.error_distribution.is_empty() {
            out.push_str("\nError distribution:\n");
            for (e, n) in &self.error_distribution {
                let _ = writeln!(out, "  [{n}]\t{e}");
            }
        }
        out
    }

    /// The per-second CSV (`second,requests,errors,avg_ms,p50_ms,p99_ms,max_ms`).
    pub fn csv(&self) -> String {
        let mut out = String::from("second,requests,errors,avg_ms,p50_ms,p99_ms,max_ms\n");
        for r in self.samples.iter().flatten() {
            let _ = writeln!(
                out,
                "{},{},{},{:.4},{:.4},{:.4},{:.4}",
                r.second, r.requests, r.errors, r.avg_ms, r.p50_ms, r.p99_ms, r.max_ms
            );
        }
        out
    }
}

fn write_summary(out: &mut String, title: &str, s: &Summary, total_secs: f64) {
    let _ = writeln!(out, "{title}:");
    let _ = writeln!(out, "  Total:\t{total_secs:.4} secs.");
    let _ = writeln!(out, "  Slowest:\t{:.4} secs.", s.slowest_ms / 1e3);
    let _ = writeln!(out, "  Fastest:\t{:.4} secs.", s.fastest_ms / 1e3);
    let _ = writeln!(out, "  Average:\t{:.4} secs.", s.average_ms / 1e3);
    let _ = writeln!(out, "  Stddev:\t{:.4} secs.", s.stddev_ms / 1e3);
    let _ = writeln!(out, "  Requests/sec:\t{:.4}", s.requests_per_sec);
}

fn write_distribution(out: &mut String, s: &Summary) {
    if s.count == 0 {
        return;
    }
    out.push_str("\nLatency distribution:\n");
    for p in PERCENTILES {
        let ms = s.latency_ms[&percentile_label(p)];
        let _ = writeln!(out, "  {p}% in {:.4} secs.", ms / 1e3);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn percentiles_of_one_to_a_thousand() {
        let mut s = Stats::default();
        for i in 1..=1000 {
            s.record(ms(i));
        }
        // HDR with 3 significant digits: within 0.1%.
        for (p, want) in [(10.0, 100.0), (50.0, 500.0), (99.0, 990.0), (99.9, 999.0)] {
            let got = s.percentile_ms(p);
            assert!((got - want).abs() / want < 0.001, "p{p}: {got} vs {want}");
        }
        let sum = s.summary(Duration::from_secs(2));
        assert_eq!(sum.count, 1000);
        assert_eq!(sum.fastest_ms, 1.0);
        assert_eq!(sum.slowest_ms, 1000.0);
        assert!((sum.average_ms - 500.5).abs() < 1e-9);
        // Population stddev of 1..=1000 is sqrt((n^2 - 1) / 12).
        let want = ((1000.0f64 * 1000.0 - 1.0) / 12.0).sqrt();
        assert!((sum.stddev_ms - want).abs() < 1e-6, "{}", sum.stddev_ms);
        assert_eq!(sum.requests_per_sec, 500.0);
        assert_eq!(sum.latency_ms.len(), PERCENTILES.len());
    }

    #[test]
    fn merging_equals_recording_together() {
        let (mut a, mut b, mut all) = (Stats::default(), Stats::default(), Stats::default());
        for i in 1..=500u64 {
            a.record(ms(i));
            all.record(ms(i));
        }
        for i in 501..=1000u64 {
            b.record(ms(i * 3));
            all.record(ms(i * 3));
        }
        a.merge(&b);
        let (x, y) = (a.summary(ms(1000)), all.summary(ms(1000)));
        assert_eq!(x.count, y.count);
        assert_eq!(x.latency_ms, y.latency_ms);
        assert_eq!(x.slowest_ms, y.slowest_ms);
        assert_eq!(x.fastest_ms, y.fastest_ms);
        assert!((x.stddev_ms - y.stddev_ms).abs() < 1e-9);
    }

    #[test]
    fn empty_stats_summarise_to_zero() {
        let s = Stats::default().summary(ms(1000));
        assert_eq!((s.count, s.fastest_ms, s.slowest_ms), (0, 0.0, 0.0));
        assert_eq!(s.requests_per_sec, 0.0);
        assert!(Stats::default().cdf().is_empty());
    }

    #[test]
    fn buckets_hold_every_request() {
        let mut s = Stats::default();
        for i in 1..=100 {
            s.record(ms(i));
        }
        let b = s.buckets();
        assert_eq!(b.len(), 11);
        assert_eq!(b.iter().map(|x| x.1).sum::<u64>(), 100);
        assert_eq!(b[0].0, 1.0);
        assert!((b[10].0 - 100.0).abs() < 1e-9);
    }

    #[test]
    fn cdf_is_monotone_and_ends_at_the_slowest() {
        let mut s = Stats::default();
        for i in 1..=10_000 {
            s.record(Duration::from_micros(i * 7 % 9973 + 1));
        }
        let cdf = s.cdf();
        assert!(cdf.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
        assert_eq!(cdf.last().unwrap().0, 100.0);
        let max = s.summary(ms(1)).slowest_ms;
        assert!((cdf.last().unwrap().1 - max).abs() / max < 0.001);
    }

    #[test]
    fn per_second_rows_fill_gaps_and_count_errors() {
        let samples = vec![
            (0, 1_000_000, false),
            (0, 3_000_000, false),
            (0, 0, true),
            (2, 2_000_000, false),
        ];
        let rows = per_second(&samples);
        assert_eq!(rows.len(), 3);
        assert_eq!((rows[0].requests, rows[0].errors), (2, 1));
        assert!((rows[0].avg_ms - 2.0).abs() < 1e-9);
        assert_eq!((rows[1].requests, rows[1].errors), (0, 0));
        assert_eq!(rows[2].requests, 1);
        assert!((rows[2].max_ms - 2.0).abs() < 1e-9);
    }

    #[test]
    fn report_counts_errors_and_prints_etcds_layout() {
        let mut r = Recorder::new(true);
        r.success(ms(0), ms(2));
        r.success(ms(10), ms(4));
        r.failure(ms(20), "Unavailable: etcdserver: request timed out".into());
        r.failure(
            ms(1500),
            "Unavailable: etcdserver: request timed out".into(),
        );
        r.count("retries", 3);
        let mut total = Recorder::new(true);
        total.merge(r);
        let rep = Report::new("put", total, Duration::from_secs(2), false);
        assert_eq!(rep.errors, 2);
        assert_eq!(rep.summary.count, 2);
        assert_eq!(rep.summary.requests_per_sec, 1.0);
        let text = rep.text();
        for want in [
            "Summary:\n  Total:\t2.0000 secs.",
            "Slowest:\t0.0040 secs.",
            "Fastest:\t0.0020 secs.",
            "Average:\t0.0030 secs.",
            "Requests/sec:\t1.0000",
            "Latency distribution:\n  10% in 0.0020 secs.",
            "99.9% in 0.0040 secs.",
            "retries:\t3",
            "Error distribution:\n  [2]\tUnavailable: etcdserver: request timed out",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        let csv = rep.csv();
        assert_eq!(
            csv.lines().collect::<Vec<_>>(),
            [
                "second,requests,errors,avg_ms,p50_ms,p99_ms,max_ms",
                "0,2,1,3.0000,2.0000,4.0000,4.0000",
                "1,0,1,0.0000,0.0000,0.0000,0.0000",
            ]
        );
        let json: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&rep).unwrap()).expect("report is JSON");
        assert_eq!(json["count"], 2);
        assert_eq!(json["errors"], 2);
        assert_eq!(json["latency_ms"]["p50"], 2.0);
    }
}
