//! Crash recovery: SIGKILL, restart on the same data directory, and damaged WAL files.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use etcd_client::GetOptions;

use crate::harness::Server;
use crate::util::{get_value, keys, put_rev, Rev};

/// The WAL segments of a data directory, oldest first (names sort by sequence number).
fn wal_segments(data_dir: &Path) -> Vec<PathBuf> {
    let mut segs: Vec<PathBuf> = fs::read_dir(data_dir.join("member").join("wal"))
        .expect("member/wal exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    segs.sort();
    assert!(!segs.is_empty(), "no WAL segment in {}", data_dir.display());
    segs
}

/// Every key under `prefix` with its value, and the header revision of the read.
async fn dump(c: &mut etcd_client::Client, prefix: &str) -> (BTreeMap<String, String>, i64) {
    let r = c
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    let map = r
        .kvs()
        .iter()
        .map(|kv| {
            (
                kv.key_str().unwrap().to_string(),
                kv.value_str().unwrap().to_string(),
            )
        })
        .collect();
    (map, r.rev())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_acknowledged_concurrent_writes() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::try_start(dir.path(), &[]).unwrap();
    let mut tasks = Vec::new();
    for t in 0..10 {
        let mut c = server.client().await;
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                c.put(format!("d/{t:02}/{i:02}"), format!("value-{t}-{i}"), None)
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    server.kill();

    let server = Server::try_start(dir.path(), &[]).unwrap();
    let mut c = server.client().await;
    let (got, rev) = dump(&mut c, "d/").await;
    let want: BTreeMap<String, String> = (0..10)
        .flat_map(|t| (0..50).map(move |i| (format!("d/{t:02}/{i:02}"), format!("value-{t}-{i}"))))
        .collect();
    assert_eq!(got.len(), 500);
    assert_eq!(got, want);
    assert_eq!(rev, 501);
    // Every key was written once, at a distinct revision in 2..=501.
    let r = c
        .get("d/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    let mut mods: Vec<i64> = r.kvs().iter().map(|kv| kv.mod_revision()).collect();
    mods.sort();
    assert_eq!(mods, (2..=501).collect::<Vec<_>>());
    assert!(r
        .kvs()
        .iter()
        .all(|kv| kv.version() == 1 && kv.create_revision() == kv.mod_revision()));
    // And the server keeps counting from there.
    assert_eq!(put_rev(&mut c, "after", "x").await, 502);
}

#[tokio::test]
async fn snapshot_then_wal_replay() {
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--snapshot-count", "100"];
    let server = Server::try_start(dir.path(), &flags).unwrap();
    let mut c = server.client().await;
    for i in 0..1000 {
        c.put(format!("s/{i:04}"), format!("v{i}"), None)
            .await
            .unwrap();
    }
    // Overwrite and delete some, so the snapshot must carry history and tombstones.
    for i in 0..10 {
        c.put(format!("s/{i:04}"), format!("w{i}"), None)
            .await
            .unwrap();
    }
    for i in 10..20 {
        c.delete(format!("s/{i:04}"), None).await.unwrap();
    }
    server.kill();

    let snaps: Vec<PathBuf> = fs::read_dir(dir.path().join("member").join("snap"))
        .expect("member/snap exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "snap"))
        .collect();
    assert!(
        !snaps.is_empty(),
        "no .snap file after 1020 writes with --snapshot-count 100"
    );

    let server = Server::try_start(dir.path(), &flags).unwrap();
    let mut c = server.client().await;
    let (got, rev) = dump(&mut c, "s/").await;
    let want: BTreeMap<String, String> = (0..1000)
        .filter(|i| !(10..20).contains(i))
        .map(|i| {
            (
                format!("s/{i:04}"),
                if i < 10 {
                    format!("w{i}")
                } else {
                    format!("v{i}")
                },
            )
        })
        .collect();
    assert_eq!(got.len(), 990);
    assert_eq!(got, want);
    assert_eq!(rev, 1021);
    let kv = c.get("s/0003", None).await.unwrap().kvs()[0].clone();
    assert_eq!(
        (kv.create_revision(), kv.mod_revision(), kv.version()),
        (5, 1005, 2)
    );
    // History survives the snapshot: the old value and the deleted key at old revisions.
    let old = c
        .get("s/0003", Some(GetOptions::new().with_revision(5)))
        .await
        .unwrap();
    assert_eq!(old.kvs()[0].value(), b"v3");
    let deleted = c
        .get("s/0015", Some(GetOptions::new().with_revision(1011)))
        .await
        .unwrap();
    assert_eq!(deleted.kvs()[0].value(), b"v15");
    assert_eq!(c.get("s/0015", None).await.unwrap().count(), 0);
    assert_eq!(put_rev(&mut c, "after", "x").await, 1022);

    // And again, now that the restarted server has written on top of the restored state.
    server.kill();
    let server = Server::try_start(dir.path(), &flags).unwrap();
    let mut c = server.client().await;
    let (got, rev) = dump(&mut c, "s/").await;
    assert_eq!((got, rev), (want, 1022));
}

#[tokio::test]
async fn torn_wal_tail_is_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::try_start(dir.path(), &[]).unwrap();
    let mut c = server.client().await;
    for i in 0..50 {
        c.put(format!("k{i:02}"), format!("v{i}"), None)
            .await
            .unwrap();
    }
    let data_dir = server.data_dir.clone();
    assert_eq!(data_dir, dir.path());
    server.kill();

    let newest = wal_segments(&data_dir).pop().unwrap();
    let len = trim_wal(&newest).len() as u64;
    fs::OpenOptions::new()
        .write(true)
        .open(&newest)
        .unwrap()
        .set_len(len - 5)
        .unwrap();

    let server = Server::try_start(dir.path(), &[]).expect("a torn tail is not fatal");
    let mut c = server.client().await;
    let (got, rev) = dump(&mut c, "k").await;
    for i in 0..49 {
        assert_eq!(
            got.get(&format!("k{i:02}")),
            Some(&format!("v{i}")),
            "k{i:02} lost; have {:?}",
            got.keys()
        );
    }
    // The last write may or may not have survived, nothing else.
    assert!(got.len() == 49 || got.len() == 50, "{:?}", got.keys());
    assert_eq!(rev, got.len() as i64 + 1);
    // The truncated log accepts new writes, and they survive another restart.
    let next = put_rev(&mut c, "after", "x").await;
    assert_eq!(next, rev + 1);
    server.kill();
    let server = Server::try_start(dir.path(), &[]).unwrap();
    let mut c = server.client().await;
    assert_eq!(get_value(&mut c, "after").await.as_deref(), Some("x"));
    let (again, rev2) = dump(&mut c, "k").await;
    assert_eq!(again, got);
    assert_eq!(rev2, next);
}

#[tokio::test]
async fn corrupt_wal_record_stops_startup() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::try_start(dir.path(), &[]).unwrap();
    let mut c = server.client().await;
    for i in 0..20 {
        c.put(format!("k{i:02}"), "v", None).await.unwrap();
    }
    server.kill();

    let first = wal_segments(dir.path()).remove(0);
    let mut bytes = trim_wal(&first);
    assert!(bytes.len() > 100, "the first segment holds the writes");
    let body_len = u32::from_le_bytes(bytes[0..4].try_into().unwrap()) as usize;
    assert!(body_len >= 4, "first record body is {body_len} bytes");
    // Inside the first record's body: header is 12 bytes (len, crc(len), crc(body)).
    bytes[12 + 3] ^= 0x55;
    fs::write(&first, &bytes).unwrap();

    let err = match Server::try_start(dir.path(), &[]) {
        Ok(_) => panic!("the server started on a corrupt WAL"),
        Err(e) => e,
    };
    let path = first.display().to_string();
    assert!(err.contains(&path), "the error names {path}: {err}");
    assert!(err.contains("offset"), "the error gives the offset: {err}");
    assert!(
        err.contains("offset 0"),
        "the damaged record is the first one: {err}"
    );
    // The process exited by itself with a failure status (not killed by the harness).
    let status = err
        .split("unix_wait_status(")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .and_then(|s| s.parse::<i32>().ok())
        .unwrap_or_else(|| panic!("no exit status in: {err}"));
    assert_eq!(
        status & 0x7f,
        0,
        "killed by signal {}: {err}",
        status & 0x7f
    );
    assert_ne!(status >> 8, 0, "exit code 0: {err}");
    // The file was left as it was: corruption is not "repaired" by truncation.
    assert_eq!(fs::read(&first).unwrap(), bytes);
}

#[tokio::test]
async fn restart_keeps_revision_and_history() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::try_start(dir.path(), &[]).unwrap();
    let mut c = server.client().await;
    assert_eq!(put_rev(&mut c, "h", "v1").await, 2);
    assert_eq!(put_rev(&mut c, "h", "v2").await, 3);
    assert_eq!(put_rev(&mut c, "g", "x").await, 4);
    assert_eq!(c.delete("g", None).await.unwrap().rev(), 5);
    c.compact(3, None).await.unwrap();
    let member_id = c
        .get("h", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .member_id();
    server.kill();

    let server = Server::try_start(dir.path(), &[]).unwrap();
    let mut c = server.client().await;
    let r = c.get("h", None).await.unwrap();
    assert_eq!(r.rev(), 5);
    assert_eq!(
        r.header().unwrap().member_id(),
        member_id,
        "the member keeps its ID"
    );
    assert_eq!(
        (
            r.kvs()[0].value(),
            r.kvs()[0].version(),
            r.kvs()[0].mod_revision()
        ),
        (&b"v2"[..], 2, 3)
    );
    let old = c
        .get("h", Some(GetOptions::new().with_revision(3)))
        .await
        .unwrap();
    assert_eq!(old.kvs()[0].value(), b"v2");
    let g = c
        .get("g", Some(GetOptions::new().with_revision(4)))
        .await
        .unwrap();
    assert_eq!(keys(g.kvs()), vec!["g".to_string()]);
    assert_eq!(c.get("g", None).await.unwrap().count(), 0);
    // The compaction survived too.
    let e = crate::util::grpc_err(c.get("h", Some(GetOptions::new().with_revision(2))).await);
    assert_eq!(
        e,
        (tonic::Code::OutOfRange, crate::util::COMPACTED.to_string())
    );
    assert_eq!(put_rev(&mut c, "h", "v3").await, 6);
}

/// File offset of the last record in a WAL segment (walking the length fields; a record is
/// `len u32 | crc32(len) | crc32(body) | body`).
fn last_record_offset(bytes: &[u8]) -> usize {
    let end = records_end(bytes);
    let mut off = 0;
    let mut last = 0;
    while off < end {
        last = off;
        off += 12 + u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
    }
    last
}

/// Where the records of a WAL segment end: at its end, or where the zeros of its preallocated
/// space begin (a zero length field). Asserts that only zeros follow.
fn records_end(bytes: &[u8]) -> usize {
    let mut off = 0;
    while off + 12 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
        if len == 0 {
            break;
        }
        off += 12 + len;
    }
    assert!(
        bytes.get(off..).unwrap_or_default().iter().all(|b| *b == 0),
        "only zeros after the records"
    );
    off
}

/// Cuts the preallocated zeros off the WAL segment `seg` (as a file system without
/// `fallocate` leaves it), so that a test can damage its end or rewrite it whole; returns the
/// segment's bytes.
fn trim_wal(seg: &Path) -> Vec<u8> {
    let mut bytes = fs::read(seg).unwrap();
    bytes.truncate(records_end(&bytes));
    let f = fs::OpenOptions::new().write(true).open(seg).unwrap();
    f.set_len(bytes.len() as u64).unwrap();
    bytes
}

/// Puts `k00..k{n-1}` = `v{i}` one at a time; returns the revision of the last.
async fn put_keys(c: &mut etcd_client::Client, n: usize) -> i64 {
    let mut rev = 0;
    for i in 0..n {
        rev = put_rev(c, format!("k{i:02}"), format!("v{i}")).await;
    }
    rev
}

/// Asserts that `k00..k{n-1}` all read back with their values at revision `rev`, and that
/// the next put gets `rev + 1`.
async fn check_keys(server: &Server, n: usize, rev: i64) {
    let mut c = server.client().await;
    let (got, read_rev) = dump(&mut c, "k").await;
    let want: BTreeMap<String, String> = (0..n)
        .map(|i| (format!("k{i:02}"), format!("v{i}")))
        .collect();
    assert_eq!(got, want);
    assert_eq!(read_rev, rev);
    let next = c.put("after", "x", None).await.unwrap();
    assert_eq!(next.rev(), rev + 1);
}

#[tokio::test]
async fn flipped_byte_in_the_last_wal_record_stops_startup() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::try_start(dir.path(), &[]).unwrap();
    let mut c = server.client().await;
    put_keys(&mut c, 20).await;
    server.kill();

    let newest = wal_segments(dir.path()).pop().unwrap();
    let mut bytes = trim_wal(&newest);
    let last = last_record_offset(&bytes);
    // A complete, fsynced record whose bytes changed afterwards: not a torn write. (etcd tells
    // them apart by a zeroed 512-byte sector chunk; make sure there is none.)
    bytes[last + 12 + 1] ^= 0x10;
    let mut at = last;
    while at < bytes.len() {
        let end = ((at / 512 + 1) * 512).min(bytes.len());
        assert!(
            bytes[at..end].iter().any(|b| *b != 0),
            "zeroed sector chunk"
        );
        at = end;
    }
    fs::write(&newest, &bytes).unwrap();

    let err = match Server::try_start(dir.path(), &[]) {
        Ok(_) => panic!("the server started without the last acknowledged record"),
        Err(e) => e,
    };
    let path = newest.display().to_string();
    assert!(err.contains(&path), "the error names {path}: {err}");
    assert!(err.contains(&format!("offset {last}")), "{err}");
    assert!(err.contains("crc mismatch"), "{err}");
    assert_eq!(
        fs::read(&newest).unwrap(),
        bytes,
        "the WAL is left as it was"
    );
}

