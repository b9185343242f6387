//! The Raft node: the batching proposer, raft-rs's `RawNode`, and the WAL.
//!
//! One thread owns the `RawNode`. Its loop:
//!
//! ```text
//!  wait for a message or the next tick
//!    Propose  -> appended to the current batch (length-delimited Proposals)
//!    ReadIndex-> collected; one raft ReadIndex for all of them
//!    Step     -> a peer's Raft message, from the transport
//!  propose the batch as one entry (never waits for more: a batch is whatever queued up while
//!  the previous fsync ran, so a lone client pays no added latency). On a follower raft-rs
//!  forwards it to the leader (MsgPropose).
//!  tick every --heartbeat-interval
//!  handle Ready, in raft-rs's documented order:
//!    send messages (leader: before its own fsync, Raft thesis 10.2.1) -> a leader's snapshot:
//!    saved to disk, the log reset to it, the dispatcher told to install it
//!    -> hand committed entries to the dispatcher (conf changes applied here, in log order)
//!    -> append entries + hard state to the WAL, one fsync -> send persisted messages
//!    -> advance -> hand newly committed entries to the dispatcher -> advance_apply
//! ```
//!
//! A single member still runs all of this: it is a one-voter Raft group that elects itself.
//!
//! **Membership lives in the log.** A new cluster's first boot writes one conf change entry
//! per `--initial-cluster` member (term 1, identical bytes on every member, as etcd does), so
//! every replica, and every member that joins later with an empty log, derives Raft's
//! configuration and the [`Membership`] table from snapshot plus log alone.
//!
//! **Snapshots for followers.** When a follower needs entries the log no longer holds,
//! raft-rs asks [`RaftStorage`] for a snapshot; the dispatcher builds a complete image at its
//! applied index (any engine), the transport streams it in chunks (`Peer/Snapshot`), and the
//! follower saves it, resets its log to it and has its dispatcher replace the state machine
//! with it (Raft paper section 7).

mod logger;
mod storage;
pub mod transport;
pub mod wal;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message as _;
use protobuf::Message as _;
use raft::prelude::{
    ConfChange, ConfChangeV2, ConfState, Entry, EntryType, HardState, Message, MessageType,
    Snapshot,
};
use raft::{RawNode, ReadOnlyOption, SnapshotStatus, StateRole};
use tokio::sync::{oneshot, watch};

use crate::error::EtcdError;
use crate::proto::metastorepb::{
    membership_change::Kind, MemberRecord, MembershipChange, StateSnapshot,
};
use crate::state_machine::membership::{self, Membership};
use crate::state_machine::snapshot::SnapshotError;
use crate::state_machine::snapshot::{self, BrokenSnapshot, Snapshotter};
use crate::state_machine::{
    ApplyMsg, CommittedEntry, ConfChangeApplied, SnapshotImage, SnapshotTaken,
};
use storage::RaftStorage;
use transport::PeerTransport;
use wal::{Recovered, Wal, WalError};

/// Upper bound on one proposal batch (one Raft entry), bytes.
pub const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// The most entry data the in-memory Raft log keeps behind the applied index, bytes; past it
/// the log is compacted to half as much (see `RaftNode::bound_log`). Those 8 MiB still reach
/// back some 28,000 puts of 300 bytes, more than five times etcd's 5,000 catch-up entries of
/// one request each, for a follower that lags.
pub const LOG_HIGH_BYTES: u64 = 16 * 1024 * 1024;
/// A follower's ReadIndex that got no answer is sent again after this long (etcd's
/// `readIndexRetryTime`): the leader drops it while it has not committed in its term.
const READ_RETRY: Duration = Duration::from_millis(500);

/// What stops the Raft node thread ([`crate::consensus::RaftNode::run`]); the member stops
/// with it (see [`crate::fatal::FatalError`]).
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The Raft log cannot be persisted: a WAL write or fsync failed ([`WalError::Io`]) or a
    /// record is damaged ([`WalError::Corrupt`], [`WalError::Gap`]). Nothing can be
    /// acknowledged without the log.
    #[error("cannot persist the Raft log: {0}")]
    RaftLog(WalError),
    /// A snapshot the leader sent does not decode (the peer service checked it already). Raft
    /// has moved its log past it; going on would diverge.
    #[error("the leader's snapshot at index {index} does not decode")]
    SnapshotUndecodable {
        /// The snapshot's Raft index.
        index: u64,
    },
    /// The leader's snapshot could not be saved before the log was reset to it.
    #[error("cannot save the leader's snapshot: {0}")]
    SnapshotSave(SnapshotError),
}

impl From<WalError> for NodeError {
    fn from(e: WalError) -> NodeError {
        NodeError::RaftLog(e)
    }
}

/// Messages to the Raft node thread.
pub enum NodeMsg {
    /// Append a client write to the next batch.
    Propose {
        /// Proposal ID (see [`crate::state_machine::Pending`]).
        id: u64,
        /// The encoded `metastorepb.Proposal`.
        data: Vec<u8>,
    },
    /// Ask for a ReadIndex (Raft paper section 6.4): replies with the commit index a
    /// linearizable read must wait to see applied.
    ReadIndex(oneshot::Sender<Result<u64, EtcdError>>),
    /// Propose a membership change; the result reaches proposal `id`'s waiter once the
    /// change is applied (or rejected) in log order.
    ChangeMembership {
        /// Proposal ID.
        id: u64,
        /// The change (its `origin` and `proposal` are filled in by the caller).
        change: MembershipChange,
    },
    /// A Raft message from a peer.
    Step(Message),
    /// The transport could not deliver to this member.
    Unreachable(u64),
    /// A peer refused our traffic because this member was removed from the cluster.
    RemovedByPeer,
    /// Hand leadership to this member (MoveLeader; Raft thesis section 3.10).
    TransferLeader(u64),
    /// Replication progress and contact of every member as the leader sees it; empty on a
    /// follower.
    Progress(oneshot::Sender<Vec<PeerProgress>>),
    /// Build a complete image of the state machine between two batches of entries (see
    /// [`RaftHandle::state_image`]): handed to the state machine in log order.
    StateImage(flume::Sender<SnapshotImage>),
    /// Advance the election clock by this many ticks at once (etcd's `advanceTicks`, for
    /// `--initial-election-tick-advance`; see [`initial_tick_advance`]).
    AdvanceTicks(usize),
    /// Stop the Raft thread once the loop round under way is done: whatever Raft handed over
    /// in that round (its `Ready`) is written to the WAL and sent on first, so the thread
    /// never stops in the middle of a WAL write. The sender is dropped once the thread has
    /// left its loop (what it handed over applied, the WAL closed); proposals
    /// still queued behind this message are not processed (their callers see "server
    /// stopped"). Sent by the member's graceful stop (etcd `EtcdServer.Stop`/`HardStop`).
    Stop(oneshot::Sender<()>),
    /// A snapshot the state machine took has been saved ([`RaftNode`]'s snapshot thread):
    /// the log before it can go.
    SnapshotSaved {
        /// Raft index it covers.
        index: u64,
    },
    /// How sending a snapshot to member `to` ended (raft-rs `report_snapshot`).
    SnapshotSent {
        /// The follower.
        to: u64,
        /// Whether the follower took it in.
        ok: bool,
    },
}

/// One member as the leader sees it (raft-rs `Progress`, plus when it last heard from it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerProgress {
    /// Member ID.
    pub id: u64,
    /// Highest log index known to be replicated on the member.
    pub matched: u64,
    /// How long the leader has heard from it without a gap longer than an election timeout
    /// (`None`: not heard from within the last one); `Duration::MAX` for the leader itself.
    pub connected_for: Option<Duration>,
}

/// When this member first and last heard from a peer, without a gap longer than an election
/// timeout in between.
#[derive(Clone, Copy)]
struct Contact {
    since: Instant,
    last: Instant,
}

/// Raft progress, readable from any thread.
#[derive(Debug, Default)]
pub struct NodeStatus {
    /// Current term.
    pub term: AtomicU64,
    /// Known leader's member ID (0 = none).
    pub leader: AtomicU64,
    /// Commit index.
    pub commit: AtomicU64,
    /// Last log index.
    pub last_index: AtomicU64,
    /// Index Raft has handed to the state machine.
    pub applied: AtomicU64,
    /// Whether this member is a learner.
    pub is_learner: AtomicBool,
    /// Whether this member has been removed from the cluster (it must stop).
    pub removed: AtomicBool,
    /// Term, leader and removal as they change, for waiting on them (see
    /// [`NodeStatus::subscribe`]).
    changes: watch::Sender<Leadership>,
    /// Set once the Raft node has handed the state machine every entry it knew to be
    /// committed when it started (see [`NodeStatus::replayed`]).
    replayed: watch::Sender<bool>,
}

