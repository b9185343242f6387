//! The storage engine trait that both engines (memory now, RocksDB next) implement.
//!
//! An engine stores *version records*: for each key, the ordered list of its versions, keyed
//! by `mod_revision`. It knows nothing of etcd semantics; [`super::Store`] adds those. This is
//! the split etcd makes between its key index and its backend, reduced to what both a
//! `BTreeMap` and an LSM tree with big-endian `(key, revision)` keys can serve cheaply.

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
/// * versions of one key are appended with strictly increasing `mod_revision`;
/// * `version_at(k, r)` is the newest record of `k` with `mod_revision <= r`, tombstones included;
/// * `compact(r)` drops every record that no read at revision `>= r` can observe.
pub trait Engine {
    /// A short name for logs and status ("memory", "rocksdb").
    fn name(&self) -> &'static str;

    /// The newest record of `key` with `mod_revision <= rev`.
    fn version_at(&self, key: &[u8], rev: i64) -> Option<VersionRecord>;

    /// Visits, in ascending key order, every key in `[start, end)` (`end = None`: unbounded)
    /// together with its newest record at `rev`. The visitor returns `false` to stop early.
    fn scan_at(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        rev: i64,
        visit: &mut dyn FnMut(&[u8], &VersionRecord) -> bool,
    );

    /// Appends a version record to `key`.
    fn append(&mut self, key: &[u8], record: VersionRecord);

    /// Removes history that reads at revisions `>= rev` cannot see: for every key, all records
    /// older than its newest record `<= rev`, and that record too if it is a tombstone.
    fn compact(&mut self, rev: i64);

    /// Visits every key with its full retained history, in key order (for snapshots).
    fn export(&self, visit: &mut dyn FnMut(&[u8], &[VersionRecord]));

    /// Inserts a key's full history (from a snapshot); replaces what the key had.
    fn import(&mut self, key: Vec<u8>, history: Vec<VersionRecord>);

    /// Makes the records appended so far durable and atomic as one unit, tagged with the Raft
    /// index they reflect. The memory engine keeps nothing on disk and ignores it.
    fn flush(&mut self, _applied_index: u64) {}

    /// Approximate bytes held (keys, values and record overhead).
    fn size_bytes(&self) -> u64;
}
