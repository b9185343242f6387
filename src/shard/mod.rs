//! Shards: each owns one part of the keyspace and runs on its own glommio executor, pinned to
//! a CPU core.
//!
//! A shard has two queues (flume):
//! * the **apply queue**, fed only by the apply dispatcher, in log order. Writes, txn compares
//!   and txn reads go here, so each sees exactly the writes dispatched before it;
//! * the **read queue**, fed by the gRPC front end. Client reads name an explicit revision that
//!   every shard has already applied, so they need no ordering against the apply queue.
//!
//! The store is touched only by the shard's own thread, so it needs no lock.
//!
//! Files: `protocol.rs` (the commands on both queues), `placement.rs` (which shard owns a key,
//! which CPU runs a shard), `executor.rs` (the shard's loop over its store), and here the
//! handles the rest of the member holds and the start and stop of the shard threads.

mod executor;
mod placement;
mod protocol;

use std::sync::Arc;

use tokio::sync::oneshot;

pub use crate::config::EngineKind;
use crate::error::EtcdError;
use crate::fatal::{await_reporting_panics, FatalTx};
use crate::mvcc::engine::Engine;
use crate::mvcc::engine::StorageError;
use crate::mvcc::memory::MemoryEngine;
use crate::mvcc::range::PartialRange;
use crate::mvcc::rocks::{RocksEngine, RocksOptions, ShardIdentity};
use crate::mvcc::store::{EventBatch, HistoryCompacted};
use crate::mvcc::{KeyRange, Store};
use crate::proto::etcdserverpb::RangeRequest;
use executor::{run_shard, Queues};
pub use placement::{parse_cpu_list, shard_cpus, shard_for};
pub use protocol::{
    history_from_proto, history_to_proto, ApplyCmd, BarrierAck, BarrierState, EventsWanted,
    ReadCmd, ShardEvents,
};

/// The DMA memory each shard's glommio executor reserves, bytes: glommio's floor (64 KiB).
/// Its default, 10 MiB per executor, is registered with io_uring and so resident, and shards
/// do no glommio file I/O (the memory engine does none, RocksDB its own).
const SHARD_IO_MEMORY: usize = 64 * 1024;

/// How each shard opens its engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Which engine.
    pub kind: EngineKind,
    /// `<data-dir>/member/shards`: shard `n` keeps a RocksDB database in `<dir>/<n>`.
    pub dir: std::path::PathBuf,
    /// RocksDB tuning.
    pub rocks: RocksOptions,
    /// This member's ID, recorded in each RocksDB shard database (see [`ShardIdentity`]).
    pub member_id: u64,
    /// The data directory is being initialised: missing RocksDB shard databases are created.
    /// Otherwise a missing one is an error, since an empty shard would silently lose its keys.
    pub create: bool,
}

impl EngineConfig {
    fn open(&self, shard: usize, shards: usize) -> Result<Box<dyn Engine>, StorageError> {
        match self.kind {
            EngineKind::Memory => Ok(Box::new(MemoryEngine::new())),
            EngineKind::Rocksdb => {
                let dir = self.dir.join(shard.to_string());
                if self.create {
                    std::fs::create_dir_all(&dir).map_err(|error| StorageError::Io {
                        context: dir.display().to_string(),
                        error,
                    })?;
                }
                let identity = ShardIdentity {
                    member_id: self.member_id,
                    shard: shard as u64,
                    shards: shards as u64,
                };
                Ok(Box::new(RocksEngine::open_shard(
                    &dir,
                    &self.rocks,
                    identity,
                    self.create,
                )?))
            }
        }
    }
}

/// The sending ends of one shard's queues.
#[derive(Clone)]
pub struct ShardHandle {
    /// The apply queue (dispatcher only).
    pub apply: flume::Sender<ApplyCmd>,
    /// The read queue (front end).
    pub read: flume::Sender<ReadCmd>,
}

/// All shards, in shard-index order. Cheap to clone.
#[derive(Clone)]
pub struct ShardSet {
    handles: Arc<[ShardHandle]>,
    sizes: Arc<[ShardSize]>,
}

/// A shard's storage size, kept current by the shard itself (after every barrier and every
/// defragment), bytes.
#[derive(Default)]
pub struct ShardSize {
    total: std::sync::atomic::AtomicU64,
    in_use: std::sync::atomic::AtomicU64,
}

