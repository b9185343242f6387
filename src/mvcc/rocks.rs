//! The RocksDB engine: one RocksDB instance per shard, under
//! `<data-dir>/member/shards/<n>/`.
//!
//! Layout (one keyspace, a one-byte tag first; byte order is logical order):
//!
//! ```text
//! k | escaped key | 00 00 | revision u64 BE | sub u32 BE  -> version record (tombstone or live)
//! r | revision u64 BE | sub u32 BE | key                 -> ()  the revision index (watch)
//! l | lease u64 BE | key                                 -> ()  keys attached to a lease
//! m | name                                               -> the applied state (see flush)
//! FF | "identity"                                        -> which shard this is (see open_shard)
//! ```
//!
//! Keys are escaped (`00` -> `00 FF`, then a `00 00` terminator) so that every version of a key
//! sorts together, in revision order, and keys sort in byte order.
//!
//! Writes between two barriers collect in an in-memory overlay that reads consult first; a
//! barrier writes the overlay and the applied Raft index (with the dispatcher's revision
//! counters and lease table) in ONE RocksDB write batch. So the applied index on disk always
//! describes exactly the data on disk.
//!
//! RocksDB's own WAL stays on, unsynced: the Raft WAL is the fsynced log of record. A killed
//! process loses nothing RocksDB had accepted (its WAL is in the page cache); after a power
//! loss RocksDB recovers a consistent prefix of batches, and the Raft WAL, which is never
//! released past a point RocksDB has flushed to SST files (checkpoints flush first), replays
//! the rest. Either way replay restarts exactly after the applied index on disk.
//!
//! Damaged data is never served as missing data: every read checks RocksDB's status (block
//! checksums are verified on every read), and a failed read or write is a
//! [`StorageError::Engine`] naming the database and RocksDB's message (which names the SST
//! file): the shard stops and the member with it (see [`crate::fatal::FatalError`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rocksdb::{
    BlockBasedOptions, Cache, DBCompressionType, DBRawIterator, Options, ReadOptions, WriteBatch,
    DB,
};

use super::engine::StorageError;
use super::engine::{Engine, FlushState, Live, RecoveredState, VersionRecord};
use crate::proto::metastorepb::LeaseRecord;

pub use crate::config::RocksOptions;

const DATA: u8 = b'k';
const REVS: u8 = b'r';
const LEASES: u8 = b'l';
const META_STATE: &[u8] = b"mstate";
const META_LEASE: &[u8] = b"mlease/";

/// Where a shard database records which shard it is. Its tag byte (0xff) is above every other
/// key's, so [`Engine::clear`] (which installing a leader's snapshot uses) keeps it.
const META_IDENTITY: &[u8] = b"\xffidentity";

/// Which shard of which member a database belongs to, recorded in it when it is created so
/// that a directory holding another shard's data (swapped or copied directories) is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardIdentity {
    /// The member's ID (as in `member/identity`).
    pub member_id: u64,
    /// The shard's index, `0..shards`.
    pub shard: u64,
    /// How many shards the member has (`--shards`).
    pub shards: u64,
}

impl ShardIdentity {
    fn encode(&self) -> Vec<u8> {
        [self.member_id, self.shard, self.shards]
            .iter()
            .flat_map(|w| w.to_be_bytes())
            .collect()
    }

    fn decode(bytes: &[u8]) -> Option<ShardIdentity> {
        let word = |i: usize| {
            bytes
                .get(i * 8..i * 8 + 8)
                .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
        };
        (bytes.len() == 24).then_some(())?;
        Some(ShardIdentity {
            member_id: word(0)?,
            shard: word(1)?,
            shards: word(2)?,
        })
    }
}

impl std::fmt::Display for ShardIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "shard {} of {} of member {:x}",
            self.shard, self.shards, self.member_id
        )
    }
}

/// RocksDB failures when opening a shard's database.
#[derive(Debug, thiserror::Error)]
pub enum RocksError {
    /// RocksDB refused to open (or read) the database: permissions, corruption, a lock held by
    /// another process.
    #[error("rocksdb at {path}: {source}")]
    Rocks {
        /// The database directory.
        path: String,
        /// RocksDB's reason.
        source: rocksdb::Error,
    },
    /// The data directory is initialised but this shard's database is gone: recreating it
    /// empty would serve a fraction of the keys and hand out old revisions again.
    #[error(
        "shard directory {path} is missing (or holds no database) in an initialised data \
         directory; its data is lost: restore the data directory from a backup, or remove this \
         member from the cluster and add it again with an empty data directory"
    )]
    Missing {
        /// The database directory.
        path: String,
    },
    /// The database belongs to another shard or member (directories swapped or copied).
    #[error("shard directory {path} holds {found}, not {expected}; refusing to serve it")]
    WrongShard {
        /// The database directory.
        path: String,
        /// The identity recorded in it.
        found: String,
        /// The identity this member expected.
        expected: ShardIdentity,
    },
}

/// How many versions of one key a range scan walks before it seeks to the one it needs.
const SCAN_VERSIONS_BEFORE_SEEK: usize = 16;

/// A database key and its value, as stored.
type RawEntry = (Vec<u8>, Vec<u8>);

