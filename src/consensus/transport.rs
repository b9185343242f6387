//! The peer transport: Raft messages to other members over gRPC (`metastorepb.Peer/Raft`).
//!
//! ```text
//!  Raft thread ── try_send ──> per-peer queue (bounded) ──> peer task: batch ──> client stream
//!                 (full: drop, report unreachable)           (one task and one HTTP/2
//!                                                             connection per remote member)
//! ```
//!
//! The Raft thread never waits on the network. Each remote member has its own queue and task,
//! so a slow or dead peer fills only its own queue; its messages are then dropped and Raft is
//! told the peer is unreachable (raft-rs retransmits, as etcd's rafthttp does). A task takes
//! whatever queued up while the previous batch was on the wire and sends it as one envelope.
//!
//! Snapshots go on their own stream (`Peer/Snapshot`), never through the queue: a task per
//! snapshot sends it in [`SNAPSHOT_CHUNK_BYTES`] chunks, produced only as fast as HTTP/2 flow
//! control lets them out, and reports the outcome to Raft (`report_snapshot`). Heartbeats and
//! appends to other members, and to the same member, go on meanwhile.
//!
//! Metrics (etcd `server/etcdserver/api/rafthttp/metrics.go`, labelled with the peer's hex ID,
//! resolved once per link): `etcd_network_peer_sent_bytes_total` counts the encoded Raft
//! messages of each envelope handed to the stream, and snapshot data; every message dropped
//! (queue full, peer not dialable, stream broken, cut or lost by the fault hook) and every failed
//! snapshot counts in `etcd_network_peer_sent_failures_total`. The Raft stream is one-way (its
//! only answer comes when it ends), so there is no per-batch acknowledgement to time: as etcd
//! probes its peers, a connected link calls the cheap unary `Peer/Members` on the same HTTP/2
//! connection when it connects and every [`PROBE_INTERVAL`], and each answered probe's time
//! goes to `etcd_network_peer_round_trip_time_seconds`. A link connects when it has something
//! to send: a leader probes every member, a follower the leader.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use tokio::sync::{mpsc, watch};

use super::membership::Membership;
use super::NodeMsg;
use crate::metrics::PeerMetrics;
use crate::proto::metastorepb::{
    peer_client::PeerClient, MembersRequest, RaftEnvelope, SnapshotChunk,
};

/// Messages queued per peer before new ones are dropped (raft-rs's `max_inflight_msgs` is 256
/// appends; heartbeats and votes come on top).
const QUEUE: usize = 4096;
/// Upper bound on one envelope, bytes.
const MAX_ENVELOPE_BYTES: usize = 8 * 1024 * 1024;
/// Largest envelope a peer accepts, bytes (a single entry can reach 4 MiB, and raft-rs always
/// sends at least one entry even past `max_size_per_msg`).
pub const MAX_PEER_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// Snapshot data per chunk on the `Peer/Snapshot` stream, bytes.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1024 * 1024;
/// How often a connected link probes its peer's round trip (etcd's `proberInterval`,
/// `ConnReadTimeout` - 1 s).
const PROBE_INTERVAL: Duration = Duration::from_secs(4);
/// How long a probe may take before it counts as lost (etcd's `ConnReadTimeout`).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the test fault hook does to the link between this member and one peer member. Each
/// direction is seen from this member: `Send` is what it sends to the peer, `Recv` what it
/// receives from it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LinkFault {
    /// Drop every message this member sends to the peer (a one-way cut).
    pub cut_send: bool,
    /// Drop every message this member receives from the peer (a one-way cut).
    pub cut_recv: bool,
    /// Hold every message back this long, in each direction, keeping the link's order: a
    /// round trip over the link (an append and its answer) is slowed by twice this.
    pub delay: Duration,
    /// Probability, 0 to 1, that each message is dropped, in each direction.
    pub loss: f64,
}

impl LinkFault {
    /// A cut in both directions (a partition: the original, bare-ID line of the file).
    pub const CUT: LinkFault = LinkFault {
        cut_send: true,
        cut_recv: true,
        delay: Duration::ZERO,
        loss: 0.0,
    };

    /// Whether this fault does nothing.
    pub fn is_none(&self) -> bool {
        *self == LinkFault::default()
    }

    /// Whether messages going `direction` are all dropped.
    pub fn cuts(&self, direction: Direction) -> bool {
        match direction {
            Direction::Send => self.cut_send,
            Direction::Recv => self.cut_recv,
        }
    }
}

impl std::fmt::Display for LinkFault {
    /// The fault in the words of the `METASTORE_TEST_FAULTS` file (see [`Faults`]).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut words = Vec::new();
        match (self.cut_send, self.cut_recv) {
            (true, true) => words.push("cut".to_string()),
            (true, false) => words.push("cut-send".into()),
            (false, true) => words.push("cut-recv".into()),
            (false, false) => {}
        }
        if !self.delay.is_zero() {
            words.push(format!("delay={}", self.delay.as_millis()));
        }
        if self.loss > 0.0 {
            words.push(format!("loss={}", self.loss * 100.0));
        }
        if words.is_empty() {
            words.push("none".into());
        }
        f.write_str(&words.join(" "))
    }
}

