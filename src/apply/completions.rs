//! What happens after each applied batch's barrier, in batch order, on whichever thread sees
//! the barrier passed.
//!
//! Once every shard has passed a batch's barrier, the batch is published (readers see it) and
//! its clients are answered. The dispatcher used to wait for the barrier itself and do that
//! work: a lone client's put woke the dispatcher twice, once for the committed entry and once
//! for the shards' answer (issue 17, "one wake-up per batch per thread"). Now the last shard to
//! pass the barrier does it, and the dispatcher goes on to the next batch.
//!
//! Batches must still be finished in order, and the shards that pass one batch's barrier last
//! may pass the next one's first (the memory engine sends a barrier only to the shards a batch
//! touched). So each batch takes a ticket in apply order, and a finished batch's work runs only
//! after the work of every batch before it, by whichever thread finishes the last of them.
//!
//! A batch whose barrier failed (a shard stopped: its engine failed, and the member is
//! stopping) is never published, and neither is any batch after it: publishing a later one
//! would show readers a revision whose earlier writes a shard never applied.
//!
//! The dispatcher runs ahead of the shards by at most [`IN_FLIGHT`] batches
//! ([`Completions::wait_for_room`]): the shards' apply queues are unbounded, and shards slower
//! than the dispatcher must not let them grow without end. The dispatcher runs on the Raft
//! thread, so while it waits, new proposals gather into the Raft thread's next batch: shards
//! that fall behind slow the log down rather than let the queues between them grow.

use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex};

/// Batches whose barrier may be outstanding at once.
pub const IN_FLIGHT: u64 = 4;

/// A batch's work once its barrier has passed.
pub type Job = Box<dyn FnOnce() + Send>;

/// The batches whose barrier has passed, run in ticket order.
#[derive(Default)]
pub struct Completions {
    state: Mutex<State>,
    /// Told whenever a batch has finished (or failed).
    finished: Condvar,
}

#[derive(Default)]
struct State {
    /// The ticket whose work runs next.
    next: u64,
    /// Finished batches waiting for one before them: their work, or `None` if their barrier
    /// failed.
    waiting: BTreeMap<u64, Option<Job>>,
    /// A barrier failed: nothing more runs.
    failed: bool,
}

impl Completions {
    /// Batch `ticket` (tickets are handed out from 0, one per batch, in apply order) is done:
    /// `job` runs once every batch before it has run, or never if `job` is `None` (its barrier
    /// failed) or a batch before it failed. Runs `job`, and any later batch's work waiting on
    /// it, on this thread, under a lock, so that the work of two batches never overlaps.
    pub fn finish(&self, ticket: u64, job: Option<Job>) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.waiting.insert(ticket, job);
        loop {
            let next = state.next;
            let Some(job) = state.waiting.remove(&next) else {
                break;
            };
            state.next += 1;
            match job {
                Some(job) if !state.failed => job(),
                _ => state.failed = true,
            }
        }
        self.finished.notify_all();
    }

    /// Waits until batch `ticket` may be sent: fewer than [`IN_FLIGHT`] batches before it are
    /// still unfinished. Returns `false` if a barrier failed.
    pub fn wait_for_room(&self, ticket: u64) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while !state.failed && state.next + IN_FLIGHT <= ticket {
            state = self.finished.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        !state.failed
    }

    /// Whether a batch's barrier failed.
    pub fn failed(&self) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn job(log: &Arc<Mutex<Vec<u64>>>, n: u64) -> Option<Job> {
        let log = log.clone();
        Some(Box::new(move || log.lock().unwrap().push(n)))
    }

    #[test]
    fn batches_finish_in_ticket_order_whoever_finishes_them() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let c = Completions::default();
        c.finish(1, job(&log, 1));
        c.finish(2, job(&log, 2));
        assert!(log.lock().unwrap().is_empty());
        c.finish(0, job(&log, 0));
        c.finish(3, job(&log, 3));
        assert_eq!(*log.lock().unwrap(), vec![0, 1, 2, 3]);
    }

    #[test]
    fn the_dispatcher_waits_while_too_many_batches_are_unfinished() {
        let c = Arc::new(Completions::default());
        assert!(c.wait_for_room(IN_FLIGHT - 1));
        let waiter = {
            let c = c.clone();
            std::thread::spawn(move || c.wait_for_room(IN_FLIGHT))
        };
        c.finish(0, Some(Box::new(|| ())));
        assert!(waiter.join().unwrap());
        // After a failure it no longer waits, and says so.
        c.finish(1, None);
        assert!(!c.wait_for_room(100));
    }

    #[test]
    fn nothing_after_a_failed_barrier_runs() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let c = Completions::default();
        c.finish(0, job(&log, 0));
        c.finish(2, job(&log, 2));
        c.finish(1, None);
        c.finish(3, job(&log, 3));
        assert_eq!(*log.lock().unwrap(), vec![0]);
        assert!(c.failed());
    }
}
