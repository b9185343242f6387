//! The apply dispatcher: walks committed Raft entries in log order, assigns revisions, and
//! drives the shards.
//!
//! ```text
//!  committed entries (log order)
//!        |
//!        v
//!  Dispatcher ── revision := revision + 1 per write request that changes something
//!        |   Put ................ always writes: revision known at once, sent, not awaited
//!        |   DeleteRange ........ asks the touched shards to delete at revision+1; consumed
//!        |                        only if some shard deleted a key
//!        |   Txn ................ compares (nested ones too) against the shards' state, then
//!        |                        the chosen branch's ops in order; one revision if any op wrote
//!        |   Compaction ......... checked against (compact revision, revision), then all shards
//!        |   Lease grant/checkpoint  the lease table; revoke deletes the attached keys, one
//!        |                        revision if any key was deleted
//!        v
//!  outbox: each shard's commands gathered, sent as one batch when the dispatcher waits
//!        v
//!  shard apply queues (flume, FIFO) ── Barrier on every shard ── publish AppliedState ── reply
//! ```
//!
//! **Why every replica computes the same revisions.** Whether a request writes depends only on
//! the request and on the state left by the entries before it. The dispatcher is the only
//! producer of every shard's apply queue and each queue is FIFO, so whatever the dispatcher asks
//! a shard is answered against exactly the writes of the earlier entries, on every replica.
//! Shards never choose revisions; key placement is a pure hash (`shard_for`).
//!
//! **Why a cross-shard txn is atomic.** Its writes all carry one revision R, and clients read at
//! an explicit revision taken from [`AppliedState`], which is published only after every shard
//! has passed the barrier that follows R. A reader therefore sees all of R or none of it. While
//! the dispatcher works on a txn it sends nothing else, so the txn is a barrier only on the
//! shards it touches; the others keep draining their queues.
//!
//! **Where etcd's rules live.** The dispatcher keeps ordering, revisions, barriers, publishing
//! and the waiters. What a request may do and what it writes are pure functions over small
//! views of the shards, unit-tested in memory: [`txn`] (txn paths, put checks), [`lease`]
//! (grant, revoke, checkpoint, attaching a lease), [`compaction`] (which revisions may be
//! compacted).

pub mod alarms;
pub mod compaction;
mod completions;
pub mod downgrade;
pub mod events;
pub mod lease;
pub mod outbox;
// Also the state the decoder fuzzing applies requests to (`crate::fuzzing`).
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod test_view;
pub mod txn;

use std::sync::Arc;

use tokio::sync::{oneshot, watch};

use crate::auth::SharedAuth;
use crate::error::EtcdError;
use crate::lease::LeaseTable;
use crate::mvcc::range::{merge, MergedRange};
use crate::mvcc::store::combine_compare;
use crate::mvcc::{KeyRange, KeyValue};
use crate::proto::etcdserverpb::{
    alarm_request::AlarmAction, AlarmMember, AlarmRequest, AlarmResponse, AlarmType,
    CompactionRequest, CompactionResponse, Compare, DeleteRangeResponse, LeaseCheckpointRequest,
    LeaseCheckpointResponse, LeaseGrantRequest, LeaseGrantResponse, LeaseRevokeRequest,
    LeaseRevokeResponse, PutRequest, PutResponse, RangeRequest, ResponseHeader, TxnRequest,
    TxnResponse,
};
use crate::proto::metastorepb::{
    proposal::Request as Proposed, KeyHistory, Proposal, StateSnapshot,
};
use crate::shard::{
    shard_for, ApplyCmd, BarrierAck, BarrierState, EventsWanted, ShardEvents, ShardSet,
};
use crate::state_machine::{
    AppliedState, ApplyMsg, ApplyResponse, ApplyResult, CommittedEntry, Membership, Pending,
    SnapshotImage, SnapshotTaken, StateMachine,
};
use alarms::{Guarded, SharedAlarms};
use completions::{Completions, Job};
use downgrade::SharedDowngrade;
use events::{AppliedEvents, EventHandoff};
use outbox::Outbox;

/// The replicated tables besides leases and alarms that the dispatcher writes as it applies
/// and the front end reads.
#[derive(Clone)]
pub struct ReplicatedTables {
    /// The auth store, and this member's tokens.
    pub auth: SharedAuth,
    /// The downgrade state.
    pub downgrade: SharedDowngrade,
    /// Where each applied batch's watch events go, while anyone watches (not replicated
    /// state: the watch feed's side of the dispatcher's output).
    pub events: Arc<EventHandoff>,
}

/// Where the dispatcher starts: the state machine at Raft index `index`, from a snapshot
/// (memory engine) or from what the shards' durable engines recovered (RocksDB).
#[derive(Clone, Debug, Default)]
pub struct StartState {
    /// Raft index applied.
    pub index: u64,
    /// Term of that entry.
    pub term: u64,
    /// Store revision at that index.
    pub revision: i64,
    /// Compaction revision at that index.
    pub compact_revision: i64,
    /// Granted leases at that index.
    pub leases: Vec<crate::proto::metastorepb::LeaseRecord>,
    /// Index of the newest snapshot (the Raft log before it is gone).
    pub snapshot_index: u64,
    /// The highest index any shard had made durable: entries up to it are announced to the
    /// shards ([`ApplyCmd::Entry`]) so those that hold them already skip them.
    pub replay_until: u64,
    /// Whether shards keep their data on disk (snapshots are then checkpoints).
    pub durable: bool,
    /// The membership table at the snapshot (conf changes after it arrive with their entries).
    pub membership: Arc<Membership>,
    /// A complete snapshot the shards do not hold yet (the memory engine's, or one a leader
    /// sent that the durable shards had not finished installing): the dispatcher installs it
    /// before applying anything, and publishes nothing until then.
    pub restore: Option<Arc<StateSnapshot>>,
    /// The alarm table at `alarm_index` (a snapshot's; empty without one).
    pub alarms: Vec<AlarmMember>,
    /// The auth store at `alarm_index` (a snapshot's; empty without one).
    pub auth: Option<crate::proto::metastorepb::AuthState>,
    /// The downgrade state at `alarm_index` (a snapshot's; none without one).
    pub downgrade: Option<crate::proto::metastorepb::DowngradeInfo>,
    /// The Raft index `alarms`, `auth` and `downgrade` reflect: the snapshot's. Alarm,
    /// auth and downgrade requests in later entries are applied again even where the shards
    /// already hold the entry, since only the log and snapshots record them.
    pub alarm_index: u64,
}

