//! The replicated auth store, as etcd 3.5's `server/auth/store.go` keeps it: users (name,
//! bcrypt hash, roles, `no_password`), roles (key permissions), the enabled flag and the auth
//! revision, bumped by every change (etcd `commitRevision`; AuthEnable does not bump it,
//! AuthDisable does).
//!
//! Changes travel through the Raft log (`metastorepb.Proposal` `auth_*`) and are applied by the
//! dispatcher on every member, so every member holds the same store; it goes into snapshots
//! (`StateSnapshot.auth`) and is rebuilt from the WAL on restart, like the alarm table.
//! Passwords are hashed by the member that receives UserAdd/UserChangePassword, before
//! proposing (etcd 3.5 `hashedPassword`): neither the log nor snapshots hold a password.
//!
//! Permission checks follow etcd's `isOpPermitted` and `range_perm_cache.go`: a request is
//! allowed when the union of the caller's roles' intervals of the right type covers its key
//! or range; the `root` role may do anything. Tokens are in [`token`].

pub mod token;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use crate::error::EtcdError;
use crate::proto::authpb::{permission::Type as PermType, Permission, Role, User, UserAddOptions};
use crate::proto::etcdserverpb::{request_op::Request as OpRequest, TxnRequest};
use crate::proto::metastorepb::{proposal::Request as Proposed, AuthHeader, AuthState};

/// The name of the super user and of the super role (etcd `rootUser`, `rootRole`).
pub const ROOT: &str = "root";

/// Who makes a request, as the receiving member authenticated it (etcd `AuthInfo`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthInfo {
    /// The user name.
    pub user: String,
    /// The auth revision the caller was authenticated at: the store's at the time for simple
    /// tokens and certificate CNs, the one inside the token for JWT.
    pub revision: u64,
}

impl AuthInfo {
    /// The header a proposal made for this caller carries (`None`: no caller).
    pub fn header(info: Option<&AuthInfo>) -> AuthHeader {
        info.map(|i| AuthHeader {
            username: i.user.clone(),
            revision: i.revision,
        })
        .unwrap_or_default()
    }
}

/// The auth store. Every method that changes it returns the error etcd's `authStore` returns,
/// leaving it unchanged.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AuthStore {
    enabled: bool,
    revision: u64,
    users: BTreeMap<String, User>,
    roles: BTreeMap<String, Role>,
}

/// A half-open key interval; `None` end: to the end of the keyspace.
type Interval = (Vec<u8>, Option<Vec<u8>>);

/// The interval a key and range end name (etcd's convention: empty end: the key alone; `\0`:
/// every key from `key` on).
fn interval(key: &[u8], range_end: &[u8]) -> Interval {
    if range_end.is_empty() {
        let mut end = key.to_vec();
        end.push(0);
        (key.to_vec(), Some(end))
    } else if range_end == [0] {
        (key.to_vec(), None)
    } else {
        (key.to_vec(), Some(range_end.to_vec()))
    }
}

/// Whether `[start, end)` is inside the union of `ivs`.
fn covered(mut ivs: Vec<Interval>, want: &Interval) -> bool {
    ivs.sort_by(|a, b| a.0.cmp(&b.0));
    // Walk the sorted intervals, extending how far from `want.0` on is covered.
    let mut reach: Option<Option<Vec<u8>>> = None; // Some(end): covered [want.0, end)
    for (s, e) in ivs {
        let start_ok = match &reach {
            None => s <= want.0,
            Some(None) => return true,
            Some(Some(r)) => s <= *r,
        };
        if !start_ok {
            if reach.is_none() {
                continue;
            }
            break;
        }
        // Intervals before want.0 that end before it do not help.
        if reach.is_none() {
            if let Some(end) = &e {
                if *end <= want.0 {
                    continue;
                }
            }
        }
        reach = Some(match (reach.take().flatten(), e) {
            (_, None) => None,
            (None, Some(e)) => Some(e),
            (Some(r), Some(e)) => Some(r.max(e)),
        });
    }
    match (reach, &want.1) {
        (Some(None), _) => true,
        (Some(Some(_)), None) | (None, _) => false,
        (Some(Some(r)), Some(end)) => r >= *end,
    }
}

