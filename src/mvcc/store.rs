//! etcd's MVCC semantics over any [`Engine`]: puts, deletes with tombstones, reads at a
//! revision, compaction bounds, range options and txn compares.
//!
//! A `Store` holds one shard's part of the keyspace. Revisions are never chosen here: the apply
//! dispatcher assigns them in log order and passes them in, which keeps every replica identical.

use super::engine::StorageError;
use super::engine::{Engine, FlushState, Live, RecoveredState, VersionRecord};
use super::range::{passes_filters, pushdown_limit, KeyRange, PartialRange, RangeEnd};
use crate::error::EtcdError;
use crate::proto::etcdserverpb::{compare, Compare, RangeRequest};
use crate::proto::mvccpb::{event::EventType, Event, KeyValue};

/// The outcome of one txn compare over the keys of one shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompareEval {
    /// Whether the shard holds any live key the compare names.
    pub any_key: bool,
    /// Whether every such key satisfies the compare.
    pub all_hold: bool,
}

/// One shard's MVCC store.
pub struct Store {
    engine: Box<dyn Engine>,
    /// Reads below this revision fail with ErrCompacted (etcd `compactMainRev`).
    compact_revision: i64,
}

/// A watch event with its position in the history.
#[derive(Clone, Debug, PartialEq)]
pub struct EventRecord {
    /// Revision of the change.
    pub rev: i64,
    /// Order within the revision.
    pub sub: u32,
    /// The event as etcd sends it (`mvccpb.Event`).
    pub event: Event,
}

impl EventRecord {
    /// Bytes of keys and values the event holds (its prev_kv's included).
    pub fn bytes(&self) -> usize {
        let size =
            |kv: &Option<KeyValue>| kv.as_ref().map_or(0, |kv| kv.key.len() + kv.value.len());
        size(&self.event.kv) + size(&self.event.prev_kv)
    }

    /// A copy of the event for one watcher: with its `prev_kv` only if `with_prev_kv`.
    pub fn event_for(&self, with_prev_kv: bool) -> Event {
        Event {
            r#type: self.event.r#type,
            kv: self.event.kv.clone(),
            prev_kv: if with_prev_kv {
                self.event.prev_kv.clone()
            } else {
                None
            },
        }
    }
}

/// Why [`Store::events`] has no answer: its first revision is below the shard's compaction
/// revision (etcd's ErrCompacted, which a watch reports by canceling with `compact_revision`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HistoryCompacted {
    /// The shard's compaction revision when it answered: every revision below it is gone.
    pub compact_revision: i64,
}

/// Events of one shard over a revision window.
#[derive(Clone, Debug, Default)]
pub struct EventBatch {
    /// Events in (revision, sub-revision, key) order.
    pub events: Vec<EventRecord>,
    /// Every event up to this revision (inclusive) is in `events`; a limit cuts only at a
    /// revision boundary, so a revision is never split.
    pub through: i64,
}

/// Puts events from several shards in (revision, sub-revision, key) order: the order of one
/// shard's [`EventBatch`], and the order etcd sends a revision's events in.
pub fn sort_events(events: &mut [EventRecord]) {
    fn key(e: &EventRecord) -> Option<&[u8]> {
        e.event.kv.as_ref().map(|kv| kv.key.as_slice())
    }
    events.sort_by(|a, b| {
        (a.rev, a.sub)
            .cmp(&(b.rev, b.sub))
            .then_with(|| key(a).cmp(&key(b)))
    });
}

fn to_kv(key: &[u8], r: &VersionRecord) -> Option<KeyValue> {
    r.live.as_ref().map(|l| KeyValue {
        key: key.to_vec(),
        create_revision: l.create_revision,
        mod_revision: r.mod_revision,
        version: l.version,
        value: l.value.clone(),
        lease: l.lease,
    })
}

fn end_of(range: &KeyRange) -> Option<&[u8]> {
    match &range.end {
        RangeEnd::Before(end) => Some(end),
        _ => None,
    }
}

impl Store {
    /// Wraps an engine.
    pub fn new(engine: Box<dyn Engine>) -> Self {
        Store {
            engine,
            compact_revision: 0,
        }
    }