#[tokio::test]
async fn zeroed_wal_tail_followed_by_garbage_is_a_torn_write() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::try_start(dir.path(), &[]).unwrap();
    let mut c = server.client().await;
    let rev = put_keys(&mut c, 30).await;
    server.kill();

    let newest = wal_segments(dir.path()).pop().unwrap();
    let before = trim_wal(&newest);
    // What a crash mid-write can leave: sectors never written (zeros), then some that were.
    let mut tail = vec![0u8; 512];
    let mut x = 0x9e37_79b9_u32;
    tail.extend((0..300).map(|_| {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x as u8
    }));
    let mut f = fs::OpenOptions::new().append(true).open(&newest).unwrap();
    std::io::Write::write_all(&mut f, &tail).unwrap();
    drop(f);

    let server = Server::try_start(dir.path(), &[]).expect("a zeroed tail is a torn write");
    // The tail was cut off and the restarted server appended its records (new term, leader
    // no-op) right after the last good one: the segment is whole records again.
    let after = fs::read(&newest).unwrap();
    assert_eq!(&after[..before.len()], &before[..]);
    last_record_offset(&after);
    check_keys(&server, 30, rev).await;
    server.kill();
    // What was written after the truncation survives a restart too.
    let server = Server::try_start(dir.path(), &[]).unwrap();
    let mut c = server.client().await;
    assert_eq!(get_value(&mut c, "after").await.as_deref(), Some("x"));
}

