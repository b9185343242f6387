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

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use tokio::sync::oneshot;

pub use crate::config::EngineKind;
use crate::error::EtcdError;
use crate::fatal::{FatalError, FatalTx};
use crate::mvcc::engine::StorageError;
use crate::mvcc::engine::{Engine, Live, VersionRecord};
use crate::mvcc::engine::{FlushState, RecoveredState};
use crate::mvcc::memory::MemoryEngine;
use crate::mvcc::range::PartialRange;
use crate::mvcc::rocks::{RocksEngine, RocksOptions, ShardIdentity};
use crate::mvcc::store::{CompareEval, EventBatch, PutArgs};
use crate::mvcc::{KeyRange, KeyValue, Store};
use crate::proto::etcdserverpb::{Compare, PutRequest, RangeRequest};
use crate::proto::metastorepb::LeaseRecord;
use crate::proto::metastorepb::{KeyHistory, KeyVersion};

/// The shard that owns `key` among `shards` shards: a pure hash, identical on every replica.
pub fn shard_for(key: &[u8], shards: usize) -> usize {
    crc32fast::hash(key) as usize % shards
}

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

/// Work for a shard, in log order, from the apply dispatcher.
pub enum ApplyCmd {
    /// The keys attached to `lease` on this shard (auth checks of lease revokes).
    LeaseKeys {
        /// The lease.
        lease: i64,
        /// Gets the keys.
        reply: oneshot::Sender<Vec<Vec<u8>>>,
    },
    /// Write one key at `rev`; replies with the previous key-value when asked.
    Put {
        /// The client's put.
        req: PutRequest,
        /// Revision assigned by the dispatcher.
        rev: i64,
        /// Order within the revision.
        sub: u32,
        /// Receives the previous key-value.
        reply: Option<oneshot::Sender<Option<KeyValue>>>,
    },
    /// Read one key at revision `rev` (the revision before the entry being applied).
    Get {
        /// Key to read.
        key: Vec<u8>,
        /// Read revision.
        rev: i64,
        /// Receives the live key-value, if any.
        reply: oneshot::Sender<Option<KeyValue>>,
    },
    /// Delete this shard's keys in a range at `rev`; replies with what was deleted.
    Delete {
        /// Keys to delete.
        range: KeyRange,
        /// Revision assigned by the dispatcher.
        rev: i64,
        /// Order within the revision.
        sub: u32,
        /// Receives the deleted key-values, in key order.
        reply: oneshot::Sender<Vec<KeyValue>>,
    },
    /// Evaluate txn compares at revision `rev` (the revision before the txn).
    Compare {
        /// Compares naming keys of this shard.
        cmps: Vec<Compare>,
        /// Read revision.
        rev: i64,
        /// One evaluation per compare.
        reply: oneshot::Sender<Vec<CompareEval>>,
    },
    /// A range read inside a txn, at `rev` ([`crate::mvcc::LATEST`] for the newest).
    Range {
        /// The request.
        req: Arc<RangeRequest>,
        /// Read revision.
        rev: i64,
        /// This shard's part.
        reply: oneshot::Sender<Result<PartialRange, EtcdError>>,
    },
    /// Delete this shard's keys attached to `lease` at `rev` (revoke or expiry).
    RevokeLease {
        /// The lease.
        lease: i64,
        /// Revision assigned by the dispatcher.
        rev: i64,
        /// Order within the revision.
        sub: u32,
        /// Receives the deleted key-values, in key order.
        reply: oneshot::Sender<Vec<KeyValue>>,
    },
    /// Compact logically at `rev`: reads below it fail.
    Compact {
        /// Compaction revision.
        rev: i64,
    },
    /// Remove history below `rev` (sent once every shard has durably recorded the compaction).
    Purge {
        /// Compaction revision.
        rev: i64,
    },
    /// The commands that follow belong to Raft entry `index` (sent only while replaying the
    /// entries some shard had already made durable before a restart).
    Entry {
        /// Raft index.
        index: u64,
    },
    /// Everything before this is applied: flush the engine with the applied state.
    Barrier {
        /// The applied state to persist with the data.
        state: BarrierState,
        /// Answered once the flush is done.
        reply: oneshot::Sender<()>,
    },
    /// The applied state found on disk, if the engine is durable.
    Recover {
        /// Receives it.
        reply: oneshot::Sender<Option<RecoveredState>>,
    },
    /// Write an on-disk checkpoint of the flushed state into `dir`.
    Checkpoint {
        /// Target directory (must not exist).
        dir: std::path::PathBuf,
        /// Receives the outcome (a failed checkpoint is not fatal: it is retried).
        reply: oneshot::Sender<Result<(), StorageError>>,
    },
    /// Dump every key's history (for a snapshot).
    Export {
        /// Receives the histories in key order.
        reply: oneshot::Sender<Vec<KeyHistory>>,
    },
    /// Empty the shard before a leader's snapshot is imported: its data, its stored applied
    /// state, and what it remembered of entries made durable before a restart.
    Reset,
    /// Load key histories from a snapshot.
    Import {
        /// Histories of keys this shard owns.
        keys: Vec<KeyHistory>,
        /// Compaction revision of the snapshot.
        compact_revision: i64,
    },
}

