//! `etcdserverpb.Cluster`: the membership table and changes to it, with etcd's checks and
//! errors (etcd `v3rpc/member.go`, `etcdserver/server.go`, `membership/cluster.go`).
//!
//! Every change is proposed as a Raft conf change and answered once it is applied in log
//! order (see [`crate::state_machine::membership`]). Checks that depend on live state (is the
//! learner caught up, are enough members started) run on the member that receives the request,
//! as in etcd; checks that depend on the table run again at apply time on every member.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use tonic::transport::Channel;

use super::{Access, Core, Proposer, Reader};
use crate::consensus::{NodeMsg, NodeStatus, PeerProgress, RaftHandle};
use crate::error::EtcdError;
use crate::identity as member;
use crate::proto::etcdserverpb::{
    cluster_server::Cluster, Member, MemberAddRequest, MemberAddResponse, MemberListRequest,
    MemberListResponse, MemberPromoteRequest, MemberPromoteResponse, MemberRemoveRequest,
    MemberRemoveResponse, MemberUpdateRequest, MemberUpdateResponse, ResponseHeader,
};
use crate::proto::metastorepb::peer_client::PeerClient;
use crate::proto::metastorepb::{membership_change::Kind, MemberRecord, MembershipChange};
use crate::state_machine::ApplyResponse;
use crate::state_machine::Membership;

/// etcd's `readyPercent`: a learner may be promoted once its log matches 90% of the leader's.
const LEARNER_READY_PERCENT: f64 = 0.9;
/// etcd's `HealthInterval`: a member counts as connected once the leader has heard from it
/// without a break for this long.
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);

/// The Cluster service.
pub struct ClusterService {
    access: Access,
    members: Members,
    reader: Reader,
}

impl ClusterService {
    /// Serves Cluster with `core`'s handles.
    pub fn new(core: &Core) -> Self {
        ClusterService {
            access: core.access.clone(),
            members: core.members.clone(),
            reader: core.reader.clone(),
        }
    }
}

/// The membership table, changes to it, and the way to the leader (for what only the leader
/// can answer).
#[derive(Clone)]
pub struct Members(Arc<MembersState>);

struct MembersState {
    me: crate::identity::Member,
    node: RaftHandle,
    proposer: Proposer,
    reader: Reader,
    /// `--strict-reconfig-check`.
    strict_reconfig_check: bool,
    request_timeout: Duration,
    /// A Peer client to the current leader, for requests only the leader answers.
    leader_peer: tokio::sync::Mutex<Option<(u64, PeerClient<Channel>)>>,
}

fn to_member(m: &MemberRecord) -> Member {
    Member {
        id: m.id,
        name: m.name.clone(),
        peer_ur_ls: m.peer_urls.clone(),
        client_ur_ls: m.client_urls.clone(),
        is_learner: m.is_learner,
    }
}

/// etcd `types.NewURLs`: every URL parses, has a host and port, and is http(s).
///
/// Errors: [`EtcdError::MemberBadUrls`].
pub(crate) fn check_peer_urls(urls: &[String]) -> Result<Vec<String>, EtcdError> {
    if urls.is_empty() {
        return Err(EtcdError::MemberBadUrls);
    }
    let mut out = Vec::new();
    for u in urls {
        let url = url::Url::parse(u).map_err(|_| EtcdError::MemberBadUrls)?;
        let scheme_ok = matches!(url.scheme(), "http" | "https" | "unix" | "unixs");
        if !scheme_ok || url.host_str().is_none() || url.port().is_none() || url.path().len() > 1 {
            return Err(EtcdError::MemberBadUrls);
        }
        out.push(member::url_string(&url));
    }
    out.sort();
    Ok(out)
}

impl Members {
    /// The membership handle of member `me`: `node`'s table and status, changes proposed
    /// through `proposer`; `strict_reconfig_check` is etcd's `--strict-reconfig-check`.
    pub fn new(
        me: crate::identity::Member,
        node: RaftHandle,
        proposer: Proposer,
        reader: Reader,
        strict_reconfig_check: bool,
        request_timeout: Duration,
    ) -> Members {
        Members(Arc::new(MembersState {
            me,
            node,
            proposer,
            reader,
            strict_reconfig_check,
            request_timeout,
            leader_peer: Default::default(),
        }))
    }

