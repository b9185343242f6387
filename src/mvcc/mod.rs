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
