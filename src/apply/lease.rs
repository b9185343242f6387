//! etcd's lease rules as pure functions over the replicated [`LeaseTable`] and, for a revoke,
//! a [`LeaseView`] of the keys attached to leases. The dispatcher owns the revision and records
//! what each function returns in the lease changes it persists at the next barrier; the tests
//! below run over one in-memory [`crate::mvcc::Store`].
//!
//! Follows etcd 3.5 `server/lease/lessor.go`: `Grant` (`ErrLeaseExist`, `ErrLeaseTTLTooLarge`,
//! the TTL raised to the minimum), `Revoke` (`ErrLeaseNotFound`; the attached keys deleted in
//! one txn, so at one revision when any key was deleted), `Checkpoint` (the remaining TTL of a
//! granted lease; unknown leases ignored), and `server/etcdserver/apply.go` `checkRequestPut`
//! (a put may only attach a granted lease).

use super::txn::ShardView;
use crate::error::EtcdError;
use crate::lease::{LeaseTable, MAX_LEASE_TTL};
use crate::mvcc::KeyValue;
use crate::proto::etcdserverpb::{LeaseCheckpointRequest, LeaseGrantRequest};
use crate::proto::metastorepb::LeaseRecord;

/// The keys a revoke deletes: the shards as the dispatcher drives them, at
/// [`ShardView::revision`].
pub trait LeaseView: ShardView {
    /// Deletes every key attached to `lease` at (`rev`, `sub`), on whichever shards hold them;
    /// the deleted key-values.
    fn revoke_keys(&self, lease: i64, rev: i64, sub: u32) -> Vec<KeyValue>;
}

/// etcd `checkRequestPut` (`server/etcdserver/apply.go`): a put naming a lease needs it granted
/// (`lessor.Lookup`), else `ErrLeaseNotFound`. Lease 0 (`NoLease`) attaches none.
pub fn check_attach(view: &impl ShardView, lease: i64) -> Result<(), EtcdError> {
    if lease != 0 && !view.lease_granted(lease) {
        return Err(EtcdError::LeaseNotFound);
    }
    Ok(())
}

/// etcd `lessor.Grant` (`server/lease/lessor.go`): grants `g.id` with `g.ttl` raised to
/// `min_ttl` seconds, and returns the record to persist. Counts the grant in
/// `etcd_debugging_lease_granted_total`.
///
/// Errors (nothing granted): `ErrLeaseTTLTooLarge` above [`MAX_LEASE_TTL`], checked first;
/// `ErrLeaseExist` for a granted ID. ID 0 (`NoLease`) is the front end's to replace with a
/// generated one before proposing; one that reaches the log anyway is refused as
/// `ErrLeaseExist` (etcd's lessor answers `ErrLeaseNotFound`). Any other ID is accepted,
/// negative ones included.
pub fn grant(
    leases: &LeaseTable,
    min_ttl: i64,
    g: &LeaseGrantRequest,
) -> Result<LeaseRecord, EtcdError> {
    if g.ttl > MAX_LEASE_TTL {
        return Err(EtcdError::LeaseTtlTooLarge);
    }
    if g.id == 0 || leases.contains(g.id) {
        return Err(EtcdError::LeaseExists);
    }
    let ttl = g.ttl.max(min_ttl);
    leases.grant(g.id, ttl);
    crate::metrics::LEASE_GRANTED.inc();
    Ok(LeaseRecord {
        id: g.id,
        ttl,
        remaining_ttl: 0,
    })
}

/// What a revoke did.
#[derive(Debug)]
pub struct Revoked {
    /// The attached keys deleted, at `revision + 1`.
    pub deleted: Vec<KeyValue>,
}

impl Revoked {
    /// Whether a key was deleted (the store revision is then `revision + 1`).
    pub fn wrote(&self) -> bool {
        !self.deleted.is_empty()
    }
}

