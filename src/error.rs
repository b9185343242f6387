//! The one place where failures become etcd's gRPC statuses.
//!
//! Two kinds of failure are kept apart (as openraft splits `StorageError`/`Fatal` from the
//! per-call API errors):
//! * [`EtcdError`], here: a *request* failed; the member goes on serving. It maps to etcd's
//!   exact gRPC status. Messages are copied from etcd's `api/v3rpc/rpctypes/error.go`: clients
//!   (Go clientv3, etcdctl, Kubernetes) match on the exact text, so it is part of the API.
//! * [`crate::fatal::FatalError`]: the *member* cannot go on (damaged data, a failed write or
//!   fsync). It is never sent to a client.

use tonic::{Code, Status};

/// A request failure as etcd reports it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EtcdError {
    /// Empty key in a request (InvalidArgument).
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    /// `ignore_value`/`ignore_lease` on a missing key, or an empty txn op (InvalidArgument).
    #[error("etcdserver: key not found")]
    KeyNotFound,
    /// A value with `ignore_value` (InvalidArgument).
    #[error("etcdserver: value is provided")]
    ValueProvided,
    /// A lease with `ignore_lease` (InvalidArgument).
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    /// More compares or ops than `--max-txn-ops` (InvalidArgument).
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    /// Overlapping writes in one txn branch (InvalidArgument).
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    /// Unknown sort order or target (InvalidArgument).
    #[error("etcdserver: invalid sort option")]
    InvalidSortOption,
    /// Encoded request above `--max-request-bytes` (InvalidArgument).
    #[error("etcdserver: request is too large")]
    RequestTooLarge,
    /// Revision below the compaction revision (OutOfRange).
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted,
    /// Revision above the current revision (OutOfRange).
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRev,
    /// Unknown lease ID (NotFound).
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    /// A grant for an ID already granted (FailedPrecondition).
    #[error("etcdserver: lease already exists")]
    LeaseExists,
    /// A TTL above 9,000,000,000 s (OutOfRange).
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    /// The backend is above `--quota-backend-bytes` (ResourceExhausted).
    #[error("etcdserver: mvcc: database space exceeded")]
    NoSpace,
    /// A CORRUPT alarm is active (etcd `ErrCorrupt`, rpctypes `ErrGRPCCorrupt`: DataLoss).
    /// While it is, writes, compactions and lease grants and revokes are refused, as etcd's
    /// `applierV3Corrupt` refuses them (see [`crate::apply::alarms::AlarmTable::refusal`]).
    #[error("etcdserver: corrupt cluster")]
    Corrupt,
    /// No Raft leader is known (Unavailable).
    #[error("etcdserver: no leader")]
    NoLeader,
    /// The server is shutting down (Unavailable).
    #[error("etcdserver: server stopped")]
    Stopped,
    /// A proposal or read did not complete in time; its outcome is unknown (Unavailable).
    #[error("etcdserver: request timed out")]
    Timeout,
    /// The leader changed while a request waited (Unavailable).
    #[error("etcdserver: leader changed")]
    LeaderChanged,
    /// MemberAdd with an ID already in the cluster (FailedPrecondition).
    #[error("etcdserver: member ID already exist")]
    MemberExists,
    /// MemberAdd/MemberUpdate with a peer URL another member has (FailedPrecondition).
    #[error("etcdserver: Peer URLs already exists")]
    PeerUrlExists,
    /// An unknown or removed member ID (NotFound).
    #[error("etcdserver: member not found")]
    MemberNotFound,
    /// MemberAdd with a peer URL that does not parse (InvalidArgument).
    #[error("etcdserver: given member URLs are invalid")]
    MemberBadUrls,
    /// MemberPromote of a voter (FailedPrecondition).
    #[error("etcdserver: can only promote a learner member")]
    MemberNotLearner,
    /// MemberPromote of a learner that lags the leader (FailedPrecondition).
    #[error("etcdserver: can only promote a learner member which is in sync with leader")]
    LearnerNotReady,
    /// A second learner (etcd allows one) (FailedPrecondition).
    #[error("etcdserver: too many learner members in cluster")]
    TooManyLearners,
    /// A change that would leave too few started voters for a quorum (FailedPrecondition).
    #[error("etcdserver: re-configuration failed due to not enough started members")]
    NotEnoughStartedMembers,
    /// A change while this member is not connected to every voter (Unavailable).
    #[error("etcdserver: unhealthy cluster")]
    Unhealthy,
    /// MoveLeader sent to a member that is not the leader (FailedPrecondition).
    #[error("etcdserver: not leader")]
    NotLeader,
    /// MoveLeader to a learner or an unknown member (FailedPrecondition).
    #[error("etcdserver: bad leader transferee")]
    BadLeaderTransferee,
    /// MoveLeader that did not finish in time (Unknown, as etcd leaves it unmapped).
    #[error("etcdserver: request timed out, leader transfer took too long")]
    LeaderTransferTimeout,
    /// Anything but Status or a serializable Range sent to a learner (FailedPrecondition).
    #[error("etcdserver: rpc not supported for learner")]
    NotSupportedForLearner,
    /// A peer of another cluster (FailedPrecondition).
    #[error("etcdserver: cluster ID mismatch")]
    ClusterIdMismatch,
    /// Traffic from (or to) a member that was removed from the cluster (FailedPrecondition).
    #[error("etcdserver: the member has been permanently removed from the cluster")]
    MemberRemoved,
    /// A committed proposal that this build cannot decode (Internal). It is applied as a no-op
    /// on every member alike; etcd would panic instead (`pbutil.MustUnmarshal`).
    #[error("etcdserver: the request cannot be decoded from the raft log")]
    UndecodableProposal,
    /// AuthEnable without a `root` user (etcd `ErrGRPCRootUserNotExist`: FailedPrecondition).
    #[error("etcdserver: root user does not exist")]
    RootUserNotExist,
    /// AuthEnable while `root` lacks the `root` role (`ErrGRPCRootRoleNotExist`:
    /// FailedPrecondition).
    #[error("etcdserver: root user does not have root role")]
    RootRoleNotExist,
    /// UserAdd of an existing user (`ErrGRPCUserAlreadyExist`: FailedPrecondition).
    #[error("etcdserver: user name already exists")]
    UserAlreadyExist,
    /// An empty user name, or a request without a user while auth is enabled
    /// (`ErrGRPCUserEmpty`: InvalidArgument).
    #[error("etcdserver: user name is empty")]
    UserEmpty,
    /// An unknown user (`ErrGRPCUserNotFound`: FailedPrecondition).
    #[error("etcdserver: user name not found")]
    UserNotFound,
    /// RoleAdd of an existing role (`ErrGRPCRoleAlreadyExist`: FailedPrecondition).
    #[error("etcdserver: role name already exists")]
    RoleAlreadyExist,
    /// An unknown role (`ErrGRPCRoleNotFound`: FailedPrecondition).
    #[error("etcdserver: role name not found")]
    RoleNotFound,
    /// An empty role name (`ErrGRPCRoleEmpty`: InvalidArgument).
    #[error("etcdserver: role name is empty")]
    RoleEmpty,
    /// Authenticate with a wrong user or password (`ErrGRPCAuthFailed`: InvalidArgument).
    #[error("etcdserver: authentication failed, invalid user ID or password")]
    AuthFailed,
    /// RoleGrantPermission without a permission (`ErrGRPCPermissionNotGiven`:
    /// InvalidArgument).
    #[error("etcdserver: permission not given")]
    PermissionNotGiven,
    /// The caller's roles do not allow the request (`ErrGRPCPermissionDenied`:
    /// PermissionDenied).
    #[error("etcdserver: permission denied")]
    PermissionDenied,
    /// UserRevokeRole of a role the user lacks (`ErrGRPCRoleNotGranted`: FailedPrecondition).
    #[error("etcdserver: role is not granted to the user")]
    RoleNotGranted,
    /// RoleRevokePermission of a permission the role lacks (`ErrGRPCPermissionNotGranted`:
    /// FailedPrecondition).
    #[error("etcdserver: permission is not granted to the role")]
    PermissionNotGranted,
    /// Authenticate while auth is disabled (`ErrGRPCAuthNotEnabled`: FailedPrecondition).
    #[error("etcdserver: authentication is not enabled")]
    AuthNotEnabled,
    /// An unknown, expired or revoked token (`ErrGRPCInvalidAuthToken`: Unauthenticated).
    #[error("etcdserver: invalid auth token")]
    InvalidAuthToken,
    /// Deleting root or its role, or revoking root's role, while auth is enabled; a bad
    /// permission range (`ErrGRPCInvalidAuthMgmt`: InvalidArgument).
    #[error("etcdserver: invalid auth management")]
    InvalidAuthMgmt,
    /// The auth store changed after the caller was authenticated (`ErrGRPCAuthOldRevision`:
    /// InvalidArgument); clients authenticate again and retry.
    #[error("etcdserver: revision of auth store is old")]
    AuthOldRevision,
    /// A Downgrade target version that parses neither as "major.minor.patch" nor as
    /// "major.minor" (etcd 3.5 `ErrWrongDowngradeVersionFormat`, rpctypes
    /// `ErrGRPCWrongDowngradeVersionFormat`: InvalidArgument).
    #[error("etcdserver: wrong downgrade target version format")]
    WrongDowngradeVersionFormat,
    /// A Downgrade target version other than one minor version below the cluster version
    /// (`ErrGRPCInvalidDowngradeTargetVersion`: InvalidArgument).
    #[error("etcdserver: invalid downgrade target version")]
    InvalidDowngradeTargetVersion,
    /// Downgrade VALIDATE or ENABLE while a downgrade is enabled
    /// (`ErrGRPCDowngradeInProcess`: FailedPrecondition).
    #[error("etcdserver: cluster has a downgrade job in progress")]
    DowngradeInProcess,
    /// Downgrade CANCEL while no downgrade is enabled (`ErrGRPCNoInflightDowngrade`:
    /// FailedPrecondition).
    #[error("etcdserver: no inflight downgrade job")]
    NoInflightDowngrade,
    /// A Downgrade action that is not VALIDATE, ENABLE or CANCEL (etcd `ErrUnknownMethod`,
    /// which `togRPCError` leaves unmapped: Unknown).
    #[error("etcdserver: unknown method")]
    UnknownMethod,
    /// The apply dispatcher answered a proposal with a result of another kind: a broken
    /// invariant, not a client error (Internal). Every service maps it alike (see
    /// [`unexpected_apply_result`]); `Some(what)` names the request ("for put").
    #[error("etcdserver: unexpected apply result{}", .0.map_or(String::new(), |w| format!(" for {w}")))]
    UnexpectedApplyResult(Option<&'static str>),
    /// bcrypt failed to hash a password for UserAdd or UserChangePassword (Internal).
    #[error("etcdserver: cannot hash the password: {0}")]
    PasswordHash(String),
    /// The blocking task hashing a password panicked or was cancelled (Internal).
    #[error("etcdserver: hashing failed")]
    HashingFailed,
    /// A JWT could not be signed for Authenticate (Internal); the text is the signer's.
    #[error("etcdserver: {0}")]
    TokenSign(String),
    /// Snapshot: the state image taken from Raft does not decode (Internal).
    #[error("etcdserver: snapshot image: {0}")]
    SnapshotImage(String),
    /// An error etcd leaves unmapped: grpc-go sends its text as it is, with code Unknown.
    #[error("{0}")]
    Unknown(String),
    /// `clientv3/concurrency.ErrSessionExpired`: a Lock or Campaign lease is gone (Unknown,
    /// as the v3lock/v3election servers leave it unmapped).
    #[error("session: session is expired")]
    SessionExpired,
    /// `clientv3/concurrency.ErrElectionNotLeader`: the leader key named is not held (Unknown).
    #[error("election: not leader")]
    ElectionNotLeader,
    /// `clientv3/concurrency.ErrElectionNoLeader`: the election has no leader (Unknown).
    #[error("election: no leader")]
    ElectionNoLeader,
    /// `v3election.ErrMissingLeaderKey`: Proclaim or Resign without a leader key (Unknown).
    #[error("\"leader\" field must be provided")]
    MissingLeaderKey,
    /// A request message above the gRPC limit, in grpc-go's words (ResourceExhausted);
    /// `found` and `limit` are byte counts as tonic reported them.
    #[error("grpc: received message larger than max ({found} vs. {limit})")]
    MessageTooLarge {
        /// The message's size, bytes.
        found: String,
        /// The limit, bytes.
        limit: String,
    },
    /// Peer traffic addressed to another member (FailedPrecondition).
    #[error("etcdserver: message for member {to:x} reached member {member:x}")]
    MisdirectedPeerMessage {
        /// The member the message is for.
        to: u64,
        /// The member it reached.
        member: u64,
    },
    /// A Raft message from a peer that does not decode (InvalidArgument).
    #[error("undecodable raft message")]
    UndecodableRaftMessage,
    /// A snapshot stream from a peer without any chunk (InvalidArgument).
    #[error("empty snapshot stream")]
    EmptySnapshotStream,
    /// A snapshot stream whose first chunk is not a MsgSnapshot (InvalidArgument).
    #[error("the first chunk is not a raft snapshot")]
    NotASnapshot,
    /// The test fault hook cut the link to the sending peer (Unavailable).
    #[error("link cut by the test fault hook")]
    LinkCut,
    /// A snapshot stream with more bytes than its first chunk announced (InvalidArgument).
    #[error("snapshot longer than announced")]
    SnapshotTooLong,
    /// A snapshot stream that ended before the announced size (InvalidArgument).
    #[error("snapshot cut short: {got} of {total} bytes")]
    SnapshotCutShort {
        /// Bytes received.
        got: usize,
        /// Bytes announced.
        total: usize,
    },
    /// A received snapshot whose data is not a complete state image at the snapshot's index
    /// (InvalidArgument).
    #[error("snapshot data is not a complete state image at its index")]
    SnapshotIncomplete,
}

