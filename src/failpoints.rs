//! Crash points for the robustness tests: named places where a test build (`--features
//! failpoints`) can abort the process, as a power cut or a `kill -9` would, at the worst
//! moment of a durability protocol. Without the feature [`crash_point`] is an empty inline
//! function: nothing is compiled in.
//!
//! A point fires when the `FAILPOINTS` environment variable (the `fail` crate's syntax, read by
//! `fail::FailScenario::setup` in `main`) gives it the `return` action, e.g.
//! `FAILPOINTS="wal-after-fsync=10%return"` (each pass fires with a probability of 10 %) or
//! `FAILPOINTS="apply-mid-batch=20*off->return"` (the 21st pass fires). Before aborting, the
//! member logs `failpoint NAME: aborting` (an error line on its log outputs), so a test can
//! tell which point fired.
//!
//! The points ([`ALL`]), in the order a write meets them:
//!
//! * [`WAL_BEFORE_FSYNC`]: in `Wal::sync`, before a batch of entries and hard state is written
//!   and fsynced. Nothing of the batch is on disk (what a power cut before the fsync may
//!   leave); a leader has already sent the entries to its followers (Raft thesis 10.2.1), a
//!   follower has not acknowledged them.
//! * [`WAL_AFTER_FSYNC`]: in `Wal::sync`, right after the fdatasync: the batch is durable, but
//!   Raft has not been told (no append acknowledged, nothing committed or answered because of
//!   it).
//! * [`APPLY_MID_BATCH`]: in the apply dispatcher, between two requests of one batch of
//!   committed entries: the first request's writes have gone to the shards' apply queues
//!   (some shards may have applied them, none has persisted them), the next ones have not.
//! * `shard-before-flush` (`FAILPOINTS="shard-before-flush=return(N)"`, in
//!   `shard::executor`): shard N aborts just before persisting a barrier, after the other
//!   shards may have: the shards hold different applied indexes on disk.
//! * [`APPLY_AFTER_BARRIER`]: every shard has persisted the batch, before readers see it
//!   (`AppliedState` published) and before the clients are answered: durable writes whose
//!   clients never learn the outcome. With the `sleep(ms)` action instead of `return` it holds
//!   each batch there without crashing, which widens the window in which the shards are ahead
//!   of what readers were told (the watch test `a_compacted_watch_names_the_compaction_that_cut_it`).
//! * [`SNAPSHOT_BEFORE_INSTALL`]: a follower got a snapshot from the leader (it decoded),
//!   before it is saved to the snapshot directory.
//! * [`SNAPSHOT_AFTER_INSTALL`]: the leader's snapshot is saved, before the state machine is
//!   replaced with it and before the WAL is released up to it: a restart must finish the
//!   install from the saved file.

/// Before the WAL's write + fdatasync of a batch (see the module doc).
pub const WAL_BEFORE_FSYNC: &str = "wal-before-fsync";
/// After the WAL's fdatasync, before Raft is told the batch is durable.
pub const WAL_AFTER_FSYNC: &str = "wal-after-fsync";
/// Between two requests of one batch of committed entries, in the apply dispatcher.
pub const APPLY_MID_BATCH: &str = "apply-mid-batch";
/// After every shard persisted a batch, before it is published and answered.
pub const APPLY_AFTER_BARRIER: &str = "apply-after-barrier";
/// A follower's snapshot from the leader, before it is saved.
pub const SNAPSHOT_BEFORE_INSTALL: &str = "snapshot-before-install";
/// A follower's snapshot from the leader, saved, before the state machine is replaced.
pub const SNAPSHOT_AFTER_INSTALL: &str = "snapshot-after-install";

/// Every crash point [`crash_point`] takes, in the order a write meets them.
pub const ALL: [&str; 6] = [
    WAL_BEFORE_FSYNC,
    WAL_AFTER_FSYNC,
    APPLY_MID_BATCH,
    APPLY_AFTER_BARRIER,
    SNAPSHOT_BEFORE_INSTALL,
    SNAPSHOT_AFTER_INSTALL,
];

/// The log line a member writes when crash point `name` fires, just before it aborts.
pub fn abort_line(name: &str) -> String {
    format!("failpoint {name}: aborting")
}

/// Crash point `name` (one of [`ALL`]): when `FAILPOINTS` gives it the `return` action, logs
/// [`abort_line`] and aborts the process (no destructors, no flush: as a power cut would
/// leave the data directory, except that the page cache survives). A no-op without the
/// `failpoints` feature.
#[inline(always)]
pub fn crash_point(name: &'static str) {
    #[cfg(feature = "failpoints")]
    if fail::eval(name, |_| ()).is_some() {
        tracing::error!("{}", abort_line(name));
        std::process::abort();
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

#[cfg(all(test, feature = "failpoints"))]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_the_line_names_the_point() {
        let mut names = ALL.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL.len());
        assert_eq!(
            abort_line(WAL_AFTER_FSYNC),
            "failpoint wal-after-fsync: aborting"
        );
    }
}
