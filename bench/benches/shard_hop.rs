//! Cross-core shard hop micro-benchmarks: the round trip of a read sent to a shard's glommio
//! executor pinned on another core and its answer coming back, against the same work done on
//! the calling thread.
//!
//! Why: every client read (and every apply that needs an answer, such as a delete or a txn
//! compare) crosses from the gRPC thread to the owning shard's executor and back: a flume
//! send, a wake-up of a possibly parked glommio executor on another core, the store call, and
//! a tokio oneshot reply that wakes the caller. For small reads that hop, not the store, is
//! the cost, and this suite says how large it is.
//!
//! * `shard_hop_read/shardset_cross_core/<value bytes>`: the real thing. A real one-shard
//!   `ShardSet` started through its public API (`Shards::spawn` with the memory engine, which
//!   pins the shard's executor exactly as the server does; the suite reads back which CPU that
//!   is from `/proc/self/task`), preloaded through its apply queue with 1,000 keys per value
//!   size, then `ShardSet::read_range` of one key at the applied revision, awaited from a tokio
//!   current-thread runtime on this thread (the server awaits it from tokio workers). This
//!   thread is pinned on a different CPU, so every read crosses cores.
//! * `shard_hop_read/direct_same_thread/<value bytes>`: the baseline: the same `Store::range`
//!   over a memory engine with the same keys, called directly on this thread. The difference
//!   between the two is the hop.
//! * `shard_hop_echo/cross_core`: the hop alone, with no store work: a glommio executor
//!   (`LocalExecutorBuilder` with `Placement::Fixed` on the CPU `Shards::spawn` gives shard 0)
//!   runs the shard's read loop shape (`recv_async` on an unbounded flume queue in a
//!   `spawn_local` task, reply through a tokio oneshot, `yield_if_needed`) and echoes a number
//!   back.
//! * `shard_hop_echo/same_core`: the same, with the caller pinned on the executor's own CPU
//!   (a thread-per-core front end would be there): two context switches instead of two
//!   cross-core wake-ups.
//! * `shard_hop_echo/same_thread_task`: the same channels and the same echo loop, but as a task
//!   on the caller's own tokio runtime: the async hand-off without the cross-core wake-up.
//!
//! On a machine with a single online CPU the calling thread is left unpinned and the "cross
//! core" numbers are really same-core context switches; the suite says so when it starts.

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use metastore::mvcc::engine::Engine;
use metastore::mvcc::memory::MemoryEngine;
use metastore::mvcc::rocks::RocksOptions;
use metastore::mvcc::store::PutArgs;
use metastore::mvcc::Store;
use metastore::proto::etcdserverpb::{PutRequest, RangeRequest};
use metastore::shard::{ApplyCmd, BarrierAck, BarrierState, EngineConfig, EngineKind, Shards};
use tokio::sync::oneshot;

const VALUE_SIZES: [usize; 4] = [64, 256, 1024, 4096];
/// Keys preloaded per value size.
const KEYS: usize = 1000;

fn online_cpus() -> Vec<usize> {
    let mut cpus: Vec<usize> = glommio::CpuSet::online()
        .expect("list online CPUs")
        .into_iter()
        .map(|l| l.cpu)
        .collect();
    cpus.sort_unstable();
    cpus
}

/// Parses a kernel CPU list (`0-3,8`).
fn parse_cpu_list(list: &str) -> Vec<usize> {
    let mut cpus = Vec::new();
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => cpus.extend(a.parse::<usize>().unwrap()..=b.parse().unwrap()),
            None => cpus.push(part.parse().unwrap()),
        }
    }
    cpus
}

/// The CPU the thread of this process whose name starts with `name` is pinned to, read from
/// `/proc/self/task/*/` (so the suite follows wherever `Shards::spawn` placed the shard).
fn pinned_cpu_of_thread(name: &str) -> usize {
    for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let dir = task.expect("task entry").path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if !comm.starts_with(name) {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).expect("task status");
        let allowed = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .map(parse_cpu_list)
            .expect("Cpus_allowed_list");
        assert_eq!(allowed.len(), 1, "thread {name} is pinned to one CPU");
        return allowed[0];
    }
    panic!("no thread named {name}*");
}