/// A forward walk over one key interval of the database with the unflushed overlay merged
/// over it: one RocksDB iterator and one overlay range, each moved only forward (a seek moves
/// both). An overlay entry wins over the same database key; an overlay `None` hides it.
struct MergedWalk<'a> {
    engine: &'a RocksEngine,
    it: DBRawIterator<'a>,
    over: std::iter::Peekable<std::collections::btree_map::Range<'a, Vec<u8>, Option<Vec<u8>>>>,
    end: Vec<u8>,
}

impl<'a> MergedWalk<'a> {
    /// A walk over `[start, end)`.
    fn new(engine: &'a RocksEngine, start: &[u8], end: &[u8]) -> MergedWalk<'a> {
        let mut it = engine.db.raw_iterator_opt(read_opts());
        it.seek(start);
        MergedWalk {
            engine,
            it,
            over: engine
                .overlay
                .range(start.to_vec()..end.to_vec())
                .peekable(),
            end: end.to_vec(),
        }
    }

    /// Moves on to the first key at or after `target` (which is after the current key).
    fn seek(&mut self, target: &[u8]) {
        if target >= self.end.as_slice() {
            // An empty overlay range: nothing at or past the end is walked.
            let end = self.end.clone();
            self.over = self.engine.overlay.range(end.clone()..end).peekable();
            self.it.seek(&self.end);
            return;
        }
        self.it.seek(target);
        self.over = self
            .engine
            .overlay
            .range(target.to_vec()..self.end.clone())
            .peekable();
    }

    /// The next live (key, value), or `None` at the end of the interval.
    ///
    /// Errors: RocksDB's, when a read fails (a corrupt block, say).
    fn next(&mut self) -> Result<Option<RawEntry>, rocksdb::Error> {
        loop {
            let end = self.end.as_slice();
            let db_key = RocksEngine::iter_key(&self.it)?
                .filter(|k| *k < end)
                .map(<[u8]>::to_vec);
            let over_key = self.over.peek().map(|(k, _)| k.as_slice());
            let take_db = match (&db_key, over_key) {
                (None, None) => return Ok(None),
                (Some(_), None) => true,
                (Some(dk), Some(ok)) => dk.as_slice() < ok,
                (None, Some(_)) => false,
            };
            let (key, value) = if take_db {
                let v = self.it.value().map(<[u8]>::to_vec);
                self.it.next();
                (db_key.expect("checked"), v)
            } else {
                if db_key.as_deref() == over_key {
                    self.it.next();
                }
                let (k, v) = self.over.next().expect("peeked");
                (k.clone(), v.clone())
            };
            if let Some(v) = value {
                return Ok(Some((key, v)));
            }
        }
    }
}

/// Read options for every read: block checksums verified (RocksDB's default, made explicit
/// because a corrupt block must fail the read rather than be skipped).
fn read_opts() -> ReadOptions {
    let mut r = ReadOptions::default();
    r.set_verify_checksums(true);
    r
}

/// A shard's RocksDB instance and its unflushed overlay.
pub struct RocksEngine {
    db: DB,
    /// The database directory, for error messages.
    path: PathBuf,
    /// Writes since the last flush (`None` deletes). Reads see them first.
    overlay: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

fn data_prefix(key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 3);
    out.push(DATA);
    for &b in key {
        out.push(b);
        if b == 0 {
            out.push(0xff);
        }
    }
    out.extend_from_slice(&[0, 0]);
    out
}

fn data_key(key: &[u8], rev: i64, sub: u32) -> Vec<u8> {
    let mut out = data_prefix(key);
    out.extend_from_slice(&(rev as u64).to_be_bytes());
    out.extend_from_slice(&sub.to_be_bytes());
    out
}

/// Splits an encoded data key into (user key, revision, sub).
fn decode_data_key(enc: &[u8]) -> Option<(Vec<u8>, i64, u32)> {
    let body = enc.strip_prefix(&[DATA])?;
    let mut key = Vec::new();
    let mut i = 0;
    while i < body.len() {
        match (body[i], body.get(i + 1)) {
            (0, Some(0)) => {
                let rest = &body[i + 2..];
                if rest.len() != 12 {
                    return None;
                }
                let rev = u64::from_be_bytes(rest[..8].try_into().ok()?) as i64;
                let sub = u32::from_be_bytes(rest[8..].try_into().ok()?);
                return Some((key, rev, sub));
            }
            (0, Some(0xff)) => {
                key.push(0);
                i += 2;
            }
            (b, _) => {
                key.push(b);
                i += 1;
            }
        }
    }
    None
}

fn rev_key(rev: i64, sub: u32, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(13 + key.len());
    out.push(REVS);
    out.extend_from_slice(&(rev as u64).to_be_bytes());
    out.extend_from_slice(&sub.to_be_bytes());
    out.extend_from_slice(key);
    out
}

fn lease_key(lease: i64, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + key.len());
    out.push(LEASES);
    out.extend_from_slice(&(lease as u64).to_be_bytes());
    out.extend_from_slice(key);
    out
}

fn encode_record(r: &VersionRecord) -> Vec<u8> {
    match &r.live {
        None => vec![0],
        Some(l) => {
            let mut out = Vec::with_capacity(25 + l.value.len());
            out.push(1);
            out.extend_from_slice(&l.create_revision.to_be_bytes());
            out.extend_from_slice(&l.version.to_be_bytes());
            out.extend_from_slice(&l.lease.to_be_bytes());
            out.extend_from_slice(&l.value);
            out
        }
    }
}

