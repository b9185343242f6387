//! Request validation before proposing, as etcd's `api/v3rpc/key.go` does it: bad requests
//! are rejected at the front end and never reach the log.

use std::collections::HashSet;

use crate::error::EtcdError;
use crate::proto::etcdserverpb::{
    range_request::{SortOrder, SortTarget},
    request_op::Request as OpRequest,
    DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};

/// etcd `checkRangeRequest`: a key, and known sort options.
pub fn check_range(r: &RangeRequest) -> Result<(), EtcdError> {
    if r.key.is_empty() {
        return Err(EtcdError::EmptyKey);
    }
    if SortOrder::try_from(r.sort_order).is_err() || SortTarget::try_from(r.sort_target).is_err() {
        return Err(EtcdError::InvalidSortOption);
    }
    Ok(())
}

/// etcd `checkPutRequest`: a key; no value with `ignore_value`; no lease with `ignore_lease`.
pub fn check_put(r: &PutRequest) -> Result<(), EtcdError> {
    if r.key.is_empty() {
        return Err(EtcdError::EmptyKey);
    }
    if r.ignore_value && !r.value.is_empty() {
        return Err(EtcdError::ValueProvided);
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(EtcdError::LeaseProvided);
    }
    Ok(())
}

/// etcd `checkDeleteRequest`: a key.
pub fn check_delete(r: &DeleteRangeRequest) -> Result<(), EtcdError> {
    if r.key.is_empty() {
        return Err(EtcdError::EmptyKey);
    }
    Ok(())
}

/// How deep txns may nest inside txns, whatever `--max-txn-ops` allows: each level costs
/// stack in the protobuf decoder and in apply (see `vendor/prost/PATCH.md`). etcd's own limit,
/// the op budget below, is at most 128 levels with its default `--max-txn-ops`.
pub const MAX_TXN_DEPTH: usize = 512;

/// etcd `checkTxnRequest` plus `checkIntervals` on both branches.
///
/// As in etcd, a nested txn gets what its parent left of the op budget: `max_txn_ops` minus
/// the parent's `max(compares, success ops, failure ops)`. So a chain of txns nested one in
/// another is refused past `max_txn_ops` levels, and past [`MAX_TXN_DEPTH`] levels in any case.
///
/// Errors: `TooManyOps` ("etcdserver: too many operations in txn request"), `EmptyKey`,
/// `KeyNotFound` (an empty op), `ValueProvided`, `LeaseProvided`, `InvalidSortOption`,
/// `DuplicateKey`, all InvalidArgument as in etcd.
pub fn check_txn(r: &TxnRequest, max_txn_ops: usize) -> Result<(), EtcdError> {
    check_txn_ops(r, max_txn_ops, 1)?;
    check_intervals(&r.success)?;
    check_intervals(&r.failure)?;
    Ok(())
}

/// etcd `checkTxnRequest` with `budget` ops left; `depth` is this txn's nesting level (1 for
/// the request itself).
fn check_txn_ops(r: &TxnRequest, budget: usize, depth: usize) -> Result<(), EtcdError> {
    let ops = r.compare.len().max(r.success.len()).max(r.failure.len());
    if ops > budget || depth > MAX_TXN_DEPTH {
        return Err(EtcdError::TooManyOps);
    }
    if r.compare.iter().any(|c| c.key.is_empty()) {
        return Err(EtcdError::EmptyKey);
    }
    for op in r.success.iter().chain(&r.failure) {
        match &op.request {
            Some(OpRequest::RequestRange(q)) => check_range(q)?,
            Some(OpRequest::RequestPut(q)) => check_put(q)?,
            Some(OpRequest::RequestDeleteRange(q)) => check_delete(q)?,
            Some(OpRequest::RequestTxn(q)) => check_txn_ops(q, budget - ops, depth + 1)?,
            None => return Err(EtcdError::KeyNotFound),
        }
    }
    Ok(())
}

/// A delete's interval as etcd's `checkIntervals` builds it: the literal `[key, range_end)`
/// (so `"\0"` is not "to the end" here, as in etcd), or the single key.
struct Interval {
    start: Vec<u8>,
    end: Option<Vec<u8>>,
}

impl Interval {
    fn contains(&self, k: &[u8]) -> bool {
        match &self.end {
            None => k == self.start.as_slice(),
            Some(end) => k >= self.start.as_slice() && k < end.as_slice(),
        }
    }
}

fn hits(dels: &[Interval], k: &[u8]) -> bool {
    dels.iter().any(|d| d.contains(k))
}

