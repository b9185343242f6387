//! Decoder fuzzing: the functions the cargo-fuzz targets in `fuzz/fuzz_targets/` call, and the
//! proptest properties and seed-corpus replay that run them in CI (`cargo test`, no nightly).
//!
//! Why here, behind the `fuzzing` feature, and not in the fuzz crate: the decoders and rules
//! fuzzed are crate-private (the WAL record codec, the snapshot file codec, the Raft entry
//! framing, the in-memory [`ShardView`](crate::apply::txn::ShardView) the apply rules' tests
//! use). One module inside the crate reaches them without widening their visibility, and both
//! the fuzz targets (feature `fuzzing`) and the unit tests (`cfg(test)`) call the same
//! functions, so CI replays exactly what the fuzzer ran. The module is not compiled into the
//! server otherwise.
//!
//! Every function takes arbitrary bytes and panics only when a property fails:
//!
//! * [`requests`]: etcd v3 requests of every service, decoded with prost, validated as the
//!   front end does, and (KV, lease, compaction, auth, member URLs) applied by the apply rules
//!   to one fresh in-memory store, in sequence.
//! * [`wal`]: WAL segments, arbitrary or valid-then-damaged: an error or a valid prefix,
//!   never a record whose checksum does not match, never a changed entry.
//! * [`snapshot`]: MetaStore snapshot files and etcd-format (bbolt) snapshot databases,
//!   arbitrary or valid-then-damaged: an error, never a panic, and never a damaged file that
//!   passes its checksum.

use std::path::Path;
use std::sync::OnceLock;

use prost::Message;
use raft::prelude::{Entry, HardState};

use crate::apply::test_view::Memory;
use crate::apply::txn::ShardView;
use crate::error::EtcdError;
use crate::mvcc::KeyRange;
use crate::proto::etcdserverpb as pb;
use crate::proto::metastorepb::{proposal::Request as Proposed, KeyHistory, StateSnapshot};
use crate::proto::{v3electionpb as election, v3lockpb as lock};

/// etcd's default `--max-txn-ops`.
const MAX_TXN_OPS: usize = 128;
/// The lease the fresh store starts with (so puts with a lease can succeed).
const SEED_LEASE: i64 = 7;

/// Reads up to `n` bytes from the front of `data`.
fn take<'a>(data: &mut &'a [u8], n: usize) -> &'a [u8] {
    let n = n.min(data.len());
    let (head, rest) = data.split_at(n);
    *data = rest;
    head
}

fn take_u8(data: &mut &[u8]) -> u8 {
    take(data, 1).first().copied().unwrap_or(0)
}

fn take_u16(data: &mut &[u8]) -> u16 {
    let b = take(data, 2);
    b.iter().fold(0u16, |acc, x| (acc << 8) | u16::from(*x))
}

/// Decodes `bytes` as `M`; when it decodes, checks that encoding and decoding again gives the
/// same message (prost drops unknown fields, so this holds for any input that decodes).
fn decode<M: Message + Default + PartialEq + std::fmt::Debug>(bytes: &[u8]) -> Option<M> {
    let m = M::decode(bytes).ok()?;
    let again = M::decode(m.encode_to_vec().as_slice()).expect("a re-encoded message decodes");
    assert_eq!(m, again, "decode(encode(m)) != m");
    Some(m)
}

/// One fresh in-memory store, as a member's state machine starts, with a few keys and a
/// granted lease so that puts with `ignore_value`, leases and ranges have something to meet.
fn fresh_store() -> Memory {
    let mut m = Memory::new();
    m.leases.grant(SEED_LEASE, 60);
    let seed = pb::TxnRequest {
        success: [&b"a"[..], b"foo", b"foo/bar", b"\xff"]
            .iter()
            .map(|k| pb::RequestOp {
                request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                    key: k.to_vec(),
                    value: b"v".to_vec(),
                    lease: if k.starts_with(b"foo") { SEED_LEASE } else { 0 },
                    ..Default::default()
                })),
            })
            .collect(),
        ..Default::default()
    };
    m.txn(&seed).expect("the seed txn applies");
    m
}

/// Checks a range's answer against the request: at most `limit` key-values, each inside the
/// range, `count` at least what was returned.
fn check_range_answer(r: &pb::RangeRequest, kvs: &[crate::mvcc::KeyValue], count: i64) {
    let range = KeyRange::from_request(&r.key, &r.range_end);
    if r.limit > 0 {
        assert!(kvs.len() as i64 <= r.limit, "range returned past its limit");
    }
    if !r.count_only {
        assert!(
            count >= kvs.len() as i64,
            "count below the key-values returned"
        );
    }
    for kv in kvs {
        assert!(range.contains(&kv.key), "range returned a key outside it");
    }
}

