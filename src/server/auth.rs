//! `etcdserverpb.Auth` and the front end's side of authentication (etcd 3.5
//! `server/etcdserver/v3_server.go`, `server/auth/store.go`).
//!
//! Every client RPC finds its caller with [`Access::caller`]: the token in the `token` gRPC
//! metadata (or `authorization`, as etcd 3.5 also reads), else, with `--client-cert-auth` on
//! TLS, the Common Name of the client certificate. Writes carry the caller in their proposal
//! ([`Proposer::propose_as`]) and are checked as they are applied, on every member
//! ([`crate::auth::AuthStore::refusal`]); reads and watches are checked here.

use std::time::Duration;

use tonic::{Request, Response, Status};

use super::{Core, Proposer, Reader};
use crate::auth::AuthInfo;
use crate::auth::SharedAuth;
use crate::config::Config;
use crate::error::EtcdError;
use crate::proto::authpb::permission::Type as PermType;
use crate::proto::etcdserverpb::{
    auth_server::Auth, AuthDisableRequest, AuthDisableResponse, AuthEnableRequest,
    AuthEnableResponse, AuthRoleAddRequest, AuthRoleAddResponse, AuthRoleDeleteRequest,
    AuthRoleDeleteResponse, AuthRoleGetRequest, AuthRoleGetResponse,
    AuthRoleGrantPermissionRequest, AuthRoleGrantPermissionResponse, AuthRoleListRequest,
    AuthRoleListResponse, AuthRoleRevokePermissionRequest, AuthRoleRevokePermissionResponse,
    AuthStatusRequest, AuthStatusResponse, AuthUserAddRequest, AuthUserAddResponse,
    AuthUserChangePasswordRequest, AuthUserChangePasswordResponse, AuthUserDeleteRequest,
    AuthUserDeleteResponse, AuthUserGetRequest, AuthUserGetResponse, AuthUserGrantRoleRequest,
    AuthUserGrantRoleResponse, AuthUserListRequest, AuthUserListResponse,
    AuthUserRevokeRoleRequest, AuthUserRevokeRoleResponse, AuthenticateRequest,
    AuthenticateResponse,
};
use crate::proto::metastorepb::{proposal::Request as Proposed, AuthenticateProposal};
use crate::state_machine::ApplyResponse;

/// gRPC metadata keys of the token (etcd `rpctypes.TokenFieldNameGRPC`, and
/// `TokenFieldNameSwagger` which etcd 3.5 also reads).
pub const TOKEN_KEYS: [&str; 2] = ["token", "authorization"];

/// The caller-identifying parts of a request: its token and the client's certificate chain
/// (parsed for its CN only when a certificate user is possible, not on every request).
pub struct Credentials {
    token: Option<String>,
    certs: Option<std::sync::Arc<Vec<tonic::transport::CertificateDer<'static>>>>,
}

impl Credentials {
    /// The credentials `request` carries.
    pub fn of<T>(request: &Request<T>) -> Credentials {
        let md = request.metadata();
        let token = TOKEN_KEYS
            .iter()
            .find_map(|k| md.get(*k))
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Credentials {
            token,
            certs: request.peer_certs(),
        }
    }

    /// From raw HTTP headers (streams whose messages come later).
    pub fn from_headers(headers: &http::HeaderMap) -> Credentials {
        let token = TOKEN_KEYS
            .iter()
            .find_map(|k| headers.get(*k))
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Credentials { token, certs: None }
    }
}

/// The Subject Common Name of a DER certificate.
fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    (!cn.is_empty()).then_some(cn)
}

/// Who makes a request, and what they may do: the replicated auth store and this member's
/// tokens, as the services check them.
#[derive(Clone)]
pub struct Access {
    store: SharedAuth,
    /// To wait for a simple token's Authenticate entry to be applied here.
    reader: Reader,
    client_cert_auth: bool,
    bcrypt_cost: u32,
    request_timeout: Duration,
}