/// When and where to snapshot (`--snapshot-count`).
pub struct SnapshotPolicy {
    /// The snapshot directory, where durable shards put their checkpoints (see
    /// [`crate::state_machine::snapshot::checkpoint_dir`]).
    pub snap_dir: std::path::PathBuf,
    /// How much is applied between snapshots (`--snapshot-count`, etcd's "number of committed
    /// transactions"). With a durable engine, requests: an entry that carries a batch of
    /// requests counts each, as etcd, which gives every request its own entry, would. With the
    /// memory engine, whose snapshot is an image of the whole keyspace, entries (see
    /// [`Dispatcher::snapshot_due`]).
    pub count: u64,
    /// Where snapshots go: the Raft node, which saves them and releases the log.
    pub notify: flume::Sender<SnapshotTaken>,
}

/// The apply dispatcher's state. Everything here is part of the replicated state machine and
/// goes into snapshots.
pub struct Dispatcher {
    shards: ShardSet,
    /// Every command for the shards goes through it, so that each shard gets a batch's
    /// commands in one wake-up.
    outbox: Outbox,
    revision: i64,
    compact_revision: i64,
    applied_index: u64,
    applied_term: u64,
    last_snapshot_index: u64,
    /// Requests applied since the last snapshot (an entry without requests counts as one).
    applied_since_snapshot: u64,
    replay_until: u64,
    durable: bool,
    /// Compaction revision every shard has durably recorded and may purge history below.
    purge_pending: Option<i64>,
    /// Leases granted (`Some`) or revoked (`None`) since the last barrier; persisted with it.
    lease_changes: Vec<(i64, Option<crate::proto::metastorepb::LeaseRecord>)>,
    /// Granted leases (shared with the lease service and clock; see [`crate::lease`]).
    leases: LeaseTable,
    /// Grants below this TTL are raised to it, seconds.
    min_lease_ttl: i64,
    pending: Arc<Pending>,
    /// Where the applied state is published: by the batches' completions (see
    /// [`completions`]), and by the dispatcher once none is outstanding.
    applied_tx: Arc<watch::Sender<AppliedState>>,
    /// Each batch's publication and answers, run in batch order once its barrier passed.
    completions: Arc<Completions>,
    /// The ticket of the next batch's barrier.
    next_ticket: u64,
    snapshots: SnapshotPolicy,
    /// The membership table at `applied_index`.
    membership: Arc<Membership>,
    /// A snapshot to install before anything else (see [`StartState::restore`]).
    restore_first: Option<Arc<StateSnapshot>>,
    /// The replicated alarm table (shared with the front end, which only reads it).
    alarms: SharedAlarms,
    /// The Raft index the alarm table reflects (see [`StartState::alarm_index`]).
    alarm_index: u64,
    /// The replicated auth store (shared with the front end), and this member's tokens.
    auth: SharedAuth,
    /// The replicated downgrade state (shared with the front end, which only reads it).
    downgrade: SharedDowngrade,
    /// Where each batch's watch events go (see [`crate::apply::events`]).
    events: Arc<EventHandoff>,
    /// The revision through which events were last handed over (or skipped): the previous
    /// barrier's.
    events_through: i64,
    /// The thread collecting the last export the shards were asked for (see
    /// [`Dispatcher::export_keys`]), joined by the next one so that exports finish in order.
    exporting: Option<std::thread::JoinHandle<()>>,
}

/// A result still waiting for a shard's reply (a put's previous key-value).
enum Outcome {
    Done(ApplyResult),
    Put {
        rev: i64,
        prev: Option<oneshot::Receiver<Option<KeyValue>>>,
    },
}

fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision,
        ..Default::default()
    })
}

/// Waits for a shard's reply. Shards outlive the dispatcher (they stop only once it has
/// dropped their queues) unless one fails: its engine hit a [`crate::mvcc::engine::StorageError`],
/// it sent it up the fatal channel and stopped, and the member is stopping. Then the reply
/// never comes, and the dispatcher stops: this unwinds with [`ShardStopped`] to
/// [`Dispatcher::drain`], which returns false (no panic message: `resume_unwind` skips the
/// hook). The answered path costs nothing more.
fn recv_or_unwind<T>(rx: oneshot::Receiver<T>) -> T {
    match rx.blocking_recv() {
        Ok(reply) => reply,
        Err(_) => std::panic::resume_unwind(Box::new(ShardStopped)),
    }
}

/// Every shard's events of a batch through `revision` in one list, in (revision,
/// sub-revision, key) order; `None` unless all `shards` read all of theirs. The feed then
/// reads the batch itself: from a shard whose history was compacted past the batch's first
/// revision (which ends the watchers it cuts), or in pieces, from one that had more than
/// [`events::BARRIER_EVENTS`] events.
fn merge_events(
    parts: Vec<ShardEvents>,
    shards: usize,
    revision: i64,
) -> Option<Vec<crate::mvcc::store::EventRecord>> {
    if parts.len() != shards {
        return None;
    }
    let mut events = Vec::new();
    for part in parts {
        let part = part.ok()?;
        if part.through < revision {
            return None;
        }
        events.extend(part.events);
    }
    crate::mvcc::store::sort_events(&mut events);
    Some(events)
}

/// The unwind payload of [`recv_or_unwind`] when a shard stopped without answering.
struct ShardStopped;

