//! Clients waiting for their proposals to be applied, keyed by proposal ID.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::ApplyResult;

/// Waiters for this member's proposals in flight. A waiter that gives up (timeout, client
/// cancel) removes itself through its [`PendingGuard`], so nothing stays behind.
///
/// Proposal IDs are unique per member only; every member applies every proposal, so results
/// are handed here only for proposals whose origin is this member.
#[derive(Default)]
pub struct Pending {
    member_id: u64,
    waiters: Mutex<HashMap<u64, oneshot::Sender<ApplyResult>>>,
}

/// Removes its proposal's waiter when dropped.
pub struct PendingGuard {
    pending: Arc<Pending>,
    id: u64,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.pending.waiters.lock().unwrap().remove(&self.id);
    }
}

impl Pending {
    /// Waiters for member `member_id`'s proposals.
    pub fn new(member_id: u64) -> Self {
        Pending {
            member_id,
            waiters: Mutex::default(),
        }
    }

    /// The member whose proposals these are.
    pub fn member_id(&self) -> u64 {
        self.member_id
    }

    /// Registers a waiter for proposal `id`.
    pub fn register(self: &Arc<Self>, id: u64) -> (PendingGuard, oneshot::Receiver<ApplyResult>) {
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().unwrap().insert(id, tx);
        (
            PendingGuard {
                pending: self.clone(),
                id,
            },
            rx,
        )
    }

    /// Hands the applied result to proposal `id`'s waiter, if it still waits. Proposals
    /// replayed from the WAL after a restart have none.
    pub fn complete(&self, id: u64, result: ApplyResult) {
        let waiter = self.waiters.lock().unwrap().remove(&id);
        if let Some(tx) = waiter {
            let _ = tx.send(result);
        }
    }

    /// Number of waiters (for tests and metrics).
    pub fn len(&self) -> usize {
        self.waiters.lock().unwrap().len()
    }

    /// Whether nobody waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_guard_leaves_nothing() {
        let p = Arc::new(Pending::default());
        let (guard, _rx) = p.register(7);
        assert_eq!(p.len(), 1);
        drop(guard);
        assert!(p.is_empty());
        p.complete(7, Err(crate::error::EtcdError::Timeout)); // late result: ignored
    }
}