impl Access {
    /// The gate over `store`, with `cfg`'s `--client-cert-auth` and `--bcrypt-cost`; a token
    /// made on another member is waited for at most `request_timeout`.
    pub fn new(
        store: SharedAuth,
        reader: Reader,
        cfg: &Config,
        request_timeout: Duration,
    ) -> Access {
        Access {
            store,
            reader,
            client_cert_auth: cfg.client_cert_auth,
            bcrypt_cost: cfg.bcrypt_cost,
            request_timeout,
        }
    }

    /// The replicated auth store, as the dispatcher last applied it, and this member's tokens.
    pub fn store(&self) -> &SharedAuth {
        &self.store
    }

    /// Who makes a request (etcd `AuthInfoFromCtx`, then `AuthInfoFromTLS` with
    /// `--client-cert-auth`): `None` without a token or certificate user.
    ///
    /// Errors: "etcdserver: invalid auth token" for a token this member does not know (unknown,
    /// expired, revoked, or of a deleted user); for a simple token made on another member,
    /// the member first waits until it has applied the token's Authenticate entry.
    pub async fn caller(&self, creds: &Credentials) -> Result<Option<AuthInfo>, EtcdError> {
        let tokens = &self.store.tokens;
        if let Some(token) = &creds.token {
            if let Some(index) = tokens.simple_index(token) {
                if self.reader.applied().index < index {
                    let mut applied = self.reader.applied_changes();
                    let wait = applied.wait_for(|a| a.index >= index);
                    let _ = tokio::time::timeout(self.request_timeout, wait).await;
                }
            }
            let current = self.store.read(|a| a.revision());
            return match tokens.lookup(token, current) {
                Some((user, revision)) => Ok(Some(AuthInfo { user, revision })),
                None => Err(EtcdError::InvalidAuthToken),
            };
        }
        if self.client_cert_auth {
            let (enabled, revision) = self.store.read(|a| (a.enabled(), a.revision()));
            let cn = creds
                .certs
                .as_ref()
                .filter(|_| enabled)
                .and_then(|certs| certs.first().and_then(|c| common_name(c.as_ref())));
            if let Some(user) = cn {
                return Ok(Some(AuthInfo { user, revision }));
            }
        }
        Ok(None)
    }

    /// [`Access::caller`] of a request.
    pub async fn caller_of<T>(&self, request: &Request<T>) -> Result<Option<AuthInfo>, EtcdError> {
        self.caller(&Credentials::of(request)).await
    }

    /// etcd `IsAdminPermitted` for `caller`, now. Errors: "user name is empty", "user name
    /// not found", "permission denied".
    pub fn check_admin(&self, caller: Option<&AuthInfo>) -> Result<(), EtcdError> {
        let user = caller.map_or("", |c| c.user.as_str());
        self.store.read(|a| a.check_admin(user))
    }

    /// etcd `IsRangePermitted` for `caller`, now. Errors: "user name is empty", "revision of
    /// auth store is old", "permission denied".
    pub fn check_read(
        &self,
        caller: Option<&AuthInfo>,
        key: &[u8],
        range_end: &[u8],
    ) -> Result<(), EtcdError> {
        let (user, rev) = caller.map_or(("", 0), |c| (c.user.as_str(), c.revision));
        self.store
            .read(|a| a.check(user, rev, key, range_end, PermType::Read))
    }

    /// Whether auth is enabled.
    pub fn enabled(&self) -> bool {
        self.store.read(|a| a.enabled())
    }

    /// Whether the auth store has changed since `caller` was identified (etcd checks again
    /// after a read: "revision of auth store is old").
    pub fn changed_since(&self, caller: &AuthInfo) -> bool {
        caller.revision != 0
            && self.enabled()
            && caller.revision != self.store.read(|a| a.revision())
    }

    fn bcrypt(&self, password: &str) -> Result<String, Status> {
        bcrypt::hash(password, self.bcrypt_cost)
            .map_err(|e| EtcdError::PasswordHash(e.to_string()).into())
    }
}

/// The Auth service.
pub struct AuthService {
    access: Access,
    proposer: Proposer,
    reader: Reader,
}

impl AuthService {
    /// Serves Auth with `core`'s handles.
    pub fn new(core: &Core) -> Self {
        AuthService {
            access: core.access.clone(),
            proposer: core.proposer.clone(),
            reader: core.reader.clone(),
        }
    }

