//! A shard's executor: the loop on its glommio thread that drains the apply and read queues
//! into its store, flushes at barriers, purges compacted history in steps, and closes the
//! store when the member stops.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use super::{history_from_proto, history_to_proto, ApplyCmd, BarrierState, ReadCmd, ShardSize};
use crate::fatal::{await_reporting_panics, FatalError, FatalTx};
use crate::mvcc::engine::Engine;
use crate::mvcc::engine::FlushState;
use crate::mvcc::engine::StorageError;
use crate::mvcc::store::PutArgs;
use crate::mvcc::{KeyRange, KeyValue, Store};
use crate::proto::etcdserverpb::PutRequest;
use crate::proto::metastorepb::KeyHistory;

/// The receiving ends of a shard's queues: [`run_shard`] serves them; once it leaves its loop,
/// what still comes is refused ([`Queues::refuse_all`]).
pub(super) struct Queues {
    /// The apply queue (dispatcher only, log order).
    pub(super) apply: flume::Receiver<ApplyCmd>,
    /// The read queue (front end).
    pub(super) read: flume::Receiver<ReadCmd>,
}

impl Queues {
    /// Drops every command that comes, so that its requester, waiting for the reply, gets
    /// "server stopped", until every sender is gone. A command sent to a queue whose
    /// receivers are all gone fails at once, but one that got in just before would wait for
    /// its answer until the last sender went: a stopped shard keeps its queues drained instead.
    pub(super) async fn refuse_all(self) {
        let apply = async { while self.apply.recv_async().await.is_ok() {} };
        let read = async { while self.read.recv_async().await.is_ok() {} };
        tokio::join!(apply, read);
    }
}

/// Serves a shard's queues (see [`serve`]); returns whether it stopped on a storage failure
/// (rather than a close, or its queues closing).
pub(super) async fn run_shard(
    shard: usize,
    engine: Box<dyn Engine>,
    sizes: Arc<[ShardSize]>,
    queues: &Queues,
    fatal: FatalTx,
) -> bool {
    let failed = Rc::new(std::cell::Cell::new(false));
    serve(shard, engine, sizes, queues, fatal, failed.clone()).await;
    failed.get()
}

/// Serves a shard's queues until they close, until [`ApplyCmd::Close`] (the store closed,
/// the closer answered), or until its engine fails: then the shard stops serving at once (its
/// read task too: commands already queued are dropped unanswered, which requesters see as
/// "server stopped"), logs the error and sends it up `fatal`.
async fn serve(
    shard: usize,
    engine: Box<dyn Engine>,
    sizes: Arc<[ShardSize]>,
    queues: &Queues,
    fatal: FatalTx,
    // Set once either task hits a storage error: neither serves anything after it.
    failed: Rc<std::cell::Cell<bool>>,
) {
    let panic_fatal = fatal.clone();
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
    // Cancelled when this returns (the task handle is dropped), or on close.
    let reads = serve_reads(
        store.clone(),
        sizes.clone(),
        shard,
        queues.read.clone(),
        failed.clone(),
        fail.clone(),
    );
    // A task of its own: a panic in it would not reach the shard's outer catch.
    let reader = glommio::spawn_local({
        let (failed, fatal) = (failed.clone(), panic_fatal);
        async move {
            let name = format!("shard-{shard}");
            if await_reporting_panics(&name, &fatal, reads).await.is_none() {
                failed.set(true);
            }
        }
    });
    let mut replay = Replay {
        shard,
        durable_index,
        entry_index: u64::MAX,
    };
    while let Ok(cmd) = queues.apply.recv_async().await {
        if failed.get() {
            return;
        }
        match cmd {
            ApplyCmd::Purge { rev } => {
                if let Err(e) = purge_in_steps(&store, rev, &failed).await {
                    return fail(e);
                }
                if failed.get() {
                    return;
                }
            }
            ApplyCmd::Close { reply } => {
                // The read task holds the store's other reference: it goes first.
                reader.cancel().await;
                match Rc::try_unwrap(store) {
                    Ok(store) => {
                        let _ = reply.send(store.into_inner().close());
                    }
                    // Cannot be: nothing else holds the store. The closer hears "stopped";
                    // the engine closes with the last reference.
                    Err(_) => tracing::error!(shard, "shard store still shared; not closed"),
                }
                return;
            }
            ApplyCmd::Batch(cmds) => {
                for cmd in cmds {
                    let done =
                        handle_apply(&mut store.borrow_mut(), &mut replay, &sizes[shard], cmd);
                    if let Err(e) = done {
                        return fail(e);
                    }
                    glommio::yield_if_needed().await;
                    if failed.get() {
                        return;
                    }
                }
            }
            cmd => {
                let done = handle_apply(&mut store.borrow_mut(), &mut replay, &sizes[shard], cmd);
                if let Err(e) = done {
                    return fail(e);
                }
                glommio::yield_if_needed().await;
            }
        }
    }
}

