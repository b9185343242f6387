//! One watch stream's watchers, indexed so that an applied batch visits only the watchers its
//! events concern.
//!
//! Most watchers of a stream are *synced*: they have been sent every event through the same
//! revision, the stream's `synced_through`. They keep no revision of their own and are indexed
//! by key (a single-key watcher) or listed apart (a watcher of a range). A batch of new events
//! is then read once for all of them: each event's key finds its watchers in the index, and
//! the whole group moves to the batch's last revision at once. Before this index, every batch
//! made the stream visit every watcher several times over (the earliest revision, the ones
//! behind, one feed read each), which was most of the watch fan-out's cost per event.
//!
//! A watcher that is not synced (created with an older or a future `start_revision`, or one
//! the group could not serve from the feed) keeps its own next revision and is served alone,
//! as before, until it reaches the group's revision and joins it ([`Watchers::settle`]).
//!
//! etcd splits its watchers the same way (`watchableStore`, `synced` and `unsynced` watcher
//! groups, each indexed by key or interval).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::mvcc::store::EventRecord;
use crate::mvcc::KeyRange;
use crate::proto::mvccpb::{event::EventType, Event};

use super::feed::{kv_key, FeedView, Scanned};

/// One watcher: what its client asked for (etcd `WatchCreateRequest`).
pub(super) struct Watcher {
    /// The keys it watches.
    pub range: KeyRange,
    /// `filters` holds `NOPUT`.
    pub no_put: bool,
    /// `filters` holds `NODELETE`.
    pub no_delete: bool,
    /// Its events carry the key's previous version.
    pub prev_kv: bool,
    /// It gets the periodic progress notification while synced.
    pub progress_notify: bool,
    /// A response past `--max-request-bytes` is split for it.
    pub fragment: bool,
    /// Who created it while auth was enabled, with the key and range end it asked for: its
    /// events are sent only while that user may still read them (a role revoked mid-watch
    /// cancels the watch with "etcdserver: permission denied").
    pub reader: Option<(String, Vec<u8>, Vec<u8>)>,
    /// Its own next revision while it is not synced; `None` while it is (its next revision is
    /// then the stream's `synced_through + 1`).
    behind: Option<i64>,
}

impl Watcher {
    /// A watcher with these options; [`Watchers::insert`] places it.
    pub fn new(range: KeyRange) -> Watcher {
        Watcher {
            range,
            no_put: false,
            no_delete: false,
            prev_kv: false,
            progress_notify: false,
            fragment: false,
            reader: None,
            behind: None,
        }
    }

    /// Whether its filters let `event` through (etcd `FilterType`).
    pub fn wants(&self, event: &Event) -> bool {
        Target::of(0, self).wants(event)
    }
}

/// What delivering an event to a synced watcher needs of it, copied into the index so that a
/// batch reads a few contiguous bytes per watcher instead of each watcher's entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Target {
    /// Its watch ID.
    pub id: i64,
    no_put: bool,
    no_delete: bool,
    prev_kv: bool,
    /// A response past `--max-request-bytes` is split for it.
    pub fragment: bool,
}

impl Target {
    fn of(id: i64, w: &Watcher) -> Target {
        Target {
            id,
            no_put: w.no_put,
            no_delete: w.no_delete,
            prev_kv: w.prev_kv,
            fragment: w.fragment,
        }
    }

    /// Whether its filters let `event` through (etcd `FilterType`).
    fn wants(&self, event: &Event) -> bool {
        let put = event.r#type == EventType::Put as i32;
        !(put && self.no_put || !put && self.no_delete)
    }
}

/// What [`Watchers::serve_synced`] gives the synced watchers: each one with events, in watch
/// ID order, with its events in (revision, sub-revision) order, filtered and with `prev_kv` as
/// it asked.
pub(super) type Delivery = Vec<(Target, Vec<Event>)>;

/// A stream's watchers by watch ID, with the synced ones indexed by key.
pub(super) struct Watchers {
    all: BTreeMap<i64, Watcher>,
    /// Every synced watcher has been sent every event through this revision.
    synced_through: i64,
    /// Synced watchers of one key, by that key.
    by_key: HashMap<Vec<u8>, Vec<Target>>,
    /// Synced watchers of a range of keys.
    ranged: Vec<(KeyRange, Target)>,
    /// How many watchers are synced.
    synced: usize,
    /// How many synced watchers want `prev_kv`.
    synced_prev_kv: usize,
    /// The watchers that are not synced.
    unsynced: BTreeSet<i64>,
    /// How many watchers want `prev_kv`.
    prev_kv: usize,
    /// How many watchers were created while auth was enabled.
    readers: usize,
}