    /// The caller of `request`.
    async fn who<T>(&self, request: &Request<T>) -> Result<Option<AuthInfo>, Status> {
        Ok(self.access.caller_of(request).await?)
    }

    /// Proposes an auth change; the response header at the applied KV revision.
    async fn change<T>(
        &self,
        request: &Request<T>,
        proposal: Proposed,
    ) -> Result<Option<crate::proto::etcdserverpb::ResponseHeader>, Status> {
        let caller = self.who(request).await?;
        let rev = self.auth_change(proposal, caller.as_ref()).await?;
        Ok(self.reader.header(rev))
    }

    /// Proposes an auth change for `caller`; the KV revision it applied at.
    async fn auth_change(
        &self,
        request: Proposed,
        caller: Option<&AuthInfo>,
    ) -> Result<i64, Status> {
        match self.proposer.propose_as(request, caller).await? {
            ApplyResponse::Auth { revision, .. } => Ok(revision),
            _ => Err(EtcdError::UnexpectedApplyResult(None).into()),
        }
    }

    /// A linearizable view of the auth store for a read RPC, after the admin check (etcd
    /// serves these through Raft too).
    async fn read_header(
        &self,
    ) -> Result<Option<crate::proto::etcdserverpb::ResponseHeader>, Status> {
        let state = self.reader.linearizable_state().await?;
        Ok(self.reader.header(state.revision))
    }
}

#[tonic::async_trait]
impl Auth for AuthService {
    // Changes: proposed with the caller, checked (root only while enabled) and applied on
    // every member; errors as [`crate::auth::AuthStore`]'s methods.
    async fn auth_enable(
        &self,
        request: Request<AuthEnableRequest>,
    ) -> Result<Response<AuthEnableResponse>, Status> {
        let proposal = Proposed::AuthEnable(*request.get_ref());
        let header = self.change(&request, proposal).await?;
        Ok(Response::new(AuthEnableResponse { header }))
    }

    async fn auth_disable(
        &self,
        request: Request<AuthDisableRequest>,
    ) -> Result<Response<AuthDisableResponse>, Status> {
        let proposal = Proposed::AuthDisable(*request.get_ref());
        let header = self.change(&request, proposal).await?;
        Ok(Response::new(AuthDisableResponse { header }))
    }

    async fn role_add(
        &self,
        request: Request<AuthRoleAddRequest>,
    ) -> Result<Response<AuthRoleAddResponse>, Status> {
        let proposal = Proposed::AuthRoleAdd(request.get_ref().clone());
        let header = self.change(&request, proposal).await?;
        Ok(Response::new(AuthRoleAddResponse { header }))
    }

    async fn role_delete(
        &self,
        request: Request<AuthRoleDeleteRequest>,
    ) -> Result<Response<AuthRoleDeleteResponse>, Status> {
        let proposal = Proposed::AuthRoleDelete(request.get_ref().clone());
        let header = self.change(&request, proposal).await?;
        Ok(Response::new(AuthRoleDeleteResponse { header }))
    }

