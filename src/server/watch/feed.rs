//! The member's watch feed: each applied batch's events, read from the shards once and shared
//! by every watch stream and watcher.
//!
//! Without it, every watcher of every stream asked the shards for its own events after each
//! applied batch: 1,000 watchers meant 1,000 history reads per batch. The feed reads the
//! events of the whole keyspace once per applied batch (when any watcher exists) and keeps the
//! latest ones in a bounded ring. A watcher whose next revision the ring covers takes its
//! events from there, filtered by its key range; one that is further behind (a watch from an
//! old revision, a stream that fell behind the ring) reads the history itself, as before.
//! The ring only ever holds complete revisions, contiguous from its first to its last, so
//! either path gives a watcher exactly the same events.
//!
//! The feed does not read the batches itself while the dispatcher hands them over: each shard
//! reads its events of a batch at the batch's barrier, and the dispatcher passes them on,
//! merged, before it publishes the batch ([`crate::apply::events`]). The feed reads
//! from the shards only the revisions the handoff does not cover.
//!
//! etcd does the same in `watchableStore.notify`: a synced watcher gets the events of each
//! write from the write itself, and only unsynced watchers read the backend
//! (`syncWatchers`).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::apply::events::{AppliedEvents, EventHandoff};
use crate::mvcc::store::{EventBatch, EventRecord, HistoryCompacted};
use crate::mvcc::KeyRange;
use crate::proto::mvccpb::Event;
use crate::server::Reader;

/// Events the feed reads from the shards at a time (a read is cut only between revisions).
const FEED_READ: usize = 1000;
/// The ring keeps at most about this many events...
const RING_EVENTS: usize = 8192;
/// ...and this many bytes of keys and values (64 MiB); it always keeps its newest batch.
const RING_BYTES: usize = 64 << 20;

/// The shared feed. Watch streams register their watchers with [`EventFeed::register`], wait
/// on [`EventFeed::changes`] and read with [`EventFeed::view`].
pub struct EventFeed {
    ring: Mutex<Ring>,
    changes: watch::Receiver<()>,
    /// The dispatcher's batches, and the count of registered watchers (all streams'): the
    /// feed reads nothing while there are none, and prev_kv only while some want it.
    handoff: Arc<EventHandoff>,
}

/// Consecutive applied batches' events: every revision in `[start, through]`.
struct Ring {
    start: i64,
    through: i64,
    batches: VecDeque<Arc<FeedBatch>>,
    events: usize,
    bytes: usize,
}

/// Every event of the revisions `[from, through]`, in (revision, sub-revision, key) order.
struct FeedBatch {
    from: i64,
    through: i64,
    /// Whether each event carries its `prev_kv`.
    prev_kv: bool,
    events: Vec<EventRecord>,
    /// Bytes of keys and values held.
    bytes: usize,
}

/// The ring as one watch stream saw it at one moment.
pub struct FeedView {
    start: i64,
    through: i64,
    batches: Vec<Arc<FeedBatch>>,
}

/// What the feed has for one watcher (see [`FeedView::serve`]).
pub enum Served {
    /// Its events from its next revision, complete through `EventBatch::through`.
    Events(EventBatch),
    /// Nothing yet: its next revision is past the ring, and the feed reads it next.
    Later,
    /// The ring cannot serve it (its next revision is before the ring, or it wants `prev_kv`
    /// the ring lacks): it reads the history itself.
    History,
}

impl EventFeed {
    /// Starts the member's feed: a task that takes each revision `reader` publishes as
    /// applied, while watchers are registered, from `handoff` or else from the shards, until
    /// `stopping` is cancelled or the shards stop. When the task ends,
    /// [`EventFeed::changes`] reports it closed, which ends every watch stream.
    pub fn spawn(
        reader: Reader,
        handoff: Arc<EventHandoff>,
        stopping: CancellationToken,
    ) -> Arc<EventFeed> {
        let (tx, rx) = watch::channel(());
        let revision = reader.applied().revision;
        let feed = Arc::new(EventFeed {
            ring: Mutex::new(Ring::empty_after(revision)),
            changes: rx,
            handoff,
        });
        tokio::spawn(feed.clone().run(reader, tx, stopping));
        feed
    }

    /// Adds `watchers` watchers, `prev_kv` of which want prev_kv (negative to take them back).
    pub fn register(&self, watchers: i64, prev_kv: i64) {
        self.handoff.register(watchers, prev_kv);
    }

    /// Changes whenever the ring has moved; closed once the feed has stopped.
    pub fn changes(&self) -> watch::Receiver<()> {
        self.changes.clone()
    }