/// Who leads in which term, as one member sees it, and whether it has been removed: published
/// together, so a reader never pairs one term's leader with another term.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Leadership {
    /// Current term.
    pub term: u64,
    /// The known leader's member ID in `term` (0: none).
    pub leader: u64,
    /// Whether this member has been removed from the cluster.
    pub removed: bool,
}

impl NodeStatus {
    /// Follows [`Leadership`] as the Raft thread publishes it (on every change of term or
    /// leader, and on removal).
    pub fn subscribe(&self) -> watch::Receiver<Leadership> {
        self.changes.subscribe()
    }

    /// Becomes true once the Raft node has handed over, in log order, every entry it knew to be
    /// committed when it started (its commit index at start-up, bootstrap and
    /// `--force-new-cluster` entries included): the membership table is then the one this
    /// member stopped with.
    pub fn replayed(&self) -> watch::Receiver<bool> {
        self.replayed.subscribe()
    }

    /// Publishes `now` to subscribers when it changed.
    fn publish_changes(&self, now: Leadership) {
        self.changes.send_if_modified(|seen| {
            let changed = *seen != now;
            *seen = now;
            changed
        });
    }

    /// Marks this member removed, for the atomics' readers and subscribers.
    fn set_removed(&self) {
        self.removed.store(true, Ordering::Relaxed);
        let now = Leadership {
            removed: true,
            ..*self.changes.borrow()
        };
        self.publish_changes(now);
    }
}

/// How to reach the Raft node thread.
#[derive(Clone)]
pub struct RaftHandle {
    /// The node's inbox.
    pub tx: flume::Sender<NodeMsg>,
    /// Its progress.
    pub status: Arc<NodeStatus>,
    /// The membership table as of the last conf change handed to the state machine.
    pub membership: watch::Receiver<Arc<Membership>>,
}

impl RaftHandle {
    /// A complete image of the state machine at one applied index (every key's retained
    /// history, leases, membership, alarms and the auth store), built by the apply dispatcher
    /// between two batches of entries, as for a follower's snapshot (Raft paper section 7).
    /// Used by `Maintenance.Snapshot`.
    ///
    /// Errors: [`EtcdError::Stopped`] when the member is shutting down.
    pub async fn state_image(&self) -> Result<SnapshotImage, EtcdError> {
        let (reply, rx) = flume::bounded(1);
        self.tx
            .send_async(NodeMsg::StateImage(reply))
            .await
            .map_err(|_| EtcdError::Stopped)?;
        rx.recv_async().await.map_err(|_| EtcdError::Stopped)
    }
}

/// Raft settings derived from the member configuration.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This member's ID (Raft node ID).
    pub id: u64,
    /// This member's record: used only for data written before membership was in the log.
    pub this_member: MemberRecord,
    /// The members a new cluster bootstraps with (`--initial-cluster`, sorted by ID); empty
    /// when joining an existing cluster. Written to the log only on a first boot.
    pub bootstrap: Vec<MemberRecord>,
    /// Members to talk to before the log has told this member who is in the cluster: a
    /// joiner's answers must reach the leader that is sending it the log.
    pub seed_peers: Vec<MemberRecord>,
    /// Tick length, ms (`--heartbeat-interval`).
    pub heartbeat_ms: u64,
    /// Election timeout, ms (`--election-timeout`); a multiple of the tick.
    pub election_ms: u64,
    /// Serve ReadIndex from the leader's lease instead of a heartbeat round (raft-rs
    /// `ReadOnlyOption::LeaseBased`): assumes clocks on all members run at the same rate.
    pub lease_reads: bool,
    /// Entries kept in memory behind a snapshot so slow followers can catch up from the log
    /// (etcd's `SnapshotCatchUpEntries`).
    pub catch_up_entries: u64,
    /// How long a ReadIndex may wait before it fails with "request timed out".
    pub request_timeout: Duration,
    /// Where snapshots live (`<data-dir>/member/snap`): a leader's snapshot is saved there
    /// before the log is reset to it.
    pub snap_dir: PathBuf,
    /// Snapshot files kept (`--max-snapshots`; 0 = unlimited).
    pub max_snapshots: usize,
    /// Run Raft's pre-vote phase (`--pre-vote`).
    pub pre_vote: bool,
    /// Most learners the membership table accepts (`--experimental-max-learners`).
    pub max_learners: usize,
    /// `--force-new-cluster`: on a data dir with a log, restart as the only member of the
    /// cluster (see [`force_new_cluster`]).
    pub force_new_cluster: bool,
}

/// One ReadIndex round in flight: every read that arrived while it was being sent.
struct ReadRound {
    waiters: Vec<oneshot::Sender<Result<u64, EtcdError>>>,
    leader: u64,
    sent_at: Instant,
    deadline: Instant,
}

/// The Raft node thread's state.
pub struct RaftNode {
    id: u64,
    raw: RawNode<RaftStorage>,
    wal: Wal,
    transport: Box<dyn PeerTransport>,
    inbox: flume::Receiver<NodeMsg>,
    snapshots: flume::Receiver<SnapshotTaken>,
    committed: flume::Sender<ApplyMsg>,
    snapshotter: snapshot::Snapshotter,
    /// The thread writing the state machine's latest snapshot, if any (see
    /// [`RaftNode::save_snapshot`]).
    saving: Option<std::thread::JoinHandle<()>>,
    /// This node's own inbox, for the snapshot thread's report; weak, so that the node still
    /// stops when every other sender is gone.
    own_inbox: flume::WeakSender<NodeMsg>,
    status: Arc<NodeStatus>,
    /// The commit index at start-up, until the entries up to it have been handed over (see
    /// [`NodeStatus::replayed`]).
    replay_target: Option<u64>,
    membership: Arc<Membership>,
    membership_tx: watch::Sender<Arc<Membership>>,
    tick: Duration,
    catch_up_entries: u64,
    request_timeout: Duration,
    batch: Vec<u8>,
    batch_ids: Vec<u64>,
    read_waiters: Vec<oneshot::Sender<Result<u64, EtcdError>>>,
    reads_in_flight: HashMap<u64, ReadRound>,
    /// Peers heard from, for the health checks of membership changes.
    contact: HashMap<u64, Contact>,
    election: Duration,
    next_read_ctx: u64,
    max_learners: usize,
    /// Set by [`NodeMsg::Stop`]: the loop ends after the current round.
    stop: Option<oneshot::Sender<()>>,
    /// The state machine, run on this thread after each round (see [`RaftNode::apply_here`]).
    applier: Option<Box<dyn FnMut() -> bool + Send>>,
}

/// A ReadIndex context: unique cluster-wide, because the leader merges requests by context.
fn read_ctx(member: u64, counter: u64) -> Vec<u8> {
    let mut ctx = member.to_be_bytes().to_vec();
    ctx.extend_from_slice(&counter.to_be_bytes());
    ctx
}

fn parse_read_ctx(ctx: &[u8]) -> Option<(u64, u64)> {
    let member = u64::from_be_bytes(ctx.get(..8)?.try_into().ok()?);
    let counter = u64::from_be_bytes(ctx.get(8..16)?.try_into().ok()?);
    Some((member, counter))
}

/// A new cluster's first entries: one AddNode conf change per initial member, term 1.
fn bootstrap_entries(members: &[MemberRecord]) -> Vec<Entry> {
    members
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let change = MembershipChange {
                kind: Kind::Add as i32,
                origin: 0,
                proposal: 0,
                member: Some(m.clone()),
            };
            let mut cc = membership::raft_conf_change(&change);
            cc.context = change.encode_to_vec().into();
            let mut e = Entry::default();
            e.set_entry_type(EntryType::EntryConfChangeV2);
            e.term = 1;
            e.index = i as u64 + 1;
            e.data = cc.write_to_bytes().expect("conf change encodes").into();
            e
        })
        .collect()
}

/// Releases `wal` after a snapshot at `index`, up to the oldest snapshot `snapshotter` still
/// keeps (or `index`, if lower), so that the WAL covers the gap between the snapshots kept.
fn release_wal(wal: &mut Wal, snapshotter: &Snapshotter, index: u64) {
    match snapshotter.oldest_index() {
        Some(oldest) => wal.release_to(oldest.min(index)),
        None => tracing::warn!("cannot list snapshots; WAL segments kept"),
    }
}

/// The log a member starts from: the newest snapshot that loads and the WAL after it.
pub struct RecoveredLog {
    /// The snapshot, if any.
    pub snapshot: Option<StateSnapshot>,
    /// Newer snapshot files that failed to load and that the WAL stands in for; the caller
    /// renames them with [`Snapshotter::mark_broken`] once the state machine can resume too.
    pub broken: Vec<BrokenSnapshot>,
    /// The WAL, open for appending.
    pub wal: Wal,
    /// Its records after the snapshot.
    pub recovered: Recovered,
}

