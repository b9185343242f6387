//! MVCC store micro-benchmarks: `Store::put` and `Store::range` over each storage engine
//! (`MemoryEngine` and `RocksEngine`), by value size.
//!
//! Why: every write a shard applies is one `Store::put` (which first reads the key's previous
//! version, as etcd does) and every client read is one `Store::range` on each shard it touches.
//! These are the per-key costs the shard executors pay; the rest of a request's latency is
//! Raft, the WAL and the queues (see the other suites).
//!
//! * `mvcc_put/<engine>/<value bytes>`: one put per iteration at the next revision, over a
//!   10,000-key working set (so most puts update a key that already has history). As the shard
//!   does at every apply barrier, the store is flushed with its applied state; here every 64
//!   puts (the RocksDB engine writes its overlay in one write batch then; the memory engine
//!   ignores it). The flush is part of the timed loop. Every 4,096 puts the store is compacted
//!   and purged at the current revision *outside* the timed region, so that each key's history
//!   stays short and memory stays bounded however many iterations criterion asks for.
//! * `mvcc_range_single/<engine>/<value bytes>`: a single-key range (`range_end` empty) at an
//!   explicit revision, over 10,000 preloaded keys, cycling through keys.
//! * `mvcc_range_100/<engine>/<value bytes>`: a 100-key range `[key(i), key(i + 100))` over the
//!   same preloaded keys.
//!
//! RocksDB is opened with `RocksOptions::default()` in a temporary directory. For the range
//! benchmarks the preloaded data is flushed (one write batch with the applied state) and then
//! defragmented (a memtable flush and a full manual compaction) so that reads go to SST files
//! through the block cache, as they do in a store that has been running for a while.

mod common;

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use metastore::mvcc::engine::{Engine, FlushState};
use metastore::mvcc::memory::MemoryEngine;
use metastore::mvcc::rocks::{RocksEngine, RocksOptions};
use metastore::mvcc::store::PutArgs;
use metastore::mvcc::Store;
use metastore::proto::etcdserverpb::RangeRequest;
use tempfile::TempDir;

const VALUE_SIZES: [usize; 4] = [64, 256, 1024, 4096];
/// Distinct keys written by the put benchmark and preloaded for the range benchmarks.
const KEYS: usize = 10_000;
/// Puts between two flushes (the shard flushes at every apply barrier).
const FLUSH_EVERY: i64 = 64;
/// Puts between two (untimed) compactions + purges in the put benchmark.
const PURGE_EVERY: i64 = 4096;
/// Keys per range in `mvcc_range_100`.
const RANGE_KEYS: usize = 100;

#[derive(Clone, Copy)]
enum Kind {
    Memory,
    Rocks,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Memory => "memory",
            Kind::Rocks => "rocksdb",
        }
    }
}

/// A store and, for RocksDB, the directory that must outlive it.
struct Fixture {
    store: Store,
    _dir: Option<TempDir>,
}

fn open(kind: Kind) -> Fixture {
    match kind {
        Kind::Memory => Fixture {
            store: Store::new(Box::new(MemoryEngine::new()) as Box<dyn Engine>),
            _dir: None,
        },
        Kind::Rocks => {
            let dir = tempfile::tempdir().expect("temporary directory");
            let engine =
                RocksEngine::open(dir.path(), &RocksOptions::default()).expect("open RocksDB");
            // The store is dropped before the directory (field order).
            Fixture {
                store: Store::new(Box::new(engine)),
                _dir: Some(dir),
            }
        }
    }
}

fn key(i: usize) -> Vec<u8> {
    format!("key/{i:08}").into_bytes()
}

fn value(size: usize) -> Vec<u8> {
    (0..size).map(|i| b'a' + (i % 26) as u8).collect()
}

/// What a shard's apply barrier does: persist the appended records with the applied state.
fn flush(store: &mut Store, rev: i64) {
    store
        .flush(&FlushState {
            applied_index: rev as u64,
            applied_term: 1,
            revision: rev,
            compact_revision: store.compact_revision(),
            lease_changes: &[],
        })
        .expect("flush");
}

fn put(store: &mut Store, key: &[u8], value: &[u8], rev: i64) {
    let args = PutArgs {
        key,
        value,
        lease: 0,
        ignore_value: false,
        ignore_lease: false,
    };
    black_box(store.put(args, rev, 0).expect("put"));
}

