//! etcd-format snapshot files: what `etcdctl snapshot save` fetches through
//! `Maintenance.Snapshot`, and what `etcdctl snapshot restore` and
//! `metastore snapshot restore` (see [`restore`]) build a data directory from.
//!
//! A snapshot file is etcd's backend database, a bbolt file with 4096-byte pages, followed by
//! the 32-byte sha256 of the database bytes (etcd `v3rpc/maintenance.go` `Snapshot`;
//! `clientv3/snapshot/v3_snapshot.go` checks that the size is 32 mod 512 and the digest).
//! The buckets, as etcd 3.4/3.5 lay them out:
//! * `key`: revision key (8-byte big-endian main revision, `_`, 8-byte big-endian
//!   sub-revision, plus `t` for a tombstone; `mvcc/revision.go`, `mvcc/kvstore.go`) to a
//!   marshaled `mvccpb.KeyValue` (a tombstone's holds only the key): the MVCC history from the
//!   compaction revision on.
//! * `meta`: `consistent_index` and `term` (8-byte big-endian: the applied Raft index and its
//!   term), `scheduledCompactRev` and `finishedCompactRev` (revision keys).
//! * `lease`: lease ID (8-byte big-endian) to a `leasepb.Lease` (`lease/lessor.go`).
//! * `auth` (`authEnabled` = 1 byte, `authRevision` = 8-byte big-endian), `authUsers` and
//!   `authRoles` (name to `authpb.User` / `authpb.Role`; `auth/store.go`).
//! * `members` (hex member ID to etcd's JSON member record), `members_removed` (hex ID to
//!   `removed`) and `cluster` (`clusterVersion`; `etcdserver/api/membership/store.go`; and,
//!   while a downgrade is enabled, `downgrade`: etcd 3.5's JSON `DowngradeInfo`,
//!   `{"target-version":"3.4.0","enabled":true}`, as `cluster.go` `mustSaveDowngradeToBackend`
//!   writes it).
//! * `alarm`: marshaled `etcdserverpb.AlarmMember` to an empty value.
//!
//! Writing uses the `bbolt-rs` crate (feature `compat`, Go bbolt's magic number), whose files
//! Go bbolt, `etcdctl snapshot status` and etcd 3.4 open. Reading uses [`bolt`], a small
//! page walker of our own, because `bbolt-rs` cannot open the files etcd writes (see there).

pub mod bolt;
pub mod restore;

use std::collections::BTreeMap;
use std::path::Path;

use prost::Message;
use sha2::Digest;

use crate::proto::authpb::{Role, User};
use crate::proto::etcdserverpb::AlarmMember;
use crate::proto::leasepb::Lease;
use crate::proto::metastorepb::{
    AuthState, DowngradeInfo, KeyHistory, KeyVersion, LeaseRecord, MemberRecord, StateSnapshot,
};
use crate::proto::mvccpb::KeyValue;

/// Bytes of the sha256 digest that follows the database in a snapshot file.
pub const SHA256_LEN: usize = 32;
/// Bytes per `SnapshotResponse.blob` (etcd's `snapshotSendBufferSize`, 32 KiB).
pub const SEND_CHUNK: usize = 32 * 1024;
/// The cluster version written to the `cluster` bucket (the API level MetaStore reports).
pub const CLUSTER_VERSION: &str = "3.5.0";

/// Failures making or reading snapshot files.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// An I/O error on the named file or directory.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The digest after the database does not match it (etcdctl's message).
    #[error("expected sha256 {expected}, got {got}")]
    HashMismatch {
        /// The digest the file carries, hex.
        expected: String,
        /// The digest of the database bytes, hex.
        got: String,
    },
    /// The file has no digest and `--skip-hash-check` was not given (etcdctl's message).
    #[error("snapshot missing hash but --skip-hash-check=false")]
    MissingHash,
    /// The database cannot be read or written, or an entry does not decode.
    #[error("{0}")]
    Format(String),
}

