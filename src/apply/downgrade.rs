//! The replicated downgrade state, as etcd 3.5 keeps it (`server/etcdserver/api/membership/
//! downgrade.go` `DowngradeInfo`, stored by `cluster.go` `SetDowngradeInfo` under the `downgrade`
//! key of the cluster bucket): whether a cluster downgrade is enabled, and to which version.
//!
//! Maintenance.Downgrade ENABLE and CANCEL travel through the Raft log
//! ([`crate::proto::metastorepb::proposal::Request::DowngradeInfoSet`], etcd's
//! `InternalRaftRequest.DowngradeInfoSet`) and are applied by the dispatcher on every member
//! ([`apply`], etcd `applierV3backend.DowngradeInfoSet` in `server/etcdserver/apply.go`), so
//! every member holds the same state: a CANCEL on one member ends a downgrade enabled on
//! another. The state goes into snapshots (`StateSnapshot.downgrade`) and is rebuilt from the
//! WAL on restart, as the alarm table is ([`super::alarms`]).
//!
//! **What enabling means here.** Every MetaStore member runs the one version it reports (server
//! 3.5.x, cluster version [`crate::server::http::CLUSTER_VERSION`], "3.5.0") and cannot run as
//! 3.4. Enabling a downgrade only records the target and reports it (Downgrade VALIDATE and
//! ENABLE answer "etcdserver: cluster has a downgrade job in progress" until it is cancelled);
//! no member changes its version, and the cluster version, `/version` and
//! `etcd_cluster_version` stay "3.5.0", as in etcd 3.5 until members are replaced. etcd's
//! leader cancels the downgrade itself once every member runs the target version
//! (`server.go` `monitorDowngrade`); here that never happens, so it lasts until a CANCEL.
//! etcd 3.5 refuses to restart a 3.5 member while a downgrade to 3.4 is enabled
//! (`downgrade.go` `mustDetectDowngrade`, "invalid downgrade; server version is not allowed to
//! join when downgrade is enabled"); a MetaStore member cannot be replaced by a 3.4 binary, so
//! it restarts and keeps the state instead, logging a warning with etcd's words when it
//! recovers the state from a snapshot ([`SharedDowngrade::restore`]; an ENABLE replayed from the
//! WAL logs etcd's "The server is ready to downgrade" again).

use std::sync::{Arc, RwLock};

use crate::error::EtcdError;
use crate::proto::metastorepb::DowngradeInfo;

/// A cluster version as etcd keeps it: major.minor (the patch is always 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterVersion {
    /// Major version.
    pub major: i64,
    /// Minor version.
    pub minor: i64,
}

impl std::fmt::Display for ClusterVersion {
    /// "major.minor.0", as etcd's `semver.Version{Major, Minor}.String()`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.0", self.major, self.minor)
    }
}

impl ClusterVersion {
    /// The cluster version of a downgrade request's `version` (etcd 3.5
    /// `server/etcdserver/cluster_util.go` `convertToClusterVersion`): a semantic version
    /// "major.minor.patch[-pre][+meta]", or "major.minor" (etcd retries with ".0" appended); the
    /// patch, pre-release and metadata are dropped.
    ///
    /// Errors: [`EtcdError::WrongDowngradeVersionFormat`] ("etcdserver: wrong downgrade target
    /// version format", InvalidArgument; etcd `ErrWrongDowngradeVersionFormat`) when neither
    /// form parses.
    pub fn parse_target(v: &str) -> Result<ClusterVersion, EtcdError> {
        parse_semver(v)
            .or_else(|| parse_semver(&format!("{v}.0")))
            .map(|(major, minor)| ClusterVersion { major, minor })
            .ok_or(EtcdError::WrongDowngradeVersionFormat)
    }

    /// The only version this cluster version may be downgraded to: one minor version below
    /// (etcd `membership.AllowedDowngradeVersion`, which leaves major-version downgrades to a
    /// "Todo": 3.0's is "3.-1.0", which no target matches).
    pub fn allowed_downgrade(self) -> ClusterVersion {
        ClusterVersion {
            major: self.major,
            minor: self.minor - 1,
        }
    }
}

