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

    /// Hands a batch's results to their waiters, those that still wait: the waiter table is
    /// locked once for the batch, and no waiter is woken while it is held.
    pub fn complete_all(&self, results: Vec<(u64, ApplyResult)>) {
        let waiters: Vec<_> = {
            let mut table = self.waiters.lock().unwrap();
            results
                .into_iter()
                .filter_map(|(id, result)| table.remove(&id).map(|tx| (tx, result)))
                .collect()
        };
        for (tx, result) in waiters {
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

    #[test]
    fn a_batch_reaches_the_waiters_that_still_wait() {
        let p = Arc::new(Pending::default());
        let (_g1, rx1) = p.register(1);
        let (g2, _rx2) = p.register(2);
        let (_g3, rx3) = p.register(3);
        drop(g2); // gave up
        let put = |rev| {
            Ok(crate::state_machine::ApplyResponse::Put(
                crate::proto::etcdserverpb::PutResponse {
                    header: Some(crate::proto::etcdserverpb::ResponseHeader {
                        revision: rev,
                        ..Default::default()
                    }),
                    prev_kv: None,
                },
            ))
        };
        p.complete_all(vec![(1, put(5)), (2, put(6)), (3, put(7)), (4, put(8))]);
        let revision = |rx: oneshot::Receiver<ApplyResult>| match rx.blocking_recv() {
            Ok(Ok(crate::state_machine::ApplyResponse::Put(r))) => r.header.unwrap().revision,
            other => panic!("{other:?}"),
        };
        assert_eq!((revision(rx1), revision(rx3)), (5, 7));
        assert!(p.is_empty());
    }
}