    /// The engine's name.
    pub fn engine_name(&self) -> &'static str {
        self.engine.name()
    }

    /// The revision this store was last compacted at (0 = never).
    pub fn compact_revision(&self) -> i64 {
        self.compact_revision
    }

    /// Approximate bytes held.
    pub fn size_bytes(&self) -> u64 {
        self.engine.size_bytes()
    }

    /// The live key-value of `key` at `rev` ([`super::LATEST`] for the newest).
    pub fn get(&self, key: &[u8], rev: i64) -> Result<Option<KeyValue>, StorageError> {
        Ok(self
            .engine
            .version_at(key, rev)?
            .and_then(|r| to_kv(key, &r)))
    }

    fn visit_live(
        &self,
        range: &KeyRange,
        rev: i64,
        visit: &mut dyn FnMut(KeyValue) -> bool,
    ) -> Result<(), StorageError> {
        if let Some(key) = range.single_key() {
            if let Some(kv) = self.get(key, rev)? {
                visit(kv);
            }
            return Ok(());
        }
        self.engine.scan_at(
            &range.start,
            end_of(range),
            rev,
            &mut |k, r| match to_kv(k, r) {
                Some(kv) => visit(kv),
                None => true,
            },
        )
    }

    /// Writes `key` at revision `rev` and returns the previous live key-value.
    ///
    /// `ignore_value` / `ignore_lease` keep the previous value / lease; the caller has checked
    /// that the key exists (etcd answers ErrKeyNotFound otherwise, before writing anything).
    pub fn put(
        &mut self,
        put: PutArgs<'_>,
        rev: i64,
        sub: u32,
    ) -> Result<Option<KeyValue>, StorageError> {
        let prev = self.get(put.key, super::LATEST)?;
        let (create_revision, version) = match &prev {
            Some(p) => (p.create_revision, p.version + 1),
            None => (rev, 1),
        };
        let value = match (&prev, put.ignore_value) {
            (Some(p), true) => p.value.clone(),
            _ => put.value.to_vec(),
        };
        let lease = match (&prev, put.ignore_lease) {
            (Some(p), true) => p.lease,
            _ => put.lease,
        };
        let live = Live {
            value,
            create_revision,
            version,
            lease,
        };
        self.engine.append(
            put.key,
            VersionRecord {
                mod_revision: rev,
                sub,
                live: Some(live),
            },
        );
        let prev_lease = prev.as_ref().map_or(0, |p| p.lease);
        if prev_lease != lease {
            self.detach(prev_lease, put.key);
            if lease != 0 {
                self.engine.set_lease(lease, put.key, true);
            }
        }
        Ok(prev)
    }

    fn detach(&mut self, lease: i64, key: &[u8]) {
        if lease == 0 {
            return;
        }
        self.engine.set_lease(lease, key, false);
    }

    /// Live keys of this shard attached to `lease`, in key order.
    pub fn lease_keys(&self, lease: i64) -> Result<Vec<Vec<u8>>, StorageError> {
        self.engine.lease_keys(lease)
    }

    /// Deletes every key of this shard attached to `lease` at revision `rev` (a lease revoke or
    /// expiry). Returns the deleted key-values in key order.
    pub fn revoke_lease(
        &mut self,
        lease: i64,
        rev: i64,
        sub: u32,
    ) -> Result<Vec<KeyValue>, StorageError> {
        let keys = self.lease_keys(lease)?;
        let mut deleted = Vec::with_capacity(keys.len());
        for k in &keys {
            deleted.extend(self.get(k, super::LATEST)?);
        }
        self.tombstone(&deleted, rev, sub);
        Ok(deleted)
    }

    fn tombstone(&mut self, deleted: &[KeyValue], rev: i64, sub: u32) {
        for kv in deleted {
            self.engine.append(
                &kv.key,
                VersionRecord {
                    mod_revision: rev,
                    sub,
                    live: None,
                },
            );
            self.detach(kv.lease, &kv.key);
        }
    }

    /// Deletes every live key in `range` at revision `rev`, leaving tombstones. Returns the
    /// deleted key-values in key order.
    pub fn delete_range(
        &mut self,
        range: &KeyRange,
        rev: i64,
        sub: u32,
    ) -> Result<Vec<KeyValue>, StorageError> {
        let mut deleted = Vec::new();
        self.visit_live(range, super::LATEST, &mut |kv| {
            deleted.push(kv);
            true
        })?;
        self.tombstone(&deleted, rev, sub);
        Ok(deleted)
    }

    /// This shard's part of a range read at revision `rev`.
    ///
    /// Errors: the answer is ErrCompacted when `rev` is below the compaction revision; the
    /// outer error is the engine's (fatal to the shard).
    pub fn range(
        &self,
        req: &RangeRequest,
        rev: i64,
    ) -> Result<Result<PartialRange, EtcdError>, StorageError> {
        if rev < self.compact_revision {
            return Ok(Err(EtcdError::Compacted));
        }
        let range = KeyRange::from_request(&req.key, &req.range_end);
        let limit = pushdown_limit(req);
        let mut out = PartialRange::default();
        self.visit_live(&range, rev, &mut |mut kv| {
            out.count += 1;
            if !req.count_only && (limit == 0 || out.kvs.len() < limit) && passes_filters(req, &kv)
            {
                if req.keys_only {
                    kv.value.clear();
                }
                out.kvs.push(kv);
            }
            true
        })?;
        Ok(Ok(out))
    }

    /// Evaluates one txn compare against this shard's keys at revision `rev` (the revision
    /// before the txn: reading it explicitly keeps a replayed entry's answer unchanged).
    pub fn compare(&self, cmp: &Compare, rev: i64) -> Result<CompareEval, StorageError> {
        let range = KeyRange::from_request(&cmp.key, &cmp.range_end);
        let mut eval = CompareEval {
            any_key: false,
            all_hold: true,
        };
        self.visit_live(&range, rev, &mut |kv| {
            eval.any_key = true;
            eval.all_hold &= compare_kv(cmp, &kv);
            eval.all_hold
        })?;
        Ok(eval)
    }

    /// Compacts logically at `rev` (etcd `Compact`): reads below it fail from now on. The
    /// history itself goes with [`Store::purge`], which the dispatcher orders only once every
    /// shard has durably recorded this compaction, so a shard that replays entries after a
    /// crash can still read the revisions they need.
    pub fn compact(&mut self, rev: i64) {
        self.compact_revision = self.compact_revision.max(rev);
    }

    /// Physically removes history that reads at revisions `>= rev` cannot see.
    pub fn purge(&mut self, rev: i64) -> Result<(), StorageError> {
        self.engine.compact(rev.min(self.compact_revision))
    }

    /// One bounded step of [`Store::purge`]; `true` once done.
    pub fn purge_some(&mut self, rev: i64, budget: usize) -> Result<bool, StorageError> {
        self.engine
            .compact_some(rev.min(self.compact_revision), budget)
    }

    /// What a put at `rev` returned, for a shard replaying an entry it had already applied:
    /// the key's previous live version.
    pub fn replayed_put(&self, key: &[u8], rev: i64) -> Result<Option<KeyValue>, StorageError> {
        self.get(key, rev - 1)
    }

    /// What a delete at `rev` deleted, for a shard replaying an entry it had already applied:
    /// the keys in `range` live just before `rev` and tombstoned at `rev`.
    pub fn replayed_delete(
        &self,
        range: &KeyRange,
        rev: i64,
    ) -> Result<Vec<KeyValue>, StorageError> {
        let mut live = Vec::new();
        self.visit_live(range, rev - 1, &mut |kv| {
            live.push(kv);
            true
        })?;
        let mut deleted = Vec::new();
        for kv in live {
            if self
                .engine
                .version_at(&kv.key, rev)?
                .is_some_and(|r| r.mod_revision == rev && r.live.is_none())
            {
                deleted.push(kv);
            }
        }
        Ok(deleted)
    }

    /// What a lease revoke at `rev` deleted, for a shard replaying an entry it had already
    /// applied.
    pub fn replayed_revoke(&self, lease: i64, rev: i64) -> Result<Vec<KeyValue>, StorageError> {
        let mut changed = Vec::new();
        self.engine.changes(rev, rev, &mut |_, _, key| {
            changed.push(key.to_vec());
            true
        })?;
        let mut deleted = Vec::new();
        for key in changed {
            let tombstone = self
                .engine
                .version_at(&key, rev)?
                .is_some_and(|r| r.live.is_none());
            if let Some(prev) = self
                .get(&key, rev - 1)?
                .filter(|p| tombstone && p.lease == lease)
            {
                deleted.push(prev);
            }
        }
        deleted.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(deleted)
    }

    /// The applied state a durable engine recovered (see [`Engine::recover`]).
    pub fn recover(&self) -> Result<Option<RecoveredState>, StorageError> {
        self.engine.recover()
    }

    /// Approximate bytes of live data.
    pub fn size_in_use_bytes(&self) -> u64 {
        self.engine.size_in_use_bytes()
    }

    /// Reclaims space (Defragment).
    pub fn defragment(&self) {
        self.engine.defragment();
    }

    /// Writes an on-disk checkpoint (see [`Engine::checkpoint`]).
    pub fn checkpoint(&self, dir: &std::path::Path) -> Result<(), StorageError> {
        self.engine.checkpoint(dir)
    }

    /// Empties the store (see [`Engine::clear`]) before a snapshot is installed.
    pub fn reset(&mut self) -> Result<(), StorageError> {
        self.engine.clear()?;
        self.compact_revision = 0;
        Ok(())
    }

    /// Restores the compaction revision from a snapshot.
    pub fn set_compact_revision(&mut self, rev: i64) {
        self.compact_revision = rev;
    }

    /// Makes appended records durable with the applied state (see [`Engine::flush`]).
    pub fn flush(&mut self, state: &FlushState<'_>) -> Result<(), StorageError> {
        self.engine.flush(state)
    }

    /// Closes the store: syncs its engine's files ([`Engine::sync_to_disk`]), then drops the
    /// engine (for RocksDB, closes the database), whether the sync worked or not.
    ///
    /// Errors: the sync's (the engine is closed all the same).
    pub fn close(self) -> Result<(), StorageError> {
        let synced = self.engine.sync_to_disk();
        drop(self);
        synced
    }

    /// Visits every key with its retained history.
    pub fn export(
        &self,
        visit: &mut dyn FnMut(&[u8], &[VersionRecord]),
    ) -> Result<(), StorageError> {
        self.engine.export(visit)
    }

    /// Inserts a key's history from a snapshot.
    pub fn import(&mut self, key: Vec<u8>, history: Vec<VersionRecord>) {
        self.engine.import(key, history);
    }

    /// Puts the revision index back in order after a series of [`Store::import`]s.
    pub fn finish_import(&mut self) {
        self.engine.finish_import();
    }

    /// Events for keys in `range` with revisions in `[from, to]`, at most about `limit` of
    /// them (cut only between revisions). `prev_kv` adds each key's previous live version,
    /// except to an event at the compaction revision, whose previous revision is compacted.
    ///
    /// Errors: the answer is [`HistoryCompacted`] (etcd's ErrCompacted), with this shard's
    /// compaction revision, when `from` is below it; the outer error is the engine's (fatal to
    /// the shard).
    pub fn events(
        &self,
        range: &KeyRange,
        from: i64,
        to: i64,
        limit: usize,
        prev_kv: bool,
    ) -> Result<Result<EventBatch, HistoryCompacted>, StorageError> {
        if from < self.compact_revision {
            return Ok(Err(HistoryCompacted {
                compact_revision: self.compact_revision,
            }));
        }
        let mut batch = EventBatch {
            events: Vec::new(),
            through: to,
        };
        let mut cut_at = None;
        let mut failed = None;
        self.engine.changes(from, to, &mut |rev, sub, key| {
            if batch.events.len() >= limit && batch.events.last().is_some_and(|e| e.rev < rev) {
                cut_at = Some(rev - 1);
                return false;
            }
            if range.contains(key) {
                match self.event(rev, sub, key, prev_kv) {
                    Ok(Some(event)) => batch.events.push(event),
                    Ok(None) => {}
                    Err(e) => {
                        failed = Some(e);
                        return false;
                    }
                }
            }
            true
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        if let Some(through) = cut_at {
            batch.through = through;
        }
        Ok(Ok(batch))
    }

    fn event(
        &self,
        rev: i64,
        sub: u32,
        key: &[u8],
        prev_kv: bool,
    ) -> Result<Option<EventRecord>, StorageError> {
        if rev == self.compact_revision {
            // A compaction at `rev` keeps each key's newest version at `rev`, a tombstone too
            // (etcd #18274), and removes any earlier one of the same revision (a txn that put
            // the key, then deleted it): that change is no event, before its purge as after.
            let newest = self.engine.version_at(key, rev)?;
            if newest.is_none_or(|r| (r.mod_revision, r.sub) != (rev, sub)) {
                return Ok(None);
            }
        }
        // The event's own version: a txn that puts a key and then deletes it makes two in
        // one revision, a PUT and a DELETE event.
        let record = self.engine.version_exact(key, rev, sub)?;
        let (kind, kv) = match record.as_ref().and_then(|r| to_kv(key, r)) {
            Some(kv) => (EventType::Put, kv),
            None => {
                let kv = KeyValue {
                    key: key.to_vec(),
                    mod_revision: rev,
                    ..Default::default()
                };
                (EventType::Delete, kv)
            }
        };
        // etcd reads prev_kv at rev - 1 and leaves it out when that read fails with
        // ErrCompacted (v3rpc watch.go; etcd issue #10681). Gating on the compaction revision,
        // not on whether a purge has run yet, gives every member the same answer.
        let prev = if prev_kv && rev > self.compact_revision {
            self.get(key, rev - 1)?
        } else {
            None
        };
        Ok(Some(EventRecord {
            rev,
            sub,
            event: Event {
                r#type: kind as i32,
                kv: Some(kv),
                prev_kv: prev,
            },
        }))
    }
}

/// The arguments of a put, borrowed from the request.
#[derive(Clone, Copy, Debug)]
pub struct PutArgs<'a> {
    /// Key to write.
    pub key: &'a [u8],
    /// New value (ignored with `ignore_value`).
    pub value: &'a [u8],
    /// Lease to attach (ignored with `ignore_lease`).
    pub lease: i64,
    /// Keep the current value.
    pub ignore_value: bool,
    /// Keep the current lease.
    pub ignore_lease: bool,
}

