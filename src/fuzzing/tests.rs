//! The fuzz functions in CI: proptest-generated structured inputs (requests of every KV kind,
//! nested txns up to and past the limits, WAL and snapshot round trips and damage) and the
//! committed seed corpus in `fuzz/corpus/<target>/`, replayed through the same functions the
//! cargo-fuzz targets call. Cases are capped so the whole module runs in seconds.

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::strategy::ValueTree;

use super::*;
use crate::consensus::wal::{decode_segment, Recovered};
use crate::server::validate::{check_txn, MAX_TXN_DEPTH};
use pb::request_op::Request as Op;

/// Keys as clients send them: empty, binary, short ASCII from a small alphabet (so that
/// requests meet each other and the seeded keys), and `\0`/`\xff` edges.
fn key() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        vec(
            prop_oneof![
                Just(b'a'),
                Just(b'b'),
                Just(b'f'),
                Just(b'o'),
                Just(0u8),
                Just(0xffu8)
            ],
            1..4
        ),
        vec(any::<u8>(), 0..6),
        Just(b"foo".to_vec()),
    ]
}

fn range_end() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![Just(Vec::new()), Just(vec![0u8]), key()]
}

fn range_req() -> impl Strategy<Value = pb::RangeRequest> {
    (
        key(),
        range_end(),
        -1i64..4,
        -2i64..8,
        -1i32..4,
        -1i32..6,
        any::<[bool; 3]>(),
    )
        .prop_map(
            |(
                key,
                range_end,
                limit,
                revision,
                sort_order,
                sort_target,
                [keys_only, count_only, serializable],
            )| {
                pb::RangeRequest {
                    key,
                    range_end,
                    limit,
                    revision,
                    sort_order,
                    sort_target,
                    keys_only,
                    count_only,
                    serializable,
                    ..Default::default()
                }
            },
        )
}

fn put_req() -> impl Strategy<Value = pb::PutRequest> {
    (
        key(),
        vec(any::<u8>(), 0..8),
        prop_oneof![Just(0i64), Just(SEED_LEASE), Just(99)],
        any::<[bool; 3]>(),
    )
        .prop_map(
            |(key, value, lease, [prev_kv, ignore_value, ignore_lease])| pb::PutRequest {
                key,
                value,
                lease,
                prev_kv,
                ignore_value,
                ignore_lease,
            },
        )
}

fn delete_req() -> impl Strategy<Value = pb::DeleteRangeRequest> {
    (key(), range_end(), any::<bool>()).prop_map(|(key, range_end, prev_kv)| {
        pb::DeleteRangeRequest {
            key,
            range_end,
            prev_kv,
        }
    })
}

fn compare() -> impl Strategy<Value = pb::Compare> {
    use pb::compare::TargetUnion;
    (key(), -1i32..5, -1i32..5, 0i64..6, vec(any::<u8>(), 0..3)).prop_map(
        |(key, result, target, n, v)| {
            let target_union = Some(match target {
                0 => TargetUnion::Version(n),
                1 => TargetUnion::CreateRevision(n),
                2 => TargetUnion::ModRevision(n),
                3 => TargetUnion::Value(v),
                _ => TargetUnion::Lease(n),
            });
            pb::Compare {
                key,
                result,
                target,
                target_union,
                ..Default::default()
            }
        },
    )
}

/// Txns with nested txns a few levels deep, empty ops included.
fn txn_req() -> impl Strategy<Value = pb::TxnRequest> {
    let leaf = prop_oneof![
        range_req().prop_map(|r| Some(Op::RequestRange(r))),
        put_req().prop_map(|p| Some(Op::RequestPut(p))),
        delete_req().prop_map(|d| Some(Op::RequestDeleteRange(d))),
        Just(None),
    ]
    .prop_map(|request| pb::RequestOp { request });
    let txn = |ops: BoxedStrategy<pb::RequestOp>| {
        (vec(compare(), 0..3), vec(ops.clone(), 0..4), vec(ops, 0..3)).prop_map(
            |(compare, success, failure)| pb::TxnRequest {
                compare,
                success,
                failure,
            },
        )
    };
    let leaf = leaf.boxed();
    txn(leaf.clone()).prop_recursive(3, 24, 4, move |inner| {
        let nested = inner.prop_map(|t| pb::RequestOp {
            request: Some(Op::RequestTxn(t)),
        });
        txn(prop_oneof![3 => leaf.clone(), 1 => nested].boxed())
    })
}