    /// This member.
    pub fn me(&self) -> &crate::identity::Member {
        &self.0.me
    }

    /// The membership table as last applied.
    pub fn table(&self) -> Arc<Membership> {
        self.0.node.membership.borrow().clone()
    }

    /// The Raft node's term, leader and removal.
    pub fn status(&self) -> &NodeStatus {
        &self.0.node.status
    }

    /// Whether this member leads now.
    pub fn is_leader(&self) -> bool {
        self.status().leader.load(Ordering::Relaxed) == self.0.me.id
    }

    /// Proposes a membership change and waits until it is applied; returns the members after
    /// it.
    ///
    /// Errors: the table's (see [`crate::state_machine::Membership::validate`]), "no leader", and
    /// "request timed out" (also when another change was in flight and Raft dropped this one).
    pub async fn change_membership(
        &self,
        kind: Kind,
        member: MemberRecord,
    ) -> Result<Vec<MemberRecord>, EtcdError> {
        let id = self.0.proposer.next_id();
        let change = MembershipChange {
            kind: kind as i32,
            origin: self.0.me.id,
            proposal: id,
            member: Some(member),
        };
        match self
            .0
            .proposer
            .submit(id, NodeMsg::ChangeMembership { id, change })
            .await?
        {
            ApplyResponse::Members(members) => Ok(members),
            _ => Err(crate::error::unexpected_apply_result("a membership change")),
        }
    }

    /// The header and member list every Cluster response carries.
    pub fn members_reply(&self, members: &[MemberRecord]) -> (Option<ResponseHeader>, Vec<Member>) {
        // etcd's `ClusterServer.header()` (api/v3rpc/member.go) sets the cluster ID, member ID
        // and Raft term, not the revision.
        (
            self.0.reader.header(0),
            members.iter().map(to_member).collect(),
        )
    }

    /// etcd `IsReadyToAddVotingMember` / `IsReadyToRemoveVotingMember` /
    /// `IsReadyToPromoteMember`: the voters after the change that have started (published
    /// their name) must still form a quorum of the voters after it.
    pub fn check_started_quorum(
        &self,
        adding: usize,
        removing: Option<u64>,
    ) -> Result<(), EtcdError> {
        if !self.0.strict_reconfig_check {
            return Ok(());
        }
        let table = self.table();
        let voters: Vec<&MemberRecord> = table
            .members
            .values()
            .filter(|m| !m.is_learner && Some(m.id) != removing)
            .collect();
        let started = voters.iter().filter(|m| !m.name.is_empty()).count();
        let members = voters.len() + adding;
        // etcd lets a one-member cluster grow to two even though the new one has not started.
        if adding == 1 && started == 1 && members == 2 {
            return Ok(());
        }
        if started < members / 2 + 1 {
            return Err(EtcdError::NotEnoughStartedMembers);
        }
        Ok(())
    }

    /// etcd `isLearnerReady`, asked of the leader: a learner whose log matches less than 90%
    /// of the leader's cannot be promoted yet.
    pub async fn check_learner_ready(&self, id: u64) -> Result<(), EtcdError> {
        let (leader, progress) = self.leader_progress().await?;
        learner_ready(&progress, leader, id)
    }

    /// etcd `mayAddMember`'s connectivity check (with `--strict-reconfig-check`): every voter
    /// must have been in touch with the leader for [`HEALTH_INTERVAL`], or a change of the
    /// quorum could stall the cluster.
    ///
    /// Errors: "etcdserver: unhealthy cluster".
    async fn check_all_voters_connected(&self) -> Result<(), EtcdError> {
        if !self.0.strict_reconfig_check {
            return Ok(());
        }
        let (_, progress) = self.leader_progress().await?;
        let voters = self.table().voters();
        if connected_voters(&progress, &voters) < voters.len() {
            return Err(EtcdError::Unhealthy);
        }
        Ok(())
    }