/// Loads the newest snapshot that passes its checksum and opens the WAL in `wal_dir` after it
/// (`fsync` as for [`Wal::open`]).
///
/// When newer snapshots are damaged, falling back to an older one (or to none) is allowed only
/// if the WAL still holds every entry after the older one up to each damaged one's index, with
/// the damaged one's term at that index: by Raft's Log Matching property the log up to there is
/// then the one the damaged snapshot was taken from. That fails when the WAL before the damaged
/// snapshot was released, or when this member's log was reset to it because the leader sent it
/// (there is no WAL before such a snapshot): starting anyway would leave a hole in the state.
///
/// Errors: the snapshot directory or the WAL cannot be read, or the WAL is corrupt; a damaged
/// snapshot the WAL cannot stand in for (the error names the file).
pub fn recover_log(
    snapshotter: &Snapshotter,
    wal_dir: &Path,
    fsync: bool,
) -> Result<RecoveredLog, StartError> {
    let loaded = snapshotter.load_newest_available()?;
    let index = loaded.snapshot.as_ref().map_or(0, |s| s.index);
    let Some(newest_broken) = loaded.broken.first() else {
        let (wal, recovered) = Wal::open(wal_dir, index, fsync)?;
        return Ok(RecoveredLog {
            snapshot: loaded.snapshot,
            broken: Vec::new(),
            wal,
            recovered,
        });
    };
    let older = match index {
        0 => "no older snapshot".to_string(),
        i => format!("the older snapshot is at index {i}"),
    };
    let refuse = |why: String| StartError::BrokenSnapshot {
        path: newest_broken.path.clone(),
        older: older.clone(),
        why,
    };
    let missing = |b: &BrokenSnapshot| {
        refuse(format!(
            "the WAL does not hold the entries from index {} to {} at term {} (released, or this \
             member's log was reset to that snapshot when the leader sent it, so no WAL precedes \
             it)",
            index + 1,
            b.index,
            b.term
        ))
    };
    let (wal, recovered) = match Wal::open(wal_dir, index, fsync) {
        Ok(opened) => opened,
        Err(WalError::Gap { .. }) => return Err(missing(newest_broken)),
        Err(e) => return Err(refuse(format!("the WAL after it cannot be used ({e})"))),
    };
    for b in &loaded.broken {
        // Recovered entries run contiguously from `index + 1` (Wal::open checks for gaps).
        let at = b
            .index
            .checked_sub(index + 1)
            .and_then(|i| recovered.entries.get(i as usize));
        match at {
            Some(e) if e.index == b.index && e.term == b.term => {}
            _ => return Err(missing(b)),
        }
    }
    tracing::warn!(broken = %newest_broken.path.display(), snapshot_index = index,
        entries = recovered.entries.len(),
        "newest snapshot is damaged; starting from the older one and replaying the WAL after it");
    Ok(RecoveredLog {
        snapshot: loaded.snapshot,
        broken: loaded.broken,
        wal,
        recovered,
    })
}

/// Why the Raft log cannot be recovered ([`recover_log`]) or the Raft node cannot start
/// ([`RaftNode::new`]).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The snapshot directory cannot be read or written.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The WAL cannot be read or written, or is corrupt.
    #[error(transparent)]
    Wal(#[from] WalError),
    /// raft-rs refused the configuration or the recovered log.
    #[error(transparent)]
    Raft(#[from] raft::Error),
    /// The newest snapshot is damaged and the WAL cannot stand in for it: `older` describes
    /// the snapshot that would be used instead, `why` what the WAL lacks.
    #[error(
        "snapshot {} is corrupt (crc mismatch or undecodable) and cannot be skipped: \
         {older}, and {why}; restore this member's data directory from a backup, or remove \
         the member and add it back with an empty data directory",
        path.display()
    )]
    BrokenSnapshot {
        /// The damaged snapshot file.
        path: PathBuf,
        /// "no older snapshot", or the older snapshot's index.
        older: String,
        /// What the WAL lacks, or why it cannot be used.
        why: String,
    },
    /// `--force-new-cluster` on the data of a member removed from the cluster.
    #[error(
        "--force-new-cluster: member {0:x} was removed from the cluster; its data cannot start a \
         new one (etcd: membership: ID removed)"
    )]
    RemovedMember(u64),
}

/// The commit index a restart starts from: the recorded one, but at least what the snapshot
/// or the durable state machine (`applied`) holds, and no more than the log holds.
fn start_commit(hard_state: Option<&HardState>, snap_index: u64, applied: u64, last: u64) -> u64 {
    hard_state
        .map_or(0, |h| h.commit)
        .max(snap_index)
        .max(applied)
        .min(last)
}

/// The membership table after the conf changes in `entries`, applied to `table` in log order
/// as the Raft thread applies them (changes the table rejects are skipped).
fn replay_membership(mut table: Membership, entries: &[Entry], max_learners: usize) -> Membership {
    for e in entries {
        if e.get_entry_type() != EntryType::EntryConfChangeV2 {
            continue;
        }
        let mut cc = ConfChangeV2::default();
        if cc.merge_from_bytes(&e.data).is_err() {
            continue;
        }
        if let Ok(change) = MembershipChange::decode(cc.context.as_ref()) {
            let _ = table.apply(&change, max_learners);
        }
    }
    table
}

/// The conf change entries that make `this` the only member of `table`, from `index` on at
/// `term`: add `this` if the table lacks it (promote it if it is a learner), then remove every
/// other member, voters and learners, in ID order. Adding comes first because Raft refuses a
/// configuration without voters (etcd `createConfigChangeEnts`).
fn standalone_entries(
    table: &Membership,
    this: &MemberRecord,
    term: u64,
    index: u64,
) -> Vec<Entry> {
    let change = |kind: Kind, member: MemberRecord| MembershipChange {
        kind: kind as i32,
        origin: 0,
        proposal: 0,
        member: Some(member),
    };
    let mut changes = Vec::new();
    match table.members.get(&this.id) {
        None => changes.push(change(
            Kind::Add,
            MemberRecord {
                is_learner: false,
                ..this.clone()
            },
        )),
        Some(m) if m.is_learner => changes.push(change(Kind::Promote, m.clone())),
        Some(_) => {}
    }
    for m in table.members.values().filter(|m| m.id != this.id) {
        changes.push(change(Kind::Remove, m.clone()));
    }
    changes
        .into_iter()
        .zip(index..)
        .map(|(change, index)| {
            let mut cc = membership::raft_conf_change(&change);
            cc.context = change.encode_to_vec().into();
            let mut e = Entry::default();
            e.set_entry_type(EntryType::EntryConfChangeV2);
            e.term = term;
            e.index = index;
            e.data = cc.write_to_bytes().expect("conf change encodes").into();
            e
        })
        .collect()
}

/// `--force-new-cluster` on a member with a log (etcd 3.5 `restartAsStandaloneNode`,
/// `server/etcdserver/raft.go`): drops the recovered entries after the commit index, appends
/// conf changes that leave this member the only one (see [`standalone_entries`]) at the term
/// of the hard state, and writes them to the WAL with a hard state that commits them, so that
/// this start and every later one (with or without the flag) applies them. `table` is the
/// membership of the snapshot (empty without one); `snap_index` the snapshot's index;
/// `applied` the index the state machine already holds.
///
/// Errors: this member's ID was removed from the cluster (no member can take it again: etcd
/// rejects its re-add with `membership: ID removed`); the WAL cannot be written.
pub fn force_new_cluster(
    cfg: &NodeConfig,
    table: &Membership,
    snap_index: u64,
    applied: u64,
    wal: &mut Wal,
    recovered: &mut Recovered,
) -> Result<(), StartError> {
    let last = recovered.entries.last().map_or(snap_index, |e| e.index);
    let commit = start_commit(recovered.hard_state.as_ref(), snap_index, applied, last);
    let keep = recovered
        .entries
        .iter()
        .position(|e| e.index > commit)
        .unwrap_or(recovered.entries.len());
    let discarded = recovered.entries.len() - keep;
    if discarded > 0 {
        tracing::warn!(
            first_discarded_index = commit + 1,
            commit_index = commit,
            discarded,
            "discarding uncommitted WAL entries"
        );
        recovered.entries.truncate(keep);
    }
    let table = replay_membership(table.clone(), &recovered.entries, cfg.max_learners);
    if table.removed.contains(&cfg.id) {
        return Err(StartError::RemovedMember(cfg.id));
    }
    let mut hs = recovered.hard_state.clone().unwrap_or_default();
    hs.term = hs
        .term
        .max(recovered.entries.last().map_or(0, |e| e.term))
        .max(1);
    let entries = standalone_entries(&table, &cfg.this_member, hs.term, commit + 1);
    let removed: Vec<String> = table
        .members
        .keys()
        .filter(|id| **id != cfg.id)
        .map(|id| format!("{id:x}"))
        .collect();
    hs.commit = entries.last().map_or(commit, |e| e.index);
    wal.append(&entries, Some(&hs));
    wal.sync()?;
    recovered.entries.extend(entries);
    recovered.hard_state = Some(hs.clone());
    tracing::warn!(
        local_member_id = %format!("{:x}", cfg.id),
        removed_member_ids = ?removed,
        commit_index = hs.commit,
        "forcing restart member"
    );
    Ok(())
}