/// One request frame for [`requests`]: its kind byte and encoded message.
fn frame() -> impl Strategy<Value = (u8, Vec<u8>)> {
    prop_oneof![
        range_req().prop_map(|r| (0, r.encode_to_vec())),
        put_req().prop_map(|p| (1, p.encode_to_vec())),
        delete_req().prop_map(|d| (2, d.encode_to_vec())),
        txn_req().prop_map(|t| (3, t.encode_to_vec())),
        (-1i64..8).prop_map(|revision| (
            4,
            pb::CompactionRequest {
                revision,
                physical: false
            }
            .encode_to_vec()
        )),
        (
            -1i64..30,
            prop_oneof![Just(0i64), Just(SEED_LEASE), Just(8)]
        )
            .prop_map(|(ttl, id)| (9, pb::LeaseGrantRequest { ttl, id }.encode_to_vec())),
        prop_oneof![Just(0i64), Just(SEED_LEASE), Just(8)]
            .prop_map(|id| (10, pb::LeaseRevokeRequest { id }.encode_to_vec())),
        vec(
            prop_oneof![
                Just("http://127.0.0.1:2380".to_string()),
                Just("unix://x:1".to_string()),
                Just("ftp://h:1".to_string()),
                Just("http://h".to_string()),
                Just("".to_string()),
                ".{0,12}".prop_map(|s: String| s),
            ],
            0..3
        )
        .prop_map(|peer_ur_ls| (
            15,
            pb::MemberAddRequest {
                peer_ur_ls,
                is_learner: false
            }
            .encode_to_vec()
        )),
        (0u8..KINDS, vec(any::<u8>(), 0..40)),
    ]
}

fn encode_frames(frames: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut data = Vec::new();
    for (kind, body) in frames {
        data.push(*kind);
        data.extend_from_slice(&(body.len() as u16).to_be_bytes());
        data.extend_from_slice(body);
    }
    data
}

/// A chain of `depth` txns, each the only success op of its parent; the innermost puts.
fn chain(depth: usize) -> pb::TxnRequest {
    let mut t = pb::TxnRequest {
        success: vec![pb::RequestOp {
            request: Some(Op::RequestPut(pb::PutRequest {
                key: b"leaf".to_vec(),
                ..Default::default()
            })),
        }],
        ..Default::default()
    };
    for _ in 1..depth {
        t = pb::TxnRequest {
            success: vec![pb::RequestOp {
                request: Some(Op::RequestTxn(t)),
            }],
            ..Default::default()
        };
    }
    t
}

