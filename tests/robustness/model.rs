//! The etcd KV model the linearizability checker runs operations against.
//!
//! A sequential specification of the subset of etcd's KV API the robustness traffic uses: put,
//! get of one key, delete of one key, and a compare-and-set txn (compare a key's mod_revision or
//! value, then put). Modelled on etcd's `tests/robustness/model` (`deterministic.go`,
//! `non_deterministic.go`): the state carries the global revision, and every response carries
//! the revision of its header, so the model checks revisions as well as values. A request whose
//! outcome is unknown (it failed or timed out; it may still have been applied) has the
//! [`Response::Unknown`] response, and stepping it yields both the unchanged and the applied
//! state — etcd's non-deterministic model, which porcupine runs as a power-set model.
//!
//! Beyond single keys it models ranges over a key prefix at the current revision (sorted, with
//! count, `limit` and `more`), leases (a grant with a client-chosen ID, puts attached to a
//! lease, a revoke that deletes the lease's keys at one revision), and the Kubernetes-style
//! optimistic-concurrency txn (`mod_revision(key) == R → put or delete, else get`).

use std::collections::{BTreeMap, BTreeSet};

/// etcd's `ErrLeaseNotFound` message (`server/lease/lessor.go`, `rpctypes.ErrGRPCLeaseNotFound`):
/// a put attached to, or a revoke of, a lease that is not granted.
pub const LEASE_NOT_FOUND: &str = "etcdserver: requested lease not found";
/// etcd's `ErrLeaseExist` message (`rpctypes.ErrGRPCLeaseExist`): a grant of an ID already
/// granted.
pub const LEASE_EXISTS: &str = "etcdserver: lease already exists";

/// The condition of a compare-and-set txn.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Cond {
    /// `mod_revision(key) == rev`; 0 matches an absent key (etcd compares missing keys' revisions
    /// as 0).
    ModRevision(i64),
    /// `value(key) == v`; false for an absent key (etcd fails value compares on missing keys).
    Value(String),
}

/// A client request.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Request {
    /// Range of one key.
    Get { key: String },
    /// Put of one key.
    Put { key: String, value: String },
    /// DeleteRange of one key.
    Delete { key: String },
    /// `Txn{compare: [cond on key], success: [put key value], failure: []}`.
    Cas {
        key: String,
        cond: Cond,
        value: String,
    },
    /// `Txn{compare: [], success: [put k1 v1, put k2 v2, ...]}`: several distinct keys at one
    /// revision (its response is [`Response::Put`]).
    PutAll { kvs: Vec<(String, String)> },
    /// Put of one key attached to `lease` (`PutRequest.lease`): [`LEASE_NOT_FOUND`] if the
    /// lease is not granted, else as [`Request::Put`] (response [`Response::Put`]).
    PutLease {
        key: String,
        value: String,
        lease: i64,
    },
    /// Range over the keys that start with `prefix` and are `>= from` (a continuation key),
    /// sorted by key, at most `limit` of them (0: no limit), at the current revision
    /// (`RangeRequest{key: from, range_end: prefix_end(prefix), limit}`).
    Range {
        prefix: String,
        from: String,
        limit: i64,
    },
    /// `LeaseGrant{ID: id}` with a TTL long enough never to expire during a run. The ID is the
    /// client's, so the model knows it. [`LEASE_EXISTS`] if already granted. No revision.
    LeaseGrant { id: i64 },
    /// `LeaseRevoke{ID: id}`: deletes every key attached to the lease in one revision (a new
    /// revision only if some key was deleted, as etcd's `lessor.Revoke` runs one write txn
    /// and mvcc moves the revision only for a txn with changes); [`LEASE_NOT_FOUND`] if it
    /// is not granted.
    LeaseRevoke { id: i64 },
    /// Kubernetes' optimistic write (`k8s.io/apiserver` `etcd3/store.go`, etcd's
    /// `client/v3/kubernetes`): `Txn{compare: [mod_revision(key) == expect], success: [put
    /// key value] (or [delete key] if `value` is `None`), failure: [get key] if
    /// `get_on_failure`}`. `expect == 0` is a create.
    Update {
        key: String,
        expect: i64,
        value: Option<String>,
        get_on_failure: bool,
    },
}