/// The shard's read task: serves the read queue until it closes or either task hits a storage
/// error (`failed`; this task's own goes to `fail`).
async fn serve_reads(
    store: Rc<RefCell<Store>>,
    sizes: Arc<[ShardSize]>,
    shard: usize,
    read_rx: flume::Receiver<ReadCmd>,
    failed: Rc<std::cell::Cell<bool>>,
    fail: impl Fn(StorageError),
) {
    while let Ok(cmd) = read_rx.recv_async().await {
        if failed.get() {
            break;
        }
        if let Err(e) = handle_read(&store.borrow(), &sizes[shard], cmd) {
            fail(e);
            break;
        }
        glommio::yield_if_needed().await;
    }
}

/// Removes history below `rev` in steps of [`PURGE_STEP`] changes, letting reads run in
/// between (purging a large history is long). Stops early, without error, once `failed` is
/// set by the read task.
///
/// Errors: the engine's.
async fn purge_in_steps(
    store: &RefCell<Store>,
    rev: i64,
    failed: &std::cell::Cell<bool>,
) -> Result<(), StorageError> {
    while !store.borrow_mut().purge_some(rev, PURGE_STEP)? {
        glommio::executor().yield_now().await;
        if failed.get() {
            break;
        }
    }
    Ok(())
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

/// Applies one command from the apply queue. Replies are best-effort: a dropped receiver means
/// the requester gave up. A storage error is returned (and the reply dropped unanswered).
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
            let prev = put(store, replay, &req, rev, sub)?;
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
            let _ = reply.send(delete_range(store, replay, &range, rev, sub)?);
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
            let _ = reply.send(revoke_lease(store, replay, lease, rev, sub)?);
        }
        ApplyCmd::Compact { rev } => store.compact(rev),
        ApplyCmd::Purge { rev } => store.purge(rev)?, // normally handled in steps by `serve`
        ApplyCmd::Entry { index } => replay.entry_index = index,
        ApplyCmd::Barrier { state, reply } => {
            barrier(store, replay, size, &state)?;
            // The watch feed's events of the batch, read now that the shard is awake anyway
            // (see `crate::apply::events`).
            let events = match state.events {
                Some(wanted) => Some(store.events(
                    &KeyRange::everything(),
                    wanted.from,
                    state.revision,
                    wanted.limit,
                    wanted.prev_kv,
                )?),
                None => None,
            };
            reply.passed(events);
        }
        // Normally taken apart by `serve`, which lets reads run between its commands.
        ApplyCmd::Batch(cmds) => {
            for cmd in cmds {
                handle_apply(store, replay, size, cmd)?;
            }
        }
        ApplyCmd::Recover { reply } => {
            let _ = reply.send(store.recover()?);
        }
        ApplyCmd::Checkpoint { dir, reply } => {
            let _ = reply.send(checkpoint(store, &dir));
        }
        ApplyCmd::Export { reply } => {
            let mut keys = Vec::new();
            store.export(&mut |k, h| keys.push(history_to_proto(k, h)))?;
            let _ = reply.send(keys);
        }
        ApplyCmd::Reset => reset(store, replay, size)?,
        ApplyCmd::Import {
            keys,
            compact_revision,
        } => import(store, keys, compact_revision),
        // Handled by `serve`, which owns the store and closes it; here the closer would only
        // hear "stopped".
        ApplyCmd::Close { reply } => drop(reply),
    }
    Ok(())
}

