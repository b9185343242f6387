//! The request loop shared by the request/response workloads: `--clients` tasks pull request
//! numbers from one counter, wait for each request's scheduled time when `--rate` is set, and
//! record latency, errors and progress into their own [`Recorder`]; the recorders are merged at
//! the end.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indicatif::ProgressBar;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::report::Recorder;

/// When request `i` of an open-loop run is due: `start + i / rate`. With `rate == 0` every
/// request is due at once (closed loop: each client sends as soon as its previous answer
/// arrives).
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    start: Instant,
    interval_ns: f64,
}

impl Schedule {
    /// A schedule of `rate` requests per second from `start` (0 = unlimited).
    pub fn new(start: Instant, rate: f64) -> Schedule {
        let interval_ns = if rate > 0.0 { 1e9 / rate } else { 0.0 };
        Schedule { start, interval_ns }
    }

    /// Whether requests are paced (open loop).
    pub fn is_open_loop(&self) -> bool {
        self.interval_ns > 0.0
    }

    /// The time request `i` (0-based) is due.
    pub fn due(&self, i: u64) -> Instant {
        self.start + Duration::from_nanos((i as f64 * self.interval_ns) as u64)
    }
}

/// What one request did, beyond succeeding.
#[derive(Default, Debug)]
pub struct Outcome {
    /// Also record the latency under this sub-operation label.
    pub label: Option<&'static str>,
    /// Optimistic retries the request needed (stm).
    pub retries: u64,
}

/// One client's request maker. `call(i)` sends request number `i` (0-based, unique across
/// clients) and waits for its answer.
pub trait Worker: Send + 'static {
    /// Sends request `i`.
    fn call(&mut self, i: u64) -> impl Future<Output = Result<Outcome, etcd_client::Error>> + Send;
}

/// Signals the run to stop early (Ctrl-C); in-flight requests are abandoned, not counted.
pub type Stop = watch::Receiver<bool>;

/// Resolves when `stop` turns true (or its sender is gone without having stopped: never).
pub async fn stopped(stop: &mut Stop) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await
    }
}

/// Shared knobs of a run.
pub struct Run {
    /// Requests in all.
    pub total: u64,
    /// Pacing.
    pub schedule: Schedule,
    /// Keep per-request samples for `--sample`.
    pub sample: bool,
    /// Progress bar (hidden when not on a terminal).
    pub progress: ProgressBar,
    /// Early stop.
    pub stop: Stop,
}

/// Runs `workers` (one per client) until `run.total` requests have been sent or the run is
/// stopped; returns the merged recorder and whether the run was stopped early.
pub async fn drive<W: Worker>(run: Run, workers: Vec<W>) -> (Recorder, bool) {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(workers.len());
    for mut worker in workers {
        let next = next.clone();
        let (schedule, total, progress) = (run.schedule, run.total, run.progress.clone());
        let mut stop = run.stop.clone();
        let mut rec = Recorder::new(run.sample);
        tasks.push(tokio::spawn(async move {
            loop {
                if *stop.borrow() {
                    return (rec, true);
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return (rec, false);
                }
                let due = schedule.due(i);
                if schedule.is_open_loop() {
                    tokio::select! {
                        _ = tokio::time::sleep_until(due) => {}
                        _ = stopped(&mut stop) => return (rec, true),
                    }
                }
                // Open loop: latency from the due time, so queueing behind a stall counts.
                let began = if schedule.is_open_loop() {
                    due
                } else {
                    Instant::now()
                };
                let result = tokio::select! {
                    r = worker.call(i) => r,
                    _ = stopped(&mut stop) => return (rec, true),
                };
                let now = Instant::now();
                let at = now - schedule.start;
                match result {
                    Ok(outcome) => {
                        let latency = now - began;
                        rec.success(at, latency);
                        if let Some(label) = outcome.label {
                            rec.sub(label, latency);
                        }
                        if outcome.retries > 0 {
                            rec.count("retries", outcome.retries);
                        }
                    }
                    Err(e) => rec.failure(at, error_text(&e)),
                }
                progress.inc(1);
            }
        }));
    }
    let mut all = Recorder::new(run.sample);
    let mut interrupted = false;
    for t in tasks {
        let (rec, stopped) = t.await.expect("client task panicked");
        interrupted |= stopped;
        all.merge(rec);
    }
    (all, interrupted)
}

