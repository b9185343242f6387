//! etcd's txn rules as pure functions over a [`ShardView`]: which branch each (nested) txn
//! takes, the checks that refuse the whole txn, and the execution of the chosen ops at one
//! revision. The dispatcher supplies a view over its shards; the tests below, one over a single
//! in-memory [`crate::mvcc::Store`].
//!
//! Follows etcd 3.5 `server/etcdserver/apply.go`: `compareToPath` (every compare, nested ones
//! included, sees the state before the txn), `checkRequests` (puts: key and lease; ranges:
//! revision bounds), `applyTxn` (one revision for the whole txn if any op wrote, each write a
//! sub-revision), and the header revisions responses report inside a txn.

use crate::error::EtcdError;
use crate::metrics::TxnOps;
use crate::mvcc::range::MergedRange;
use crate::mvcc::{KeyRange, KeyValue, LATEST};
use crate::proto::etcdserverpb::{
    request_op::Request as OpRequest, response_op::Response as OpResponse, Compare,
    DeleteRangeResponse, PutRequest, PutResponse, RangeRequest, RangeResponse, ResponseHeader,
    ResponseOp, TxnRequest, TxnResponse,
};

/// The state a txn reads and writes: the shards as the dispatcher drives them, at revision
/// [`ShardView::revision`]. Writes made through the view are seen by later reads through it.
pub trait ShardView {
    /// The store revision before the txn.
    fn revision(&self) -> i64;
    /// Reads below this revision fail with `ErrCompacted`.
    fn compact_revision(&self) -> i64;
    /// Whether every compare holds (etcd `applyCompares`), at [`ShardView::revision`].
    fn compares_hold(&self, compares: &[Compare]) -> bool;
    /// The latest key-value of `key`, if it exists.
    fn latest(&self, key: &[u8]) -> Option<KeyValue>;
    /// Whether lease `id` is granted.
    fn lease_granted(&self, id: i64) -> bool;
    /// A range at `rev` ([`LATEST`]: including the txn's earlier writes).
    fn range(&self, r: &RangeRequest, rev: i64) -> MergedRange;
    /// Writes a put at (`rev`, `sub`); the previous key-value when `p.prev_kv`.
    fn put(&self, p: PutRequest, rev: i64, sub: u32) -> Option<KeyValue>;
    /// Deletes `range` at (`rev`, `sub`); the deleted key-values in key order.
    fn delete(&self, range: &KeyRange, rev: i64, sub: u32) -> Vec<KeyValue>;
}

/// What applying a txn did.
#[derive(Debug)]
pub struct TxnOutcome {
    /// The response, header revision set.
    pub response: TxnResponse,
    /// Whether any op wrote (the store revision is then `revision + 1`).
    pub wrote: bool,
    /// The mvcc operations executed, for the metrics (compares included).
    pub ops: TxnOps,
}

/// etcd's `checkPut`: `ignore_value`/`ignore_lease` need the key (`ErrKeyNotFound`), and a
/// lease must be granted (`ErrLeaseNotFound`, [`super::lease::check_attach`]).
pub fn check_put(view: &impl ShardView, p: &PutRequest) -> Result<(), EtcdError> {
    if (p.ignore_value || p.ignore_lease) && view.latest(&p.key).is_none() {
        return Err(EtcdError::KeyNotFound);
    }
    super::lease::check_attach(view, p.lease)
}

/// Applies `txn` at `view.revision() + 1`. Errors (nothing written): `ErrKeyNotFound` and
/// `ErrLeaseNotFound` from a put on the taken path ([`check_put`]), `ErrFutureRev` and
/// `ErrCompacted` from a range's revision.
pub fn apply(view: &impl ShardView, txn: &TxnRequest) -> Result<TxnOutcome, EtcdError> {
    let mut path = Vec::new();
    take_path(view, txn, &mut path);
    check(view, txn, &path, &mut 0)?;
    let mut exec = Exec {
        rev: view.revision() + 1,
        sub: 0,
        wrote: false,
        ops: TxnOps::default(),
    };
    let mut response = execute(view, txn, &path, &mut 0, &mut exec);
    // etcd evaluates each compare with a Range on the txn (`applyCompare`).
    exec.ops.ranges += compares_on_path(txn, &path, &mut 0);
    response.header = header(exec.current(view.revision()));
    Ok(TxnOutcome {
        response,
        wrote: exec.wrote,
        ops: exec.ops,
    })
}

