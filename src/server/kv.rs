//! `etcdserverpb.KV`: Range, Put, DeleteRange, Txn, Compact.

use tonic::{Request, Response, Status};

use super::{validate, Access, Core, Proposer, Reader};
use crate::apply::txn::txn_puts;
use crate::proto::etcdserverpb::{
    kv_server::Kv, CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse,
    PutRequest, PutResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use crate::proto::metastorepb::proposal::Request as Proposed;
use crate::state_machine::ApplyResponse;

/// The KV service.
pub struct KvService {
    access: Access,
    proposer: Proposer,
    reader: Reader,
    /// `--max-txn-ops`.
    max_txn_ops: usize,
}

impl KvService {
    /// Serves KV with `core`'s handles.
    pub fn new(core: &Core) -> Self {
        KvService {
            access: core.access.clone(),
            proposer: core.proposer.clone(),
            reader: core.reader.clone(),
            max_txn_ops: core.cfg.max_txn_ops,
        }
    }

    async fn write(
        &self,
        req: Proposed,
        caller: Option<&crate::auth::AuthInfo>,
    ) -> Result<ApplyResponse, Status> {
        Ok(self.proposer.propose_as(req, caller).await?)
    }
}

fn unexpected(what: &'static str) -> Status {
    crate::error::unexpected_apply_result(what).into()
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<RangeResponse>, Status> {
        // etcd `doSerialize`: the permission check, the read, then a check that the auth
        // store did not change meanwhile.
        let caller = self.access.caller_of(&request).await?;
        let req = request.into_inner();
        self.access
            .check_read(caller.as_ref(), &req.key, &req.range_end)?;
        let resp = self.reader.range(req).await?;
        if caller
            .as_ref()
            .is_some_and(|c| self.access.changed_since(c))
        {
            return Err(crate::error::EtcdError::AuthOldRevision.into());
        }
        Ok(Response::new(resp))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let caller = self.access.caller_of(&request).await?;
        let req = request.into_inner();
        validate::check_put(&req)?;
        self.proposer.check_quota()?;
        match self.write(Proposed::Put(req), caller.as_ref()).await? {
            ApplyResponse::Put(mut r) => {
                r.header = self.reader.header(r.header.map_or(0, |h| h.revision));
                Ok(Response::new(r))
            }
            _ => Err(unexpected("put")),
        }
    }

    async fn delete_range(
        &self,
        request: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let caller = self.access.caller_of(&request).await?;
        let req = request.into_inner();
        validate::check_delete(&req)?;
        match self
            .write(Proposed::DeleteRange(req), caller.as_ref())
            .await?
        {
            ApplyResponse::DeleteRange(mut r) => {
                r.header = self.reader.header(r.header.map_or(0, |h| h.revision));
                Ok(Response::new(r))
            }
            _ => Err(unexpected("delete")),
        }
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let caller = self.access.caller_of(&request).await?;
        let req = request.into_inner();
        validate::check_txn(&req, self.max_txn_ops)?;
        if txn_puts(&req) {
            self.proposer.check_quota()?;
        }
        match self.write(Proposed::Txn(req), caller.as_ref()).await? {
            ApplyResponse::Txn(mut r) => {
                r.header = self.reader.header(r.header.map_or(0, |h| h.revision));
                Ok(Response::new(r))
            }
            _ => Err(unexpected("txn")),
        }
    }

    async fn compact(
        &self,
        request: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        let caller = self.access.caller_of(&request).await?;
        match self
            .write(Proposed::Compaction(request.into_inner()), caller.as_ref())
            .await?
        {
            ApplyResponse::Compaction(mut r) => {
                r.header = self.reader.header(r.header.map_or(0, |h| h.revision));
                Ok(Response::new(r))
            }
            _ => Err(unexpected("compaction")),
        }
    }
}