/// An error as the report groups it: `"<gRPC code>: <message>"` for a status, else the text.
pub fn error_text(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => format!("{:?}: {}", s.code(), s.message()),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn open_loop_schedule_spaces_requests_evenly() {
        let start = Instant::now();
        let s = Schedule::new(start, 1000.0);
        assert!(s.is_open_loop());
        assert_eq!(s.due(0), start);
        assert_eq!(s.due(1) - start, Duration::from_millis(1));
        assert_eq!(s.due(1000) - start, Duration::from_secs(1));
        // Exactly `rate` requests are due in the first second.
        let in_first_second = (0..5000)
            .filter(|&i| s.due(i) < start + Duration::from_secs(1))
            .count();
        assert_eq!(in_first_second, 1000);
        // Fractional intervals do not drift: 3 per second puts request 3 at exactly 1 s.
        let s3 = Schedule::new(start, 3.0);
        assert_eq!(s3.due(3) - start, Duration::from_secs(1));
        let closed = Schedule::new(start, 0.0);
        assert!(!closed.is_open_loop());
        assert_eq!(closed.due(12345), start);
    }

    struct Sleepy {
        stall_at: u64,
    }

    impl Worker for Sleepy {
        async fn call(&mut self, i: u64) -> Result<Outcome, etcd_client::Error> {
            if i == self.stall_at {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if i % 10 == 9 {
                return Err(etcd_client::Error::InvalidArgs("bad".into()));
            }
            Ok(Outcome::default())
        }
    }

    fn run(total: u64, rate: f64, stop: Stop) -> Run {
        Run {
            total,
            schedule: Schedule::new(Instant::now(), rate),
            sample: true,
            progress: ProgressBar::hidden(),
            stop,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn open_loop_latency_counts_queueing_behind_a_stall() {
        // One client, 1000 req/s, request 0 stalls 100 ms: the ~100 requests due during the
        // stall each wait for it, and the open-loop latencies must show it.
        let (_tx, stop) = watch::channel(false);
        let (rec, interrupted) = drive(run(200, 1000.0, stop), vec![Sleepy { stall_at: 0 }]).await;
        assert!(!interrupted);
        assert_eq!(rec.stats.count() + rec.errors.values().sum::<u64>(), 200);
        assert_eq!(rec.errors.values().sum::<u64>(), 20);
        let s = rec.stats.summary(Duration::from_secs(1));
        assert!(s.slowest_ms >= 100.0, "{s:?}");
        // Requests 1..100 were due during the stall and waited for it (latency 100 - i ms);
        // the later half ran on time. A closed-loop count would have hidden all but one.
        let (p75, p90) = (s.latency_ms["p75"], s.latency_ms["p90"]);
        assert!((45.0..=55.0).contains(&p75), "{s:?}");
        assert!((75.0..=85.0).contains(&p90), "{s:?}");
        assert!(s.latency_ms["p25"] < 1.0, "{s:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn closed_loop_hides_the_stall_from_all_but_one() {
        let (_tx, stop) = watch::channel(false);
        let (rec, _) = drive(run(200, 0.0, stop), vec![Sleepy { stall_at: 0 }]).await;
        let s = rec.stats.summary(Duration::from_secs(1));
        assert!(s.slowest_ms >= 100.0);
        assert!(s.latency_ms["p99"] < 1.0, "{s:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn stop_ends_the_run_with_partial_counts() {
        let (tx, stop) = watch::channel(false);
        let h = tokio::spawn(drive(
            run(1_000_000, 100.0, stop),
            vec![Sleepy { stall_at: u64::MAX }, Sleepy { stall_at: u64::MAX }],
        ));
        tokio::time::sleep(Duration::from_millis(1005)).await;
        tx.send(true).unwrap();
        let (rec, interrupted) = h.await.unwrap();
        assert!(interrupted);
        let done = rec.stats.count() + rec.errors.values().sum::<u64>();
        assert!((100..=102).contains(&done), "{done}");
    }
}
