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

use std::collections::BTreeMap;

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
}

impl Request {
    /// The (first) key the request touches.
    pub fn key(&self) -> &str {
        match self {
            Request::Get { key }
            | Request::Put { key, .. }
            | Request::Delete { key }
            | Request::Cas { key, .. } => key,
            Request::PutAll { kvs } => &kvs[0].0,
        }
    }

    /// The (key, value) pairs the request writes if it takes effect.
    pub fn writes(&self) -> Vec<(&str, &str)> {
        match self {
            Request::Put { key, value } | Request::Cas { key, value, .. } => vec![(key, value)],
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
}

impl State {
    /// An empty store at revision 1, as a fresh etcd cluster.
    pub fn initial() -> State {
        State {
            revision: 1,
            kvs: BTreeMap::new(),
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
                Response::Put {
                    revision: next.revision,
                }
            }
            Request::PutAll { kvs } => {
                next.revision += 1;
                for (key, value) in kvs {
                    next.kvs.insert(key.clone(), (value.clone(), next.revision));
                }
                Response::Put {
                    revision: next.revision,
                }
            }
            Request::Delete { key } => {
                if next.kvs.remove(key).is_some() {
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
                }
                Response::Cas {
                    succeeded: holds,
                    revision: next.revision,
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
}