/// Applies a Range as the front end and a shard serve it: etcd's request check, the revision
/// bounds (`ErrFutureRev`, `ErrCompacted`), then the read.
fn range(m: &Memory, r: &pb::RangeRequest) -> Result<(), EtcdError> {
    crate::server::validate::check_range(r)?;
    if r.revision > m.revision() {
        return Err(EtcdError::FutureRev);
    }
    if r.revision > 0 && r.revision < m.compact_revision() {
        return Err(EtcdError::Compacted);
    }
    let rev = if r.revision > 0 {
        r.revision
    } else {
        crate::mvcc::LATEST
    };
    let merged = m.range(r, rev);
    check_range_answer(r, &merged.kvs, merged.count);
    Ok(())
}

/// Applies a txn as the front end and the dispatcher do: etcd's checks, then the apply rules.
/// The revision moves by one exactly when the txn wrote, and the header reports it.
fn txn(m: &mut Memory, t: &pb::TxnRequest) -> Result<(), EtcdError> {
    crate::server::validate::check_txn(t, MAX_TXN_OPS)?;
    let before = m.revision;
    let out = m.txn(t)?;
    assert_eq!(m.revision, before + i64::from(out.wrote));
    assert_eq!(out.response.header.map(|h| h.revision), Some(m.revision));
    Ok(())
}

fn put(m: &mut Memory, p: &pb::PutRequest) -> Result<(), EtcdError> {
    crate::server::validate::check_put(p)?;
    let t = pb::TxnRequest {
        success: vec![pb::RequestOp {
            request: Some(pb::request_op::Request::RequestPut(p.clone())),
        }],
        ..Default::default()
    };
    let before = m.latest(&p.key);
    txn(m, &t)?;
    let kv = m.latest(&p.key).expect("a put key exists");
    assert_eq!(kv.mod_revision, m.revision);
    let want_value = match (&before, p.ignore_value) {
        (Some(b), true) => &b.value,
        _ => &p.value,
    };
    assert_eq!(&kv.value, want_value, "put stored another value");
    Ok(())
}

fn delete(m: &mut Memory, d: &pb::DeleteRangeRequest) -> Result<(), EtcdError> {
    crate::server::validate::check_delete(d)?;
    let t = pb::TxnRequest {
        success: vec![pb::RequestOp {
            request: Some(pb::request_op::Request::RequestDeleteRange(d.clone())),
        }],
        ..Default::default()
    };
    txn(m, &t)?;
    if let Some(k) = KeyRange::from_request(&d.key, &d.range_end).single_key() {
        assert!(m.latest(k).is_none(), "a deleted key is still there");
    }
    Ok(())
}

/// Member peer URLs as `MemberAdd`/`MemberUpdate` check them.
fn peer_urls(urls: &[String]) -> Result<(), EtcdError> {
    let checked = crate::server::cluster::check_peer_urls(urls)?;
    assert_eq!(checked.len(), urls.len());
    Ok(())
}

/// One fresh in-memory store and auth store, as a member starts.
struct State {
    m: Memory,
    auth: crate::auth::SharedAuth,
}

/// An auth store change, applied as the dispatcher applies it on every member.
fn auth(s: &State, p: Proposed) -> Result<(), EtcdError> {
    s.auth.apply(&p, 1).map(|_| ())
}

/// The request types [`requests`] decodes, selected by a frame's first byte (modulo).
const KINDS: u8 = 53;