fn decode_record(rev: i64, sub: u32, v: &[u8]) -> VersionRecord {
    let live = (v.first() == Some(&1) && v.len() >= 25).then(|| Live {
        create_revision: i64::from_be_bytes(v[1..9].try_into().unwrap()),
        version: i64::from_be_bytes(v[9..17].try_into().unwrap()),
        lease: i64::from_be_bytes(v[17..25].try_into().unwrap()),
        value: v[25..].to_vec(),
    });
    VersionRecord {
        mod_revision: rev,
        sub,
        live,
    }
}

/// The smallest byte string greater than every string starting with `prefix`. Every prefix
/// here starts with an ASCII tag byte (`k`, `r`, `l`, `m`), so a finite end always exists.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    super::prefix_end(prefix).expect("tagged prefixes always have an end")
}

impl RocksEngine {
    /// Opens (or creates) the database in `dir`.
    ///
    /// Errors: whatever RocksDB reports (permissions, corruption, a lock held by another
    /// process).
    pub fn open(dir: &Path, opts: &RocksOptions) -> Result<RocksEngine, RocksError> {
        Self::open_with(dir, opts, true)
    }

    /// Opens shard `identity.shard`'s database in `dir`. Only while the data directory is
    /// being initialised (`create`) may the database be missing: it is then created. A new
    /// database records `identity`; an existing one must hold the same (one written before
    /// identities were recorded gets it recorded now).
    ///
    /// Errors: [`RocksError::Missing`] when `dir` holds no database and `create` is false,
    /// [`RocksError::WrongShard`] when it belongs to another shard or member, and whatever
    /// RocksDB reports.
    pub fn open_shard(
        dir: &Path,
        opts: &RocksOptions,
        identity: ShardIdentity,
        create: bool,
    ) -> Result<RocksEngine, RocksError> {
        let path = dir.display().to_string();
        // RocksDB keeps its manifest pointer in CURRENT: without it there is no database.
        if !create && !dir.join("CURRENT").exists() {
            return Err(RocksError::Missing { path });
        }
        let engine = Self::open_with(dir, opts, create)?;
        let rocks = |source| RocksError::Rocks {
            path: path.clone(),
            source,
        };
        match engine.get(META_IDENTITY).map_err(rocks)? {
            Some(found) if ShardIdentity::decode(&found) == Some(identity) => {}
            Some(found) => {
                return Err(RocksError::WrongShard {
                    path,
                    found: ShardIdentity::decode(&found)
                        .map_or_else(|| "an unreadable identity".into(), |i| i.to_string()),
                    expected: identity,
                })
            }
            None => {
                if engine.get(META_STATE).map_err(rocks)?.is_some() {
                    tracing::info!(path = %path, "recording the identity of a shard database written before identities were");
                }
                engine
                    .db
                    .put(META_IDENTITY, identity.encode())
                    .map_err(rocks)?;
            }
        }
        Ok(engine)
    }