impl Watchers {
    /// No watchers yet.
    pub fn new() -> Watchers {
        Watchers {
            all: BTreeMap::new(),
            synced_through: 0,
            by_key: HashMap::new(),
            ranged: Vec::new(),
            synced: 0,
            synced_prev_kv: 0,
            unsynced: BTreeSet::new(),
            prev_kv: 0,
            readers: 0,
        }
    }

    /// How many watchers the stream has.
    pub fn len(&self) -> usize {
        self.all.len()
    }

    /// Whether the stream has none.
    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    /// How many want `prev_kv`.
    pub fn prev_kv(&self) -> usize {
        self.prev_kv
    }

    /// How many were created while auth was enabled.
    pub fn readers(&self) -> usize {
        self.readers
    }

    /// Whether watch ID `id` is in use.
    pub fn contains(&self, id: i64) -> bool {
        self.all.contains_key(&id)
    }

    /// The watcher `id`.
    pub fn get(&self, id: i64) -> Option<&Watcher> {
        self.all.get(&id)
    }

    /// Every watcher, in watch ID order.
    pub fn iter(&self) -> impl Iterator<Item = (i64, &Watcher)> {
        self.all.iter().map(|(id, w)| (*id, w))
    }

    /// The next revision `w` owes its client.
    pub fn next_rev(&self, w: &Watcher) -> i64 {
        w.behind.unwrap_or(self.synced_through + 1)
    }

    /// Adds watcher `id`, which owes its client every event from `next_rev` on. It joins the
    /// synced group if the group is at that revision, or if there is no group yet.
    pub fn insert(&mut self, id: i64, mut w: Watcher, next_rev: i64) {
        self.prev_kv += usize::from(w.prev_kv);
        self.readers += usize::from(w.reader.is_some());
        if self.synced == 0 {
            self.synced_through = next_rev - 1;
        }
        if next_rev == self.synced_through + 1 {
            w.behind = None;
            self.index(id, &w);
        } else {
            w.behind = Some(next_rev);
            self.unsynced.insert(id);
        }
        self.all.insert(id, w);
    }

    /// Removes watcher `id` (canceled, compacted or no longer permitted).
    pub fn remove(&mut self, id: i64) -> Option<Watcher> {
        let w = self.all.remove(&id)?;
        self.prev_kv -= usize::from(w.prev_kv);
        self.readers -= usize::from(w.reader.is_some());
        if w.behind.is_some() {
            self.unsynced.remove(&id);
        } else {
            self.unindex(id, &w);
        }
        Some(w)
    }

    fn index(&mut self, id: i64, w: &Watcher) {
        let target = Target::of(id, w);
        match w.range.single_key() {
            Some(key) => self.by_key.entry(key.to_vec()).or_default().push(target),
            None => self.ranged.push((w.range.clone(), target)),
        }
        self.synced += 1;
        self.synced_prev_kv += usize::from(w.prev_kv);
    }

    fn unindex(&mut self, id: i64, w: &Watcher) {
        match w.range.single_key() {
            Some(key) => {
                if let Some(targets) = self.by_key.get_mut(key) {
                    targets.retain(|t| t.id != id);
                    if targets.is_empty() {
                        self.by_key.remove(key);
                    }
                }
            }
            None => self.ranged.retain(|(_, t)| t.id != id),
        }
        self.synced -= 1;
        self.synced_prev_kv -= usize::from(w.prev_kv);
    }

    /// The earliest revision some watcher is owed.
    pub fn earliest(&self) -> Option<i64> {
        let group = (self.synced > 0).then_some(self.synced_through + 1);
        let alone = self.unsynced.iter().filter_map(|id| self.all[id].behind);
        group.into_iter().chain(alone).min()
    }

    /// How many watchers have not been sent every event through `revision`.
    pub fn behind_at(&self, revision: i64) -> usize {
        let group = if self.synced_through < revision {
            self.synced
        } else {
            0
        };
        let alone = self
            .unsynced
            .iter()
            .filter(|id| self.all[id].behind.is_some_and(|next| next <= revision))
            .count();
        group + alone
    }

    /// Whether some watcher has not been sent every event through `revision`.
    pub fn any_behind(&self, revision: i64) -> bool {
        (self.synced > 0 && self.synced_through < revision)
            || self
                .unsynced
                .iter()
                .any(|id| self.all[id].behind.is_some_and(|next| next <= revision))
    }

    /// The watchers that are not synced and are owed revision `revision` or earlier.
    pub fn unsynced_through(&self, revision: i64) -> Vec<i64> {
        self.unsynced
            .iter()
            .copied()
            .filter(|id| self.all[id].behind.is_some_and(|next| next <= revision))
            .collect()
    }

    /// Records that watcher `id`, not synced, was sent every event before `next_rev`.
    pub fn advance(&mut self, id: i64, next_rev: i64) {
        if let Some(w) = self.all.get_mut(&id) {
            if w.behind.is_some() {
                w.behind = Some(next_rev);
            }
        }
    }

