//! Raft's view of the log: raft-rs's `MemStorage` (entries since the last compaction, hard
//! state, configuration), with snapshots built by the state machine on demand.
//!
//! `MemStorage::snapshot` would describe a snapshot at the commit index with no data; a
//! follower installing that would silently lose every key. Here, when raft-rs needs a snapshot
//! for a follower its log no longer reaches, the apply dispatcher is asked for a complete
//! image at its applied index ([`ApplyMsg::Image`]). Until that image is ready raft-rs is told
//! the snapshot is temporarily unavailable, and asks again at the follower's next heartbeat
//! response (the pattern TiKV uses with raft-rs).

use std::cell::RefCell;
use std::collections::VecDeque;

use raft::prelude::{Entry, Snapshot};
use raft::storage::{MemStorage, MemStorageCore, RaftState, Storage};
use raft::{GetEntriesContext, StorageError};

use crate::state_machine::{ApplyMsg, SnapshotImage};

/// Where the image for followers stands.
#[derive(Default)]
enum Image {
    #[default]
    None,
    /// Asked of the dispatcher; the answer arrives here.
    Building(flume::Receiver<SnapshotImage>),
    Ready(SnapshotImage),
}

/// The Raft log storage the Raft thread owns.
pub struct RaftStorage {
    mem: MemStorage,
    /// The size of each entry the in-memory log holds, for [`RaftStorage::compact_to_fit`].
    sizes: EntrySizes,
    /// The dispatcher's inbox, for image requests.
    dispatcher: flume::Sender<ApplyMsg>,
    image: RefCell<Image>,
}

/// The data size of each entry in the in-memory log, oldest first, and their sum (bytes).
///
/// Kept beside raft-rs's `MemStorage`, which does not say how many bytes it holds. It follows
/// the log by index: an append drops what it overwrites, a compaction what it removes, so an
/// install of a snapshot that bypasses it leaves stale sizes only until the next compaction.
#[derive(Default)]
struct EntrySizes {
    entries: VecDeque<(u64, u64)>,
    total: u64,
}

impl EntrySizes {
    fn appended(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else {
            return;
        };
        // A leader's conflicting suffix is replaced from the first new index on (Raft §5.3).
        while let Some(&(index, bytes)) = self.entries.back() {
            if index < first.index {
                break;
            }
            self.entries.pop_back();
            self.total -= bytes;
        }
        for e in entries {
            let bytes = (e.data.len() + e.context.len()) as u64;
            self.entries.push_back((e.index, bytes));
            self.total += bytes;
        }
    }

    fn compacted(&mut self, upto: u64) {
        while let Some(&(index, bytes)) = self.entries.front() {
            if index >= upto {
                break;
            }
            self.entries.pop_front();
            self.total -= bytes;
        }
    }

    fn cleared(&mut self) {
        *self = EntrySizes::default();
    }

    /// The index to compact to so that entries of at most `low` bytes remain, once more than
    /// `high` bytes are held; never past `applied`, which stays.
    fn compact_index(&self, high: u64, low: u64, applied: u64) -> Option<u64> {
        if self.total <= high {
            return None;
        }
        let mut remaining = self.total;
        let mut upto = None;
        for &(index, bytes) in &self.entries {
            if remaining <= low || index >= applied {
                break;
            }
            remaining -= bytes;
            upto = Some(index + 1);
        }
        upto
    }
}

impl RaftStorage {
    /// An empty log; images are asked of the dispatcher at `dispatcher`.
    pub fn new(dispatcher: flume::Sender<ApplyMsg>) -> Self {
        RaftStorage {
            mem: MemStorage::default(),
            sizes: EntrySizes::default(),
            dispatcher,
            image: RefCell::default(),
        }
    }