/// Writes a client's put at `rev`, or, while replaying an entry this shard already holds,
/// only reads back what that put replaced. Returns the previous key-value.
fn put(
    store: &mut Store,
    replay: &Replay,
    req: &PutRequest,
    rev: i64,
    sub: u32,
) -> Result<Option<KeyValue>, StorageError> {
    if replay.skipping() {
        return store.replayed_put(&req.key, rev);
    }
    let args = PutArgs {
        key: &req.key,
        value: &req.value,
        lease: req.lease,
        ignore_value: req.ignore_value,
        ignore_lease: req.ignore_lease,
    };
    store.put(args, rev, sub)
}

/// Deletes this shard's keys in `range` at `rev`, or, while replaying an entry this shard
/// already holds, only reads back what that delete removed. Returns the deleted key-values.
fn delete_range(
    store: &mut Store,
    replay: &Replay,
    range: &KeyRange,
    rev: i64,
    sub: u32,
) -> Result<Vec<KeyValue>, StorageError> {
    if replay.skipping() {
        store.replayed_delete(range, rev)
    } else {
        store.delete_range(range, rev, sub)
    }
}

/// Deletes this shard's keys attached to `lease` at `rev`, or, while replaying an entry this
/// shard already holds, only reads back what that revoke removed. Returns the deleted
/// key-values.
fn revoke_lease(
    store: &mut Store,
    replay: &Replay,
    lease: i64,
    rev: i64,
    sub: u32,
) -> Result<Vec<KeyValue>, StorageError> {
    if replay.skipping() {
        store.replayed_revoke(lease, rev)
    } else {
        store.revoke_lease(lease, rev, sub)
    }
}

/// Persists what was applied before the barrier together with `state`, unless the shard's
/// data is already ahead of it (replaying entries it held before a restart: the state on
/// disk, which describes that data, must not move back). Ends any replay and refreshes the
/// shard's size. The flush is timed into `etcd_disk_backend_commit_duration_seconds`.
fn barrier(
    store: &mut Store,
    replay: &mut Replay,
    size: &ShardSize,
    state: &BarrierState,
) -> Result<(), StorageError> {
    // Crash-test hook (test builds only): FAILPOINTS="shard-before-flush=return(N)" kills the
    // process just before shard N persists a barrier, after the other shards may have.
    #[cfg(feature = "failpoints")]
    if fail::eval("shard-before-flush", |arg| arg) == Some(Some(replay.shard.to_string())) {
        std::thread::sleep(std::time::Duration::from_millis(50));
        std::process::abort();
    }
    if state.applied_index > replay.durable_index {
        // etcd's backend batch commit: everything applied since the last barrier, with the
        // applied state, as one write batch.
        let started = std::time::Instant::now();
        let flushed = store.flush(&FlushState {
            applied_index: state.applied_index,
            applied_term: state.applied_term,
            revision: state.revision,
            compact_revision: state.compact_revision,
            lease_changes: &state.lease_changes,
        });
        crate::metrics::BACKEND_COMMIT_SECONDS.observe(started.elapsed().as_secs_f64());
        flushed?;
    }
    replay.entry_index = u64::MAX;
    size.set(store);
    Ok(())
}

/// Writes the shard's checkpoint into `dir`, creating the snapshot's checkpoint directory
/// (its parent, which holds one per shard) first: RocksDB creates the shard's own inside it,
/// and needs it to exist.
///
/// Errors: the directory that cannot be created, or the engine's checkpoint error.
fn checkpoint(store: &Store, dir: &std::path::Path) -> Result<(), StorageError> {
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(|error| StorageError::Io {
            context: format!("cannot create checkpoint directory {}", parent.display()),
            error,
        })?;
    }
    store.checkpoint(dir)
}

/// Empties the shard before a leader's snapshot is imported: its data, its stored applied
/// state, and what it remembered of entries made durable before a restart.
fn reset(store: &mut Store, replay: &mut Replay, size: &ShardSize) -> Result<(), StorageError> {
    store.reset()?;
    replay.durable_index = 0;
    replay.entry_index = u64::MAX;
    size.set(store);
    Ok(())
}

/// Loads key histories from a snapshot, with the snapshot's compaction revision.
fn import(store: &mut Store, keys: Vec<KeyHistory>, compact_revision: i64) {
    for kh in keys {
        let (key, history) = history_from_proto(kh);
        store.import(key, history);
    }
    store.finish_import();
    store.set_compact_revision(compact_revision);
}
