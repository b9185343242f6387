//! `etcdserverpb.KV`: Range, Put, DeleteRange, Txn, Compact.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{validate, Core};
use crate::apply::txn::txn_puts;
use crate::proto::etcdserverpb::{
    kv_server::Kv, CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse,
    PutRequest, PutResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use crate::proto::metastorepb::proposal::Request as Proposed;
use crate::state_machine::ApplyResponse;

/// The KV service.
pub struct KvService {
    core: Arc<Core>,
}

impl KvService {
    /// Serves KV over `core`.
    pub fn new(core: Arc<Core>) -> Self {
        KvService { core }
    }

    async fn write(
        &self,
        req: Proposed,
        caller: Option<&crate::auth::AuthInfo>,
    ) -> Result<ApplyResponse, Status> {
        Ok(self.core.propose_as(req, caller).await?)
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
        let caller = self.core.caller_of(&request).await?;
        let req = request.into_inner();
        self.core
            .check_read(caller.as_ref(), &req.key, &req.range_end)?;
        let resp = self.core.range(req).await?;
        if let Some(c) = &caller {
            if c.revision != 0
                && self.core.auth_enabled()
                && c.revision != self.core.auth.read(|a| a.revision())
            {
                return Err(crate::error::EtcdError::AuthOldRevision.into());
            }
        }
        Ok(Response::new(resp))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let caller = self.core.caller_of(&request).await?;
        let req = request.into_inner();
        validate::check_put(&req)?;
        self.core.check_quota()?;
        match self.write(Proposed::Put(req), caller.as_ref()).await? {
            ApplyResponse::Put(mut r) => {
                r.header = self.core.header(r.header.map_or(0, |h| h.revision));
                Ok(Response::new(r))
            }
            _ => Err(unexpected("put")),
        }
    }

    async fn delete_range(
        &self,
        request: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let caller = self.core.caller_of(&request).await?;
        let req = request.into_inner();
        validate::check_delete(&req)?;
        match self
            .write(Proposed::DeleteRange(req), caller.as_ref())
            .await?
        {
            ApplyResponse::DeleteRange(mut r) => {
                r.header = self.core.header(r.header.map_or(0, |h| h.revision));
                Ok(Response::new(r))
            }
            _ => Err(unexpected("delete")),
        }
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let caller = self.core.caller_of(&request).await?;
        let req = request.into_inner();
        validate::check_txn(&req, self.core.cfg.max_txn_ops)?;
        if txn_puts(&req) {
            self.core.check_quota()?;
        }
        match self.write(Proposed::Txn(req), caller.as_ref()).await? {
            ApplyResponse::Txn(mut r) => {
                r.header = self.core.header(r.header.map_or(0, |h| h.revision));
                Ok(Response::new(r))
            }
            _ => Err(unexpected("txn")),
        }
    }

    async fn compact(
        &self,
        request: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        let caller = self.core.caller_of(&request).await?;
        match self
            .write(Proposed::Compaction(request.into_inner()), caller.as_ref())
            .await?
        {
            ApplyResponse::Compaction(mut r) => {
                r.header = self.core.header(r.header.map_or(0, |h| h.revision));
                Ok(Response::new(r))
            }
            _ => Err(unexpected("compaction")),
        }
    }
}
