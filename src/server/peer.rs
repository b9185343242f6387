//! `metastorepb.Peer` on `--listen-peer-urls`: Raft traffic from other members, and the
//! membership table for members joining with `--initial-cluster-state existing`.

use std::sync::Arc;
use std::time::Duration;

use protobuf::Message as _;
use raft::prelude::Message;
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use super::{Core, Leases, Members, Reader};
use crate::consensus::transport::{DelayLine, Direction, Faults};
use crate::consensus::{NodeMsg, PeerProgress};
use crate::error::EtcdError;
use crate::proto::etcdserverpb::{
    HashKvRequest, HashKvResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use crate::proto::metastorepb::{
    peer_client::PeerClient, peer_server::Peer, MemberProgress, MemberRecord, MembersRequest,
    MembersResponse, ProgressRequest, ProgressResponse, RaftAck, RaftEnvelope, SnapshotAck,
    SnapshotChunk, StateSnapshot,
};
use crate::state_machine::Membership;

/// The Peer service.
pub struct PeerService {
    reader: Reader,
    leases: Leases,
    members: Members,
    member_id: u64,
    cluster_id: u64,
    node: flume::Sender<NodeMsg>,
    membership: watch::Receiver<Arc<Membership>>,
    faults: Faults,
}

impl PeerService {
    /// Serves `core`'s member, stepping Raft messages into its Raft node. `faults` cuts links
    /// in tests.
    pub fn new(core: &Core, faults: Faults) -> Self {
        PeerService {
            reader: core.reader.clone(),
            leases: core.leases.clone(),
            members: core.members.clone(),
            member_id: core.member.id,
            cluster_id: core.member.cluster_id,
            node: core.node.tx.clone(),
            membership: core.node.membership.clone(),
            faults,
        }
    }

    /// Refuses traffic from another cluster, for another member, or from a removed member.
    fn check_sender(&self, cluster_id: u64, from: u64, to: u64) -> Result<(), Status> {
        if cluster_id != self.cluster_id {
            return Err(EtcdError::ClusterIdMismatch.into());
        }
        if to != self.member_id {
            return Err(EtcdError::MisdirectedPeerMessage {
                to,
                member: self.member_id,
            }
            .into());
        }
        if self.membership.borrow().removed.contains(&from) {
            return Err(EtcdError::MemberRemoved.into());
        }
        Ok(())
    }

    /// The fault hook's random loss and delay for message `m` from member `from`: `m` back
    /// when it is to be stepped now, `None` when it was lost or put in the link's delay line
    /// (which steps it into Raft once held back long enough). Once messages are held back,
    /// later ones follow them through the line, so the link keeps its order.
    fn hold_or_drop(
        &self,
        from: u64,
        m: Message,
        delayed: &mut Option<(u64, DelayLine<Message>)>,
    ) -> Option<Message> {
        if self.faults.loses(from) {
            return None;
        }
        let held = matches!(delayed, Some((peer, line)) if *peer == from && line.busy());
        if !held && self.faults.delay(from).is_zero() {
            return Some(m);
        }
        if !matches!(delayed, Some((peer, _)) if *peer == from) {
            let node = self.node.clone();
            let line = DelayLine::spawn(
                &tokio::runtime::Handle::current(),
                self.faults.clone(),
                from,
                move |m: Message| {
                    // A full inbox drops it, as for a message stepped at once.
                    let _ = node.try_send(NodeMsg::Step(m));
                },
            );
            *delayed = Some((from, line));
        }
        let (_, line) = delayed.as_ref().expect("made above");
        // A full line drops it (Raft retransmits).
        line.push(m);
        None
    }

    fn check_leader(&self) -> Result<(), Status> {
        if !self.members.is_leader() {
            return Err(EtcdError::NotLeader.into());
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
    /// Steps every message of every envelope into the Raft node, in order, counting their
    /// encoded bytes in `etcd_network_peer_received_bytes_total{From}`. A full inbox drops
    /// messages (Raft retransmits). Fails with "cluster ID mismatch" for another cluster's
    /// member and with the removed-member error for a member removed from this cluster, which
    /// makes that member stop.
    async fn raft(
        &self,
        request: Request<Streaming<RaftEnvelope>>,
    ) -> Result<Response<RaftAck>, Status> {
        let mut inbound = request.into_inner();
        // `etcd_network_peer_received_bytes_total` of the stream's sender, resolved once.
        let mut received: Option<(u64, prometheus::IntCounter)> = None;
        // Messages held back by the fault hook's delay on the sender's link, made when first
        // needed (keyed by the sender, which is one member per stream in practice).
        let mut delayed: Option<(u64, DelayLine<Message>)> = None;
        while let Some(envelope) = inbound.message().await? {
            self.check_sender(envelope.cluster_id, envelope.from, envelope.to)?;
            // One atomic load when no fault is set and nothing is held back.
            let faulty = self.faults.active() || delayed.is_some();
            if faulty && self.faults.cuts(envelope.from, Direction::Recv) {
                continue;
            }
            let counter = match &received {
                Some((from, counter)) if *from == envelope.from => counter,
                _ => {
                    let counter = crate::metrics::received_from(envelope.from);
                    &received.insert((envelope.from, counter)).1
                }
            };
            counter.inc_by(envelope.messages.iter().map(|m| m.len() as u64).sum());
            for bytes in envelope.messages {
                let mut m = Message::default();
                if m.merge_from_bytes(&bytes).is_err() {
                    return Err(EtcdError::UndecodableRaftMessage.into());
                }
                let m = match faulty {
                    true => match self.hold_or_drop(envelope.from, m, &mut delayed) {
                        Some(m) => m,
                        None => continue,
                    },
                    false => m,
                };
                if self.node.try_send(NodeMsg::Step(m)).is_err() && self.node.is_disconnected() {
                    return Err(EtcdError::Stopped.into());
                }
            }
        }
        Ok(Response::new(RaftAck {}))
    }

    /// Reassembles a snapshot from its chunks and steps it into the Raft node, which saves and
    /// installs it. Fails, and Raft on the leader retries later, when the stream ends short of
    /// `total_bytes` or the first chunk is not a MsgSnapshot.
    async fn snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<SnapshotAck>, Status> {
        let mut inbound = request.into_inner();
        let Some(first) = inbound.message().await? else {
            return Err(EtcdError::EmptySnapshotStream.into());
        };
        self.check_sender(first.cluster_id, first.from, first.to)?;
        let from = first.from;
        let mut m = Message::default();
        if m.merge_from_bytes(&first.message).is_err()
            || m.get_msg_type() != raft::prelude::MessageType::MsgSnapshot
        {
            return Err(EtcdError::NotASnapshot.into());
        }
        let total = first.total_bytes as usize;
        let mut data = first.data;
        data.reserve(total.saturating_sub(data.len()));
        while let Some(chunk) = inbound.message().await? {
            if self.faults.cuts(from, Direction::Recv) {
                return Err(EtcdError::LinkCut.into());
            }
            data.extend_from_slice(&chunk.data);
            if data.len() > total {
                return Err(EtcdError::SnapshotTooLong.into());
            }
        }
        if data.len() != total || self.faults.cuts(from, Direction::Recv) {
            return Err(EtcdError::SnapshotCutShort {
                got: data.len(),
                total,
            }
            .into());
        }
        let index = m.get_snapshot().get_metadata().index;
        // Checked here, where a bad one can be refused: once stepped, Raft resets the log to it.
        match <StateSnapshot as prost::Message>::decode(data.as_slice()) {
            Ok(s) if s.complete && s.index == index => {}
            _ => return Err(EtcdError::SnapshotIncomplete.into()),
        }
        if self.faults.active() {
            // The snapshot is one message to the fault hook: held back, then cut or lost whole.
            self.faults.hold(from, std::time::Instant::now()).await;
            if self.faults.cuts(from, Direction::Recv) || self.faults.loses(from) {
                return Err(EtcdError::LinkCut.into());
            }
        }
        tracing::info!(peer = %format!("{from:x}"), bytes = total, index, "received snapshot");
        crate::metrics::received_from(from).inc_by((total + first.message.len()) as u64);
        m.mut_snapshot().data = data.into();
        // Awaited rather than dropped when the inbox is full: a snapshot is costly to resend.
        self.node
            .send_async(NodeMsg::Step(m))
            .await
            .map_err(|_| EtcdError::Stopped)?;
        Ok(Response::new(SnapshotAck {}))
    }

    async fn progress(
        &self,
        _: Request<ProgressRequest>,
    ) -> Result<Response<ProgressResponse>, Status> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.node
            .send_async(NodeMsg::Progress(reply))
            .await
            .map_err(|_| EtcdError::Stopped)?;
        let progress = rx.await.map_err(|_| EtcdError::Stopped)?;
        Ok(Response::new(ProgressResponse {
            progress: progress
                .into_iter()
                .map(|p| MemberProgress {
                    id: p.id,
                    matched: p.matched,
                    connected_ms: p.connected_for.map_or(0, |d| {
                        u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
                    }),
                })
                .collect(),
        }))
    }

    async fn lease_renew(
        &self,
        request: Request<LeaseKeepAliveRequest>,
    ) -> Result<Response<LeaseKeepAliveResponse>, Status> {
        self.check_leader()?;
        let id = request.into_inner().id;
        let ttl = self.leases.renew_here(id);
        let revision = self.reader.applied().revision;
        Ok(Response::new(LeaseKeepAliveResponse {
            header: self.reader.header(revision),
            id,
            ttl,
        }))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        self.check_leader()?;
        let resp = self.leases.time_to_live(request.into_inner()).await?;
        Ok(Response::new(resp))
    }

    async fn hash_kv(
        &self,
        request: Request<HashKvRequest>,
    ) -> Result<Response<HashKvResponse>, Status> {
        let revision = request.into_inner().revision;
        Ok(Response::new(self.reader.hash_kv(revision).await?))
    }

    async fn members(
        &self,
        _: Request<MembersRequest>,
    ) -> Result<Response<MembersResponse>, Status> {
        Ok(Response::new(MembersResponse {
            cluster_id: self.cluster_id,
            members: self.membership.borrow().list(),
        }))
    }
}

/// Why a call to a peer's Peer service failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The peer URL cannot be dialed (its error and causes, unchanged).
    #[error(transparent)]
    Connect(#[from] crate::net::ConnectError),
    /// The call failed (the peer's status, or the transport's).
    #[error(transparent)]
    Call(#[from] Status),
    /// [`fetch_members`]: no peer URL answered; the text lists each URL's error.
    #[error("cannot fetch cluster info from peer urls: {0}")]
    NoClusterInfo(String),
}

/// A Peer client for one peer URL: `connect` bounds the dial, `request` each call.
pub(crate) async fn peer_client(
    url: &str,
    connect: Duration,
    request: Duration,
) -> Result<PeerClient<tonic::transport::Channel>, PeerError> {
    let channel = crate::net::connect_peer(url, |endpoint| {
        endpoint.connect_timeout(connect).timeout(request)
    })
    .await?;
    Ok(PeerClient::new(channel))
}

/// What a joining member learns from the cluster: the cluster ID and the members, asked of
/// each peer URL in turn (etcd `GetClusterFromRemotePeers`).
///
/// Errors: no peer answered.
pub async fn fetch_members(peer_urls: &[String]) -> Result<(u64, Vec<MemberRecord>), PeerError> {
    let mut errors = Vec::new();
    for url in peer_urls {
        let attempt = async {
            let mut client =
                peer_client(url, Duration::from_secs(2), Duration::from_secs(5)).await?;
            Ok::<_, PeerError>(client.members(MembersRequest {}).await?.into_inner())
        };
        match attempt.await {
            Ok(r) => return Ok((r.cluster_id, r.members)),
            Err(e) => errors.push(format!("{url}: {e}")),
        }
    }
    Err(PeerError::NoClusterInfo(errors.join("; ")))
}

/// The leader's view of every member's progress and contact, asked over the peer port at
/// `peer_urls`.
///
/// Errors: the leader cannot be reached (reported as "leader changed": the caller may retry).
pub async fn fetch_progress(peer_urls: &[String]) -> Result<Vec<PeerProgress>, EtcdError> {
    for url in peer_urls {
        let attempt = async {
            let mut client =
                peer_client(url, Duration::from_secs(1), Duration::from_secs(2)).await?;
            Ok::<_, PeerError>(client.progress(ProgressRequest {}).await?.into_inner())
        };
        if let Ok(r) = attempt.await {
            return Ok(r
                .progress
                .into_iter()
                .map(|p| PeerProgress {
                    id: p.id,
                    matched: p.matched,
                    connected_for: (p.connected_ms > 0)
                        .then(|| Duration::from_millis(p.connected_ms)),
                })
                .collect());
        }
    }
    Err(EtcdError::LeaderChanged)
}