/// Decodes and applies one request frame of kind `kind` (see [`requests`]).
fn request(s: &mut State, kind: u8, b: &[u8]) -> Option<Result<(), EtcdError>> {
    use pb::*;
    let m = &mut s.m;
    Some(match kind % KINDS {
        // KV
        0 => range(m, &decode::<RangeRequest>(b)?),
        1 => put(m, &decode::<PutRequest>(b)?),
        2 => delete(m, &decode::<DeleteRangeRequest>(b)?),
        3 => txn(m, &decode::<TxnRequest>(b)?),
        4 => {
            let c = decode::<CompactionRequest>(b)?;
            crate::apply::compaction::compact(&*m, c.revision).map(|()| {
                assert_eq!(m.compact_revision(), c.revision);
            })
        }
        // Watch
        5 => {
            let w = decode::<WatchRequest>(b)?;
            if let Some(watch_request::RequestUnion::CreateRequest(c)) = &w.request_union {
                let _ = KeyRange::from_request(&c.key, &c.range_end);
            }
            Ok(())
        }
        6 => decode::<WatchCreateRequest>(b).map(|_| Ok(()))?,
        7 => decode::<WatchCancelRequest>(b).map(|_| Ok(()))?,
        8 => decode::<WatchProgressRequest>(b).map(|_| Ok(()))?,
        // Lease
        9 => {
            let g = decode::<LeaseGrantRequest>(b)?;
            crate::apply::lease::grant(&m.leases, 1, &g).map(|rec| {
                assert!(m.leases.contains(rec.id) && rec.id != 0);
            })
        }
        10 => {
            let r = decode::<LeaseRevokeRequest>(b)?;
            crate::apply::lease::revoke(&m.leases, &*m, r.id).map(|revoked| {
                assert!(!m.leases.contains(r.id));
                // As the dispatcher does (`apply_lease_revoke`): a revoke that deleted keys
                // takes the next revision.
                if revoked.wrote() {
                    m.revision += 1;
                }
                for kv in &revoked.deleted {
                    assert!(
                        m.latest(&kv.key).is_none(),
                        "a revoked lease's key is still there"
                    );
                }
            })
        }
        11 => {
            let c = decode::<LeaseCheckpointRequest>(b)?;
            crate::apply::lease::checkpoint(&m.leases, &c);
            Ok(())
        }
        12 => {
            let k = decode::<LeaseKeepAliveRequest>(b)?;
            m.leases.renew(k.id);
            Ok(())
        }
        13 => {
            let t = decode::<LeaseTimeToLiveRequest>(b)?;
            let _ = m.leases.contains(t.id);
            Ok(())
        }
        14 => decode::<LeaseLeasesRequest>(b).map(|_| Ok(()))?,
        // Cluster
        15 => peer_urls(&decode::<MemberAddRequest>(b)?.peer_ur_ls),
        16 => decode::<MemberRemoveRequest>(b).map(|_| Ok(()))?,
        17 => peer_urls(&decode::<MemberUpdateRequest>(b)?.peer_ur_ls),
        18 => decode::<MemberListRequest>(b).map(|_| Ok(()))?,
        19 => decode::<MemberPromoteRequest>(b).map(|_| Ok(()))?,
        // Maintenance
        20 => decode::<AlarmRequest>(b).map(|_| Ok(()))?,
        21 => decode::<StatusRequest>(b).map(|_| Ok(()))?,
        22 => decode::<DefragmentRequest>(b).map(|_| Ok(()))?,
        23 => decode::<HashRequest>(b).map(|_| Ok(()))?,
        24 => decode::<HashKvRequest>(b).map(|_| Ok(()))?,
        25 => decode::<SnapshotRequest>(b).map(|_| Ok(()))?,
        26 => decode::<MoveLeaderRequest>(b).map(|_| Ok(()))?,
        27 => decode::<DowngradeRequest>(b).map(|_| Ok(()))?,
        // Auth: the replicated changes go through the auth store's apply.
        28 => auth(s, Proposed::AuthEnable(decode(b)?)),
        29 => auth(s, Proposed::AuthDisable(decode(b)?)),
        30 => decode::<AuthStatusRequest>(b).map(|_| Ok(()))?,
        31 => decode::<AuthenticateRequest>(b).map(|_| Ok(()))?,
        32 => auth(s, Proposed::AuthUserAdd(decode(b)?)),
        33 => decode::<AuthUserGetRequest>(b).map(|_| Ok(()))?,
        34 => auth(s, Proposed::AuthUserDelete(decode(b)?)),
        35 => auth(s, Proposed::AuthUserChangePassword(decode(b)?)),
        36 => auth(s, Proposed::AuthUserGrantRole(decode(b)?)),
        37 => auth(s, Proposed::AuthUserRevokeRole(decode(b)?)),
        38 => auth(s, Proposed::AuthRoleAdd(decode(b)?)),
        39 => decode::<AuthRoleGetRequest>(b).map(|_| Ok(()))?,
        40 => decode::<AuthUserListRequest>(b).map(|_| Ok(()))?,
        41 => decode::<AuthRoleListRequest>(b).map(|_| Ok(()))?,
        42 => auth(s, Proposed::AuthRoleDelete(decode(b)?)),
        43 => auth(s, Proposed::AuthRoleGrantPermission(decode(b)?)),
        44 => auth(s, Proposed::AuthRoleRevokePermission(decode(b)?)),
        // Lock and Election
        45 => decode::<lock::LockRequest>(b).map(|_| Ok(()))?,
        46 => decode::<lock::UnlockRequest>(b).map(|_| Ok(()))?,
        47 => decode::<election::CampaignRequest>(b).map(|_| Ok(()))?,
        48 => decode::<election::LeaderRequest>(b).map(|_| Ok(()))?,
        49 => decode::<election::ResignRequest>(b).map(|_| Ok(()))?,
        50 => decode::<election::ProclaimRequest>(b).map(|_| Ok(()))?,
        // A Raft entry's data as the dispatcher splits it into proposals.
        51 => {
            entry(s, b);
            Ok(())
        }
        _ => decode::<RequestOp>(b).map(|_| Ok(()))?,
    })
}