/// Which way a message crosses a link, seen from this member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From this member to the peer.
    Send,
    /// From the peer to this member.
    Recv,
}

/// Parses the `METASTORE_TEST_FAULTS` file (format on [`Faults`]): the faults per peer member
/// ID, lines for the same member merged, and one message per line that could not be
/// understood (such a line is skipped; the others still apply).
pub fn parse_faults(text: &str) -> (HashMap<u64, LinkFault>, Vec<String>) {
    let mut faults: HashMap<u64, LinkFault> = HashMap::new();
    let mut errors = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        let mut words = line.split_whitespace();
        let Some(id) = words.next() else {
            continue;
        };
        let bad = |why: String| format!("line {}: {line:?}: {why}", n + 1);
        let id = match u64::from_str_radix(id, 16) {
            Ok(id) => id,
            Err(_) => {
                errors.push(bad(format!("{id:?} is not a member ID in hex")));
                continue;
            }
        };
        let mut fault = *faults.get(&id).unwrap_or(&LinkFault::default());
        let mut words = words.peekable();
        // A bare ID is a cut both ways, as in the file's first format.
        if words.peek().is_none() {
            fault.cut_send = true;
            fault.cut_recv = true;
        }
        let mut ok = true;
        for word in words {
            let (name, value) = match word.split_once('=') {
                Some((name, value)) => (name, Some(value)),
                None => (word, None),
            };
            match (name, value) {
                ("cut", None) => {
                    fault.cut_send = true;
                    fault.cut_recv = true;
                }
                ("cut-send", None) => fault.cut_send = true,
                ("cut-recv", None) => fault.cut_recv = true,
                ("delay", Some(ms)) => match ms.parse::<u64>() {
                    Ok(ms) => fault.delay = Duration::from_millis(ms),
                    Err(_) => {
                        errors.push(bad(format!("delay={ms}: expected milliseconds")));
                        ok = false;
                    }
                },
                ("loss", Some(percent)) => match percent.parse::<f64>() {
                    Ok(p) if (0.0..=100.0).contains(&p) => fault.loss = p / 100.0,
                    _ => {
                        errors.push(bad(format!(
                            "loss={percent}: expected a percentage, 0 to 100"
                        )));
                        ok = false;
                    }
                },
                _ => {
                    errors.push(bad(format!(
                        "unknown fault {word:?} (expected cut, cut-send, cut-recv, delay=MS or loss=PERCENT)"
                    )));
                    ok = false;
                }
            }
        }
        if ok {
            faults.insert(id, fault);
        }
    }
    faults.retain(|_, f| !f.is_none());
    (faults, errors)
}

/// Peer links broken on purpose, for fault-injection tests, per peer member ID: cut both
/// ways (a network partition), cut one way (an asymmetric partition), slowed, or lossy. None
/// unless a test installs some: in process with [`Faults::set`] or [`Faults::block`], or, in a
/// binary built with the `failpoints` feature, through `METASTORE_TEST_FAULTS=<file>`, a file
/// re-read every 100 ms. Release builds have no file hook.
///
/// The file has one line per peer member, `#` starts a comment, and lines for the same member
/// add up:
///
/// ```text
/// 8e9e05c52164694d                    # bare ID: cut both ways (the original format)
/// 8e9e05c52164694d cut                # the same
/// 91bc3c398fb3c146 cut-send           # drop what this member sends to it
/// 91bc3c398fb3c146 cut-recv           # drop what this member receives from it
/// fd422379fda50e48 delay=150          # hold each message each way back 150 ms
/// fd422379fda50e48 loss=30            # drop each message each way with 30 % probability
/// ```
///
/// Several faults may share a line (`fd422379fda50e48 delay=100 loss=20`). An empty file heals
/// every link, including messages being held back by a delay, which then go at once. A line
/// that cannot be understood is logged and skipped.
///
/// Where each fault acts: cuts and loss of outgoing Raft messages in the per-peer send task
/// (counted in `etcd_network_peer_sent_failures_total`; a cut also reports the peer
/// unreachable to Raft, as a broken connection would), of incoming ones in the receiving peer
/// service; delays in a task per link and direction (see [`DelayLine`]), so that neither the
/// Raft thread nor other links wait. Snapshots are cut, lost and delayed as a whole. With no
/// fault set every check is one atomic load.
#[derive(Clone)]
pub struct Faults(Arc<FaultState>);

struct FaultState {
    /// Whether any link has a fault: the hot path's only check.
    active: AtomicBool,
    links: RwLock<HashMap<u64, LinkFault>>,
    /// Bumped on every change, to wake messages being held back (see [`Faults::hold`]).
    changed: watch::Sender<u64>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults(Arc::new(FaultState {
            active: AtomicBool::new(false),
            links: RwLock::new(HashMap::new()),
            changed: watch::channel(0).0,
        }))
    }
}