impl BackupError {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
        move |source| BackupError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

fn format_err(what: impl std::fmt::Display) -> BackupError {
    BackupError::Format(what.to_string())
}

/// etcd's revision key: main and sub revision, 8 bytes big-endian each, joined by `_`, and a
/// trailing `t` for a tombstone (`mvcc/revision.go` `revToBytes`, `mvcc/kvstore.go`
/// `appendMarkTombstone`).
pub fn revision_key(main: i64, sub: i64, tombstone: bool) -> Vec<u8> {
    let mut k = Vec::with_capacity(18);
    k.extend_from_slice(&main.to_be_bytes());
    k.push(b'_');
    k.extend_from_slice(&sub.to_be_bytes());
    if tombstone {
        k.push(b't');
    }
    k
}

/// (main, sub, tombstone) of a revision key; `None` when it is not one.
pub fn parse_revision_key(k: &[u8]) -> Option<(i64, i64, bool)> {
    let tombstone = match k.len() {
        17 => false,
        18 if k[17] == b't' => true,
        _ => return None,
    };
    if k[8] != b'_' {
        return None;
    }
    let main = i64::from_be_bytes(k[0..8].try_into().ok()?);
    let sub = i64::from_be_bytes(k[9..17].try_into().ok()?);
    Some((main, sub, tombstone))
}

/// etcd's JSON member record (`membership.Member`: `id` as a number, `peerURLs`,
/// `isLearner`, `name` and `clientURLs` omitted when empty).
#[derive(serde::Serialize, serde::Deserialize)]
struct JsonMember {
    id: u64,
    #[serde(rename = "peerURLs", default)]
    peer_urls: Vec<String>,
    #[serde(rename = "isLearner", default, skip_serializing_if = "is_false")]
    is_learner: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    name: String,
    #[serde(rename = "clientURLs", default, skip_serializing_if = "Vec::is_empty")]
    client_urls: Vec<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// One bucket's entries: key and value.
type BucketEntries = Vec<(Vec<u8>, Vec<u8>)>;

/// The database's buckets and entries, in the order they are written.
type Buckets = Vec<(&'static str, BucketEntries)>;

/// Lays out `snap` (a complete image) as etcd's backend buckets.
fn buckets(snap: &StateSnapshot) -> Buckets {
    let keys = key_bucket(snap);
    let meta = meta_bucket(snap);
    let lease = lease_bucket(snap);
    let (auth, users, roles) = auth_buckets(snap);
    let (members, removed) = member_buckets(snap);
    let mut cluster = vec![(
        b"clusterVersion".to_vec(),
        CLUSTER_VERSION.as_bytes().to_vec(),
    )];
    if let Some(d) = snap.downgrade.as_ref().filter(|d| d.enabled) {
        cluster.push((b"downgrade".to_vec(), downgrade_json(d)));
    }
    let alarm = snap
        .alarms
        .iter()
        .map(|a| (a.encode_to_vec(), Vec::new()))
        .collect();

    let mut out: Buckets = vec![
        ("alarm", alarm),
        ("auth", auth),
        ("authRoles", roles),
        ("authUsers", users),
        ("cluster", cluster),
        ("key", keys),
        ("lease", lease),
        ("members", members),
        ("members_removed", removed),
        ("meta", meta),
    ];
    for (_, entries) in &mut out {
        entries.sort();
        entries.dedup_by(|a, b| a.0 == b.0);
    }
    out
}

/// The `key` bucket: every retained version of every key under its revision key, as etcd's
/// MVCC store holds it, in revision order.
fn key_bucket(snap: &StateSnapshot) -> BucketEntries {
    let mut keys = Vec::new();
    for kh in &snap.keys {
        for v in &kh.versions {
            let kv = if v.tombstone {
                // etcd stores a tombstone's KeyValue with only the key.
                KeyValue {
                    key: kh.key.clone(),
                    ..Default::default()
                }
            } else {
                KeyValue {
                    key: kh.key.clone(),
                    create_revision: v.create_revision,
                    mod_revision: v.mod_revision,
                    version: v.version,
                    value: v.value.clone(),
                    lease: v.lease,
                }
            };
            keys.push((
                revision_key(v.mod_revision, i64::from(v.sub), v.tombstone),
                kv.encode_to_vec(),
            ));
        }
    }
    keys.sort_unstable();
    keys
}

/// The `meta` bucket: the applied index and term, and the compaction revision (as both the
/// finished and the scheduled one) when there is one.
fn meta_bucket(snap: &StateSnapshot) -> BucketEntries {
    let mut meta = vec![
        (
            b"consistent_index".to_vec(),
            snap.index.to_be_bytes().to_vec(),
        ),
        (b"term".to_vec(), snap.term.to_be_bytes().to_vec()),
    ];
    if snap.compact_revision > 0 {
        let rev = revision_key(snap.compact_revision, 0, false);
        meta.push((b"finishedCompactRev".to_vec(), rev.clone()));
        meta.push((b"scheduledCompactRev".to_vec(), rev));
    }
    meta
}

/// The `lease` bucket: each lease under its big-endian ID, as a `leasepb.Lease`.
fn lease_bucket(snap: &StateSnapshot) -> BucketEntries {
    snap.leases
        .iter()
        .map(|l| {
            let rec = Lease {
                id: l.id,
                ttl: l.ttl,
                remaining_ttl: l.remaining_ttl,
            };
            (l.id.to_be_bytes().to_vec(), rec.encode_to_vec())
        })
        .collect()
}

/// The auth store's buckets: `auth` (revision and enabled flag), `authUsers` and
/// `authRoles` (each record under its name).
fn auth_buckets(snap: &StateSnapshot) -> (BucketEntries, BucketEntries, BucketEntries) {
    let auth_state = snap.auth.clone().unwrap_or_default();
    let auth = vec![
        (
            b"authRevision".to_vec(),
            auth_state.revision.to_be_bytes().to_vec(),
        ),
        (b"authEnabled".to_vec(), vec![u8::from(auth_state.enabled)]),
    ];
    let users = auth_state
        .users
        .iter()
        .map(|u| (u.name.clone(), u.encode_to_vec()))
        .collect();
    let roles = auth_state
        .roles
        .iter()
        .map(|r| (r.name.clone(), r.encode_to_vec()))
        .collect();
    (auth, users, roles)
}

/// The `members` bucket (hex ID to etcd's JSON member record) and the `members_removed`
/// bucket (hex ID to `removed`).
fn member_buckets(snap: &StateSnapshot) -> (BucketEntries, BucketEntries) {
    let members = snap
        .members
        .iter()
        .map(|m| {
            let json = JsonMember {
                id: m.id,
                peer_urls: m.peer_urls.clone(),
                is_learner: m.is_learner,
                name: m.name.clone(),
                client_urls: m.client_urls.clone(),
            };
            (
                format!("{:x}", m.id).into_bytes(),
                serde_json::to_vec(&json).expect("member JSON"),
            )
        })
        .collect();
    let removed = snap
        .removed
        .iter()
        .map(|id| (format!("{id:x}").into_bytes(), b"removed".to_vec()))
        .collect();
    (members, removed)
}

/// Writes `snap` (a complete image: every key's retained history) as an etcd backend
/// database at `path`, which must not exist. The bbolt file is written by `bbolt-rs`.
///
/// Errors: [`BackupError::Format`] when bbolt fails.
pub fn write_db(snap: &StateSnapshot, path: &Path) -> Result<(), BackupError> {
    use bbolt_rs::{BucketRwApi, DbRwAPI, TxRwRefApi};
    let layout = buckets(snap);
    let mut db = bbolt_rs::Bolt::open(path).map_err(format_err)?;
    db.update(|mut tx| {
        for (name, entries) in &layout {
            let mut b = tx.create_bucket_if_not_exists(name.as_bytes())?;
            for (k, v) in entries {
                b.put(k, v)?;
            }
        }
        Ok(())
    })
    .map_err(format_err)
}

/// The database a `Maintenance.Snapshot` call streams: [`write_db`]'s file, made under `dir`
/// and unlinked at once, so it is read from the open handle and its disk space returns when
/// the stream ends, however it ends. Read it with [`SnapshotChunks`].
///
/// Errors: as [`write_db`], and [`BackupError::Io`] when `dir` is not writable.
pub fn snapshot_db(snap: &StateSnapshot, dir: &Path) -> Result<SnapshotChunks, BackupError> {
    std::fs::create_dir_all(dir).map_err(BackupError::io(dir))?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let path = dir.join(format!("etcd-snapshot-{stamp}.db.part"));
    let opened = write_db(snap, &path).and_then(|()| {
        let file = std::fs::File::open(&path).map_err(BackupError::io(&path))?;
        let len = file.metadata().map_err(BackupError::io(&path))?.len();
        Ok((file, len))
    });
    let _ = std::fs::remove_file(&path);
    let (file, db_len) = opened?;
    Ok(SnapshotChunks {
        file,
        path: path.display().to_string(),
        db_len,
        sent: 0,
        hasher: Some(sha2::Sha256::new()),
    })
}

/// One `SnapshotResponse` worth of a snapshot file: `blob` and the database bytes still to
/// come after it (`remaining_bytes`; 0 for the last database piece and for the digest).
#[derive(Debug)]
pub struct SnapshotChunk {
    /// At most [`SEND_CHUNK`] bytes of the database, or the 32-byte sha256 that ends the file.
    pub blob: Vec<u8>,
    /// Database bytes after this piece, bytes.
    pub remaining_bytes: u64,
}

/// A snapshot file as etcd's `Maintenance.Snapshot` sends it (etcd
/// `server/etcdserver/api/v3rpc/maintenance.go`): the database in [`SEND_CHUNK`] pieces read
/// one at a time from disk, then its sha256 as the last piece, which `etcdctl snapshot save`
/// appends and checks. Memory stays at one piece, whatever the database's size.
///
/// Errors: an item is [`BackupError::Io`] when the file cannot be read; iteration ends after it.
pub struct SnapshotChunks {
    file: std::fs::File,
    path: String,
    db_len: u64,
    sent: u64,
    /// `None` once the digest has been given.
    hasher: Option<sha2::Sha256>,
}

impl SnapshotChunks {
    /// Size of the database part, bytes (the file is this plus [`SHA256_LEN`]).
    pub fn db_len(&self) -> u64 {
        self.db_len
    }
}

impl Iterator for SnapshotChunks {
    type Item = Result<SnapshotChunk, BackupError>;

    fn next(&mut self) -> Option<Self::Item> {
        use std::io::Read;
        let hasher = self.hasher.as_mut()?;
        if self.sent < self.db_len {
            let n = (SEND_CHUNK as u64).min(self.db_len - self.sent);
            let mut blob = vec![0; n as usize];
            if let Err(source) = self.file.read_exact(&mut blob) {
                self.hasher = None;
                return Some(Err(BackupError::Io {
                    path: std::mem::take(&mut self.path),
                    source,
                }));
            }
            hasher.update(&blob);
            self.sent += n;
            return Some(Ok(SnapshotChunk {
                blob,
                remaining_bytes: self.db_len - self.sent,
            }));
        }
        let digest = self.hasher.take()?.finalize();
        Some(Ok(SnapshotChunk {
            blob: digest.to_vec(),
            remaining_bytes: 0,
        }))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The database part of a snapshot file, its digest checked as `etcdctl snapshot restore`
/// does: a file whose size is 32 mod 512 carries a sha256 of the bytes before it.
/// With `skip_hash_check` the digest (if any) is dropped unchecked, and a file without one is
/// accepted, as from a copied `member/snap/db`.
///
/// Errors: [`BackupError::HashMismatch`], [`BackupError::MissingHash`] (etcdctl's messages).
pub fn split_checked(file: &[u8], skip_hash_check: bool) -> Result<&[u8], BackupError> {
    let has_hash = file.len() % 512 == SHA256_LEN;
    if !has_hash {
        return if skip_hash_check {
            Ok(file)
        } else {
            Err(BackupError::MissingHash)
        };
    }
    let (db, sha) = file.split_at(file.len() - SHA256_LEN);
    if !skip_hash_check {
        let got = sha2::Sha256::digest(db);
        if got.as_slice() != sha {
            return Err(BackupError::HashMismatch {
                expected: hex(sha),
                got: hex(&got),
            });
        }
    }
    Ok(db)
}

/// What an etcd backend database holds, as MetaStore's state machine takes it.
#[derive(Debug, Default)]
pub struct EtcdDb {
    /// Keys, revision, compaction, leases, auth store and alarms; no members (a restore
    /// brings its own), `index`/`term` from `meta` (the database's applied point).
    pub state: StateSnapshot,
    /// The members the `members` bucket lists (those of the cluster the snapshot was taken
    /// from), sorted by ID.
    pub members: Vec<MemberRecord>,
    /// Entries in all buckets (`etcdctl snapshot status`'s totalKey).
    pub total_keys: u64,
}

/// A bucket entry: key and value.
type Entry<'a> = (&'a [u8], &'a [u8]);

/// Reads an etcd backend database (bbolt bytes, without the trailing digest).
///
/// Revision: the newest main revision in `key`, or the compaction revision when that is
/// higher (etcd `kvstore.restore`); compaction: the higher of `finishedCompactRev` and
/// `scheduledCompactRev` (etcd finishes a scheduled compaction at start-up).
///
/// Errors: [`BackupError::Format`] for a file that is not bbolt or whose entries do not
/// decode (etcd's buckets with etcd's encodings).
pub fn read_db(db: &[u8]) -> Result<EtcdDb, BackupError> {
    let file = bolt::Db::open(db).map_err(format_err)?;
    let mut out = EtcdDb::default();

    let meta = bucket_entries(&file, "meta")?;
    let state = &mut out.state;
    state.index = meta_u64(&meta, b"consistent_index").unwrap_or(0);
    state.term = meta_u64(&meta, b"term").unwrap_or(0);
    state.compact_revision =
        meta_rev(&meta, b"finishedCompactRev").max(meta_rev(&meta, b"scheduledCompactRev"));

    let (keys, revision) = read_keys(&bucket_entries(&file, "key")?)?;
    state.revision = revision.max(state.compact_revision).max(1);
    state.keys = keys;

    state.leases = read_leases(&bucket_entries(&file, "lease")?)?;
    state.auth = Some(read_auth(&file)?);

    for (k, _) in bucket_entries(&file, "alarm")? {
        state
            .alarms
            .push(AlarmMember::decode(k).map_err(|e| bad_entry("alarm", &e))?);
    }

    for (k, v) in bucket_entries(&file, "cluster")? {
        if k == b"downgrade" {
            state.downgrade = read_downgrade(v)?;
        }
    }

    out.members = read_members(&bucket_entries(&file, "members")?)?;
    out.total_keys = count_entries(&file)?;
    Ok(out)
}

/// etcd 3.5's `membership.DowngradeInfo` as JSON (Go's `json.Marshal`, fields in declaration
/// order).
fn downgrade_json(d: &DowngradeInfo) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Json<'a> {
        #[serde(rename = "target-version")]
        target_version: &'a str,
        enabled: bool,
    }
    serde_json::to_vec(&Json {
        target_version: &d.target_version,
        enabled: d.enabled,
    })
    .expect("downgrade JSON")
}

/// The `downgrade` entry of the `cluster` bucket: the downgrade, if enabled.
fn read_downgrade(v: &[u8]) -> Result<Option<DowngradeInfo>, BackupError> {
    #[derive(serde::Deserialize)]
    struct Json {
        #[serde(rename = "target-version", default)]
        target_version: String,
        #[serde(default)]
        enabled: bool,
    }
    let j: Json = serde_json::from_slice(v).map_err(|e| bad_entry("cluster", &e))?;
    Ok(j.enabled.then_some(DowngradeInfo {
        enabled: true,
        target_version: j.target_version,
    }))
}

/// The entries of bucket `name` in key order; none when the database lacks the bucket.
fn bucket_entries<'a>(file: &bolt::Db<'a>, name: &str) -> Result<Vec<Entry<'a>>, BackupError> {
    let mut v = Vec::new();
    if let Some(b) = file.bucket(name.as_bytes()).map_err(format_err)? {
        file.for_each(b, &mut |k, val| {
            v.push((k, val));
            Ok(())
        })
        .map_err(format_err)?;
    }
    Ok(v)
}

/// A [`BackupError::Format`] for an entry of `bucket` that does not decode.
fn bad_entry(bucket: &str, e: &dyn std::fmt::Display) -> BackupError {
    BackupError::Format(format!("bucket {bucket}: {e}"))
}

/// The big-endian `u64` stored under `key` in the `meta` bucket, if any.
fn meta_u64(meta: &[Entry<'_>], key: &[u8]) -> Option<u64> {
    meta.iter()
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| Some(u64::from_be_bytes((*v).try_into().ok()?)))
}

/// The main revision of the revision key stored under `key` in the `meta` bucket; 0 when
/// absent or malformed.
fn meta_rev(meta: &[Entry<'_>], key: &[u8]) -> i64 {
    meta.iter()
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| parse_revision_key(v))
        .map_or(0, |(main, _, _)| main)
}

/// The key histories of the `key` bucket (each key's versions in revision order, keys in
/// key order) and the newest main revision it holds (0 when empty).
fn read_keys(entries: &[Entry<'_>]) -> Result<(Vec<KeyHistory>, i64), BackupError> {
    let mut histories: BTreeMap<Vec<u8>, Vec<KeyVersion>> = BTreeMap::new();
    let mut revision = 0;
    for &(k, v) in entries {
        let (main, sub, tombstone) =
            parse_revision_key(k).ok_or_else(|| bad_entry("key", &"malformed revision key"))?;
        let kv = KeyValue::decode(v).map_err(|e| bad_entry("key", &e))?;
        revision = revision.max(main);
        let version = if tombstone {
            KeyVersion {
                mod_revision: main,
                sub: sub as u32,
                tombstone: true,
                ..Default::default()
            }
        } else {
            KeyVersion {
                mod_revision: main,
                sub: sub as u32,
                tombstone: false,
                value: kv.value,
                create_revision: kv.create_revision,
                version: kv.version,
                lease: kv.lease,
            }
        };
        histories.entry(kv.key).or_default().push(version);
    }
    let keys = histories
        .into_iter()
        .map(|(key, mut versions)| {
            versions.sort_by_key(|v| (v.mod_revision, v.sub));
            KeyHistory { key, versions }
        })
        .collect();
    Ok((keys, revision))
}

/// The leases of the `lease` bucket, sorted by ID.
fn read_leases(entries: &[Entry<'_>]) -> Result<Vec<LeaseRecord>, BackupError> {
    let mut leases = Vec::new();
    for &(_, v) in entries {
        let l = Lease::decode(v).map_err(|e| bad_entry("lease", &e))?;
        leases.push(LeaseRecord {
            id: l.id,
            ttl: l.ttl,
            remaining_ttl: l.remaining_ttl,
        });
    }
    leases.sort_by_key(|l| l.id);
    Ok(leases)
}

/// The auth store from the `auth`, `authUsers` and `authRoles` buckets (read in that
/// order); users and roles sorted by name, each role's permissions by key.
fn read_auth(file: &bolt::Db<'_>) -> Result<AuthState, BackupError> {
    let auth = bucket_entries(file, "auth")?;
    let mut auth_state = AuthState::default();
    for (k, v) in &auth {
        match *k {
            b"authEnabled" => auth_state.enabled = *v == [1u8],
            b"authRevision" => {
                auth_state.revision =
                    u64::from_be_bytes((*v).try_into().map_err(|e| bad_entry("auth", &e))?)
            }
            _ => {}
        }
    }
    for (_, v) in bucket_entries(file, "authUsers")? {
        auth_state
            .users
            .push(User::decode(v).map_err(|e| bad_entry("authUsers", &e))?);
    }
    for (_, v) in bucket_entries(file, "authRoles")? {
        let mut role = Role::decode(v).map_err(|e| bad_entry("authRoles", &e))?;
        role.key_permission.sort_by(|a, b| a.key.cmp(&b.key));
        auth_state.roles.push(role);
    }
    auth_state.users.sort_by(|a, b| a.name.cmp(&b.name));
    auth_state.roles.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(auth_state)
}

/// The members of the `members` bucket (etcd's JSON records), sorted by ID.
fn read_members(entries: &[Entry<'_>]) -> Result<Vec<MemberRecord>, BackupError> {
    let mut members = Vec::new();
    for &(_, v) in entries {
        let m: JsonMember = serde_json::from_slice(v).map_err(|e| bad_entry("members", &e))?;
        members.push(MemberRecord {
            id: m.id,
            name: m.name,
            peer_urls: m.peer_urls,
            client_urls: m.client_urls,
            is_learner: m.is_learner,
        });
    }
    members.sort_by_key(|m| m.id);
    Ok(members)
}

/// Entries in all buckets of `file` (`etcdctl snapshot status`'s totalKey).
fn count_entries(file: &bolt::Db<'_>) -> Result<u64, BackupError> {
    let mut total = 0u64;
    for name in file.bucket_names().map_err(format_err)? {
        if let Some(b) = file.bucket(name).map_err(format_err)? {
            file.for_each(b, &mut |_, _| {
                total += 1;
                Ok(())
            })
            .map_err(format_err)?;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::authpb::{permission::Type, Permission};

    fn sample() -> StateSnapshot {
        StateSnapshot {
            index: 42,
            term: 3,
            revision: 7,
            compact_revision: 2,
            keys: vec![
                KeyHistory {
                    key: b"a".to_vec(),
                    versions: vec![
                        KeyVersion {
                            mod_revision: 2,
                            create_revision: 2,
                            version: 1,
                            value: b"1".to_vec(),
                            ..Default::default()
                        },
                        KeyVersion {
                            mod_revision: 5,
                            tombstone: true,
                            ..Default::default()
                        },
                    ],
                },
                KeyHistory {
                    key: b"b".to_vec(),
                    versions: vec![KeyVersion {
                        mod_revision: 7,
                        sub: 1,
                        create_revision: 6,
                        version: 2,
                        value: vec![b'x'; 10_000],
                        lease: 99,
                        ..Default::default()
                    }],
                },
            ],
            leases: vec![LeaseRecord {
                id: 99,
                ttl: 60,
                remaining_ttl: 0,
            }],
            members: vec![MemberRecord {
                id: 0x1234,
                name: "m1".into(),
                peer_urls: vec!["http://127.0.0.1:2380".into()],
                ..Default::default()
            }],
            auth: Some(AuthState {
                enabled: true,
                revision: 5,
                users: vec![User {
                    name: b"root".to_vec(),
                    password: b"$2a$10$hash".to_vec(),
                    roles: vec!["root".into()],
                    options: None,
                }],
                roles: vec![Role {
                    name: b"r".to_vec(),
                    key_permission: vec![Permission {
                        perm_type: Type::Readwrite as i32,
                        key: b"k".to_vec(),
                        range_end: vec![],
                    }],
                }],
            }),
            complete: true,
            downgrade: Some(DowngradeInfo {
                enabled: true,
                target_version: "3.4.0".into(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn revision_keys_round_trip() {
        let k = revision_key(5, 1, true);
        assert_eq!(k.len(), 18);
        assert_eq!(parse_revision_key(&k), Some((5, 1, true)));
        assert_eq!(
            parse_revision_key(&revision_key(9, 0, false)),
            Some((9, 0, false))
        );
        assert_eq!(parse_revision_key(b"short"), None);
    }

    #[test]
    fn written_database_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let snap = sample();
        let chunks = snapshot_db(&snap, dir.path()).unwrap();
        let db_len = chunks.db_len();
        let mut file = Vec::new();
        let mut pieces = 0;
        for chunk in chunks {
            let chunk = chunk.unwrap();
            assert!(chunk.blob.len() <= SEND_CHUNK);
            file.extend_from_slice(&chunk.blob);
            let sent = (file.len() as u64).min(db_len);
            assert_eq!(chunk.remaining_bytes, db_len - sent);
            pieces += 1;
        }
        assert_eq!(
            pieces as u64,
            db_len.div_ceil(SEND_CHUNK as u64) + 1,
            "then the digest"
        );
        assert_eq!(file.len() % 512, SHA256_LEN, "etcdctl's size check");
        assert!(
            std::fs::read_dir(dir.path()).unwrap().next().is_none(),
            "temp file removed"
        );
        let db = split_checked(&file, false).unwrap();
        let back = read_db(db).unwrap();
        assert_eq!(back.state.index, 42);
        assert_eq!(back.state.term, 3);
        assert_eq!(back.state.revision, 7);
        assert_eq!(back.state.compact_revision, 2);
        assert_eq!(back.state.keys, snap.keys);
        assert_eq!(back.state.leases, snap.leases);
        assert_eq!(back.state.auth, snap.auth);
        assert_eq!(back.state.downgrade, snap.downgrade);
        assert_eq!(back.members, snap.members);
        assert_eq!(
            downgrade_json(snap.downgrade.as_ref().unwrap()),
            br#"{"target-version":"3.4.0","enabled":true}"#
        );
        let off = br#"{"target-version":"","enabled":false}"#;
        assert_eq!(read_downgrade(off).unwrap(), None);

        let mut bad = file.clone();
        bad[100] ^= 1;
        assert!(matches!(
            split_checked(&bad, false),
            Err(BackupError::HashMismatch { .. })
        ));
        assert!(split_checked(&bad, true).is_ok());
        assert!(matches!(
            split_checked(db, false),
            Err(BackupError::MissingHash)
        ));
    }
}