/// A committed Raft entry's data: split into `Proposal`s as the dispatcher does, each KV one
/// applied through the same checks as a client's.
fn entry(s: &mut State, data: &[u8]) {
    for d in crate::apply::proposals(data) {
        let crate::apply::Decoded::Proposal(p) = d else {
            continue;
        };
        let _ = match p.request {
            Some(Proposed::Put(p)) => put(&mut s.m, &p),
            Some(Proposed::DeleteRange(d)) => delete(&mut s.m, &d),
            Some(Proposed::Txn(t)) => txn(&mut s.m, &t),
            Some(r) if crate::auth::is_auth_request(&r) => auth(s, r),
            _ => Ok(()),
        };
    }
}

/// Fuzzes requests: `data` is a sequence of frames `kind: u8 | len: u16 BE | bytes`, each
/// decoded as the etcd request `kind` selects (every request message of the KV, Watch, Lease,
/// Cluster, Maintenance, Auth, Lock and Election services, plus Raft entry data) and, when it
/// decodes, validated and applied in order to one fresh in-memory store.
///
/// Panics when a property fails: a decoded message does not survive re-encoding; a request
/// the checks accept breaks the store's invariants (revision, limit, range bounds, a put's
/// value, a deleted key); anything panics on the way. Refusals are [`EtcdError`]s, etcd's
/// statuses, by type.
pub fn requests(mut data: &[u8]) {
    let tokens =
        crate::auth::token::Tokens::from_flag("simple", std::time::Duration::from_secs(300))
            .expect("simple tokens");
    let mut s = State {
        m: fresh_store(),
        auth: crate::auth::SharedAuth::new(tokens),
    };
    while !data.is_empty() {
        let kind = take_u8(&mut data);
        let len = usize::from(take_u16(&mut data));
        let body = take(&mut data, len);
        let _ = request(&mut s, kind, body);
    }
}

// ---------------------------------------------------------------------------------------------
// WAL

/// Splits `data` into records with an independent reading of the record layout (not the
/// WAL's own parser): `(kind, payload)` for each record whose header and body checksums match,
/// stopping at the first that does not.
fn oracle_records(data: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 0;
    while data.len() - at >= 12 {
        let len = u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize;
        let len_crc = u32::from_le_bytes(data[at + 4..at + 8].try_into().unwrap());
        let body_crc = u32::from_le_bytes(data[at + 8..at + 12].try_into().unwrap());
        if len == 0 || crc32fast::hash(&data[at..at + 4]) != len_crc {
            break;
        }
        let Some(body) = data.get(at + 12..at + 12 + len) else {
            break;
        };
        if crc32fast::hash(body) != body_crc {
            break;
        }
        out.push((body[0], body[1..].to_vec()));
        at += 12 + len;
    }
    out
}