/// etcd `compareToPath`: whether each txn on the taken path succeeded, outermost first.
fn take_path(view: &impl ShardView, txn: &TxnRequest, path: &mut Vec<bool>) {
    let ok = txn.compare.is_empty() || view.compares_hold(&txn.compare);
    path.push(ok);
    for op in branch(txn, ok) {
        if let Some(OpRequest::RequestTxn(nested)) = &op.request {
            take_path(view, nested, path);
        }
    }
}

fn branch(txn: &TxnRequest, ok: bool) -> &[crate::proto::etcdserverpb::RequestOp] {
    if ok {
        &txn.success
    } else {
        &txn.failure
    }
}

/// etcd `checkRequests` over the taken path: puts (key and lease), then ranges (revision
/// bounds).
fn check(
    view: &impl ShardView,
    txn: &TxnRequest,
    path: &[bool],
    at: &mut usize,
) -> Result<(), EtcdError> {
    let ok = path[*at];
    *at += 1;
    for op in branch(txn, ok) {
        match &op.request {
            Some(OpRequest::RequestPut(p)) => check_put(view, p)?,
            Some(OpRequest::RequestRange(r)) if r.revision != 0 => {
                if r.revision > view.revision() {
                    return Err(EtcdError::FutureRev);
                }
                if r.revision < view.compact_revision() {
                    return Err(EtcdError::Compacted);
                }
            }
            Some(OpRequest::RequestTxn(nested)) => check(view, nested, path, at)?,
            _ => {}
        }
    }
    Ok(())
}

/// Progress of one txn's execution.
struct Exec {
    rev: i64,
    sub: u32,
    wrote: bool,
    ops: TxnOps,
}

impl Exec {
    /// The revision a response inside the txn reports: the txn's own once it has written.
    fn current(&self, before: i64) -> i64 {
        if self.wrote {
            self.rev
        } else {
            before
        }
    }
}

fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision,
        ..Default::default()
    })
}

fn execute(
    view: &impl ShardView,
    txn: &TxnRequest,
    path: &[bool],
    at: &mut usize,
    exec: &mut Exec,
) -> TxnResponse {
    let ok = path[*at];
    *at += 1;
    let ops = branch(txn, ok);
    let mut responses = Vec::with_capacity(ops.len());
    for op in ops {
        let response = match &op.request {
            Some(OpRequest::RequestRange(r)) => {
                exec.ops.ranges += 1;
                let rev = if r.revision > 0 { r.revision } else { LATEST };
                let merged = view.range(r, rev);
                OpResponse::ResponseRange(RangeResponse {
                    header: header(exec.current(view.revision())),
                    kvs: merged.kvs,
                    more: merged.more,
                    count: merged.count,
                })
            }
            Some(OpRequest::RequestPut(p)) => {
                exec.ops.puts += 1;
                let prev_kv = view.put(p.clone(), exec.rev, exec.sub);
                exec.sub += 1;
                exec.wrote = true;
                OpResponse::ResponsePut(PutResponse {
                    header: header(exec.rev),
                    prev_kv,
                })
            }
            Some(OpRequest::RequestDeleteRange(d)) => {
                exec.ops.deletes += 1;
                let range = KeyRange::from_request(&d.key, &d.range_end);
                let prev_kvs = view.delete(&range, exec.rev, exec.sub);
                let deleted = prev_kvs.len() as i64;
                if deleted > 0 {
                    exec.sub += 1;
                    exec.wrote = true;
                }
                OpResponse::ResponseDeleteRange(DeleteRangeResponse {
                    header: header(exec.current(view.revision())),
                    deleted,
                    prev_kvs: if d.prev_kv { prev_kvs } else { Vec::new() },
                })
            }
            Some(OpRequest::RequestTxn(nested)) => {
                let mut r = execute(view, nested, path, at, exec);
                r.header = header(exec.current(view.revision()));
                OpResponse::ResponseTxn(r)
            }
            // Rejected by validation before proposing; nothing to do.
            None => continue,
        };
        responses.push(ResponseOp {
            response: Some(response),
        });
    }
    TxnResponse {
        header: None,
        succeeded: ok,
        responses,
    }
}

