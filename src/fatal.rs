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
    /// A thread the member cannot run without (`raft`, `apply`, `shard-N`) panicked: raft-rs
    /// panics on a log that lost entries it had acknowledged ("to_commit N is out of range
    /// [last_index M]"), as etcd's raft does, and etcd's process dies with it. Going on
    /// without that thread would leave the member up but unable to commit or apply.
    #[error("the {thread} thread panicked: {message}")]
    Panicked {
        /// The thread's name.
        thread: String,
        /// The panic's message.
        message: String,
    },
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

/// The message of a caught panic (its `&str` or `String` payload).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(a panic without a message)".into())
}

/// Runs `body`, the whole life of the member thread `thread`; a panic in it is reported up
/// `fatal` as [`FatalError::Panicked`] (after the panic hook has printed it, with its
/// location) and gives `None`, so the member stops instead of running on without the thread.
pub fn run_reporting_panics<T>(
    thread: &str,
    fatal: &FatalTx,
    body: impl FnOnce() -> T,
) -> Option<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(value) => Some(value),
        Err(payload) => {
            fatal.report(FatalError::Panicked {
                thread: thread.to_string(),
                message: panic_message(&*payload),
            });
            None
        }
    }
}

/// [`run_reporting_panics`] for a task: polls `task` (on a shard's executor), and reports a
/// panic while polling it as [`FatalError::Panicked`] by `thread`, giving `None`.
pub async fn await_reporting_panics<F: std::future::Future>(
    thread: &str,
    fatal: &FatalTx,
    task: F,
) -> Option<F::Output> {
    let mut task = Box::pin(task);
    let polled = std::future::poll_fn(|cx| {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| task.as_mut().poll(cx))) {
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Ok(std::task::Poll::Ready(value)) => std::task::Poll::Ready(Ok(value)),
            Err(payload) => std::task::Poll::Ready(Err(panic_message(&*payload))),
        }
    })
    .await;
    match polled {
        Ok(value) => Some(value),
        Err(message) => {
            fatal.report(FatalError::Panicked {
                thread: thread.to_string(),
                message,
            });
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reported(rx: &mut FatalRx) -> String {
        rx.try_recv().expect("a fatal error").to_string()
    }

    #[test]
    fn a_panic_in_a_member_thread_is_a_fatal_error() {
        let (tx, mut rx) = FatalTx::channel();
        assert_eq!(run_reporting_panics("raft", &tx, || 7), Some(7));
        assert!(rx.try_recv().is_err(), "nothing to report");
        let out = std::thread::spawn(move || {
            run_reporting_panics("raft", &tx, || -> u32 {
                panic!("to_commit 9 is out of range [last_index 5]")
            })
        })
        .join()
        .expect("the panic is caught");
        assert_eq!(out, None);
        assert_eq!(
            reported(&mut rx),
            "the raft thread panicked: to_commit 9 is out of range [last_index 5]"
        );
    }

    #[test]
    fn a_panic_in_a_shard_task_is_a_fatal_error() {
        let (tx, mut rx) = FatalTx::channel();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let n = 3;
        let out = rt.block_on(await_reporting_panics("shard-1", &tx, async move {
            tokio::task::yield_now().await;
            if n == 3 {
                panic!("shard {n} broke");
            }
            n
        }));
        assert_eq!(out, None);
        assert_eq!(
            reported(&mut rx),
            "the shard-1 thread panicked: shard 3 broke"
        );
    }
}