/// Decodes `data` as a WAL segment (last or not), and checks: an error, or a valid prefix up
/// to a torn tail (only in the last segment); every record accepted passes both checksums
/// (by [`oracle_records`]); the entries accepted are exactly the entry records of the prefix.
fn decode_wal(data: &[u8], is_last: bool) -> Result<crate::consensus::wal::Recovered, ()> {
    use crate::consensus::wal::{decode_segment, Recovered, ENTRY};
    let path = Path::new("fuzz.wal");
    let mut rec = Recovered::default();
    let torn = decode_segment(path, data, is_last, 0, &mut rec).map_err(|_| ())?;
    let end = match torn {
        Some((off, _)) => {
            assert!(is_last, "a torn tail outside the last segment was accepted");
            assert!(off <= data.len());
            off
        }
        None => data.len(),
    };
    // Every byte before `end` is made of records whose checksums match.
    let records = oracle_records(&data[..end]);
    let covered: usize = records.iter().map(|(_, p)| 13 + p.len()).sum();
    assert_eq!(
        covered, end,
        "accepted bytes that are not checksummed records"
    );
    let entries: Vec<Entry> = records
        .iter()
        .filter(|(k, _)| *k == ENTRY)
        .map(|(_, p)| protobuf::Message::parse_from_bytes(p).expect("accepted entry decodes"))
        .collect();
    // Conflicting indexes replace the suffix, so compare the last entry at each index.
    let mut want: Vec<Entry> = Vec::new();
    for e in entries {
        if e.index == 0 {
            continue;
        }
        let keep = want.partition_point(|x| x.index < e.index);
        want.truncate(keep);
        want.push(e);
    }
    assert_eq!(
        rec.entries, want,
        "recovered entries differ from the records"
    );
    if torn.is_some() {
        // The prefix alone decodes cleanly to the same.
        let mut again = Recovered::default();
        let t = decode_segment(path, &data[..end], true, 0, &mut again).expect("prefix decodes");
        assert!(t.is_none());
        assert_eq!(again.entries, rec.entries);
    }
    Ok(rec)
}

/// Encodes `entries` (and a hard state first) as a WAL segment's bytes.
pub(crate) fn encode_wal(entries: &[Entry], hs: &HardState) -> Vec<u8> {
    use crate::consensus::wal::{encode_record, ENTRY, HARD_STATE};
    use protobuf::Message as _;
    let mut buf = Vec::new();
    encode_record(&mut buf, HARD_STATE, &hs.write_to_bytes().unwrap());
    for e in entries {
        encode_record(&mut buf, ENTRY, &e.write_to_bytes().unwrap());
    }
    buf
}

/// Builds entries 1..=n from `data`: each takes a term byte and a payload of up to 64 bytes.
fn entries_from(data: &mut &[u8]) -> Vec<Entry> {
    let n = usize::from(take_u8(data) % 16);
    (1..=n as u64)
        .map(|index| {
            let term = u64::from(take_u8(data)) + 1;
            let len = usize::from(take_u8(data) % 64);
            Entry {
                index,
                term,
                data: take(data, len).to_vec().into(),
                ..Default::default()
            }
        })
        .collect()
}

/// Fuzzes the WAL decoder. The first byte picks the mode:
///
/// * even: the rest is a segment, decoded as the last segment and as an earlier one;
/// * odd: entries built from the input are encoded, decoded back (identity), then damaged by
///   the remaining input (pairs `offset: u16 BE, xor: u8`; a final odd byte truncates) and
///   decoded again: an error, or entries that are a prefix of the originals.
///
/// Panics when a property fails (see [`decode_wal`]).
pub fn wal(mut data: &[u8]) {
    if take_u8(&mut data).is_multiple_of(2) {
        let _ = decode_wal(data, true);
        let _ = decode_wal(data, false);
        return;
    }
    let entries = entries_from(&mut data);
    let hs = HardState {
        term: entries.last().map_or(1, |e| e.term),
        commit: entries.len() as u64,
        ..Default::default()
    };
    let mut seg = encode_wal(&entries, &hs);
    let rec = decode_wal(&seg, false).expect("a valid segment decodes");
    assert_eq!(rec.entries, entries, "WAL round trip");
    assert_eq!(
        rec.hard_state.as_ref(),
        Some(&hs),
        "WAL hard state round trip"
    );
    let original = seg.clone();
    while data.len() >= 3 {
        let off = usize::from(take_u16(&mut data)) % seg.len();
        seg[off] ^= take_u8(&mut data);
    }
    if let [cut] = data {
        let keep = seg.len() - usize::from(*cut) % seg.len();
        seg.truncate(keep);
    }
    let changed = seg != original;
    match decode_wal(&seg, true) {
        Ok(got) => {
            assert!(got.entries.len() <= entries.len());
            assert_eq!(
                got.entries,
                entries[..got.entries.len()],
                "a damaged entry was accepted"
            );
            if !changed {
                assert_eq!(got.entries, entries);
            }
        }
        Err(()) => assert!(changed, "an undamaged segment failed"),
    }
}

// ---------------------------------------------------------------------------------------------
// Snapshots

