//! The memory engine: an ordered map from key to its version history.
//!
//! Durability comes from the Raft WAL and snapshots, not from this engine: on restart the
//! state is rebuilt from the latest snapshot plus WAL replay.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::Bound;

use super::engine::StorageError;
use super::engine::{Engine, VersionRecord};

/// Fixed per-record overhead counted by [`Engine::size_bytes`] (revision, sub, lease...), bytes.
const RECORD_OVERHEAD: u64 = 48;

/// A `BTreeMap` of key to versions in ascending `mod_revision`.
#[derive(Default)]
pub struct MemoryEngine {
    /// Keys are boxed slices, not `Vec`s, here and in the indexes below: 8 bytes less per
    /// copy, which over a million keys was 15 MiB of peak RSS (bench/README, issue 17 step 10).
    keys: BTreeMap<Box<[u8]>, Vec<VersionRecord>>,
    bytes: u64,
    /// The revision index: every retained change in (revision, sub-revision, key) order.
    changes: VecDeque<(i64, u32, Box<[u8]>)>,
    /// Live keys attached to each lease.
    leases: HashMap<i64, BTreeSet<Box<[u8]>>>,
}

impl MemoryEngine {
    /// An empty engine.
    pub fn new() -> Self {
        Self::default()
    }
}

fn record_bytes(key: &[u8], r: &VersionRecord) -> u64 {
    key.len() as u64 + r.live.as_ref().map_or(0, |l| l.value.len() as u64) + RECORD_OVERHEAD
}

fn newest_at(history: &[VersionRecord], rev: i64) -> Option<&VersionRecord> {
    let n = history.partition_point(|r| r.mod_revision <= rev);
    n.checked_sub(1).map(|i| &history[i])
}

impl Engine for MemoryEngine {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn clear(&mut self) -> Result<(), StorageError> {
        *self = MemoryEngine::default();
        Ok(())
    }

    fn version_at(&self, key: &[u8], rev: i64) -> Result<Option<VersionRecord>, StorageError> {
        Ok(self.keys.get(key).and_then(|h| newest_at(h, rev)).cloned())
    }

    fn version_exact(
        &self,
        key: &[u8],
        rev: i64,
        sub: u32,
    ) -> Result<Option<VersionRecord>, StorageError> {
        let Some(history) = self.keys.get(key) else {
            return Ok(None);
        };
        let end = history.partition_point(|r| r.mod_revision <= rev);
        Ok(history[..end]
            .iter()
            .rev()
            .take_while(|r| r.mod_revision == rev)
            .find(|r| r.sub == sub)
            .cloned())
    }

    fn scan_at(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        rev: i64,
        visit: &mut dyn FnMut(&[u8], &VersionRecord) -> bool,
    ) -> Result<(), StorageError> {
        if let Some(end) = end {
            if end <= start {
                return Ok(());
            }
        }
        let upper = end.map_or(Bound::Unbounded, Bound::Excluded);
        for (key, history) in self.keys.range::<[u8], _>((Bound::Included(start), upper)) {
            if let Some(record) = newest_at(history, rev) {
                if !visit(key, record) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn append(&mut self, key: &[u8], record: VersionRecord) {
        self.bytes += record_bytes(key, &record);
        self.changes
            .push_back((record.mod_revision, record.sub, key.into()));
        match self.keys.get_mut(key) {
            Some(history) => {
                debug_assert!(history
                    .last()
                    .is_none_or(|l| (l.mod_revision, l.sub) < (record.mod_revision, record.sub)));
                history.push(record);
            }
            None => {
                self.keys.insert(key.into(), vec![record]);
            }
        }
    }

    fn compact(&mut self, rev: i64) -> Result<(), StorageError> {
        let mut freed = 0;
        self.keys.retain(|key, history| {
            let n = history.partition_point(|r| r.mod_revision <= rev);
            if n == 0 {
                return true;
            }
            // Keep the newest record <= rev: reads at >= rev need it. A tombstone below rev
            // goes; one at rev stays, as etcd keeps it (etcd #18274): a watch from rev still
            // gets that delete.
            let newest = &history[n - 1];
            let keep_from = if newest.live.is_some() || newest.mod_revision == rev {
                n - 1
            } else {
                n
            };
            for r in history.drain(..keep_from) {
                freed += record_bytes(key, &r);
            }
            !history.is_empty()
        });
        self.bytes -= freed;
        let below = self.changes.partition_point(|c| c.0 < rev);
        self.changes.drain(..below);
        Ok(())
    }

    fn changes(
        &self,
        from: i64,
        to: i64,
        visit: &mut dyn FnMut(i64, u32, &[u8]) -> bool,
    ) -> Result<(), StorageError> {
        let start = self.changes.partition_point(|c| c.0 < from);
        for (rev, sub, key) in self.changes.range(start..) {
            if *rev > to || !visit(*rev, *sub, key) {
                break;
            }
        }
        Ok(())
    }

    fn set_lease(&mut self, lease: i64, key: &[u8], attached: bool) {
        if attached {
            self.leases.entry(lease).or_default().insert(key.into());
        } else if let Some(keys) = self.leases.get_mut(&lease) {
            keys.remove(key);
            if keys.is_empty() {
                self.leases.remove(&lease);
            }
        }
    }

    fn lease_keys(&self, lease: i64) -> Result<Vec<Vec<u8>>, StorageError> {
        Ok(self
            .leases
            .get(&lease)
            .map_or_else(Vec::new, |k| k.iter().map(|k| k.to_vec()).collect()))
    }

    fn export(&self, visit: &mut dyn FnMut(&[u8], &[VersionRecord])) -> Result<(), StorageError> {
        for (k, h) in &self.keys {
            visit(k, h);
        }
        Ok(())
    }

    fn import(&mut self, key: Vec<u8>, history: Vec<VersionRecord>) {
        let key: Box<[u8]> = key.into();
        let added: u64 = history.iter().map(|r| record_bytes(&key, r)).sum();
        for r in &history {
            self.changes.push_back((r.mod_revision, r.sub, key.clone()));
        }
        if let Some(Some(live)) = history.last().map(|r| &r.live) {
            if live.lease != 0 {
                self.set_lease(live.lease, &key, true);
            }
        }
        if let Some(old) = self.keys.insert(key.clone(), history) {
            self.bytes -= old.iter().map(|r| record_bytes(&key, r)).sum::<u64>();
        }
        self.bytes += added;
    }

    fn finish_import(&mut self) {
        self.changes.make_contiguous().sort_unstable();
    }

    fn size_bytes(&self) -> u64 {
        self.bytes
    }
}