impl Dispatcher {
    /// A dispatcher at `start` (or empty), publishing to `applied_tx`. Grants below
    /// `min_lease_ttl` seconds are raised to it. `alarms` receives the alarm table at `start`
    /// and every change applied to it; `tables.auth` and `tables.downgrade` likewise.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        shards: ShardSet,
        start: &StartState,
        pending: Arc<Pending>,
        applied_tx: watch::Sender<AppliedState>,
        snapshots: SnapshotPolicy,
        leases: LeaseTable,
        min_lease_ttl: i64,
        alarms: SharedAlarms,
        tables: ReplicatedTables,
    ) -> Self {
        let ReplicatedTables {
            auth,
            downgrade,
            events,
        } = tables;
        leases.restore(&start.leases);
        auth.restore(start.auth.as_ref());
        downgrade.restore(start.downgrade.as_ref());
        alarms.write(|t| *t = alarms::AlarmTable::from_members(&start.alarms));
        let outbox = Outbox::new(shards.iter().map(|s| s.apply.clone()).collect());
        let d = Dispatcher {
            shards,
            outbox,
            revision: start.revision.max(1),
            compact_revision: start.compact_revision,
            applied_index: start.index,
            applied_term: start.term,
            last_snapshot_index: start.snapshot_index,
            applied_since_snapshot: 0,
            replay_until: start.replay_until,
            durable: start.durable,
            purge_pending: (start.compact_revision > 0).then_some(start.compact_revision),
            lease_changes: Vec::new(),
            leases,
            min_lease_ttl,
            pending,
            applied_tx: Arc::new(applied_tx),
            completions: Arc::default(),
            next_ticket: 0,
            snapshots,
            membership: start.membership.clone(),
            restore_first: start.restore.clone(),
            alarms,
            alarm_index: start.alarm_index,
            auth,
            downgrade,
            events,
            events_through: start.revision.max(1),
            exporting: None,
        };
        if d.restore_first.is_none() {
            d.publish();
        }
        d
    }

    /// Applies what the Raft node has handed over so far without waiting (see
    /// [`crate::state_machine::drain`]): the dispatcher run on the Raft thread after each of
    /// its rounds. A snapshot [`StartState::restore`] named is installed first.
    ///
    /// Returns false once a shard stopped because its engine failed (the member is then
    /// stopping through the fatal channel); the dispatcher must not be called again.
    pub fn drain(&mut self, inbox: &flume::Receiver<ApplyMsg>) -> bool {
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if let Some(snap) = self.restore_first.take() {
                self.restore(&snap);
            }
            crate::state_machine::drain(self, inbox);
        }));
        match ran {
            Ok(()) => true,
            Err(payload) if payload.is::<ShardStopped>() => {
                tracing::warn!("a shard stopped (its engine failed): the apply dispatcher stops");
                false
            }
            Err(payload) => std::panic::resume_unwind(payload),
        }
    }

    /// Replaces the whole state machine with a complete snapshot: every shard is emptied and
    /// loaded with the keys it owns, and the revision, compaction, leases and membership are
    /// the snapshot's. Reads see none of it until every shard has it.
    fn restore(&mut self, snap: &StateSnapshot) {
        let n = self.shards.len();
        let mut per_shard: Vec<Vec<KeyHistory>> = vec![Vec::new(); n];
        for kh in &snap.keys {
            per_shard[shard_for(&kh.key, n)].push(kh.clone());
        }
        for (shard, keys) in per_shard.into_iter().enumerate() {
            self.outbox.send(shard, ApplyCmd::Reset);
            self.outbox.send(
                shard,
                ApplyCmd::Import {
                    keys,
                    compact_revision: snap.compact_revision,
                },
            );
        }
        self.revision = snap.revision.max(1);
        self.compact_revision = snap.compact_revision;
        self.applied_index = snap.index;
        self.applied_term = snap.term;
        self.last_snapshot_index = snap.index;
        self.applied_since_snapshot = 0;
        self.replay_until = 0;
        self.purge_pending = None;
        self.leases.restore(&snap.leases);
        // The shards' stored leases went with the reset: the barrier writes them all again.
        self.lease_changes = snap.leases.iter().map(|r| (r.id, Some(*r))).collect();
        // A snapshot written before membership was in the log has no members: the table the
        // Raft node derived at start-up (this member alone) stands.
        if !snap.members.is_empty() {
            self.membership = Arc::new(Membership::from_records(&snap.members, &snap.removed));
        }
        self.alarms
            .write(|t| *t = alarms::AlarmTable::from_members(&snap.alarms));
        self.auth.restore(snap.auth.as_ref());
        self.downgrade.restore(snap.downgrade.as_ref());
        self.alarm_index = snap.index;
        // The watch feed reads what it needs of the new state from the shards.
        self.barrier_and_wait(false, Box::new(|| ()));
        self.publish();
        tracing::info!(
            index = snap.index,
            revision = snap.revision,
            keys = snap.keys.len(),
            "installed snapshot"
        );
    }

    /// Asks every shard for every key's history and returns at once; `then` gets them, in key
    /// order, on the export thread once all shards have answered (never, if a shard stopped).
    /// Each shard answers from its queue in order, so the keys are exactly those applied so
    /// far, whatever the dispatcher applies meanwhile: an export of 1M keys (about 0.7 s)
    /// holds up neither the Raft thread's heartbeats nor the next batches' proposals. Exports
    /// finish in the order they were asked for.
    fn export_keys(&mut self, then: impl FnOnce(Vec<KeyHistory>) + Send + 'static) {
        let waits = self.request(0..self.shards.len(), |_, reply| ApplyCmd::Export { reply });
        self.outbox.flush();
        let previous = self.exporting.take();
        let export = move || {
            if let Some(previous) = previous {
                let _ = previous.join();
            }
            let mut keys = Vec::new();
            for rx in waits {
                match rx.blocking_recv() {
                    Ok(part) => keys.extend(part),
                    // A shard stopped: the member is stopping.
                    Err(_) => return,
                }
            }
            keys.sort_unstable_by(|a, b| a.key.cmp(&b.key));
            then(keys);
        };
        match std::thread::Builder::new()
            .name("export".into())
            .spawn(export)
        {
            Ok(thread) => self.exporting = Some(thread),
            // Nothing is built: an image is asked for again, a snapshot comes at the next count.
            Err(e) => tracing::error!(error = %e, "cannot start the export thread"),
        }
    }

    /// The state machine at the applied index; `keys` empty unless `complete`.
    fn state_snapshot(&self, keys: Vec<KeyHistory>, complete: bool) -> StateSnapshot {
        StateSnapshot {
            index: self.applied_index,
            term: self.applied_term,
            voters: self.membership.voters(),
            learners: self.membership.learners(),
            members: self.membership.list(),
            removed: self.membership.removed.iter().copied().collect(),
            revision: self.revision,
            compact_revision: self.compact_revision,
            leases: self.leases.records(),
            keys,
            complete,
            alarms: self.alarms.read(|t| t.get(AlarmType::None as i32)),
            auth: Some(self.auth.read(|a| a.to_state())),
            downgrade: self.downgrade.to_snapshot(),
        }
    }

    /// A complete image at the applied index, whatever the engine, sent to `reply` once the
    /// shards' keys are in (see [`Dispatcher::export_keys`]); dropped unsent if a shard stopped.
    fn image(&mut self, reply: flume::Sender<SnapshotImage>) {
        let snap = self.state_snapshot(Vec::new(), true);
        let membership = self.membership.clone();
        self.export_keys(move |keys| {
            let snap = StateSnapshot { keys, ..snap };
            tracing::info!(
                index = snap.index,
                keys = snap.keys.len(),
                "built a snapshot image for a follower"
            );
            let _ = reply.send(SnapshotImage {
                index: snap.index,
                term: snap.term,
                membership,
                data: prost::Message::encode_to_vec(&snap).into(),
            });
        });
    }

    fn apply_entries(&mut self, entries: Vec<CommittedEntry>) {
        if self.completions.failed() {
            // A shard stopped without passing a barrier: the member is stopping, and nothing
            // applied from here would ever be published.
            std::panic::resume_unwind(Box::new(ShardStopped));
        }
        let mut outcomes = Vec::new();
        // Requests of this batch applied so far (for the crash point between two of them).
        let mut requests = 0usize;
        for entry in entries {
            // Raft replays conf changes after the snapshot on every start; the table follows
            // them even where the shards already hold the entry.
            if let Some(cc) = &entry.conf_change {
                self.membership = cc.membership.clone();
                if cc.origin == self.pending.member_id() && entry.index > self.applied_index {
                    let result = cc
                        .result
                        .clone()
                        .map(|()| ApplyResponse::Members(cc.membership.list()));
                    outcomes.push((cc.proposal, Outcome::Done(result)));
                }
            }
            if entry.index <= self.applied_index {
                // Already in the shards; but the alarm table is only in the log and snapshots.
                if entry.index > self.alarm_index {
                    self.replay_alarms(&entry);
                    self.alarm_index = entry.index;
                }
                continue; // already in the snapshot we started from
            }
            self.alarm_index = self.alarm_index.max(entry.index);
            // Shards that made this entry durable before a restart skip its writes; the first
            // entry past them tells them to stop skipping.
            if self.replay_until > 0 && entry.index <= self.replay_until + 1 {
                for s in 0..self.shards.len() {
                    self.outbox.send(s, ApplyCmd::Entry { index: entry.index });
                }
            }
            let requests_before = requests;
            for decoded in proposals(&entry.data) {
                if requests > 0 {
                    crate::failpoints::crash_point(crate::failpoints::APPLY_MID_BATCH);
                }
                requests += 1;
                let (origin, id, outcome) = match decoded {
                    Decoded::Proposal(p) => {
                        let outcome = self.apply_proposal(p.request, p.auth.as_ref(), entry.index);
                        (p.origin, p.id, outcome)
                    }
                    Decoded::Undecodable { origin, id, error } => {
                        // Identical bytes on every replica: every member skips exactly this one
                        // proposal, and its client is told.
                        tracing::error!(index = entry.index, proposal = id, error = %error,
                            "undecodable proposal skipped");
                        let outcome = Outcome::Done(Err(EtcdError::UndecodableProposal));
                        (origin, id, outcome)
                    }
                };
                // Only the member that proposed it has a waiter (0: written before clusters, by
                // this member).
                if origin == 0 || origin == self.pending.member_id() {
                    outcomes.push((id, outcome));
                }
            }
            self.applied_since_snapshot += (requests - requests_before).max(1) as u64;
            self.applied_index = entry.index;
            self.applied_term = entry.term;
        }
        // Once every shard has passed the barrier: readers see the batch, then its clients
        // hear. A put's previous key-value came from its shard before the shard passed.
        let (applied_tx, applied, pending) = (
            self.applied_tx.clone(),
            self.applied_so_far(),
            self.pending.clone(),
        );
        let finish: Job = Box::new(move || {
            crate::failpoints::crash_point(crate::failpoints::APPLY_AFTER_BARRIER);
            applied_tx.send_replace(applied);
            let results = outcomes
                .into_iter()
                .map(|(id, outcome)| {
                    let result = match outcome {
                        Outcome::Done(r) => r,
                        Outcome::Put { rev, prev } => Ok(ApplyResponse::Put(PutResponse {
                            header: header(rev),
                            prev_kv: prev.and_then(|mut rx| rx.try_recv().ok().flatten()),
                        })),
                    };
                    (id, result)
                })
                .collect();
            pending.complete_all(results);
        });
        if let Some(rev) = self.purge_pending.take() {
            // Every shard must have the compaction on disk before history below it can go.
            self.barrier_and_wait(true, finish);
            for s in 0..self.shards.len() {
                self.outbox.send_now(s, ApplyCmd::Purge { rev });
            }
        } else {
            self.barrier(true, finish);
        }
        if self.snapshot_due() {
            self.snapshot();
        }
    }

    /// Whether `--snapshot-count` worth has been applied since the last snapshot. A durable
    /// engine counts requests, so that the log the Raft node keeps in memory until a snapshot
    /// releases it stays as long as etcd's: counting entries, each a batch of about 13 puts
    /// under load, a 1M-key load (RocksDB) held every entry and peaked at 599 MiB RSS, against
    /// 196 MiB counting requests (bench/README.md, issue 17). The memory engine counts
    /// entries: its snapshot serialises the whole keyspace, and counting requests took the
    /// same load's peak from 934 to 1,618 MiB (and its throughput down 11 %).
    fn snapshot_due(&self) -> bool {
        let count = self.snapshots.count.max(1);
        if self.durable {
            self.applied_since_snapshot >= count
        } else {
            self.applied_index >= self.last_snapshot_index + count
        }
    }

    /// Queues one command to each of `shards` (`command` gets the shard's index and where it
    /// replies) and returns the receivers of the replies, in the same order.
    fn request<T>(
        &self,
        shards: impl IntoIterator<Item = usize>,
        command: impl Fn(usize, oneshot::Sender<T>) -> ApplyCmd,
    ) -> Vec<oneshot::Receiver<T>> {
        shards
            .into_iter()
            .map(|i| {
                let (reply, rx) = oneshot::channel();
                self.outbox.send(i, command(i, reply));
                rx
            })
            .collect()
    }

    /// Sends one command to each of `shards` (all before waiting, so they work in parallel)
    /// and collects the replies in the same order.
    fn ask<T>(
        &self,
        shards: impl IntoIterator<Item = usize>,
        command: impl Fn(oneshot::Sender<T>) -> ApplyCmd,
    ) -> Vec<T> {
        let waits = self.request(shards, |_, reply| command(reply));
        waits.into_iter().map(|rx| self.outbox.wait(rx)).collect()
    }

    /// Every shard persists what was applied with the applied state; once all have, `then`
    /// runs, after the work of every batch before (see [`completions`]), on the thread of the
    /// shard that passed last. Returns at once: the dispatcher goes on to the next batch. With
    /// `feed_events`, while anyone watches, the shards also read the events of the revisions
    /// since the previous barrier, and they are handed, merged, to the watch feed before
    /// `then` runs.
    ///
    /// With the memory engine, only the shards sent anything since the previous barrier get
    /// it: the others have nothing to apply or to persist (the engine keeps nothing on disk),
    /// and no events, so waking them would only cost a wake-up per batch. A durable engine's
    /// shards all get it, so that each one's stored applied index keeps up and a restart
    /// replays no more than the last batch.
    fn barrier(&mut self, feed_events: bool, then: Job) {
        let touched = self.outbox.take_touched();
        let shards: Vec<usize> = if self.durable {
            (0..self.shards.len()).collect()
        } else {
            touched
        };
        let wanted = feed_events.then(|| self.events.wanted()).flatten();
        let from = self.events_through + 1;
        let revision = self.revision;
        let state = BarrierState {
            applied_index: self.applied_index,
            applied_term: self.applied_term,
            revision,
            compact_revision: self.compact_revision,
            lease_changes: Arc::new(std::mem::take(&mut self.lease_changes)),
            events: wanted.map(|prev_kv| EventsWanted {
                from,
                prev_kv,
                limit: events::BARRIER_EVENTS,
            }),
        };
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        if !self.completions.wait_for_room(ticket) {
            std::panic::resume_unwind(Box::new(ShardStopped));
        }
        let (completions, handoff, n) =
            (self.completions.clone(), self.events.clone(), shards.len());
        let done = Box::new(move |parts: Option<Vec<ShardEvents>>| {
            let job = parts.map(|parts| -> Job {
                Box::new(move || {
                    if let Some(prev_kv) = wanted {
                        if from <= revision {
                            if let Some(events) = merge_events(parts, n, revision) {
                                handoff.push(AppliedEvents {
                                    from,
                                    through: revision,
                                    prev_kv,
                                    events,
                                });
                            }
                        }
                    }
                    then();
                })
            });
            completions.finish(ticket, job);
        });
        let acks = BarrierAck::with_completion(shards.len(), done);
        for (&shard, reply) in shards.iter().zip(acks) {
            let state = state.clone();
            self.outbox.send(shard, ApplyCmd::Barrier { state, reply });
        }
        self.outbox.flush();
        self.events_through = self.revision;
    }

    /// [`Dispatcher::barrier`], returning once `then` has run. Unwinds with [`ShardStopped`]
    /// if a shard stopped without passing it (or a barrier before it failed).
    fn barrier_and_wait(&mut self, feed_events: bool, then: Job) {
        let (ran, wait) = oneshot::channel();
        self.barrier(
            feed_events,
            Box::new(move || {
                then();
                let _ = ran.send(());
            }),
        );
        recv_or_unwind(wait);
    }

    /// Publishes what the dispatcher has applied. Only with no batch's completion outstanding
    /// (they publish their own).
    fn publish(&self) {
        self.applied_tx.send_replace(self.applied_so_far());
    }

    /// What the dispatcher has applied so far: readable once the shards pass the next barrier.
    fn applied_so_far(&self) -> AppliedState {
        AppliedState {
            index: self.applied_index,
            revision: self.revision,
            compact_revision: self.compact_revision,
        }
    }

    /// Applies the alarm requests of an entry the shards already hold (its other requests are
    /// in the shards), so that the alarm table catches up with the log after a restart.
    fn replay_alarms(&mut self, entry: &CommittedEntry) {
        for decoded in proposals(&entry.data) {
            match decoded {
                Decoded::Proposal(Proposal {
                    request: Some(Proposed::Alarm(a)),
                    ..
                }) => {
                    let _ = self.apply_alarm(&a);
                }
                // So is the downgrade state.
                Decoded::Proposal(Proposal {
                    request: Some(Proposed::DowngradeInfoSet(d)),
                    ..
                }) => self.downgrade.apply(&d),
                // The auth store is only in the log and snapshots too. Authenticate is not
                // replayed: tokens do not survive a restart.
                Decoded::Proposal(Proposal {
                    request: Some(r),
                    auth,
                    ..
                }) if crate::auth::is_auth_request(&r)
                    && !matches!(r, Proposed::Authenticate(_)) =>
                {
                    let refused = self
                        .auth
                        .read(|a| a.refusal(auth.as_ref(), &r, |_| Vec::new()));
                    if refused.is_none() {
                        let _ = self.auth.apply(&r, entry.index);
                    }
                }
                _ => {}
            }
        }
    }

    /// The keys attached to `lease`, from every shard.
    fn lease_keys(&self, lease: i64) -> Vec<Vec<u8>> {
        self.ask(0..self.shards.len(), |reply| ApplyCmd::LeaseKeys {
            lease,
            reply,
        })
        .into_iter()
        .flatten()
        .collect()
    }

    /// An alarm request, as etcd's `applierV3backend.Alarm` applies it: GET lists the alarms
    /// of a type (NONE: all); ACTIVATE raises one for `member_id` (NONE is ignored) and
    /// answers it; DEACTIVATE clears one and answers it, or nothing if it was not raised.
    fn apply_alarm(&mut self, a: &AlarmRequest) -> ApplyResult {
        let action = AlarmAction::try_from(a.action).unwrap_or(AlarmAction::Get);
        let name = || {
            AlarmType::try_from(a.alarm)
                .map(|t| t.as_str_name())
                .unwrap_or("unknown")
        };
        let alarms = self.alarms.write(|t| match action {
            AlarmAction::Get => t.get(a.alarm),
            AlarmAction::Activate => {
                let newly = !t.get(a.alarm).iter().any(|m| m.member_id == a.member_id);
                let raised = t.activate(a.member_id, a.alarm);
                if raised.is_some() && newly {
                    tracing::warn!(member = %format!("{:x}", a.member_id), alarm = name(),
                        "alarm raised");
                }
                raised.into_iter().collect()
            }
            AlarmAction::Deactivate => {
                let cleared = t.deactivate(a.member_id, a.alarm);
                if cleared.is_some() {
                    tracing::info!(member = %format!("{:x}", a.member_id), alarm = name(),
                        "alarm disarmed");
                }
                cleared.into_iter().collect()
            }
        });
        Ok(ApplyResponse::Alarm(AlarmResponse {
            header: header(self.revision),
            alarms,
        }))
    }

    /// What the active alarms refuse (see [`alarms::AlarmTable::refusal`]).
    fn refused(&self, request: &Proposed) -> Option<EtcdError> {
        let guarded = match request {
            Proposed::Put(_) => Guarded::Put,
            Proposed::DeleteRange(_) => Guarded::DeleteRange,
            Proposed::Txn(t) => Guarded::Txn {
                writes: !txn::txn_read_only(t),
                puts: txn::txn_puts(t),
            },
            Proposed::Compaction(_) => Guarded::Compaction,
            Proposed::LeaseGrant(_) => Guarded::LeaseGrant,
            Proposed::LeaseRevoke(_) => Guarded::LeaseRevoke,
            _ => return None,
        };
        self.alarms.read(|t| t.refusal(guarded))
    }

    fn apply_proposal(
        &mut self,
        request: Option<Proposed>,
        auth: Option<&crate::proto::metastorepb::AuthHeader>,
        index: u64,
    ) -> Outcome {
        if let Some(r) = request.as_ref() {
            let refused = self
                .auth
                .read(|a| a.refusal(auth, r, |lease| self.lease_keys(lease)));
            if let Some(e) = refused {
                return Outcome::Done(Err(e));
            }
        }
        if let Some(e) = request.as_ref().and_then(|r| self.refused(r)) {
            return Outcome::Done(Err(e));
        }
        match request {
            Some(r) if crate::auth::is_auth_request(&r) => Outcome::Done(
                self.auth
                    .apply(&r, index)
                    .map(|applied| ApplyResponse::Auth {
                        applied,
                        revision: self.revision,
                    }),
            ),
            Some(Proposed::Alarm(a)) => Outcome::Done(self.apply_alarm(&a)),
            Some(Proposed::DowngradeInfoSet(d)) => {
                self.downgrade.apply(&d);
                Outcome::Done(Ok(ApplyResponse::Downgrade))
            }
            Some(Proposed::Put(p)) => self.apply_put(p),
            Some(Proposed::DeleteRange(d)) => {
                crate::metrics::TxnOps {
                    deletes: 1,
                    ..Default::default()
                }
                .record();
                let rev = self.revision + 1;
                let range = KeyRange::from_request(&d.key, &d.range_end);
                let prev_kvs = self.delete_range(&range, rev, 0);
                let deleted = prev_kvs.len() as i64;
                if deleted > 0 {
                    self.revision = rev;
                }
                Outcome::Done(Ok(ApplyResponse::DeleteRange(DeleteRangeResponse {
                    header: header(self.revision),
                    deleted,
                    prev_kvs: if d.prev_kv { prev_kvs } else { Vec::new() },
                })))
            }
            Some(Proposed::Txn(t)) => Outcome::Done(self.apply_txn(&t).map(ApplyResponse::Txn)),
            Some(Proposed::Compaction(c)) => Outcome::Done(self.apply_compaction(&c)),
            Some(Proposed::LeaseGrant(g)) => Outcome::Done(self.apply_lease_grant(&g)),
            Some(Proposed::LeaseRevoke(r)) => Outcome::Done(self.apply_lease_revoke(&r)),
            Some(Proposed::LeaseCheckpoint(c)) => Outcome::Done(self.apply_lease_checkpoint(&c)),
            Some(_) | None => Outcome::Done(Err(EtcdError::KeyNotFound)),
        }
    }

    fn apply_put(&mut self, p: PutRequest) -> Outcome {
        if let Err(e) = self.check_put(&p) {
            return Outcome::Done(Err(e));
        }
        crate::metrics::TxnOps {
            puts: 1,
            ..Default::default()
        }
        .record();
        let rev = self.revision + 1;
        self.revision = rev;
        let prev = self.put(p, rev, 0);
        Outcome::Put { rev, prev }
    }

    /// etcd `checkRequestPut`: ignore_value/ignore_lease need an existing key; a lease must
    /// exist.
    fn check_put(&self, p: &PutRequest) -> Result<(), EtcdError> {
        txn::check_put(&ShardsView(self), p)
    }

    fn get_latest(&self, key: &[u8]) -> Option<KeyValue> {
        let (reply, rx) = oneshot::channel();
        let shard = shard_for(key, self.shards.len());
        let get = ApplyCmd::Get {
            key: key.to_vec(),
            rev: self.revision,
            reply,
        };
        self.outbox.send(shard, get);
        self.outbox.wait(rx)
    }

    /// Sends a put; returns the receiver of its previous key-value when the client asked.
    fn put(
        &self,
        p: PutRequest,
        rev: i64,
        sub: u32,
    ) -> Option<oneshot::Receiver<Option<KeyValue>>> {
        let shard = shard_for(&p.key, self.shards.len());
        let (reply, rx) = if p.prev_kv {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let put = ApplyCmd::Put {
            req: p,
            rev,
            sub,
            reply,
        };
        self.outbox.send(shard, put);
        rx
    }

    /// Deletes `range` at `rev` on every shard it touches; returns the deleted key-values in
    /// key order.
    fn delete_range(&self, range: &KeyRange, rev: i64, sub: u32) -> Vec<KeyValue> {
        let touched = self.shards.shards_for(range);
        let parts = self.ask(touched, |reply| ApplyCmd::Delete {
            range: range.clone(),
            rev,
            sub,
            reply,
        });
        let mut deleted: Vec<KeyValue> = parts.into_iter().flatten().collect();
        deleted.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        deleted
    }

    /// Whether every compare holds at the current revision (etcd `applyCompares`): each is
    /// sent to the shards its key range touches, all at once, and their answers combined.
    fn compares_hold(&self, compares: &[Compare]) -> bool {
        let n = self.shards.len();
        // Per shard: the compares that name its keys, and where each one's answer goes.
        let mut per_shard: Vec<(Vec<usize>, Vec<_>)> = vec![(Vec::new(), Vec::new()); n];
        for (i, c) in compares.iter().enumerate() {
            for s in self
                .shards
                .shards_for(&KeyRange::from_request(&c.key, &c.range_end))
            {
                per_shard[s].0.push(i);
                per_shard[s].1.push(c.clone());
            }
        }
        let waits: Vec<_> = per_shard
            .into_iter()
            .enumerate()
            .filter(|(_, (idx, _))| !idx.is_empty())
            .map(|(s, (idx, cmps))| {
                let (reply, rx) = oneshot::channel();
                let rev = self.revision;
                self.outbox.send(s, ApplyCmd::Compare { cmps, rev, reply });
                (idx, rx)
            })
            .collect();
        let mut evals = vec![Vec::new(); compares.len()];
        for (idx, rx) in waits {
            for (i, e) in idx.into_iter().zip(self.outbox.wait(rx)) {
                evals[i].push(e);
            }
        }
        compares
            .iter()
            .zip(evals)
            .all(|(c, e)| combine_compare(c, e))
    }

    /// A compaction: etcd's rule ([`compaction::compact`]) marks every shard; the dispatcher
    /// records the compaction revision and orders the purge after the next barrier.
    fn apply_compaction(&mut self, c: &CompactionRequest) -> ApplyResult {
        compaction::compact(&ShardsView(self), c.revision)?;
        self.purge_pending = Some(c.revision);
        self.compact_revision = c.revision;
        // The reply goes out after the barrier, when every shard refuses reads below the
        // revision; the purge of the history itself is ordered right after that barrier and
        // runs ahead of anything queued later on each shard, so `physical` needs no extra wait.
        Ok(ApplyResponse::Compaction(CompactionResponse {
            header: header(self.revision),
        }))
    }

    /// A grant: etcd's rule ([`lease::grant`]); the record is persisted at the next barrier.
    fn apply_lease_grant(&mut self, g: &LeaseGrantRequest) -> ApplyResult {
        let record = lease::grant(&self.leases, self.min_lease_ttl, g)?;
        self.lease_changes.push((record.id, Some(record)));
        Ok(ApplyResponse::LeaseGrant(LeaseGrantResponse {
            header: header(self.revision),
            id: record.id,
            ttl: record.ttl,
            error: String::new(),
        }))
    }

    /// A revoke (client or expiry): etcd's rule ([`lease::revoke`]) deletes every attached key
    /// at one revision, a delete event each, on whichever shards hold them; the revision moves
    /// if any key was deleted.
    fn apply_lease_revoke(&mut self, r: &LeaseRevokeRequest) -> ApplyResult {
        let out = lease::revoke(&self.leases, &ShardsView(self), r.id)?;
        self.lease_changes.push((r.id, None));
        if out.wrote() {
            self.revision += 1;
        }
        Ok(ApplyResponse::LeaseRevoke(LeaseRevokeResponse {
            header: header(self.revision),
        }))
    }

    /// Checkpoints: etcd's rule ([`lease::checkpoint`]); the records are persisted at the next
    /// barrier.
    fn apply_lease_checkpoint(&mut self, c: &LeaseCheckpointRequest) -> ApplyResult {
        for record in lease::checkpoint(&self.leases, c) {
            self.lease_changes.push((record.id, Some(record)));
        }
        Ok(ApplyResponse::LeaseCheckpoint(LeaseCheckpointResponse {
            header: header(self.revision),
        }))
    }

    fn apply_txn(&mut self, txn: &TxnRequest) -> Result<TxnResponse, EtcdError> {
        let out = txn::apply(&ShardsView(self), txn)?;
        out.ops.record();
        if out.wrote {
            self.revision += 1;
        }
        Ok(out.response)
    }

    /// Takes a snapshot at the applied index and hands it to the Raft node. Durable engines
    /// snapshot as on-disk checkpoints (flushed SST files, one directory per shard); the
    /// memory engine as an image of every key's history.
    fn snapshot(&mut self) {
        let notify = self.snapshots.notify.clone();
        // The Raft node writes the file and releases the log; until then the WAL holds
        // everything, so nothing is lost if that fails.
        let taken = move |snap: StateSnapshot| {
            let _ = notify.send(SnapshotTaken {
                index: snap.index,
                term: snap.term,
                snapshot: Arc::new(snap),
            });
        };
        if self.durable {
            let dir = crate::state_machine::snapshot::checkpoint_dir(
                &self.snapshots.snap_dir,
                self.applied_term,
                self.applied_index,
            );
            let failed: Vec<String> = self
                .request(0..self.shards.len(), |i, reply| ApplyCmd::Checkpoint {
                    dir: dir.join(i.to_string()),
                    reply,
                })
                .into_iter()
                .filter_map(|rx| self.outbox.wait(rx).err().map(|e| e.to_string()))
                .collect();
            if !failed.is_empty() {
                // The WAL still holds everything; retry at the next batch.
                tracing::error!(errors = ?failed, "checkpoint failed");
                return;
            }
            taken(self.state_snapshot(Vec::new(), false));
        } else {
            let snap = self.state_snapshot(Vec::new(), true);
            self.export_keys(move |keys| taken(StateSnapshot { keys, ..snap }));
        }
        self.last_snapshot_index = self.applied_index;
        self.applied_since_snapshot = 0;
    }
}