    /// Gives the synced watchers their events from `feed`, at most about `limit` deliveries
    /// (cut between the feed's batches), and moves the group to the last revision served.
    /// `None` when the feed has nothing for them yet. When the feed cannot serve the group
    /// (it is behind the ring, behind `compact_revision`, or wants `prev_kv` a batch lacks),
    /// every synced watcher leaves the group with the group's revision, to be served alone
    /// from the history; `None` then too.
    pub fn serve_synced(
        &mut self,
        feed: &FeedView,
        compact_revision: i64,
        limit: usize,
    ) -> Option<Delivery> {
        if self.synced == 0 {
            return None;
        }
        let next = self.synced_through + 1;
        if next < compact_revision {
            self.unsync_all();
            return None;
        }
        let mut out: BTreeMap<i64, (Target, Vec<Event>)> = BTreeMap::new();
        let (by_key, ranged) = (&self.by_key, &self.ranged);
        let scanned = feed.scan(next, self.synced_prev_kv > 0, limit, |e: &EventRecord| {
            let Some(key) = kv_key(&e.event) else {
                return 0;
            };
            let keyed = by_key.get(key).into_iter().flatten();
            let ranged = ranged
                .iter()
                .filter(|(range, _)| range.contains(key))
                .map(|(_, t)| t);
            let mut taken = 0;
            for t in keyed.chain(ranged) {
                if t.wants(&e.event) {
                    let keep_prev = t.prev_kv && e.rev > compact_revision;
                    let events = &mut out.entry(t.id).or_insert_with(|| (*t, Vec::new())).1;
                    events.push(e.event_for(keep_prev));
                    taken += 1;
                }
            }
            taken
        });
        match scanned {
            Scanned::Through(through) => {
                self.synced_through = through;
                Some(out.into_values().collect())
            }
            Scanned::Later => None,
            Scanned::History => {
                self.unsync_all();
                None
            }
        }
    }

    /// Every synced watcher leaves the group, owing what the group owed.
    fn unsync_all(&mut self) {
        let next = self.synced_through + 1;
        let ids: Vec<i64> = self
            .by_key
            .drain()
            .flat_map(|(_, targets)| targets)
            .chain(self.ranged.drain(..).map(|(_, t)| t))
            .map(|t| t.id)
            .collect();
        for id in ids {
            if let Some(w) = self.all.get_mut(&id) {
                w.behind = Some(next);
                self.unsynced.insert(id);
            }
        }
        self.synced = 0;
        self.synced_prev_kv = 0;
    }