    async fn role_grant_permission(
        &self,
        request: Request<AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<AuthRoleGrantPermissionResponse>, Status> {
        let proposal = Proposed::AuthRoleGrantPermission(request.get_ref().clone());
        let header = self.change(&request, proposal).await?;
        Ok(Response::new(AuthRoleGrantPermissionResponse { header }))
    }

    async fn role_revoke_permission(
        &self,
        request: Request<AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<AuthRoleRevokePermissionResponse>, Status> {
        let proposal = Proposed::AuthRoleRevokePermission(request.get_ref().clone());
        let header = self.change(&request, proposal).await?;
        Ok(Response::new(AuthRoleRevokePermissionResponse { header }))
    }

    async fn user_delete(
        &self,
        request: Request<AuthUserDeleteRequest>,
    ) -> Result<Response<AuthUserDeleteResponse>, Status> {
        let proposal = Proposed::AuthUserDelete(request.get_ref().clone());
        let header = self.change(&request, proposal).await?;
        Ok(Response::new(AuthUserDeleteResponse { header }))
    }

    async fn user_grant_role(
        &self,
        request: Request<AuthUserGrantRoleRequest>,
    ) -> Result<Response<AuthUserGrantRoleResponse>, Status> {
        let proposal = Proposed::AuthUserGrantRole(request.get_ref().clone());
        let header = self.change(&request, proposal).await?;
        Ok(Response::new(AuthUserGrantRoleResponse { header }))
    }

    async fn user_revoke_role(
        &self,
        request: Request<AuthUserRevokeRoleRequest>,
    ) -> Result<Response<AuthUserRevokeRoleResponse>, Status> {
        let proposal = Proposed::AuthUserRevokeRole(request.get_ref().clone());
        let header = self.change(&request, proposal).await?;
        Ok(Response::new(AuthUserRevokeRoleResponse { header }))
    }

    /// AuthStatus: whether auth is enabled and the auth revision (no permission needed, as
    /// etcd 3.5).
    async fn auth_status(
        &self,
        request: Request<AuthStatusRequest>,
    ) -> Result<Response<AuthStatusResponse>, Status> {
        self.who(&request).await?;
        let header = self.read_header().await?;
        let (enabled, auth_revision) = self.access.store().read(|a| (a.enabled(), a.revision()));
        Ok(Response::new(AuthStatusResponse {
            header,
            enabled,
            auth_revision,
        }))
    }

    /// Authenticate (etcd `EtcdServer.Authenticate`): the password is checked here with
    /// bcrypt, then an Authenticate proposal (without the password) assigns a token; retried
    /// if the auth store changed meanwhile.
    ///
    /// Errors: "authentication is not enabled", "authentication failed, invalid user ID or
    /// password".
    async fn authenticate(
        &self,
        request: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        let req = request.into_inner();
        loop {
            let (checked, hash) = self.access.store().read(|a| {
                if !a.enabled() {
                    return Err(EtcdError::AuthNotEnabled);
                }
                let u = a.user(&req.name).ok_or(EtcdError::AuthFailed)?;
                if u.options.is_some_and(|o| o.no_password) {
                    return Err(EtcdError::AuthFailed);
                }
                Ok((
                    a.revision(),
                    String::from_utf8_lossy(&u.password).into_owned(),
                ))
            })?;
            let password = req.password.clone();
            let ok = tokio::task::spawn_blocking(move || {
                bcrypt::verify(password, &hash).unwrap_or(false)
            })
            .await
            .unwrap_or(false);
            if !ok {
                tracing::warn!(user = %req.name, "invalid authentication was requested");
                return Err(EtcdError::AuthFailed.into());
            }
            let proposal = Proposed::Authenticate(AuthenticateProposal {
                name: req.name.clone(),
                simple_token: self.access.store().tokens.prefix(),
            });
            let (applied, revision) = match self.proposer.propose(proposal).await? {
                ApplyResponse::Auth { applied, revision } => (applied, revision),
                _ => return Err(EtcdError::UnexpectedApplyResult(None).into()),
            };
            if checked != self.access.store().read(|a| a.revision()) {
                continue;
            }
            let token = if self.access.store().tokens.is_simple() {
                applied.token
            } else {
                self.access
                    .store()
                    .tokens
                    .sign(&applied.user, applied.auth_revision)
                    .map_err(|e| EtcdError::TokenSign(e.to_string()))?
            };
            return Ok(Response::new(AuthenticateResponse {
                header: self.reader.header(revision),
                token,
            }));
        }
    }

    /// UserAdd: the password is hashed here with bcrypt (`--bcrypt-cost`) and only the hash
    /// is proposed. Errors: "user name is empty", "user name already exists", and the admin
    /// check's.
    async fn user_add(
        &self,
        request: Request<AuthUserAddRequest>,
    ) -> Result<Response<AuthUserAddResponse>, Status> {
        let caller = self.who(&request).await?;
        let mut req = request.into_inner();
        if req.name.is_empty() {
            return Err(EtcdError::UserEmpty.into());
        }
        // Fail fast before the (slow) hash; apply checks again.
        self.access.check_admin(caller.as_ref())?;
        let no_password = req.options.is_some_and(|o| o.no_password);
        if !no_password && req.hashed_password.is_empty() {
            let access = self.access.clone();
            let password = std::mem::take(&mut req.password);
            req.hashed_password = tokio::task::spawn_blocking(move || access.bcrypt(&password))
                .await
                .map_err(|_| EtcdError::HashingFailed)??;
        }
        req.password.clear();
        let rev = self
            .auth_change(Proposed::AuthUserAdd(req), caller.as_ref())
            .await?;
        Ok(Response::new(AuthUserAddResponse {
            header: self.reader.header(rev),
        }))
    }

    /// UserChangePassword: hashed here, as UserAdd. Errors: "user name not found", and the
    /// admin check's.
    async fn user_change_password(
        &self,
        request: Request<AuthUserChangePasswordRequest>,
    ) -> Result<Response<AuthUserChangePasswordResponse>, Status> {
        let caller = self.who(&request).await?;
        let mut req = request.into_inner();
        self.access.check_admin(caller.as_ref())?;
        if req.hashed_password.is_empty() {
            let access = self.access.clone();
            let password = std::mem::take(&mut req.password);
            req.hashed_password = tokio::task::spawn_blocking(move || access.bcrypt(&password))
                .await
                .map_err(|_| EtcdError::HashingFailed)??;
        }
        req.password.clear();
        let rev = self
            .auth_change(Proposed::AuthUserChangePassword(req), caller.as_ref())
            .await?;
        Ok(Response::new(AuthUserChangePasswordResponse {
            header: self.reader.header(rev),
        }))
    }

    /// UserGet: root, or the user itself (etcd `authApplierV3.UserGet`). Errors: "user name
    /// not found", and the admin check's.
    async fn user_get(
        &self,
        request: Request<AuthUserGetRequest>,
    ) -> Result<Response<AuthUserGetResponse>, Status> {
        let caller = self.who(&request).await?;
        let header = self.read_header().await?;
        let name = &request.get_ref().name;
        if let Err(e) = self.access.check_admin(caller.as_ref()) {
            if caller.as_ref().map(|c| &c.user) != Some(name) {
                return Err(e.into());
            }
        }
        let roles = self.access.store().read(|a| a.user_get(name))?;
        Ok(Response::new(AuthUserGetResponse { header, roles }))
    }

    /// UserList (root only while auth is enabled).
    async fn user_list(
        &self,
        request: Request<AuthUserListRequest>,
    ) -> Result<Response<AuthUserListResponse>, Status> {
        let caller = self.who(&request).await?;
        let header = self.read_header().await?;
        self.access.check_admin(caller.as_ref())?;
        let users = self.access.store().read(|a| a.user_list());
        Ok(Response::new(AuthUserListResponse { header, users }))
    }

    /// RoleGet: root, or a holder of the role (etcd `authApplierV3.RoleGet`). Errors: "role
    /// name not found", and the admin check's.
    async fn role_get(
        &self,
        request: Request<AuthRoleGetRequest>,
    ) -> Result<Response<AuthRoleGetResponse>, Status> {
        let caller = self.who(&request).await?;
        let header = self.read_header().await?;
        let role = &request.get_ref().role;
        if let Err(e) = self.access.check_admin(caller.as_ref()) {
            let user = caller.as_ref().map_or("", |c| c.user.as_str());
            if !self.access.store().read(|a| a.has_role(user, role)) {
                return Err(e.into());
            }
        }
        let perm = self.access.store().read(|a| a.role_get(role))?;
        Ok(Response::new(AuthRoleGetResponse { header, perm }))
    }

    /// RoleList (root only while auth is enabled).
    async fn role_list(
        &self,
        request: Request<AuthRoleListRequest>,
    ) -> Result<Response<AuthRoleListResponse>, Status> {
        let caller = self.who(&request).await?;
        let header = self.read_header().await?;
        self.access.check_admin(caller.as_ref())?;
        let roles = self.access.store().read(|a| a.role_list());
        Ok(Response::new(AuthRoleListResponse { header, roles }))
    }
}