impl StateMachine for Dispatcher {
    fn apply(&mut self, entries: Vec<CommittedEntry>) {
        self.apply_entries(entries);
    }

    fn build_snapshot(&mut self, reply: flume::Sender<SnapshotImage>) {
        self.image(reply);
    }

    fn install_snapshot(&mut self, snapshot: &StateSnapshot) {
        self.restore(snapshot);
    }

    fn drop_proposals(&mut self, ids: Vec<u64>, error: EtcdError) {
        for id in ids {
            self.pending.complete(id, Err(error.clone()));
        }
    }

    fn applied(&self) -> AppliedState {
        // What readers see: published after the shards' barrier, not the index mid-batch.
        *self.applied_tx.borrow()
    }
}

/// The dispatcher's shards as etcd's rules see them ([`txn::ShardView`], [`lease::LeaseView`],
/// [`compaction::CompactView`]): every call goes to the owning shards' apply queues and waits
/// for their answers, so it sees every earlier write.
struct ShardsView<'a>(&'a Dispatcher);

impl txn::ShardView for ShardsView<'_> {
    fn revision(&self) -> i64 {
        self.0.revision
    }

    fn compact_revision(&self) -> i64 {
        self.0.compact_revision
    }

    fn compares_hold(&self, compares: &[Compare]) -> bool {
        self.0.compares_hold(compares)
    }

    fn latest(&self, key: &[u8]) -> Option<KeyValue> {
        self.0.get_latest(key)
    }

    fn lease_granted(&self, id: i64) -> bool {
        self.0.leases.contains(id)
    }

    fn range(&self, r: &RangeRequest, rev: i64) -> MergedRange {
        let d = self.0;
        let req = Arc::new(r.clone());
        let touched = d
            .shards
            .shards_for(&KeyRange::from_request(&r.key, &r.range_end));
        let parts = d.ask(touched, |reply| ApplyCmd::Range {
            req: req.clone(),
            rev,
            reply,
        });
        // Revision bounds were checked before executing, so shards cannot fail here.
        merge(r, parts.into_iter().filter_map(Result::ok).collect())
    }

    fn put(&self, p: PutRequest, rev: i64, sub: u32) -> Option<KeyValue> {
        self.0
            .put(p, rev, sub)
            .and_then(|rx| self.0.outbox.wait(rx))
    }

    fn delete(&self, range: &KeyRange, rev: i64, sub: u32) -> Vec<KeyValue> {
        self.0.delete_range(range, rev, sub)
    }
}