impl EtcdError {
    /// The gRPC code etcd uses for this error.
    pub fn code(&self) -> Code {
        use EtcdError::*;
        match self {
            EmptyKey | KeyNotFound | ValueProvided | LeaseProvided | TooManyOps | DuplicateKey
            | InvalidSortOption | RequestTooLarge => Code::InvalidArgument,
            Compacted | FutureRev | LeaseTtlTooLarge => Code::OutOfRange,
            LeaseExists
            | MemberExists
            | PeerUrlExists
            | MemberNotLearner
            | LearnerNotReady
            | TooManyLearners
            | NotEnoughStartedMembers
            | NotLeader
            | BadLeaderTransferee
            | NotSupportedForLearner
            | ClusterIdMismatch
            | MemberRemoved => Code::FailedPrecondition,
            LeaseNotFound | MemberNotFound => Code::NotFound,
            MemberBadUrls => Code::InvalidArgument,
            NoSpace => Code::ResourceExhausted,
            Corrupt => Code::DataLoss,
            NoLeader | LeaderChanged | Stopped | Timeout | Unhealthy => Code::Unavailable,
            LeaderTransferTimeout => Code::Unknown,
            UndecodableProposal | UnexpectedApplyResult(_) => Code::Internal,
            WrongDowngradeVersionFormat | InvalidDowngradeTargetVersion => Code::InvalidArgument,
            DowngradeInProcess | NoInflightDowngrade => Code::FailedPrecondition,
            UnknownMethod => Code::Unknown,
            UserEmpty | RoleEmpty | AuthFailed | PermissionNotGiven | InvalidAuthMgmt
            | AuthOldRevision => Code::InvalidArgument,
            RootUserNotExist | RootRoleNotExist | UserAlreadyExist | UserNotFound
            | RoleAlreadyExist | RoleNotFound | RoleNotGranted | PermissionNotGranted
            | AuthNotEnabled => Code::FailedPrecondition,
            PermissionDenied => Code::PermissionDenied,
            InvalidAuthToken => Code::Unauthenticated,
            PasswordHash(_) | HashingFailed | TokenSign(_) | SnapshotImage(_) => Code::Internal,
            Unknown(_) | SessionExpired | ElectionNotLeader | ElectionNoLeader
            | MissingLeaderKey => Code::Unknown,
            MessageTooLarge { .. } => Code::ResourceExhausted,
            MisdirectedPeerMessage { .. } => Code::FailedPrecondition,
            UndecodableRaftMessage
            | EmptySnapshotStream
            | NotASnapshot
            | SnapshotTooLong
            | SnapshotCutShort { .. }
            | SnapshotIncomplete => Code::InvalidArgument,
            LinkCut => Code::Unavailable,
        }
    }
}