    /// The ring as it is now, from the batch that holds revision `from` on: what a stream
    /// whose watchers' earliest next revision is `from` can use. (The ring may hold thousands
    /// of small batches; a stream takes only the few it is missing.)
    pub fn view(&self, from: i64) -> FeedView {
        let ring = self.ring.lock().unwrap();
        let first = ring.batches.partition_point(|b| b.through < from);
        FeedView {
            start: ring.start.max(from),
            through: ring.through,
            batches: ring.batches.range(first..).cloned().collect(),
        }
    }

    /// The last revision the ring covers.
    pub fn through(&self) -> i64 {
        self.ring.lock().unwrap().through
    }

    async fn run(self: Arc<Self>, reader: Reader, tx: watch::Sender<()>, stop: CancellationToken) {
        let everything = KeyRange::everything();
        let mut applied = reader.applied_changes();
        loop {
            let state = *applied.borrow_and_update();
            let handed = self.handoff.take_through(state.revision);
            if !self.handoff.watched() {
                // Nobody to read for: the ring restarts after the applied revision, so a
                // watcher registered later reads anything before it from the history.
                *self.ring.lock().unwrap() = Ring::empty_after(state.revision);
            } else {
                self.take_handed(handed);
            }
            loop {
                let from = self.through() + 1;
                if from > state.revision {
                    break;
                }
                let prev_kv = self.handoff.prev_kv_wanted();
                let read =
                    reader
                        .shards()
                        .events(&everything, from, state.revision, FEED_READ, prev_kv);
                let read = tokio::select! {
                    _ = stop.cancelled() => return,
                    read = read => read,
                };
                match read {
                    Ok(Ok(batch)) => self.ring.lock().unwrap().push(FeedBatch::new(
                        from,
                        batch.through,
                        prev_kv,
                        batch.events,
                    )),
                    // The feed fell behind a compaction: watchers before the ring read the
                    // history, which cancels those the compaction cut.
                    Ok(Err(HistoryCompacted { .. })) => {
                        *self.ring.lock().unwrap() = Ring::empty_after(state.revision);
                    }
                    // A shard stopped: so does the member.
                    Err(_) => return,
                }
                tx.send_replace(());
            }
            tx.send_replace(());
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = applied.changed() => if changed.is_err() {
                    return;
                }
            }
        }
    }
}

impl EventFeed {
    /// Puts the dispatcher's batches in the ring, those that continue it: a batch that does
    /// not (one before a gap the feed reads itself) is dropped, as is one without the prev_kv
    /// a watcher now wants.
    fn take_handed(&self, handed: Vec<AppliedEvents>) {
        if handed.is_empty() {
            return;
        }
        let prev_kv = self.handoff.prev_kv_wanted();
        let mut ring = self.ring.lock().unwrap();
        for b in handed {
            if b.from == ring.through + 1 && (b.prev_kv || !prev_kv) {
                ring.push(FeedBatch::new(b.from, b.through, b.prev_kv, b.events));
            }
        }
    }
}

impl Ring {
    /// A ring that covers nothing and whose next batch starts at `revision + 1`.
    fn empty_after(revision: i64) -> Ring {
        Ring {
            start: revision + 1,
            through: revision,
            batches: VecDeque::new(),
            events: 0,
            bytes: 0,
        }
    }

    /// Appends the next batch (`batch.from == self.through + 1`) and drops the oldest ones
    /// past the ring's bounds.
    fn push(&mut self, batch: FeedBatch) {
        debug_assert_eq!(batch.from, self.through + 1);
        self.through = batch.through;
        self.events += batch.events.len();
        self.bytes += batch.bytes;
        self.batches.push_back(Arc::new(batch));
        while self.batches.len() > 1 && (self.events > RING_EVENTS || self.bytes > RING_BYTES) {
            let old = self.batches.pop_front().unwrap();
            self.events -= old.events.len();
            self.bytes -= old.bytes;
            self.start = old.through + 1;
        }
    }
}

impl FeedBatch {
    fn new(from: i64, through: i64, prev_kv: bool, events: Vec<EventRecord>) -> FeedBatch {
        let bytes = events.iter().map(EventRecord::bytes).sum();
        FeedBatch {
            from,
            through,
            prev_kv,
            events,
            bytes,
        }
    }
}

/// How far [`FeedView::scan`] got.
pub enum Scanned {
    /// Every event from the first revision asked for through this one was visited.
    Through(i64),
    /// Nothing yet: the revision asked for is past the ring, and the feed reads it next.
    Later,
    /// The ring cannot serve it (the revision is before the ring, or `prev_kv` is wanted and
    /// the ring's batch there lacks it): the history must.
    History,
}