impl Faults {
    /// The faults for this process: none, and kept up to date from `METASTORE_TEST_FAULTS`
    /// on `runtime` when the binary has the `failpoints` feature.
    pub fn from_env(runtime: &tokio::runtime::Handle) -> Faults {
        let faults = Faults::default();
        let Some(path) = std::env::var_os("METASTORE_TEST_FAULTS") else {
            return faults;
        };
        #[cfg(feature = "failpoints")]
        faults.follow_file(std::path::PathBuf::from(path), runtime);
        #[cfg(not(feature = "failpoints"))]
        {
            let _ = (path, runtime);
            tracing::warn!(
                "METASTORE_TEST_FAULTS ignored: this binary was built without the failpoints feature"
            );
        }
        faults
    }

    #[cfg(feature = "failpoints")]
    fn follow_file(&self, path: std::path::PathBuf, runtime: &tokio::runtime::Handle) {
        let faults = self.clone();
        runtime.spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(100));
            let mut last_text = String::new();
            loop {
                every.tick().await;
                // A missing file is an empty one: nothing broken.
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                if text == last_text {
                    continue;
                }
                let (links, errors) = parse_faults(&text);
                for error in errors {
                    tracing::error!(file = %path.display(), %error, "test fault hook: line skipped");
                }
                // Logged either way: a test that wrote the file waits for this line.
                if !faults.set(links) {
                    tracing::info!(file = %path.display(), "test fault hook: peer link faults unchanged");
                }
                last_text = text;
            }
        });
    }

    /// Replaces every link's faults with `links` (empty: heals every link), waking messages
    /// being held back so that they go on the new delay. A change is logged. Whether anything
    /// changed.
    pub fn set(&self, mut links: HashMap<u64, LinkFault>) -> bool {
        links.retain(|_, f| !f.is_none());
        let mut current = self.0.links.write().unwrap();
        if *current == links {
            return false;
        }
        let mut shown: Vec<String> = links.iter().map(|(id, f)| format!("{id:x}: {f}")).collect();
        shown.sort();
        tracing::warn!(faults = ?shown, "test fault hook: peer link faults changed");
        self.0.active.store(!links.is_empty(), Ordering::Release);
        *current = links;
        drop(current);
        self.0.changed.send_modify(|generation| *generation += 1);
        true
    }

    /// Cuts traffic with exactly the members in `blocked`, both ways (empty: heals every
    /// link).
    pub fn block(&self, blocked: HashSet<u64>) {
        let _ = self.set(blocked.into_iter().map(|id| (id, LinkFault::CUT)).collect());
    }

    /// Whether any link has a fault (one atomic load).
    pub fn active(&self) -> bool {
        self.0.active.load(Ordering::Acquire)
    }

    /// The fault on the link with member `peer`, if any.
    pub fn link(&self, peer: u64) -> Option<LinkFault> {
        if !self.active() {
            return None;
        }
        self.0.links.read().unwrap().get(&peer).copied()
    }

    /// Whether traffic with member `peer` is cut either way (no round trip can succeed).
    pub fn blocks(&self, peer: u64) -> bool {
        self.link(peer).is_some_and(|f| f.cut_send || f.cut_recv)
    }

    /// Whether every message `direction` on the link with `peer` is dropped.
    pub fn cuts(&self, peer: u64, direction: Direction) -> bool {
        self.link(peer).is_some_and(|f| f.cuts(direction))
    }

    /// Whether one message on the link with `peer` is lost to the link's random loss (a fresh
    /// draw on each call; the loss is the same both ways).
    pub fn loses(&self, peer: u64) -> bool {
        self.link(peer)
            .is_some_and(|f| f.loss > 0.0 && rand::random::<f64>() < f.loss)
    }

    /// How long each message on the link with `peer` is held back (zero: not at all).
    pub fn delay(&self, peer: u64) -> Duration {
        self.link(peer).map_or(Duration::ZERO, |f| f.delay)
    }

    /// Waits until a message that reached the link with `peer` at `since` has been held back
    /// for the link's delay. The delay is looked up again whenever the faults change, so a
    /// heal lets it go at once.
    pub async fn hold(&self, peer: u64, since: Instant) {
        let mut changed = self.0.changed.subscribe();
        loop {
            let due = since + self.delay(peer);
            if Instant::now() >= due {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(due.into()) => {}
                // The sender lives as long as `self`: this never fails.
                _ = changed.changed() => {}
            }
        }
    }
}

/// Messages held back by a link's delay ([`Faults::delay`]), in order: a task takes them in
/// arrival order, waits until each has been held for the delay ([`Faults::hold`]), and hands
/// it on. Once a message is in the line, later ones on the same link must follow it (even if
/// the delay has been lifted meanwhile) to keep the link's order: see [`DelayLine::busy`].
/// The task ends when the line is dropped and every message in it has been handed on.
pub struct DelayLine<T> {
    line: mpsc::UnboundedSender<(Instant, T)>,
    /// Messages in the line, not handed on yet.
    pending: Arc<AtomicUsize>,
}

