//! etcd's compaction rule as a pure function over a [`CompactView`]: which revisions may be
//! compacted, then the physical step. The dispatcher owns the compaction revision it
//! publishes and the purge it orders after the next barrier; the tests below run over one
//! in-memory [`crate::mvcc::Store`].
//!
//! Follows etcd 3.5 `server/mvcc/kvstore.go` `updateCompactRev`: `ErrCompacted` for a
//! revision at or below the current compaction revision, `ErrFutureRev` for one above the
//! current revision.

use super::txn::ShardView;
use crate::error::EtcdError;

/// The shards a compaction marks, at [`ShardView::revision`] and
/// [`ShardView::compact_revision`].
pub trait CompactView: ShardView {
    /// Marks every shard compacted at `rev`: reads below it fail with `ErrCompacted`. The
    /// history below it may be purged afterwards.
    fn compact(&self, rev: i64);
}

/// etcd `updateCompactRev` (`server/mvcc/kvstore.go`): whether `rev` may be compacted.
/// Errors: `ErrCompacted` when `rev <= compact_revision`, checked first; `ErrFutureRev` when
/// `rev > revision`.
pub fn check(view: &impl ShardView, rev: i64) -> Result<(), EtcdError> {
    if rev <= view.compact_revision() {
        return Err(EtcdError::Compacted);
    }
    if rev > view.revision() {
        return Err(EtcdError::FutureRev);
    }
    Ok(())
}

/// etcd `store.Compact` (`server/mvcc/kvstore.go`): [`check`], then marks the shards compacted
/// at `rev` ([`CompactView::compact`]). The store revision does not move. Nothing is marked on
/// an error.
pub fn compact(view: &impl CompactView, rev: i64) -> Result<(), EtcdError> {
    check(view, rev)?;
    view.compact(rev);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::test_view::Memory;
    use super::*;
    use crate::proto::etcdserverpb::{
        request_op::Request as OpRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
    };

    fn write(m: &mut Memory, n: usize) {
        for i in 0..n {
            m.txn(&TxnRequest {
                success: vec![RequestOp {
                    request: Some(OpRequest::RequestPut(PutRequest {
                        key: b"k".to_vec(),
                        value: i.to_string().into_bytes(),
                        ..Default::default()
                    })),
                }],
                ..Default::default()
            })
            .unwrap();
        }
    }

    #[test]
    fn only_revisions_between_the_compaction_and_the_store_revision() {
        let mut m = Memory::new();
        write(&mut m, 4); // revision 5
        assert_eq!(check(&m, 0), Err(EtcdError::Compacted));
        assert_eq!(check(&m, 6), Err(EtcdError::FutureRev));
        assert_eq!(check(&m, 5), Ok(()));
        compact(&m, 3).unwrap();
        assert_eq!(m.compact_revision(), 3);
        assert_eq!(
            compact(&m, 3),
            Err(EtcdError::Compacted),
            "already compacted"
        );
        assert_eq!(check(&m, 2), Err(EtcdError::Compacted));
        assert_eq!(check(&m, 4), Ok(()));
        assert_eq!(m.revision, 5, "compaction writes no revision");
    }

    #[test]
    fn a_refused_compaction_marks_nothing() {
        let mut m = Memory::new();
        write(&mut m, 2); // revision 3
        assert_eq!(compact(&m, 9), Err(EtcdError::FutureRev));
        assert_eq!(m.compact_revision(), 0);
    }

    #[test]
    fn reads_below_the_compaction_fail() {
        let mut m = Memory::new();
        write(&mut m, 3); // revision 4
        compact(&m, 3).unwrap();
        let at = |rev| {
            let r = RangeRequest {
                key: b"k".to_vec(),
                ..Default::default()
            };
            m.store.borrow().range(&r, rev).unwrap().map(|p| p.kvs)
        };
        assert_eq!(at(2).unwrap_err(), EtcdError::Compacted);
        assert_eq!(at(3).unwrap()[0].value, b"1");
    }
}
