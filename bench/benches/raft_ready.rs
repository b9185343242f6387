//! Raft ready-loop micro-benchmarks: one full round of a single-voter raft-rs `RawNode` over
//! `MemStorage` (propose -> ready -> persist -> advance -> apply committed), by proposal size
//! and by proposals per Ready.
//!
//! Why: every write goes through this loop once on the Raft node thread. Its CPU cost,
//! together with the WAL fsync (see the `wal` suite), bounds how many Readies per second one
//! node handles, and so how much the batching proposer must fold into each.
//!
//! Two groups:
//!
//! * `raft_ready/<mode>/<payload bytes>`: the loop driven in this thread, in the order
//!   `src/consensus/mod.rs` (`RaftNode::on_ready`) uses, minus the WAL (measured on its own in
//!   the `wal` suite): take messages, hand out committed entries, append the Ready's entries
//!   and hard state to `MemStorage`, advance, record the new commit index, hand out the newly
//!   committed entries, `advance_apply`. "Applying" an entry is what the node does with it:
//!   copy its data into a `metastore::apply::CommittedEntry` and (here, instead of sending it
//!   to the dispatcher) walk its length-delimited proposals; every round checks that exactly
//!   the proposals of that round were applied. `RaftNode::on_ready` itself is private and runs
//!   only inside `RaftNode::run`, hence this reproduction. Modes:
//!   * `1`: one proposal, one entry per Ready (a lone client);
//!   * `64_entries`: 64 proposals, each its own raft entry, in one Ready (raft-rs's own
//!     batching);
//!   * `64_packed`: 64 proposals packed into ONE raft entry as length-delimited records, which
//!     is what MetaStore's batching proposer does.
//! * `raft_node_thread/<proposals>/<payload bytes>`: the real `RaftNode` (public API:
//!   `RaftNode::new` + `RaftNode::run` on its own thread, as the server starts it) with its WAL
//!   in a temporary directory and fsync OFF (`--unsafe-no-fsync`), so that what is measured is
//!   the node's loop and the two thread hops (proposal in through `RaftHandle`, committed
//!   entries out through the dispatcher's channel), not the disk. One iteration sends 1 or 64
//!   proposals and waits until all of them come out committed (the node folds whatever queued
//!   up into as few entries as it can, exactly as in production).
//!
//! Log growth is bounded the way the server bounds it: in-thread, `MemStorage` is compacted
//! to the applied index (outside the timed region) every ~32 MiB of log; for the real
//! node, a `SnapshotTaken` notice is sent (what the dispatcher sends after a snapshot), which
//! makes the node compact its log and release WAL segments.

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use metastore::consensus::transport::{Faults, Transport};
use metastore::consensus::wal::Wal;
use metastore::consensus::{NodeConfig, NodeMsg, RaftNode};
use metastore::proto::metastorepb::{MemberRecord, StateSnapshot};
use metastore::state_machine::{ApplyMsg, CommittedEntry, SnapshotTaken};
use raft::prelude::{ConfState, Entry, EntryType};
use raft::storage::MemStorage;
use raft::{RawNode, StateRole};

const PAYLOADS: [usize; 4] = [64, 256, 1024, 4096];
/// The log is compacted once this many bytes (payload plus a per-entry allowance) have been
/// proposed since the last compaction: at most about 32 MiB of log is held in memory.
const COMPACT_BYTES: usize = 32 << 20;
/// Bytes counted per proposal besides its payload (an `Entry`'s own overhead).
const ENTRY_OVERHEAD: usize = 128;

/// Appends `payload` as one length-delimited record, as the batching proposer does.
fn frame(out: &mut Vec<u8>, payload: &[u8]) {
    prost::encoding::encode_varint(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

/// Number of length-delimited records in an entry's data.
fn records(mut data: &[u8]) -> usize {
    let mut n = 0;
    while !data.is_empty() {
        let len = prost::encoding::decode_varint(&mut data).expect("record length") as usize;
        data = &data[len..];
        n += 1;
    }
    n
}

// ---------------------------------------------------------------------------------------------
// The ready loop in this thread.

#[derive(Clone, Copy)]
enum Mode {
    /// One proposal per Ready.
    Single,
    /// 64 proposals, 64 entries, one Ready.
    Entries64,
    /// 64 proposals packed into one entry.
    Packed64,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Single => "1",
            Mode::Entries64 => "64_entries",
            Mode::Packed64 => "64_packed",
        }
    }

    fn proposals(self) -> usize {
        match self {
            Mode::Single => 1,
            Mode::Entries64 | Mode::Packed64 => 64,
        }
    }
}

