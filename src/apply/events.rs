//! Each applied batch's watch events, handed from the apply dispatcher to the watch feed
//! (`crate::server::watch::feed`).
//!
//! The feed used to read every applied batch's events from the shards itself: one more
//! round trip to every shard thread per batch, each a wake-up, on top of the barrier that had
//! just woken them (at 1000 puts/s with 1000 watchers, the shard threads were a fifth of the
//! server's CPU, mostly the kernel waking them). Now, while any watcher is registered, each
//! shard reads its events of the batch at the barrier, when it is awake anyway, from the same
//! history query the feed would make ([`crate::mvcc::Store::events`]); the shard that passes
//! the barrier last merges them and hands them here before it publishes the batch's
//! [`crate::state_machine::AppliedState`] (`src/apply/completions.rs`).
//!
//! This is only a shortcut: the feed still reads from the shards any revisions the handoff
//! does not cover (a batch when the first watcher registered, one dropped past
//! [`HANDOFF_BATCHES`], one that met a compaction, one with more than [`BARRIER_EVENTS`]
//! events on a shard), so a watcher sees the same events either way.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;

use crate::mvcc::store::EventRecord;

/// Batches the handoff keeps for a feed that has not taken them; past it, or past
/// [`HANDOFF_BYTES`], the oldest go (the feed then reads those revisions from the shards).
pub const HANDOFF_BATCHES: usize = 1024;
/// Events a shard reads for one barrier at most (cut only between revisions, as
/// [`crate::mvcc::Store::events`] cuts). A batch with more (a follower catching up through
/// one large batch) is not handed over: the feed reads it from the shards, a thousand events
/// at a time, and the ring never holds it in one piece.
pub const BARRIER_EVENTS: usize = 4096;
/// Bytes of keys and values the handoff keeps at most (64 MiB, as the feed's ring); it always
/// keeps the newest batch.
pub const HANDOFF_BYTES: usize = 64 << 20;

/// The dispatcher's side and the feed's side of the handoff, shared.
#[derive(Default)]
pub struct EventHandoff {
    /// Watchers registered by every watch stream: no events are read while there are none.
    watchers: AtomicI64,
    /// Registered watchers that want `prev_kv`: events carry it only while there are some.
    prev_kv_watchers: AtomicI64,
    /// Applied batches not yet taken, oldest first, contiguous or not.
    batches: Mutex<Pushed>,
}

/// The batches not yet taken, each with the bytes of keys and values it holds (counted once,
/// when pushed), and their sum.
#[derive(Default)]
struct Pushed {
    batches: VecDeque<(usize, AppliedEvents)>,
    bytes: usize,
}

/// Every event of the revisions `[from, through]`, over the whole keyspace, in (revision,
/// sub-revision, key) order.
#[derive(Debug)]
pub struct AppliedEvents {
    /// First revision covered.
    pub from: i64,
    /// Last revision covered (the batch's revision).
    pub through: i64,
    /// Whether each event carries its `prev_kv`.
    pub prev_kv: bool,
    /// The events.
    pub events: Vec<EventRecord>,
}

impl EventHandoff {
    /// Adds `watchers` watchers, `prev_kv` of which want prev_kv (negative to take them back).
    pub fn register(&self, watchers: i64, prev_kv: i64) {
        self.watchers.fetch_add(watchers, Ordering::Relaxed);
        self.prev_kv_watchers.fetch_add(prev_kv, Ordering::Relaxed);
    }

    /// Whether any watcher is registered.
    pub fn watched(&self) -> bool {
        self.watchers.load(Ordering::Relaxed) > 0
    }

    /// Whether any registered watcher wants prev_kv.
    pub fn prev_kv_wanted(&self) -> bool {
        self.prev_kv_watchers.load(Ordering::Relaxed) > 0
    }

    /// What the dispatcher should have the shards read at a barrier: `None` while nobody
    /// watches, else whether to read `prev_kv`.
    pub fn wanted(&self) -> Option<bool> {
        self.watched().then(|| self.prev_kv_wanted())
    }

    /// Hands over a batch (the batch's completion, before it publishes the batch's revision).
    pub fn push(&self, batch: AppliedEvents) {
        let bytes = batch.events.iter().map(EventRecord::bytes).sum();
        let mut pushed = self.batches.lock().unwrap();
        while !pushed.batches.is_empty()
            && (pushed.batches.len() >= HANDOFF_BATCHES || pushed.bytes + bytes > HANDOFF_BYTES)
        {
            if let Some((old, _)) = pushed.batches.pop_front() {
                pushed.bytes -= old;
            }
        }
        pushed.bytes += bytes;
        pushed.batches.push_back((bytes, batch));
    }

    /// Takes the batches that end at or before `revision` (the feed, for the revisions
    /// published so far), oldest first; later ones stay for the next call.
    pub fn take_through(&self, revision: i64) -> Vec<AppliedEvents> {
        let mut guard = self.batches.lock().unwrap();
        let pushed = &mut *guard;
        let n = pushed
            .batches
            .partition_point(|(_, b)| b.through <= revision);
        pushed
            .batches
            .drain(..n)
            .map(|(bytes, batch)| {
                pushed.bytes -= bytes;
                batch
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(from: i64, through: i64) -> AppliedEvents {
        AppliedEvents {
            from,
            through,
            prev_kv: false,
            events: Vec::new(),
        }
    }

    #[test]
    fn the_feed_takes_only_what_is_published_and_the_oldest_go_first() {
        let h = EventHandoff::default();
        assert_eq!(h.wanted(), None, "nobody watches");
        h.register(2, 1);
        assert_eq!(h.wanted(), Some(true));
        h.register(-1, -1);
        assert_eq!(h.wanted(), Some(false));
        h.push(batch(1, 3));
        h.push(batch(4, 4));
        h.push(batch(5, 7));
        let taken: Vec<_> = h.take_through(4).iter().map(|b| b.through).collect();
        assert_eq!(taken, vec![3, 4], "revision 7 is not published yet");
        assert_eq!(h.take_through(7).len(), 1);
        for rev in 0..HANDOFF_BATCHES as i64 + 2 {
            h.push(batch(rev, rev));
        }
        let taken = h.take_through(i64::MAX);
        assert_eq!(taken.len(), HANDOFF_BATCHES);
        assert_eq!(taken[0].from, 2, "the oldest went");
    }

    #[test]
    fn the_handoff_is_bounded_in_bytes_and_keeps_the_newest_batch() {
        use crate::proto::mvccpb::{Event, KeyValue};
        let big = |rev: i64, bytes: usize| AppliedEvents {
            from: rev,
            through: rev,
            prev_kv: false,
            events: vec![EventRecord {
                rev,
                sub: 0,
                event: Event {
                    kv: Some(KeyValue {
                        key: b"k".to_vec(),
                        value: vec![0; bytes - 1],
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            }],
        };
        let h = EventHandoff::default();
        h.push(big(1, HANDOFF_BYTES / 2));
        h.push(big(2, HANDOFF_BYTES / 2));
        h.push(big(3, HANDOFF_BYTES / 2));
        let kept: Vec<i64> = h.take_through(3).iter().map(|b| b.from).collect();
        assert_eq!(kept, vec![2, 3]);
        h.push(big(4, HANDOFF_BYTES * 2));
        let kept: Vec<i64> = h.take_through(4).iter().map(|b| b.from).collect();
        assert_eq!(kept, vec![4], "the newest stays, however large");
        h.push(big(5, 10));
        assert_eq!(
            h.take_through(5).len(),
            1,
            "the byte count went back to zero"
        );
    }
}
