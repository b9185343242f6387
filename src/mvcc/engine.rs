//! The storage engine trait that both engines (memory and RocksDB) implement.
//!
//! An engine stores *version records*: for each key, the ordered list of its versions, keyed
//! by `mod_revision`. It knows nothing of etcd semantics; [`super::Store`] adds those. This is
//! the split etcd makes between its key index and its backend, reduced to what both a
//! `BTreeMap` and an LSM tree with big-endian `(key, revision)` keys can serve cheaply.

use std::path::PathBuf;

use super::rocks::RocksError;
use crate::proto::metastorepb::LeaseRecord;

/// What a flush persists besides the data: the Raft index the data reflects and the
/// dispatcher's replicated counters at that index.
#[derive(Clone, Debug)]
pub struct FlushState<'a> {
    /// Raft index applied.
    pub applied_index: u64,
    /// Term of that entry.
    pub applied_term: u64,
    /// Store revision at that index.
    pub revision: i64,
    /// Compaction revision at that index.
    pub compact_revision: i64,
    /// Leases granted (`Some`) or revoked (`None`) since the previous flush.
    pub lease_changes: &'a [(i64, Option<LeaseRecord>)],
}

/// The applied state a durable engine found on disk.
#[derive(Clone, Debug, PartialEq)]
pub struct RecoveredState {
    /// Raft index applied.
    pub applied_index: u64,
    /// Term of that entry.
    pub applied_term: u64,
    /// Store revision at that index.
    pub revision: i64,
    /// Compaction revision at that index.
    pub compact_revision: i64,
    /// Every granted lease at that index.
    pub leases: Vec<LeaseRecord>,
}

/// The content of a live version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Live {
    /// The value bytes.
    pub value: Vec<u8>,
    /// Revision of the put that created this generation of the key.
    pub create_revision: i64,
    /// Number of puts since the key was (re)created; 1 for the first.
    pub version: i64,
    /// Lease ID attached to the key (0 = none).
    pub lease: i64,
}

/// One version of a key: what a write at `mod_revision` left behind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionRecord {
    /// Revision of the write that produced this version.
    pub mod_revision: i64,
    /// Order of the change within its revision (etcd's sub-revision); used to order events.
    pub sub: u32,
    /// The value, or `None` for a tombstone (a delete).
    pub live: Option<Live>,
}

/// A revisioned key-value engine, owned by exactly one shard (single-threaded, hence no `Send`).
///
/// Contract, checked by the conformance suite in `store.rs` for every engine:
/// * versions of one key are appended with strictly increasing (`mod_revision`, `sub`): one txn
///   may put a key and then delete it (a DeleteRange from a key, whose range end etcd's
///   duplicate check does not see), two versions in one revision;
/// * `version_at(k, r)` is the newest record of `k` with `mod_revision <= r`, tombstones included;
/// * `version_exact(k, r, s)` is the record of `k` written at exactly (`r`, `s`);
/// * `compact(r)` drops every record that no read at revision `>= r` can observe.
///
/// Methods that touch storage return [`StorageError`] (the memory engine never does): the
/// shard that gets one stops and reports it as a [`crate::fatal::FatalError`]. Appends and
/// lease attachments only collect in memory until [`Engine::flush`], so they cannot fail.
pub trait Engine {
    /// A short name for logs and status ("memory", "rocksdb").
    fn name(&self) -> &'static str;

    /// The newest record of `key` with `mod_revision <= rev`.
    fn version_at(&self, key: &[u8], rev: i64) -> Result<Option<VersionRecord>, StorageError>;

    /// The record of `key` written at exactly revision `rev`, sub-revision `sub` (a watch
    /// event's own version), if it is still there.
    fn version_exact(
        &self,
        key: &[u8],
        rev: i64,
        sub: u32,
    ) -> Result<Option<VersionRecord>, StorageError>;

    /// Visits, in ascending key order, every key in `[start, end)` (`end = None`: unbounded)
    /// together with its newest record at `rev`. The visitor returns `false` to stop early.
    fn scan_at(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        rev: i64,
        visit: &mut dyn FnMut(&[u8], &VersionRecord) -> bool,
    ) -> Result<(), StorageError>;

    /// Appends a version record to `key`, and the change to the revision index.
    fn append(&mut self, key: &[u8], record: VersionRecord);

    /// Visits the revision index: every retained change `(revision, sub, key)` with
    /// `from <= revision <= to`, in (revision, sub-revision, key) order. The visitor returns
    /// `false` to stop. Watchers read their events through this.
    fn changes(
        &self,
        from: i64,
        to: i64,
        visit: &mut dyn FnMut(i64, u32, &[u8]) -> bool,
    ) -> Result<(), StorageError>;

    /// Records that `key` is attached to `lease` (`attached`) or no longer is.
    fn set_lease(&mut self, lease: i64, key: &[u8], attached: bool);

    /// Keys attached to `lease`, in key order.
    fn lease_keys(&self, lease: i64) -> Result<Vec<Vec<u8>>, StorageError>;

    /// Removes history that reads at revisions `>= rev` cannot see: for every key, all records
    /// older than its newest record `<= rev`, and that record too if it is a tombstone.
    fn compact(&mut self, rev: i64) -> Result<(), StorageError>;