impl FeedView {
    /// The last revision the view covers.
    pub fn through(&self) -> i64 {
        self.through
    }

    /// Visits the events from revision `next_rev` on, in (revision, sub-revision, key) order,
    /// until `take` has counted about `limit` (cut between batches). With `prev_kv`, stops
    /// before the first batch read without it.
    pub fn scan(
        &self,
        next_rev: i64,
        prev_kv: bool,
        limit: usize,
        mut take: impl FnMut(&EventRecord) -> usize,
    ) -> Scanned {
        if next_rev > self.through {
            return Scanned::Later;
        }
        if next_rev < self.start || self.batches.first().is_some_and(|b| b.from > next_rev) {
            return Scanned::History;
        }
        let first = self.batches.partition_point(|b| b.through < next_rev);
        let mut taken = 0;
        for batch in &self.batches[first..] {
            if prev_kv && !batch.prev_kv {
                if batch.from <= next_rev {
                    return Scanned::History;
                }
                // Serve what came before; the rest from the history on the next pass.
                return Scanned::Through(batch.from - 1);
            }
            for e in batch.events.iter().filter(|e| e.rev >= next_rev) {
                taken += take(e);
            }
            if taken >= limit {
                return Scanned::Through(batch.through);
            }
        }
        Scanned::Through(self.through)
    }

    /// A watcher's events from `next_rev` on, for keys in `range`, about `limit` at most (cut
    /// between batches), with each event's `prev_kv` if `prev_kv` is set. As the history read
    /// does, an event at or below `compact_revision` has no prev_kv (its previous revision is
    /// compacted; etcd v3rpc `watch.go`).
    pub fn serve(
        &self,
        range: &KeyRange,
        next_rev: i64,
        prev_kv: bool,
        compact_revision: i64,
        limit: usize,
    ) -> Served {
        let mut events = Vec::new();
        let scanned = self.scan(next_rev, prev_kv, limit, |e| {
            if !kv_key(&e.event).is_some_and(|k| range.contains(k)) {
                return 0;
            }
            events.push(EventRecord {
                rev: e.rev,
                sub: e.sub,
                event: e.event_for(prev_kv && e.rev > compact_revision),
            });
            1
        });
        match scanned {
            Scanned::Through(through) => Served::Events(EventBatch { events, through }),
            Scanned::Later => Served::Later,
            Scanned::History => Served::History,
        }
    }
}

/// A view of consecutive batches `(from, through, prev_kv, events)`, for tests of what reads
/// views.
#[cfg(test)]
pub(super) fn test_view(batches: Vec<(i64, i64, bool, Vec<EventRecord>)>) -> FeedView {
    let mut ring = Ring::empty_after(batches[0].0 - 1);
    for (from, through, prev_kv, events) in batches {
        ring.push(FeedBatch::new(from, through, prev_kv, events));
    }
    FeedView {
        start: ring.start,
        through: ring.through,
        batches: ring.batches.into_iter().collect(),
    }
}