/// etcd's `compareKV`: does `kv` satisfy the compare? A missing key is compared as the zero
/// key-value by the caller (except for VALUE targets, which then fail).
pub fn compare_kv(cmp: &Compare, kv: &KeyValue) -> bool {
    use compare::{CompareResult, CompareTarget, TargetUnion};
    let ord = match CompareTarget::try_from(cmp.target) {
        Ok(CompareTarget::Value) => {
            let v: &[u8] = match &cmp.target_union {
                Some(TargetUnion::Value(v)) => v,
                _ => &[],
            };
            kv.value.as_slice().cmp(v)
        }
        Ok(target) => {
            let (have, want) = match (target, &cmp.target_union) {
                (CompareTarget::Version, Some(TargetUnion::Version(v))) => (kv.version, *v),
                (CompareTarget::Version, _) => (kv.version, 0),
                (CompareTarget::Create, Some(TargetUnion::CreateRevision(v))) => {
                    (kv.create_revision, *v)
                }
                (CompareTarget::Create, _) => (kv.create_revision, 0),
                (CompareTarget::Mod, Some(TargetUnion::ModRevision(v))) => (kv.mod_revision, *v),
                (CompareTarget::Mod, _) => (kv.mod_revision, 0),
                (CompareTarget::Lease, Some(TargetUnion::Lease(v))) => (kv.lease, *v),
                (CompareTarget::Lease, _) => (kv.lease, 0),
                (CompareTarget::Value, _) => unreachable!("handled above"),
            };
            have.cmp(&want)
        }
        Err(_) => std::cmp::Ordering::Equal,
    };
    match CompareResult::try_from(cmp.result) {
        Ok(CompareResult::Equal) => ord.is_eq(),
        Ok(CompareResult::NotEqual) => ord.is_ne(),
        Ok(CompareResult::Greater) => ord.is_gt(),
        Ok(CompareResult::Less) => ord.is_lt(),
        Err(_) => true,
    }
}