impl ShardSize {
    fn set(&self, store: &Store) {
        use std::sync::atomic::Ordering::Relaxed;
        self.total.store(store.size_bytes(), Relaxed);
        self.in_use.store(store.size_in_use_bytes(), Relaxed);
    }
}

impl ShardSet {
    /// Number of shards.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Never true: there is at least one shard.
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Total storage size over all shards, bytes (etcd's `dbSize`).
    pub fn db_size(&self) -> u64 {
        self.sizes
            .iter()
            .map(|s| s.total.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    }

    /// Live data over all shards, bytes (etcd's `dbSizeInUse`).
    pub fn db_size_in_use(&self) -> u64 {
        self.sizes
            .iter()
            .map(|s| s.in_use.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    }

    /// The shard handle at `index`.
    pub fn get(&self, index: usize) -> &ShardHandle {
        &self.handles[index]
    }

    /// Every shard handle.
    pub fn iter(&self) -> impl Iterator<Item = &ShardHandle> {
        self.handles.iter()
    }

    /// The shards a range touches: the owner of a single key, or all of them.
    pub fn shards_for(&self, range: &KeyRange) -> Vec<usize> {
        match range.single_key() {
            Some(key) => vec![shard_for(key, self.len())],
            None => (0..self.len()).collect(),
        }
    }

    /// Scatters a client range read at `rev` over the shards it touches and gathers the parts.
    ///
    /// Errors: ErrCompacted from a shard; "server stopped" if a shard is gone.
    pub async fn read_range(
        &self,
        req: Arc<RangeRequest>,
        rev: i64,
    ) -> Result<Vec<PartialRange>, EtcdError> {
        let range = KeyRange::from_request(&req.key, &req.range_end);
        let parts = self
            .scatter(self.shards_for(&range), |reply| ReadCmd::Range {
                req: req.clone(),
                rev,
                reply,
            })
            .await?;
        parts.into_iter().collect()
    }

    /// Sends one read to each of `shards` (all before waiting, so they run in parallel) and
    /// gathers the replies in the same order.
    async fn scatter<T>(
        &self,
        shards: Vec<usize>,
        command: impl Fn(oneshot::Sender<T>) -> ReadCmd,
    ) -> Result<Vec<T>, EtcdError> {
        let mut waits = Vec::with_capacity(shards.len());
        for i in shards {
            let (reply, rx) = oneshot::channel();
            self.handles[i]
                .read
                .send_async(command(reply))
                .await
                .map_err(|_| EtcdError::Stopped)?;
            waits.push(rx);
        }
        let mut replies = Vec::with_capacity(waits.len());
        for rx in waits {
            replies.push(rx.await.map_err(|_| EtcdError::Stopped)?);
        }
        Ok(replies)
    }
}

impl ShardSet {
    /// Watch events for `range` in `[from, to]` from every shard it touches, merged into one
    /// (revision, sub-revision, key) ordered list that is complete through the returned revision.
    ///
    /// The answer is [`HistoryCompacted`] (etcd's ErrCompacted) when `from` is below the
    /// compaction revision of any shard it asked, with the highest such revision: shards apply
    /// a compaction before readers see it published, so this may be newer than the published
    /// [`AppliedState::compact_revision`](crate::state_machine::AppliedState).
    ///
    /// Errors: ErrStopped when a shard is gone.
    pub async fn events(
        &self,
        range: &KeyRange,
        from: i64,
        to: i64,
        limit: usize,
        prev_kv: bool,
    ) -> Result<Result<EventBatch, HistoryCompacted>, EtcdError> {
        let parts = self
            .scatter(self.shards_for(range), |reply| ReadCmd::Events {
                range: range.clone(),
                from,
                to,
                limit,
                prev_kv,
                reply,
            })
            .await?;
        let mut merged = EventBatch {
            events: Vec::new(),
            through: to,
        };
        let mut compacted: Option<HistoryCompacted> = None;
        for part in parts {
            match part {
                Ok(part) => {
                    merged.through = merged.through.min(part.through);
                    merged.events.extend(part.events);
                }
                Err(c) => compacted = compacted.max(Some(c)),
            }
        }
        if let Some(c) = compacted {
            return Ok(Err(c));
        }
        // A shard that stopped early bounds what is complete for all of them.
        let through = merged.through;
        merged.events.retain(|e| e.rev <= through);
        crate::mvcc::store::sort_events(&mut merged.events);
        Ok(Ok(merged))
    }

    /// Defragments every shard (one after another, so only one shard at a time is busy).
    pub async fn defragment(&self) -> Result<(), EtcdError> {
        for i in 0..self.len() {
            self.scatter(vec![i], |reply| ReadCmd::Defragment { reply })
                .await?;
        }
        Ok(())
    }

    /// etcd HashKV over every shard: see [`crate::mvcc::kv_hash`].
    pub async fn hash_kv(&self, rev: i64, compact_revision: i64) -> Result<u32, EtcdError> {
        let all = (0..self.len()).collect();
        let parts = self
            .scatter(all, |reply| ReadCmd::HashKv {
                rev,
                compact_revision,
                reply,
            })
            .await?;
        Ok(parts.into_iter().fold(0u32, u32::wrapping_add))
    }

    /// Every key attached to `lease`, over all shards, in key order.
    pub async fn lease_keys(&self, lease: i64) -> Result<Vec<Vec<u8>>, EtcdError> {
        let all = (0..self.len()).collect();
        let mut keys: Vec<Vec<u8>> = self
            .scatter(all, |reply| ReadCmd::LeaseKeys { lease, reply })
            .await?
            .into_iter()
            .flatten()
            .collect();
        keys.sort();
        Ok(keys)
    }
}

/// Running shard executors. [`Shards::close`] closes them; dropped without it, they stop only
/// once every queue sender is gone (which may be the process exit).
pub struct Shards {
    /// The queues.
    pub set: ShardSet,
    threads: Vec<ShardThread>,
}

/// A shard's executor thread.
struct ShardThread {
    handle: glommio::ExecutorJoinHandle<()>,
    /// Tells that the shard has left its loop (see [`run_shard`]): with its queues, for the
    /// closer to refuse from then on, or without them when the shard stopped on a storage
    /// failure or a panic and its queues are already refused. Closed if the thread ended
    /// otherwise.
    done: oneshot::Receiver<Option<Queues>>,
}

/// What kept [`Shards::close`] from closing one shard cleanly.
#[derive(Debug, thiserror::Error)]
pub enum CloseError {
    /// The shard could not sync its engine's files (see [`Engine::sync_to_disk`]); the engine
    /// was closed all the same. What the member acknowledged is in the Raft WAL regardless.
    #[error("shard {shard} could not sync its storage before closing it: {error}")]
    Sync {
        /// The shard.
        shard: usize,
        /// The engine's error.
        error: StorageError,
    },
    /// The shard had stopped before it was asked to close: its engine failed (and was closed
    /// then), or its thread ended abnormally.
    #[error("shard {0} had already stopped")]
    Stopped(usize),
    /// The shard did not close in time; its thread is left to the process exit.
    #[error("shard {0} did not close in time")]
    TimedOut(usize),
    /// The shard's thread panicked (glommio's report).
    #[error("shard {shard}'s thread failed: {reason}")]
    Thread {
        /// The shard.
        shard: usize,
        /// What glommio reported.
        reason: String,
    },
}

/// Why [`Shards::spawn`] (or [`shard_cpus`]) failed.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// glommio could not list the online CPUs (its reason).
    #[error("cannot list online CPUs: {0}")]
    OnlineCpus(String),
    /// A shard's executor could not be built (for example RLIMIT_MEMLOCK too low for glommio's
    /// io_uring rings); `reason` is glommio's, or the executor thread's panic.
    #[error("cannot start shard {shard}: {reason}")]
    Executor {
        /// The shard.
        shard: usize,
        /// Why, in glommio's words.
        reason: String,
    },
    /// A shard's executor thread ended without reporting whether its engine opened.
    #[error("shard {0} stopped while opening its engine")]
    StoppedWhileOpening(usize),
    /// A shard's engine could not be opened (for RocksDB: the path and RocksDB's reason).
    #[error("shard {shard} cannot open its storage: {error}")]
    Open {
        /// The shard.
        shard: usize,
        /// The engine's error.
        error: StorageError,
    },
}

/// Stops the shards that opened before another failed to: their queues' senders go, so each
/// leaves its loop and closes its engine, and their threads are joined (blocking; closing an
/// engine that has served nothing is quick). The process exits with the error next, and a
/// RocksDB database still open then has background threads running while the C++ runtime
/// tears itself down, which aborts the exit now and then ("pthread lock: Invalid argument").
fn stop_opened(handles: Vec<ShardHandle>, threads: Vec<ShardThread>) {
    drop(handles);
    for thread in threads {
        let _ = thread.handle.join();
    }
}

impl Shards {
    /// Starts `count` shards, each on a glommio executor pinned to a CPU: shard `i` on the
    /// `i`-th (round-robin) of the CPUs this process may run on, in ascending order (see
    /// [`shard_cpus`]), so `taskset`, systemd's `CPUAffinity=` and cgroup cpusets decide where
    /// shards run and the placement is the same on every start.
    ///
    /// A shard whose engine fails later (a corrupt block, a failed write) stops serving and
    /// sends the [`StorageError`] up `fatal`, as a [`FatalError::Storage`].
    ///
    /// Errors: a shard whose engine cannot be opened (for RocksDB: the path and RocksDB's
    /// reason).
    pub fn spawn(
        count: usize,
        engine: &EngineConfig,
        fatal: FatalTx,
    ) -> Result<Shards, SpawnError> {
        Self::spawn_on(count, engine, fatal, &shard_cpus()?)
    }

    /// [`Self::spawn`] with shard `i` pinned to `cpus[i % cpus.len()]` (unbound if `cpus` is
    /// empty). Whatever fails, the shards already opened are closed before the error returns
    /// ([`stop_opened`]).
    fn spawn_on(
        count: usize,
        engine: &EngineConfig,
        fatal: FatalTx,
        cpus: &[usize],
    ) -> Result<Shards, SpawnError> {
        // Where a shard that stops on a storage failure has its queues refused at once, so
        // that nobody waits on it (start-up's recovery, a read, the closer). Without a
        // runtime (benchmarks), they are refused from the close on.
        let runtime = tokio::runtime::Handle::try_current().ok();
        let mut handles = Vec::with_capacity(count);
        let sizes: Arc<[ShardSize]> = (0..count).map(|_| ShardSize::default()).collect();
        let mut threads = Vec::with_capacity(count);
        for i in 0..count {
            let (apply_tx, apply_rx) = flume::unbounded();
            let (read_tx, read_rx) = flume::unbounded();
            let placement = match cpus.get(i % cpus.len().max(1)) {
                Some(cpu) => glommio::Placement::Fixed(*cpu),
                None => glommio::Placement::Unbound,
            };
            let (opened_tx, opened_rx) = std::sync::mpsc::channel();
            let (done_tx, done) = oneshot::channel();
            let config = engine.clone();
            let sizes = sizes.clone();
            let fatal = fatal.clone();
            let runtime = runtime.clone();
            let queues = Queues {
                apply: apply_rx,
                read: read_rx,
            };
            let spawned = glommio::LocalExecutorBuilder::new(placement)
                .name(&format!("shard-{i}"))
                .io_memory(SHARD_IO_MEMORY)
                .spawn(move || async move {
                    match config.open(i, count) {
                        Ok(engine) => {
                            let _ = opened_tx.send(Ok(()));
                            // A panic is reported up `fatal` (the member stops), as is a
                            // storage failure; either way the shard is gone for good.
                            let name = format!("shard-{i}");
                            let run = run_shard(i, engine, sizes, &queues, fatal.clone());
                            let failed = await_reporting_panics(&name, &fatal, run)
                                .await
                                .unwrap_or(true);
                            match runtime {
                                Some(runtime) if failed => {
                                    runtime.spawn(queues.refuse_all());
                                    let _ = done_tx.send(None);
                                }
                                _ => {
                                    let _ = done_tx.send(Some(queues));
                                }
                            }
                        }
                        Err(e) => {
                            let _ = opened_tx.send(Err(e));
                        }
                    }
                })
                .map_err(|e| SpawnError::Executor {
                    shard: i,
                    reason: e.to_string(),
                });
            let opened = spawned.and_then(|handle| match opened_rx.recv() {
                Ok(Ok(())) => Ok(handle),
                Ok(Err(error)) => {
                    // Its thread ends once it has said why.
                    let _ = handle.join();
                    Err(SpawnError::Open { shard: i, error })
                }
                // The executor thread ended before opening the engine: glommio could not build
                // the executor (for example RLIMIT_MEMLOCK too low for its io_uring rings).
                // Its join result carries the reason.
                Err(_) => Err(match handle.join() {
                    Err(e) => SpawnError::Executor {
                        shard: i,
                        reason: e.to_string(),
                    },
                    Ok(()) => SpawnError::StoppedWhileOpening(i),
                }),
            });
            let handle = match opened {
                Ok(handle) => handle,
                Err(e) => {
                    stop_opened(handles, threads);
                    return Err(e);
                }
            };
            handles.push(ShardHandle {
                apply: apply_tx,
                read: read_tx,
            });
            threads.push(ShardThread { handle, done });
        }
        Ok(Shards {
            set: ShardSet {
                handles: handles.into(),
                sizes,
            },
            threads,
        })
    }

    /// Closes every shard, in parallel: each syncs its engine's files, closes its engine
    /// and leaves its loop ([`ApplyCmd::Close`], behind everything already on its apply
    /// queue), then its thread is joined. Waits at most `timeout` in all, without blocking the
    /// runtime's workers; a shard still busy then is left to the process exit. Commands that
    /// come afterwards through any [`ShardSet`] are refused ("server stopped") until the last
    /// sender is gone.
    ///
    /// Call it once nothing sends to the apply queues any more (the dispatcher has stopped):
    /// what comes after the close command is refused.
    ///
    /// Errors: one [`CloseError`] per shard that did not close cleanly.
    pub async fn close(self, timeout: std::time::Duration) -> Result<(), Vec<CloseError>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let closing: Vec<_> = self
            .set
            .iter()
            .map(|shard| {
                let (reply, closed) = oneshot::channel();
                // A shard that has stopped has no receiver left: `closed` then fails.
                let _ = shard.apply.send(ApplyCmd::Close { reply });
                closed
            })
            .collect();
        drop(self.set);
        let mut errors = Vec::new();
        for (shard, (closed, thread)) in closing.into_iter().zip(self.threads).enumerate() {
            // A shard that stopped on a failure refuses its queues, the close among them: the
            // closer hears at once that it had stopped.
            let outcome = match tokio::time::timeout_at(deadline, closed).await {
                Ok(Ok(Ok(()))) => Ok(()),
                Ok(Ok(Err(error))) => Err(CloseError::Sync { shard, error }),
                Ok(Err(_)) => Err(CloseError::Stopped(shard)),
                Err(_) => Err(CloseError::TimedOut(shard)),
            };
            let joined = match outcome {
                Err(CloseError::TimedOut(_)) => {
                    // Refuse what comes should the shard finish closing later.
                    tokio::spawn(async move {
                        if let Ok(Some(queues)) = thread.done.await {
                            queues.refuse_all().await;
                        }
                    });
                    Ok(())
                }
                _ => thread.join(shard, deadline).await,
            };
            errors.extend(outcome.err());
            errors.extend(joined.err());
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

impl Shards {
    /// Drops this handle's queue senders and waits for every shard thread to finish, which
    /// happens once every other sender ([`ShardSet`] clone) is gone too: for a caller that
    /// holds the only ones (benchmarks). A member closes its shards with [`Shards::close`].
    pub fn join(self) {
        drop(self.set);
        for t in self.threads {
            let _ = t.handle.join();
        }
    }
}

impl ShardThread {
    /// Waits until `deadline` for the shard to leave its loop, has its queues refused from
    /// then on (unless they already are), and joins the thread (off the runtime's workers:
    /// glommio's join blocks).
    async fn join(self, shard: usize, deadline: tokio::time::Instant) -> Result<(), CloseError> {
        match tokio::time::timeout_at(deadline, self.done).await {
            Ok(Ok(Some(queues))) => {
                tokio::spawn(queues.refuse_all());
            }
            // Already refused: the shard stopped on a failure or a panic.
            Ok(Ok(None)) => {}
            // The thread ended without a word (a panic outside the shard's loop, say); the
            // join says why.
            Ok(Err(_)) => {}
            Err(_) => return Err(CloseError::TimedOut(shard)),
        }
        let handle = self.handle;
        let joined = tokio::task::spawn_blocking(move || handle.join());
        match tokio::time::timeout_at(deadline, joined).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(CloseError::Thread {
                shard,
                reason: e.to_string(),
            }),
            Ok(Err(e)) => Err(CloseError::Thread {
                shard,
                reason: e.to_string(),
            }),
            Err(_) => Err(CloseError::TimedOut(shard)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::Duration;

    fn engine_config(kind: EngineKind, dir: &std::path::Path) -> EngineConfig {
        EngineConfig {
            kind,
            dir: dir.to_path_buf(),
            rocks: RocksOptions::default(),
            member_id: 1,
            create: true,
        }
    }

    fn range_all() -> Arc<RangeRequest> {
        Arc::new(RangeRequest {
            key: vec![0],
            range_end: vec![0],
            ..Default::default()
        })
    }

    /// Regression: a shard whose engine fails refuses what is queued for it at once. Before, it
    /// handed its queues back unanswered until the member closed its shards, so start-up
    /// waited for ever on a shard whose applied state was in a corrupt SST file.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_shard_that_fails_refuses_what_comes_at_once() {
        let tmp = tempfile::tempdir().unwrap();
        let config = engine_config(EngineKind::Rocksdb, tmp.path());
        // Two runs, each closed (which flushes the memtables): shard 0 then has an older SST
        // file with its identity, read when the database opens, and a newer one with the
        // applied state, read once it is open.
        for run in 0..2i64 {
            let (fatal, _fatal_rx) = FatalTx::channel();
            let shards = Shards::spawn(1, &config, fatal).unwrap();
            let rev = 2 + run;
            let put = crate::proto::etcdserverpb::PutRequest {
                key: format!("k{run}").into_bytes(),
                value: b"v".to_vec(),
                ..Default::default()
            };
            let apply = &shards.set.get(0).apply;
            let _ = apply.send(ApplyCmd::Put {
                req: put,
                rev,
                sub: 0,
                reply: None,
            });
            let (mut reply, flushed) = BarrierAck::new(1);
            let state = BarrierState {
                applied_index: rev as u64,
                applied_term: 1,
                revision: rev,
                compact_revision: 0,
                lease_changes: Arc::new(Vec::new()),
                events: None,
            };
            let reply = reply.pop().unwrap();
            let _ = apply.send(ApplyCmd::Barrier { state, reply });
            flushed.await.expect("flushed");
            shards.close(Duration::from_secs(10)).await.expect("closed");
        }
        let newest = std::fs::read_dir(tmp.path().join("0"))
            .unwrap()
            .map(|f| f.unwrap().path())
            .filter(|p| p.extension() == Some("sst".as_ref()))
            .max()
            .expect("an SST file");
        let mut bytes = std::fs::read(&newest).unwrap();
        for b in &mut bytes[8..11] {
            *b ^= 0xa5;
        }
        std::fs::write(&newest, &bytes).unwrap();

        let (fatal, mut fatal_rx) = FatalTx::channel();
        let shards = Shards::spawn(1, &config, fatal).unwrap();
        let (reply, recovered) = oneshot::channel();
        let _ = shards.set.get(0).apply.send(ApplyCmd::Recover { reply });
        let recovered = tokio::time::timeout(Duration::from_secs(5), recovered)
            .await
            .expect("refused at once, not left waiting for the close");
        assert!(recovered.is_err(), "{recovered:?}");
        let read = tokio::time::timeout(
            Duration::from_secs(5),
            shards.set.read_range(range_all(), 0),
        )
        .await
        .expect("a read too");
        assert!(matches!(read, Err(EtcdError::Stopped)));
        assert!(fatal_rx.try_recv().is_ok(), "the failure went up `fatal`");
        let closed = shards.close(Duration::from_secs(10)).await;
        let errors = closed.expect_err("shard 0 had stopped");
        assert!(
            matches!(errors.as_slice(), [CloseError::Stopped(0)]),
            "{errors:?}"
        );
    }

    /// Regression: when a shard's database cannot be opened, the shards already open close
    /// theirs before the error is returned. Before, they were left open while the process
    /// exited with the error, and RocksDB's background threads, still running, aborted the
    /// exit ("pthread lock: Invalid argument", SIGABRT) now and then.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_shard_that_cannot_open_closes_the_ones_already_open() {
        let tmp = tempfile::tempdir().unwrap();
        let (fatal, _fatal_rx) = FatalTx::channel();
        let created = Shards::spawn(2, &engine_config(EngineKind::Rocksdb, tmp.path()), fatal);
        created
            .unwrap()
            .close(Duration::from_secs(10))
            .await
            .unwrap();
        std::fs::remove_dir_all(tmp.path().join("1")).unwrap();
        let config = EngineConfig {
            create: false,
            ..engine_config(EngineKind::Rocksdb, tmp.path())
        };
        for _ in 0..20 {
            let (fatal, _fatal_rx) = FatalTx::channel();
            let err = Shards::spawn(2, &config, fatal)
                .err()
                .expect("shard 1 is missing");
            assert!(matches!(err, SpawnError::Open { shard: 1, .. }), "{err}");
            // RocksDB locks an open database: shard 0's opens again only if it was closed.
            let engine = config.open(0, 2).expect("shard 0 was closed");
            drop(engine);
        }
    }

    /// The events a barrier reads for the watch feed are the ones the feed would read from the
    /// shards afterwards, prev_kv and a txn's put-then-delete of one key included; a batch
    /// that starts below a compaction gets the compaction instead.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_barrier_reads_the_events_a_watch_would() {
        use crate::proto::etcdserverpb::PutRequest;
        for kind in [EngineKind::Memory, EngineKind::Rocksdb] {
            let tmp = tempfile::tempdir().unwrap();
            let (fatal, _fatal_rx) = FatalTx::channel();
            let shards = Shards::spawn(2, &engine_config(kind, tmp.path()), fatal).unwrap();
            let set = shards.set.clone();
            let put = |key: &str, rev: i64, sub: u32| {
                let req = PutRequest {
                    key: key.as_bytes().to_vec(),
                    value: format!("v{rev}").into_bytes(),
                    ..Default::default()
                };
                let shard = shard_for(key.as_bytes(), 2);
                let cmd = ApplyCmd::Put {
                    req,
                    rev,
                    sub,
                    reply: None,
                };
                let _ = set.get(shard).apply.send(cmd);
            };
            let delete = |key: &str, rev: i64, sub: u32| {
                let (reply, _rx) = oneshot::channel();
                let range = KeyRange::from_request(key.as_bytes(), b"");
                let shard = shard_for(key.as_bytes(), 2);
                let _ = set.get(shard).apply.send(ApplyCmd::Delete {
                    range,
                    rev,
                    sub,
                    reply,
                });
            };
            let barrier = |rev: i64, compact_revision: i64, from: i64| {
                let state = BarrierState {
                    applied_index: rev as u64,
                    applied_term: 1,
                    revision: rev,
                    compact_revision,
                    lease_changes: Arc::new(Vec::new()),
                    events: Some(EventsWanted {
                        from,
                        prev_kv: true,
                        limit: usize::MAX,
                    }),
                };
                let (parts, rx) = BarrierAck::new(2);
                for (shard, reply) in parts.into_iter().enumerate() {
                    let state = state.clone();
                    let _ = set
                        .get(shard)
                        .apply
                        .send(ApplyCmd::Barrier { state, reply });
                }
                rx
            };
            for (rev, key) in [(2, "a"), (3, "b"), (4, "c"), (5, "a")] {
                put(key, rev, 0);
            }
            // One txn at revision 6: a put of "d", then a delete of it and of "b".
            put("d", 6, 0);
            delete("d", 6, 1);
            delete("b", 6, 2);
            let parts = barrier(6, 0, 3).await.expect("every shard passed");
            let mut handed: Vec<_> = parts.into_iter().flat_map(|p| p.unwrap().events).collect();
            crate::mvcc::store::sort_events(&mut handed);
            let read = set
                .events(&KeyRange::everything(), 3, 6, usize::MAX, true)
                .await
                .unwrap()
                .unwrap();
            let shape = |e: &crate::mvcc::store::EventRecord| format!("{:?}", e.event);
            let handed: Vec<String> = handed.iter().map(shape).collect();
            let read: Vec<String> = read.events.iter().map(shape).collect();
            assert_eq!(handed, read, "{kind:?}");
            assert_eq!(handed.len(), 6, "{kind:?}: {handed:?}");

            for shard in 0..2 {
                let _ = set.get(shard).apply.send(ApplyCmd::Compact { rev: 5 });
            }
            put("e", 7, 0);
            let parts = barrier(7, 5, 4).await.expect("every shard passed");
            for part in parts {
                assert_eq!(
                    part.unwrap_err(),
                    crate::mvcc::store::HistoryCompacted {
                        compact_revision: 5
                    },
                    "{kind:?}"
                );
            }
            shards.close(Duration::from_secs(10)).await.unwrap();
        }
    }

    /// A later shard whose executor glommio cannot build (here: pinned to a CPU that does not
    /// exist) closes the shards already open before the error returns, as a shard that cannot
    /// open its engine does: the process must not exit with their engines still running.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_shard_whose_executor_cannot_start_closes_the_ones_already_open() {
        let tmp = tempfile::tempdir().unwrap();
        let config = engine_config(EngineKind::Rocksdb, tmp.path());
        let first = shard_cpus().unwrap()[0];
        let (fatal, _fatal_rx) = FatalTx::channel();
        let err = Shards::spawn_on(2, &config, fatal, &[first, 1 << 20])
            .err()
            .expect("no such CPU for shard 1");
        assert!(
            matches!(err, SpawnError::Executor { shard: 1, .. }),
            "{err}"
        );
        // RocksDB locks an open database: shard 0's opens again only if it was closed.
        let engine = config.open(0, 2).expect("shard 0 was closed");
        drop(engine);
    }

    /// Closing answers once every shard has closed its engine; whatever comes afterwards
    /// through another handle is refused ("server stopped") at once, never left waiting.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn close_closes_every_engine_and_refuses_what_comes_after() {
        for kind in [EngineKind::Memory, EngineKind::Rocksdb] {
            let tmp = tempfile::tempdir().unwrap();
            let (fatal, _fatal_rx) = FatalTx::channel();
            let shards = Shards::spawn(2, &engine_config(kind, tmp.path()), fatal).unwrap();
            let set = shards.set.clone();
            set.read_range(range_all(), 0)
                .await
                .expect("served before close");
            shards
                .close(Duration::from_secs(10))
                .await
                .expect("every shard closes");
            for _ in 0..3 {
                let read =
                    tokio::time::timeout(Duration::from_secs(5), set.read_range(range_all(), 0))
                        .await
                        .expect("refused at once, not left waiting");
                assert!(matches!(read, Err(EtcdError::Stopped)), "{kind:?}");
                let (reply, rx) = oneshot::channel();
                let _ = set.get(0).apply.send(ApplyCmd::Recover { reply });
                let recovered = tokio::time::timeout(Duration::from_secs(5), rx).await;
                assert!(matches!(recovered, Ok(Err(_))), "{kind:?}");
            }
            if kind == EngineKind::Rocksdb {
                // Synced: what the memtables held (the shard's identity, at least) is in
                // SST files, not only in RocksDB's log.
                for shard in 0..2 {
                    let sst = std::fs::read_dir(tmp.path().join(shard.to_string()))
                        .unwrap()
                        .filter(|f| f.as_ref().unwrap().path().extension() == Some("sst".as_ref()))
                        .count();
                    assert!(sst > 0, "shard {shard}: no SST file after close");
                }
                // Closed: the databases open again (RocksDB holds a lock on an open one).
                let reopened = engine_config(kind, tmp.path());
                for shard in 0..2 {
                    let engine = reopened.open(shard, 2).expect("reopens after close");
                    drop(engine);
                }
            }
        }
    }

    #[test]
    fn shard_for_is_stable_and_in_range() {
        for n in 1..8 {
            for k in [&b"a"[..], b"foo", b"\0", b"zzzz"] {
                let s = shard_for(k, n);
                assert!(s < n);
                assert_eq!(s, shard_for(k, n));
            }
        }
    }

    #[test]
    fn cpu_lists_parse_as_the_kernel_writes_them() {
        assert_eq!(
            parse_cpu_list("0-3,8,10-11"),
            Some(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(parse_cpu_list("1"), Some(vec![1]));
        assert_eq!(parse_cpu_list("3,1,1-2"), Some(vec![1, 2, 3]));
        assert_eq!(parse_cpu_list("2-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }

    /// Regression: shards were placed on glommio's unordered online-CPU set, so placement
    /// changed between starts and ignored the process's affinity mask.
    #[test]
    fn shard_cpus_are_sorted_and_allowed() {
        let cpus = shard_cpus().unwrap();
        assert!(!cpus.is_empty());
        assert!(cpus.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(cpus, shard_cpus().unwrap(), "the same on every call");
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let allowed = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .and_then(|l| parse_cpu_list(l.trim()))
            .unwrap();
        assert!(cpus.iter().all(|c| allowed.contains(c)));
    }
}
