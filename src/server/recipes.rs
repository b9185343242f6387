//! etcd's `v3lock` and `v3election` services: the `clientv3/concurrency` recipes (mutex and
//! election), run inside the member on the same primitives clients use: a txn that creates
//! `<name>/<lease hex>` if absent, then waiting until every key under `<name>/` created before
//! it is gone.

use std::pin::Pin;

use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use super::{Core, Leases, Proposer, Reader};
use crate::error::EtcdError;
use crate::proto::etcdserverpb::{
    compare,
    range_request::{SortOrder, SortTarget},
    request_op::Request as Op,
    response_op::Response as OpResp,
    Compare, DeleteRangeRequest, LeaseGrantRequest, PutRequest, RangeRequest, RequestOp,
    ResponseHeader, TxnRequest, TxnResponse,
};
use crate::proto::metastorepb::proposal::Request as Proposed;
use crate::proto::mvccpb::KeyValue;
use crate::proto::v3electionpb::{
    election_server::Election, CampaignRequest, CampaignResponse, LeaderKey, LeaderRequest,
    LeaderResponse, ProclaimRequest, ProclaimResponse, ResignRequest, ResignResponse,
};
use crate::proto::v3lockpb::{
    lock_server::Lock, LockRequest, LockResponse, UnlockRequest, UnlockResponse,
};
use crate::state_machine::ApplyResponse;

/// TTL of the session lease etcd creates when a Lock or Campaign names no lease, seconds
/// (`concurrency.defaultSessionTTL`).
const SESSION_TTL: i64 = 60;

/// The `range_end` of every key that starts with `prefix`, in etcd's encoding: `"\0"` (every
/// key from `prefix` on) when no finite end exists.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    crate::mvcc::prefix_end(prefix).unwrap_or_else(|| vec![0])
}

fn op(request: Op) -> RequestOp {
    RequestOp {
        request: Some(request),
    }
}

fn create_revision_is(key: &[u8], rev: i64) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Create as i32,
        key: key.to_vec(),
        target_union: Some(compare::TargetUnion::CreateRevision(rev)),
        range_end: Vec::new(),
    }
}

fn get(key: &[u8]) -> RequestOp {
    op(Op::RequestRange(RangeRequest {
        key: key.to_vec(),
        ..Default::default()
    }))
}

/// What the recipes run on: writes, reads, and session leases.
#[derive(Clone)]
struct Recipes {
    proposer: Proposer,
    reader: Reader,
    leases: Leases,
}

impl Recipes {
    fn new(core: &Core) -> Recipes {
        Recipes {
            proposer: core.proposer.clone(),
            reader: core.reader.clone(),
            leases: core.leases.clone(),
        }
    }

    async fn txn(&self, txn: TxnRequest) -> Result<TxnResponse, EtcdError> {
        match self.proposer.propose(Proposed::Txn(txn)).await? {
            ApplyResponse::Txn(mut r) => {
                r.header = self.reader.header(r.header.map_or(0, |h| h.revision));
                Ok(r)
            }
            _ => Err(crate::error::unexpected_apply_result("txn")),
        }
    }

    /// The key under `prefix` with the lowest create revision (the lock holder or leader),
    /// among keys created at or before `max_create` (0 = any).
    async fn first_created(
        &self,
        prefix: &[u8],
        max_create: i64,
        last: bool,
    ) -> Result<(Option<KeyValue>, i64), EtcdError> {
        let req = RangeRequest {
            key: prefix.to_vec(),
            range_end: prefix_end(prefix),
            limit: 1,
            sort_order: if last {
                SortOrder::Descend
            } else {
                SortOrder::Ascend
            } as i32,
            sort_target: SortTarget::Create as i32,
            max_create_revision: max_create,
            ..Default::default()
        };
        let resp = self.reader.range(req).await?;
        Ok((
            resp.kvs.into_iter().next(),
            resp.header.map_or(0, |h| h.revision),
        ))
    }

    /// Waits until no key under `prefix` created at or before `max_create` remains
    /// (`concurrency.waitDeletes`). Woken by every applied batch, not by polling.
    async fn wait_deletes(&self, prefix: &[u8], max_create: i64) -> Result<(), EtcdError> {
        let mut applied = self.reader.applied_changes();
        loop {
            applied.borrow_and_update();
            if self
                .first_created(prefix, max_create, true)
                .await?
                .0
                .is_none()
            {
                return Ok(());
            }
            applied.changed().await.map_err(|_| EtcdError::Stopped)?;
        }
    }