/// The calling thread's CPU affinity while pinned; the previous one comes back on drop (so
/// that executors started later are placed as in a fresh process).
struct Pinned {
    previous: libc::cpu_set_t,
}

impl Pinned {
    /// Pins the calling thread on `cpu`.
    fn on(cpu: usize) -> Pinned {
        // SAFETY: both sets are properly initialised cpu_set_t values that outlive the calls,
        // with their size passed along; pid 0 means the calling thread.
        unsafe {
            let mut previous: libc::cpu_set_t = std::mem::zeroed();
            let rc =
                libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut previous);
            assert_eq!(
                rc,
                0,
                "sched_getaffinity: {}",
                std::io::Error::last_os_error()
            );
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            assert_eq!(
                rc,
                0,
                "sched_setaffinity: {}",
                std::io::Error::last_os_error()
            );
            Pinned { previous }
        }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: as in `Pinned::on`.
        unsafe {
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.previous);
        }
    }
}

/// Pins this thread on an online CPU other than `shard_cpu` if there is one.
fn pin_away_from(shard_cpu: usize) -> Option<Pinned> {
    match online_cpus().into_iter().find(|c| *c != shard_cpu) {
        Some(cpu) => {
            eprintln!("shard_hop: shard on CPU {shard_cpu}, caller on CPU {cpu}");
            Some(Pinned::on(cpu))
        }
        None => {
            eprintln!(
                "shard_hop: a single online CPU; the caller shares it with the shard (no cross-core hop)"
            );
            None
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("tokio runtime")
}

fn key(size: usize, i: usize) -> Vec<u8> {
    format!("v{size}/key/{i:06}").into_bytes()
}

fn value(size: usize) -> Vec<u8> {
    (0..size).map(|i| b'a' + (i % 26) as u8).collect()
}

fn single(key: Vec<u8>) -> Arc<RangeRequest> {
    Arc::new(RangeRequest {
        key,
        ..Default::default()
    })
}

fn bench_read(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let engine = EngineConfig {
        kind: EngineKind::Memory,
        dir: dir.path().to_path_buf(),
        rocks: RocksOptions::default(),
        member_id: 0,
        create: true,
    };
    // Started before this thread is pinned: threads inherit the affinity of their parent.
    let shards =
        Shards::spawn(1, &engine, metastore::fatal::FatalTx::channel().0).expect("start the shard");
    let shard_cpu = pinned_cpu_of_thread("shard-0");
    let _pinned = pin_away_from(shard_cpu);
    let rt = runtime();

    // Preload through the apply queue, as the dispatcher does, then a barrier.
    let mut direct = Store::new(Box::new(MemoryEngine::new()) as Box<dyn Engine>);
    let mut rev = 1;
    for size in VALUE_SIZES {
        let val = value(size);
        for i in 0..KEYS {
            rev += 1;
            let req = PutRequest {
                key: key(size, i),
                value: val.clone(),
                ..Default::default()
            };
            let args = PutArgs {
                key: &req.key,
                value: &req.value,
                lease: 0,
                ignore_value: false,
                ignore_lease: false,
            };
            direct.put(args, rev, 0).expect("direct write");
            let cmd = ApplyCmd::Put {
                req,
                rev,
                sub: 0,
                reply: None,
            };
            shards.set.get(0).apply.send(cmd).expect("shard running");
        }
    }
    let (mut replies, done) = BarrierAck::new(1);
    let reply = replies.pop().expect("one part");
    let state = BarrierState {
        applied_index: rev as u64,
        applied_term: 1,
        revision: rev,
        compact_revision: 0,
        lease_changes: Arc::new(Vec::new()),
        events: None,
    };
    shards
        .set
        .get(0)
        .apply
        .send(ApplyCmd::Barrier { state, reply })
        .expect("shard running");
    done.blocking_recv().expect("barrier passed");

    let mut group = c.benchmark_group("shard_hop_read");
    for size in VALUE_SIZES {
        let reqs: Vec<Arc<RangeRequest>> = (0..KEYS).map(|i| single(key(size, i))).collect();
        // Both paths must answer the same thing before they are timed.
        let parts = rt
            .block_on(shards.set.read_range(reqs[7].clone(), rev))
            .expect("shard read");
        let here = direct
            .range(&reqs[7], rev)
            .expect("the engine reads")
            .expect("direct read");
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].kvs, here.kvs);
        assert_eq!((here.count, here.kvs[0].value.len()), (1, size));

        group.throughput(Throughput::Elements(1));
        let set = shards.set.clone();
        group.bench_function(BenchmarkId::new("shardset_cross_core", size), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for i in 0..iters as usize {
                        let parts = set
                            .read_range(reqs[i % KEYS].clone(), rev)
                            .await
                            .expect("shard read");
                        black_box(parts);
                    }
                    start.elapsed()
                })
            });
        });
        drop(set);
        let mut i = 0;
        group.bench_function(BenchmarkId::new("direct_same_thread", size), |b| {
            b.iter(|| {
                i = (i + 1) % KEYS;
                black_box(direct.range(&reqs[i], rev).expect("direct read"))
            });
        });
    }
    group.finish();
    shards.join();
}