impl lease::LeaseView for ShardsView<'_> {
    fn revoke_keys(&self, lease: i64, rev: i64, sub: u32) -> Vec<KeyValue> {
        let d = self.0;
        d.ask(0..d.shards.len(), |reply| ApplyCmd::RevokeLease {
            lease,
            rev,
            sub,
            reply,
        })
        .into_iter()
        .flatten()
        .collect()
    }
}

impl compaction::CompactView for ShardsView<'_> {
    fn compact(&self, rev: i64) {
        for s in 0..self.0.shards.len() {
            self.0.outbox.send(s, ApplyCmd::Compact { rev });
        }
    }
}

/// One proposal of a Raft entry, as [`proposals`] splits them.
#[derive(Debug)]
pub(crate) enum Decoded {
    Proposal(Proposal),
    /// A frame that does not decode as a `Proposal`; `origin` and `id` are read on their own
    /// (0 when even they cannot be), so its waiter can still be answered.
    Undecodable {
        origin: u64,
        id: u64,
        error: prost::DecodeError,
    },
}

/// The fields of a `metastorepb.Proposal` that tie it to its waiter; decoding only these skips
/// the request, however it is damaged.
#[derive(Clone, PartialEq, prost::Message)]
struct ProposalHeader {
    #[prost(uint64, tag = "1")]
    id: u64,
    #[prost(uint64, tag = "15")]
    origin: u64,
}