fn entries() -> impl Strategy<Value = Vec<Entry>> {
    vec((1u64..5, vec(any::<u8>(), 0..40)), 0..8).prop_map(|es| {
        es.into_iter()
            .enumerate()
            .map(|(i, (term, data))| Entry {
                index: i as u64 + 1,
                term,
                data: data.into(),
                ..Default::default()
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Sequences of structured requests of every KV kind, leases, compactions and member
    /// URLs, with raw frames of any kind mixed in: no panic, the store's invariants hold.
    #[test]
    fn structured_requests(frames in vec(frame(), 1..8)) {
        requests(&encode_frames(&frames));
    }

    /// Every decoded request survives re-encoding, and a txn the checks accept applies.
    #[test]
    fn txns_validate_then_apply(t in txn_req()) {
        let mut m = fresh_store();
        let checked = check_txn(&t, MAX_TXN_OPS);
        let applied = txn(&mut m, &t);
        if checked.is_err() {
            prop_assert_eq!(applied, checked);
        }
        let bytes = t.encode_to_vec();
        prop_assert_eq!(decode::<pb::TxnRequest>(&bytes), Some(t));
    }

    /// WAL records: encode then decode is the identity.
    #[test]
    fn wal_round_trip(es in entries(), term in 0u64..9, commit in 0u64..9) {
        let hs = HardState { term, commit, ..Default::default() };
        let seg = encode_wal(&es, &hs);
        let mut rec = Recovered::default();
        let torn = decode_segment(Path::new("p.wal"), &seg, true, 0, &mut rec).unwrap();
        prop_assert!(torn.is_none());
        prop_assert_eq!(rec.entries, es);
        prop_assert_eq!(rec.hard_state, Some(hs));
    }

    /// One damaged byte anywhere in a segment is detected: an earlier segment fails to
    /// decode; the last one yields only the records before the damage (a torn tail), or
    /// fails; never the damaged record.
    #[test]
    fn wal_damage_is_detected(es in entries(), at in any::<prop::sample::Index>(), xor in 1u8..=255) {
        let hs = HardState { term: 1, commit: es.len() as u64, ..Default::default() };
        let mut seg = encode_wal(&es, &hs);
        let at = at.index(seg.len());
        seg[at] ^= xor;
        let mut rec = Recovered::default();
        prop_assert!(decode_segment(Path::new("p.wal"), &seg, false, 0, &mut rec).is_err());
        let mut rec = Recovered::default();
        if decode_segment(Path::new("p.wal"), &seg, true, 0, &mut rec).is_ok() {
            prop_assert!(es.is_empty() || rec.entries.len() < es.len());
            prop_assert_eq!(&rec.entries[..], &es[..rec.entries.len()]);
        }
        // And the fuzz function's own checks on the same bytes.
        let _ = decode_wal(&seg, true);
    }

    /// Snapshot files: round trip, and any damage refused.
    #[test]
    fn snapshot_files(seed in vec(any::<u8>(), 0..200), damage in vec(any::<u8>(), 0..12)) {
        let mut input = vec![1u8];
        input.extend_from_slice(&seed);
        input.extend_from_slice(&damage);
        snapshot(&input);
        let mut input = vec![3u8];
        input.extend_from_slice(&damage);
        snapshot(&input);
    }

    /// Arbitrary bytes into every decoder.
    #[test]
    fn arbitrary_bytes(data in vec(any::<u8>(), 0..300)) {
        requests(&data);
        wal(&data);
        snapshot(&data);
    }
}

#[test]
fn nested_txns_up_to_and_past_the_limits() {
    // etcd's op budget: as deep as --max-txn-ops, then TooManyOps; MAX_TXN_DEPTH whatever
    // the budget. Each accepted chain also decodes (vendored prost limit) and applies.
    for (depth, budget, ok) in [
        (MAX_TXN_OPS, MAX_TXN_OPS, true),
        (MAX_TXN_OPS + 1, MAX_TXN_OPS, false),
        (MAX_TXN_DEPTH, 100_000, true),
        (MAX_TXN_DEPTH + 1, 100_000, false),
    ] {
        let t = chain(depth);
        assert_eq!(check_txn(&t, budget).is_ok(), ok, "depth {depth}");
        let bytes = t.encode_to_vec();
        let decoded = pb::TxnRequest::decode(bytes.as_slice());
        if ok {
            assert_eq!(decoded.as_ref(), Ok(&t));
            let mut m = fresh_store();
            m.txn(&t).expect("an accepted chain applies");
            assert_eq!(
                m.latest(b"leaf").map(|kv| kv.mod_revision),
                Some(m.revision)
            );
        }
        // Through the fuzz function too: decode, check, apply with etcd's default budget.
        let mut frame = vec![3u8];
        if bytes.len() <= usize::from(u16::MAX) {
            frame.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
            frame.extend_from_slice(&bytes);
            requests(&frame);
        }
    }
    // Past the decoder limit, as raw bytes: refused by the recursion limit, no stack
    // overflow.
    let deep = chain(600).encode_to_vec(); // 1200 message levels, past the 1100 limit
    assert!(pb::TxnRequest::decode(deep.as_slice()).is_err());
}

/// Replays `fuzz/corpus/<target>/` through `f`: the seeds and every crash input found.
fn replay(target: &str, f: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        files.len() >= 10,
        "{}: only {} seeds",
        dir.display(),
        files.len()
    );
    for path in files {
        let data = std::fs::read(&path).unwrap();
        if let Err(e) = std::panic::catch_unwind(|| f(&data)) {
            panic!("{} fails: {e:?}", path.display());
        }
    }
}

#[test]
fn corpus_requests() {
    replay("requests", requests);
}

#[test]
fn corpus_wal() {
    replay("wal", wal);
}

#[test]
fn corpus_snapshot() {
    replay("snapshot", snapshot);
}

/// Writes the structured seeds of the corpus (run once by hand when the formats change:
/// `cargo test --lib fuzzing::tests::write_seed_corpus -- --ignored`); the fuzzer grows it,
/// and `cargo fuzz cmin` trims it, from there.
#[test]
#[ignore]
fn write_seed_corpus() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let write = |target: &str, name: String, data: Vec<u8>| {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), data).unwrap();
    };
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    for i in 0..24 {
        let frames = vec(frame(), 1..6).new_tree(&mut runner).unwrap().current();
        write("requests", format!("seed-{i:02}"), encode_frames(&frames));
    }
    for depth in [MAX_TXN_OPS, MAX_TXN_OPS + 1] {
        write(
            "requests",
            format!("seed-chain-{depth}"),
            encode_frames(&[(3, chain(depth).encode_to_vec())]),
        );
    }
    for i in 0..16 {
        let es = entries().new_tree(&mut runner).unwrap().current();
        let seg = encode_wal(
            &es,
            &HardState {
                term: 1,
                commit: es.len() as u64,
                ..Default::default()
            },
        );
        let mut valid = vec![0u8];
        valid.extend_from_slice(&seg);
        write("wal", format!("seed-segment-{i:02}"), valid);
        let mut built = vec![1u8];
        built.extend(
            vec(any::<u8>(), 0..80)
                .new_tree(&mut runner)
                .unwrap()
                .current(),
        );
        write("wal", format!("seed-built-{i:02}"), built);
    }
    for i in 0..12 {
        let mut input = vec![1u8];
        input.extend(
            vec(any::<u8>(), 0..120)
                .new_tree(&mut runner)
                .unwrap()
                .current(),
        );
        write("snapshot", format!("seed-file-{i:02}"), input);
        let mut damaged = vec![3u8];
        damaged.extend(
            vec(any::<u8>(), 0..6)
                .new_tree(&mut runner)
                .unwrap()
                .current(),
        );
        write("snapshot", format!("seed-db-{i:02}"), damaged);
    }
    let mut db = vec![2u8];
    db.extend_from_slice(valid_etcd_db());
    write("snapshot", "seed-etcd-db".into(), db);
    let mut file = vec![0u8];
    let mut seed: &[u8] = b"\x03\x02ab\x02v1\x01c\x01x\x00\x00\x05\x00\x09";
    file.extend(crate::state_machine::snapshot::encode_file(&snapshot_from(
        &mut seed,
    )));
    write("snapshot", "seed-mss-file".into(), file);
}
