//! A linearizability checker for histories of the etcd KV model ([`crate::model`]).
//!
//! The algorithm is Wing & Gong's, with the improvements of Lowe ("Testing for
//! linearizability", Concurrency and Computation: Practice and Experience, 2017) as porcupine
//! (github.com/anishathalye/porcupine, `checker.go`) implements them: call and return entries
//! of all operations in one time-ordered doubly linked list; a depth-first search that
//! linearizes ("lifts") a call whose model step succeeds, and backtracks when it reaches a
//! return entry of an operation not linearized yet; and a cache of (set of linearized
//! operations as a bitset, model state) pairs already explored, which keeps the search from
//! revisiting equivalent configurations.
//!
//! Non-determinism (unknown outcomes) is handled as porcupine's `NondeterministicModel` is: the
//! search state is the *set* of model states consistent with the operations linearized so far.
//! An operation whose outcome is unknown gets return time [`INFINITY`] (it may take effect at
//! any time after its call), as etcd's robustness suite does.
//!
//! The history is not partitioned per key: every response carries the global revision, and the
//! model checks it, so operations on different keys constrain each other. What keeps the search
//! cheap is the same revision check: a write's response revision pins it to exactly one place
//! in the order of writes, and a read's pins it between two writes, so at any point only the
//! few operations whose revision fits can be linearized. Histories of several thousand
//! operations on a few keys then check in well under a second.

use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};
use std::time::{Duration, Instant};

use crate::model::{Request, Response, State};

/// Return time of an operation whose outcome is unknown.
pub const INFINITY: u64 = u64::MAX;

/// One client operation: call and return times on a monotonic clock (nanoseconds since the
/// start of the run; `ret` is [`INFINITY`] for an unknown outcome).
#[derive(Clone, Debug)]
pub struct Operation {
    /// The client that issued it (for messages).
    pub client: usize,
    /// When the request was sent.
    pub call: u64,
    /// When the response came back.
    pub ret: u64,
    /// What was asked.
    pub req: Request,
    /// What came back.
    pub resp: Response,
}

/// The checker's verdict.
#[derive(Debug)]
pub enum Verdict {
    /// A linearization exists.
    Ok,
    /// No linearization exists; the message names the operation the deepest search could not
    /// linearize and the states it could be in.
    Illegal(String),
    /// The search ran out of its time budget.
    Timeout,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Call,
    Return,
}

struct Entry {
    kind: Kind,
    op: usize,
    /// Index of the matching return entry (calls only).
    matching: usize,
    prev: usize,
    next: usize,
}

const NIL: usize = usize::MAX;

/// A fixed-size bitset of operation ids.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Bitset(Vec<u64>);