/// What `--initial-election-tick-advance` does at start-up (etcd 3.5 `adjustTicks`,
/// `server/etcdserver/server.go`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TickAdvance {
    /// A one-member cluster: advance this many ticks (`election ticks - 1`) at once, whatever
    /// the flag says. (The Raft thread also campaigns at once when it is the only voter.)
    SingleNode(usize),
    /// Advance this many ticks (`election ticks - 2`) once more than one peer is reachable,
    /// checked every 50 ms for up to 5 s (etcd's `rafthttp.ConnReadTimeout`); never otherwise.
    AfterPeersConnect(usize),
    /// The flag is off in a multi-member cluster: wait a whole election timeout.
    Skip,
}

/// etcd's `adjustTicks` decision for a member whose membership table lists `members` members
/// (itself included), with `election_ticks` ticks per election timeout and the flag
/// `--initial-election-tick-advance` = `enabled`.
pub fn initial_tick_advance(members: usize, election_ticks: usize, enabled: bool) -> TickAdvance {
    if members == 1 {
        TickAdvance::SingleNode(election_ticks.saturating_sub(1))
    } else if !enabled {
        TickAdvance::Skip
    } else {
        TickAdvance::AfterPeersConnect(election_ticks.saturating_sub(2))
    }
}

/// Election ticks per election timeout for `election_ms` and `heartbeat_ms` (one tick per
/// heartbeat interval; at least 2).
pub fn election_ticks(election_ms: u64, heartbeat_ms: u64) -> usize {
    (election_ms / heartbeat_ms.max(1)).max(2) as usize
}

/// On a new cluster's first boot (no snapshot, no log, no hard state, but `--initial-cluster`
/// members), writes the bootstrap conf change entries and a hard state committing them to the
/// WAL and makes them the recovered log, so this start and every later one replays them.
/// Returns whether the data was fresh (nothing recovered), bootstrapped or not.
fn bootstrap_if_fresh(
    cfg: &NodeConfig,
    snap: Option<&StateSnapshot>,
    wal: &mut Wal,
    recovered: &mut Recovered,
) -> Result<bool, StartError> {
    let fresh = snap.is_none() && recovered.entries.is_empty() && recovered.hard_state.is_none();
    if fresh && !cfg.bootstrap.is_empty() {
        let entries = bootstrap_entries(&cfg.bootstrap);
        let hs = HardState {
            term: 1,
            commit: entries.len() as u64,
            ..Default::default()
        };
        wal.append(&entries, Some(&hs));
        wal.sync()?;
        *recovered = Recovered {
            entries,
            hard_state: Some(hs),
        };
    }
    Ok(fresh)
}

/// The membership table to start from (the snapshot's, empty without one) and whether the
/// data predates membership in the log, in which case the table is this member alone.
fn starting_membership(
    cfg: &NodeConfig,
    snap: Option<&StateSnapshot>,
    recovered: &Recovered,
) -> (Membership, bool) {
    // Data written before membership went into the log has a snapshot without members,
    // or a log that does not start with conf changes: that was always this member alone.
    let legacy_alone = match snap {
        Some(s) => s.members.is_empty(),
        None => recovered
            .entries
            .first()
            .is_some_and(|e| e.get_entry_type() != EntryType::EntryConfChangeV2),
    };
    let mut membership = match snap {
        Some(s) => Membership::from_records(&s.members, &s.removed),
        None => Membership::default(),
    };
    if legacy_alone {
        membership = Membership::from_records(std::slice::from_ref(&cfg.this_member), &[]);
    }
    (membership, legacy_alone)
}

/// Loads Raft's in-memory storage with what recovery found: the snapshot's metadata (or, for
/// legacy data without one, the configuration of this member alone), the recovered entries,
/// and a hard state whose commit index covers what is already durable (see
/// [`start_commit`]). Returns the snapshot's index (0 without one).
fn restore_storage(
    storage: &mut RaftStorage,
    snap: Option<&StateSnapshot>,
    membership: &Membership,
    legacy_alone: bool,
    applied: u64,
    recovered: Recovered,
) -> Result<u64, StartError> {
    let snap_index = match snap {
        Some(s) => {
            let mut rs = Snapshot::default();
            rs.mut_metadata().index = s.index;
            rs.mut_metadata().term = s.term;
            rs.mut_metadata().set_conf_state(membership.conf_state());
            storage.apply_snapshot(rs)?;
            s.index
        }
        None => {
            if legacy_alone {
                storage.wl().set_conf_state(membership.conf_state());
            }
            0
        }
    };
    storage.append(&recovered.entries)?;
    let last_index = recovered.entries.last().map_or(snap_index, |e| e.index);
    if recovered.hard_state.is_some() || applied > snap_index {
        // What the snapshot or the durable state machine holds was committed; the log
        // cannot commit what it lacks.
        let commit = start_commit(
            recovered.hard_state.as_ref(),
            snap_index,
            applied,
            last_index,
        );
        let mut hs = recovered.hard_state.unwrap_or_default();
        hs.commit = commit;
        hs.term = hs.term.max(storage.rl().hard_state().term);
        if let Some(last) = recovered.entries.last() {
            hs.term = hs.term.max(last.term);
        }
        storage.wl().set_hardstate(hs);
    }
    Ok(snap_index)
}

/// raft-rs's configuration for this member, replaying from `snap_index` (not yet validated).
fn raft_config(cfg: &NodeConfig, snap_index: u64) -> raft::Config {
    let election_tick = election_ticks(cfg.election_ms, cfg.heartbeat_ms);
    raft::Config {
        id: cfg.id,
        election_tick,
        heartbeat_tick: 1,
        // Everything after the snapshot comes out of Ready again, so conf changes after it
        // rebuild Raft's configuration and the membership table; the dispatcher skips the
        // writes its shards already hold.
        applied: snap_index,
        max_size_per_msg: 1024 * 1024,
        max_inflight_msgs: 256,
        pre_vote: cfg.pre_vote,
        check_quorum: true,
        read_only_option: if cfg.lease_reads {
            ReadOnlyOption::LeaseBased
        } else {
            ReadOnlyOption::Safe
        },
        ..Default::default()
    }
}