/// The `.snap` files of a data directory, oldest first.
fn snap_files(data_dir: &Path) -> Vec<PathBuf> {
    let mut snaps: Vec<PathBuf> = fs::read_dir(data_dir.join("member").join("snap"))
        .expect("member/snap exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "snap"))
        .collect();
    snaps.sort();
    snaps
}

#[tokio::test]
async fn corrupt_newest_snapshot_falls_back_to_the_older_one() {
    let dir = tempfile::tempdir().unwrap();
    // Two snapshots kept, so that exactly one older one is there to fall back to.
    let flags = ["--snapshot-count", "10", "--max-snapshots", "2"];
    let server = Server::try_start(dir.path(), &flags).unwrap();
    let mut c = server.client().await;
    let rev = put_keys(&mut c, 35).await;
    server.kill();

    let snaps = snap_files(dir.path());
    assert_eq!(snaps.len(), 2, "two snapshots kept: {snaps:?}");
    let newest = snaps[1].clone();
    let mut bytes = fs::read(&newest).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    fs::write(&newest, &bytes).unwrap();

    let server = Server::try_start(dir.path(), &flags)
        .expect("the older snapshot and the WAL after it are enough to start");
    let name = newest.file_name().unwrap().to_str().unwrap();
    assert!(
        server.startup_log.contains(name),
        "a warning names the broken snapshot:\n{}",
        server.startup_log
    );
    assert!(!newest.exists());
    assert!(newest.with_extension("snap.broken").exists());
    check_keys(&server, 35, rev).await;
    // And it goes on from there: more snapshots, another restart.
    let mut c = server.client().await;
    for i in 0..25 {
        c.put(format!("m{i:02}"), "y", None).await.unwrap();
    }
    server.kill();
    let server = Server::try_start(dir.path(), &flags).unwrap();
    let mut c = server.client().await;
    let (got, read_rev) = dump(&mut c, "").await;
    assert_eq!(got.len(), 35 + 1 + 25);
    assert_eq!(got["k34"], "v34");
    assert_eq!(read_rev, rev + 1 + 25);
}
