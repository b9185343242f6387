//! Multi-version concurrency control: the key history every shard keeps.
//!
//! Each key carries `create_revision`, `mod_revision` and `version` (etcd's `mvccpb.KeyValue`).
//! Every change appends a version record at the revision the apply dispatcher assigned; a delete
//! appends a tombstone. History stays until compaction. The engines behind [`engine::Engine`]
//! (the memory engine and the RocksDB engine, [`rocks`])
//! only store version records; the etcd semantics (versions, tombstones, compaction bounds,
//! range options, compares) live once, in [`store::Store`], for every engine.

pub mod engine;
pub mod memory;
pub mod range;
pub mod rocks;
pub mod store;

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

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_increments_the_last_byte_below_0xff() {
        assert_eq!(prefix_end(b"lock/"), Some(b"lock0".to_vec()));
        assert_eq!(prefix_end(b"a\xff\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff"), None);
        assert_eq!(prefix_end(b""), None);
    }
}