/// The key an event is about.
pub(super) fn kv_key(event: &Event) -> Option<&[u8]> {
    event.kv.as_ref().map(|kv| kv.key.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::mvccpb::{event::EventType, KeyValue};

    fn put(rev: i64, key: &str, prev: bool) -> EventRecord {
        let kv = |rev: i64| KeyValue {
            key: key.as_bytes().to_vec(),
            value: vec![b'v'; 4],
            mod_revision: rev,
            ..Default::default()
        };
        EventRecord {
            rev,
            sub: 0,
            event: Event {
                r#type: EventType::Put as i32,
                kv: Some(kv(rev)),
                prev_kv: prev.then(|| kv(rev - 1)),
            },
        }
    }

    fn ring(batches: &[(i64, i64, bool)]) -> Ring {
        let mut ring = Ring::empty_after(batches[0].0 - 1);
        for &(from, through, prev) in batches {
            let events = (from..=through)
                .map(|r| put(r, &format!("k{r}"), prev))
                .collect();
            ring.push(FeedBatch::new(from, through, prev, events));
        }
        ring
    }

    fn view(ring: &Ring) -> FeedView {
        FeedView {
            start: ring.start,
            through: ring.through,
            batches: ring.batches.iter().cloned().collect(),
        }
    }

    fn all() -> KeyRange {
        KeyRange::everything()
    }

    fn revs(served: Served) -> (Vec<i64>, i64) {
        match served {
            Served::Events(b) => (b.events.iter().map(|e| e.rev).collect(), b.through),
            Served::Later => panic!("later"),
            Served::History => panic!("history"),
        }
    }

    #[test]
    fn serves_from_the_watchers_next_revision_through_the_ring() {
        let v = view(&ring(&[(5, 6, false), (7, 9, false)]));
        assert_eq!(
            revs(v.serve(&all(), 6, false, 0, 100)),
            (vec![6, 7, 8, 9], 9)
        );
        let one = KeyRange::from_request(b"k8", b"");
        assert_eq!(revs(v.serve(&one, 5, false, 0, 100)), (vec![8], 9));
        assert!(matches!(v.serve(&all(), 10, false, 0, 100), Served::Later));
        assert!(matches!(v.serve(&all(), 4, false, 0, 100), Served::History));
    }

    #[test]
    fn the_ring_takes_the_handed_batches_that_continue_it() {
        let feed = EventFeed {
            ring: Mutex::new(ring(&[(5, 6, false)])),
            changes: watch::channel(()).1,
            handoff: Arc::default(),
        };
        let handed = |from: i64, through: i64, prev_kv: bool| AppliedEvents {
            from,
            through,
            prev_kv,
            events: (from..=through)
                .map(|r| put(r, &format!("k{r}"), prev_kv))
                .collect(),
        };
        // A gap (8) ends what the ring takes: the feed reads 8 from the shards, and 9 with it.
        feed.take_handed(vec![handed(7, 7, false), handed(9, 9, false)]);
        assert_eq!(feed.through(), 7);
        let v = feed.view(5);
        assert_eq!(revs(v.serve(&all(), 5, false, 0, 100)), (vec![5, 6, 7], 7));
        // A watcher now wants prev_kv: a batch without it is left to the shards' read.
        feed.register(1, 1);
        feed.take_handed(vec![handed(8, 8, false)]);
        assert_eq!(feed.through(), 7);
        feed.take_handed(vec![handed(8, 9, true)]);
        assert_eq!(feed.through(), 9);
    }

    #[test]
    fn a_view_holds_only_the_batches_from_the_streams_earliest_revision() {
        let spec: Vec<(i64, i64, bool)> = (1..=1000).map(|r| (r, r, false)).collect();
        let feed = EventFeed {
            ring: Mutex::new(ring(&spec)),
            changes: watch::channel(()).1,
            handoff: Arc::default(),
        };
        let v = feed.view(998);
        assert_eq!(v.batches.len(), 3);
        assert_eq!(
            revs(v.serve(&all(), 998, false, 0, 100)),
            (vec![998, 999, 1000], 1000)
        );
        assert!(feed.view(1001).batches.is_empty());
        assert!(matches!(
            feed.view(1001).serve(&all(), 1001, false, 0, 100),
            Served::Later
        ));
    }

    #[test]
    fn a_limit_cuts_between_batches() {
        let v = view(&ring(&[(5, 6, false), (7, 9, false)]));
        assert_eq!(revs(v.serve(&all(), 5, false, 0, 2)), (vec![5, 6], 6));
    }

    #[test]
    fn prev_kv_comes_only_from_batches_that_read_it() {
        let v = view(&ring(&[(5, 6, true), (7, 9, false)]));
        assert_eq!(revs(v.serve(&all(), 5, true, 0, 100)), (vec![5, 6], 6));
        assert!(matches!(v.serve(&all(), 7, true, 0, 100), Served::History));
        // Without prev_kv, a batch that has it is served without it.
        match v.serve(&all(), 5, false, 0, 100) {
            Served::Events(b) => assert!(b.events.iter().all(|e| e.event.prev_kv.is_none())),
            _ => panic!("not served"),
        }
        // At the compaction revision, no prev_kv, as a history read answers.
        match v.serve(&all(), 5, true, 5, 100) {
            Served::Events(b) => {
                assert!(b.events[0].event.prev_kv.is_none());
                assert!(b.events[1].event.prev_kv.is_some());
            }
            _ => panic!("not served"),
        }
    }

    #[test]
    fn the_ring_drops_its_oldest_batches_past_its_bound() {
        let mut r = ring(&[(1, 1, false)]);
        let big: Vec<EventRecord> = (2..=RING_EVENTS as i64 + 1)
            .map(|rev| put(rev, "k", false))
            .collect();
        r.push(FeedBatch::new(2, RING_EVENTS as i64 + 1, false, big));
        assert_eq!(r.batches.len(), 1);
        assert_eq!(r.start, 2);
        assert!(matches!(
            view(&r).serve(&all(), 1, false, 0, 10),
            Served::History
        ));
    }
}
