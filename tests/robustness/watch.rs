//! Watch validators, after etcd's `tests/robustness/validate/watch.go`.
//!
//! Each watcher's history is a list of sessions (one watch stream each: the first from
//! revision 1, later ones resumed from the revision after the last event seen), each a list of
//! responses. The validators check it against the expected events, which [`KvHistory`]
//! derives from the KV store's own snapshots, revision by revision (so they do not trust the
//! watch code they check):
//!
//! * **ordered**: event revisions never go backwards within a session;
//! * **unique**: no (key, revision) event is delivered twice to a watcher;
//! * **atomic**: all events of one revision come in one response;
//! * **reliable**: the events delivered are the expected events from the session's start,
//!   without gaps and with the right content (kind, key, value);
//! * **resumable**: a session started at revision r begins exactly at the first expected event
//!   at or after r;
//! * **prev_kv**: every event's previous key-value is the key's state one revision earlier;
//! * **bookmarkable**: a progress notification at revision p comes after every event up to p
//!   and before every event after p.

use std::collections::{BTreeMap, HashSet};

/// A key's (value, mod_revision).
pub type Kv = (String, i64);

/// A watch event, reduced to what the validators compare.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// True for PUT, false for DELETE.
    pub put: bool,
    /// The key.
    pub key: String,
    /// The value written (empty for a DELETE).
    pub value: String,
    /// The event's revision (the kv's mod_revision).
    pub revision: i64,
    /// `prev_kv`, if the server sent one.
    pub prev: Option<Kv>,
}

/// One watch response.
#[derive(Clone, Debug, Default)]
pub struct WatchResp {
    /// The header revision.
    pub revision: i64,
    /// Its events (none for a progress notification).
    pub events: Vec<Event>,
    /// Whether it is a progress notification (no events, not created or canceled).
    pub progress: bool,
}

/// One watch stream: its start revision and the responses it delivered.
#[derive(Clone, Debug, Default)]
pub struct Session {
    /// The `start_revision` of the watch request.
    pub start: i64,
    /// Responses, in order of arrival.
    pub responses: Vec<WatchResp>,
    /// The `compact_revision` of the cancel that ended the session, if the server cancelled it
    /// because its start revision was compacted. The watcher then resumes from that revision:
    /// the events between its last one and the compaction are gone for it, which etcd's
    /// validators accept (each watch request is checked from its own start revision, and the
    /// cancelled one delivered nothing past its last event). [`validate_compacted`] checks
    /// that the cancel was due.
    pub compacted: Option<i64>,
}

/// A violation a validator found.
#[derive(Clone, Debug)]
pub struct Violation {
    /// The validator's name.
    pub validator: &'static str,
    /// What went wrong.
    pub detail: String,
}

/// The expected events of a KV history, revision by revision.
#[derive(Clone, Debug, Default)]
pub struct KvHistory {
    /// Expected events by revision (with the prev_kv they must carry).
    pub events: BTreeMap<i64, Vec<Event>>,
    /// The last revision of the history.
    pub last: i64,
}

impl KvHistory {
    /// Derives the expected events from consecutive snapshots of the watched keys: `snapshots`
    /// holds, for every revision from 1 to the last, the live keys with (value, mod_revision).
    /// A PUT at r is a key whose mod_revision is r; a DELETE at r is a key live at r-1 and gone
    /// at r.
    pub fn from_snapshots(snapshots: &[(i64, BTreeMap<String, Kv>)]) -> KvHistory {
        let mut events = BTreeMap::new();
        let mut last = 0;
        let empty = BTreeMap::new();
        for (i, (rev, snap)) in snapshots.iter().enumerate() {
            last = *rev;
            let before = if i == 0 { &empty } else { &snapshots[i - 1].1 };
            let mut evs = Vec::new();
            for (key, (value, mod_rev)) in snap {
                if mod_rev == rev {
                    evs.push(Event {
                        put: true,
                        key: key.clone(),
                        value: value.clone(),
                        revision: *rev,
                        prev: before.get(key).cloned(),
                    });
                }
            }
            for (key, prev) in before {
                if !snap.contains_key(key) {
                    evs.push(Event {
                        put: false,
                        key: key.clone(),
                        value: String::new(),
                        revision: *rev,
                        prev: Some(prev.clone()),
                    });
                }
            }
            evs.sort_by(|a, b| a.key.cmp(&b.key));
            if !evs.is_empty() {
                events.insert(*rev, evs);
            }
        }
        KvHistory { events, last }
    }