/// A single-voter node that has elected itself and applied its leader no-op.
fn leader() -> RawNode<MemStorage> {
    let storage = MemStorage::new_with_conf_state(ConfState::from((vec![1], vec![])));
    // The settings `RaftNode::new` uses (heartbeat 100 ms, election 1000 ms).
    let config = raft::Config {
        id: 1,
        election_tick: 10,
        heartbeat_tick: 1,
        max_size_per_msg: 1024 * 1024,
        max_inflight_msgs: 256,
        pre_vote: true,
        ..Default::default()
    };
    config.validate().expect("raft config");
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    let mut raw = RawNode::new(&config, storage, &logger).expect("raw node");
    raw.campaign().expect("campaign");
    let mut applied = Vec::new();
    while raw.has_ready() {
        on_ready(&mut raw, &mut applied);
    }
    assert_eq!(raw.raft.state, StateRole::Leader);
    assert_eq!(raw.raft.raft_log.applied, raw.raft.raft_log.committed);
    raw
}

/// What the node does with committed entries: copy them out for the dispatcher.
fn hand_out(entries: Vec<Entry>, out: &mut Vec<CommittedEntry>) {
    for e in entries {
        let data = match e.get_entry_type() {
            EntryType::EntryNormal => e.data.to_vec(),
            _ => Vec::new(),
        };
        out.push(CommittedEntry {
            index: e.index,
            term: e.term,
            data,
            conf_change: None,
        });
    }
}

/// One Ready, handled in `RaftNode::on_ready`'s order, with `MemStorage` as the only storage.
fn on_ready(raw: &mut RawNode<MemStorage>, applied: &mut Vec<CommittedEntry>) {
    if !raw.has_ready() {
        return;
    }
    let mut ready = raw.ready();
    let _ = ready.take_messages();
    assert!(ready.snapshot().is_empty(), "a lone voter gets no snapshot");
    hand_out(ready.take_committed_entries(), applied);
    let _ = ready.take_read_states();
    if !ready.entries().is_empty() {
        raw.mut_store()
            .wl()
            .append(ready.entries())
            .expect("append to MemStorage");
    }
    if let Some(hs) = ready.hs() {
        raw.mut_store().wl().set_hardstate(hs.clone());
    }
    let _ = ready.take_persisted_messages();
    let mut light = raw.advance(ready);
    if let Some(commit) = light.commit_index() {
        raw.mut_store().wl().mut_hard_state().commit = commit;
    }
    let _ = light.take_messages();
    hand_out(light.take_committed_entries(), applied);
    raw.advance_apply();
}

fn bench_in_thread(c: &mut Criterion) {
    let mut group = c.benchmark_group("raft_ready");
    for mode in [Mode::Single, Mode::Entries64, Mode::Packed64] {
        for size in PAYLOADS {
            let payload: Vec<u8> = (0..size).map(|i| i as u8).collect();
            let mut one = Vec::new();
            frame(&mut one, &payload);
            let mut packed = Vec::new();
            for _ in 0..mode.proposals() {
                frame(&mut packed, &payload);
            }
            let mut raw = leader();
            let mut applied = Vec::new();
            let mut since_compaction = 0usize;
            group.throughput(Throughput::Elements(mode.proposals() as u64));
            group.bench_function(BenchmarkId::new(mode.name(), size), |b| {
                b.iter_custom(|iters| {
                    let mut timed = Duration::ZERO;
                    let mut start = Instant::now();
                    for _ in 0..iters {
                        match mode {
                            Mode::Single => raw.propose(Vec::new(), one.clone()),
                            Mode::Packed64 => raw.propose(Vec::new(), packed.clone()),
                            Mode::Entries64 => {
                                (0..64).try_for_each(|_| raw.propose(Vec::new(), one.clone()))
                            }
                        }
                        .expect("propose");
                        on_ready(&mut raw, &mut applied);
                        let proposals: usize = applied.iter().map(|e| records(&e.data)).sum();
                        assert_eq!(
                            proposals,
                            mode.proposals(),
                            "one round applies its proposals"
                        );
                        black_box(&applied);
                        applied.clear();
                        since_compaction += mode.proposals() * (size + ENTRY_OVERHEAD);
                        if since_compaction >= COMPACT_BYTES {
                            timed += start.elapsed();
                            let upto = raw.raft.raft_log.applied;
                            raw.mut_store().wl().compact(upto).expect("compact");
                            since_compaction = 0;
                            start = Instant::now();
                        }
                    }
                    timed + start.elapsed()
                });
            });
        }
    }
    group.finish();
}