impl<T: Send + 'static> DelayLine<T> {
    /// A line for the link with `peer`, on `runtime`, handing messages to `deliver`.
    pub fn spawn(
        runtime: &tokio::runtime::Handle,
        faults: Faults,
        peer: u64,
        mut deliver: impl FnMut(T) + Send + 'static,
    ) -> Self {
        let (line, mut rx) = mpsc::unbounded_channel::<(Instant, T)>();
        let pending = Arc::new(AtomicUsize::new(0));
        let left = pending.clone();
        runtime.spawn(async move {
            while let Some((since, m)) = rx.recv().await {
                faults.hold(peer, since).await;
                deliver(m);
                // After delivery: a message that sees the line empty goes after this one.
                left.fetch_sub(1, Ordering::AcqRel);
            }
        });
        DelayLine { line, pending }
    }

    /// Whether messages are still in the line (a message on this link must then join it).
    pub fn busy(&self) -> bool {
        self.pending.load(Ordering::Acquire) > 0
    }

    /// Puts `m` at the end of the line, stamped now. False, and `m` dropped, when [`QUEUE`]
    /// messages are already held back (as a full send queue drops them).
    pub fn push(&self, m: T) -> bool {
        if self.pending.load(Ordering::Acquire) >= QUEUE {
            return false;
        }
        self.pending.fetch_add(1, Ordering::AcqRel);
        if self.line.send((Instant::now(), m)).is_err() {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }
}

struct PeerLink {
    urls: Vec<String>,
    metrics: PeerMetrics,
    queue: mpsc::Sender<Message>,
    task: tokio::task::JoinHandle<()>,
    /// The snapshot being sent to this member, if any.
    snapshot: Option<tokio::task::JoinHandle<()>>,
    /// Messages held back by the fault hook's delay on this link, made when first needed.
    delayed: Option<DelayLine<Message>>,
}

impl Drop for PeerLink {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(snapshot) = &self.snapshot {
            snapshot.abort();
        }
    }
}

/// How the Raft thread reaches the other members: [`Transport`] over gRPC in a running
/// member; tests install an in-process network instead (see `tests/consensus/`). Both calls
/// come from the Raft thread and must not block it.
pub trait PeerTransport: Send {
    /// Follows the membership table: a link per other member, rebuilt when its peer URLs
    /// change, dropped when it leaves.
    fn set_peers(&mut self, membership: &Membership);

    /// Hands messages to their members without waiting. Returns the members whose messages
    /// could not be queued: Raft should treat them as unreachable (raft-rs
    /// `report_unreachable`). How a `MsgSnapshot` went is reported to the Raft node as
    /// [`NodeMsg::SnapshotSent`].
    fn send(&mut self, messages: Vec<Message>) -> Vec<(u64, MessageType)>;
}

impl PeerTransport for Transport {
    fn set_peers(&mut self, membership: &Membership) {
        Transport::set_peers(self, membership);
    }

    fn send(&mut self, messages: Vec<Message>) -> Vec<(u64, MessageType)> {
        Transport::send(self, messages)
    }
}

/// The sending side of the peer transport over gRPC, owned by the Raft thread.
pub struct Transport {
    self_id: u64,
    cluster_id: u64,
    runtime: tokio::runtime::Handle,
    links: HashMap<u64, PeerLink>,
    faults: Faults,
    node: flume::Sender<NodeMsg>,
}

impl Transport {
    /// A transport for member `self_id` of `cluster_id`, running its peer tasks on `runtime`
    /// and reporting failed links to the Raft node through `node`.
    pub fn new(
        self_id: u64,
        cluster_id: u64,
        runtime: tokio::runtime::Handle,
        faults: Faults,
        node: flume::Sender<NodeMsg>,
    ) -> Self {
        Transport {
            self_id,
            cluster_id,
            runtime,
            links: HashMap::new(),
            faults,
            node,
        }
    }

    /// Follows the membership table: a link per other member, rebuilt when its peer URLs
    /// change, dropped when it leaves.
    pub fn set_peers(&mut self, membership: &Membership) {
        self.links.retain(|id, link| {
            membership
                .members
                .get(id)
                .is_some_and(|m| m.peer_urls == link.urls)
        });
        for m in membership.members.values() {
            if m.id == self.self_id || self.links.contains_key(&m.id) || m.peer_urls.is_empty() {
                continue;
            }
            let (queue, rx) = mpsc::channel(QUEUE);
            let metrics = PeerMetrics::to(m.id);
            let task = self
                .runtime
                .spawn(run_link(self.link_config(m.id, &m.peer_urls, &metrics), rx));
            self.links.insert(
                m.id,
                PeerLink {
                    urls: m.peer_urls.clone(),
                    metrics,
                    queue,
                    task,
                    snapshot: None,
                    delayed: None,
                },
            );
        }
    }

    fn link_config(&self, to: u64, urls: &[String], metrics: &PeerMetrics) -> LinkConfig {
        LinkConfig {
            from: self.self_id,
            to,
            cluster_id: self.cluster_id,
            urls: urls.to_vec(),
            faults: self.faults.clone(),
            node: self.node.clone(),
            metrics: metrics.clone(),
        }
    }