/// The applied state a barrier persists (owned form of [`FlushState`]).
#[derive(Clone, Debug)]
pub struct BarrierState {
    /// Raft index applied.
    pub applied_index: u64,
    /// Term of that entry.
    pub applied_term: u64,
    /// Store revision at that index.
    pub revision: i64,
    /// Compaction revision at that index.
    pub compact_revision: i64,
    /// Leases granted or revoked since the previous barrier.
    pub lease_changes: Arc<Vec<(i64, Option<LeaseRecord>)>>,
}

/// Reads from the gRPC front end.
pub enum ReadCmd {
    /// Watch events for keys in `range` with revisions in `[from, to]` (both applied).
    Events {
        /// Watched keys.
        range: KeyRange,
        /// First revision.
        from: i64,
        /// Last revision, at most the applied revision.
        to: i64,
        /// Soft cap on events (cut between revisions).
        limit: usize,
        /// Include each key's previous version.
        prev_kv: bool,
        /// This shard's events.
        reply: oneshot::Sender<Result<EventBatch, EtcdError>>,
    },
    /// Reclaim space (Defragment: a memtable flush and a full manual compaction in RocksDB).
    Defragment {
        /// Answered once done.
        reply: oneshot::Sender<()>,
    },
    /// Keys of this shard attached to a lease.
    LeaseKeys {
        /// The lease.
        lease: i64,
        /// Its keys.
        reply: oneshot::Sender<Vec<Vec<u8>>>,
    },
    /// Sum of [`crate::mvcc::kv_hash`] over this shard's keys (etcd HashKV).
    HashKv {
        /// Hash versions up to this revision.
        rev: i64,
        /// The compaction revision in force.
        compact_revision: i64,
        /// Receives the shard's sum.
        reply: oneshot::Sender<u32>,
    },
    /// This shard's part of a range at `rev`.
    Range {
        /// The request.
        req: Arc<RangeRequest>,
        /// A revision every shard has applied.
        rev: i64,
        /// This shard's part.
        reply: oneshot::Sender<Result<PartialRange, EtcdError>>,
    },
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
    /// Errors: ErrCompacted when `from` is below the compaction revision.
    pub async fn events(
        &self,
        range: &KeyRange,
        from: i64,
        to: i64,
        limit: usize,
        prev_kv: bool,
    ) -> Result<EventBatch, EtcdError> {
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
        for part in parts {
            let part = part?;
            merged.through = merged.through.min(part.through);
            merged.events.extend(part.events);
        }
        // A shard that stopped early bounds what is complete for all of them.
        let through = merged.through;
        merged.events.retain(|e| e.rev <= through);
        fn key(e: &crate::mvcc::store::EventRecord) -> Option<&[u8]> {
            e.event.kv.as_ref().map(|kv| kv.key.as_slice())
        }
        merged.events.sort_by(|a, b| {
            (a.rev, a.sub)
                .cmp(&(b.rev, b.sub))
                .then_with(|| key(a).cmp(&key(b)))
        });
        Ok(merged)
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

/// Running shard executors; joining waits for them to drain and stop.
pub struct Shards {
    /// The queues.
    pub set: ShardSet,
    threads: Vec<glommio::ExecutorJoinHandle<()>>,
}

/// The CPUs shards are pinned to: the online CPUs this process is allowed to run on
/// (`Cpus_allowed_list` in `/proc/self/status`, which reflects `taskset`, `CPUAffinity=` and
/// cpusets), sorted ascending. glommio's own online-CPU set has no stable order and ignores the
/// affinity mask, which made placement differ between starts and could pin a shard to a CPU
/// outside its cpuset.
///
/// Errors: the online CPUs cannot be listed.
pub fn shard_cpus() -> Result<Vec<usize>, SpawnError> {
    let mut online: Vec<usize> = glommio::CpuSet::online()
        .map_err(|e| SpawnError::OnlineCpus(e.to_string()))?
        .into_iter()
        .map(|l| l.cpu)
        .collect();
    online.sort_unstable();
    online.dedup();
    let allowed = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .and_then(|l| parse_cpu_list(l.trim()))
        });
    Ok(match allowed {
        Some(allowed) => {
            let both: Vec<usize> = online
                .iter()
                .copied()
                .filter(|c| allowed.contains(c))
                .collect();
            if both.is_empty() {
                online
            } else {
                both
            }
        }
        None => online,
    })
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

/// Parses a kernel CPU list such as `0-3,8,10-11` into sorted CPU numbers; `None` if malformed.
pub fn parse_cpu_list(list: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().ok()?, b.parse().ok()?);
                if a > b {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    Some(cpus)
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
        let cpus = shard_cpus()?;
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
            let config = engine.clone();
            let sizes = sizes.clone();
            let fatal = fatal.clone();
            let thread = glommio::LocalExecutorBuilder::new(placement)
                .name(&format!("shard-{i}"))
                .spawn(move || async move {
                    match config.open(i, count) {
                        Ok(engine) => {
                            let _ = opened_tx.send(Ok(()));
                            run_shard(i, engine, sizes, apply_rx, read_rx, fatal).await;
                        }
                        Err(e) => {
                            let _ = opened_tx.send(Err(e));
                        }
                    }
                })
                .map_err(|e| SpawnError::Executor {
                    shard: i,
                    reason: e.to_string(),
                })?;
            let opened = match opened_rx.recv() {
                Ok(opened) => opened,
                // The executor thread ended before opening the engine: glommio could not build
                // the executor (for example RLIMIT_MEMLOCK too low for its io_uring rings).
                // Its join result carries the reason.
                Err(_) => match thread.join() {
                    Err(e) => {
                        return Err(SpawnError::Executor {
                            shard: i,
                            reason: e.to_string(),
                        })
                    }
                    Ok(()) => return Err(SpawnError::StoppedWhileOpening(i)),
                },
            };
            opened.map_err(|error| SpawnError::Open { shard: i, error })?;
            handles.push(ShardHandle {
                apply: apply_tx,
                read: read_tx,
            });
            threads.push(thread);
        }
        Ok(Shards {
            set: ShardSet {
                handles: handles.into(),
                sizes,
            },
            threads,
        })
    }

    /// Waits for every shard thread to finish (after all queue senders are dropped).
    pub fn join(self) {
        drop(self.set);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Serves a shard's queues until they close, or until its engine fails: then the shard stops
/// serving at once (its read task too: commands already queued are dropped unanswered, which
/// requesters see as "server stopped"), logs the error and sends it up `fatal`.
async fn run_shard(
    shard: usize,
    engine: Box<dyn Engine>,
    sizes: Arc<[ShardSize]>,
    apply_rx: flume::Receiver<ApplyCmd>,
    read_rx: flume::Receiver<ReadCmd>,
    fatal: FatalTx,
) {
    // Set once either task hits a storage error: neither serves anything after it.
    let failed = Rc::new(std::cell::Cell::new(false));
    let fail = {
        let failed = failed.clone();
        move |e: StorageError| {
            if !failed.replace(true) {
                e.log_fatal();
                fatal.report(FatalError::Storage(e));
            }
        }
    };
    let store = Store::new(engine);
    let durable_index = match store.recover() {
        Ok(state) => state.map_or(0, |r| r.applied_index),
        Err(e) => return fail(e),
    };
    sizes[shard].set(&store);
    let store = Rc::new(RefCell::new(store));
    let reader = store.clone();
    let reader_sizes = sizes.clone();
    let reader_fail = fail.clone();
    let reader_failed = failed.clone();
    glommio::spawn_local(async move {
        while let Ok(cmd) = read_rx.recv_async().await {
            if reader_failed.get() {
                break;
            }
            if let Err(e) = handle_read(&reader.borrow(), &reader_sizes[shard], cmd) {
                reader_fail(e);
                break;
            }
            glommio::yield_if_needed().await;
        }
    })
    .detach();
    let mut replay = Replay {
        shard,
        durable_index,
        entry_index: u64::MAX,
    };
    while let Ok(cmd) = apply_rx.recv_async().await {
        if failed.get() {
            return;
        }
        if let ApplyCmd::Purge { rev } = cmd {
            // Purging a large history is long: do it in steps and let reads run in between.
            loop {
                match store.borrow_mut().purge_some(rev, PURGE_STEP) {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(e) => return fail(e),
                }
                glommio::executor().yield_now().await;
                if failed.get() {
                    return;
                }
            }
            continue;
        }
        let done = handle_apply(&mut store.borrow_mut(), &mut replay, &sizes[shard], cmd);
        if let Err(e) = done {
            return fail(e);
        }
        glommio::yield_if_needed().await;
    }
}

/// Changes purged per step before a shard lets other tasks (reads) run.
const PURGE_STEP: usize = 1024;

/// Which entries this shard had already made durable before a restart. While the dispatcher
/// replays those (it announces each with [`ApplyCmd::Entry`]), writes are skipped and answered
/// from history, so no entry is applied twice and none is skipped.
struct Replay {
    /// This shard's number (read by the crash-test hook only).
    #[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
    shard: usize,
    durable_index: u64,
    entry_index: u64,
}

impl Replay {
    fn skipping(&self) -> bool {
        self.entry_index <= self.durable_index
    }
}

/// Serves one read. A storage error is returned (and the reply dropped unanswered).
fn handle_read(store: &Store, size: &ShardSize, cmd: ReadCmd) -> Result<(), StorageError> {
    match cmd {
        ReadCmd::Range { req, rev, reply } => {
            let _ = reply.send(store.range(&req, rev)?);
        }
        ReadCmd::Events {
            range,
            from,
            to,
            limit,
            prev_kv,
            reply,
        } => {
            let _ = reply.send(store.events(&range, from, to, limit, prev_kv)?);
        }
        ReadCmd::LeaseKeys { lease, reply } => {
            let _ = reply.send(store.lease_keys(lease)?);
        }
        ReadCmd::HashKv {
            rev,
            compact_revision,
            reply,
        } => {
            let mut sum = 0u32;
            store.export(&mut |k, h| {
                sum = sum.wrapping_add(crate::mvcc::kv_hash(k, h, rev, compact_revision))
            })?;
            let _ = reply.send(sum);
        }
        ReadCmd::Defragment { reply } => {
            store.defragment();
            size.set(store);
            let _ = reply.send(());
        }
    }
    Ok(())
}

// Replies are best-effort: a dropped receiver means the requester gave up. A storage error is
// returned (and the reply dropped unanswered).
fn handle_apply(
    store: &mut Store,
    replay: &mut Replay,
    size: &ShardSize,
    cmd: ApplyCmd,
) -> Result<(), StorageError> {
    match cmd {
        ApplyCmd::Put {
            req,
            rev,
            sub,
            reply,
        } => {
            let args = PutArgs {
                key: &req.key,
                value: &req.value,
                lease: req.lease,
                ignore_value: req.ignore_value,
                ignore_lease: req.ignore_lease,
            };
            let prev = if replay.skipping() {
                store.replayed_put(&req.key, rev)?
            } else {
                store.put(args, rev, sub)?
            };
            if let Some(reply) = reply {
                let _ = reply.send(prev);
            }
        }
        ApplyCmd::LeaseKeys { lease, reply } => {
            let _ = reply.send(store.lease_keys(lease)?);
        }
        ApplyCmd::Get { key, rev, reply } => {
            let _ = reply.send(store.get(&key, rev)?);
        }
        ApplyCmd::Delete {
            range,
            rev,
            sub,
            reply,
        } => {
            let deleted = if replay.skipping() {
                store.replayed_delete(&range, rev)?
            } else {
                store.delete_range(&range, rev, sub)?
            };
            let _ = reply.send(deleted);
        }
        ApplyCmd::Compare { cmps, rev, reply } => {
            let evals = cmps
                .iter()
                .map(|c| store.compare(c, rev))
                .collect::<Result<_, _>>()?;
            let _ = reply.send(evals);
        }
        ApplyCmd::Range { req, rev, reply } => {
            let _ = reply.send(store.range(&req, rev)?);
        }
        ApplyCmd::RevokeLease {
            lease,
            rev,
            sub,
            reply,
        } => {
            let deleted = if replay.skipping() {
                store.replayed_revoke(lease, rev)?
            } else {
                store.revoke_lease(lease, rev, sub)?
            };
            let _ = reply.send(deleted);
        }
        ApplyCmd::Compact { rev } => store.compact(rev),
        ApplyCmd::Purge { rev } => store.purge(rev)?, // normally handled in steps by run_shard
        ApplyCmd::Entry { index } => replay.entry_index = index,
        ApplyCmd::Barrier { state, reply } => {
            // Crash-test hook (test builds only): FAILPOINTS="shard-before-flush=return(N)"
            // kills the process just before shard N persists a barrier, after the other
            // shards may have.
            #[cfg(feature = "failpoints")]
            if fail::eval("shard-before-flush", |arg| arg) == Some(Some(replay.shard.to_string())) {
                std::thread::sleep(std::time::Duration::from_millis(50));
                std::process::abort();
            }
            // Replaying entries this shard already holds: its data is ahead of this barrier,
            // so the state on disk (which describes that data) must not move back.
            if state.applied_index > replay.durable_index {
                store.flush(&FlushState {
                    applied_index: state.applied_index,
                    applied_term: state.applied_term,
                    revision: state.revision,
                    compact_revision: state.compact_revision,
                    lease_changes: &state.lease_changes,
                })?;
            }
            replay.entry_index = u64::MAX;
            size.set(store);
            let _ = reply.send(());
        }
        ApplyCmd::Recover { reply } => {
            let _ = reply.send(store.recover()?);
        }
        ApplyCmd::Checkpoint { dir, reply } => {
            let _ = reply.send(store.checkpoint(&dir));
        }
        ApplyCmd::Export { reply } => {
            let mut keys = Vec::new();
            store.export(&mut |k, h| keys.push(history_to_proto(k, h)))?;
            let _ = reply.send(keys);
        }
        ApplyCmd::Reset => {
            store.reset()?;
            replay.durable_index = 0;
            replay.entry_index = u64::MAX;
            size.set(store);
        }
        ApplyCmd::Import {
            keys,
            compact_revision,
        } => {
            for kh in keys {
                let (key, history) = history_from_proto(kh);
                store.import(key, history);
            }
            store.finish_import();
            store.set_compact_revision(compact_revision);
        }
    }
    Ok(())
}

/// Encodes a key's history for a snapshot.
pub fn history_to_proto(key: &[u8], history: &[VersionRecord]) -> KeyHistory {
    let versions = history
        .iter()
        .map(|r| match &r.live {
            Some(l) => KeyVersion {
                mod_revision: r.mod_revision,
                sub: r.sub,
                tombstone: false,
                value: l.value.clone(),
                create_revision: l.create_revision,
                version: l.version,
                lease: l.lease,
            },
            None => KeyVersion {
                mod_revision: r.mod_revision,
                sub: r.sub,
                tombstone: true,
                ..Default::default()
            },
        })
        .collect();
    KeyHistory {
        key: key.to_vec(),
        versions,
    }
}

/// Decodes a key's history from a snapshot.
pub fn history_from_proto(kh: KeyHistory) -> (Vec<u8>, Vec<VersionRecord>) {
    let history = kh
        .versions
        .into_iter()
        .map(|v| VersionRecord {
            mod_revision: v.mod_revision,
            sub: v.sub,
            live: (!v.tombstone).then_some(Live {
                value: v.value,
                create_revision: v.create_revision,
                version: v.version,
                lease: v.lease,
            }),
        })
        .collect();
    (kh.key, history)
}

#[cfg(test)]
mod tests {
    use super::*;

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