/// The compares etcd evaluates on the taken path (each costs it a Range).
fn compares_on_path(txn: &TxnRequest, path: &[bool], at: &mut usize) -> u64 {
    let ok = path[*at];
    *at += 1;
    let mut n = txn.compare.len() as u64;
    for op in branch(txn, ok) {
        if let Some(OpRequest::RequestTxn(nested)) = &op.request {
            n += compares_on_path(nested, path, at);
        }
    }
    n
}

/// Whether every op of `t`, in both branches, is a Range (etcd `isTxnReadonly`: a nested txn
/// is not read-only).
pub fn txn_read_only(t: &TxnRequest) -> bool {
    t.success
        .iter()
        .chain(&t.failure)
        .all(|op| matches!(op.request, Some(OpRequest::RequestRange(_)) | None))
}

/// Whether `t` holds a put in either branch, nested txns included: the txns a NOSPACE alarm
/// refuses (etcd's quota `Cost` is positive).
pub fn txn_puts(t: &TxnRequest) -> bool {
    t.success
        .iter()
        .chain(&t.failure)
        .any(|op| match &op.request {
            Some(OpRequest::RequestPut(_)) => true,
            Some(OpRequest::RequestTxn(n)) => txn_puts(n),
            _ => false,
        })
}

#[cfg(test)]
mod tests {
    use super::super::test_view::Memory;
    use super::*;
    use crate::proto::etcdserverpb::{
        compare::{CompareResult, CompareTarget, TargetUnion},
        DeleteRangeRequest, RequestOp,
    };

    fn put(key: &str, value: &str) -> RequestOp {
        RequestOp {
            request: Some(OpRequest::RequestPut(PutRequest {
                key: key.into(),
                value: value.into(),
                ..Default::default()
            })),
        }
    }

    fn get(key: &str) -> RequestOp {
        RequestOp {
            request: Some(OpRequest::RequestRange(RangeRequest {
                key: key.into(),
                ..Default::default()
            })),
        }
    }

    fn value_is(key: &str, value: &str) -> Compare {
        Compare {
            key: key.into(),
            target: CompareTarget::Value as i32,
            result: CompareResult::Equal as i32,
            target_union: Some(TargetUnion::Value(value.into())),
            ..Default::default()
        }
    }

    fn txn(compare: Vec<Compare>, success: Vec<RequestOp>, failure: Vec<RequestOp>) -> TxnRequest {
        TxnRequest {
            compare,
            success,
            failure,
        }
    }

    fn nested(t: TxnRequest) -> RequestOp {
        RequestOp {
            request: Some(OpRequest::RequestTxn(t)),
        }
    }

    #[test]
    fn every_write_of_a_txn_shares_one_revision() {
        let mut m = Memory::new();
        let out = m
            .txn(&txn(vec![], vec![put("a", "1"), put("b", "2")], vec![]))
            .unwrap();
        assert!(out.wrote && out.response.succeeded);
        assert_eq!(out.response.header.unwrap().revision, 2);
        assert_eq!(m.latest(b"a").unwrap().mod_revision, 2);
        assert_eq!(m.latest(b"b").unwrap().mod_revision, 2);
        assert_eq!(out.ops.puts, 2);
    }

    #[test]
    fn a_read_only_txn_keeps_the_revision() {
        let mut m = Memory::new();
        m.txn(&txn(vec![], vec![put("a", "1")], vec![])).unwrap();
        let out = m
            .txn(&txn(vec![value_is("a", "2")], vec![], vec![get("a")]))
            .unwrap();
        assert!(!out.wrote && !out.response.succeeded);
        assert_eq!(out.response.header.unwrap().revision, 2);
        assert_eq!(m.revision, 2);
        assert_eq!(out.ops.ranges, 2, "one range and one compare");
    }