    /// Expected events at or after `start`, in order.
    fn from(&self, start: i64) -> Vec<&Event> {
        self.events.range(start..).flat_map(|(_, e)| e).collect()
    }
}

fn brief(e: &Event) -> String {
    format!(
        "{} {}={:?}@{}",
        if e.put { "PUT" } else { "DELETE" },
        e.key,
        e.value,
        e.revision
    )
}

/// Events of a session in order, each with the index of its response.
fn events_of(s: &Session) -> Vec<(usize, &Event)> {
    s.responses
        .iter()
        .enumerate()
        .flat_map(|(i, r)| r.events.iter().map(move |e| (i, e)))
        .collect()
}

/// ordered: within a session, event revisions never decrease.
pub fn validate_ordered(sessions: &[Session]) -> Vec<Violation> {
    let mut out = Vec::new();
    for (si, s) in sessions.iter().enumerate() {
        let evs = events_of(s);
        for w in evs.windows(2) {
            if w[1].1.revision < w[0].1.revision {
                out.push(Violation {
                    validator: "ordered",
                    detail: format!("session {si}: {} after {}", brief(w[1].1), brief(w[0].1)),
                });
            }
        }
    }
    out
}

/// unique: a watcher never gets the same (key, revision) event twice.
pub fn validate_unique(sessions: &[Session]) -> Vec<Violation> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (si, s) in sessions.iter().enumerate() {
        for (_, e) in events_of(s) {
            if !seen.insert((e.key.clone(), e.revision)) {
                out.push(Violation {
                    validator: "unique",
                    detail: format!("session {si}: {} delivered again", brief(e)),
                });
            }
        }
    }
    out
}

/// atomic: the events of one revision are not split across responses.
pub fn validate_atomic(sessions: &[Session]) -> Vec<Violation> {
    let mut out = Vec::new();
    for (si, s) in sessions.iter().enumerate() {
        let mut where_rev: BTreeMap<i64, usize> = BTreeMap::new();
        for (ri, e) in events_of(s) {
            match where_rev.get(&e.revision) {
                Some(first) if *first != ri => out.push(Violation {
                    validator: "atomic",
                    detail: format!(
                        "session {si}: revision {} split across responses {first} and {ri}",
                        e.revision
                    ),
                }),
                _ => {
                    where_rev.insert(e.revision, ri);
                }
            }
        }
    }
    out
}

/// reliable: a session's events are exactly the expected events from its start (a prefix of
/// them: later ones may not have arrived when the session ended), no gaps, right content. If
/// `caught_up` is given, the last session must have delivered every expected event up to it.
pub fn validate_reliable(
    history: &KvHistory,
    sessions: &[Session],
    caught_up: Option<i64>,
) -> Vec<Violation> {
    let mut out = Vec::new();
    for (si, s) in sessions.iter().enumerate() {
        let expected = history.from(s.start);
        // Within one revision (a txn), events come in the txn's op order, which snapshots
        // cannot tell: compare each revision's events sorted by key (ordered and atomic check
        // the rest).
        let mut got = events_of(s);
        for run in got.chunk_by_mut(|a, b| a.1.revision == b.1.revision) {
            run.sort_by(|a, b| a.1.key.cmp(&b.1.key));
        }
        for (i, (_, e)) in got.iter().enumerate() {
            let same = expected.get(i).is_some_and(|x| {
                x.put == e.put && x.key == e.key && x.value == e.value && x.revision == e.revision
            });
            if !same {
                out.push(Violation {
                    validator: "reliable",
                    detail: format!(
                        "session {si} (from revision {}): event {i} is {}, the history has {}",
                        s.start,
                        brief(e),
                        expected
                            .get(i)
                            .map_or("no more events".into(), |x| brief(x))
                    ),
                });
                break;
            }
        }
        if let (Some(upto), true) = (caught_up, si + 1 == sessions.len()) {
            let due = expected.iter().filter(|x| x.revision <= upto).count();
            if got.len() < due {
                out.push(Violation {
                    validator: "reliable",
                    detail: format!(
                        "session {si}: {} of the {due} events up to revision {upto} delivered; \
                         first missing {}",
                        got.len(),
                        brief(expected[got.len()])
                    ),
                });
            }
        }
    }
    out
}