impl Request {
    /// The (first) key the request touches.
    pub fn key(&self) -> &str {
        match self {
            Request::Get { key }
            | Request::Put { key, .. }
            | Request::Delete { key }
            | Request::Cas { key, .. }
            | Request::PutLease { key, .. }
            | Request::Update { key, .. } => key,
            Request::PutAll { kvs } => &kvs[0].0,
            Request::Range { prefix, .. } => prefix,
            Request::LeaseGrant { .. } | Request::LeaseRevoke { .. } => "",
        }
    }

    /// The (key, value) pairs the request writes if it takes effect.
    pub fn writes(&self) -> Vec<(&str, &str)> {
        match self {
            Request::Put { key, value }
            | Request::Cas { key, value, .. }
            | Request::PutLease { key, value, .. } => vec![(key, value)],
            Request::Update {
                key,
                value: Some(value),
                ..
            } => vec![(key, value)],
            Request::PutAll { kvs } => kvs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
            _ => Vec::new(),
        }
    }
}

/// A response as the client saw it; `revision` is the response header's revision.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Response {
    /// The key's (value, mod_revision), or `None` if absent.
    Get {
        kv: Option<(String, i64)>,
        revision: i64,
    },
    /// A put: the header revision is the put's own revision.
    Put { revision: i64 },
    /// A delete: whether a key was deleted (then the revision is the deletion's).
    Delete { deleted: bool, revision: i64 },
    /// A compare-and-set: whether the compare held (then the revision is the put's).
    Cas { succeeded: bool, revision: i64 },
    /// A range: the page's (key, value, mod_revision)s in key order, the count of every key
    /// in the range (not only the page's), and whether keys beyond the limit remain.
    Range {
        kvs: Vec<(String, String, i64)>,
        count: i64,
        more: bool,
        revision: i64,
    },
    /// A lease grant or revoke that succeeded; the header revision (after a revoke, that of
    /// its deletions if it deleted keys).
    Lease { revision: i64 },
    /// An [`Request::Update`]: whether the compare held (then `revision` is the write's, or
    /// the unchanged one for a delete of an absent key) and, when it failed with
    /// `get_on_failure`, the key's (value, mod_revision) from the failure get.
    Update {
        succeeded: bool,
        revision: i64,
        current: Option<(String, i64)>,
    },
    /// A definitive error that changed nothing (etcd's message, e.g. [`LEASE_NOT_FOUND`]).
    Error(String),
    /// The request failed or timed out: it may or may not have taken effect.
    Unknown,
}

/// The model state: the global revision and every live key's (value, mod_revision).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct State {
    /// The store's current revision (etcd starts at 1).
    pub revision: i64,
    /// Live keys.
    pub kvs: BTreeMap<String, (String, i64)>,
    /// Granted leases.
    pub leases: BTreeSet<i64>,
    /// The lease of every live key attached to one.
    pub key_leases: BTreeMap<String, i64>,
}

impl State {
    /// An empty store at revision 1, as a fresh etcd cluster.
    pub fn initial() -> State {
        State {
            revision: 1,
            kvs: BTreeMap::new(),
            leases: BTreeSet::new(),
            key_leases: BTreeMap::new(),
        }
    }