    /// Queues messages for their peers without waiting; a snapshot starts its own stream.
    /// Returns the members whose messages could not be queued (no link, or the queue is
    /// full): Raft should treat them as unreachable.
    pub fn send(&mut self, messages: Vec<Message>) -> Vec<(u64, MessageType)> {
        let mut failed = Vec::new();
        for m in messages {
            let (to, ty) = (m.to, m.get_msg_type());
            if ty == MessageType::MsgSnapshot && self.links.contains_key(&to) {
                let link = &self.links[&to];
                let cfg = self.link_config(to, &link.urls, &link.metrics);
                let task = self.runtime.spawn(send_snapshot(cfg, m));
                let link = self.links.get_mut(&to).expect("checked");
                // raft-rs sends one snapshot at a time per member; a new one supersedes.
                if let Some(old) = link.snapshot.replace(task) {
                    old.abort();
                }
                continue;
            }
            let queued = match self.links.get_mut(&to) {
                // One atomic load when no fault is set.
                Some(link)
                    if self.faults.active()
                        || link.delayed.as_ref().is_some_and(DelayLine::busy) =>
                {
                    send_faulty(&self.runtime, &self.faults, &self.node, to, link, m)
                }
                Some(link) => {
                    let queued = link.queue.try_send(m).is_ok();
                    if !queued {
                        link.metrics.sent_failures.inc();
                    }
                    queued
                }
                // etcd ignores a message to an unknown member without counting a failure.
                None => false,
            };
            if !queued {
                failed.push((to, ty));
            }
        }
        failed
    }
}

/// [`Transport::send`] of `m` to member `to` over `link` while the fault hook is active or
/// messages are held back on the link: through the link's delay line when the link is slowed
/// or the line still holds messages (their order is kept), else straight to the queue. False
/// when the message could not be queued. Cuts and loss act later, in the link's task.
fn send_faulty(
    runtime: &tokio::runtime::Handle,
    faults: &Faults,
    node: &flume::Sender<NodeMsg>,
    to: u64,
    link: &mut PeerLink,
    m: Message,
) -> bool {
    let held = link.delayed.as_ref().is_some_and(DelayLine::busy);
    let queued = if held || !faults.delay(to).is_zero() {
        let line = link.delayed.get_or_insert_with(|| {
            let (queue, metrics, node) = (link.queue.clone(), link.metrics.clone(), node.clone());
            DelayLine::spawn(runtime, faults.clone(), to, move |m: Message| {
                // Full queue: dropped as Transport::send drops, and Raft told likewise.
                if queue.try_send(m).is_err() {
                    metrics.sent_failures.inc();
                    let _ = node.try_send(NodeMsg::Unreachable(to));
                }
            })
        });
        line.push(m)
    } else {
        link.queue.try_send(m).is_ok()
    };
    if !queued {
        link.metrics.sent_failures.inc();
    }
    queued
}

/// Streams one MsgSnapshot to `cfg.to` and tells Raft how it ended.
async fn send_snapshot(cfg: LinkConfig, mut m: Message) {
    let data = std::mem::take(&mut m.mut_snapshot().data);
    let bytes = data.len() as u64;
    let index = m.get_snapshot().get_metadata().index;
    tracing::info!(peer = %format!("{:x}", cfg.to), index, bytes = data.len(), "sending snapshot");
    let result = stream_snapshot(&cfg, &m, data).await;
    if result.is_ok() {
        cfg.metrics
            .sent_bytes
            .inc_by(bytes + m.compute_size() as u64);
    } else {
        cfg.metrics.sent_failures.inc();
    }
    match &result {
        Ok(()) => tracing::info!(peer = %format!("{:x}", cfg.to), index, "snapshot sent"),
        Err(e) => {
            tracing::warn!(peer = %format!("{:x}", cfg.to), index, error = %e, "sending snapshot failed")
        }
    }
    let ok = result.is_ok();
    // Awaited, not dropped: Raft holds the member in snapshot state until it hears.
    let _ = cfg
        .node
        .send_async(NodeMsg::SnapshotSent { to: cfg.to, ok })
        .await;
}

async fn stream_snapshot(cfg: &LinkConfig, m: &Message, data: bytes::Bytes) -> Result<(), String> {
    if cfg.faults.active() {
        // The snapshot is one message to the fault hook: held back, then cut or lost whole.
        cfg.faults.hold(cfg.to, Instant::now()).await;
        if cfg.faults.cuts(cfg.to, Direction::Send) {
            return Err("link cut by the test fault hook".into());
        }
        if cfg.faults.loses(cfg.to) {
            return Err("snapshot lost by the test fault hook".into());
        }
    }
    let channel = connect(&cfg.urls, Duration::from_secs(1)).await?;
    let mut client = PeerClient::new(channel)
        .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES)
        .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES);
    let total = data.len();
    let mut header = Some(SnapshotChunk {
        cluster_id: cfg.cluster_id,
        from: cfg.from,
        to: cfg.to,
        message: m.write_to_bytes().expect("raft message encodes"),
        total_bytes: total as u64,
        data: Vec::new(),
    });
    let faults = cfg.faults.clone();
    let to = cfg.to;
    // Chunks are cut lazily, as the stream is polled: at most a window's worth is in memory
    // besides the snapshot itself. A link cut midway ends the stream short; the receiver then
    // refuses it.
    let chunks = (0..total.div_ceil(SNAPSHOT_CHUNK_BYTES).max(1)).map_while(move |i| {
        if faults.cuts(to, Direction::Send) {
            return None;
        }
        let piece = &data
            [(i * SNAPSHOT_CHUNK_BYTES).min(total)..((i + 1) * SNAPSHOT_CHUNK_BYTES).min(total)];
        let mut chunk = header.take().unwrap_or_default();
        chunk.data = piece.to_vec();
        Some(chunk)
    });
    client
        .snapshot(tokio_stream::iter(chunks))
        .await
        .map(|_| ())
        .map_err(|status| status.message().to_string())
}