/// etcd `lessor.Revoke` (`server/lease/lessor.go`), for a client's revoke or the leader's
/// expiry alike: removes lease `id` from `leases` and deletes its attached keys at
/// `view.revision() + 1`, one delete event each, counted in `etcd_debugging_lease_revoked_total`.
/// Error (nothing changed): `ErrLeaseNotFound`.
pub fn revoke(leases: &LeaseTable, view: &impl LeaseView, id: i64) -> Result<Revoked, EtcdError> {
    if !leases.revoke(id) {
        return Err(EtcdError::LeaseNotFound);
    }
    crate::metrics::LEASE_REVOKED.inc();
    let deleted = view.revoke_keys(id, view.revision() + 1, 0);
    Ok(Revoked { deleted })
}

/// etcd `lessor.Checkpoint` (`server/lease/lessor.go`): records each granted lease's remaining
/// TTL, ignoring unknown leases; returns the records to persist, in request order.
pub fn checkpoint(leases: &LeaseTable, c: &LeaseCheckpointRequest) -> Vec<LeaseRecord> {
    c.checkpoints
        .iter()
        .filter_map(|cp| {
            let ttl = leases.checkpoint(cp.id, cp.remaining_ttl)?;
            Some(LeaseRecord {
                id: cp.id,
                ttl,
                remaining_ttl: cp.remaining_ttl,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::test_view::Memory;
    use super::*;
    use crate::proto::etcdserverpb::{
        request_op::Request as OpRequest, LeaseCheckpoint, PutRequest, RequestOp, TxnRequest,
    };

    fn grant_req(id: i64, ttl: i64) -> LeaseGrantRequest {
        LeaseGrantRequest { id, ttl }
    }

    /// Writes puts in one txn, as a client would.
    fn put_all(m: &mut Memory, kvs: &[(&str, i64)]) {
        let success = kvs
            .iter()
            .map(|(k, lease)| RequestOp {
                request: Some(OpRequest::RequestPut(PutRequest {
                    key: (*k).into(),
                    value: b"v".to_vec(),
                    lease: *lease,
                    ..Default::default()
                })),
            })
            .collect();
        m.txn(&TxnRequest {
            success,
            ..Default::default()
        })
        .unwrap();
    }

    /// Revokes as the dispatcher does: the revision moves if a key was deleted.
    fn revoke_in(m: &mut Memory, id: i64) -> Result<Revoked, EtcdError> {
        let out = revoke(&m.leases, &*m, id)?;
        if out.wrote() {
            m.revision += 1;
        }
        Ok(out)
    }

    #[test]
    fn grants_and_revokes_are_counted() {
        use crate::metrics::{LEASE_GRANTED, LEASE_REVOKED};
        let mut m = Memory::new();
        let (granted, revoked) = (LEASE_GRANTED.get(), LEASE_REVOKED.get());
        grant(&m.leases, 1, &grant_req(11, 10)).unwrap();
        grant(&m.leases, 1, &grant_req(12, 10)).unwrap();
        // Other tests grant and revoke at the same time: at least these.
        assert!(LEASE_GRANTED.get() >= granted + 2);
        revoke_in(&mut m, 11).unwrap();
        assert!(LEASE_REVOKED.get() > revoked);
    }

    #[test]
    fn grant_raises_the_ttl_to_the_minimum() {
        let m = Memory::new();
        let r = grant(&m.leases, 5, &grant_req(1, 2)).unwrap();
        assert_eq!((r.id, r.ttl, r.remaining_ttl), (1, 5, 0));
        let r = grant(&m.leases, 5, &grant_req(2, 60)).unwrap();
        assert_eq!(r.ttl, 60);
        assert_eq!(m.leases.records().len(), 2);
        // Negative IDs are IDs like any other.
        assert_eq!(grant(&m.leases, 5, &grant_req(-3, 10)).unwrap().id, -3);
    }

    #[test]
    fn grant_refuses_what_etcd_refuses() {
        let m = Memory::new();
        grant(&m.leases, 1, &grant_req(1, 10)).unwrap();
        assert_eq!(
            grant(&m.leases, 1, &grant_req(1, 20)).unwrap_err(),
            EtcdError::LeaseExists
        );
        assert_eq!(m.leases.records()[0].ttl, 10, "the first grant stands");
        assert_eq!(
            grant(&m.leases, 1, &grant_req(0, 10)).unwrap_err(),
            EtcdError::LeaseExists
        );
        // Too large is checked before the ID.
        assert_eq!(
            grant(&m.leases, 1, &grant_req(1, MAX_LEASE_TTL + 1)).unwrap_err(),
            EtcdError::LeaseTtlTooLarge
        );
        assert!(grant(&m.leases, 1, &grant_req(2, MAX_LEASE_TTL)).is_ok());
    }

    #[test]
    fn revoke_deletes_the_attached_keys_at_one_revision() {
        let mut m = Memory::new();
        grant(&m.leases, 1, &grant_req(7, 10)).unwrap();
        put_all(&mut m, &[("a", 7), ("b", 0), ("c", 7)]);
        assert_eq!(m.revision, 2);
        let out = revoke_in(&mut m, 7).unwrap();
        let keys: Vec<&[u8]> = out.deleted.iter().map(|kv| kv.key.as_slice()).collect();
        assert_eq!(keys, [&b"a"[..], b"c"]);
        assert_eq!(m.revision, 3, "one revision for every deleted key");
        assert!(m.latest(b"a").is_none() && m.latest(b"c").is_none());
        assert!(m.latest(b"b").is_some());
        assert!(!m.leases.contains(7));
        // Deleted at revision 3: still there at 2.
        let at2 = m.store.borrow().get(b"a", 2).unwrap();
        assert!(at2.is_some());
    }

    #[test]
    fn revoking_a_lease_without_keys_keeps_the_revision() {
        let mut m = Memory::new();
        grant(&m.leases, 1, &grant_req(7, 10)).unwrap();
        let out = revoke_in(&mut m, 7).unwrap();
        assert!(!out.wrote());
        assert_eq!(m.revision, 1);
        assert_eq!(
            revoke_in(&mut m, 7).unwrap_err(),
            EtcdError::LeaseNotFound,
            "already revoked"
        );
    }

    #[test]
    fn a_key_moved_to_another_lease_survives_the_revoke() {
        let mut m = Memory::new();
        grant(&m.leases, 1, &grant_req(1, 10)).unwrap();
        grant(&m.leases, 1, &grant_req(2, 10)).unwrap();
        put_all(&mut m, &[("k", 1)]);
        put_all(&mut m, &[("k", 2)]);
        let out = revoke_in(&mut m, 1).unwrap();
        assert!(!out.wrote());
        assert_eq!(m.latest(b"k").unwrap().lease, 2);
    }

    #[test]
    fn checkpoint_records_granted_leases_only() {
        let m = Memory::new();
        grant(&m.leases, 1, &grant_req(1, 30)).unwrap();
        let c = LeaseCheckpointRequest {
            checkpoints: vec![
                LeaseCheckpoint {
                    id: 9,
                    remaining_ttl: 4,
                },
                LeaseCheckpoint {
                    id: 1,
                    remaining_ttl: 12,
                },
            ],
        };
        let records = checkpoint(&m.leases, &c);
        assert_eq!(records.len(), 1);
        assert_eq!(
            (records[0].id, records[0].ttl, records[0].remaining_ttl),
            (1, 30, 12)
        );
        assert_eq!(m.leases.records()[0].remaining_ttl, 12);
        assert!(!m.leases.contains(9));
    }

    #[test]
    fn a_put_may_attach_only_a_granted_lease() {
        let m = Memory::new();
        assert_eq!(check_attach(&m, 0), Ok(()));
        assert_eq!(check_attach(&m, 4), Err(EtcdError::LeaseNotFound));
        grant(&m.leases, 1, &grant_req(4, 10)).unwrap();
        assert_eq!(check_attach(&m, 4), Ok(()));
    }
}