    #[test]
    fn nested_compares_see_the_state_before_the_txn() {
        let mut m = Memory::new();
        m.txn(&txn(vec![], vec![put("a", "old")], vec![])).unwrap();
        // The outer branch writes a=new; the nested compare still sees a=old (etcd
        // `compareToPath` evaluates the whole path first).
        let t = txn(
            vec![],
            vec![
                put("a", "new"),
                nested(txn(
                    vec![value_is("a", "old")],
                    vec![put("b", "seen old")],
                    vec![],
                )),
            ],
            vec![],
        );
        let out = m.txn(&t).unwrap();
        assert_eq!(m.latest(b"b").unwrap().value, b"seen old");
        let OpResponse::ResponseTxn(inner) = out.response.responses[1].response.clone().unwrap()
        else {
            panic!("nested response")
        };
        assert!(inner.succeeded);
        assert_eq!(inner.header.unwrap().revision, 3);
    }

    #[test]
    fn a_failing_check_writes_nothing() {
        let mut m = Memory::new();
        let lease_put = RequestOp {
            request: Some(OpRequest::RequestPut(PutRequest {
                key: "k".into(),
                lease: 7,
                ..Default::default()
            })),
        };
        let err = m
            .txn(&txn(vec![], vec![put("a", "1"), lease_put], vec![]))
            .unwrap_err();
        assert_eq!(err, EtcdError::LeaseNotFound);
        assert!(m.latest(b"a").is_none());
        assert_eq!(m.revision, 1);

        let future = RequestOp {
            request: Some(OpRequest::RequestRange(RangeRequest {
                key: "a".into(),
                revision: 9,
                ..Default::default()
            })),
        };
        let err = m
            .txn(&txn(vec![], vec![put("a", "1"), future], vec![]))
            .unwrap_err();
        assert_eq!(err, EtcdError::FutureRev);
        assert!(m.latest(b"a").is_none());
    }

    #[test]
    fn ranges_inside_see_earlier_writes_and_deletes_count() {
        let mut m = Memory::new();
        m.txn(&txn(vec![], vec![put("b", "old")], vec![])).unwrap();
        let del = RequestOp {
            request: Some(OpRequest::RequestDeleteRange(DeleteRangeRequest {
                key: "b".into(),
                prev_kv: true,
                ..Default::default()
            })),
        };
        // etcd refuses a txn that writes one key twice, so the put and the delete differ.
        let t = txn(vec![], vec![put("a", "1"), get("a"), del, get("b")], vec![]);
        let out = m.txn(&t).unwrap();
        let r = &out.response.responses;
        let Some(OpResponse::ResponseRange(seen)) = &r[1].response else {
            panic!("range")
        };
        assert_eq!(seen.kvs[0].value, b"1");
        let Some(OpResponse::ResponseDeleteRange(d)) = &r[2].response else {
            panic!("delete")
        };
        assert_eq!(
            (d.deleted, d.prev_kvs[0].value.as_slice()),
            (1, &b"old"[..])
        );
        let Some(OpResponse::ResponseRange(gone)) = &r[3].response else {
            panic!("range")
        };
        assert!(gone.kvs.is_empty());
        assert_eq!(m.revision, 3, "one revision for the put and the delete");
        assert_eq!(m.latest(b"a").unwrap().mod_revision, 3);
    }

    #[test]
    fn put_checks_follow_etcd() {
        let m = Memory::new();
        let ignore = PutRequest {
            key: "x".into(),
            ignore_value: true,
            ..Default::default()
        };
        assert_eq!(check_put(&m, &ignore), Err(EtcdError::KeyNotFound));
        m.leases.grant(5, 10);
        let leased = PutRequest {
            key: "x".into(),
            lease: 5,
            ..Default::default()
        };
        assert_eq!(check_put(&m, &leased), Ok(()));
    }
}
