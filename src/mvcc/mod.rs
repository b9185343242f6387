//! Multi-version concurrency control: the key history every shard keeps.
//!
//! Each key carries `create_revision`, `mod_revision` and `version` (etcd's `mvccpb.KeyValue`).
//! Every change appends a version record at the revision the apply dispatcher assigned; a delete
//! appends a tombstone. History stays until compaction. The engines behind [`engine::Engine`]
//! (the memory engine and the RocksDB engine, [`rocks`])
//! only store version records; the etcd semantics (versions, tombstones, compaction bounds,
//! range options, compares) live once, in [`store::Store`], for every engine.

pub mod ballast;
pub mod engine;
pub mod memory;
pub mod range;
pub mod rocks;
pub mod store;

use engine::VersionRecord;

pub use crate::proto::mvccpb::KeyValue;
pub use range::{KeyRange, RangeEnd};
pub use store::Store;

/// The newest revision: reads "at latest" in the apply path.
pub const LATEST: i64 = i64::MAX;

/// The smallest byte string greater than every string that starts with `prefix` (the
/// `range_end` of etcd clientv3's `WithPrefix`), or `None` when no such string exists because
/// `prefix` is empty or all `0xff` bytes: the range then runs to the end of the keyspace.
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// One key's contribution to HashKV at revision `rev`: every version a read at a revision
/// in `[compact_revision, rev]` can observe, namely all versions in `(compact_revision, rev]`
/// plus the newest live one at or below `compact_revision` (what compaction keeps). Versions
/// the compaction made unobservable are left out whether or not they have been purged yet,
/// so members agree however far their background purge has got.
///
/// Each version is hashed with crc32 (key, revision, sub-revision, value, create_revision,
/// version, lease); the results are added (mod 2^32), which makes the total independent of
/// key order and of how keys are spread over shards.
pub fn kv_hash(key: &[u8], history: &[VersionRecord], rev: i64, compact_revision: i64) -> u32 {
    let kept = history
        .iter()
        .rev()
        .find(|r| r.mod_revision <= compact_revision)
        .filter(|r| r.live.is_some());
    let mut sum = 0u32;
    for r in history.iter().filter(|r| r.mod_revision <= rev) {
        let observable =
            r.mod_revision > compact_revision || kept.is_some_and(|k| std::ptr::eq(k, r));
        if !observable {
            continue;
        }
        let mut h = crc32fast::Hasher::new();
        h.update(&(key.len() as u64).to_le_bytes());
        h.update(key);
        h.update(&r.mod_revision.to_le_bytes());
        h.update(&r.sub.to_le_bytes());
        match &r.live {
            Some(l) => {
                h.update(&[1]);
                h.update(&l.create_revision.to_le_bytes());
                h.update(&l.version.to_le_bytes());
                h.update(&l.lease.to_le_bytes());
                h.update(&l.value);
            }
            None => h.update(&[0]),
        }
        sum = sum.wrapping_add(h.finalize());
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::engine::Live;
    use super::*;

    fn put(rev: i64, value: &str) -> VersionRecord {
        VersionRecord {
            mod_revision: rev,
            sub: 0,
            live: Some(Live {
                value: value.as_bytes().to_vec(),
                create_revision: 1,
                version: rev,
                lease: 0,
            }),
        }
    }

    #[test]
    fn prefix_end_increments_the_last_byte_below_0xff() {
        assert_eq!(prefix_end(b"lock/"), Some(b"lock0".to_vec()));
        assert_eq!(prefix_end(b"a\xff\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff"), None);
        assert_eq!(prefix_end(b""), None);
    }

    #[test]
    fn kv_hash_ignores_what_compaction_hides_and_sees_every_change() {
        let full = vec![put(1, "a"), put(3, "b"), put(5, "c")];
        let purged = vec![put(3, "b"), put(5, "c")];
        assert_eq!(kv_hash(b"k", &full, 5, 4), kv_hash(b"k", &purged, 5, 4));
        assert_ne!(kv_hash(b"k", &full, 5, 0), kv_hash(b"k", &purged, 5, 0));
        assert_ne!(kv_hash(b"k", &full, 5, 4), kv_hash(b"k", &full, 4, 4));
        let changed = vec![put(3, "b"), put(5, "x")];
        assert_ne!(kv_hash(b"k", &purged, 5, 4), kv_hash(b"k", &changed, 5, 4));
        assert_ne!(kv_hash(b"k", &purged, 5, 4), kv_hash(b"j", &purged, 5, 4));
    }
}