/// resumable: a session from revision r starts with the first expected event at or after r.
pub fn validate_resumable(history: &KvHistory, sessions: &[Session]) -> Vec<Violation> {
    let mut out = Vec::new();
    for (si, s) in sessions.iter().enumerate() {
        if let Some((_, first)) = events_of(s).first() {
            let want = history.from(s.start).first().map(|e| e.revision);
            if first.revision < s.start || Some(first.revision) != want {
                out.push(Violation {
                    validator: "resumable",
                    detail: format!(
                        "session {si} from revision {} starts with {}, expected revision {want:?}",
                        s.start,
                        brief(first)
                    ),
                });
            }
        }
    }
    out
}

/// prev_kv: each event carries the key's (value, mod_revision) one revision before it.
///
/// The one exception is etcd's: an event at revision r whose previous revision was compacted
/// (a compaction to r or later, one of `compactions`) may come without prev_kv, as etcd reads
/// prev_kv at r - 1 and leaves it out on ErrCompacted (etcd issue #10681). A wrong prev_kv
/// is a violation whatever the compactions.
pub fn validate_prev_kv(
    history: &KvHistory,
    sessions: &[Session],
    compactions: &[i64],
) -> Vec<Violation> {
    let compacted_through = compactions.iter().copied().max().unwrap_or(0);
    let mut out = Vec::new();
    for (si, s) in sessions.iter().enumerate() {
        for (_, e) in events_of(s) {
            let want = history
                .events
                .get(&e.revision)
                .and_then(|evs| evs.iter().find(|x| x.key == e.key));
            if let Some(want) = want {
                let compacted_away = e.prev.is_none() && e.revision <= compacted_through;
                if want.prev != e.prev && !compacted_away {
                    out.push(Violation {
                        validator: "prev_kv",
                        detail: format!(
                            "session {si}: {} has prev_kv {:?}, the history has {:?}",
                            brief(e),
                            e.prev,
                            want.prev
                        ),
                    });
                }
            }
        }
    }
    out
}

/// bookmarkable: a progress notification at p follows every event at or before p (so
/// resuming from p+1 loses nothing) and precedes every event after p.
pub fn validate_bookmarkable(history: &KvHistory, sessions: &[Session]) -> Vec<Violation> {
    let mut out = Vec::new();
    for (si, s) in sessions.iter().enumerate() {
        let mut delivered = 0usize;
        let mut last_event = 0i64;
        let expected = history.from(s.start);
        for (ri, r) in s.responses.iter().enumerate() {
            if r.progress {
                let due = expected.iter().filter(|x| x.revision <= r.revision).count();
                if r.revision < last_event || delivered < due {
                    out.push(Violation {
                        validator: "bookmarkable",
                        detail: format!(
                            "session {si}: progress notification {ri} at revision {} after {} \
                             events (last at revision {last_event}); {due} were due",
                            r.revision, delivered
                        ),
                    });
                }
                // Every later event must come after the bookmark.
                for later in s.responses[ri + 1..].iter().flat_map(|r| &r.events) {
                    if later.revision <= r.revision {
                        out.push(Violation {
                            validator: "bookmarkable",
                            detail: format!(
                                "session {si}: {} after a progress notification at revision {}",
                                brief(later),
                                r.revision
                            ),
                        });
                        break;
                    }
                }
            }
            delivered += r.events.len();
            if let Some(e) = r.events.last() {
                last_event = last_event.max(e.revision);
            }
        }
    }
    out
}

/// compacted: a watch cancelled as compacted at revision c (`WatchResponse.compact_revision`)
/// must have asked for a revision below c, and c must be a revision some client compacted to
/// (`compactions`, every compaction requested during the run, whatever its outcome) — a
/// server that cancels a watch it could serve, or names a revision never compacted, would let
/// a watcher lose events that this check then excuses.
pub fn validate_compacted(sessions: &[Session], compactions: &[i64]) -> Vec<Violation> {
    let mut out = Vec::new();
    for (si, s) in sessions.iter().enumerate() {
        if let Some(c) = s.compacted {
            if s.start >= c || !compactions.contains(&c) {
                out.push(Violation {
                    validator: "compacted",
                    detail: format!(
                        "session {si} from revision {} cancelled as compacted at revision {c} \
                         (compactions requested: {compactions:?})",
                        s.start
                    ),
                });
            }
        }
    }
    out
}