    /// Creates `<prefix><lease hex>` (or finds it), then waits for its turn. Returns the key,
    /// its create revision, the header of the creating txn, and the value it holds.
    async fn acquire(
        &self,
        prefix: &[u8],
        lease: i64,
        value: &[u8],
    ) -> Result<(Vec<u8>, i64, Option<ResponseHeader>, KeyValue), Status> {
        let lease = if lease != 0 {
            lease
        } else {
            self.session_lease().await?
        };
        let key = [prefix, format!("{lease:x}").as_bytes()].concat();
        let put = op(Op::RequestPut(PutRequest {
            key: key.clone(),
            value: value.to_vec(),
            lease,
            ..Default::default()
        }));
        let txn = TxnRequest {
            compare: vec![create_revision_is(&key, 0)],
            success: vec![put],
            failure: vec![get(&key)],
        };
        let resp = self.txn(txn).await?;
        let header = resp.header;
        let revision = header.as_ref().map_or(0, |h| h.revision);
        let mut guard = Release {
            proposer: self.proposer.clone(),
            key: Some(key.clone()),
        };
        let (create_rev, kv) = if resp.succeeded {
            let kv = KeyValue {
                key: key.clone(),
                value: value.to_vec(),
                create_revision: revision,
                mod_revision: revision,
                version: 1,
                lease,
            };
            (revision, kv)
        } else {
            let kv = resp
                .responses
                .into_iter()
                .find_map(|r| match r.response {
                    Some(OpResp::ResponseRange(r)) => r.kvs.into_iter().next(),
                    _ => None,
                })
                .ok_or_else(|| Status::from(EtcdError::SessionExpired))?;
            // Our key already existed: it stays ours to keep (it predates this call).
            guard.key = None;
            (kv.create_revision, kv)
        };
        // The holder already: answer with the txn's header (concurrency.Mutex.Lock).
        let owner = self.first_created(prefix, 0, false).await?.0;
        if owner.is_some_and(|o| o.create_revision == create_rev) {
            guard.key = None;
            return Ok((key, create_rev, header, kv));
        }
        self.wait_deletes(prefix, create_rev - 1).await?;
        let (mine, revision) = self.first_created(&key, 0, false).await?;
        if mine.is_none() {
            return Err(Status::from(EtcdError::SessionExpired));
        }
        guard.key = None;
        Ok((key, create_rev, self.reader.header(revision), kv))
    }

    /// etcd's server-side recipes open a session with a fresh lease when the request names
    /// none, and orphan it: nobody keeps it alive, so the lock or candidacy ends with it.
    async fn session_lease(&self) -> Result<i64, EtcdError> {
        let grant = LeaseGrantRequest {
            ttl: SESSION_TTL,
            id: self.leases.new_lease_id(),
        };
        Ok(self.leases.grant(grant).await?.id)
    }
}

/// Deletes a key this call created if the call ends early (client cancel, error), as
/// `concurrency.Mutex.Lock` unlocks on failure.
struct Release {
    proposer: Proposer,
    key: Option<Vec<u8>>,
}

impl Drop for Release {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let proposer = self.proposer.clone();
            tokio::spawn(async move {
                let _ = proposer
                    .propose(Proposed::DeleteRange(DeleteRangeRequest {
                        key,
                        ..Default::default()
                    }))
                    .await;
            });
        }
    }
}

/// `v3lockpb.Lock`.
pub struct LockService {
    recipes: Recipes,
}

impl LockService {
    /// Serves Lock with `core`'s handles.
    pub fn new(core: &Core) -> Self {
        LockService {
            recipes: Recipes::new(core),
        }
    }
}

#[tonic::async_trait]
impl Lock for LockService {
    async fn lock(&self, request: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        let req = request.into_inner();
        let prefix = [req.name.as_slice(), b"/"].concat();
        let (key, _, header, _) = self.recipes.acquire(&prefix, req.lease, b"").await?;
        Ok(Response::new(LockResponse { header, key }))
    }

    async fn unlock(
        &self,
        request: Request<UnlockRequest>,
    ) -> Result<Response<UnlockResponse>, Status> {
        let key = request.into_inner().key;
        match self
            .recipes
            .proposer
            .propose(Proposed::DeleteRange(DeleteRangeRequest {
                key,
                ..Default::default()
            }))
            .await?
        {
            ApplyResponse::DeleteRange(r) => Ok(Response::new(UnlockResponse {
                header: self
                    .recipes
                    .reader
                    .header(r.header.map_or(0, |h| h.revision)),
            })),
            _ => Err(crate::error::unexpected_apply_result("unlock").into()),
        }
    }
}

/// `v3electionpb.Election`.
pub struct ElectionService {
    recipes: Recipes,
}