    fn open_with(dir: &Path, opts: &RocksOptions, create: bool) -> Result<RocksEngine, RocksError> {
        // Replay RocksDB's own log into the memtable instead of flushing it to a new SST file
        // while opening: a restart then writes next to nothing, which a full disk needs (see
        // `ballast`). The Rust binding has no setter for it; the options string comes first so
        // that everything set below is kept by the options the database holds.
        let mut o = Options::default()
            .get_options_from_string("avoid_flush_during_recovery=true")
            .map_err(|source| RocksError::Rocks {
                path: dir.display().to_string(),
                source,
            })?;
        o.create_if_missing(create);
        // Stop on damage RocksDB detects (its own WAL, file sizes, background reads) instead
        // of carrying on without the damaged part.
        o.set_paranoid_checks(true);
        o.set_write_buffer_size(opts.write_buffer_bytes);
        o.set_compression_type(if opts.compression {
            DBCompressionType::Lz4
        } else {
            DBCompressionType::None
        });
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&Cache::new_lru_cache(opts.block_cache_bytes));
        if opts.bloom_bits_per_key > 0.0 {
            table.set_bloom_filter(opts.bloom_bits_per_key, false);
        }
        o.set_block_based_table_factory(&table);
        let db = DB::open(&o, dir).map_err(|source| RocksError::Rocks {
            path: dir.display().to_string(),
            source,
        })?;
        Ok(RocksEngine {
            db,
            path: dir.to_path_buf(),
            overlay: BTreeMap::new(),
        })
    }

    /// Maps RocksDB's error for `op` ("read", "write") to [`StorageError::Engine`], naming
    /// this database. Clones the path only when there is an error.
    fn failed(&self, op: &'static str) -> impl Fn(rocksdb::Error) -> StorageError + '_ {
        move |error| StorageError::Engine {
            op,
            path: self.path.clone(),
            error,
        }
    }

    /// A database read (the overlay aside), checksums verified.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, rocksdb::Error> {
        self.db.get_opt(key, &read_opts())
    }

    fn db_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.get(key).map_err(self.failed("read"))
    }

    /// The iterator's current key, or `None` at the end of the data. An iterator also stops
    /// being valid when a read fails (a corrupt block); that is an error, never the end.
    fn iter_key<'a>(it: &'a DBRawIterator<'_>) -> Result<Option<&'a [u8]>, rocksdb::Error> {
        if it.valid() {
            return Ok(it.key());
        }
        it.status()?;
        Ok(None)
    }

    /// Every (key, value) with `start <= key < end`, the overlay merged over the database
    /// (an overlay entry wins over the same database key; an overlay `None` hides it).
    /// A failed read (a corrupt block, say) is a [`StorageError::Engine`]; the visitor may have
    /// seen part of the range by then.
    fn scan_raw(
        &self,
        start: &[u8],
        end: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StorageError> {
        self.try_scan_raw(start, end, visit)
            .map_err(self.failed("read"))
    }

    /// [`Self::scan_raw`], returning RocksDB's own error.
    fn try_scan_raw(
        &self,
        start: &[u8],
        end: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), rocksdb::Error> {
        let mut walk = MergedWalk::new(self, start, end);
        while let Some((key, value)) = walk.next()? {
            if !visit(&key, &value) {
                break;
            }
        }
        Ok(())
    }

    /// The greatest data record of `key` at or below `rev`; a failed read is a
    /// [`StorageError::Engine`].
    fn newest_at(&self, key: &[u8], rev: i64) -> Result<Option<VersionRecord>, StorageError> {
        self.try_newest_at(key, rev).map_err(self.failed("read"))
    }

    /// [`Self::newest_at`], returning RocksDB's own error.
    fn try_newest_at(&self, key: &[u8], rev: i64) -> Result<Option<VersionRecord>, rocksdb::Error> {
        let prefix = data_prefix(key);
        let target = data_key(key, rev, u32::MAX);
        let over = self
            .overlay
            .range(prefix.clone()..=target.clone())
            .rev()
            .find_map(|(k, v)| v.as_ref().map(|v| (k.clone(), v.clone())));
        let mut it = self.db.raw_iterator_opt(read_opts());
        it.seek_for_prev(&target);
        let db = Self::iter_key(&it)?
            .filter(|k| k.starts_with(&prefix))
            .map(|k| (k.to_vec(), it.value().unwrap().to_vec()));
        let (k, v) = match (over, db) {
            (Some(o), Some(d)) => {
                if o.0 >= d.0 {
                    o
                } else {
                    d
                }
            }
            (Some(o), None) => o,
            (None, Some(d)) => d,
            (None, None) => return Ok(None),
        };
        Ok(decode_data_key(&k).map(|(_, rev, sub)| decode_record(rev, sub, &v)))
    }

    fn write(&self, batch: WriteBatch) -> Result<(), StorageError> {
        // A failed write would leave memory and disk disagreeing: the shard stops rather than
        // serve that.
        self.db.write(batch).map_err(self.failed("write"))
    }
}

