//! Auto-compaction (`--auto-compaction-mode`, `--auto-compaction-retention`), as etcd 3.5's
//! `server/etcdserver/api/v3compactor` runs it: on the leader only, through the same Compact
//! request a client sends (so it goes through Raft, and every member compacts at the same
//! revision).
//!
//! * **periodic** (the default mode): keep `retention` of history. The retention is a Go
//!   duration (`"30m"`) or a whole number of hours (`"1"`). Every `min(retention, 1h) / 10` the
//!   compactor samples the current revision, keeping the samples of the last `retention`; the
//!   first compaction comes `retention` after start-up, at the revision sampled `retention`
//!   ago, and later ones every `min(retention, 1h)`.
//! * **revision**: keep the last `retention` revisions. Every 5 minutes it compacts at
//!   `current revision - retention`, unless that is not positive or was compacted last time.
//!
//! [`Compactor`] is the schedule alone, a pure function of the clock and the revisions it is
//! shown, so its tests run on simulated time; [`run`] drives it.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Core;
use crate::error::EtcdError;
use crate::proto::etcdserverpb::CompactionRequest;
use crate::proto::metastorepb::proposal::Request as Proposed;

/// How often revision mode looks (etcd `revInterval`).
pub const REVISION_CHECK_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// Periodic mode samples this many times per compaction interval (etcd `retryDivisor`).
const RETRY_DIVISOR: u32 = 10;
/// Periodic mode compacts at least this often, whatever the retention (etcd: hourly).
const MAX_COMPACT_INTERVAL: Duration = Duration::from_secs(3600);

/// What to keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retention {
    /// Keep this much time of history (periodic mode).
    Period(Duration),
    /// Keep this many revisions (revision mode).
    Revisions(i64),
}

/// Reads `--auto-compaction-mode` and `--auto-compaction-retention` as etcd does; `Ok(None)`
/// when auto-compaction is off (a zero retention, the default).
///
/// Errors: a retention that is neither a Go duration nor a whole number of hours (periodic),
/// or not a whole number (revision), with etcd's flag name in the message.
pub fn retention(mode: &str, retention: &str) -> Result<Option<Retention>, String> {
    let bad = || format!("invalid --auto-compaction-retention {retention:?} for mode {mode}");
    let r = match mode {
        "revision" => Retention::Revisions(retention.trim().parse().map_err(|_| bad())?),
        "periodic" => match retention.trim().parse::<u64>() {
            // etcd: a bare number is hours.
            Ok(hours) => Retention::Period(Duration::from_secs(hours * 3600)),
            Err(_) => {
                Retention::Period(humantime::parse_duration(retention.trim()).map_err(|_| bad())?)
            }
        },
        other => return Err(format!("invalid --auto-compaction-mode {other:?}")),
    };
    Ok(match r {
        Retention::Period(d) if d.is_zero() => None,
        Retention::Revisions(n) if n <= 0 => None,
        r => Some(r),
    })
}

/// The schedule of one compactor; see the module docs.
#[derive(Debug)]
pub struct Compactor {
    retention: Retention,
    /// Periodic: revisions sampled at each tick, oldest first; the first is `retention` old.
    samples: VecDeque<i64>,
    /// Periodic: when the last compaction succeeded (or the compactor started).
    last_success: Instant,
    /// Periodic: how long after `last_success` the next compaction may run.
    wait: Duration,
    /// Revision: the revision compacted last.
    last_compacted: i64,
}

impl Compactor {
    /// A compactor started at `now`, when the store is at `revision`.
    pub fn new(retention: Retention, now: Instant, revision: i64) -> Compactor {
        let wait = match retention {
            Retention::Period(period) => period,
            Retention::Revisions(_) => REVISION_CHECK_INTERVAL,
        };
        Compactor {
            retention,
            samples: VecDeque::from([revision]),
            last_success: now,
            wait,
            last_compacted: 0,
        }
    }

    /// How long to wait between two [`Compactor::tick`]s.
    pub fn tick_interval(&self) -> Duration {
        match self.retention {
            Retention::Period(period) => period.min(MAX_COMPACT_INTERVAL) / RETRY_DIVISOR,
            Retention::Revisions(_) => REVISION_CHECK_INTERVAL,
        }
    }

    /// One tick at `now`, the store at `revision`: the revision to compact at, if it is time.
    /// Only a leader compacts (`leader`); a follower keeps sampling, so that it is ready if it
    /// becomes the leader. Report the outcome with [`Compactor::compacted`].
    pub fn tick(&mut self, now: Instant, revision: i64, leader: bool) -> Option<i64> {
        match self.retention {
            Retention::Revisions(keep) => {
                let at = revision - keep;
                (leader && at > 0 && at != self.last_compacted).then_some(at)
            }
            Retention::Period(period) => {
                let oldest = self.samples[0];
                // etcd keeps `period / retry interval + 1` samples: the oldest is `period` old.
                let keep =
                    (period.as_nanos() / self.tick_interval().as_nanos().max(1)) as usize + 1;
                self.samples.push_back(revision);
                while self.samples.len() > keep {
                    self.samples.pop_front();
                }
                if !leader || now.duration_since(self.last_success) < self.wait {
                    return None;
                }
                // The first compaction waits a whole period; later ones the compaction
                // interval.
                self.wait = period.min(MAX_COMPACT_INTERVAL);
                Some(oldest)
            }
        }
    }