/// Combines the per-shard evaluations of one compare (etcd `applyCompare`): with no key at
/// all, the zero key-value is compared, and a VALUE compare fails.
pub fn combine_compare(cmp: &Compare, evals: impl IntoIterator<Item = CompareEval>) -> bool {
    let mut any = false;
    for e in evals {
        if e.any_key {
            any = true;
            if !e.all_hold {
                return false;
            }
        }
    }
    if any {
        return true;
    }
    if cmp.target == compare::CompareTarget::Value as i32 {
        return false;
    }
    compare_kv(cmp, &KeyValue::default())
}

/// The storage conformance suite: every engine must pass it (run via [`conformance::run`]).
pub mod conformance {
    use super::*;

    fn put(s: &mut Store, k: &str, v: &str, rev: i64) -> Option<KeyValue> {
        let args = PutArgs {
            key: k.as_bytes(),
            value: v.as_bytes(),
            lease: 0,
            ignore_value: false,
            ignore_lease: false,
        };
        s.put(args, rev, 0).unwrap()
    }

    fn keys(p: &PartialRange) -> Vec<String> {
        p.kvs
            .iter()
            .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
            .collect()
    }

    fn range(key: &str, end: &str) -> RangeRequest {
        RangeRequest {
            key: key.into(),
            range_end: end.into(),
            ..Default::default()
        }
    }