type Echo = (u64, oneshot::Sender<u64>);

/// The shard's read-loop shape, answering each number with itself.
async fn echo_loop(rx: flume::Receiver<Echo>) {
    while let Ok((n, reply)) = rx.recv_async().await {
        let _ = reply.send(n);
        glommio::yield_if_needed().await;
    }
}

/// One round trip: send `n`, await the answer.
async fn round_trip(tx: &flume::Sender<Echo>, n: u64) -> u64 {
    let (reply, rx) = oneshot::channel();
    tx.send_async((n, reply)).await.expect("echo running");
    rx.await.expect("echo answered")
}

fn bench_echo(c: &mut Criterion) {
    // On the CPU `Shards::spawn` puts shard 0 on.
    let dir = tempfile::tempdir().expect("temporary directory");
    let engine = EngineConfig {
        kind: EngineKind::Memory,
        dir: dir.path().to_path_buf(),
        rocks: RocksOptions::default(),
        member_id: 0,
        create: true,
    };
    let shards =
        Shards::spawn(1, &engine, metastore::fatal::FatalTx::channel().0).expect("start a shard");
    let shard_cpu = pinned_cpu_of_thread("shard-0");
    shards.join();
    let (tx, rx) = flume::unbounded::<Echo>();
    let executor = glommio::LocalExecutorBuilder::new(glommio::Placement::Fixed(shard_cpu))
        .name("echo")
        .spawn(move || async move {
            glommio::spawn_local(echo_loop(rx)).await;
        })
        .expect("start the echo executor");
    let rt = runtime();
    let echo = |b: &mut criterion::Bencher| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for n in 0..iters {
                    let back = round_trip(&tx, n).await;
                    assert_eq!(back, n);
                }
                start.elapsed()
            })
        });
    };

    let mut group = c.benchmark_group("shard_hop_echo");
    group.throughput(Throughput::Elements(1));
    let pinned = pin_away_from(shard_cpu);
    assert_eq!(rt.block_on(round_trip(&tx, 41)), 41);
    group.bench_function("cross_core", echo);
    drop(pinned);
    // The caller on the executor's own core: every round trip is two context switches.
    let pinned = Pinned::on(shard_cpu);
    group.bench_function("same_core", echo);
    drop(pinned);
    let _pinned = pin_away_from(shard_cpu);
    drop(tx);
    executor.join().expect("echo executor");

    // The same hand-off as a task of this thread's own runtime.
    let (tx, rx) = flume::unbounded::<Echo>();
    let local = tokio::task::LocalSet::new();
    local.spawn_local(async move {
        while let Ok((n, reply)) = rx.recv_async().await {
            let _ = reply.send(n);
        }
    });
    assert_eq!(local.block_on(&rt, round_trip(&tx, 41)), 41);
    group.bench_function("same_thread_task", |b| {
        b.iter_custom(|iters| {
            local.block_on(&rt, async {
                let start = Instant::now();
                for n in 0..iters {
                    let back = round_trip(&tx, n).await;
                    assert_eq!(back, n);
                }
                start.elapsed()
            })
        });
    });
    group.finish();
    drop(tx);
    rt.block_on(local);
}

criterion_group! {
    name = benches;
    config = common::config();
    targets = bench_read, bench_echo
}
criterion_main!(benches);