    /// Records that compacting at `revision` succeeded at `now` (or was already done: etcd
    /// treats "required revision has been compacted" as success).
    pub fn compacted(&mut self, now: Instant, revision: i64) {
        self.last_success = now;
        self.last_compacted = revision;
    }
}

/// Runs auto-compaction for this member until the process ends: ticks on the leader propose a
/// Compact, exactly as a client's would be.
pub async fn run(core: Arc<Core>, retention: Retention) {
    let revision = || core.reader.applied().revision;
    let mut compactor = Compactor::new(retention, Instant::now(), revision());
    tracing::info!(?retention, "auto-compaction enabled");
    loop {
        tokio::time::sleep(compactor.tick_interval()).await;
        let leader = core.node.status.leader.load(Ordering::Relaxed) == core.member.id;
        let Some(at) = compactor.tick(Instant::now(), revision(), leader) else {
            continue;
        };
        tracing::info!(revision = at, ?retention, "starting auto-compaction");
        let request = Proposed::Compaction(CompactionRequest {
            revision: at,
            physical: false,
        });
        match core.proposer.propose(request).await {
            Ok(_) | Err(EtcdError::Compacted) => {
                compactor.compacted(Instant::now(), at);
                tracing::info!(revision = at, "finished auto-compaction");
            }
            Err(error) => {
                tracing::warn!(revision = at, %error, "auto-compaction failed; retrying later")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_is_read_as_etcd_reads_it() {
        let hour = Duration::from_secs(3600);
        assert_eq!(retention("periodic", "0"), Ok(None));
        assert_eq!(
            retention("periodic", "1"),
            Ok(Some(Retention::Period(hour)))
        );
        assert_eq!(
            retention("periodic", "30m"),
            Ok(Some(Retention::Period(hour / 2)))
        );
        assert_eq!(
            retention("revision", "1000"),
            Ok(Some(Retention::Revisions(1000)))
        );
        assert_eq!(retention("revision", "0"), Ok(None));
        assert!(retention("periodic", "soon").is_err());
        assert!(retention("revision", "1h").is_err());
    }

    /// Ticks a compactor on simulated time; the store's revision grows by 10 per tick.
    /// Returns (seconds since start, revision compacted at) for every compaction.
    fn simulate(r: Retention, ticks: u32, leader: impl Fn(u32) -> bool) -> Vec<(u64, i64)> {
        let start = Instant::now();
        let mut c = Compactor::new(r, start, 1);
        let mut done = Vec::new();
        for i in 1..=ticks {
            let now = start + c.tick_interval() * i;
            let revision = 1 + 10 * i as i64;
            if let Some(at) = c.tick(now, revision, leader(i)) {
                c.compacted(now, at);
                done.push((now.duration_since(start).as_secs(), at));
            }
        }
        done
    }

    #[test]
    fn periodic_keeps_one_retention_of_history() {
        // 10 minutes: ticks every minute; the first compaction after 10 minutes at the
        // revision of start-up, then every 10 minutes at the revision of 10 minutes before.
        let got = simulate(Retention::Period(Duration::from_secs(600)), 30, |_| true);
        assert_eq!(got, vec![(600, 1), (1200, 91), (1800, 191)]);
    }

    #[test]
    fn periodic_above_an_hour_compacts_hourly() {
        // 5 hours: ticks every 6 minutes, 51 samples kept; hourly once 5 hours have passed.
        let got = simulate(Retention::Period(Duration::from_secs(5 * 3600)), 70, |_| {
            true
        });
        assert_eq!(got.first(), Some(&(5 * 3600, 1)));
        assert_eq!(got.get(1), Some(&(6 * 3600, 91)));
    }

    #[test]
    fn only_the_leader_compacts() {
        let got = simulate(Retention::Period(Duration::from_secs(600)), 30, |i| i > 15);
        assert_eq!(got, vec![(960, 51), (1560, 151)]);
    }

    #[test]
    fn revision_mode_keeps_the_last_revisions() {
        let start = Instant::now();
        let mut c = Compactor::new(Retention::Revisions(100), start, 1);
        assert_eq!(c.tick_interval(), REVISION_CHECK_INTERVAL);
        assert_eq!(c.tick(start, 50, true), None, "nothing to keep back yet");
        assert_eq!(c.tick(start, 150, false), None, "followers do not compact");
        assert_eq!(c.tick(start, 150, true), Some(50));
        c.compacted(start, 50);
        assert_eq!(c.tick(start, 150, true), None, "already compacted there");
        assert_eq!(c.tick(start, 400, true), Some(300));
    }
}