struct LinkConfig {
    from: u64,
    to: u64,
    cluster_id: u64,
    urls: Vec<String>,
    faults: Faults,
    node: flume::Sender<NodeMsg>,
    metrics: PeerMetrics,
}

/// Dials the first of `urls` that answers. Errors: the last URL's failure, in etcd's words
/// ([`crate::tls::go_tls_error`]).
async fn connect(urls: &[String], timeout: Duration) -> Result<tonic::transport::Channel, String> {
    let mut last = "no peer URL".to_string();
    for url in urls {
        // `https://` peers are dialed with the peer TLS client configuration.
        let channel = crate::net::connect_peer(url, |endpoint| {
            endpoint
                .connect_timeout(timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(5))
        })
        .await;
        match channel {
            Ok(channel) => return Ok(channel),
            Err(e) => {
                last = crate::tls::go_tls_error(&e);
                tracing::debug!(url, error = %last, "cannot connect to peer");
            }
        }
    }
    Err(last)
}

/// Whether a peer at one of `urls` accepts a connection within `timeout` (etcd counts such a
/// peer among `transport.ActivePeers`). The connection is closed again.
pub async fn reachable(urls: &[String], timeout: Duration) -> bool {
    tokio::time::timeout(timeout, connect(urls, timeout))
        .await
        .is_ok_and(|connected| connected.is_ok())
}