    /// Runs every check against stores built by `make`.
    pub fn run(make: &dyn Fn() -> Box<dyn Engine>) {
        versions_and_tombstones(Store::new(make()));
        historical_reads_and_compaction(Store::new(make()));
        a_purge_keeps_deletes_of_survivors(Store::new(make()));
        no_prev_kv_at_the_compaction_revision(Store::new(make()));
        events_at_the_compaction_revision(Store::new(make()));
        ranges_limits_and_filters(Store::new(make()));
        export_import_roundtrip(make);
        events_and_lease_index(make);
        reset_empties_everything(Store::new(make()));
    }

    /// A put of `key = "1"` attached to `lease`.
    fn leased_put(key: &[u8], lease: i64) -> PutArgs<'_> {
        PutArgs {
            key,
            value: b"1",
            lease,
            ignore_value: false,
            ignore_lease: false,
        }
    }

    fn reset_empties_everything(mut s: Store) {
        let leased = leased_put(b"b", 9);
        put(&mut s, "a", "1", 2);
        s.put(leased, 3, 0).unwrap();
        s.compact(2);
        s.flush(&crate::mvcc::engine::FlushState {
            applied_index: 7,
            applied_term: 1,
            revision: 3,
            compact_revision: 2,
            lease_changes: &[],
        })
        .unwrap();
        put(&mut s, "c", "1", 4);
        s.reset().unwrap();
        let all = KeyRange::from_request(b"\0", b"\0");
        assert!(s.get(b"a", crate::mvcc::LATEST).unwrap().is_none());
        assert!(s.get(b"c", crate::mvcc::LATEST).unwrap().is_none());
        assert!(s.lease_keys(9).unwrap().is_empty());
        assert_eq!(s.compact_revision(), 0);
        assert!(s
            .events(&all, 1, 10, 100, false)
            .unwrap()
            .unwrap()
            .events
            .is_empty());
        assert!(s.recover().unwrap().is_none(), "the applied state goes too");
        // The store takes writes again from scratch.
        put(&mut s, "a", "2", 2);
        assert_eq!(
            s.get(b"a", crate::mvcc::LATEST).unwrap().unwrap().version,
            1
        );
    }

    fn events_and_lease_index(make: &dyn Fn() -> Box<dyn Engine>) {
        let mut s = Store::new(make());
        let leased = leased_put(b"b", 7);
        put(&mut s, "a", "1", 2);
        s.put(leased, 3, 0).unwrap();
        put(&mut s, "a", "2", 4);
        s.delete_range(&KeyRange::from_request(b"a", b""), 5, 0)
            .unwrap();
        assert_eq!(s.lease_keys(7).unwrap(), vec![b"b".to_vec()]);

        let all = KeyRange::from_request(b"\0", b"\0");
        let batch = s.events(&all, 2, 5, 100, true).unwrap().unwrap();
        let seen: Vec<(i64, i32)> = batch
            .events
            .iter()
            .map(|e| (e.rev, e.event.r#type))
            .collect();
        assert_eq!(seen, vec![(2, 0), (3, 0), (4, 0), (5, 1)]);
        let delete = &batch.events[3].event;
        assert_eq!(delete.prev_kv.as_ref().unwrap().value, b"2");
        assert_eq!(delete.kv.as_ref().unwrap().mod_revision, 5);
        assert_eq!(batch.through, 5);

        // A limit cuts between revisions only.
        let cut = s.events(&all, 2, 5, 2, false).unwrap().unwrap();
        assert_eq!((cut.events.len(), cut.through), (2, 3));

        let revoked = s.revoke_lease(7, 6, 0).unwrap();
        assert_eq!(revoked.len(), 1);
        assert!(s.lease_keys(7).unwrap().is_empty());
        s.compact(4);
        assert_eq!(
            s.events(&all, 3, 6, 100, false).unwrap().unwrap_err(),
            HistoryCompacted {
                compact_revision: 4
            }
        );
        assert_eq!(
            s.events(&all, 4, 6, 100, false)
                .unwrap()
                .unwrap()
                .events
                .len(),
            3
        );

        // The revision index and lease index come back from an export/import.
        let mut t = Store::new(make());
        let leased = leased_put(b"c", 8);
        s.put(leased, 7, 0).unwrap();
        s.export(&mut |k, h| t.import(k.to_vec(), h.to_vec()))
            .unwrap();
        t.finish_import();
        assert_eq!(t.lease_keys(8).unwrap(), vec![b"c".to_vec()]);
        assert_eq!(
            t.events(&all, 6, 7, 100, false)
                .unwrap()
                .unwrap()
                .events
                .len(),
            2
        );
    }

    fn versions_and_tombstones(mut s: Store) {
        assert!(put(&mut s, "a", "1", 2).is_none());
        let prev = put(&mut s, "a", "2", 3).expect("prev kv");
        assert_eq!((prev.value.as_slice(), prev.mod_revision), (&b"1"[..], 2));
        let kv = s.get(b"a", crate::mvcc::LATEST).unwrap().unwrap();
        assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (2, 3, 2));
        let deleted = s
            .delete_range(&KeyRange::from_request(b"a", b""), 4, 0)
            .unwrap();
        assert_eq!(deleted.len(), 1);
        assert!(s.get(b"a", crate::mvcc::LATEST).unwrap().is_none());
        put(&mut s, "a", "3", 5);
        let kv = s.get(b"a", crate::mvcc::LATEST).unwrap().unwrap();
        assert_eq!(
            (kv.create_revision, kv.version),
            (5, 1),
            "a new generation after a delete"
        );
    }

    fn historical_reads_and_compaction(mut s: Store) {
        put(&mut s, "k", "v2", 2);
        put(&mut s, "k", "v3", 3);
        s.delete_range(&KeyRange::from_request(b"k", b""), 4, 0)
            .unwrap();
        put(&mut s, "j", "v5", 5);
        assert_eq!(s.get(b"k", 2).unwrap().unwrap().value, b"v2");
        assert_eq!(s.get(b"k", 3).unwrap().unwrap().value, b"v3");
        assert!(s.get(b"k", 4).unwrap().is_none());
        assert!(s.get(b"j", 4).unwrap().is_none());
        s.compact(3);
        assert!(matches!(
            s.range(&range("k", ""), 2).unwrap(),
            Err(EtcdError::Compacted)
        ));
        assert_eq!(
            s.get(b"k", 3).unwrap().unwrap().value,
            b"v3",
            "the newest version <= compact rev stays"
        );
        s.compact(4);
        s.purge(4).unwrap();
        assert!(s.get(b"k", 4).unwrap().is_none());
        let all = s
            .range(&range("\0", "\0"), crate::mvcc::LATEST)
            .unwrap()
            .unwrap();
        assert_eq!(keys(&all), vec!["j"]);
    }

    /// A version kept by one purge (its key's newest at that revision) must still go when a
    /// later delete of that key is purged: otherwise the key comes back to life.
    fn a_purge_keeps_deletes_of_survivors(mut s: Store) {
        put(&mut s, "k", "v2", 2);
        put(&mut s, "i", "v3", 3);
        s.compact(3);
        s.purge(3).unwrap();
        assert_eq!(s.get(b"k", 3).unwrap().unwrap().value, b"v2");
        s.delete_range(&KeyRange::from_request(b"k", b""), 4, 0)
            .unwrap();
        put(&mut s, "j", "v5", 5);
        s.compact(5);
        s.purge(5).unwrap();
        assert!(
            s.get(b"k", crate::mvcc::LATEST).unwrap().is_none(),
            "a deleted key stays deleted after the purge of its delete"
        );
        assert!(s.get(b"k", 5).unwrap().is_none());
        let all = s
            .range(&range("\0", "\0"), crate::mvcc::LATEST)
            .unwrap()
            .unwrap();
        assert_eq!(keys(&all), vec!["i", "j"]);
    }

    /// An event at the compaction revision has no prev_kv (etcd reads it at a compacted
    /// revision), before the purge as after it: members purge at different times.
    fn no_prev_kv_at_the_compaction_revision(mut s: Store) {
        put(&mut s, "k", "v2", 2);
        put(&mut s, "k", "v3", 3);
        put(&mut s, "k", "v4", 4);
        s.compact(3);
        let all = KeyRange::from_request(b"\0", b"\0");
        let prevs = |s: &Store| -> Vec<Option<i64>> {
            let batch = s.events(&all, 3, 4, 100, true).unwrap().unwrap();
            let prev = |e: &EventRecord| e.event.prev_kv.as_ref().map(|p| p.mod_revision);
            batch.events.iter().map(prev).collect()
        };
        assert_eq!(prevs(&s), vec![None, Some(3)], "before the purge");
        s.purge(3).unwrap();
        assert_eq!(prevs(&s), vec![None, Some(3)], "after the purge");
    }

    /// After a compaction at revision R, a watch from R gets each key's newest change at R, a
    /// delete included (etcd keeps a tombstone at the compaction revision, etcd #18274), and no
    /// earlier change of the same key at R (a txn that put the key, then deleted it): etcd's
    /// compaction removes that one. The same before the purge as after it, since members purge
    /// at different times.
    fn events_at_the_compaction_revision(mut s: Store) {
        let all = KeyRange::from_request(b"\0", b"\0");
        let events = |s: &Store, from: i64| -> Vec<(String, i64, u32, i32)> {
            let batch = s.events(&all, from, 5, 100, false).unwrap().unwrap();
            let ev = |e: &EventRecord| {
                let key = e.event.kv.as_ref().map_or(&[][..], |kv| &kv.key[..]);
                let key = String::from_utf8_lossy(key).into_owned();
                (key, e.rev, e.sub, e.event.r#type)
            };
            batch.events.iter().map(ev).collect()
        };
        let (put_ev, del_ev) = (EventType::Put as i32, EventType::Delete as i32);
        put(&mut s, "d", "v2", 2);
        s.delete_range(&KeyRange::from_request(b"d", b""), 3, 0)
            .unwrap();
        put(&mut s, "t", "v4", 4);
        // One txn at revision 5: a put of "t", then a delete of it.
        let args = PutArgs {
            key: b"t",
            value: b"v5",
            lease: 0,
            ignore_value: false,
            ignore_lease: false,
        };
        s.put(args, 5, 0).unwrap();
        s.delete_range(&KeyRange::from_request(b"t", b""), 5, 1)
            .unwrap();

        s.compact(3);
        let from_3 = vec![
            ("d".to_string(), 3, 0, del_ev),
            ("t".to_string(), 4, 0, put_ev),
            ("t".to_string(), 5, 0, put_ev),
            ("t".to_string(), 5, 1, del_ev),
        ];
        assert_eq!(events(&s, 3), from_3, "before the purge at 3");
        s.purge(3).unwrap();
        assert_eq!(events(&s, 3), from_3, "after the purge at 3");

        s.compact(5);
        let from_5 = vec![("t".to_string(), 5, 1, del_ev)];
        assert_eq!(events(&s, 5), from_5, "before the purge at 5");
        s.purge(5).unwrap();
        assert_eq!(events(&s, 5), from_5, "after the purge at 5");
        assert!(s.get(b"t", crate::mvcc::LATEST).unwrap().is_none());
    }

    fn ranges_limits_and_filters(mut s: Store) {
        for (i, k) in ["a", "b", "c", "d"].iter().enumerate() {
            put(&mut s, k, "v", 2 + i as i64);
        }
        let r = s
            .range(
                &RangeRequest {
                    limit: 2,
                    ..range("a", "z")
                },
                crate::mvcc::LATEST,
            )
            .unwrap()
            .unwrap();
        assert_eq!(
            (keys(&r), r.count),
            (vec!["a".to_string(), "b".into(), "c".into()], 4)
        );
        let r = s
            .range(
                &RangeRequest {
                    min_mod_revision: 4,
                    ..range("a", "z")
                },
                crate::mvcc::LATEST,
            )
            .unwrap()
            .unwrap();
        assert_eq!((keys(&r), r.count), (vec!["c".to_string(), "d".into()], 4));
        let r = s
            .range(
                &RangeRequest {
                    count_only: true,
                    ..range("b", "\0")
                },
                crate::mvcc::LATEST,
            )
            .unwrap()
            .unwrap();
        assert_eq!((r.kvs.len(), r.count), (0, 3));
        let r = s
            .range(&range("b", "a"), crate::mvcc::LATEST)
            .unwrap()
            .unwrap();
        assert_eq!(r.count, 0, "an inverted range is empty");
    }

    fn export_import_roundtrip(make: &dyn Fn() -> Box<dyn Engine>) {
        let mut a = Store::new(make());
        put(&mut a, "x", "1", 2);
        put(&mut a, "x", "2", 3);
        let mut b = Store::new(make());
        a.export(&mut |k, h| b.import(k.to_vec(), h.to_vec()))
            .unwrap();
        assert_eq!(b.get(b"x", 2).unwrap().unwrap().value, b"1");
        assert_eq!(b.get(b"x", 3).unwrap().unwrap().value, b"2");
        assert_eq!(a.size_bytes(), b.size_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mvcc::memory::MemoryEngine;

    #[test]
    fn memory_engine_conforms() {
        conformance::run(&|| Box::new(MemoryEngine::new()));
    }

    #[test]
    fn compare_on_missing_key() {
        let cmp = Compare {
            result: compare::CompareResult::Equal as i32,
            target: compare::CompareTarget::Version as i32,
            key: b"nope".to_vec(),
            target_union: Some(compare::TargetUnion::Version(0)),
            ..Default::default()
        };
        assert!(combine_compare(
            &cmp,
            [CompareEval {
                any_key: false,
                all_hold: true
            }]
        ));
        let value_cmp = Compare {
            target: compare::CompareTarget::Value as i32,
            target_union: None,
            ..cmp
        };
        assert!(!combine_compare(&value_cmp, []));
    }
}