impl From<EtcdError> for Status {
    fn from(e: EtcdError) -> Status {
        Status::new(e.code(), e.to_string())
    }
}

/// What every service answers when the apply dispatcher replies with a result of the wrong
/// kind for the request `what` (a broken invariant, not a client error):
/// [`EtcdError::UnexpectedApplyResult`], "etcdserver: unexpected apply result for {what}"
/// (Internal). The same in every service.
pub fn unexpected_apply_result(what: &'static str) -> EtcdError {
    EtcdError::UnexpectedApplyResult(Some(what))
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_match_etcd() {
        let s = Status::from(EtcdError::Compacted);
        assert_eq!(s.code(), Code::OutOfRange);
        assert_eq!(
            s.message(),
            "etcdserver: mvcc: required revision has been compacted"
        );
        let s = Status::from(EtcdError::DuplicateKey);
        assert_eq!(
            (s.code(), s.message()),
            (
                Code::InvalidArgument,
                "etcdserver: duplicate key given in txn request"
            )
        );
        let s = Status::from(EtcdError::Corrupt);
        assert_eq!(
            (s.code(), s.message()),
            (Code::DataLoss, "etcdserver: corrupt cluster")
        );
        let s = Status::from(unexpected_apply_result("put"));
        assert_eq!(
            (s.code(), s.message()),
            (
                Code::Internal,
                "etcdserver: unexpected apply result for put"
            )
        );
        let s = Status::from(EtcdError::UnexpectedApplyResult(None));
        assert_eq!(s.message(), "etcdserver: unexpected apply result");
    }

    #[test]
    fn member_and_recipe_statuses_keep_their_text() {
        let s = Status::from(EtcdError::MisdirectedPeerMessage {
            to: 0x1a,
            member: 0xff,
        });
        assert_eq!(
            (s.code(), s.message()),
            (
                Code::FailedPrecondition,
                "etcdserver: message for member 1a reached member ff"
            )
        );
        let s = Status::from(EtcdError::SnapshotCutShort { got: 3, total: 10 });
        assert_eq!(
            (s.code(), s.message()),
            (Code::InvalidArgument, "snapshot cut short: 3 of 10 bytes")
        );
        let s = Status::from(EtcdError::MissingLeaderKey);
        assert_eq!(
            (s.code(), s.message()),
            (Code::Unknown, "\"leader\" field must be provided")
        );
        let s = Status::from(EtcdError::SessionExpired);
        assert_eq!(
            (s.code(), s.message()),
            (Code::Unknown, "session: session is expired")
        );
        let s = Status::from(EtcdError::MessageTooLarge {
            found: "3000017".into(),
            limit: "2097152".into(),
        });
        assert_eq!(
            (s.code(), s.message()),
            (
                Code::ResourceExhausted,
                "grpc: received message larger than max (3000017 vs. 2097152)"
            )
        );
        let s = Status::from(EtcdError::PasswordHash("cost".into()));
        assert_eq!(
            (s.code(), s.message()),
            (Code::Internal, "etcdserver: cannot hash the password: cost")
        );
        let s = Status::from(EtcdError::InvalidDowngradeTargetVersion);
        assert_eq!(
            (s.code(), s.message()),
            (
                Code::InvalidArgument,
                "etcdserver: invalid downgrade target version"
            )
        );
        let s = Status::from(EtcdError::NoInflightDowngrade);
        assert_eq!(
            (s.code(), s.message()),
            (
                Code::FailedPrecondition,
                "etcdserver: no inflight downgrade job"
            )
        );
        let s = Status::from(EtcdError::LinkCut);
        assert_eq!(s.code(), Code::Unavailable);
    }
}