    /// etcd `mayRemoveMember`'s connectivity check: removing a member the leader does not hear
    /// from is always safe; otherwise the connected voters left must still form a quorum.
    ///
    /// Errors: "etcdserver: unhealthy cluster".
    async fn check_removal_keeps_quorum(&self, id: u64) -> Result<(), EtcdError> {
        if !self.0.strict_reconfig_check {
            return Ok(());
        }
        let (leader, progress) = self.leader_progress().await?;
        let down = progress
            .iter()
            .find(|p| p.id == id)
            .is_none_or(|p| p.connected_for.is_none());
        if id != leader && down {
            return Ok(());
        }
        let voters = self.table().voters();
        let active = connected_voters(&progress, &voters);
        if active.saturating_sub(1) < 1 + (voters.len().saturating_sub(1)) / 2 {
            return Err(EtcdError::Unhealthy);
        }
        Ok(())
    }

    /// The leader's ID and its view of every member, asked over the peer port when another
    /// member leads.
    ///
    /// Errors: "no leader"; "leader changed" when the leader cannot be reached.
    async fn leader_progress(&self) -> Result<(u64, Vec<PeerProgress>), EtcdError> {
        let leader = self.status().leader.load(Ordering::Relaxed);
        if leader == 0 {
            return Err(EtcdError::NoLeader);
        }
        let progress = if leader == self.0.me.id {
            let (reply, rx) = tokio::sync::oneshot::channel();
            self.0
                .node
                .tx
                .send_async(NodeMsg::Progress(reply))
                .await
                .map_err(|_| EtcdError::Stopped)?;
            rx.await.map_err(|_| EtcdError::Stopped)?
        } else {
            let urls = self
                .table()
                .members
                .get(&leader)
                .map(|m| m.peer_urls.clone())
                .unwrap_or_default();
            super::peer::fetch_progress(&urls).await?
        };
        if progress.is_empty() {
            // Asked a member that no longer leads.
            return Err(EtcdError::LeaderChanged);
        }
        Ok((leader, progress))
    }

    /// A Peer client to the leader, or `None` when this member leads.
    ///
    /// Errors: "no leader"; "leader changed" when the leader's peer URL is unknown.
    pub async fn remote_leader(&self) -> Result<Option<PeerClient<Channel>>, EtcdError> {
        let leader = self.status().leader.load(Ordering::Relaxed);
        if leader == 0 {
            return Err(EtcdError::NoLeader);
        }
        if leader == self.0.me.id {
            return Ok(None);
        }
        self.leader_peer(leader).await.map(Some)
    }

    /// A Peer client to `leader`'s peer URL, reused while the leader stays the same.
    async fn leader_peer(&self, leader: u64) -> Result<PeerClient<Channel>, EtcdError> {
        let mut cached = self.0.leader_peer.lock().await;
        if let Some((id, client)) = cached.as_ref() {
            if *id == leader {
                return Ok(client.clone());
            }
        }
        let url = self
            .table()
            .members
            .get(&leader)
            .and_then(|m| m.peer_urls.first().cloned())
            .ok_or(EtcdError::LeaderChanged)?;
        let channel = crate::net::connect_peer_lazy(&url, |endpoint| {
            endpoint
                .connect_timeout(Duration::from_secs(1))
                .timeout(self.0.request_timeout)
        })
        .map_err(|_| EtcdError::LeaderChanged)?;
        let client = PeerClient::new(channel);
        *cached = Some((leader, client.clone()));
        Ok(client)
    }
}

/// How many of `voters` the leader has heard from for at least [`HEALTH_INTERVAL`].
fn connected_voters(progress: &[PeerProgress], voters: &[u64]) -> usize {
    progress
        .iter()
        .filter(|p| voters.contains(&p.id))
        .filter(|p| p.connected_for.is_some_and(|d| d >= HEALTH_INTERVAL))
        .count()
}

