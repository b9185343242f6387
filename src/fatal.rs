//! The errors that stop a member: damaged data, a failed write or fsync, a snapshot that cannot
//! be kept. Raised on the Raft thread or a shard thread, they travel up a [`FatalTx`] to the
//! member's run loop, which stops the member and returns the error, so the process exits with a
//! failure status (etcd panics on these, through `lg.Panic`/`lg.Fatal`). Per-request failures
//! are [`crate::error::EtcdError`] instead.

use crate::consensus::NodeError;
use crate::mvcc::engine::StorageError;

/// A condition that stops the member: it must not serve again (etcd panics on these, through
/// `lg.Panic`/`lg.Fatal` in its raft node and backend).
///
/// Raised on the Raft thread or a shard thread and sent up a [`FatalTx`]; [`crate::node::NodeHandle`]
/// receives it, stops the member without a leader transfer, and returns it, so the process
/// exits with status 1. Never mapped to a gRPC status: clients in flight see the member stop.
///
/// Each message includes its cause's, so none has a `source()` (printing the chain would
/// repeat it).
#[derive(Debug, thiserror::Error)]
pub enum FatalError {
    /// A shard's storage engine failed (see [`StorageError`]).
    #[error("{0}")]
    Storage(StorageError),
    /// The Raft node cannot go on (see [`NodeError`]).
    #[error("{0}")]
    Raft(NodeError),
}

/// The sending end of the fatal-error channel: the Raft thread and every shard hold a clone and
/// [`FatalTx::report`] what stops them. [`crate::node::NodeHandle`] holds the receiver ([`FatalRx`]).
#[derive(Clone, Debug)]
pub struct FatalTx(tokio::sync::mpsc::UnboundedSender<FatalError>);

/// The receiving end of the fatal-error channel (see [`FatalTx`]).
pub type FatalRx = tokio::sync::mpsc::UnboundedReceiver<FatalError>;

impl FatalTx {
    /// A new fatal-error channel.
    pub fn channel() -> (FatalTx, FatalRx) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (FatalTx(tx), rx)
    }

    /// Sends `error` to whoever runs the member. Never blocks (callable from any thread); a
    /// receiver already gone (the member is stopping) drops it.
    pub fn report(&self, error: FatalError) {
        let _ = self.0.send(error);
    }
}