/// A small state-machine image built from `data`: keys with histories, a revision, leases.
fn snapshot_from(data: &mut &[u8]) -> StateSnapshot {
    let n = usize::from(take_u8(data) % 8);
    let mut keys = Vec::new();
    for i in 0..n {
        let klen = usize::from(take_u8(data) % 8);
        let mut key = take(data, klen).to_vec();
        key.push(i as u8); // keys are distinct
        let vlen = usize::from(take_u8(data) % 32);
        let value = take(data, vlen).to_vec();
        keys.push(KeyHistory {
            key,
            versions: vec![crate::proto::metastorepb::KeyVersion {
                mod_revision: i as i64 + 2,
                create_revision: i as i64 + 2,
                version: 1,
                value,
                ..Default::default()
            }],
        });
    }
    StateSnapshot {
        term: u64::from(take_u8(data)) + 1,
        index: u64::from(take_u16(data)) + 1,
        revision: n as i64 + 1,
        keys,
        ..Default::default()
    }
}

/// An etcd backend database (bbolt) of a small image, with its sha256 appended as
/// `Maintenance.Snapshot` sends it; made once per process.
fn valid_etcd_db() -> &'static [u8] {
    static DB: OnceLock<Vec<u8>> = OnceLock::new();
    DB.get_or_init(|| {
        use sha2::Digest as _;
        let mut seed: &[u8] =
            b"\x05\x03abc\x04v1v1\x02zz\x03v2x\x00\x01w\x07\x07longkey\x05value\x01\x02";
        let snap = snapshot_from(&mut seed);
        let dir = std::env::temp_dir().join(format!("metastore-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("db");
        crate::backup::write_db(&snap, &path).expect("write_db");
        let mut file = std::fs::read(&path).expect("read back db");
        let _ = std::fs::remove_dir_all(&dir);
        let sha = sha2::Sha256::digest(&file);
        file.extend_from_slice(&sha);
        file
    })
}

/// Reads `file` as `etcdctl snapshot restore` does (digest, then the whole database); what it
/// gives back is internally consistent.
fn read_etcd_snapshot(file: &[u8], skip_hash_check: bool) -> Result<crate::backup::EtcdDb, ()> {
    let db = crate::backup::split_checked(file, skip_hash_check).map_err(|_| ())?;
    let out = crate::backup::read_db(db).map_err(|_| ())?;
    assert!(out.state.revision >= out.state.compact_revision);
    Ok(out)
}

/// Fuzzes snapshot decoding. The first byte picks the mode:
///
/// * 0: the rest as a MetaStore snapshot file (`member/snap/*.snap`): it loads only when its
///   magic and checksum match;
/// * 1: a snapshot file built from the input, encoded and decoded back (identity), then
///   damaged by the rest (`offset: u16 BE, xor: u8` pairs): a changed file never loads;
/// * 2: the rest as an etcd snapshot database, with and without the digest check;
/// * 3: a valid etcd snapshot database damaged by the rest: with the digest checked it is
///   always refused; without, it reads or fails, never panics.
pub fn snapshot(mut data: &[u8]) {
    use crate::state_machine::snapshot::{decode_file, encode_file};
    match take_u8(&mut data) % 4 {
        0 => {
            if decode_file(data).is_some() {
                assert!(data.starts_with(b"MSS1"));
                let crc = u32::from_le_bytes(data[4..8].try_into().unwrap());
                assert_eq!(crc32fast::hash(&data[8..]), crc, "a bad checksum passed");
            }
        }
        1 => {
            let snap = snapshot_from(&mut data);
            let mut file = encode_file(&snap);
            assert_eq!(
                decode_file(&file).as_ref(),
                Some(&snap),
                "snapshot round trip"
            );
            let original = file.clone();
            while data.len() >= 3 {
                let off = usize::from(take_u16(&mut data)) % file.len();
                file[off] ^= take_u8(&mut data);
            }
            if file != original {
                assert!(
                    decode_file(&file).is_none(),
                    "a damaged snapshot file loaded"
                );
            }
        }
        2 => {
            let _ = read_etcd_snapshot(data, false);
            let _ = read_etcd_snapshot(data, true);
        }
        _ => {
            let mut file = valid_etcd_db().to_vec();
            let original = read_etcd_snapshot(&file, false).expect("the valid db reads");
            assert_eq!(original.state.keys.len(), 5);
            while data.len() >= 3 {
                let off = (usize::from(take_u16(&mut data)) * 7) % file.len();
                file[off] ^= take_u8(&mut data);
            }
            if file != valid_etcd_db() {
                assert!(
                    read_etcd_snapshot(&file, false).is_err(),
                    "a damaged db passed its digest"
                );
            }
            let _ = read_etcd_snapshot(&file, true);
        }
    }
}

#[cfg(test)]
mod tests;