impl Engine for RocksEngine {
    fn name(&self) -> &'static str {
        "rocksdb"
    }

    fn version_at(&self, key: &[u8], rev: i64) -> Result<Option<VersionRecord>, StorageError> {
        self.newest_at(key, rev)
    }

    fn version_exact(
        &self,
        key: &[u8],
        rev: i64,
        sub: u32,
    ) -> Result<Option<VersionRecord>, StorageError> {
        let k = data_key(key, rev, sub);
        let value = match self.overlay.get(&k) {
            Some(over) => over.clone(),
            None => self.db_get(&k)?,
        };
        Ok(value.map(|v| decode_record(rev, sub, &v)))
    }

    fn scan_at(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        rev: i64,
        visit: &mut dyn FnMut(&[u8], &VersionRecord) -> bool,
    ) -> Result<(), StorageError> {
        if end.is_some_and(|e| e <= start) {
            return Ok(());
        }
        let lo = data_prefix(start);
        let hi = match end {
            Some(e) => data_prefix(e),
            None => vec![DATA + 1],
        };
        // One forward pass over the data records, which are in (key, revision) order: each
        // key's newest version at or below `rev` is the last one seen before a newer version
        // or the next key. Past a key's first version above `rev`, or past
        // `SCAN_VERSIONS_BEFORE_SEEK` versions of one key, a seek is cheaper than walking.
        let mut walk = MergedWalk::new(self, &lo, &hi);
        // The key being walked, its newest version at or below `rev` so far, and how many of
        // its versions were walked.
        let mut current: Option<(Vec<u8>, Option<VersionRecord>, usize)> = None;
        let read_error = self.failed("read");
        while let Some((raw, value)) = walk.next().map_err(&read_error)? {
            let Some((key, version_rev, sub)) = decode_data_key(&raw) else {
                continue;
            };
            if current.as_ref().is_none_or(|c| c.0 != key) {
                if let Some((done, Some(record), _)) = current.take() {
                    if !visit(&done, &record) {
                        return Ok(());
                    }
                }
                current = Some((key, None, 0));
            }
            let (key, newest, walked) = current.as_mut().expect("set above");
            *walked += 1;
            if version_rev <= rev && *walked <= SCAN_VERSIONS_BEFORE_SEEK {
                *newest = Some(decode_record(version_rev, sub, &value));
                continue;
            }
            if version_rev <= rev {
                // A long history: seek to the version instead of walking to it.
                *newest = self.newest_at(key, rev)?;
            }
            walk.seek(&prefix_end(&data_prefix(key)));
        }
        if let Some((done, Some(record), _)) = current {
            visit(&done, &record);
        }
        Ok(())
    }

    fn append(&mut self, key: &[u8], record: VersionRecord) {
        self.overlay.insert(
            rev_key(record.mod_revision, record.sub, key),
            Some(Vec::new()),
        );
        self.overlay.insert(
            data_key(key, record.mod_revision, record.sub),
            Some(encode_record(&record)),
        );
    }

    fn changes(
        &self,
        from: i64,
        to: i64,
        visit: &mut dyn FnMut(i64, u32, &[u8]) -> bool,
    ) -> Result<(), StorageError> {
        let start = rev_key(from.max(0), 0, &[]);
        let end = rev_key(to.saturating_add(1), 0, &[]);
        self.scan_raw(&start, &end, &mut |k, _| {
            let rev = u64::from_be_bytes(k[1..9].try_into().unwrap()) as i64;
            let sub = u32::from_be_bytes(k[9..13].try_into().unwrap());
            visit(rev, sub, &k[13..])
        })
    }

    fn set_lease(&mut self, lease: i64, key: &[u8], attached: bool) {
        self.overlay
            .insert(lease_key(lease, key), attached.then(Vec::new));
    }

    fn lease_keys(&self, lease: i64) -> Result<Vec<Vec<u8>>, StorageError> {
        let start = lease_key(lease, &[]);
        let end = prefix_end(&start);
        let mut keys = Vec::new();
        self.scan_raw(&start, &end, &mut |k, _| {
            keys.push(k[9..].to_vec());
            true
        })?;
        Ok(keys)
    }

    fn compact(&mut self, rev: i64) -> Result<(), StorageError> {
        while !self.compact_some(rev, usize::MAX)? {}
        Ok(())
    }

    fn compact_some(&mut self, rev: i64, budget: usize) -> Result<bool, StorageError> {
        // Walk the revision index below `rev`. For each key it names, every data record older
        // than the key's newest record at or below `rev` is invisible to reads at `>= rev`, and
        // so is that newest record when it is a tombstone. Every visited change leaves the
        // index, so the next step starts where this one stopped. A kept version leaves the
        // index too; that is safe because whatever supersedes it later is itself in the index,
        // and purging that change removes everything older of the key (not only the change
        // itself: a kept version that outlived one purge would otherwise come back to life
        // when the purge of its delete removed only the tombstone).
        let mut batch = WriteBatch::default();
        let mut stale = Vec::new();
        self.changes(0, rev - 1, &mut |r, sub, key| {
            stale.push((r, sub, key.to_vec()));
            stale.len() < budget
        })?;
        let done = stale.len() < budget;
        let mut purged_keys = std::collections::HashSet::new();
        for (r, sub, key) in stale {
            batch.delete(rev_key(r, sub, &key));
            self.overlay.remove(&rev_key(r, sub, &key));
            if !purged_keys.insert(key.clone()) {
                continue;
            }
            let Some(newest) = self.newest_at(&key, rev)? else {
                continue;
            };
            // A tombstone below `rev` goes too; one at `rev` stays, as etcd keeps it (etcd
            // issue #18089): a watch from `rev` still gets that delete.
            let end = if newest.live.is_some() || newest.mod_revision == rev {
                data_key(&key, newest.mod_revision, newest.sub)
            } else {
                data_key(&key, newest.mod_revision, newest.sub.saturating_add(1))
            };
            let mut older = Vec::new();
            self.scan_raw(&data_prefix(&key), &end, &mut |k, _| {
                older.push(k.to_vec());
                true
            })?;
            for k in older {
                batch.delete(&k);
                self.overlay.remove(&k);
            }
        }
        self.write(batch)?;
        Ok(done)
    }

    fn export(&self, visit: &mut dyn FnMut(&[u8], &[VersionRecord])) -> Result<(), StorageError> {
        let mut current: Option<(Vec<u8>, Vec<VersionRecord>)> = None;
        self.scan_raw(&[DATA], &[DATA + 1], &mut |k, v| {
            if let Some((key, rev, sub)) = decode_data_key(k) {
                if current.as_ref().is_some_and(|(ck, _)| *ck != key) {
                    let (ck, h) = current.take().unwrap();
                    visit(&ck, &h);
                }
                current
                    .get_or_insert_with(|| (key, Vec::new()))
                    .1
                    .push(decode_record(rev, sub, v));
            }
            true
        })?;
        if let Some((k, h)) = current {
            visit(&k, &h);
        }
        Ok(())
    }

    fn import(&mut self, key: Vec<u8>, history: Vec<VersionRecord>) {
        if let Some(Some(live)) = history.last().map(|r| &r.live) {
            if live.lease != 0 {
                self.set_lease(live.lease, &key, true);
            }
        }
        for r in history {
            self.append(&key, r);
        }
    }

    fn clear(&mut self) -> Result<(), StorageError> {
        self.overlay.clear();
        let mut batch = WriteBatch::default();
        // Every key this engine writes starts with a byte below 0xff (see the prefixes above),
        // except the shard's identity, which stays: the shard is still the same shard.
        batch.delete_range(Vec::<u8>::new(), vec![0xffu8]);
        self.write(batch)
    }

    fn flush(&mut self, state: &FlushState<'_>) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        for (k, v) in std::mem::take(&mut self.overlay) {
            match v {
                Some(v) => batch.put(k, v),
                None => batch.delete(k),
            }
        }
        let mut meta = Vec::with_capacity(32);
        meta.extend_from_slice(&state.applied_index.to_be_bytes());
        meta.extend_from_slice(&state.applied_term.to_be_bytes());
        meta.extend_from_slice(&state.revision.to_be_bytes());
        meta.extend_from_slice(&state.compact_revision.to_be_bytes());
        batch.put(META_STATE, meta);
        for (id, record) in state.lease_changes {
            let key = [META_LEASE, &id.to_be_bytes()].concat();
            match record {
                Some(r) => batch.put(
                    key,
                    [r.ttl.to_be_bytes(), r.remaining_ttl.to_be_bytes()].concat(),
                ),
                None => batch.delete(key),
            }
        }
        self.write(batch)
    }

    fn sync_to_disk(&self) -> Result<(), StorageError> {
        // The WAL first: should the memtable flush fail (a full disk), what the database
        // accepted is still in a synced log.
        self.db.flush_wal(true).map_err(self.failed("flush"))?;
        self.db.flush().map_err(self.failed("flush"))
    }

    fn recover(&self) -> Result<Option<RecoveredState>, StorageError> {
        let Some(meta) = self.db_get(META_STATE)? else {
            return Ok(None);
        };
        let word = |i: usize| u64::from_be_bytes(meta[i * 8..i * 8 + 8].try_into().unwrap());
        let mut leases = Vec::new();
        self.scan_raw(META_LEASE, &prefix_end(META_LEASE), &mut |k, v| {
            let id = i64::from_be_bytes(k[META_LEASE.len()..].try_into().unwrap());
            let ttl = i64::from_be_bytes(v[..8].try_into().unwrap());
            let remaining_ttl = i64::from_be_bytes(v[8..16].try_into().unwrap());
            leases.push(LeaseRecord {
                id,
                ttl,
                remaining_ttl,
            });
            true
        })?;
        Ok(Some(RecoveredState {
            applied_index: word(0),
            applied_term: word(1),
            revision: word(2) as i64,
            compact_revision: word(3) as i64,
            leases,
        }))
    }

    fn size_bytes(&self) -> u64 {
        let prop = |name: &str| self.db.property_int_value(name).ok().flatten().unwrap_or(0);
        prop("rocksdb.total-sst-files-size") + prop("rocksdb.cur-size-all-mem-tables")
    }

    fn size_in_use_bytes(&self) -> u64 {
        let prop = |name: &str| self.db.property_int_value(name).ok().flatten().unwrap_or(0);
        prop("rocksdb.estimate-live-data-size") + prop("rocksdb.cur-size-all-mem-tables")
    }

    fn defragment(&self) {
        if let Err(e) = self.db.flush() {
            tracing::warn!(error = %e, "memtable flush before defragment failed");
        }
        self.db.compact_range::<&[u8], &[u8]>(None, None);
    }

    fn checkpoint(&self, dir: &Path) -> Result<(), StorageError> {
        let cp =
            rocksdb::checkpoint::Checkpoint::new(&self.db).map_err(StorageError::Checkpoint)?;
        cp.create_checkpoint(dir).map_err(StorageError::Checkpoint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mvcc::store::Store;
    use crate::proto::mvccpb::Event;

    #[test]
    fn key_encoding_orders_keys_then_revisions() {
        let a = data_key(b"a", 5, 0);
        let a_later = data_key(b"a", 6, 0);
        let a0b = data_key(b"a\0b", 1, 0);
        let ab = data_key(b"ab", 1, 0);
        assert!(a < a_later && a_later < a0b && a0b < ab);
        assert_eq!(decode_data_key(&a0b), Some((b"a\0b".to_vec(), 1, 0)));
    }

    #[test]
    fn rocksdb_engine_conforms() {
        let dirs = std::cell::RefCell::new(Vec::new());
        crate::mvcc::store::conformance::run(&|| {
            let dir = tempfile::tempdir().unwrap();
            let engine = RocksEngine::open(dir.path(), &RocksOptions::default()).unwrap();
            dirs.borrow_mut().push(dir);
            Box::new(engine)
        });
    }

    /// One step of [`rocksdb_matches_the_memory_engine_at_every_revision`].
    #[derive(Clone, Debug)]
    enum Step {
        Put(u8),
        Delete(u8),
        DeleteAll,
        /// Compact at `current - back`, then purge in steps of `budget` changes.
        Compact {
            back: i64,
            budget: usize,
        },
        Flush,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0u8..4).prop_map(Step::Put),
            2 => (0u8..4).prop_map(Step::Delete),
            1 => Just(Step::DeleteAll),
            2 => (0i64..4, 1usize..4).prop_map(|(back, budget)| Step::Compact { back, budget }),
            1 => Just(Step::Flush),
        ]
    }

    /// Everything a client can read of `s` at `rev`: the whole keyspace, and the events from
    /// `rev` on with their prev_kv.
    fn view(
        s: &Store,
        rev: i64,
        current: i64,
    ) -> (Vec<crate::proto::mvccpb::KeyValue>, Vec<Event>) {
        use crate::proto::etcdserverpb::RangeRequest;
        let all = RangeRequest {
            key: vec![0],
            range_end: vec![0],
            ..Default::default()
        };
        let kvs = s.range(&all, rev).unwrap().unwrap().kvs;
        let range = crate::mvcc::range::KeyRange::from_request(&[0], &[0]);
        let events = s
            .events(&range, rev, current, usize::MAX, true)
            .unwrap()
            .unwrap()
            .events
            .into_iter()
            .map(|e| e.event)
            .collect();
        (kvs, events)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Differential test: after every step, reads at every revision still readable (and
        /// the events from it) are the same on RocksDB as on the memory engine. Found a purge
        /// bringing a deleted key back to life.
        #[test]
        fn rocksdb_matches_the_memory_engine_at_every_revision(
            steps in proptest::collection::vec(step(), 1..60)
        ) {
            use crate::mvcc::memory::MemoryEngine;
            use crate::mvcc::store::PutArgs;
            let dir = tempfile::tempdir().unwrap();
            let rocks = RocksEngine::open(dir.path(), &RocksOptions::default()).unwrap();
            let mut stores = [Store::new(Box::new(MemoryEngine::new())), Store::new(Box::new(rocks))];
            let mut current = 1i64;
            for step in steps {
                match &step {
                    Step::Put(k) => {
                        current += 1;
                        let value = current.to_string();
                        for s in &mut stores {
                            let args = PutArgs {
                                key: &[b'a' + k],
                                value: value.as_bytes(),
                                lease: 0,
                                ignore_value: false,
                                ignore_lease: false,
                            };
                            s.put(args, current, 0).unwrap();
                        }
                    }
                    Step::Delete(_) | Step::DeleteAll => {
                        let (key, end) = match &step {
                            Step::Delete(k) => (vec![b'a' + k], Vec::new()),
                            _ => (vec![0], vec![0]),
                        };
                        let range = crate::mvcc::range::KeyRange::from_request(&key, &end);
                        let deleted = stores[0].delete_range(&range, current + 1, 0).unwrap();
                        let deleted_too = stores[1].delete_range(&range, current + 1, 0).unwrap();
                        proptest::prop_assert_eq!(&deleted, &deleted_too);
                        if !deleted.is_empty() {
                            current += 1;
                        }
                    }
                    Step::Compact { back, budget } => {
                        let at = (current - back).max(1);
                        for s in &mut stores {
                            s.compact(at);
                            while !s.purge_some(at, *budget).unwrap() {}
                        }
                    }
                    Step::Flush => {
                        for s in &mut stores {
                            let state = FlushState {
                                applied_index: current as u64,
                                applied_term: 1,
                                revision: current,
                                compact_revision: s.compact_revision(),
                                lease_changes: &[],
                            };
                            s.flush(&state).unwrap();
                        }
                    }
                }
                for rev in stores[0].compact_revision().max(1)..=current {
                    let want = view(&stores[0], rev, current);
                    let have = view(&stores[1], rev, current);
                    proptest::prop_assert_eq!(have, want, "at revision {} after {:?}", rev, step);
                }
            }
        }
    }

    /// A range scan walks a key's versions in one pass and seeks past long histories
    /// (`SCAN_VERSIONS_BEFORE_SEEK`): with 40 versions of one key, some flushed and some in
    /// the overlay, around a short-lived key and a deleted one, every revision reads as on the
    /// memory engine.
    #[test]
    fn a_range_scan_over_long_histories_matches_the_memory_engine() {
        use crate::mvcc::memory::MemoryEngine;
        use crate::mvcc::store::PutArgs;
        let dir = tempfile::tempdir().unwrap();
        let rocks = RocksEngine::open(dir.path(), &RocksOptions::default()).unwrap();
        let mut stores = [
            Store::new(Box::new(MemoryEngine::new())),
            Store::new(Box::new(rocks)),
        ];
        let mut current = 1i64;
        for n in 0..60 {
            let key: &[u8] = match n % 6 {
                1 => b"b",
                4 if n > 30 => b"c",
                _ => b"a",
            };
            current += 1;
            for s in &mut stores {
                let value = current.to_string();
                let args = PutArgs {
                    key,
                    value: value.as_bytes(),
                    lease: 0,
                    ignore_value: false,
                    ignore_lease: false,
                };
                s.put(args, current, 0).unwrap();
                if n == 30 {
                    let state = FlushState {
                        applied_index: current as u64,
                        applied_term: 1,
                        revision: current,
                        compact_revision: 0,
                        lease_changes: &[],
                    };
                    s.flush(&state).unwrap();
                }
            }
            if n == 45 {
                current += 1;
                let b = crate::mvcc::range::KeyRange::from_request(b"b", b"");
                for s in &mut stores {
                    assert_eq!(s.delete_range(&b, current, 0).unwrap().len(), 1);
                }
            }
        }
        for rev in 1..=current {
            assert_eq!(
                view(&stores[1], rev, current),
                view(&stores[0], rev, current),
                "at revision {rev}"
            );
        }
    }

    #[test]
    fn flush_persists_data_with_the_applied_state() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut e = RocksEngine::open(dir.path(), &RocksOptions::default()).unwrap();
            assert!(e.recover().unwrap().is_none());
            let live = Live {
                value: b"v".to_vec(),
                create_revision: 2,
                version: 1,
                lease: 9,
            };
            e.append(
                b"k",
                VersionRecord {
                    mod_revision: 2,
                    sub: 0,
                    live: Some(live),
                },
            );
            e.set_lease(9, b"k", true);
            let lease = LeaseRecord {
                id: 9,
                ttl: 30,
                remaining_ttl: 0,
            };
            let changes = [(9, Some(lease))];
            e.flush(&FlushState {
                applied_index: 7,
                applied_term: 2,
                revision: 2,
                compact_revision: 0,
                lease_changes: &changes,
            })
            .unwrap();
            // Appended after the flush and never flushed: lost with the process.
            e.append(
                b"k",
                VersionRecord {
                    mod_revision: 3,
                    sub: 0,
                    live: None,
                },
            );
        }
        let e = RocksEngine::open(dir.path(), &RocksOptions::default()).unwrap();
        let state = e.recover().unwrap().unwrap();
        assert_eq!(
            (state.applied_index, state.applied_term, state.revision),
            (7, 2, 2)
        );
        assert_eq!(
            state.leases,
            vec![LeaseRecord {
                id: 9,
                ttl: 30,
                remaining_ttl: 0
            }]
        );
        assert_eq!(e.version_at(b"k", 10).unwrap().unwrap().mod_revision, 2);
        assert_eq!(e.lease_keys(9).unwrap(), vec![b"k".to_vec()]);
    }

    fn live(value: Vec<u8>, rev: i64) -> VersionRecord {
        VersionRecord {
            mod_revision: rev,
            sub: 0,
            live: Some(Live {
                value,
                create_revision: rev,
                version: 1,
                lease: 0,
            }),
        }
    }

    fn flush_at(e: &mut RocksEngine, index: u64) {
        e.flush(&FlushState {
            applied_index: index,
            applied_term: 1,
            revision: index as i64,
            compact_revision: 0,
            lease_changes: &[],
        })
        .unwrap();
    }

    /// Regression (issue 11): an iterator that stops on a corrupt block was taken as the end
    /// of the data, so scans returned the intact part as if it were all.
    #[test]
    fn a_corrupt_data_block_is_a_read_error_not_the_end_of_the_data() {
        let dir = tempfile::tempdir().unwrap();
        let opts = RocksOptions {
            compression: false,
            ..RocksOptions::default()
        };
        let keys = 2000;
        {
            let mut e = RocksEngine::open(dir.path(), &opts).unwrap();
            for i in 0..keys {
                let key = format!("key/{i:05}");
                e.append(key.as_bytes(), live(vec![b'v'; 100], i as i64 + 2));
            }
            flush_at(&mut e, 1);
            e.defragment(); // into SST files
        }
        let sst = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "sst"))
            .max_by_key(|p| std::fs::metadata(p).unwrap().len())
            .expect("an SST file");
        let mut bytes = std::fs::read(&sst).unwrap();
        // Data blocks come first; a quarter of the way in is inside the `k` records.
        let at = bytes.len() / 4;
        for b in &mut bytes[at..at + 3] {
            *b ^= 0xa5;
        }
        std::fs::write(&sst, &bytes).unwrap();

        let e = RocksEngine::open(dir.path(), &opts).unwrap();
        let mut seen = 0;
        let err = e
            .try_scan_raw(&[DATA], &[DATA + 1], &mut |_, _| {
                seen += 1;
                true
            })
            .expect_err("a scan over a corrupt block must fail");
        assert!(seen < keys, "the damaged block was not read past");
        let msg = err.to_string();
        assert!(msg.contains("Corruption"), "{msg}");
        assert!(
            msg.contains(&sst.display().to_string()),
            "names the file: {msg}"
        );
        // Point reads of the damaged keys fail too (probe every key: some are in that block).
        let failed = (0..keys)
            .filter(|i| {
                e.try_newest_at(format!("key/{i:05}").as_bytes(), i64::MAX)
                    .is_err()
            })
            .count();
        assert!(failed > 0, "no point read hit the damaged block");
    }

    fn identity(shard: u64) -> ShardIdentity {
        ShardIdentity {
            member_id: 0xabc,
            shard,
            shards: 2,
        }
    }

    #[test]
    fn a_shard_database_is_only_created_when_asked_and_keeps_its_identity() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("0");
        let opts = RocksOptions::default();
        let err = RocksEngine::open_shard(&dir, &opts, identity(0), false)
            .err()
            .expect("a missing database is not created");
        assert!(matches!(err, RocksError::Missing { .. }), "{err}");
        assert!(
            err.to_string().contains(&dir.display().to_string()),
            "{err}"
        );
        assert!(!dir.exists());

        {
            let mut e = RocksEngine::open_shard(&dir, &opts, identity(0), true).unwrap();
            e.append(b"k", live(b"v".to_vec(), 2));
            flush_at(&mut e, 3);
            // Installing a leader's snapshot empties the shard; it is still the same shard.
            e.clear().unwrap();
        }
        let e = RocksEngine::open_shard(&dir, &opts, identity(0), false).unwrap();
        assert!(
            e.recover().unwrap().is_none(),
            "clear removed the applied state"
        );
        drop(e);
        let err = RocksEngine::open_shard(&dir, &opts, identity(1), false)
            .err()
            .expect("another shard's database is refused");
        let msg = err.to_string();
        assert!(
            msg.contains("holds shard 0 of 2 of member abc, not shard 1 of 2 of member abc"),
            "{msg}"
        );
        let other_member = ShardIdentity {
            member_id: 0xdef,
            ..identity(0)
        };
        assert!(RocksEngine::open_shard(&dir, &opts, other_member, true).is_err());
    }
}