// ---------------------------------------------------------------------------------------------
// The real node thread.

struct Node {
    tx: flume::Sender<NodeMsg>,
    committed: flume::Receiver<ApplyMsg>,
    snapshots: flume::Sender<SnapshotTaken>,
    thread: std::thread::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

fn start_node() -> Node {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (wal, recovered) = Wal::open(&dir.path().join("wal"), 0, false).expect("open the WAL");
    let (committed_tx, committed) = flume::unbounded();
    let (snapshots, snapshots_rx) = flume::unbounded();
    let me = MemberRecord {
        id: 1,
        name: "bench".into(),
        peer_urls: vec!["http://127.0.0.1:2380".into()],
        client_urls: Vec::new(),
        is_learner: false,
    };
    let cfg = NodeConfig {
        id: 1,
        this_member: me.clone(),
        bootstrap: vec![me],
        seed_peers: Vec::new(),
        heartbeat_ms: 100,
        election_ms: 1000,
        lease_reads: false,
        catch_up_entries: 5000,
        request_timeout: Duration::from_secs(7),
        snap_dir: dir.path().join("snap"),
        max_snapshots: 5,
        pre_vote: true,
        max_learners: 1,
        force_new_cluster: false,
    };
    // A single member has no peers: its transport never spawns a task on this runtime.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("tokio runtime");
    let transport = |node| Transport::new(1, 1, runtime.handle().clone(), Faults::default(), node);
    let (node, handle) = RaftNode::new(
        &cfg,
        None,
        0,
        wal,
        recovered,
        transport,
        committed_tx,
        snapshots_rx,
    )
    .expect("raft node");
    let thread = std::thread::spawn(move || node.run().expect("raft node runs"));
    // The node elects itself and commits its leader no-op (an entry without data).
    let first = entries(
        committed
            .recv_timeout(Duration::from_secs(10))
            .expect("the node elects itself"),
    );
    assert!(first.iter().all(|e| e.data.is_empty()));
    Node {
        tx: handle.tx,
        committed,
        snapshots,
        thread,
        _dir: dir,
    }
}

/// The entries of what the node handed the dispatcher (a lone member never installs a
/// leader's snapshot, nor is asked for one).
fn entries(msg: ApplyMsg) -> Vec<CommittedEntry> {
    match msg {
        ApplyMsg::Entries(entries) => entries,
        _ => panic!("a lone member only hands over entries"),
    }
}

fn bench_node_thread(c: &mut Criterion) {
    let mut group = c.benchmark_group("raft_node_thread");
    for proposals in [1usize, 64] {
        for size in PAYLOADS {
            let payload: Vec<u8> = (0..size).map(|i| i as u8).collect();
            let node = start_node();
            let mut next_id = 1u64;
            let mut last = (0u64, 0u64);
            let mut since_compaction = 0usize;
            group.throughput(Throughput::Elements(proposals as u64));
            group.bench_function(BenchmarkId::new(proposals.to_string(), size), |b| {
                b.iter(|| {
                    for _ in 0..proposals {
                        let msg = NodeMsg::Propose {
                            id: next_id,
                            data: payload.clone(),
                        };
                        next_id += 1;
                        node.tx.send(msg).expect("node running");
                    }
                    let mut seen = 0;
                    while seen < proposals {
                        let batch = entries(node.committed.recv().expect("node running"));
                        for e in &batch {
                            seen += records(&e.data);
                            last = (e.index, e.term);
                        }
                    }
                    assert_eq!(seen, proposals, "nothing else is proposed");
                    since_compaction += proposals * (size + ENTRY_OVERHEAD);
                    if since_compaction >= COMPACT_BYTES {
                        let (index, term) = last;
                        // The node saves the (empty) snapshot, then releases the log.
                        let snapshot = Arc::new(StateSnapshot {
                            index,
                            term,
                            ..Default::default()
                        });
                        let _ = node.snapshots.send(SnapshotTaken {
                            index,
                            term,
                            snapshot,
                        });
                        since_compaction = 0;
                    }
                });
            });
            // The node holds a sender to its own inbox (its transport's), so dropping ours
            // does not end it: it stops as the member stops it.
            let Node { tx, thread, .. } = node;
            let (stopped, _) = tokio::sync::oneshot::channel();
            tx.send(NodeMsg::Stop(stopped)).expect("node running");
            thread.join().expect("node thread");
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = common::config();
    targets = bench_in_thread, bench_node_thread
}
criterion_main!(benches);