/// Whether learner `id` is close enough to `leader` in `progress`. A member the leader does
/// not track passes: the apply-time check then reports it.
fn learner_ready(progress: &[PeerProgress], leader: u64, id: u64) -> Result<(), EtcdError> {
    let matched = |who| progress.iter().find(|p| p.id == who).map(|p| p.matched);
    match (matched(id), matched(leader)) {
        (Some(learner), Some(lead)) if (learner as f64) < lead as f64 * LEARNER_READY_PERCENT => {
            Err(EtcdError::LearnerNotReady)
        }
        _ => Ok(()),
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(
        &self,
        request: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        // Root only while auth is enabled (etcd 3.5 `isAdminPermitted`).
        let caller = self.access.caller_of(&request).await?;
        self.access.check_admin(caller.as_ref())?;
        let req = request.into_inner();
        let peer_urls = check_peer_urls(&req.peer_ur_ls)?;
        if !req.is_learner {
            self.members.check_started_quorum(1, None)?;
        }
        self.members.check_all_voters_connected().await?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let record = MemberRecord {
            id: member::member_id(&peer_urls, &now.to_string()),
            name: String::new(),
            peer_urls,
            client_urls: Vec::new(),
            is_learner: req.is_learner,
        };
        let members = self
            .members
            .change_membership(Kind::Add, record.clone())
            .await?;
        let (header, members) = self.members.members_reply(&members);
        Ok(Response::new(MemberAddResponse {
            header,
            member: Some(to_member(&record)),
            members,
        }))
    }

    async fn member_remove(
        &self,
        request: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        // Root only while auth is enabled (etcd 3.5 `isAdminPermitted`).
        let caller = self.access.caller_of(&request).await?;
        self.access.check_admin(caller.as_ref())?;
        let id = request.into_inner().id;
        let is_voter = self.members.table().is_voter(id);
        if is_voter {
            self.members.check_started_quorum(0, Some(id))?;
            self.members.check_removal_keeps_quorum(id).await?;
        }
        let record = MemberRecord {
            id,
            ..Default::default()
        };
        let members = self.members.change_membership(Kind::Remove, record).await?;
        let (header, members) = self.members.members_reply(&members);
        Ok(Response::new(MemberRemoveResponse { header, members }))
    }

    async fn member_update(
        &self,
        request: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        // Root only while auth is enabled (etcd 3.5 `isAdminPermitted`).
        let caller = self.access.caller_of(&request).await?;
        self.access.check_admin(caller.as_ref())?;
        let req = request.into_inner();
        let record = MemberRecord {
            id: req.id,
            peer_urls: check_peer_urls(&req.peer_ur_ls)?,
            ..Default::default()
        };
        let members = self.members.change_membership(Kind::Update, record).await?;
        let (header, members) = self.members.members_reply(&members);
        Ok(Response::new(MemberUpdateResponse { header, members }))
    }

    async fn member_list(
        &self,
        request: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        if request.into_inner().linearizable {
            self.reader.linearizable_state().await?;
        }
        let members = self.members.table().list();
        let (header, members) = self.members.members_reply(&members);
        Ok(Response::new(MemberListResponse { header, members }))
    }

    async fn member_promote(
        &self,
        request: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        // Root only while auth is enabled (etcd 3.5 `isAdminPermitted`).
        let caller = self.access.caller_of(&request).await?;
        self.access.check_admin(caller.as_ref())?;
        let id = request.into_inner().id;
        self.members.check_learner_ready(id).await?;
        self.members.check_started_quorum(1, None)?;
        let record = MemberRecord {
            id,
            ..Default::default()
        };
        let members = self
            .members
            .change_membership(Kind::Promote, record)
            .await?;
        let (header, members) = self.members.members_reply(&members);
        Ok(Response::new(MemberPromoteResponse { header, members }))
    }
}

/// Publishes this member's name and client URLs to the membership table once a leader is
/// known (etcd `publishV3`), retrying until the table shows them. Until then MemberList shows
/// the member with an empty name and no client URLs, as etcd does for an unstarted member.
pub async fn publish_attributes(core: Arc<Core>) {
    let members = &core.members;
    let me = MemberRecord {
        id: core.member.id,
        name: core.member.name.clone(),
        peer_urls: Vec::new(),
        client_urls: core.member.client_urls.clone(),
        is_learner: false,
    };
    // Raft-rs turns a conf change proposed while another is unapplied into an empty entry:
    // nothing answers it, so an attempt is given up after `2 * retry`. Retry as often as the
    // election timeout, but at least every second: with a long election timeout (5 s) three
    // members publishing at once would otherwise take 15 s per collision.
    let retry = Duration::from_millis(core.cfg.election_timeout.clamp(100, 1000));
    loop {
        let published = members
            .table()
            .members
            .get(&me.id)
            .map(|m| m.name == me.name && m.client_urls == me.client_urls);
        match published {
            Some(true) => return,
            // Not (yet) a member: a joiner before its own AddNode is applied here.
            None => {}
            Some(false) if core.node.status.leader.load(Ordering::Relaxed) != 0 => {
                // Raft drops a conf change proposed while another is unapplied (other members
                // publishing at the same moment): do not wait the full request timeout for it.
                let attempt = members.change_membership(Kind::Attributes, me.clone());
                match tokio::time::timeout(2 * retry, attempt)
                    .await
                    .unwrap_or(Err(EtcdError::Timeout))
                {
                    Ok(_) => {
                        tracing::info!(name = %me.name, client_urls = ?me.client_urls, "published member attributes");
                        return;
                    }
                    Err(e) => tracing::debug!(error = %e, "publishing member attributes"),
                }
            }
            Some(false) => {}
        }
        if core.node.status.removed.load(Ordering::Relaxed) {
            return;
        }
        tokio::time::sleep(retry).await;
    }
}

/// `--auto-promote-learners`: while this member leads, promotes every learner whose log has
/// caught up (the same 90% rule as MemberPromote, and the same strict reconfiguration check),
/// checking once per election timeout.
pub async fn auto_promote_learners(core: Arc<Core>) {
    let every = Duration::from_millis(core.cfg.election_timeout.max(100));
    let members = &core.members;
    loop {
        tokio::time::sleep(every).await;
        if !members.is_leader() {
            continue;
        }
        let learners = members.table().learners();
        for id in learners {
            if members.check_learner_ready(id).await.is_err()
                || members.check_started_quorum(1, None).is_err()
            {
                continue;
            }
            let record = MemberRecord {
                id,
                ..Default::default()
            };
            match members.change_membership(Kind::Promote, record).await {
                Ok(_) => {
                    tracing::info!(member = %format!("{id:x}"), "promoted a caught-up learner")
                }
                Err(e) => {
                    tracing::debug!(member = %format!("{id:x}"), error = %e, "learner not promoted yet")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_urls_are_checked_like_etcd() {
        assert_eq!(
            check_peer_urls(&["http://b:2380".into(), "http://a:2380".into()]),
            Ok(vec![
                "http://a:2380".to_string(),
                "http://b:2380".to_string()
            ])
        );
        for bad in ["a:2380", "http://a", "ftp://a:1", "http://a:1/path", "::"] {
            assert_eq!(
                check_peer_urls(&[bad.into()]),
                Err(EtcdError::MemberBadUrls),
                "{bad}"
            );
        }
    }

    fn peer(id: u64, matched: u64, connected_secs: Option<u64>) -> PeerProgress {
        PeerProgress {
            id,
            matched,
            connected_for: connected_secs.map(Duration::from_secs),
        }
    }

    #[test]
    fn learner_readiness_is_ninety_percent_of_the_leader() {
        let at = |matched| [peer(1, 100, None), peer(2, matched, None)];
        assert_eq!(
            learner_ready(&at(89), 1, 2),
            Err(EtcdError::LearnerNotReady)
        );
        assert_eq!(learner_ready(&at(90), 1, 2), Ok(()));
        assert_eq!(learner_ready(&at(90)[..1], 1, 9), Ok(()));
    }

    #[test]
    fn voters_count_as_connected_after_the_health_interval() {
        let progress = [
            peer(1, 10, Some(u64::MAX / 2)),
            peer(2, 10, Some(5)),
            peer(3, 10, Some(4)),
            peer(4, 10, None),
            peer(5, 10, Some(60)),
        ];
        // 5 is a learner here: only voters count.
        assert_eq!(connected_voters(&progress, &[1, 2, 3, 4]), 2);
        assert_eq!(connected_voters(&progress, &[1, 2]), 2);
    }
}