impl RaftNode {
    /// Builds the node from what recovery found: the snapshot (if any) and the WAL records
    /// after it. A new cluster's first boot writes the bootstrap entries to the WAL first.
    ///
    /// `applied` is the index the state machine already holds (at least the snapshot's).
    #[allow(clippy::too_many_arguments)]
    pub fn new<T: PeerTransport + 'static>(
        cfg: &NodeConfig,
        snap: Option<&StateSnapshot>,
        applied: u64,
        mut wal: Wal,
        mut recovered: Recovered,
        transport: impl FnOnce(flume::Sender<NodeMsg>) -> T,
        committed: flume::Sender<ApplyMsg>,
        snapshots: flume::Receiver<SnapshotTaken>,
    ) -> Result<(RaftNode, RaftHandle), StartError> {
        let fresh = bootstrap_if_fresh(cfg, snap, &mut wal, &mut recovered)?;
        let (membership, legacy_alone) = starting_membership(cfg, snap, &recovered);
        if cfg.force_new_cluster && !fresh {
            force_new_cluster(
                cfg,
                &membership,
                snap.map_or(0, |s| s.index),
                applied,
                &mut wal,
                &mut recovered,
            )?;
        }
        let mut storage = RaftStorage::new(committed.clone());
        let snap_index = restore_storage(
            &mut storage,
            snap,
            &membership,
            legacy_alone,
            applied,
            recovered,
        )?;
        let config = raft_config(cfg, snap_index);
        config.validate()?;
        let raw = RawNode::new(&config, storage, &logger::raft_logger())?;
        let committed_at_start = raw.raft.raft_log.committed;
        let (tx, inbox) = flume::bounded(16 * 1024);
        let status = Arc::new(NodeStatus::default());
        let membership = Arc::new(membership);
        let (membership_tx, membership_rx) = watch::channel(membership.clone());
        let mut transport = transport(tx.clone());
        if membership.members.is_empty() {
            transport.set_peers(&Membership::from_records(&cfg.seed_peers, &[]));
        } else {
            transport.set_peers(&membership);
        }
        let mut node = RaftNode {
            id: cfg.id,
            raw,
            wal,
            transport: Box::new(transport),
            inbox,
            snapshots,
            committed,
            snapshotter: snapshot::Snapshotter::new(cfg.snap_dir.clone())?
                .with_keep(cfg.max_snapshots),
            saving: None,
            own_inbox: tx.downgrade(),
            status: status.clone(),
            replay_target: Some(committed_at_start),
            membership,
            membership_tx,
            tick: Duration::from_millis(cfg.heartbeat_ms.max(1)),
            catch_up_entries: cfg.catch_up_entries,
            request_timeout: cfg.request_timeout,
            batch: Vec::new(),
            batch_ids: Vec::new(),
            read_waiters: Vec::new(),
            stop: None,
            reads_in_flight: HashMap::new(),
            contact: HashMap::new(),
            election: Duration::from_millis(cfg.election_ms),
            next_read_ctx: 0,
            max_learners: cfg.max_learners,
            applier: None,
        };
        node.publish_status();
        Ok((
            node,
            RaftHandle {
                tx,
                status,
                membership: membership_rx,
            },
        ))
    }

    /// Runs until [`NodeMsg::Stop`] arrives (then after the round under way, its WAL writes
    /// done). Dropping every [`RaftHandle`] does not end it: its own transport holds a sender
    /// to its inbox, so the member's stop (and a bench's) sends [`NodeMsg::Stop`]. A WAL
    /// failure is fatal: nothing can be acknowledged without it, so the loop ends at once and
    /// returns it (as does a leader's snapshot that cannot be decoded or saved); the caller
    /// reports it and the member stops rather than serving stale promises.
    ///
    /// Errors: [`NodeError::RaftLog`], [`NodeError::SnapshotUndecodable`],
    /// [`NodeError::SnapshotSave`].
    pub fn run(mut self) -> Result<(), NodeError> {
        let mut next_tick = Instant::now() + self.tick;
        // The state machine's own start (a snapshot to install first) need not wait a round.
        self.apply_handed_over();
        loop {
            self.campaign_if_alone();
            match self.inbox.recv_deadline(next_tick) {
                Ok(msg) => {
                    self.on_msg(msg);
                    // Whatever queued up meanwhile joins this batch (up to a stop request).
                    while self.stop.is_none() {
                        let Ok(msg) = self.inbox.try_recv() else {
                            break;
                        };
                        self.on_msg(msg);
                    }
                }
                Err(flume::RecvTimeoutError::Timeout) => {}
                Err(flume::RecvTimeoutError::Disconnected) => break,
            }
            self.flush_batch();
            self.flush_reads();
            if Instant::now() >= next_tick {
                self.raw.tick();
                self.retry_reads();
                next_tick = Instant::now() + self.tick;
            }
            while let Ok(s) = self.snapshots.try_recv() {
                self.save_snapshot(s);
            }
            self.ready()?;
            if !self.read_waiters.is_empty() {
                // Held reads may now go: the leader's first entry may have just committed.
                self.flush_reads();
                self.ready()?;
            }
            self.apply_handed_over();
            if self.raw.raft.state != StateRole::Leader {
                self.raw.store().release_image();
            }
            self.publish_status();
            if self.stop.is_some() {
                tracing::info!("raft thread stopped");
                break;
            }
        }
        // What the last round handed over (or dropped) is applied before the thread ends.
        self.apply_handed_over();
        // A snapshot being written finishes before the thread ends (its file is written to a
        // temporary name and renamed, so even a crash leaves no half snapshot).
        if let Some(saving) = self.saving.take() {
            let _ = saving.join();
        }
        Ok(())
    }

    /// Runs `apply` on this thread after each round: the state machine applies, in log
    /// order, what this node handed over on its committed channel in that round, without a
    /// thread of its own (so a committed entry reaches the shards with no wake-up between the
    /// WAL's fdatasync and the apply). `apply` returns false once the state machine has
    /// stopped (a shard's engine failed); it is not called again. Without it, whoever holds
    /// the committed channel's receiver applies (the consensus tests' recorder).
    pub fn apply_here(&mut self, apply: Box<dyn FnMut() -> bool + Send>) {
        self.applier = Some(apply);
    }

    /// Runs the state machine set by [`RaftNode::apply_here`], if any.
    fn apply_handed_over(&mut self) {
        if let Some(apply) = self.applier.as_mut() {
            if !apply() {
                self.applier = None;
            }
        }
    }

    /// A member that is the only voter need not wait out an election timeout.
    fn campaign_if_alone(&mut self) {
        let r = &self.raw.raft;
        // Cheap test first: this runs on every loop of the Raft thread.
        if r.leader_id != 0 || r.state == StateRole::Candidate {
            return;
        }
        let voters: Vec<u64> = r.prs().conf().voters().ids().iter().collect();
        if voters == [self.id] {
            if let Err(e) = self.raw.campaign() {
                tracing::warn!(error = %e, "cannot campaign");
            }
        }
    }

    /// [`Self::on_ready`], logging a WAL failure as the fatal error it is.
    fn ready(&mut self) -> Result<(), NodeError> {
        self.on_ready().inspect_err(|e| {
            if let NodeError::RaftLog(e) = e {
                tracing::error!(error = %e, "fatal: cannot persist the Raft log");
            }
        })
    }

    fn on_msg(&mut self, msg: NodeMsg) {
        match msg {
            NodeMsg::Propose { id, data } => {
                if !self.batch.is_empty() && self.batch.len() + data.len() + 10 > MAX_BATCH_BYTES {
                    self.flush_batch();
                }
                prost::encoding::encode_varint(data.len() as u64, &mut self.batch);
                self.batch.extend_from_slice(&data);
                self.batch_ids.push(id);
            }
            NodeMsg::ReadIndex(tx) => self.read_waiters.push(tx),
            NodeMsg::StateImage(reply) => {
                // The state machine gone means shutdown: the dropped reply says so.
                let _ = self.committed.send(ApplyMsg::Image(reply));
            }
            NodeMsg::ChangeMembership { id, change } => {
                let mut cc = membership::raft_conf_change(&change);
                cc.context = change.encode_to_vec().into();
                if let Err(e) = self.raw.propose_conf_change(Vec::new(), cc) {
                    tracing::debug!(error = %e, "membership change dropped");
                    self.drop_proposals(vec![id]);
                }
            }
            NodeMsg::Step(m) => {
                self.heard_from(m.from);
                if let Err(e) = self.raw.step(m) {
                    // Responses from members removed meanwhile, mostly.
                    tracing::debug!(error = %e, "peer message ignored");
                }
            }
            NodeMsg::Unreachable(id) => self.raw.report_unreachable(id),
            NodeMsg::AdvanceTicks(ticks) => {
                for _ in 0..ticks {
                    self.raw.tick();
                }
            }
            NodeMsg::RemovedByPeer => self.status.set_removed(),
            NodeMsg::SnapshotSaved { index } => self.compact_log(index),
            NodeMsg::TransferLeader(id) => self.raw.transfer_leader(id),
            NodeMsg::Stop(reply) => self.stop = Some(reply),
            NodeMsg::Progress(reply) => {
                let _ = reply.send(self.progress());
            }
            NodeMsg::SnapshotSent { to, ok } => {
                let status = if ok {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                self.raw.report_snapshot(to, status);
                let sending = self
                    .raw
                    .raft
                    .prs()
                    .iter()
                    .any(|(_, p)| p.state == raft::ProgressState::Snapshot);
                if !sending {
                    self.raw.store().release_image();
                }
            }
        }
    }

    fn heard_from(&mut self, id: u64) {
        let now = Instant::now();
        let election = self.election;
        self.contact
            .entry(id)
            .and_modify(|c| {
                if now.duration_since(c.last) > election {
                    c.since = now;
                }
                c.last = now;
            })
            .or_insert(Contact {
                since: now,
                last: now,
            });
    }

    fn progress(&self) -> Vec<PeerProgress> {
        if self.raw.raft.state != StateRole::Leader {
            return Vec::new();
        }
        let now = Instant::now();
        self.raw
            .raft
            .prs()
            .iter()
            .map(|(id, p)| PeerProgress {
                id: *id,
                matched: p.matched,
                connected_for: if *id == self.id {
                    Some(Duration::MAX)
                } else {
                    self.contact
                        .get(id)
                        .filter(|c| now.duration_since(c.last) <= self.election)
                        .map(|c| now.duration_since(c.since))
                },
            })
            .collect()
    }

    fn flush_batch(&mut self) {
        if self.batch_ids.is_empty() {
            return;
        }
        // raft-rs drops proposals while leadership is being handed over; the transfer ends
        // (or is abandoned) within an election timeout, so hold the batch until then.
        if self.raw.raft.lead_transferee.is_some() {
            return;
        }
        let data = std::mem::take(&mut self.batch);
        let ids = std::mem::take(&mut self.batch_ids);
        if let Err(e) = self.raw.propose(Vec::new(), data) {
            tracing::debug!(error = %e, "proposal dropped");
            self.drop_proposals(ids);
        }
    }

    /// Proposals raft-rs refused (no leader known): the state machine answers their waiters
    /// with "etcdserver: no leader", after whatever it was handed before.
    fn drop_proposals(&self, ids: Vec<u64>) {
        let error = EtcdError::NoLeader;
        let _ = self.committed.send(ApplyMsg::Dropped { ids, error });
    }

    fn flush_reads(&mut self) {
        if self.read_waiters.is_empty() {
            return;
        }
        let leader = self.raw.raft.leader_id;
        if leader == 0 {
            for w in self.read_waiters.drain(..) {
                let _ = w.send(Err(EtcdError::NoLeader));
            }
            return;
        }
        // raft-rs drops a ReadIndex until the leader has committed an entry of its own term
        // (Raft paper section 6.4); hold the reads until then instead of losing them. A
        // follower cannot tell: it sends, and retries after READ_RETRY.
        if self.raw.raft.state == StateRole::Leader && !self.raw.raft.commit_to_current_term() {
            return;
        }
        let waiters = std::mem::take(&mut self.read_waiters);
        self.next_read_ctx += 1;
        self.raw.read_index(read_ctx(self.id, self.next_read_ctx));
        let now = Instant::now();
        self.reads_in_flight.insert(
            self.next_read_ctx,
            ReadRound {
                waiters,
                leader,
                sent_at: now,
                deadline: now + self.request_timeout,
            },
        );
    }

    /// Fails rounds whose leader changed or whose time is up; resends the rest that got no
    /// answer yet.
    fn retry_reads(&mut self) {
        if self.reads_in_flight.is_empty() {
            return;
        }
        let now = Instant::now();
        let leader = self.raw.raft.leader_id;
        let mut resend = Vec::new();
        self.reads_in_flight.retain(|ctx, round| {
            let failure = if round.leader != leader {
                Some(EtcdError::LeaderChanged)
            } else if now >= round.deadline {
                Some(EtcdError::Timeout)
            } else {
                None
            };
            if let Some(e) = failure {
                for w in round.waiters.drain(..) {
                    let _ = w.send(Err(e.clone()));
                }
                return false;
            }
            if now.duration_since(round.sent_at) >= READ_RETRY {
                round.sent_at = now;
                resend.push(*ctx);
            }
            true
        });
        for ctx in resend {
            self.raw.read_index(read_ctx(self.id, ctx));
        }
    }

    /// Saves a snapshot the state machine took, on a thread of its own (a complete image can
    /// be large; the Raft loop must keep ticking), then releases the log before it
    /// ([`NodeMsg::SnapshotSaved`]). One at a time: snapshots come every `--snapshot-count`
    /// entries, so the previous one has long been written. A snapshot that cannot be saved is
    /// logged and the log kept: the WAL still holds everything.
    fn save_snapshot(&mut self, s: SnapshotTaken) {
        if let Some(previous) = self.saving.take() {
            let _ = previous.join();
        }
        let snapshotter = self.snapshotter.clone();
        let own_inbox = self.own_inbox.clone();
        let save = move || match snapshotter.save(&s.snapshot) {
            Ok(()) => {
                snapshotter.remove_checkpoints_before(s.term, s.index);
                tracing::info!(
                    index = s.index,
                    revision = s.snapshot.revision,
                    "saved snapshot"
                );
                if let Some(inbox) = own_inbox.upgrade() {
                    let _ = inbox.send(NodeMsg::SnapshotSaved { index: s.index });
                }
            }
            Err(e) => tracing::error!(error = %e, "snapshot failed"),
        };
        match std::thread::Builder::new()
            .name("snapshot".into())
            .spawn(save)
        {
            Ok(thread) => self.saving = Some(thread),
            Err(e) => tracing::error!(error = %e, "snapshot failed: cannot start its thread"),
        }
    }

    /// Keeps the log in memory to at most twice `catch_up_entries` behind the applied index,
    /// and to at most [`LOG_HIGH_BYTES`] of entry data, snapshot or not: what is older is in
    /// the WAL for a restart, and a follower that needs it gets an image of the state machine
    /// (see [`storage`]). An entry carries a batch of requests (about 13 under load), so a log
    /// released only by snapshots every `--snapshot-count` entries held most of a 1M-key
    /// load's data a second time in memory, and 10,000 entries still held some 60 MiB.
    fn bound_log(&mut self) {
        let applied = self.raw.raft.raft_log.applied;
        let first = raft::Storage::first_index(self.raw.store()).unwrap_or(1);
        let keep = self.catch_up_entries.max(1);
        let store = self.raw.mut_store();
        let mut compacted = Ok(());
        if applied.saturating_sub(first) > 2 * keep {
            compacted = store.compact(applied - keep);
        }
        if compacted.is_ok() {
            compacted = store
                .compact_to_fit(LOG_HIGH_BYTES, LOG_HIGH_BYTES / 2, applied)
                .map(drop);
        }
        if let Err(e) = compacted {
            tracing::warn!(error = %e, "log compaction skipped");
        }
    }

    fn compact_log(&mut self, index: u64) {
        // Keep a window of entries behind the snapshot in memory so that a follower a little
        // behind catches up from the log rather than needing the whole snapshot.
        let upto = index
            .saturating_sub(self.catch_up_entries)
            .min(self.raw.raft.raft_log.applied);
        if upto > raft::Storage::first_index(self.raw.store()).unwrap_or(1) {
            if let Err(e) = self.raw.mut_store().compact(upto) {
                tracing::warn!(error = %e, "log compaction skipped");
            }
        }
        self.release_wal(index);
    }

    /// Releases the WAL after a snapshot at `index`, but only up to the oldest snapshot still
    /// on disk: a restart resumes from the newest snapshot, and should that one fail to load,
    /// from the one before it with the WAL after it (see [`recover_log`]).
    fn release_wal(&mut self, index: u64) {
        release_wal(&mut self.wal, &self.snapshotter, index);
    }

    /// Queues messages for peers; tells Raft about those that cannot be queued.
    fn send(&mut self, messages: Vec<Message>) {
        if messages.is_empty() {
            return;
        }
        for (to, ty) in self.transport.send(messages) {
            self.raw.report_unreachable(to);
            if ty == MessageType::MsgSnapshot {
                self.raw.report_snapshot(to, SnapshotStatus::Failure);
            }
        }
    }

    fn on_ready(&mut self) -> Result<(), NodeError> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        // A leader's messages go out before its own fsync (Raft thesis 10.2.1).
        self.send(ready.take_messages());
        if !ready.snapshot().is_empty() {
            self.install_snapshot(ready.snapshot().clone())?;
        }
        let committed = ready.take_committed_entries();
        self.handle_committed(committed);
        for rs in ready.take_read_states() {
            match parse_read_ctx(&rs.request_ctx) {
                Some((member, ctx)) if member == self.id => {
                    for w in self
                        .reads_in_flight
                        .remove(&ctx)
                        .map(|r| r.waiters)
                        .unwrap_or_default()
                    {
                        let _ = w.send(Ok(rs.index));
                    }
                }
                _ => {}
            }
        }
        if !ready.entries().is_empty() {
            self.wal.append(ready.entries(), None);
        }
        if let Some(hs) = ready.hs() {
            self.wal.append(&[], Some(hs));
        }
        self.wal.sync()?;
        if !ready.entries().is_empty() {
            self.raw
                .mut_store()
                .append(ready.entries())
                .expect("append after the WAL");
        }
        if let Some(hs) = ready.hs() {
            self.raw.mut_store().wl().set_hardstate(hs.clone());
        }
        // A follower's answers (append acks, votes) only after its own fsync.
        self.send(ready.take_persisted_messages());
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            let mut store = self.raw.mut_store().wl();
            store.mut_hard_state().commit = commit;
            // Persisted with the next fsync; a lost commit index is recomputed by Raft.
            let hs = store.hard_state().clone();
            drop(store);
            self.wal.append(&[], Some(&hs));
        }
        self.send(light.take_messages());
        self.handle_committed(light.take_committed_entries());
        self.raw.advance_apply();
        self.bound_log();
        if !self.reads_in_flight.is_empty() && self.raw.raft.leader_id == 0 {
            self.retry_reads();
        }
        Ok(())
    }

    fn handle_committed(&mut self, entries: Vec<Entry>) {
        if entries.is_empty() {
            return;
        }
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            let mut conf_change = None;
            let data = match e.get_entry_type() {
                EntryType::EntryNormal => e.data.to_vec(),
                EntryType::EntryConfChange => {
                    let mut cc = ConfChange::default();
                    if cc.merge_from_bytes(&e.data).is_ok() {
                        let result = self.raw.apply_conf_change(&cc);
                        self.conf_changed(result);
                    }
                    Vec::new()
                }
                EntryType::EntryConfChangeV2 => {
                    let mut cc = ConfChangeV2::default();
                    if cc.merge_from_bytes(&e.data).is_ok() {
                        conf_change = Some(self.apply_membership_change(&cc));
                    }
                    Vec::new()
                }
            };
            out.push(CommittedEntry {
                index: e.index,
                term: e.term,
                data,
                conf_change,
            });
        }
        // The dispatcher gone means shutdown; nothing left to apply.
        let _ = self.committed.send(ApplyMsg::Entries(out));
    }

    /// A leader's snapshot: the log is reset to it, it is saved durably before anything after
    /// it is (a restart then resumes from it even if the shards had not finished loading it),
    /// and the dispatcher replaces the state machine with it, ahead of any entry after it. A
    /// snapshot that cannot be decoded (the peer service checked it already) or saved is fatal,
    /// as a WAL failure is: Raft has moved its log past it, and going on would diverge.
    fn install_snapshot(&mut self, snap: Snapshot) -> Result<(), NodeError> {
        let meta = snap.get_metadata();
        let (index, term) = (meta.index, meta.term);
        let image = match StateSnapshot::decode(snap.data.as_ref()) {
            Ok(image) if image.complete && image.index == index => image,
            _ => {
                tracing::error!(index, "fatal: the leader's snapshot does not decode");
                return Err(NodeError::SnapshotUndecodable { index });
            }
        };
        if let Err(e) = self.raw.mut_store().apply_snapshot(snap) {
            tracing::error!(error = %e, "leader's snapshot older than the log; ignored");
            return Ok(());
        }
        crate::failpoints::crash_point(crate::failpoints::SNAPSHOT_BEFORE_INSTALL);
        if let Err(e) = self.snapshotter.save(&image) {
            tracing::error!(error = %e, "fatal: cannot save the leader's snapshot");
            return Err(NodeError::SnapshotSave(e));
        }
        crate::failpoints::crash_point(crate::failpoints::SNAPSHOT_AFTER_INSTALL);
        tracing::info!(index, term, "log reset to the leader's snapshot");
        self.membership = Arc::new(Membership::from_records(&image.members, &image.removed));
        self.membership_tx.send_replace(self.membership.clone());
        self.transport.set_peers(&self.membership);
        let _ = self.committed.send(ApplyMsg::Restore(Arc::new(image)));
        self.release_wal(index);
        Ok(())
    }

    /// Applies a committed membership change to the table and, if the table accepts it, to
    /// Raft; what it did goes to the state machine, which answers the proposer.
    fn apply_membership_change(&mut self, cc: &ConfChangeV2) -> ConfChangeApplied {
        let Ok(change) = MembershipChange::decode(cc.context.as_ref()) else {
            // Not written by MetaStore: Raft's side only.
            let result = self.raw.apply_conf_change(cc);
            self.conf_changed(result);
            return ConfChangeApplied {
                membership: self.membership.clone(),
                origin: 0,
                proposal: 0,
                result: Ok(()),
            };
        };
        let mut table = (*self.membership).clone();
        let result = table.apply(&change, self.max_learners);
        let id = change.member.as_ref().map_or(0, |m| m.id);
        match &result {
            Ok(true) => {
                let result = self.raw.apply_conf_change(cc);
                self.conf_changed(result);
            }
            Ok(false) => {}
            Err(e) => {
                tracing::info!(kind = ?change.kind(), member = %format!("{id:x}"), error = %e, "membership change rejected")
            }
        }
        if result.is_ok() {
            tracing::info!(kind = ?change.kind(), member = %format!("{id:x}"), "membership changed");
            self.membership = Arc::new(table);
            self.membership_tx.send_replace(self.membership.clone());
            self.transport.set_peers(&self.membership);
            if change.kind() == Kind::Remove && id == self.id {
                tracing::warn!("this member has been permanently removed from the cluster");
                self.status.set_removed();
            }
        }
        ConfChangeApplied {
            membership: self.membership.clone(),
            origin: change.origin,
            proposal: change.proposal,
            result: result.map(|_| ()),
        }
    }

    fn conf_changed(&mut self, result: raft::Result<ConfState>) {
        match result {
            Ok(cs) => self.raw.mut_store().wl().set_conf_state(cs),
            Err(e) => tracing::warn!(error = %e, "conf change rejected"),
        }
    }

    fn publish_status(&mut self) {
        let r = &self.raw.raft;
        if self.replay_target.is_some_and(|t| r.raft_log.applied >= t) {
            self.replay_target = None;
            self.status.replayed.send_replace(true);
        }
        let term_before = self.status.term.swap(r.term, Ordering::Relaxed);
        // etcd `raftNode.start`: a ready whose leader is set and differs is a leader change.
        let before = self.status.leader.swap(r.leader_id, Ordering::Relaxed);
        if r.leader_id != 0 && r.leader_id != before {
            crate::metrics::LEADER_CHANGES.inc();
        }
        if r.leader_id != before || r.term != term_before {
            self.status.publish_changes(Leadership {
                term: r.term,
                leader: r.leader_id,
                removed: self.status.removed.load(Ordering::Relaxed),
            });
        }
        self.status
            .commit
            .store(r.raft_log.committed, Ordering::Relaxed);
        self.status
            .last_index
            .store(r.raft_log.last_index(), Ordering::Relaxed);
        self.status
            .applied
            .store(r.raft_log.applied, Ordering::Relaxed);
        self.status.is_learner.store(
            self.membership
                .members
                .get(&self.id)
                .is_some_and(|m| m.is_learner),
            Ordering::Relaxed,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: format!("e{index}").into_bytes().into(),
            ..Default::default()
        }
    }

    fn snap(term: u64, index: u64) -> StateSnapshot {
        StateSnapshot {
            term,
            index,
            revision: index as i64,
            complete: true,
            ..Default::default()
        }
    }

    /// Flips a byte in the newest snapshot file; returns its path.
    fn corrupt_newest(snap_dir: &Path) -> PathBuf {
        let mut files: Vec<PathBuf> = std::fs::read_dir(snap_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "snap"))
            .collect();
        files.sort();
        let newest = files.pop().unwrap();
        let mut bytes = std::fs::read(&newest).unwrap();
        bytes[8] ^= 0x01;
        std::fs::write(&newest, bytes).unwrap();
        newest
    }

    /// Entries 1..=30 at term 1 in three segments, with a snapshot taken (and the WAL released
    /// the way the Raft node does) at 10 and at 20.
    fn two_snapshots(dir: &Path) -> (Snapshotter, PathBuf) {
        let snapshotter = Snapshotter::new(dir.join("snap")).unwrap().with_keep(2);
        let wal_dir = dir.join("wal");
        let (mut wal, _) = Wal::open(&wal_dir, 0, true).unwrap();
        for i in 1..=30 {
            wal.append(&[entry(i, 1)], None);
            wal.sync().unwrap();
            if i % 10 == 0 && i < 30 {
                wal.roll_over().unwrap();
                snapshotter.save(&snap(1, i)).unwrap();
                release_wal(&mut wal, &snapshotter, i);
            }
        }
        (snapshotter, wal_dir)
    }

    fn record(id: u64) -> MemberRecord {
        MemberRecord {
            id,
            name: format!("m{id}"),
            peer_urls: vec![format!("http://127.0.0.1:{id}")],
            client_urls: vec![],
            is_learner: false,
        }
    }

    fn node_config(id: u64, dir: &Path) -> NodeConfig {
        NodeConfig {
            id,
            this_member: record(id),
            bootstrap: vec![],
            seed_peers: vec![],
            heartbeat_ms: 100,
            election_ms: 1000,
            lease_reads: false,
            catch_up_entries: 5000,
            request_timeout: Duration::from_secs(5),
            snap_dir: dir.join("snap"),
            max_snapshots: 5,
            pre_vote: true,
            max_learners: 1,
            force_new_cluster: true,
        }
    }

    #[test]
    fn force_new_cluster_commits_a_one_member_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let wal_dir = dir.path().join("wal");
        let (mut wal, _) = Wal::open(&wal_dir, 0, true).unwrap();
        // Members 1, 2, 3; writes up to 6 committed at term 2, 7..=8 never committed.
        let mut entries = bootstrap_entries(&[record(1), record(2), record(3)]);
        entries.extend((4..=8).map(|i| entry(i, 2)));
        let hs = HardState {
            term: 2,
            vote: 3,
            commit: 6,
            ..Default::default()
        };
        wal.append(&entries, Some(&hs));
        wal.sync().unwrap();
        drop(wal);

        let cfg = node_config(2, dir.path());
        let (mut wal, mut recovered) = Wal::open(&wal_dir, 0, true).unwrap();
        force_new_cluster(&cfg, &Membership::default(), 0, 0, &mut wal, &mut recovered).unwrap();
        drop(wal);
        let check = |recovered: &Recovered| {
            let indexes: Vec<u64> = recovered.entries.iter().map(|e| e.index).collect();
            assert_eq!(indexes, (1..=8).collect::<Vec<_>>(), "7 and 8 replaced");
            let hs = recovered.hard_state.clone().unwrap();
            assert_eq!((hs.term, hs.commit), (2, 8));
            let table = replay_membership(Membership::default(), &recovered.entries, 1);
            assert_eq!(table.voters(), vec![2]);
            assert_eq!(table.removed, [1, 3].into_iter().collect());
            assert!(recovered.entries[6..]
                .iter()
                .all(|e| e.term == 2 && e.get_entry_type() == EntryType::EntryConfChangeV2));
        };
        check(&recovered);
        // Durable: a restart without the flag finds the same log.
        let (_, again) = Wal::open(&wal_dir, 0, true).unwrap();
        check(&again);
    }

    #[test]
    fn force_new_cluster_adds_a_member_the_log_does_not_list() {
        let table = Membership::from_records(&[record(1), record(3)], &[]);
        let entries = standalone_entries(&table, &record(2), 4, 10);
        let after = replay_membership(table.clone(), &entries, 1);
        assert_eq!(after.list(), vec![record(2)]);
        assert_eq!(
            entries.iter().map(|e| e.index).collect::<Vec<_>>(),
            [10, 11, 12]
        );
        // A learner is promoted; a lone voter needs nothing.
        let mut learner = record(2);
        learner.is_learner = true;
        let table = Membership::from_records(&[record(1), learner], &[]);
        let after = replay_membership(
            table.clone(),
            &standalone_entries(&table, &record(2), 4, 10),
            1,
        );
        assert_eq!(after.voters(), vec![2]);
        assert!(after.learners().is_empty());
        let alone = Membership::from_records(&[record(2)], &[]);
        assert!(standalone_entries(&alone, &record(2), 4, 10).is_empty());
    }

    #[test]
    fn force_new_cluster_refuses_a_removed_member() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(&dir.path().join("wal"), 0, true).unwrap();
        let mut recovered = Recovered {
            entries: vec![],
            hard_state: Some(HardState {
                term: 3,
                vote: 0,
                commit: 10,
                ..Default::default()
            }),
        };
        let table = Membership::from_records(&[record(1)], &[2]);
        let err = force_new_cluster(
            &node_config(2, dir.path()),
            &table,
            10,
            10,
            &mut wal,
            &mut recovered,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("removed"), "{err}");
    }

    #[test]
    fn initial_tick_advance_follows_etcds_adjust_ticks() {
        // One member: always, flag or not, electionTicks - 1.
        assert_eq!(
            initial_tick_advance(1, 10, true),
            TickAdvance::SingleNode(9)
        );
        assert_eq!(
            initial_tick_advance(1, 10, false),
            TickAdvance::SingleNode(9)
        );
        // More: electionTicks - 2 once peers connect, only with the flag.
        assert_eq!(
            initial_tick_advance(3, 10, true),
            TickAdvance::AfterPeersConnect(8)
        );
        assert_eq!(initial_tick_advance(3, 10, false), TickAdvance::Skip);
        assert_eq!(election_ticks(5000, 100), 50);
        assert_eq!(election_ticks(100, 100), 2);
    }

    #[test]
    fn wal_is_released_only_up_to_the_oldest_snapshot_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (snapshotter, wal_dir) = two_snapshots(dir.path());
        // Entries 11..=20 are in the second segment: still there after the snapshot at 20.
        let (_, rec) = Wal::open(&wal_dir, 10, true).unwrap();
        assert_eq!(rec.entries.first().map(|e| e.index), Some(11));
        // A third snapshot lets the WAL go up to the second.
        let (mut wal, _) = Wal::open(&wal_dir, 20, true).unwrap();
        assert_eq!(wal.segment_paths().len(), 2);
        snapshotter.save(&snap(1, 30)).unwrap();
        release_wal(&mut wal, &snapshotter, 30);
        assert_eq!(wal.segment_paths().len(), 1);
        let (_, rec) = Wal::open(&wal_dir, 20, true).unwrap();
        assert_eq!(rec.entries.first().map(|e| e.index), Some(21));
    }

    #[test]
    fn corrupt_newest_snapshot_falls_back_to_the_older_with_the_wal() {
        let dir = tempfile::tempdir().unwrap();
        let (snapshotter, wal_dir) = two_snapshots(dir.path());
        let broken = corrupt_newest(&dir.path().join("snap"));
        let log = recover_log(&snapshotter, &wal_dir, true).expect("falls back");
        assert_eq!(log.snapshot.as_ref().map(|s| s.index), Some(10));
        assert_eq!(log.broken.len(), 1);
        assert_eq!(log.broken[0].path, broken);
        assert_eq!(
            log.recovered
                .entries
                .iter()
                .map(|e| e.index)
                .collect::<Vec<_>>(),
            (11..=30).collect::<Vec<_>>()
        );
    }

    #[test]
    fn corrupt_snapshot_without_the_wal_before_it_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (snapshotter, wal_dir) = two_snapshots(dir.path());
        // As the WAL was released before: up to the newest snapshot.
        let (mut wal, _) = Wal::open(&wal_dir, 20, true).unwrap();
        wal.release_to(20);
        drop(wal);
        let broken = corrupt_newest(&dir.path().join("snap"));
        let err = recover_log(&snapshotter, &wal_dir, true)
            .err()
            .expect("refuses")
            .to_string();
        assert!(
            err.contains(&broken.display().to_string()) && err.contains("corrupt"),
            "{err}"
        );
        assert!(broken.exists(), "a refused snapshot is left in place");
    }

    #[test]
    fn corrupt_snapshot_from_the_leader_is_not_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let snapshotter = Snapshotter::new(dir.path().join("snap")).unwrap();
        let wal_dir = dir.path().join("wal");
        let (mut wal, _) = Wal::open(&wal_dir, 0, true).unwrap();
        // Our own log: 1..=25 at term 1, a snapshot at 3. Then the leader's snapshot at
        // (term 2, index 20) resets the log, and entries 21..=22 of term 2 follow. Entries 4..=20
        // in the WAL are ours, not necessarily the leader's.
        wal.append(&(1..=25).map(|i| entry(i, 1)).collect::<Vec<_>>(), None);
        wal.sync().unwrap();
        snapshotter.save(&snap(1, 3)).unwrap();
        snapshotter.save(&snap(2, 20)).unwrap();
        wal.append(&[entry(21, 2), entry(22, 2)], None);
        wal.sync().unwrap();
        drop(wal);
        let broken = corrupt_newest(&dir.path().join("snap"));
        let err = recover_log(&snapshotter, &wal_dir, true)
            .err()
            .expect("refuses")
            .to_string();
        assert!(
            err.contains(&broken.display().to_string()) && err.contains("leader"),
            "{err}"
        );

        // The same with a log that was shorter than the leader's snapshot (a gap in the WAL).
        let dir = tempfile::tempdir().unwrap();
        let snapshotter = Snapshotter::new(dir.path().join("snap")).unwrap();
        let wal_dir = dir.path().join("wal");
        let (mut wal, _) = Wal::open(&wal_dir, 0, true).unwrap();
        wal.append(&(1..=5).map(|i| entry(i, 1)).collect::<Vec<_>>(), None);
        snapshotter.save(&snap(1, 3)).unwrap();
        snapshotter.save(&snap(2, 20)).unwrap();
        wal.append(&[entry(21, 2)], None);
        wal.sync().unwrap();
        drop(wal);
        let broken = corrupt_newest(&dir.path().join("snap"));
        let err = recover_log(&snapshotter, &wal_dir, true)
            .err()
            .expect("refuses")
            .to_string();
        assert!(err.contains(&broken.display().to_string()), "{err}");
    }
}