    /// Executes `req` sequentially: the next state and the response etcd would give.
    pub fn apply(&self, req: &Request) -> (State, Response) {
        let mut next = self.clone();
        let resp = match req {
            Request::Get { key } => Response::Get {
                kv: self.kvs.get(key).cloned(),
                revision: self.revision,
            },
            Request::Put { key, value } => {
                next.revision += 1;
                next.kvs.insert(key.clone(), (value.clone(), next.revision));
                next.key_leases.remove(key);
                Response::Put {
                    revision: next.revision,
                }
            }
            Request::PutAll { kvs } => {
                next.revision += 1;
                for (key, value) in kvs {
                    next.kvs.insert(key.clone(), (value.clone(), next.revision));
                    next.key_leases.remove(key);
                }
                Response::Put {
                    revision: next.revision,
                }
            }
            Request::Delete { key } => {
                if next.kvs.remove(key).is_some() {
                    next.key_leases.remove(key);
                    next.revision += 1;
                    Response::Delete {
                        deleted: true,
                        revision: next.revision,
                    }
                } else {
                    Response::Delete {
                        deleted: false,
                        revision: self.revision,
                    }
                }
            }
            Request::Cas { key, cond, value } => {
                let current = self.kvs.get(key);
                let holds = match cond {
                    Cond::ModRevision(rev) => current.map_or(0, |(_, r)| *r) == *rev,
                    Cond::Value(v) => current.is_some_and(|(cur, _)| cur == v),
                };
                if holds {
                    next.revision += 1;
                    next.kvs.insert(key.clone(), (value.clone(), next.revision));
                    next.key_leases.remove(key);
                }
                Response::Cas {
                    succeeded: holds,
                    revision: next.revision,
                }
            }
            Request::PutLease { key, value, lease } => {
                if !self.leases.contains(lease) {
                    return (next, Response::Error(LEASE_NOT_FOUND.into()));
                }
                next.revision += 1;
                next.kvs.insert(key.clone(), (value.clone(), next.revision));
                next.key_leases.insert(key.clone(), *lease);
                Response::Put {
                    revision: next.revision,
                }
            }
            Request::Range {
                prefix,
                from,
                limit,
            } => {
                let all: Vec<(String, String, i64)> = self
                    .kvs
                    .range(from.clone()..)
                    .take_while(|(k, _)| k.starts_with(prefix.as_str()))
                    .map(|(k, (v, r))| (k.clone(), v.clone(), *r))
                    .collect();
                let count = all.len() as i64;
                let page = if *limit > 0 && count > *limit {
                    all[..*limit as usize].to_vec()
                } else {
                    all
                };
                Response::Range {
                    more: (page.len() as i64) < count,
                    kvs: page,
                    count,
                    revision: self.revision,
                }
            }
            Request::LeaseGrant { id } => {
                if !next.leases.insert(*id) {
                    return (next, Response::Error(LEASE_EXISTS.into()));
                }
                Response::Lease {
                    revision: self.revision,
                }
            }
            Request::LeaseRevoke { id } => {
                if !next.leases.remove(id) {
                    return (next, Response::Error(LEASE_NOT_FOUND.into()));
                }
                let attached: Vec<String> = self
                    .key_leases
                    .iter()
                    .filter(|(_, l)| **l == *id)
                    .map(|(k, _)| k.clone())
                    .collect();
                for key in &attached {
                    next.kvs.remove(key);
                    next.key_leases.remove(key);
                }
                if !attached.is_empty() {
                    next.revision += 1;
                }
                Response::Lease {
                    revision: next.revision,
                }
            }
            Request::Update {
                key,
                expect,
                value,
                get_on_failure,
            } => {
                let current = self.kvs.get(key);
                if current.map_or(0, |(_, r)| *r) != *expect {
                    return (
                        next,
                        Response::Update {
                            succeeded: false,
                            revision: self.revision,
                            current: if *get_on_failure {
                                current.cloned()
                            } else {
                                None
                            },
                        },
                    );
                }
                match value {
                    Some(value) => {
                        next.revision += 1;
                        next.kvs.insert(key.clone(), (value.clone(), next.revision));
                        next.key_leases.remove(key);
                    }
                    None => {
                        if next.kvs.remove(key).is_some() {
                            next.key_leases.remove(key);
                            next.revision += 1;
                        }
                    }
                }
                Response::Update {
                    succeeded: true,
                    revision: next.revision,
                    current: None,
                }
            }
        };
        (next, resp)
    }