    /// Like [`Engine::compact`], but does at most about `budget` units of work; returns `true`
    /// once nothing is left. Lets a shard interleave a long purge with reads.
    fn compact_some(&mut self, rev: i64, _budget: usize) -> Result<bool, StorageError> {
        self.compact(rev)?;
        Ok(true)
    }

    /// Visits every key with its full retained history, in key order (for snapshots).
    fn export(&self, visit: &mut dyn FnMut(&[u8], &[VersionRecord])) -> Result<(), StorageError>;

    /// Inserts a key's full history (from a snapshot), its revision-index entries and its
    /// lease attachment; replaces what the key had.
    fn import(&mut self, key: Vec<u8>, history: Vec<VersionRecord>);

    /// Called once after a series of [`Engine::import`]s.
    fn finish_import(&mut self) {}

    /// Removes everything: every key's history, the revision index, lease attachments and,
    /// in a durable engine, the stored applied state and leases (the next flush writes them
    /// anew). A follower does this before installing a leader's snapshot.
    fn clear(&mut self) -> Result<(), StorageError>;

    /// Makes the records appended so far durable and atomic as one unit, together with the
    /// applied state they reflect (one write batch in RocksDB). The memory engine keeps nothing
    /// on disk and ignores it.
    fn flush(&mut self, _state: &FlushState<'_>) -> Result<(), StorageError> {
        Ok(())
    }

    /// Before the engine is closed: moves everything earlier [`Engine::flush`]es handed to the
    /// database into its files, so that a restart finds it without replaying the database's
    /// own log (RocksDB syncs its WAL and flushes its memtables to SST files). Records appended
    /// since the last flush stay unwritten: on disk without the applied state they reflect,
    /// they would be applied twice after a restart, and the Raft WAL holds them anyway. The
    /// memory engine keeps nothing on disk and ignores it.
    fn sync_to_disk(&self) -> Result<(), StorageError> {
        Ok(())
    }

    /// The applied state of the last flush, for a durable engine that has one.
    fn recover(&self) -> Result<Option<RecoveredState>, StorageError> {
        Ok(None)
    }

    /// Approximate bytes of live data (etcd's `dbSizeInUse`).
    fn size_in_use_bytes(&self) -> u64 {
        self.size_bytes()
    }

    /// Reclaims space (etcd Defragment; a full manual compaction in RocksDB).
    fn defragment(&self) {}

    /// Writes a consistent on-disk copy of the flushed state into `dir` (a Raft snapshot that
    /// can be shipped to a follower).
    ///
    /// Errors: [`StorageError::Checkpoint`] (RocksDB's reason), or
    /// [`StorageError::NoCheckpoint`] for an engine that keeps nothing on disk.
    fn checkpoint(&self, _dir: &std::path::Path) -> Result<(), StorageError> {
        Err(StorageError::NoCheckpoint(self.name()))
    }

    /// Approximate bytes held (keys, values and record overhead).
    fn size_bytes(&self) -> u64;
}

/// A storage engine failure: the shard that hit it can no longer serve its data whole.
///
/// Returned by every [`crate::mvcc::engine::Engine`] method that touches storage. The memory
/// engine never fails; RocksDB maps its errors here instead of panicking. Small on purpose
/// (the success path of every engine call carries it): building one allocates only on failure.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// An engine read or write failed: a corrupt block (RocksDB verifies block checksums on
    /// every read; its message names the `.sst` file), a full disk, an I/O error. Serving on
    /// would answer with partial data or let memory and disk disagree, so it is fatal.
    #[error("rocksdb {op} failed in {}: {error}", path.display())]
    Engine {
        /// What failed: "read", "write", or "flush" (see [`Engine::sync_to_disk`]).
        op: &'static str,
        /// The shard's database directory.
        path: PathBuf,
        /// RocksDB's reason (in the message, so not also a `source()`).
        error: rocksdb::Error,
    },
    /// A shard's engine cannot be opened: RocksDB refused it, its database is missing from an
    /// initialised data directory, or it belongs to another shard (see [`RocksError`]).
    #[error(transparent)]
    Open(#[from] RocksError),
    /// A storage I/O error outside the engine proper (creating a shard directory, say);
    /// `context` names the file or directory.
    #[error("{context}: {error}")]
    Io {
        /// The file or directory, and what was being done.
        context: String,
        /// The cause (in the message, so not also a `source()`).
        error: std::io::Error,
    },
    /// A RocksDB checkpoint (the on-disk copy behind a Raft snapshot) could not be written.
    /// Not fatal: the snapshot is retried later.
    #[error("{0}")]
    Checkpoint(rocksdb::Error),
    /// The engine keeps nothing on disk and so cannot write a checkpoint (the memory engine).
    #[error("the {0} engine has no on-disk checkpoints")]
    NoCheckpoint(&'static str),
}

impl StorageError {
    /// Logs the error as the condition that stops the member, at error level and, in case
    /// logging is filtered or off, on stderr too (for an engine failure: "fatal: rocksdb read
    /// failed", with the database directory and RocksDB's message, which names the file).
    pub fn log_fatal(&self) {
        match self {
            StorageError::Engine { op, path, error } => {
                tracing::error!(path = %path.display(), error = %error, "fatal: rocksdb {op} failed");
            }
            other => tracing::error!(error = %other, "fatal: storage failed"),
        }
        eprintln!("metastore: fatal: {self}");
    }
}