/// etcd `checkIntervals`: no key is put twice, and no put falls in a delete, within one branch
/// and its nested txns (a nested txn's two branches may put the same key: only one runs).
fn check_intervals(reqs: &[RequestOp]) -> Result<(HashSet<Vec<u8>>, Vec<Interval>), EtcdError> {
    let mut dels: Vec<Interval> = reqs
        .iter()
        .filter_map(|op| match &op.request {
            Some(OpRequest::RequestDeleteRange(d)) => Some(Interval {
                start: d.key.clone(),
                end: (!d.range_end.is_empty()).then(|| d.range_end.clone()),
            }),
            _ => None,
        })
        .collect();
    let mut puts: HashSet<Vec<u8>> = HashSet::new();
    for op in reqs {
        let Some(OpRequest::RequestTxn(t)) = &op.request else {
            continue;
        };
        let (puts_then, dels_then) = check_intervals(&t.success)?;
        let (puts_else, dels_else) = check_intervals(&t.failure)?;
        for k in &puts_then {
            if puts.contains(k) || hits(&dels, k) {
                return Err(EtcdError::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        for k in puts_else {
            if (puts.contains(&k) && !puts_then.contains(&k)) || hits(&dels, &k) {
                return Err(EtcdError::DuplicateKey);
            }
            puts.insert(k);
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }
    for op in reqs {
        let Some(OpRequest::RequestPut(p)) = &op.request else {
            continue;
        };
        if puts.contains(&p.key) || hits(&dels, &p.key) {
            return Err(EtcdError::DuplicateKey);
        }
        puts.insert(p.key.clone());
    }
    Ok((puts, dels))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &str) -> RequestOp {
        RequestOp {
            request: Some(OpRequest::RequestPut(PutRequest {
                key: k.into(),
                ..Default::default()
            })),
        }
    }
    fn del(k: &str, end: &str) -> RequestOp {
        RequestOp {
            request: Some(OpRequest::RequestDeleteRange(DeleteRangeRequest {
                key: k.into(),
                range_end: end.into(),
                ..Default::default()
            })),
        }
    }
    fn txn(success: Vec<RequestOp>, failure: Vec<RequestOp>) -> TxnRequest {
        TxnRequest {
            success,
            failure,
            ..Default::default()
        }
    }

    #[test]
    fn duplicates() {
        assert_eq!(
            check_txn(&txn(vec![put("a"), put("a")], vec![]), 128),
            Err(EtcdError::DuplicateKey)
        );
        assert_eq!(
            check_txn(&txn(vec![del("a", "c"), put("b")], vec![]), 128),
            Err(EtcdError::DuplicateKey)
        );
        assert_eq!(check_txn(&txn(vec![put("a")], vec![put("a")]), 128), Ok(()));
        let nested = RequestOp {
            request: Some(OpRequest::RequestTxn(txn(vec![put("x")], vec![put("x")]))),
        };
        assert_eq!(check_txn(&txn(vec![nested.clone()], vec![]), 128), Ok(()));
        assert_eq!(
            check_txn(&txn(vec![nested, put("x")], vec![]), 128),
            Err(EtcdError::DuplicateKey)
        );
    }

    /// A chain of `depth` txns, each the only success op of its parent; the innermost puts.
    pub(crate) fn nested(depth: usize) -> TxnRequest {
        let mut t = txn(vec![put("leaf")], vec![]);
        for _ in 1..depth {
            t = txn(
                vec![RequestOp {
                    request: Some(OpRequest::RequestTxn(t)),
                }],
                vec![],
            );
        }
        t
    }

    #[test]
    fn nested_txns_share_the_op_budget_as_in_etcd() {
        // etcd checkTxnRequest: each level spends one op of the budget on its nested txn.
        assert_eq!(check_txn(&nested(128), 128), Ok(()));
        assert_eq!(check_txn(&nested(129), 128), Err(EtcdError::TooManyOps));
        assert_eq!(check_txn(&nested(3), 2), Err(EtcdError::TooManyOps));
        // A parent with two ops leaves its nested txn two fewer.
        let wide = txn(
            vec![
                put("a"),
                RequestOp {
                    request: Some(OpRequest::RequestTxn(txn(vec![put("b"), put("c")], vec![]))),
                },
            ],
            vec![],
        );
        assert_eq!(check_txn(&wide, 4), Ok(()));
        assert_eq!(check_txn(&wide, 3), Err(EtcdError::TooManyOps));
        // Past MAX_TXN_DEPTH whatever the budget.
        assert_eq!(check_txn(&nested(MAX_TXN_DEPTH), 100_000), Ok(()));
        assert_eq!(
            check_txn(&nested(MAX_TXN_DEPTH + 1), 100_000),
            Err(EtcdError::TooManyOps)
        );
    }

    #[test]
    fn limits_and_empty_ops() {
        let many: Vec<RequestOp> = (0..3).map(|i| put(&format!("k{i}"))).collect();
        assert_eq!(check_txn(&txn(many, vec![]), 2), Err(EtcdError::TooManyOps));
        assert_eq!(
            check_txn(&txn(vec![RequestOp { request: None }], vec![]), 128),
            Err(EtcdError::KeyNotFound)
        );
        let bad_sort = RangeRequest {
            key: b"a".to_vec(),
            sort_order: 9,
            ..Default::default()
        };
        assert_eq!(check_range(&bad_sort), Err(EtcdError::InvalidSortOption));
        let ignore = PutRequest {
            key: b"a".to_vec(),
            value: b"v".to_vec(),
            ignore_value: true,
            ..Default::default()
        };
        assert_eq!(check_put(&ignore), Err(EtcdError::ValueProvided));
    }
}