/// One remote member's link: connect lazily, stream batches, reconnect with backoff.
async fn run_link(cfg: LinkConfig, mut queue: mpsc::Receiver<Message>) {
    let mut backoff = Duration::from_millis(50);
    let mut logged_down = false;
    // The last link error logged, so that a peer failing the same way is logged once.
    let mut last_error: Option<String> = None;
    'connect: loop {
        let Some(first) = queue.recv().await else {
            return;
        };
        let channel = match connect(&cfg.urls, Duration::from_secs(1)).await {
            Ok(channel) => channel,
            Err(error) => {
                if !logged_down {
                    tracing::warn!(peer = %format!("{:x}", cfg.to), urls = ?cfg.urls, %error, "cannot reach peer");
                    logged_down = true;
                }
                drop(first);
                let mut dropped = 1;
                while queue.try_recv().is_ok() {
                    dropped += 1;
                }
                cfg.metrics.sent_failures.inc_by(dropped);
                let _ = cfg.node.try_send(NodeMsg::Unreachable(cfg.to));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        if logged_down {
            tracing::info!(peer = %format!("{:x}", cfg.to), "peer reachable again");
            logged_down = false;
        }
        backoff = Duration::from_millis(50);
        // Ended with this connection (dropped on `continue 'connect`, return, or abort).
        let _probe = AbortOnDrop(tokio::spawn(probe(
            channel.clone(),
            cfg.to,
            cfg.faults.clone(),
            cfg.metrics.round_trip.clone(),
        )));
        let (stream_tx, stream_rx) = mpsc::channel::<RaftEnvelope>(16);
        let mut client = PeerClient::new(channel)
            .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES)
            .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES);
        let mut call = tokio::spawn(async move {
            client
                .raft(tokio_stream::wrappers::ReceiverStream::new(stream_rx))
                .await
        });
        let mut next = Some(first);
        loop {
            let first = match next.take() {
                Some(m) => m,
                None => tokio::select! {
                    m = queue.recv() => match m {
                        Some(m) => m,
                        None => return,
                    },
                    ended = &mut call => {
                        report_call_end(&cfg, ended, &mut last_error);
                        continue 'connect;
                    }
                },
            };
            let mut batch = vec![first];
            let mut bytes = 0;
            while bytes < MAX_ENVELOPE_BYTES {
                match queue.try_recv() {
                    Ok(m) => {
                        bytes += m.compute_size() as usize;
                        batch.push(m);
                    }
                    Err(_) => break,
                }
            }
            if cfg.faults.active() {
                if cfg.faults.cuts(cfg.to, Direction::Send) {
                    cfg.metrics.sent_failures.inc_by(batch.len() as u64);
                    let _ = cfg.node.try_send(NodeMsg::Unreachable(cfg.to));
                    continue;
                }
                // Lost on the way: counted, but Raft is not told (it finds out, as from a
                // real network, by the missing answers).
                let before = batch.len();
                batch.retain(|_| !cfg.faults.loses(cfg.to));
                cfg.metrics
                    .sent_failures
                    .inc_by((before - batch.len()) as u64);
                if batch.is_empty() {
                    continue;
                }
            }
            let envelope = RaftEnvelope {
                messages: batch
                    .iter()
                    .map(|m| m.write_to_bytes().expect("raft message encodes"))
                    .collect(),
                cluster_id: cfg.cluster_id,
                from: cfg.from,
                to: cfg.to,
            };
            let sent_bytes: usize = envelope.messages.iter().map(Vec::len).sum();
            if stream_tx.send(envelope).await.is_ok() {
                cfg.metrics.sent_bytes.inc_by(sent_bytes as u64);
            } else {
                cfg.metrics.sent_failures.inc_by(batch.len() as u64);
                // The call ended; its result says why.
                report_call_end(&cfg, (&mut call).await, &mut last_error);
                continue 'connect;
            }
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Times a `Peer/Members` call to member `to` on `channel` now and every [`PROBE_INTERVAL`],
/// into `round_trip` (seconds); probes that fail or time out are not observed, and none are
/// made while the fault hook cuts the link.
async fn probe(
    channel: tonic::transport::Channel,
    to: u64,
    faults: Faults,
    round_trip: prometheus::Histogram,
) {
    let mut client = PeerClient::new(channel);
    let mut every = tokio::time::interval(PROBE_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if faults.blocks(to) {
            continue;
        }
        let started = std::time::Instant::now();
        let answered = tokio::time::timeout(PROBE_TIMEOUT, client.members(MembersRequest {})).await;
        if matches!(answered, Ok(Ok(_))) {
            round_trip.observe(started.elapsed().as_secs_f64());
        }
    }
}

fn report_call_end(
    cfg: &LinkConfig,
    ended: Result<
        Result<tonic::Response<crate::proto::metastorepb::RaftAck>, tonic::Status>,
        tokio::task::JoinError,
    >,
    last_error: &mut Option<String>,
) {
    let _ = cfg.node.try_send(NodeMsg::Unreachable(cfg.to));
    match ended {
        Ok(Err(status)) if status.code() == tonic::Code::FailedPrecondition => {
            tracing::error!(peer = %format!("{:x}", cfg.to), error = %status.message(), "peer refused our Raft traffic");
            if status.message() == crate::error::EtcdError::MemberRemoved.to_string() {
                let _ = cfg.node.try_send(NodeMsg::RemovedByPeer);
            }
        }
        Ok(Err(status)) => {
            // A TLS peer that refuses our certificate does so after a TLS 1.3 handshake has
            // completed on our side: its alert ends the stream, not the dial.
            let error = crate::tls::go_tls_error(&status);
            if last_error.as_deref() != Some(error.as_str()) {
                tracing::warn!(peer = %format!("{:x}", cfg.to), %error, "lost the Raft stream to peer");
                *last_error = Some(error);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> HashMap<u64, LinkFault> {
        let (faults, errors) = parse_faults(text);
        assert!(errors.is_empty(), "{errors:?}");
        faults
    }

    #[test]
    fn a_bare_id_is_a_cut_both_ways_as_before() {
        // The original format: member IDs in hex, one per line.
        let faults = parsed("8e9e05c52164694d\n91bc3c398fb3c146\n");
        assert_eq!(faults.len(), 2);
        assert_eq!(faults[&0x8e9e05c52164694d], LinkFault::CUT);
        assert_eq!(faults[&0x91bc3c398fb3c146], LinkFault::CUT);
        assert_eq!(parsed("  ab  \n"), parsed("ab cut"));
        assert!(parsed("").is_empty());
        assert!(parsed("\n  \n# nothing\n").is_empty());
    }

    #[test]
    fn each_fault_word_parses() {
        let f = parsed("a cut-send\nb cut-recv\nc delay=150\nd loss=30\ne loss=2.5 # comment");
        let cut_send = LinkFault {
            cut_send: true,
            ..LinkFault::default()
        };
        let cut_recv = LinkFault {
            cut_recv: true,
            ..LinkFault::default()
        };
        assert_eq!(f[&0xa], cut_send);
        assert_eq!(f[&0xb], cut_recv);
        assert_eq!(f[&0xc].delay, Duration::from_millis(150));
        assert!(!f[&0xc].cut_send && !f[&0xc].cut_recv && f[&0xc].loss == 0.0);
        assert!((f[&0xd].loss - 0.30).abs() < 1e-12);
        assert!((f[&0xe].loss - 0.025).abs() < 1e-12);
    }

    #[test]
    fn faults_on_one_line_or_on_several_lines_add_up() {
        let one = parsed("f delay=100 loss=20 cut-send");
        let several = parsed("f delay=100\nf loss=20\n# and\nf cut-send\n");
        assert_eq!(one, several);
        assert_eq!(
            one[&0xf],
            LinkFault {
                cut_send: true,
                cut_recv: false,
                delay: Duration::from_millis(100),
                loss: 0.2,
            }
        );
        // Both one-way cuts make a full cut.
        assert_eq!(parsed("f cut-send\nf cut-recv")[&0xf], LinkFault::CUT);
    }

    #[test]
    fn a_fault_that_does_nothing_is_no_fault() {
        assert!(parsed("f delay=0 loss=0").is_empty());
    }

    #[test]
    fn a_bad_line_is_reported_and_skipped_and_the_others_apply() {
        let (faults, errors) = parse_faults(
            "zz cut\nab delay=fast\nac loss=101\nad loss=-1\nae slow\naf delay\nb0 cut-recv\n",
        );
        assert_eq!(faults.len(), 1, "{faults:?}");
        assert!(faults[&0xb0].cut_recv);
        assert_eq!(errors.len(), 6, "{errors:?}");
        assert!(errors[0].starts_with("line 1:") && errors[0].contains("not a member ID"));
        assert!(errors[1].contains("expected milliseconds"), "{}", errors[1]);
        assert!(errors[2].contains("0 to 100") && errors[3].contains("0 to 100"));
        assert!(
            errors[4].contains("unknown fault \"slow\""),
            "{}",
            errors[4]
        );
        assert!(errors[5].starts_with("line 6:"), "{}", errors[5]);
    }

    #[test]
    fn a_fault_prints_as_the_file_spells_it() {
        let faults = [
            LinkFault::CUT,
            LinkFault {
                cut_recv: true,
                delay: Duration::from_millis(250),
                ..LinkFault::default()
            },
            LinkFault {
                cut_send: true,
                loss: 0.4,
                ..LinkFault::default()
            },
        ];
        for f in faults {
            assert_eq!(parsed(&format!("1 {f}"))[&1], f, "{f}");
        }
        assert_eq!(LinkFault::default().to_string(), "none");
    }

    #[test]
    fn the_checks_follow_the_faults_set() {
        let faults = Faults::default();
        assert!(!faults.active());
        assert!(!faults.blocks(1) && !faults.cuts(1, Direction::Send) && !faults.loses(1));
        faults.set(parsed("1 cut-send\n2 cut-recv delay=40\n3 loss=100\n"));
        assert!(faults.active());
        assert!(faults.cuts(1, Direction::Send) && !faults.cuts(1, Direction::Recv));
        assert!(faults.cuts(2, Direction::Recv) && !faults.cuts(2, Direction::Send));
        // Either one-way cut blocks a round trip.
        assert!(faults.blocks(1) && faults.blocks(2) && !faults.blocks(3));
        assert_eq!(faults.delay(2), Duration::from_millis(40));
        assert_eq!(faults.delay(1), Duration::ZERO);
        assert!((0..100).all(|_| faults.loses(3)));
        assert!((0..100).all(|_| !faults.loses(1)));
        assert_eq!(faults.link(4), None);
        // The original in-process API: full cuts.
        faults.block(HashSet::from([5]));
        assert_eq!(faults.link(5), Some(LinkFault::CUT));
        assert_eq!(faults.link(1), None);
        faults.set(HashMap::new());
        assert!(!faults.active() && !faults.blocks(5));
    }

    #[test]
    fn random_loss_drops_about_its_share() {
        let faults = Faults::default();
        faults.set(parsed("7 loss=50"));
        let lost = (0..2000).filter(|_| faults.loses(7)).count();
        // Binomial(2000, 0.5): 1000 ± 22 (one standard deviation); ±250 is 11 of them.
        assert!((750..=1250).contains(&lost), "{lost} of 2000 lost");
    }

    #[tokio::test]
    async fn a_delay_line_holds_messages_back_in_order_and_a_heal_lets_them_go() {
        let faults = Faults::default();
        faults.set(parsed("9 delay=60"));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let line = DelayLine::spawn(
            &tokio::runtime::Handle::current(),
            faults.clone(),
            9,
            move |m: (usize, Instant)| {
                let _ = tx.send((m.0, m.1.elapsed()));
            },
        );
        for n in 0..50 {
            assert!(line.push((n, Instant::now())));
        }
        assert!(line.busy());
        for n in 0..50 {
            let (got, held) = rx.recv().await.expect("delivered");
            assert_eq!(got, n, "out of order");
            assert!(held >= Duration::from_millis(60), "held only {held:?}");
        }
        tokio::time::timeout(Duration::from_secs(5), async {
            while line.busy() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the line empties");

        // A long delay, then a heal: what is held goes at once, in order.
        faults.set(parsed("9 delay=600000"));
        let started = Instant::now();
        for n in 0..3 {
            assert!(line.push((n, Instant::now())));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(rx.try_recv().is_err(), "delivered before the delay");
        faults.set(HashMap::new());
        for n in 0..3 {
            let (got, _) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .expect("a heal releases held messages")
                .expect("delivered");
            assert_eq!(got, n);
        }
        assert!(started.elapsed() < Duration::from_secs(60));
    }

    #[tokio::test]
    async fn hold_waits_for_the_delay_of_the_moment() {
        let faults = Faults::default();
        let started = Instant::now();
        faults.hold(3, started).await;
        faults.set(parsed("3 delay=80"));
        let started = Instant::now();
        faults.hold(3, started).await;
        assert!(started.elapsed() >= Duration::from_millis(80));
        // A message that has already waited longer than the delay goes at once.
        let long_ago = Instant::now() - Duration::from_secs(1);
        let started = Instant::now();
        faults.hold(3, long_ago).await;
        assert!(started.elapsed() < Duration::from_millis(80));
    }
}