/// go-semver v0.3.0 `Version.Set` (what etcd 3.5 parses versions with): metadata after the first
/// '+', pre-release after the first '-' of what is left, each a dot-separated list of
/// non-empty `[0-9A-Za-z-]` identifiers; then exactly three dot-separated decimal integers
/// within i64. Returns (major, minor).
fn parse_semver(version: &str) -> Option<(i64, i64)> {
    let (version, metadata) = version.split_once('+').unwrap_or((version, ""));
    let (version, pre_release) = version.split_once('-').unwrap_or((version, ""));
    let parts: Vec<&str> = version.splitn(3, '.').collect();
    if parts.len() != 3 || !identifiers(pre_release) || !identifiers(metadata) {
        return None;
    }
    let mut numbers = [0i64; 3];
    for (n, part) in numbers.iter_mut().zip(&parts) {
        *n = go_parse_int(part)?;
    }
    Some((numbers[0], numbers[1]))
}

/// go-semver's `validateIdentifier`: empty, or `^[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*$`.
fn identifiers(id: &str) -> bool {
    id.is_empty()
        || id.split('.').all(|part| {
            !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Go's `strconv.ParseInt(s, 10, 64)` on what is left once '+' and '-' were split off: one or
/// more ASCII digits, within i64.
fn go_parse_int(s: &str) -> Option<i64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The checks of etcd 3.5's `downgradeValidate` (`server/etcdserver/v3_server.go`) after its
/// linearizable read: `target` must be the version `cluster` may be downgraded to, and no
/// downgrade may be enabled already.
///
/// Errors, in etcd's order: [`EtcdError::InvalidDowngradeTargetVersion`] ("etcdserver: invalid
/// downgrade target version", InvalidArgument; etcd `ErrInvalidDowngradeTargetVersion`) for any
/// other target; [`EtcdError::DowngradeInProcess`] ("etcdserver: cluster has a downgrade job in
/// progress", FailedPrecondition; etcd `ErrDowngradeInProcess`) while one is enabled.
pub fn validate(
    target: ClusterVersion,
    cluster: ClusterVersion,
    state: &DowngradeInfo,
) -> Result<(), EtcdError> {
    if target != cluster.allowed_downgrade() {
        return Err(EtcdError::InvalidDowngradeTargetVersion);
    }
    if state.enabled {
        return Err(EtcdError::DowngradeInProcess);
    }
    Ok(())
}

/// The check of etcd 3.5's `downgradeCancel` after its linearizable read.
///
/// Errors: [`EtcdError::NoInflightDowngrade`] ("etcdserver: no inflight downgrade job",
/// FailedPrecondition; etcd `ErrNoInflightDowngrade`) when no downgrade is enabled.
pub fn check_cancel(state: &DowngradeInfo) -> Result<(), EtcdError> {
    if state.enabled {
        Ok(())
    } else {
        Err(EtcdError::NoInflightDowngrade)
    }
}

/// Applies a committed DowngradeInfoSet as etcd 3.5's `applierV3backend.DowngradeInfoSet`
/// (`server/etcdserver/apply.go`): enabled sets the target version, disabled clears it
/// (whatever the request's version). Logs etcd's "The server is ready to downgrade" when
/// enabled (`cluster.go` `SetDowngradeInfo`), and, since this member keeps its own version,
/// the warning etcd's `mustDetectDowngrade` would end the member with.
pub fn apply(state: &mut DowngradeInfo, request: &DowngradeInfo) {
    *state = if request.enabled {
        DowngradeInfo {
            enabled: true,
            target_version: request.target_version.clone(),
        }
    } else {
        DowngradeInfo::default()
    };
    if state.enabled {
        tracing::info!(
            target_version = %state.target_version,
            "The server is ready to downgrade"
        );
    } else {
        tracing::info!("the cluster downgrade is cancelled");
    }
}

/// The downgrade state shared between the dispatcher (the only writer, as it applies
/// DowngradeInfoSet) and the front end (Maintenance.Downgrade).
#[derive(Clone, Debug, Default)]
pub struct SharedDowngrade(Arc<RwLock<DowngradeInfo>>);

impl SharedDowngrade {
    /// A copy of the state.
    pub fn get(&self) -> DowngradeInfo {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the state (a snapshot's, or none: no downgrade). An enabled downgrade is
    /// logged with the warning etcd 3.5 ends the member with (`mustDetectDowngrade`, which
    /// etcd runs as it recovers the cluster state at start-up and from a leader's snapshot).
    pub fn restore(&self, state: Option<&DowngradeInfo>) {
        let state = state.cloned().unwrap_or_default();
        if state.enabled {
            warn_enabled(&state);
        }
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = state;
    }

    /// Applies a committed DowngradeInfoSet (see [`apply`]); the dispatcher only.
    pub fn apply(&self, request: &DowngradeInfo) {
        apply(
            &mut self.0.write().unwrap_or_else(|e| e.into_inner()),
            request,
        );
    }

    /// The state as a snapshot records it: `None` when no downgrade is enabled (never, or
    /// cancelled since; etcd stores `{"enabled":false}` after a cancel, which means the same).
    pub fn to_snapshot(&self) -> Option<DowngradeInfo> {
        let state = self.get();
        state.enabled.then_some(state)
    }
}

/// etcd's `mustDetectDowngrade` check, as a warning: this member's version is not the target.
fn warn_enabled(state: &DowngradeInfo) {
    tracing::warn!(
        target_cluster_version = %state.target_version,
        "invalid downgrade; server version is not allowed to join when downgrade is enabled \
         (etcd 3.5 would stop here; MetaStore cannot run as the target version, so it keeps \
         serving with the downgrade still enabled until it is cancelled)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const V35: ClusterVersion = ClusterVersion { major: 3, minor: 5 };

    fn target(v: &str) -> Result<ClusterVersion, EtcdError> {
        ClusterVersion::parse_target(v)
    }

    #[test]
    fn targets_parse_as_etcds_convert_to_cluster_version() {
        let v34 = ClusterVersion { major: 3, minor: 4 };
        for ok in [
            "3.4",
            "3.4.0",
            "3.4.9",
            "3.4.0-rc.1",
            "3.4.1+build.5",
            "3.4.0-",
            "3.4.0+",
        ] {
            assert_eq!(target(ok), Ok(v34), "{ok}");
        }
        assert_eq!(target("2.0"), Ok(ClusterVersion { major: 2, minor: 0 }));
        for bad in [
            "",
            "abc",
            "3",
            "3.",
            "3.4.",
            "v3.4",
            "3.4.0.0",
            "3.4.x",
            "3.4-rc",
            "3.4.0+a..b",
            " 3.4",
            "3.4.0-rc_1",
            "+3.4",
            "3.4.99999999999999999999",
        ] {
            assert_eq!(
                target(bad),
                Err(EtcdError::WrongDowngradeVersionFormat),
                "{bad:?}"
            );
        }
        assert_eq!(v34.to_string(), "3.4.0");
        assert_eq!(V35.allowed_downgrade(), v34);
    }

    #[test]
    fn validate_and_cancel_follow_etcds_checks() {
        let none = DowngradeInfo::default();
        let v34 = target("3.4").unwrap();
        assert_eq!(validate(v34, V35, &none), Ok(()));
        for wrong in ["3.5", "3.6", "2.0", "4.4", "3.3"] {
            assert_eq!(
                validate(target(wrong).unwrap(), V35, &none),
                Err(EtcdError::InvalidDowngradeTargetVersion),
                "{wrong}"
            );
        }
        let mut state = DowngradeInfo::default();
        assert_eq!(check_cancel(&state), Err(EtcdError::NoInflightDowngrade));
        apply(
            &mut state,
            &DowngradeInfo {
                enabled: true,
                target_version: v34.to_string(),
            },
        );
        assert_eq!(
            state,
            DowngradeInfo {
                enabled: true,
                target_version: "3.4.0".into()
            }
        );
        assert_eq!(
            validate(v34, V35, &state),
            Err(EtcdError::DowngradeInProcess)
        );
        // The target is checked first, as in etcd.
        assert_eq!(
            validate(target("3.6").unwrap(), V35, &state),
            Err(EtcdError::InvalidDowngradeTargetVersion)
        );
        assert_eq!(check_cancel(&state), Ok(()));
        // A cancel clears the target whatever version it carries.
        apply(
            &mut state,
            &DowngradeInfo {
                enabled: false,
                target_version: "3.4.0".into(),
            },
        );
        assert_eq!(state, DowngradeInfo::default());
        assert_eq!(check_cancel(&state), Err(EtcdError::NoInflightDowngrade));
    }

    #[test]
    fn shared_state_round_trips_through_a_snapshot() {
        let shared = SharedDowngrade::default();
        assert_eq!(shared.to_snapshot(), None);
        let enabled = DowngradeInfo {
            enabled: true,
            target_version: "3.4.0".into(),
        };
        shared.apply(&enabled);
        assert_eq!(shared.to_snapshot(), Some(enabled.clone()));
        let restored = SharedDowngrade::default();
        restored.restore(shared.to_snapshot().as_ref());
        assert_eq!(restored.get(), enabled);
        restored.restore(None);
        assert_eq!(restored.get(), DowngradeInfo::default());
    }
}