fn bench_put(c: &mut Criterion) {
    let mut group = c.benchmark_group("mvcc_put");
    let keys: Vec<Vec<u8>> = (0..KEYS).map(key).collect();
    for kind in [Kind::Memory, Kind::Rocks] {
        for size in VALUE_SIZES {
            let val = value(size);
            let mut fx = open(kind);
            // Revision 1 is the empty store, as in etcd.
            let mut rev: i64 = 1;
            group.throughput(Throughput::Bytes(size as u64));
            group.bench_function(BenchmarkId::new(kind.name(), size), |b| {
                b.iter_custom(|iters| {
                    let mut timed = Duration::ZERO;
                    let mut start = Instant::now();
                    for _ in 0..iters {
                        rev += 1;
                        put(&mut fx.store, &keys[rev as usize % KEYS], &val, rev);
                        if rev % FLUSH_EVERY == 0 {
                            flush(&mut fx.store, rev);
                        }
                        if rev % PURGE_EVERY == 0 {
                            timed += start.elapsed();
                            fx.store.compact(rev);
                            fx.store.purge(rev).expect("purge");
                            flush(&mut fx.store, rev);
                            start = Instant::now();
                        }
                    }
                    timed + start.elapsed()
                });
            });
            // The last put must be readable with the right value and revision (when the case
            // ran at all: a filter on the command line may skip it).
            if rev > 1 {
                let last = fx
                    .store
                    .get(&keys[rev as usize % KEYS], metastore::mvcc::LATEST)
                    .expect("the engine reads")
                    .expect("the last put is readable");
                assert_eq!((last.mod_revision, last.value.len()), (rev, size));
            }
        }
    }
    group.finish();
}

/// A store holding `KEYS` keys with `size`-byte values, written at revisions 2..=KEYS+1.
/// Returns the fixture and the revision to read at.
fn preloaded(kind: Kind, size: usize) -> (Fixture, i64) {
    let mut fx = open(kind);
    let val = value(size);
    let mut rev = 1;
    for i in 0..KEYS {
        rev += 1;
        put(&mut fx.store, &key(i), &val, rev);
        if rev % 1024 == 0 {
            flush(&mut fx.store, rev);
        }
    }
    flush(&mut fx.store, rev);
    fx.store.defragment();
    (fx, rev)
}

fn bench_range(c: &mut Criterion) {
    for kind in [Kind::Memory, Kind::Rocks] {
        for size in VALUE_SIZES {
            let (fx, rev) = preloaded(kind, size);
            let store = &fx.store;

            let singles: Vec<RangeRequest> = (0..KEYS)
                .map(|i| RangeRequest {
                    key: key(i),
                    ..Default::default()
                })
                .collect();
            let first = store
                .range(&singles[0], rev)
                .expect("storage")
                .expect("range");
            assert_eq!((first.count, first.kvs[0].value.len()), (1, size));
            let mut group = c.benchmark_group("mvcc_range_single");
            group.throughput(Throughput::Elements(1));
            let mut i = 0;
            group.bench_function(BenchmarkId::new(kind.name(), size), |b| {
                b.iter(|| {
                    // A stride prime to KEYS visits every key.
                    i = (i + 7919) % KEYS;
                    black_box(
                        store
                            .range(&singles[i], rev)
                            .expect("storage")
                            .expect("range"),
                    )
                });
            });
            group.finish();

            let spans: Vec<RangeRequest> = (0..KEYS - RANGE_KEYS)
                .map(|i| RangeRequest {
                    key: key(i),
                    range_end: key(i + RANGE_KEYS),
                    ..Default::default()
                })
                .collect();
            let first = store
                .range(&spans[0], rev)
                .expect("storage")
                .expect("range");
            assert_eq!(
                (first.count, first.kvs.len()),
                (RANGE_KEYS as i64, RANGE_KEYS)
            );
            let mut group = c.benchmark_group("mvcc_range_100");
            group.throughput(Throughput::Elements(RANGE_KEYS as u64));
            let mut i = 0;
            group.bench_function(BenchmarkId::new(kind.name(), size), |b| {
                b.iter(|| {
                    i = (i + 7919) % spans.len();
                    black_box(
                        store
                            .range(&spans[i], rev)
                            .expect("storage")
                            .expect("range"),
                    )
                });
            });
            group.finish();
        }
    }
}

criterion_group! {
    name = benches;
    config = common::config();
    targets = bench_put, bench_range
}
criterion_main!(benches);