    /// After a pass: the watchers served alone that have reached the group's revision join
    /// it. Without a group, the group starts at `head` (the last revision the feed had), and
    /// those that reached `head` form it.
    pub fn settle(&mut self, head: i64) {
        if self.synced == 0 {
            self.synced_through = head;
        }
        let next = self.synced_through + 1;
        let joining: Vec<i64> = self
            .unsynced
            .iter()
            .copied()
            .filter(|id| self.all[id].behind == Some(next))
            .collect();
        for id in joining {
            self.unsynced.remove(&id);
            let mut w = self
                .all
                .remove(&id)
                .expect("an unsynced watcher is a watcher");
            w.behind = None;
            self.index(id, &w);
            self.all.insert(id, w);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn single(key: &str) -> Watcher {
        Watcher::new(KeyRange::from_request(key.as_bytes(), b""))
    }

    #[test]
    fn watchers_at_the_groups_revision_are_synced_and_others_alone() {
        let mut ws = Watchers::new();
        ws.insert(1, single("a"), 11);
        ws.insert(2, single("b"), 11);
        ws.insert(3, single("a"), 5);
        ws.insert(4, single("c"), 20);
        assert_eq!(ws.earliest(), Some(5));
        assert_eq!(ws.next_rev(ws.get(1).unwrap()), 11);
        assert_eq!(ws.unsynced_through(15), vec![3]);
        assert_eq!(ws.behind_at(10), 1);
        assert_eq!(ws.behind_at(11), 3);
        assert!(ws.any_behind(5));
        assert!(!ws.any_behind(4));
        // 3 catches up to the group and joins it; 4 waits for the group to reach 20.
        ws.advance(3, 11);
        ws.settle(10);
        assert_eq!(ws.unsynced_through(i64::MAX), vec![4]);
        let ids = |targets: &[Target]| targets.iter().map(|t| t.id).collect::<Vec<_>>();
        assert_eq!(ids(&ws.by_key[b"a".as_slice()]), vec![1, 3]);
        ws.remove(1);
        ws.remove(3);
        assert!(!ws.by_key.contains_key(b"a".as_slice()));
        assert_eq!(ws.synced, 1);
    }

    #[test]
    fn without_a_group_the_group_starts_where_the_feed_is() {
        let mut ws = Watchers::new();
        ws.insert(1, single("a"), 7);
        ws.remove(1);
        ws.insert(2, single("a"), 30);
        ws.insert(3, single("a"), 25);
        ws.remove(2);
        // 3 is alone, and no group is left: the next pass starts one where 3 got to.
        ws.advance(3, 41);
        ws.settle(40);
        assert!(ws.unsynced.is_empty());
        assert_eq!(ws.next_rev(ws.get(3).unwrap()), 41);
    }

    fn event(rev: i64, key: &str, put: bool) -> EventRecord {
        use crate::proto::mvccpb::KeyValue;
        let kv = |rev: i64| KeyValue {
            key: key.as_bytes().to_vec(),
            mod_revision: rev,
            ..Default::default()
        };
        let r#type = if put {
            EventType::Put
        } else {
            EventType::Delete
        };
        EventRecord {
            rev,
            sub: 0,
            event: Event {
                r#type: r#type as i32,
                kv: Some(kv(rev)),
                prev_kv: Some(kv(rev - 1)),
            },
        }
    }

    /// Watch IDs with the revisions of the events each got.
    fn got(delivery: Delivery) -> Vec<(i64, Vec<i64>)> {
        delivery
            .into_iter()
            .map(|(t, events)| {
                let revs = events.iter().map(|e| e.kv.as_ref().unwrap().mod_revision);
                (t.id, revs.collect())
            })
            .collect()
    }

    #[test]
    fn a_batch_reaches_the_synced_watchers_of_its_keys_with_their_filters() {
        let events = vec![
            event(11, "a", true),
            event(12, "b", false),
            event(13, "a", false),
        ];
        let feed = super::super::feed::test_view(vec![(11, 13, true, events)]);
        let mut ws = Watchers::new();
        ws.insert(1, single("a"), 11);
        let mut no_delete = single("a");
        no_delete.no_delete = true;
        ws.insert(2, no_delete, 11);
        let mut prefix = Watcher::new(KeyRange::from_request(b"a", b"c"));
        prefix.prev_kv = true;
        ws.insert(3, prefix, 11);
        ws.insert(4, single("c"), 11);
        let delivery = ws.serve_synced(&feed, 0, 100).unwrap();
        let prev: Vec<bool> = delivery[2].1.iter().map(|e| e.prev_kv.is_some()).collect();
        assert_eq!(prev, vec![true, true, true]);
        assert!(delivery[0].1.iter().all(|e| e.prev_kv.is_none()));
        assert_eq!(
            got(delivery),
            vec![(1, vec![11, 13]), (2, vec![11]), (3, vec![11, 12, 13])]
        );
        assert_eq!(ws.next_rev(ws.get(4).unwrap()), 14);
        // Nothing past the feed yet.
        assert!(ws.serve_synced(&feed, 0, 100).is_none());
        assert!(!ws.any_behind(13));
    }

    #[test]
    fn a_group_the_feed_cannot_serve_is_left_to_the_history() {
        let feed = super::super::feed::test_view(vec![(11, 11, false, vec![event(11, "a", true)])]);
        // Behind the ring.
        let mut ws = Watchers::new();
        ws.insert(1, single("a"), 5);
        ws.insert(2, single("b"), 5);
        assert!(ws.serve_synced(&feed, 0, 100).is_none());
        assert_eq!(ws.unsynced_through(5), vec![1, 2]);
        // Behind the compaction.
        let mut ws = Watchers::new();
        ws.insert(1, single("a"), 11);
        assert!(ws.serve_synced(&feed, 12, 100).is_none());
        assert_eq!(ws.unsynced_through(11), vec![1]);
        // Wanting prev_kv the ring's batch lacks.
        let mut ws = Watchers::new();
        let mut w = single("a");
        w.prev_kv = true;
        ws.insert(1, w, 11);
        assert!(ws.serve_synced(&feed, 0, 100).is_none());
        assert_eq!(ws.unsynced_through(11), vec![1]);
    }

    #[test]
    fn counts_follow_inserts_and_removals() {
        let mut ws = Watchers::new();
        let mut w = Watcher::new(KeyRange::from_request(b"a", b"b"));
        w.prev_kv = true;
        w.reader = Some(("u".into(), b"a".to_vec(), b"b".to_vec()));
        ws.insert(1, w, 3);
        ws.insert(2, single("a"), 2);
        assert_eq!((ws.prev_kv(), ws.readers(), ws.len()), (1, 1, 2));
        assert_eq!(ws.ranged.len(), 1);
        ws.unsync_all();
        assert!(ws.ranged.is_empty());
        assert_eq!(ws.unsynced_through(i64::MAX), vec![1, 2]);
        assert!(ws.remove(1).is_some());
        assert!(ws.remove(1).is_none());
        assert_eq!((ws.prev_kv(), ws.readers(), ws.len()), (0, 0, 1));
    }
}