    /// The states `req` can lead to if it returned `resp`: none if `resp` is impossible here,
    /// both the unchanged and the applied state if the outcome is unknown.
    pub fn step(&self, req: &Request, resp: &Response) -> Vec<State> {
        let (next, expected) = self.apply(req);
        match resp {
            Response::Unknown if next == *self => vec![next],
            Response::Unknown => vec![self.clone(), next],
            seen if *seen == expected => vec![next],
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &str, v: &str) -> Request {
        Request::Put {
            key: k.into(),
            value: v.into(),
        }
    }

    #[test]
    fn revisions_follow_etcd() {
        let s = State::initial();
        let (s, r) = s.apply(&put("a", "1"));
        assert_eq!(r, Response::Put { revision: 2 });
        let (s, r) = s.apply(&Request::Delete { key: "b".into() });
        assert_eq!(
            r,
            Response::Delete {
                deleted: false,
                revision: 2
            }
        );
        let cas = Request::Cas {
            key: "b".into(),
            cond: Cond::ModRevision(0),
            value: "x".into(),
        };
        let (s, r) = s.apply(&cas);
        assert_eq!(
            r,
            Response::Cas {
                succeeded: true,
                revision: 3
            }
        );
        let (_, r) = s.apply(&Request::Cas {
            key: "b".into(),
            cond: Cond::Value("y".into()),
            value: "z".into(),
        });
        assert_eq!(
            r,
            Response::Cas {
                succeeded: false,
                revision: 3
            }
        );
        assert_eq!(s.step(&put("c", "1"), &Response::Unknown).len(), 2);
        assert_eq!(
            s.step(&Request::Get { key: "a".into() }, &Response::Unknown)
                .len(),
            1
        );
    }

    use crate::linearizability::{check, Operation, Verdict, INFINITY};
    use std::time::Duration;

    /// Sequential operations (each returns before the next is called), client 0.
    fn seq(steps: Vec<(Request, Response)>) -> Vec<Operation> {
        steps
            .into_iter()
            .enumerate()
            .map(|(i, (req, resp))| Operation {
                client: 0,
                call: 10 * i as u64,
                ret: if resp == Response::Unknown {
                    INFINITY
                } else {
                    10 * i as u64 + 5
                },
                req,
                resp,
            })
            .collect()
    }

    fn verdict(steps: Vec<(Request, Response)>) -> Verdict {
        check(&seq(steps), State::initial(), Duration::from_secs(10))
    }

    fn legal(steps: Vec<(Request, Response)>) {
        let v = verdict(steps);
        assert!(matches!(v, Verdict::Ok), "expected linearizable: {v:?}");
    }

    fn illegal(steps: Vec<(Request, Response)>) {
        let v = verdict(steps);
        assert!(
            matches!(v, Verdict::Illegal(_)),
            "expected a violation: {v:?}"
        );
    }

    fn range(from: &str, limit: i64) -> Request {
        Request::Range {
            prefix: "p/".into(),
            from: from.into(),
            limit,
        }
    }

    fn kv(k: &str, v: &str, r: i64) -> (String, String, i64) {
        (k.into(), v.into(), r)
    }

    /// Three keys under p/ (revisions 2..=4) and one outside it (5).
    fn three_keys() -> Vec<(Request, Response)> {
        vec![
            (put("p/b", "1"), Response::Put { revision: 2 }),
            (put("p/a", "1"), Response::Put { revision: 3 }),
            (put("p/c", "1"), Response::Put { revision: 4 }),
            (put("q", "1"), Response::Put { revision: 5 }),
        ]
    }

    #[test]
    fn ranges_are_sorted_counted_and_paged() {
        let s = seq(three_keys())
            .iter()
            .fold(State::initial(), |s, o| s.apply(&o.req).0);
        let (_, r) = s.apply(&range("p/", 2));
        assert_eq!(
            r,
            Response::Range {
                kvs: vec![kv("p/a", "1", 3), kv("p/b", "1", 2)],
                count: 3,
                more: true,
                revision: 5
            }
        );
        // The next page from the continuation key "p/b\0".
        let (_, r) = s.apply(&range("p/b\0", 2));
        assert_eq!(
            r,
            Response::Range {
                kvs: vec![kv("p/c", "1", 4)],
                count: 1,
                more: false,
                revision: 5
            }
        );
    }

    #[test]
    fn wrong_range_outcomes_fail_the_check() {
        let right = Response::Range {
            kvs: vec![kv("p/a", "1", 3), kv("p/b", "1", 2)],
            count: 3,
            more: true,
            revision: 5,
        };
        let with = |resp: Response| {
            let mut h = three_keys();
            h.push((range("p/", 2), resp));
            h
        };
        legal(with(right.clone()));
        let Response::Range {
            kvs,
            count,
            more,
            revision,
        } = right
        else {
            unreachable!()
        };
        // A key missing from the page, the page out of order, a key outside the prefix, a
        // wrong count, a wrong `more`, a stale revision (the range before the last put).
        for bad in [
            Response::Range {
                kvs: vec![kvs[0].clone()],
                count,
                more,
                revision,
            },
            Response::Range {
                kvs: vec![kvs[1].clone(), kvs[0].clone()],
                count,
                more,
                revision,
            },
            Response::Range {
                kvs: vec![kvs[0].clone(), kv("q", "1", 5)],
                count,
                more,
                revision,
            },
            Response::Range {
                kvs: kvs.clone(),
                count: 4,
                more,
                revision,
            },
            Response::Range {
                kvs: kvs.clone(),
                count,
                more: false,
                revision,
            },
            Response::Range {
                kvs: kvs.clone(),
                count,
                more,
                revision: 4,
            },
        ] {
            illegal(with(bad));
        }
    }

    fn put_lease(k: &str, v: &str, lease: i64) -> Request {
        Request::PutLease {
            key: k.into(),
            value: v.into(),
            lease,
        }
    }

    /// Lease 7 granted at revision 1, p/a attached to it (2), p/b not (3).
    fn leased() -> Vec<(Request, Response)> {
        vec![
            (
                Request::LeaseGrant { id: 7 },
                Response::Lease { revision: 1 },
            ),
            (put_lease("p/a", "1", 7), Response::Put { revision: 2 }),
            (put("p/b", "1"), Response::Put { revision: 3 }),
        ]
    }

    #[test]
    fn a_revoke_deletes_the_leases_keys_at_one_revision() {
        let mut h = leased();
        h.push((
            Request::LeaseRevoke { id: 7 },
            Response::Lease { revision: 4 },
        ));
        h.push((
            range("p/", 0),
            Response::Range {
                kvs: vec![kv("p/b", "1", 3)],
                count: 1,
                more: false,
                revision: 4,
            },
        ));
        // A revoke of a lease without keys leaves the revision alone.
        h.push((
            Request::LeaseGrant { id: 8 },
            Response::Lease { revision: 4 },
        ));
        h.push((
            Request::LeaseRevoke { id: 8 },
            Response::Lease { revision: 4 },
        ));
        // A key put again without a lease is detached: a later revoke of its old lease (here
        // re-granted) does not delete it.
        h.push((
            Request::LeaseGrant { id: 9 },
            Response::Lease { revision: 4 },
        ));
        h.push((put_lease("p/c", "1", 9), Response::Put { revision: 5 }));
        h.push((put("p/c", "2"), Response::Put { revision: 6 }));
        h.push((
            Request::LeaseRevoke { id: 9 },
            Response::Lease { revision: 6 },
        ));
        legal(h);
    }

    #[test]
    fn wrong_lease_outcomes_fail_the_check() {
        let with = |steps: Vec<(Request, Response)>| {
            let mut h = leased();
            h.extend(steps);
            h
        };
        let revoke = (
            Request::LeaseRevoke { id: 7 },
            Response::Lease { revision: 4 },
        );
        // The attached key survives the revoke.
        illegal(with(vec![
            revoke.clone(),
            (
                Request::Get { key: "p/a".into() },
                Response::Get {
                    kv: Some(("1".into(), 2)),
                    revision: 4,
                },
            ),
        ]));
        // The key without the lease is deleted too.
        illegal(with(vec![
            revoke.clone(),
            (
                Request::Get { key: "p/b".into() },
                Response::Get {
                    kv: None,
                    revision: 4,
                },
            ),
        ]));
        // The revoke deleted a key but did not move the revision.
        illegal(with(vec![(
            Request::LeaseRevoke { id: 7 },
            Response::Lease { revision: 3 },
        )]));
        // A put attached to a lease never granted, or already revoked, was acknowledged.
        illegal(with(vec![(
            put_lease("p/c", "1", 99),
            Response::Put { revision: 4 },
        )]));
        illegal(with(vec![
            revoke.clone(),
            (put_lease("p/c", "1", 7), Response::Put { revision: 5 }),
        ]));
        // ... and the right answer to both is etcd's error.
        legal(with(vec![
            (
                put_lease("p/c", "1", 99),
                Response::Error(LEASE_NOT_FOUND.into()),
            ),
            revoke.clone(),
            (
                put_lease("p/c", "1", 7),
                Response::Error(LEASE_NOT_FOUND.into()),
            ),
        ]));
        // "Lease not found" for a granted lease, and a second grant of one ID accepted.
        illegal(with(vec![(
            put_lease("p/c", "1", 7),
            Response::Error(LEASE_NOT_FOUND.into()),
        )]));
        illegal(with(vec![(
            Request::LeaseGrant { id: 7 },
            Response::Lease { revision: 3 },
        )]));
        // A revoke of a revoked lease succeeded.
        illegal(with(vec![revoke.clone(), revoke.clone()]));
    }

    #[test]
    fn unknown_lease_outcomes_keep_both_branches_until_resolved() {
        let s = seq(leased())
            .iter()
            .fold(State::initial(), |s, o| s.apply(&o.req).0);
        let revoke = Request::LeaseRevoke { id: 7 };
        assert_eq!(s.step(&revoke, &Response::Unknown).len(), 2);
        // A timed-out revoke retried: "not found" says the first one took effect...
        let mut h = leased();
        h.push((revoke.clone(), Response::Unknown));
        h.push((revoke.clone(), Response::Error(LEASE_NOT_FOUND.into())));
        legal(h.clone());
        // ... and then the attached key is gone.
        h.push((
            Request::Get { key: "p/a".into() },
            Response::Get {
                kv: Some(("1".into(), 2)),
                revision: 4,
            },
        ));
        illegal(h);
        // A timed-out grant retried: "already exists" says the first one took effect.
        legal(vec![
            (Request::LeaseGrant { id: 3 }, Response::Unknown),
            (
                Request::LeaseGrant { id: 3 },
                Response::Error(LEASE_EXISTS.into()),
            ),
            (put_lease("a", "1", 3), Response::Put { revision: 2 }),
        ]);
    }

    fn update(k: &str, expect: i64, v: Option<&str>) -> Request {
        Request::Update {
            key: k.into(),
            expect,
            value: v.map(Into::into),
            get_on_failure: true,
        }
    }

    #[test]
    fn optimistic_updates_follow_etcd() {
        let ok = |revision| Response::Update {
            succeeded: true,
            revision,
            current: None,
        };
        let create = Request::Update {
            key: "p/a".into(),
            expect: 0,
            value: Some("1".into()),
            get_on_failure: false,
        };
        let base = vec![
            (create.clone(), ok(2)),
            (
                create.clone(),
                Response::Update {
                    succeeded: false,
                    revision: 2,
                    current: None,
                },
            ),
            (update("p/a", 2, Some("2")), ok(3)),
        ];
        let stale = update("p/a", 2, Some("3"));
        let mut h = base.clone();
        h.push((
            stale.clone(),
            Response::Update {
                succeeded: false,
                revision: 3,
                current: Some(("2".into(), 3)),
            },
        ));
        h.push((update("p/a", 3, None), ok(4)));
        legal(h);
        // The failure get returns a stale value; a stale update succeeds; a delete keeps
        // the revision.
        for bad in [
            (
                stale.clone(),
                Response::Update {
                    succeeded: false,
                    revision: 3,
                    current: Some(("1".into(), 2)),
                },
            ),
            (stale.clone(), ok(4)),
            (update("p/a", 3, None), ok(3)),
        ] {
            let mut h = base.clone();
            h.push(bad);
            illegal(h);
        }
    }
}