/// etcd `isValidPermissionRange`: a key is needed; the range end, if any, is after it or
/// `\0`.
fn valid_permission_range(key: &[u8], range_end: &[u8]) -> bool {
    !key.is_empty() && (range_end.is_empty() || range_end == [0] || key < range_end)
}

impl AuthStore {
    /// The store a snapshot recorded.
    pub fn from_state(s: &AuthState) -> AuthStore {
        AuthStore {
            enabled: s.enabled,
            revision: s.revision,
            users: s
                .users
                .iter()
                .map(|u| (String::from_utf8_lossy(&u.name).into_owned(), u.clone()))
                .collect(),
            roles: s
                .roles
                .iter()
                .map(|r| (String::from_utf8_lossy(&r.name).into_owned(), r.clone()))
                .collect(),
        }
    }

    /// The store as snapshots record it.
    pub fn to_state(&self) -> AuthState {
        AuthState {
            enabled: self.enabled,
            revision: self.revision,
            users: self.users.values().cloned().collect(),
            roles: self.roles.values().cloned().collect(),
        }
    }

    /// Whether auth is enabled.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The auth revision: bumped by every change.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// A user.
    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.get(name)
    }

    fn bump(&mut self) {
        self.revision += 1;
    }

    /// etcd `AuthEnable`: needs a `root` user holding the `root` role. Enabling twice is a
    /// no-op. Errors: RootUserNotExist, RootRoleNotExist.
    pub fn enable(&mut self) -> Result<(), EtcdError> {
        if self.enabled {
            return Ok(());
        }
        let root = self.users.get(ROOT).ok_or(EtcdError::RootUserNotExist)?;
        if !root.roles.iter().any(|r| r == ROOT) {
            return Err(EtcdError::RootRoleNotExist);
        }
        self.enabled = true;
        Ok(())
    }

    /// etcd `AuthDisable` (bumps the revision; disabling twice is a no-op). Returns whether it
    /// was enabled.
    pub fn disable(&mut self) -> bool {
        if !self.enabled {
            return false;
        }
        self.enabled = false;
        self.bump();
        true
    }

    /// etcd `UserAdd` with the hash already made. Errors: UserEmpty, UserAlreadyExist.
    pub fn user_add(
        &mut self,
        name: &str,
        hash: &str,
        options: Option<UserAddOptions>,
    ) -> Result<(), EtcdError> {
        if name.is_empty() {
            return Err(EtcdError::UserEmpty);
        }
        if self.users.contains_key(name) {
            return Err(EtcdError::UserAlreadyExist);
        }
        let options = options.unwrap_or_default();
        let password = if options.no_password {
            Vec::new()
        } else {
            hash.as_bytes().to_vec()
        };
        self.users.insert(
            name.to_string(),
            User {
                name: name.as_bytes().to_vec(),
                password,
                roles: Vec::new(),
                options: Some(options),
            },
        );
        self.bump();
        Ok(())
    }

    /// etcd `UserDelete`. Errors: InvalidAuthMgmt (root while enabled), UserNotFound.
    pub fn user_delete(&mut self, name: &str) -> Result<(), EtcdError> {
        if self.enabled && name == ROOT {
            return Err(EtcdError::InvalidAuthMgmt);
        }
        self.users.remove(name).ok_or(EtcdError::UserNotFound)?;
        self.bump();
        Ok(())
    }

    /// etcd `UserChangePassword` with the hash already made. Errors: UserNotFound.
    pub fn user_change_password(&mut self, name: &str, hash: &str) -> Result<(), EtcdError> {
        let user = self.users.get_mut(name).ok_or(EtcdError::UserNotFound)?;
        user.password = hash.as_bytes().to_vec();
        self.bump();
        Ok(())
    }

    /// etcd `UserGrantRole` (`root` needs no role entry; granting a role twice changes
    /// nothing). Errors: UserNotFound, RoleNotFound.
    pub fn user_grant_role(&mut self, name: &str, role: &str) -> Result<(), EtcdError> {
        if !self.users.contains_key(name) {
            return Err(EtcdError::UserNotFound);
        }
        if role != ROOT && !self.roles.contains_key(role) {
            return Err(EtcdError::RoleNotFound);
        }
        let user = self.users.get_mut(name).expect("checked");
        match user.roles.binary_search_by(|r| r.as_str().cmp(role)) {
            Ok(_) => return Ok(()),
            Err(at) => user.roles.insert(at, role.to_string()),
        }
        self.bump();
        Ok(())
    }

    /// etcd `UserRevokeRole`. Errors: InvalidAuthMgmt (root's root role while enabled),
    /// UserNotFound, RoleNotGranted.
    pub fn user_revoke_role(&mut self, name: &str, role: &str) -> Result<(), EtcdError> {
        if self.enabled && name == ROOT && role == ROOT {
            return Err(EtcdError::InvalidAuthMgmt);
        }
        let user = self.users.get_mut(name).ok_or(EtcdError::UserNotFound)?;
        let at = user
            .roles
            .iter()
            .position(|r| r == role)
            .ok_or(EtcdError::RoleNotGranted)?;
        user.roles.remove(at);
        self.bump();
        Ok(())
    }

    /// etcd `UserGet`: the user's roles. Errors: UserNotFound.
    pub fn user_get(&self, name: &str) -> Result<Vec<String>, EtcdError> {
        self.users
            .get(name)
            .map(|u| u.roles.clone())
            .ok_or(EtcdError::UserNotFound)
    }

    /// etcd `UserList`: every user name, sorted.
    pub fn user_list(&self) -> Vec<String> {
        self.users.keys().cloned().collect()
    }

    /// etcd `RoleAdd`. Errors: RoleEmpty, RoleAlreadyExist.
    pub fn role_add(&mut self, name: &str) -> Result<(), EtcdError> {
        if name.is_empty() {
            return Err(EtcdError::RoleEmpty);
        }
        if self.roles.contains_key(name) {
            return Err(EtcdError::RoleAlreadyExist);
        }
        self.roles.insert(
            name.to_string(),
            Role {
                name: name.as_bytes().to_vec(),
                key_permission: Vec::new(),
            },
        );
        self.bump();
        Ok(())
    }

    /// etcd `RoleDelete`: the role goes from every user too. Errors: InvalidAuthMgmt (root
    /// while enabled), RoleNotFound.
    pub fn role_delete(&mut self, name: &str) -> Result<(), EtcdError> {
        if self.enabled && name == ROOT {
            return Err(EtcdError::InvalidAuthMgmt);
        }
        self.roles.remove(name).ok_or(EtcdError::RoleNotFound)?;
        for u in self.users.values_mut() {
            u.roles.retain(|r| r != name);
        }
        self.bump();
        Ok(())
    }

    /// etcd `RoleGet`: the role's permissions, sorted by key. Errors: RoleNotFound.
    pub fn role_get(&self, name: &str) -> Result<Vec<Permission>, EtcdError> {
        self.roles
            .get(name)
            .map(|r| r.key_permission.clone())
            .ok_or(EtcdError::RoleNotFound)
    }

    /// etcd `RoleList`: every role name, sorted.
    pub fn role_list(&self) -> Vec<String> {
        self.roles.keys().cloned().collect()
    }

    /// etcd `RoleGrantPermission`: a permission on the same key and range end is updated,
    /// others are added in key order. Errors: PermissionNotGiven, InvalidAuthMgmt (empty key,
    /// or range end not after the key), RoleNotFound.
    pub fn role_grant_permission(
        &mut self,
        name: &str,
        perm: Option<&Permission>,
    ) -> Result<(), EtcdError> {
        let perm = perm.ok_or(EtcdError::PermissionNotGiven)?;
        if !valid_permission_range(&perm.key, &perm.range_end) {
            return Err(EtcdError::InvalidAuthMgmt);
        }
        let role = self.roles.get_mut(name).ok_or(EtcdError::RoleNotFound)?;
        match role
            .key_permission
            .iter_mut()
            .find(|p| p.key == perm.key && p.range_end == perm.range_end)
        {
            Some(p) => p.perm_type = perm.perm_type,
            None => {
                role.key_permission.push(perm.clone());
                role.key_permission.sort_by(|a, b| a.key.cmp(&b.key));
            }
        }
        self.bump();
        Ok(())
    }

    /// etcd `RoleRevokePermission`. Errors: RoleNotFound, PermissionNotGranted.
    pub fn role_revoke_permission(
        &mut self,
        name: &str,
        key: &[u8],
        range_end: &[u8],
    ) -> Result<(), EtcdError> {
        let role = self.roles.get_mut(name).ok_or(EtcdError::RoleNotFound)?;
        let at = role
            .key_permission
            .iter()
            .position(|p| p.key == key && p.range_end == range_end)
            .ok_or(EtcdError::PermissionNotGranted)?;
        role.key_permission.remove(at);
        self.bump();
        Ok(())
    }

    /// Whether `user` holds `role` (etcd `HasRole`).
    pub fn has_role(&self, user: &str, role: &str) -> bool {
        self.users
            .get(user)
            .is_some_and(|u| u.roles.iter().any(|r| r == role))
    }

    /// etcd `IsAdminPermitted`: anyone while auth is disabled; else a user with the root role.
    /// Errors: UserEmpty (no user), UserNotFound, PermissionDenied.
    pub fn check_admin(&self, user: &str) -> Result<(), EtcdError> {
        if !self.enabled {
            return Ok(());
        }
        if user.is_empty() {
            return Err(EtcdError::UserEmpty);
        }
        let u = self.users.get(user).ok_or(EtcdError::UserNotFound)?;
        if !u.roles.iter().any(|r| r == ROOT) {
            return Err(EtcdError::PermissionDenied);
        }
        Ok(())
    }

    /// etcd `isOpPermitted`: whether `caller` (authenticated at `revision`; 0: nobody) may
    /// do `want` (READ or WRITE) on `key`/`range_end`. Errors: UserEmpty, AuthOldRevision
    /// (the store changed since `revision`), PermissionDenied.
    pub fn check(
        &self,
        user: &str,
        revision: u64,
        key: &[u8],
        range_end: &[u8],
        want: PermType,
    ) -> Result<(), EtcdError> {
        if !self.enabled {
            return Ok(());
        }
        if revision == 0 || user.is_empty() {
            return Err(EtcdError::UserEmpty);
        }
        if revision < self.revision {
            return Err(EtcdError::AuthOldRevision);
        }
        let u = self.users.get(user).ok_or(EtcdError::PermissionDenied)?;
        if u.roles.iter().any(|r| r == ROOT) {
            return Ok(());
        }
        let ivs: Vec<Interval> = u
            .roles
            .iter()
            .filter_map(|r| self.roles.get(r))
            .flat_map(|r| r.key_permission.iter())
            .filter(|p| p.perm_type == PermType::Readwrite as i32 || p.perm_type == want as i32)
            .map(|p| interval(&p.key, &p.range_end))
            .collect();
        if covered(ivs, &interval(key, range_end)) {
            Ok(())
        } else {
            Err(EtcdError::PermissionDenied)
        }
    }

    /// etcd `checkTxnAuth` (recursive, as etcd 3.5): READ on every compare and range; WRITE on
    /// every put and delete, plus READ on deletes with `prev_kv`.
    pub fn check_txn(&self, user: &str, revision: u64, t: &TxnRequest) -> Result<(), EtcdError> {
        for c in &t.compare {
            self.check(user, revision, &c.key, &c.range_end, PermType::Read)?;
        }
        for op in t.success.iter().chain(&t.failure) {
            match &op.request {
                Some(OpRequest::RequestRange(r)) => {
                    self.check(user, revision, &r.key, &r.range_end, PermType::Read)?
                }
                Some(OpRequest::RequestPut(p)) => {
                    self.check(user, revision, &p.key, &[], PermType::Write)?
                }
                Some(OpRequest::RequestDeleteRange(d)) => {
                    if d.prev_kv {
                        self.check(user, revision, &d.key, &d.range_end, PermType::Read)?;
                    }
                    self.check(user, revision, &d.key, &d.range_end, PermType::Write)?
                }
                Some(OpRequest::RequestTxn(n)) => self.check_txn(user, revision, n)?,
                None => {}
            }
        }
        Ok(())
    }

    /// What etcd's `authApplierV3` refuses of a client's proposal (`auth` is its header;
    /// none for the member's own requests, which act as root). `lease_keys` lists the keys
    /// attached to a lease (for LeaseRevoke and puts with a lease: WRITE on each, etcd
    /// `checkLeasePuts`).
    pub fn refusal(
        &self,
        auth: Option<&AuthHeader>,
        request: &Proposed,
        lease_keys: impl Fn(i64) -> Vec<Vec<u8>>,
    ) -> Option<EtcdError> {
        let h = auth?;
        if !self.enabled {
            return None;
        }
        let (user, rev) = (h.username.as_str(), h.revision);
        let lease_puts = |lease: i64| -> Result<(), EtcdError> {
            if lease == 0 {
                return Ok(());
            }
            for k in lease_keys(lease) {
                self.check(user, rev, &k, &[], PermType::Write)?;
            }
            Ok(())
        };
        let r = match request {
            Proposed::Put(p) => self
                .check(user, rev, &p.key, &[], PermType::Write)
                .and_then(|_| lease_puts(p.lease))
                .and_then(|_| {
                    if p.prev_kv {
                        self.check(user, rev, &p.key, &[], PermType::Read)
                    } else {
                        Ok(())
                    }
                }),
            Proposed::DeleteRange(d) => self
                .check(user, rev, &d.key, &d.range_end, PermType::Write)
                .and_then(|_| {
                    if d.prev_kv {
                        self.check(user, rev, &d.key, &d.range_end, PermType::Read)
                    } else {
                        Ok(())
                    }
                }),
            Proposed::Txn(t) => self.check_txn(user, rev, t),
            Proposed::LeaseRevoke(l) => lease_puts(l.id),
            // etcd checks no permission for a compaction (`needAdminPermission` leaves it out
            // and `authApplierV3` has no Compaction).
            Proposed::Compaction(_) => Ok(()),
            Proposed::AuthEnable(_)
            | Proposed::AuthDisable(_)
            | Proposed::AuthUserAdd(_)
            | Proposed::AuthUserDelete(_)
            | Proposed::AuthUserChangePassword(_)
            | Proposed::AuthUserGrantRole(_)
            | Proposed::AuthUserRevokeRole(_)
            | Proposed::AuthRoleAdd(_)
            | Proposed::AuthRoleDelete(_)
            | Proposed::AuthRoleGrantPermission(_)
            | Proposed::AuthRoleRevokePermission(_) => self.check_admin(user),
            Proposed::LeaseGrant(_)
            | Proposed::LeaseCheckpoint(_)
            | Proposed::Alarm(_)
            | Proposed::DowngradeInfoSet(_)
            | Proposed::Authenticate(_) => Ok(()),
        };
        r.err()
    }
}