    /// Write access to the in-memory log. Entries are appended and removed through
    /// [`RaftStorage::append`], [`RaftStorage::compact`] and [`RaftStorage::apply_snapshot`],
    /// which keep the log's byte count.
    pub fn wl(&self) -> std::sync::RwLockWriteGuard<'_, MemStorageCore> {
        self.mem.wl()
    }

    /// Appends `entries` to the in-memory log, replacing any it holds from the first new
    /// index on (raft-rs `MemStorageCore::append`, whose errors it returns).
    pub fn append(&mut self, entries: &[Entry]) -> raft::Result<()> {
        self.mem.wl().append(entries)?;
        self.sizes.appended(entries);
        Ok(())
    }

    /// Removes the entries below `upto` from the in-memory log (raft-rs
    /// `MemStorageCore::compact`; `upto` must not pass the last index + 1).
    pub fn compact(&mut self, upto: u64) -> raft::Result<()> {
        self.mem.wl().compact(upto)?;
        self.sizes.compacted(upto);
        Ok(())
    }

    /// Resets the in-memory log to `snap` (raft-rs `MemStorageCore::apply_snapshot`; a
    /// snapshot older than the log fails with `SnapshotOutOfDate`).
    pub fn apply_snapshot(&mut self, snap: Snapshot) -> raft::Result<()> {
        self.mem.wl().apply_snapshot(snap)?;
        self.sizes.cleared();
        Ok(())
    }

    /// When the in-memory log holds more than `high` bytes, compacts it to at most `low`,
    /// keeping every entry from `applied` on. Returns the new first index, if it compacted.
    pub fn compact_to_fit(
        &mut self,
        high: u64,
        low: u64,
        applied: u64,
    ) -> raft::Result<Option<u64>> {
        // Sizes of entries the log no longer holds: none, when every change came through here.
        self.sizes.compacted(self.mem.first_index()?);
        match self.sizes.compact_index(high, low, applied) {
            Some(upto) => {
                self.compact(upto)?;
                Ok(Some(upto))
            }
            None => Ok(None),
        }
    }

    /// Read access to the in-memory log.
    pub fn rl(&self) -> std::sync::RwLockReadGuard<'_, MemStorageCore> {
        self.mem.rl()
    }

    /// Frees the image (it holds a copy of every key), or forgets the one being built: when
    /// no follower is being sent it, or this member no longer leads.
    pub fn release_image(&self) {
        if !matches!(*self.image.borrow(), Image::None) {
            *self.image.borrow_mut() = Image::None;
        }
    }

    /// The ready image, if it can serve follower `to`: the log must still hold every entry
    /// after it, and `to` must be in its configuration (raft-rs refuses a snapshot that does
    /// not name the receiver).
    fn usable_image(&self, to: u64) -> Option<Snapshot> {
        let mut image = self.image.borrow_mut();
        if let Image::Building(rx) = &*image {
            match rx.try_recv() {
                Ok(ready) => *image = Image::Ready(ready),
                Err(flume::TryRecvError::Empty) => return None,
                Err(flume::TryRecvError::Disconnected) => *image = Image::None,
            }
        }
        let Image::Ready(ready) = &*image else {
            return None;
        };
        let first_index = self.mem.first_index().unwrap_or(1);
        let names_to = ready.membership.members.contains_key(&to);
        if ready.index + 1 < first_index || !names_to {
            *image = Image::None;
            return None;
        }
        let mut snap = Snapshot {
            data: ready.data.clone(),
            ..Default::default()
        };
        let meta = snap.mut_metadata();
        meta.index = ready.index;
        meta.term = ready.term;
        meta.set_conf_state(ready.membership.conf_state());
        Some(snap)
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

    /// The image for follower `to`, or `SnapshotTemporarilyUnavailable` while one is built.
    /// raft-rs treats any other error as fatal.
    fn snapshot(&self, _request_index: u64, to: u64) -> raft::Result<Snapshot> {
        if let Some(snap) = self.usable_image(to) {
            return Ok(snap);
        }
        let mut image = self.image.borrow_mut();
        if matches!(*image, Image::None) {
            let (reply, rx) = flume::bounded(1);
            // A full inbox: ask again at the next heartbeat.
            if self.dispatcher.try_send(ApplyMsg::Image(reply)).is_ok() {
                *image = Image::Building(rx);
            }
        }
        Err(raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable,
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::proto::metastorepb::MemberRecord;
    use crate::state_machine::Membership;

    fn member(id: u64) -> MemberRecord {
        MemberRecord {
            id,
            peer_urls: vec![format!("http://127.0.0.1:{id}")],
            ..Default::default()
        }
    }

    fn entry(index: u64, bytes: usize) -> Entry {
        Entry {
            index,
            term: 1,
            data: vec![0; bytes].into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_log_is_compacted_to_fit_its_byte_bound_but_keeps_the_applied_entry() {
        let (tx, _rx) = flume::unbounded();
        let mut storage = RaftStorage::new(tx);
        let entries: Vec<Entry> = (1..=10).map(|i| entry(i, 100)).collect();
        storage.append(&entries).unwrap();
        assert_eq!(storage.sizes.total, 1000);
        // Within the bound: nothing to do.
        assert_eq!(storage.compact_to_fit(1000, 500, 10).unwrap(), None);
        // Over it: compacted to the newest 500 bytes.
        assert_eq!(storage.compact_to_fit(900, 500, 10).unwrap(), Some(6));
        assert_eq!(storage.first_index().unwrap(), 6);
        assert_eq!(storage.sizes.total, 500);
        // Never past the applied index, whose entry stays.
        assert_eq!(storage.compact_to_fit(100, 0, 8).unwrap(), Some(8));
        assert_eq!(storage.first_index().unwrap(), 8);
        assert_eq!(storage.compact_to_fit(100, 0, 8).unwrap(), None);
        // A leader's new suffix replaces the old one's sizes.
        storage.append(&[entry(9, 1000)]).unwrap();
        assert_eq!(storage.last_index().unwrap(), 9);
        assert_eq!(storage.sizes.total, 1100);
        // A snapshot resets the log and its count.
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 20;
        snap.mut_metadata().term = 1;
        storage.apply_snapshot(snap).unwrap();
        assert_eq!(storage.sizes.total, 0);
        assert_eq!(storage.compact_to_fit(0, 0, 20).unwrap(), None);
    }

    #[test]
    fn snapshot_is_built_on_demand_and_checked_against_the_log() {
        let (tx, rx) = flume::unbounded();
        let storage = RaftStorage::new(tx);
        let unavailable = Err(raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable,
        ));
        assert_eq!(storage.snapshot(0, 2), unavailable);
        let Ok(ApplyMsg::Image(reply)) = rx.try_recv() else {
            panic!("an image is asked of the dispatcher");
        };
        // Asked once while it is being built.
        assert_eq!(storage.snapshot(0, 2), unavailable);
        assert!(rx.try_recv().is_err());
        let membership = Arc::new(Membership::from_records(&[member(1), member(2)], &[]));
        reply
            .send(SnapshotImage {
                index: 5,
                term: 2,
                membership,
                data: bytes::Bytes::from_static(b"image"),
            })
            .unwrap();
        let snap = storage.snapshot(0, 2).unwrap();
        assert_eq!(
            (snap.get_metadata().index, snap.get_metadata().term),
            (5, 2)
        );
        assert_eq!(snap.get_metadata().get_conf_state().voters, vec![1, 2]);
        assert_eq!(&snap.data[..], b"image");
        // A member the image does not name needs a newer one.
        assert_eq!(storage.snapshot(0, 3), unavailable);
        assert!(matches!(rx.try_recv(), Ok(ApplyMsg::Image(_))));
        // Released (no longer leading): the next request starts over.
        storage.release_image();
        assert_eq!(storage.snapshot(0, 3), unavailable);
        assert!(matches!(rx.try_recv(), Ok(ApplyMsg::Image(_))));
    }
}
