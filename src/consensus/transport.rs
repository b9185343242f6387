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
//! (queue full, peer not dialable, stream broken, link cut by the fault hook) and every failed
//! snapshot counts in `etcd_network_peer_sent_failures_total`. The Raft stream is one-way (its
//! only answer comes when it ends), so there is no per-batch acknowledgement to time: as etcd
//! probes its peers, a connected link calls the cheap unary `Peer/Members` on the same HTTP/2
//! connection when it connects and every [`PROBE_INTERVAL`], and each answered probe's time
//! goes to `etcd_network_peer_round_trip_time_seconds`. A link connects when it has something
//! to send: a leader probes every member, a follower the leader.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use tokio::sync::mpsc;

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

/// Peer links cut on purpose, for fault-injection tests: traffic to and from the blocked
/// members is dropped in both directions, as a network partition would. Empty (nothing ever
/// blocked) unless a test installs a set: in process with [`Faults::block`], or, in a binary
/// built with the `failpoints` feature, through `METASTORE_TEST_FAULTS=<file>`, a file of
/// member IDs (hex, one per line) re-read every 100 ms. Release builds have no file hook.
#[derive(Clone, Default)]
pub struct Faults(Arc<RwLock<HashSet<u64>>>);

impl Faults {
    /// The fault set for this process: empty, and kept up to date from
    /// `METASTORE_TEST_FAULTS` on `runtime` when the binary has the `failpoints` feature.
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
            loop {
                every.tick().await;
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let blocked: HashSet<u64> = text
                    .lines()
                    .filter_map(|l| u64::from_str_radix(l.trim(), 16).ok())
                    .collect();
                faults.block(blocked);
            }
        });
    }

    /// Cuts traffic with exactly the members in `blocked` (empty: heals every link).
    pub fn block(&self, blocked: HashSet<u64>) {
        let mut current = self.0.write().unwrap();
        if *current != blocked {
            tracing::warn!(blocked = ?blocked.iter().map(|id| format!("{id:x}")).collect::<Vec<_>>(),
                "test fault hook: peer links cut");
            *current = blocked;
        }
    }

    /// Whether traffic with member `id` is cut.
    pub fn blocks(&self, id: u64) -> bool {
        let set = self.0.read().unwrap();
        !set.is_empty() && set.contains(&id)
    }
}

struct PeerLink {
    urls: Vec<String>,
    metrics: PeerMetrics,
    queue: mpsc::Sender<Message>,
    task: tokio::task::JoinHandle<()>,
    /// The snapshot being sent to this member, if any.
    snapshot: Option<tokio::task::JoinHandle<()>>,
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
            let queued = match self.links.get(&to) {
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
    if cfg.faults.blocks(cfg.to) {
        return Err("link cut by the test fault hook".into());
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
        if faults.blocks(to) {
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
            if cfg.faults.blocks(cfg.to) {
                cfg.metrics.sent_failures.inc_by(batch.len() as u64);
                let _ = cfg.node.try_send(NodeMsg::Unreachable(cfg.to));
                continue;
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