/// Runs every validator over one watcher's sessions; `compactions` are the revisions
/// compacted to during the run (see [`validate_prev_kv`]).
pub fn validate_all(
    history: &KvHistory,
    sessions: &[Session],
    caught_up: Option<i64>,
    compactions: &[i64],
) -> Vec<Violation> {
    let mut out = validate_ordered(sessions);
    out.extend(validate_unique(sessions));
    out.extend(validate_atomic(sessions));
    out.extend(validate_reliable(history, sessions, caught_up));
    out.extend(validate_resumable(history, sessions));
    out.extend(validate_prev_kv(history, sessions, compactions));
    out.extend(validate_bookmarkable(history, sessions));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Revisions 2..=6: put a=1, put b=1, put a=2, delete a, txn-like revision 6 with two
    /// puts (c=1, d=1).
    fn history() -> KvHistory {
        let mut snaps: Vec<(i64, BTreeMap<String, Kv>)> = vec![(1, BTreeMap::new())];
        let mut cur = BTreeMap::new();
        let mut at = |rev: i64, f: &dyn Fn(&mut BTreeMap<String, Kv>)| {
            f(&mut cur);
            snaps.push((rev, cur.clone()));
        };
        at(2, &|m| {
            m.insert("a".into(), ("1".into(), 2));
        });
        at(3, &|m| {
            m.insert("b".into(), ("1".into(), 3));
        });
        at(4, &|m| {
            m.insert("a".into(), ("2".into(), 4));
        });
        at(5, &|m| {
            m.remove("a");
        });
        at(6, &|m| {
            m.insert("c".into(), ("1".into(), 6));
            m.insert("d".into(), ("1".into(), 6));
        });
        KvHistory::from_snapshots(&snaps)
    }

    /// A correct session from `start`: one response per revision, a progress notification at
    /// the end.
    fn session(h: &KvHistory, start: i64) -> Session {
        let mut responses: Vec<WatchResp> = h
            .events
            .range(start..)
            .map(|(rev, evs)| WatchResp {
                revision: *rev,
                events: evs.clone(),
                progress: false,
            })
            .collect();
        responses.push(WatchResp {
            revision: h.last,
            events: vec![],
            progress: true,
        });
        Session {
            start,
            responses,
            compacted: None,
        }
    }

    fn only(v: Vec<Violation>, name: &str) {
        assert!(!v.is_empty(), "{name} must find the planted fault");
        assert!(
            v.iter().all(|x| x.validator == name),
            "only {name} expected: {v:?}"
        );
    }

    #[test]
    fn history_derivation() {
        let h = history();
        assert_eq!(h.last, 6);
        let del = &h.events[&5][0];
        assert!(!del.put);
        assert_eq!(del.prev, Some(("2".into(), 4)));
        assert_eq!(h.events[&4][0].prev, Some(("1".into(), 2)));
        assert_eq!(h.events[&6].len(), 2);
    }

    #[test]
    fn correct_watch_passes() {
        let h = history();
        let sessions = vec![session(&h, 1)];
        let v = validate_all(&h, &sessions, Some(6), &[]);
        assert!(v.is_empty(), "{v:?}");
        // A resumed watcher: first session saw revisions 2..=3, second resumed at 4.
        let mut first = session(&h, 1);
        first.responses.truncate(2);
        let sessions = vec![first, session(&h, 4)];
        let v = validate_all(&h, &sessions, Some(6), &[]);
        assert!(v.is_empty(), "{v:?}");
    }

    #[test]
    fn txn_events_in_op_order_pass() {
        // Revision 6's events in the txn's op order (d before c), not key order.
        let h = history();
        let mut s = session(&h, 1);
        s.responses[4].events.reverse();
        let v = validate_all(&h, &[s], Some(6), &[]);
        assert!(v.is_empty(), "{v:?}");
    }

    #[test]
    fn reordered_event_fails_ordered() {
        let h = history();
        let mut s = session(&h, 1);
        s.responses.swap(1, 2);
        let v = validate_ordered(&[s.clone()]);
        only(v, "ordered");
        // reliable sees it too
        assert!(!validate_reliable(&h, &[s], None).is_empty());
    }

    #[test]
    fn dropped_event_fails_reliable() {
        let h = history();
        let mut s = session(&h, 1);
        s.responses.remove(2);
        only(validate_reliable(&h, &[s.clone()], None), "reliable");
        // A dropped last event is caught by the caught-up check.
        let mut s = session(&h, 1);
        s.responses.remove(4);
        s.responses.pop();
        assert!(validate_reliable(&h, &[s.clone()], None).is_empty());
        only(validate_reliable(&h, &[s], Some(6)), "reliable");
    }

    #[test]
    fn duplicate_event_fails_unique() {
        let h = history();
        let mut s = session(&h, 1);
        let again = s.responses[1].clone();
        s.responses.insert(2, again);
        only(validate_unique(&[s.clone()]), "unique");
        assert!(!validate_reliable(&h, &[s], None).is_empty());
    }

    #[test]
    fn split_revision_fails_atomic() {
        let h = history();
        let mut s = session(&h, 1);
        // Revision 6 (two events) is the 5th response; split it in two.
        let second = s.responses[4].events.pop().unwrap();
        s.responses.insert(
            5,
            WatchResp {
                revision: 6,
                events: vec![second],
                progress: false,
            },
        );
        only(validate_all(&h, &[s], Some(6), &[]), "atomic");
    }

    #[test]
    fn wrong_prev_kv_fails() {
        let h = history();
        let mut s = session(&h, 1);
        s.responses[2].events[0].prev = Some(("1".into(), 3));
        only(validate_all(&h, &[s.clone()], Some(6), &[]), "prev_kv");
        // A missing prev_kv on a delete.
        let mut s = session(&h, 1);
        s.responses[3].events[0].prev = None;
        only(validate_all(&h, &[s.clone()], Some(6), &[]), "prev_kv");
        // Missing, but compacted away: etcd leaves it out then; below the compaction, not.
        let at = s.responses[3].events[0].revision;
        assert!(validate_prev_kv(&h, &[s.clone()], &[at]).is_empty());
        only(validate_prev_kv(&h, &[s], &[at - 1]), "prev_kv");
    }

    #[test]
    fn wrong_resume_fails_resumable() {
        let h = history();
        // Resumed at 4, but revision 3's event is delivered first.
        let mut s = session(&h, 4);
        s.responses.insert(0, session(&h, 3).responses[0].clone());
        let v = validate_resumable(&h, &[s]);
        only(v, "resumable");
        // Resumed at 4, starts at 5: revision 4 skipped.
        let mut s = session(&h, 4);
        s.responses.remove(0);
        only(validate_resumable(&h, &[s]), "resumable");
    }

    #[test]
    fn early_progress_notification_fails_bookmarkable() {
        let h = history();
        // A progress notification at revision 6 before revision 5 and 6 are delivered.
        let mut s = session(&h, 1);
        s.responses.insert(
            3,
            WatchResp {
                revision: 6,
                events: vec![],
                progress: true,
            },
        );
        only(validate_all(&h, &[s], Some(6), &[]), "bookmarkable");
    }

    #[test]
    fn a_compacted_resume_passes_and_an_undue_cancel_fails() {
        let h = history();
        // The first session saw revisions 2..=3; revisions 4 and 5 were compacted away (to 5)
        // before it resumed; the server cancelled its resume from 4; it resumed from 5.
        let mut first = session(&h, 1);
        first.responses.truncate(2);
        let cancelled = Session {
            start: 4,
            responses: vec![],
            compacted: Some(5),
        };
        let sessions = vec![first, cancelled, session(&h, 5)];
        let v = validate_all(&h, &sessions, Some(6), &[]);
        assert!(v.is_empty(), "{v:?}");
        assert!(validate_compacted(&sessions, &[3, 5]).is_empty());
        // Cancelled at a revision nobody compacted to, or one not above its start.
        only(validate_compacted(&sessions, &[3]), "compacted");
        let mut early = sessions.clone();
        early[1].compacted = Some(4);
        only(validate_compacted(&early, &[4]), "compacted");
    }
}
