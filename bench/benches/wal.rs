//! WAL micro-benchmarks: `Wal::append` + `Wal::sync` (one write and one `fdatasync`) of a
//! batch of Raft entries with 256-byte payloads, at 1, 8, 64, 256 and 1024 entries per sync.
//!
//! Why: every write is acknowledged only after the Ready that carries it has been appended to
//! the WAL and fsynced (group commit). A lone client pays one full sync per request; under
//! load the batching proposer and raft-rs fold many proposals into one sync. This suite
//! measures that curve: the cost of one sync by batch size, reported per entry
//! (`Throughput::Elements`), so the amortisation is visible directly.
//!
//! Each iteration appends `batch` entries (term 1, consecutive indexes) plus the hard state
//! whose commit index follows them, as the Raft node does for one Ready, then syncs. The WAL
//! lives in a temporary directory on the normal disk (not tmpfs); segment rollover (every
//! 64 MiB, with its own fsyncs) happens as in production and is part of the measured cost.
//! Segments behind the last entry are released after every sync (what the node does after a
//! snapshot), so the disk use stays bounded.
//!
//! `wal_append_sync/<batch>` is the real configuration (fsync on). `wal_append_nofsync/<batch>`
//! is the same with `--unsafe-no-fsync` (write only), to show how much of the cost is the
//! device flush rather than encoding and the `write` call.

mod common;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use metastore::consensus::wal::Wal;
use raft::prelude::{Entry, EntryType, HardState};

const BATCHES: [usize; 5] = [1, 8, 64, 256, 1024];
const PAYLOAD: usize = 256;

fn bench_wal(c: &mut Criterion, group_name: &str, fsync: bool) {
    let mut group = c.benchmark_group(group_name);
    let payload: Vec<u8> = (0..PAYLOAD).map(|i| i as u8).collect();
    for batch in BATCHES {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (mut wal, recovered) = Wal::open(dir.path(), 0, fsync).expect("open the WAL");
        assert!(recovered.entries.is_empty());
        let mut entries: Vec<Entry> = (0..batch)
            .map(|_| {
                let mut e = Entry::default();
                e.set_entry_type(EntryType::EntryNormal);
                e.set_term(1);
                e.set_data(payload.clone().into());
                e
            })
            .collect();
        let mut hs = HardState::default();
        hs.set_term(1);
        hs.set_vote(1);
        let mut last_index = 0u64;
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(BenchmarkId::from_parameter(batch), |b| {
            b.iter(|| {
                for e in entries.iter_mut() {
                    last_index += 1;
                    e.set_index(last_index);
                }
                hs.set_commit(last_index);
                wal.append(black_box(&entries), Some(&hs));
                wal.sync().expect("WAL sync");
                wal.release_to(last_index);
            });
        });
        // What was written must read back. Only the newest segment is left (everything before
        // it was released); recover from just before its first entry.
        let segments = wal.segment_paths();
        assert_eq!(segments.len(), 1, "older segments released");
        let first_index = segment_first_index(&segments[0]);
        drop(wal);
        let (_, recovered) = Wal::open(dir.path(), first_index - 1, fsync).expect("reopen");
        let (count, last) = match recovered.entries.last() {
            Some(e) => (recovered.entries.len() as u64, e.index),
            // The last sync rolled the segment over: it holds only the hard state.
            None => (0, first_index - 1),
        };
        assert_eq!((count, last), (last_index + 1 - first_index, last_index));
        assert!(recovered.entries.iter().all(|e| e.data.len() == PAYLOAD));
        assert_eq!(recovered.hard_state.map(|h| h.commit), Some(last_index));
    }
    group.finish();
}

/// The first entry index a segment file is named after (`<seq:016x>-<first_index:016x>.wal`).
fn segment_first_index(path: &std::path::Path) -> u64 {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .expect("segment name");
    let first = name
        .strip_suffix(".wal")
        .and_then(|s| s.split_once('-'))
        .map(|(_, first)| first)
        .expect("segment name format");
    u64::from_str_radix(first, 16).expect("hex index")
}

fn bench_sync(c: &mut Criterion) {
    bench_wal(c, "wal_append_sync", true);
}

fn bench_nofsync(c: &mut Criterion) {
    bench_wal(c, "wal_append_nofsync", false);
}

criterion_group! {
    name = benches;
    config = common::config();
    targets = bench_sync, bench_nofsync
}
criterion_main!(benches);
