//! What the dispatcher and the front end ask a shard: the commands on its apply queue (in log
//! order) and its read queue, and the snapshot form of a key's history.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::error::EtcdError;
use crate::mvcc::engine::RecoveredState;
use crate::mvcc::engine::StorageError;
use crate::mvcc::engine::{Live, VersionRecord};
use crate::mvcc::range::PartialRange;
use crate::mvcc::store::{CompareEval, EventBatch, HistoryCompacted};
use crate::mvcc::{KeyRange, KeyValue};
use crate::proto::etcdserverpb::{Compare, PutRequest, RangeRequest};
use crate::proto::metastorepb::LeaseRecord;
use crate::proto::metastorepb::{KeyHistory, KeyVersion};

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
        /// Passed once the flush is done (one answer for every shard the barrier went to),
        /// with the batch's events when [`BarrierState::events`] asks for them.
        reply: BarrierAck,
    },
    /// Several commands in queue order: what the dispatcher had for this shard when it next
    /// had to wait, so that a batch costs the shard one wake-up, not one per command (see
    /// [`crate::apply::outbox`]). Never holds [`ApplyCmd::Purge`], [`ApplyCmd::Close`] or
    /// another batch.
    Batch(Vec<ApplyCmd>),
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
    /// The member stops ([`super::Shards::close`]): the shard syncs its engine's files
    /// ([`crate::mvcc::engine::Engine::sync_to_disk`]), closes the engine, answers, and leaves
    /// its loop. Whatever comes on its queues afterwards is dropped unanswered ("server
    /// stopped").
    Close {
        /// Answered once the engine is closed, with the sync's outcome.
        reply: oneshot::Sender<Result<(), StorageError>>,
    },
}

/// A barrier's answer, shared by every shard the barrier went to: what the barrier is for
/// runs once, when the last of them has passed it, on that shard's thread, instead of a waiter
/// waking once per shard. Each shard gets one part ([`BarrierAck::with_completion`], or
/// [`BarrierAck::new`] for a waiter) and calls [`BarrierAck::passed`] after its flush. A part
/// dropped without passing (the shard stopped: its engine failed, and what was queued for it
/// is dropped) fails the whole barrier: the completion is told so, and a waiter's receiver
/// reports the sender dropped.
pub struct BarrierAck {
    shared: Arc<AckShared>,
    passed: bool,
}

/// One shard's events of a batch, as [`crate::mvcc::Store::events`] read them.
pub type ShardEvents = Result<EventBatch, HistoryCompacted>;

/// What a barrier's parts share; dropped with the last part, which answers the waiter.
struct AckShared {
    /// Set by a part dropped without passing.
    failed: AtomicBool,
    /// The events the shards that passed read, in the order they passed.
    events: Mutex<Vec<ShardEvents>>,
    /// Told once the last part is gone: the events if every part passed, `None` if any did
    /// not. Runs on the thread of the shard that passed last (or of whoever dropped the last
    /// part).
    ///
    /// (In a mutex only so that the parts may be shared between threads: it is taken once,
    /// by the last part's drop.)
    done: Mutex<Option<BarrierDone>>,
}

/// What a barrier does once every shard has passed it (see [`BarrierAck::with_completion`]).
pub type BarrierDone = Box<dyn FnOnce(Option<Vec<ShardEvents>>) + Send>;

impl BarrierAck {
    /// One part for each of `shards` shards, and the receiver that hears the events they
    /// read once every part has passed, or an error once any part is dropped without passing
    /// and the rest are gone.
    pub fn new(shards: usize) -> (Vec<BarrierAck>, oneshot::Receiver<Vec<ShardEvents>>) {
        let (tx, rx) = oneshot::channel();
        let done: BarrierDone = Box::new(move |events| {
            // Unsent on failure: the waiter hears that a shard stopped.
            if let Some(events) = events {
                let _ = tx.send(events);
            }
        });
        (BarrierAck::with_completion(shards, done), rx)
    }

    /// One part for each of `shards` shards; `done` runs once every part is gone, with the
    /// events the shards read if every part passed, or `None` if any was dropped without
    /// passing. With no shards, it runs at once.
    pub fn with_completion(shards: usize, done: BarrierDone) -> Vec<BarrierAck> {
        let shared = Arc::new(AckShared {
            failed: AtomicBool::new(false),
            events: Mutex::new(Vec::with_capacity(shards)),
            done: Mutex::new(Some(done)),
        });
        (0..shards)
            .map(|_| BarrierAck {
                shared: shared.clone(),
                passed: false,
            })
            .collect()
    }

    /// This shard has passed the barrier (its flush is done), with its events of the batch
    /// when it was asked for them.
    pub fn passed(mut self, events: Option<ShardEvents>) {
        if let Some(events) = events {
            self.shared.events.lock().unwrap().push(events);
        }
        self.passed = true;
    }
}

impl Drop for BarrierAck {
    fn drop(&mut self) {
        if !self.passed {
            // Seen by the last part's drop of `AckShared`: the `Arc`'s count is released
            // before, and acquired by, that drop.
            self.shared.failed.store(true, Ordering::Relaxed);
        }
    }
}

impl Drop for AckShared {
    fn drop(&mut self) {
        let done = self
            .done
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(done) = done {
            let passed = !*self.failed.get_mut();
            done(passed.then(|| std::mem::take(self.events.get_mut().unwrap())));
        }
    }
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
    /// Read the events of the revisions from here through `revision`, for the watch feed
    /// (see [`crate::apply::events`]); `None` while nobody watches.
    pub events: Option<EventsWanted>,
}

/// Which events a barrier asks each shard to read: the whole keyspace's, from revision
/// `from` through the barrier's revision.
#[derive(Clone, Copy, Debug)]
pub struct EventsWanted {
    /// First revision (the previous barrier's revision + 1).
    pub from: i64,
    /// Whether each event carries its `prev_kv`.
    pub prev_kv: bool,
    /// Events to read at most (cut only between revisions; see
    /// [`crate::mvcc::Store::events`]).
    pub limit: usize,
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
        /// This shard's events, or its compaction revision when `from` is below it.
        reply: oneshot::Sender<Result<EventBatch, HistoryCompacted>>,
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
    fn a_barrier_is_answered_once_every_shard_passed_it() {
        let (parts, mut rx) = BarrierAck::new(3);
        let mut parts = parts.into_iter();
        let events = |through| {
            Ok(EventBatch {
                events: Vec::new(),
                through,
            })
        };
        parts.next().unwrap().passed(Some(events(4)));
        parts.next().unwrap().passed(Some(events(5)));
        assert!(rx.try_recv().is_err(), "one shard has not passed yet");
        // From another thread, as a shard's.
        let last = parts.next().unwrap();
        std::thread::spawn(move || last.passed(Some(events(6))))
            .join()
            .unwrap();
        let got: Vec<i64> = rx
            .blocking_recv()
            .unwrap()
            .into_iter()
            .map(|e| e.unwrap().through)
            .collect();
        assert_eq!(got, vec![4, 5, 6], "every shard's events");
    }

    #[test]
    fn a_shard_that_stopped_fails_the_barrier_whoever_answers_last() {
        for stopped_first in [true, false] {
            let (mut parts, rx) = BarrierAck::new(2);
            let (passing, stopped) = (parts.pop().unwrap(), parts.pop().unwrap());
            if stopped_first {
                drop(stopped);
                passing.passed(None);
            } else {
                passing.passed(None);
                drop(stopped);
            }
            assert!(
                rx.blocking_recv().is_err(),
                "stopped first: {stopped_first}"
            );
        }
    }
}