/// Splits a Raft entry's data (length-delimited `Proposal`s, see `metastore.proto`) into its
/// proposals and decodes each on its own, so that one that fails to decode affects no other.
/// Only a broken length prefix ends the entry early (the WAL's checksums make that a bug, not
/// damage): it is logged, and the rest of the entry is skipped on every member alike.
pub(crate) fn proposals(data: &[u8]) -> impl Iterator<Item = Decoded> + '_ {
    let mut rest = data;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let frame = match prost::decode_length_delimiter(&mut rest) {
            Ok(len) if len <= rest.len() => {
                let (frame, after) = rest.split_at(len);
                rest = after;
                frame
            }
            _ => {
                tracing::error!(
                    bytes = rest.len(),
                    "broken proposal framing in a log entry: the rest of it is skipped"
                );
                rest = &[];
                return None;
            }
        };
        Some(match <Proposal as prost::Message>::decode(frame) {
            Ok(p) => Decoded::Proposal(p),
            Err(error) => {
                let header = <ProposalHeader as prost::Message>::decode(frame).unwrap_or_default();
                Decoded::Undecodable {
                    origin: header.origin,
                    id: header.id,
                    error,
                }
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::etcdserverpb::{request_op::Request as Op, RequestOp};

    fn framed(p: &Proposal) -> Vec<u8> {
        prost::Message::encode_length_delimited_to_vec(p)
    }

    fn put(id: u64, key: &str) -> Proposal {
        Proposal {
            id,
            origin: 7,
            request: Some(Proposed::Put(PutRequest {
                key: key.into(),
                ..Default::default()
            })),
            auth: None,
        }
    }

    #[test]
    fn one_undecodable_proposal_leaves_the_others_in_its_entry() {
        // A proposal whose request fails to decode (a truncated PutRequest inside it), between
        // two good ones.
        let mut bad = prost::Message::encode_to_vec(&put(2, "bad"));
        // The put's key is encoded as `0a 03 "bad"`: claim 9 bytes of key instead.
        let at = bad
            .windows(5)
            .position(|w| w == b"\x0a\x03bad")
            .expect("the key's encoding")
            + 1;
        bad[at] = 9;
        let bad = {
            let mut b = Vec::new();
            prost::encode_length_delimiter(bad.len(), &mut b).unwrap();
            b.extend_from_slice(&bad);
            b
        };
        let mut data = framed(&put(1, "a"));
        data.extend_from_slice(&bad);
        data.extend_from_slice(&framed(&put(3, "c")));
        let got: Vec<Decoded> = proposals(&data).collect();
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(matches!(&got[0], Decoded::Proposal(p) if p.id == 1));
        assert!(
            matches!(
                &got[1],
                Decoded::Undecodable {
                    origin: 7,
                    id: 2,
                    ..
                }
            ),
            "{:?}",
            got[1]
        );
        assert!(matches!(&got[2], Decoded::Proposal(p) if p.id == 3));
    }

    #[test]
    fn a_batch_is_handed_to_the_watch_feed_only_whole() {
        use crate::mvcc::store::{EventBatch, EventRecord, HistoryCompacted};
        let part = |revs: &[i64], through: i64| -> ShardEvents {
            let events = revs
                .iter()
                .map(|&rev| EventRecord {
                    rev,
                    sub: 0,
                    event: Default::default(),
                })
                .collect();
            Ok(EventBatch { events, through })
        };
        let merged = merge_events(vec![part(&[5, 7], 7), part(&[6], 7)], 2, 7).unwrap();
        let revs: Vec<i64> = merged.iter().map(|e| e.rev).collect();
        assert_eq!(revs, vec![5, 6, 7]);
        assert!(
            merge_events(vec![part(&[5], 7)], 2, 7).is_none(),
            "a shard missing"
        );
        assert!(
            merge_events(vec![part(&[5], 7), part(&[6], 6)], 2, 7).is_none(),
            "a shard cut at its event limit"
        );
        let compacted = Err(HistoryCompacted {
            compact_revision: 6,
        });
        assert!(merge_events(vec![part(&[5], 7), compacted], 2, 7).is_none());
    }

    #[test]
    fn a_stopped_shard_unwinds_the_dispatcher_without_a_panic() {
        let (tx, rx) = oneshot::channel::<u32>();
        tx.send(5).unwrap();
        assert_eq!(recv_or_unwind(rx), 5);
        let (tx, rx) = oneshot::channel::<u32>();
        drop(tx);
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| recv_or_unwind(rx)));
        assert!(ran.unwrap_err().is::<ShardStopped>());
    }

    #[test]
    fn a_txn_nested_as_deep_as_allowed_decodes_inside_a_proposal() {
        let mut t = TxnRequest {
            success: vec![RequestOp {
                request: Some(Op::RequestPut(PutRequest {
                    key: b"k".to_vec(),
                    ..Default::default()
                })),
            }],
            ..Default::default()
        };
        for _ in 1..crate::server::validate::MAX_TXN_DEPTH {
            t = TxnRequest {
                success: vec![RequestOp {
                    request: Some(Op::RequestTxn(t)),
                }],
                ..Default::default()
            };
        }
        let p = Proposal {
            id: 9,
            origin: 1,
            request: Some(Proposed::Txn(t)),
            auth: None,
        };
        let got: Vec<Decoded> = proposals(&framed(&p)).collect();
        assert!(matches!(&got[..], [Decoded::Proposal(p)] if p.id == 9));
    }
}
