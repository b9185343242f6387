//! Why a member did not start, or stopped with a failure.

use crate::config::ConfigError;
use crate::fatal::FatalError;

/// A member that cannot start or go on. `main` prints it with its causes ("metastore:
/// error: ...") and exits 1. Messages name what failed (a file, a URL, a flag) as etcd's
/// start-up errors do; none reaches a client.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A flag, or a combination of flags, that cannot work.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `--auto-compaction-mode`/`--auto-compaction-retention` that do not parse.
    #[error("{0}")]
    AutoCompaction(String),
    /// A file or directory of the data dir cannot be used: `context` says which and what was
    /// being done ("cannot access data directory ...").
    #[error("{context}")]
    Io {
        /// The file or directory, and the operation.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A data directory whose parts do not fit together (locked by another process, written
    /// with another `--shards`, shards ahead of or behind the log, an unskippable damaged
    /// snapshot): serving from it would lose or invent acknowledged writes.
    #[error("{0}")]
    DataDir(String),
    /// A listener that cannot be bound.
    #[error("cannot listen on {what} URL {url}")]
    Listen {
        /// "client", "peer" or "metrics".
        what: &'static str,
        /// The URL.
        url: url::Url,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A new member cannot join: no member of the cluster has its peer URLs.
    #[error("{0}")]
    Join(String),
    /// Certificates or TLS settings.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// Taking over an etcd data directory failed.
    #[error(transparent)]
    Restore(#[from] crate::backup::restore::RestoreError),
    /// This member's identity file.
    #[error(transparent)]
    Identity(#[from] crate::identity::MemberError),
    /// Asking the cluster for its members failed.
    #[error(transparent)]
    Peer(#[from] crate::server::peer::PeerError),
    /// The snapshot directory.
    #[error(transparent)]
    Snapshot(#[from] crate::state_machine::snapshot::SnapshotError),
    /// The WAL or the Raft node.
    #[error(transparent)]
    Log(#[from] crate::consensus::StartError),
    /// The shards.
    #[error(transparent)]
    Shards(#[from] crate::shard::SpawnError),
    /// `--auth-token`.
    #[error(transparent)]
    Token(#[from] crate::auth::token::TokenError),
    /// `--experimental-initial-corrupt-check` found this member's data different from its
    /// peers', or could not compare.
    #[error(transparent)]
    CorruptCheck(#[from] crate::server::corrupt::CheckError),
    /// A thread or the signal handler could not be set up.
    #[error("{context}")]
    Os {
        /// What was being set up.
        context: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A listener stopped serving on its own.
    #[error("a listener stopped")]
    ListenerStopped(#[source] Option<Box<dyn std::error::Error + Send + Sync>>),
    /// A fatal error stopped the member (see [`FatalError`]).
    #[error("{0}")]
    Fatal(FatalError),
    /// A second SIGTERM/SIGINT while stopping: stopped at once.
    #[error("second signal while stopping")]
    SecondSignal,
}

impl NodeError {
    /// An I/O failure on `context` (a sentence naming the file or directory).
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> NodeError {
        let context = context.into();
        move |source| NodeError::Io { context, source }
    }
}