/// The auth store and this member's tokens, shared between the dispatcher (the only writer of
/// the store) and the front end.
#[derive(Clone)]
pub struct SharedAuth {
    store: Arc<RwLock<AuthStore>>,
    /// This member's token provider.
    pub tokens: Arc<token::Tokens>,
}

impl SharedAuth {
    /// An empty store with `tokens`.
    pub fn new(tokens: token::Tokens) -> SharedAuth {
        SharedAuth {
            store: Default::default(),
            tokens: Arc::new(tokens),
        }
    }

    /// Runs `f` on the store.
    pub fn read<T>(&self, f: impl FnOnce(&AuthStore) -> T) -> T {
        f(&self.store.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Replaces the store (a snapshot's); every simple token goes (etcd's tokens are not in
    /// snapshots either).
    pub fn restore(&self, state: Option<&AuthState>) {
        let store = state.map(AuthStore::from_state).unwrap_or_default();
        *self.store.write().unwrap_or_else(|e| e.into_inner()) = store;
    }

    /// Applies an auth change (the dispatcher only), with its effect on tokens: a deleted
    /// user's or changed password's tokens go (etcd `invalidateUser`), and so do all of them
    /// when auth is disabled. An Authenticate at Raft index `index` assigns its simple token on
    /// every member. Returns the user, auth revision and simple token of an Authenticate.
    pub fn apply(&self, request: &Proposed, index: u64) -> Result<AuthApplied, EtcdError> {
        let mut s = self.store.write().unwrap_or_else(|e| e.into_inner());
        let done = AuthApplied::default();
        match request {
            Proposed::AuthEnable(_) => {
                s.enable()?;
                tracing::info!("enabled authentication");
            }
            Proposed::AuthDisable(_) if s.disable() => {
                self.tokens.clear();
                tracing::info!("disabled authentication");
            }
            Proposed::AuthUserAdd(r) => {
                s.user_add(&r.name, &r.hashed_password, r.options)?;
                tracing::info!(user = %r.name, "added a user");
            }
            Proposed::AuthUserDelete(r) => {
                s.user_delete(&r.name)?;
                self.tokens.invalidate_user(&r.name);
                tracing::info!(user = %r.name, "deleted a user");
            }
            Proposed::AuthUserChangePassword(r) => {
                s.user_change_password(&r.name, &r.hashed_password)?;
                self.tokens.invalidate_user(&r.name);
                tracing::info!(user = %r.name, "changed a password of a user");
            }
            Proposed::AuthUserGrantRole(r) => s.user_grant_role(&r.user, &r.role)?,
            Proposed::AuthUserRevokeRole(r) => s.user_revoke_role(&r.name, &r.role)?,
            Proposed::AuthRoleAdd(r) => s.role_add(&r.name)?,
            Proposed::AuthRoleDelete(r) => s.role_delete(&r.role)?,
            Proposed::AuthRoleGrantPermission(r) => {
                s.role_grant_permission(&r.name, r.perm.as_ref())?
            }
            Proposed::AuthRoleRevokePermission(r) => {
                s.role_revoke_permission(&r.role, &r.key, &r.range_end)?
            }
            Proposed::Authenticate(a) => {
                // etcd `Authenticate` in apply: the password was checked by the receiving
                // member.
                if !s.enabled {
                    return Err(EtcdError::AuthNotEnabled);
                }
                let user = s.users.get(&a.name).ok_or(EtcdError::AuthFailed)?;
                if user.options.is_some_and(|o| o.no_password) {
                    return Err(EtcdError::AuthFailed);
                }
                let token = if a.simple_token.is_empty() {
                    String::new()
                } else {
                    let t = format!("{}.{index}", a.simple_token);
                    self.tokens.assign_simple(&t, &a.name);
                    t
                };
                return Ok(AuthApplied {
                    user: a.name.clone(),
                    auth_revision: s.revision,
                    token,
                });
            }
            _ => {}
        }
        Ok(done)
    }
}

/// What an applied auth change returns: for Authenticate, the user, the auth revision and the
/// simple token assigned (empty with JWT; the proposing member signs one).
#[derive(Clone, Debug, Default)]
pub struct AuthApplied {
    /// The authenticated user.
    pub user: String,
    /// The auth revision at apply.
    pub auth_revision: u64,
    /// The simple token.
    pub token: String,
}

/// Whether `request` is an auth store request (applied by [`SharedAuth::apply`]).
pub fn is_auth_request(request: &Proposed) -> bool {
    matches!(
        request,
        Proposed::AuthEnable(_)
            | Proposed::AuthDisable(_)
            | Proposed::AuthUserAdd(_)
            | Proposed::AuthUserDelete(_)
            | Proposed::AuthUserChangePassword(_)
            | Proposed::AuthUserGrantRole(_)
            | Proposed::AuthUserRevokeRole(_)
            | Proposed::AuthRoleAdd(_)
            | Proposed::AuthRoleDelete(_)
            | Proposed::AuthRoleGrantPermission(_)
            | Proposed::AuthRoleRevokePermission(_)
            | Proposed::Authenticate(_)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn perm(t: PermType, key: &str, end: &str) -> Permission {
        Permission {
            perm_type: t as i32,
            key: key.into(),
            range_end: end.into(),
        }
    }

    fn store() -> AuthStore {
        let mut s = AuthStore::default();
        s.user_add(ROOT, "h", None).unwrap();
        s.user_grant_role(ROOT, ROOT).unwrap();
        s.user_add("u", "h", None).unwrap();
        s.role_add("r").unwrap();
        s.user_grant_role("u", "r").unwrap();
        s
    }

    #[test]
    fn enable_needs_root_with_root_role() {
        let mut s = AuthStore::default();
        assert_eq!(s.enable(), Err(EtcdError::RootUserNotExist));
        s.user_add(ROOT, "h", None).unwrap();
        assert_eq!(s.enable(), Err(EtcdError::RootRoleNotExist));
        s.user_grant_role(ROOT, ROOT).unwrap();
        let rev = s.revision();
        s.enable().unwrap();
        assert_eq!(s.revision(), rev, "enabling does not bump the revision");
        assert_eq!(s.user_delete(ROOT), Err(EtcdError::InvalidAuthMgmt));
        assert_eq!(
            s.user_revoke_role(ROOT, ROOT),
            Err(EtcdError::InvalidAuthMgmt)
        );
        assert!(s.disable());
        assert_eq!(s.revision(), rev + 1);
    }

    #[test]
    fn user_and_role_errors_match_etcd() {
        let mut s = store();
        assert_eq!(s.user_add("", "h", None), Err(EtcdError::UserEmpty));
        assert_eq!(s.user_add("u", "h", None), Err(EtcdError::UserAlreadyExist));
        assert_eq!(s.user_grant_role("x", "r"), Err(EtcdError::UserNotFound));
        assert_eq!(s.user_grant_role("u", "x"), Err(EtcdError::RoleNotFound));
        assert_eq!(s.user_revoke_role("u", "x"), Err(EtcdError::RoleNotGranted));
        assert_eq!(s.role_add("r"), Err(EtcdError::RoleAlreadyExist));
        assert_eq!(s.role_add(""), Err(EtcdError::RoleEmpty));
        assert_eq!(
            s.role_revoke_permission("r", b"a", b""),
            Err(EtcdError::PermissionNotGranted)
        );
        assert_eq!(
            s.role_grant_permission("r", None),
            Err(EtcdError::PermissionNotGiven)
        );
        s.role_delete("r").unwrap();
        assert!(
            s.user_get("u").unwrap().is_empty(),
            "deleted from users too"
        );
    }

    #[test]
    fn permissions_cover_keys_ranges_and_prefixes() {
        let mut s = store();
        s.role_grant_permission("r", Some(&perm(PermType::Read, "a", "c")))
            .unwrap();
        s.role_grant_permission("r", Some(&perm(PermType::Readwrite, "c", "e")))
            .unwrap();
        s.role_grant_permission("r", Some(&perm(PermType::Write, "k", "")))
            .unwrap();
        s.role_grant_permission("r", Some(&perm(PermType::Read, "z", "\0")))
            .unwrap();
        s.user_add("v", "h", None).unwrap();
        s.enable().unwrap();
        let rev = s.revision();
        let ok = |k: &str, e: &str, t| s.check("u", rev, k.as_bytes(), e.as_bytes(), t).is_ok();
        assert!(ok("a", "", PermType::Read));
        assert!(ok("a", "e", PermType::Read), "a union of two intervals");
        assert!(!ok("a", "f", PermType::Read));
        assert!(!ok("a", "", PermType::Write));
        assert!(ok("c", "e", PermType::Write));
        assert!(ok("k", "", PermType::Write));
        assert!(!ok("k", "l", PermType::Write));
        assert!(!ok("k", "", PermType::Read));
        assert!(ok("zz", "\0", PermType::Read));
        assert!(ok("z", "", PermType::Read));
        assert!(!ok("y", "\0", PermType::Read));
        assert_eq!(
            s.check("u", rev - 1, b"a", b"", PermType::Read),
            Err(EtcdError::AuthOldRevision)
        );
        assert_eq!(
            s.check("", 0, b"a", b"", PermType::Read),
            Err(EtcdError::UserEmpty)
        );
        assert_eq!(
            s.check("v", rev, b"a", b"", PermType::Read),
            Err(EtcdError::PermissionDenied)
        );
        assert!(s.check(ROOT, rev, b"x", b"\0", PermType::Write).is_ok());
        assert_eq!(s.check_admin("u"), Err(EtcdError::PermissionDenied));
        assert_eq!(s.check_admin("nobody"), Err(EtcdError::UserNotFound));
        assert_eq!(s.check_admin(""), Err(EtcdError::UserEmpty));
    }

    #[test]
    fn a_snapshot_round_trips() {
        let s = store();
        assert_eq!(AuthStore::from_state(&s.to_state()), s);
    }
}