impl Bitset {
    fn new(n: usize) -> Bitset {
        Bitset(vec![0; n.div_ceil(64)])
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn clear(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
}

/// The states reachable from every state of `states` by `op`, sorted and deduplicated.
fn step_all(states: &[State], op: &Operation) -> Vec<State> {
    let mut out: Vec<State> = states
        .iter()
        .flat_map(|s| s.step(&op.req, &op.resp))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Checks whether `history` is linearizable from `init`, within `budget`.
pub fn check(history: &[Operation], init: State, budget: Duration) -> Verdict {
    let started = Instant::now();
    let n = history.len();
    if n == 0 {
        return Verdict::Ok;
    }
    // Entries sorted by time; at equal times calls first (the operations then overlap, the
    // permissive reading, as porcupine does).
    let mut order: Vec<(u64, u8, usize)> = Vec::with_capacity(2 * n);
    for (i, op) in history.iter().enumerate() {
        assert!(op.call <= op.ret, "operation {i} returns before its call");
        order.push((op.call, 0, i));
        order.push((op.ret, 1, i));
    }
    order.sort();
    // Node 0 is the list head (a sentinel).
    let mut list: Vec<Entry> = Vec::with_capacity(2 * n + 1);
    list.push(Entry {
        kind: Kind::Call,
        op: NIL,
        matching: NIL,
        prev: NIL,
        next: NIL,
    });
    let mut return_at = vec![NIL; n];
    for (_, kind, op) in &order {
        let idx = list.len();
        let prev = idx - 1;
        list[prev].next = idx;
        list.push(Entry {
            kind: if *kind == 0 { Kind::Call } else { Kind::Return },
            op: *op,
            matching: NIL,
            prev,
            next: NIL,
        });
        if *kind == 1 {
            return_at[*op] = idx;
        }
    }
    for idx in 1..list.len() {
        if list[idx].kind == Kind::Call {
            list[idx].matching = return_at[list[idx].op];
        }
    }

    fn lift(list: &mut [Entry], e: usize) {
        let (p, nx) = (list[e].prev, list[e].next);
        list[p].next = nx;
        if nx != NIL {
            list[nx].prev = p;
        }
        let m = list[e].matching;
        let (p, nx) = (list[m].prev, list[m].next);
        list[p].next = nx;
        if nx != NIL {
            list[nx].prev = p;
        }
    }
    fn unlift(list: &mut [Entry], e: usize) {
        let m = list[e].matching;
        let (p, nx) = (list[m].prev, list[m].next);
        list[p].next = m;
        if nx != NIL {
            list[nx].prev = m;
        }
        let (p, nx) = (list[e].prev, list[e].next);
        list[p].next = e;
        if nx != NIL {
            list[nx].prev = e;
        }
    }

    // The cache holds 128-bit fingerprints of (linearized set, state set), two SipHashes with
    // independent random keys, rather than the configurations themselves: a long history's
    // bitsets are kilobytes each. A collision (probability about k^2 / 2^128 for k entries)
    // could only prune a branch wrongly, never accept a wrong history.
    let keys = (RandomState::new(), RandomState::new());
    let fingerprint = |lin: &Bitset, states: &[State]| -> (u64, u64) {
        (
            keys.0.hash_one((lin, states)),
            keys.1.hash_one((lin, states)),
        )
    };
    let mut cache: HashSet<(u64, u64)> = HashSet::new();
    let mut linearized = Bitset::new(n);
    let mut states = vec![init];
    let mut calls: Vec<(usize, Vec<State>)> = Vec::new();
    // The deepest point reached, for the failure message.
    let mut deepest: (usize, usize, Vec<State>) = (0, NIL, Vec::new());
    let mut entry = list[0].next;
    let mut steps: u64 = 0;
    while list[0].next != NIL {
        steps += 1;
        if steps.is_multiple_of(4096) && started.elapsed() > budget {
            return Verdict::Timeout;
        }
        if list[entry].kind == Kind::Call {
            let op = list[entry].op;
            let next = step_all(&states, &history[op]);
            if !next.is_empty() {
                linearized.set(op);
                if cache.insert(fingerprint(&linearized, &next)) {
                    calls.push((entry, std::mem::replace(&mut states, next)));
                    lift(&mut list, entry);
                    entry = list[0].next;
                    continue;
                }
                linearized.clear(op);
            }
            entry = list[entry].next;
        } else {
            if calls.len() >= deepest.0 {
                deepest = (calls.len(), list[entry].op, states.clone());
            }
            let Some((top, prev_states)) = calls.pop() else {
                break;
            };
            states = prev_states;
            linearized.clear(list[top].op);
            unlift(&mut list, top);
            entry = list[top].next;
        }
    }
    if list[0].next == NIL {
        return Verdict::Ok;
    }
    let (depth, stuck, states) = deepest;
    let op = &history[stuck];
    let shown: Vec<String> = states
        .iter()
        .take(4)
        .map(|s| format!("revision {} {:?}", s.revision, s.kvs))
        .collect();
    Verdict::Illegal(format!(
        "not linearizable: after {depth} operations linearized, operation {stuck} (client {}, \
         call {} ns, return {}) {:?} -> {:?} cannot be; the model could be in [{}]",
        op.client,
        op.call,
        if op.ret == INFINITY {
            "unknown".to_string()
        } else {
            format!("{} ns", op.ret)
        },
        op.req,
        op.resp,
        shown.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Cond;

    fn op(call: u64, ret: u64, req: Request, resp: Response) -> Operation {
        Operation {
            client: 0,
            call,
            ret,
            req,
            resp,
        }
    }
    fn put(k: &str, v: &str) -> Request {
        Request::Put {
            key: k.into(),
            value: v.into(),
        }
    }
    fn get(k: &str) -> Request {
        Request::Get { key: k.into() }
    }
    fn got(v: Option<(&str, i64)>, revision: i64) -> Response {
        Response::Get {
            kv: v.map(|(v, r)| (v.to_string(), r)),
            revision,
        }
    }
    fn put_ok(revision: i64) -> Response {
        Response::Put { revision }
    }
    fn run(h: &[Operation]) -> Verdict {
        check(h, State::initial(), Duration::from_secs(10))
    }
    fn assert_ok(h: &[Operation]) {
        let v = run(h);
        assert!(matches!(v, Verdict::Ok), "{v:?}");
    }
    fn assert_illegal(h: &[Operation]) {
        let v = run(h);
        assert!(matches!(v, Verdict::Illegal(_)), "{v:?}");
    }

    #[test]
    fn concurrent_history_passes() {
        // Two overlapping puts; reads see them in the order their revisions say, one read
        // overlapping both; a CAS on mod_revision; a delete; an unknown put that took effect
        // and one that did not.
        let h = vec![
            op(0, 10, put("a", "1"), put_ok(3)),
            op(1, 9, put("b", "1"), put_ok(2)),
            op(2, 11, get("a"), got(None, 2)),
            op(12, 13, get("a"), got(Some(("1", 3)), 3)),
            op(
                14,
                20,
                Request::Cas {
                    key: "a".into(),
                    cond: Cond::ModRevision(3),
                    value: "2".into(),
                },
                Response::Cas {
                    succeeded: true,
                    revision: 4,
                },
            ),
            op(
                15,
                21,
                Request::Cas {
                    key: "b".into(),
                    cond: Cond::Value("x".into()),
                    value: "2".into(),
                },
                Response::Cas {
                    succeeded: false,
                    revision: 3,
                },
            ),
            op(22, INFINITY, put("c", "1"), Response::Unknown),
            op(23, INFINITY, put("c", "2"), Response::Unknown),
            op(
                24,
                25,
                Request::Delete { key: "b".into() },
                Response::Delete {
                    deleted: true,
                    revision: 6,
                },
            ),
            op(26, 27, get("c"), got(Some(("2", 5)), 6)),
            op(28, 29, get("b"), got(None, 6)),
        ];
        assert_ok(&h);
    }

    #[test]
    fn stale_read_fails() {
        // The read starts after the put was acknowledged but misses it.
        let h = vec![
            op(0, 10, put("a", "1"), put_ok(2)),
            op(11, 12, get("a"), got(None, 1)),
        ];
        assert_illegal(&h);
        // The same read overlapping the put is fine.
        let h = vec![
            op(0, 10, put("a", "1"), put_ok(2)),
            op(5, 12, get("a"), got(None, 1)),
        ];
        assert_ok(&h);
    }

    #[test]
    fn lost_acknowledged_write_fails() {
        // "2" was acknowledged at revision 3, yet a later read still sees "1" at revision 3.
        let h = vec![
            op(0, 1, put("a", "1"), put_ok(2)),
            op(2, 3, put("a", "2"), put_ok(3)),
            op(4, 5, get("a"), got(Some(("1", 2)), 3)),
        ];
        assert_illegal(&h);
    }

    #[test]
    fn revision_going_backwards_fails() {
        // A read at revision 3, then a later read at revision 2: the store went back in time
        // (even though the value read is the same).
        let h = vec![
            op(0, 1, put("a", "1"), put_ok(2)),
            op(2, 3, put("b", "1"), put_ok(3)),
            op(4, 5, get("a"), got(Some(("1", 2)), 3)),
            op(6, 7, get("a"), got(Some(("1", 2)), 2)),
        ];
        assert_illegal(&h);
        // Two acknowledged puts with the same revision.
        let h = vec![
            op(0, 1, put("a", "1"), put_ok(2)),
            op(2, 3, put("b", "1"), put_ok(2)),
        ];
        assert_illegal(&h);
    }

    #[test]
    fn torn_multi_key_txn_fails() {
        // A txn put a=1 and b=1 at revision 2; a read sees a but not b at that revision.
        let all = Request::PutAll {
            kvs: vec![("a".into(), "1".into()), ("b".into(), "1".into())],
        };
        let h = vec![
            op(0, 1, all.clone(), put_ok(2)),
            op(2, 3, get("a"), got(Some(("1", 2)), 2)),
            op(4, 5, get("b"), got(None, 2)),
        ];
        assert_illegal(&h);
        let h = vec![
            op(0, 1, all, put_ok(2)),
            op(2, 3, get("a"), got(Some(("1", 2)), 2)),
            op(4, 5, get("b"), got(Some(("1", 2)), 2)),
        ];
        assert_ok(&h);
    }

    #[test]
    fn wrong_cas_outcome_fails() {
        // The compare must fail on a missing key's value.
        let h = vec![op(
            0,
            1,
            Request::Cas {
                key: "a".into(),
                cond: Cond::Value("1".into()),
                value: "2".into(),
            },
            Response::Cas {
                succeeded: true,
                revision: 2,
            },
        )];
        assert_illegal(&h);
    }

    #[test]
    fn unknown_write_observed_later_passes_and_unobserved_order_fails() {
        // An unknown put seen by a later read is fine...
        let h = vec![
            op(0, INFINITY, put("a", "1"), Response::Unknown),
            op(5, 6, get("a"), got(Some(("1", 2)), 2)),
        ];
        assert_ok(&h);
        // ... but not by a read that finished before it was called.
        let h = vec![
            op(0, 1, get("a"), got(Some(("1", 2)), 2)),
            op(5, INFINITY, put("a", "1"), Response::Unknown),
        ];
        assert_illegal(&h);
    }

    #[test]
    fn large_concurrent_history_is_fast() {
        // 4 clients, 3000 operations on 3 keys, generated by a sequential run with overlapping
        // windows; must check quickly.
        let mut s = State::initial();
        let mut h = Vec::new();
        let mut t = 0u64;
        for i in 0..3000u64 {
            let key = format!("k{}", i % 3);
            let req = match i % 4 {
                0 | 1 => put(&key, &format!("v{i}")),
                2 => get(&key),
                _ => Request::Delete { key },
            };
            let (next, resp) = s.apply(&req);
            s = next;
            // Each op overlaps the next three.
            let resp = if i % 97 == 0 && i % 4 < 2 {
                Response::Unknown
            } else {
                resp
            };
            let ret = if resp == Response::Unknown {
                INFINITY
            } else {
                t + 40
            };
            h.push(Operation {
                client: (i % 4) as usize,
                call: t,
                ret,
                req,
                resp,
            });
            t += 10;
        }
        let started = Instant::now();
        assert_ok(&h);
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