impl ElectionService {
    /// Serves Election with `core`'s handles.
    pub fn new(core: &Core) -> Self {
        ElectionService {
            recipes: Recipes::new(core),
        }
    }

    async fn leader_kv(&self, name: &[u8]) -> Result<(Option<KeyValue>, i64), EtcdError> {
        let prefix = [name, b"/"].concat();
        self.recipes.first_created(&prefix, 0, false).await
    }
}

type ObserveStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<LeaderResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Election for ElectionService {
    async fn campaign(
        &self,
        request: Request<CampaignRequest>,
    ) -> Result<Response<CampaignResponse>, Status> {
        let req = request.into_inner();
        let prefix = [req.name.as_slice(), b"/"].concat();
        let (key, rev, mut header, kv) =
            self.recipes.acquire(&prefix, req.lease, &req.value).await?;
        let leader = LeaderKey {
            name: req.name.clone(),
            key: key.clone(),
            rev,
            lease: kv.lease,
        };
        if kv.value != req.value {
            // Re-campaigning with a new value proclaims it (concurrency.Election.Campaign).
            header = self.proclaim_value(&leader, req.value).await?;
        }
        Ok(Response::new(CampaignResponse {
            header,
            leader: Some(leader),
        }))
    }

    async fn proclaim(
        &self,
        request: Request<ProclaimRequest>,
    ) -> Result<Response<ProclaimResponse>, Status> {
        let req = request.into_inner();
        let leader = req
            .leader
            .ok_or_else(|| Status::from(EtcdError::MissingLeaderKey))?;
        let header = self.proclaim_value(&leader, req.value).await?;
        Ok(Response::new(ProclaimResponse { header }))
    }

    async fn leader(
        &self,
        request: Request<LeaderRequest>,
    ) -> Result<Response<LeaderResponse>, Status> {
        let (kv, revision) = self.leader_kv(&request.into_inner().name).await?;
        let kv = kv.ok_or_else(|| Status::from(EtcdError::ElectionNoLeader))?;
        Ok(Response::new(LeaderResponse {
            header: self.recipes.reader.header(revision),
            kv: Some(kv),
        }))
    }

    type ObserveStream = ObserveStream;

    async fn observe(
        &self,
        request: Request<LeaderRequest>,
    ) -> Result<Response<Self::ObserveStream>, Status> {
        let name = request.into_inner().name;
        let (tx, rx) = mpsc::channel(16);
        let recipes = self.recipes.clone();
        tokio::spawn(async move {
            let svc = ElectionService {
                recipes: recipes.clone(),
            };
            let mut applied = recipes.reader.applied_changes();
            let mut last: Option<(Vec<u8>, i64)> = None;
            loop {
                applied.borrow_and_update();
                match svc.leader_kv(&name).await {
                    Ok((Some(kv), revision)) => {
                        let seen = (kv.key.clone(), kv.mod_revision);
                        if last.as_ref() != Some(&seen) {
                            last = Some(seen);
                            let resp = LeaderResponse {
                                header: recipes.reader.header(revision),
                                kv: Some(kv),
                            };
                            if tx.send(Ok(resp)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Ok((None, _)) => last = None,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                }
                tokio::select! {
                    changed = applied.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn resign(
        &self,
        request: Request<ResignRequest>,
    ) -> Result<Response<ResignResponse>, Status> {
        let leader = request
            .into_inner()
            .leader
            .ok_or_else(|| Status::from(EtcdError::MissingLeaderKey))?;
        let delete = op(Op::RequestDeleteRange(DeleteRangeRequest {
            key: leader.key.clone(),
            ..Default::default()
        }));
        let txn = TxnRequest {
            compare: vec![create_revision_is(&leader.key, leader.rev)],
            success: vec![delete],
            failure: vec![],
        };
        let resp = self.recipes.txn(txn).await?;
        Ok(Response::new(ResignResponse {
            header: resp.header,
        }))
    }
}

impl ElectionService {
    async fn proclaim_value(
        &self,
        leader: &LeaderKey,
        value: Vec<u8>,
    ) -> Result<Option<ResponseHeader>, Status> {
        let put = op(Op::RequestPut(PutRequest {
            key: leader.key.clone(),
            value,
            lease: leader.lease,
            ..Default::default()
        }));
        let txn = TxnRequest {
            compare: vec![create_revision_is(&leader.key, leader.rev)],
            success: vec![put],
            failure: vec![],
        };
        let resp = self.recipes.txn(txn).await?;
        if !resp.succeeded {
            return Err(Status::from(EtcdError::ElectionNotLeader));
        }
        Ok(resp.header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(prefix_end(b"lock/"), b"lock0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }
}
