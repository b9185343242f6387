//! Alarms are replicated state, as in etcd: an alarm raised through one member is listed by
//! every member, refuses requests on every member, survives restarts, and is cleared by
//! `etcdctl alarm disarm` anywhere. The leader's periodic corruption check
//! (`--experimental-corrupt-check-time`) raises CORRUPT for a member whose data diverged.

use std::path::Path;
use std::time::Duration;

use etcd_client::{AlarmAction, AlarmOptions, AlarmType, Client, LeaseGrantOptions};

use crate::cluster::CLUSTER_LOCK;
use crate::harness::{etcdctl, ok_stdout, wait_until, Cluster};

/// `etcdctl alarm list` against member `i` alone.
fn alarm_list(cluster: &Cluster, i: usize) -> String {
    ok_stdout(&etcdctl(&cluster.endpoint(i), &["alarm", "list"], None))
}

/// Waits until `etcdctl alarm list` on every running member prints `want` (the whole output,
/// trimmed); panics with what each printed otherwise.
fn wait_alarm_lists(cluster: &Cluster, want: &str, timeout: Duration) {
    let mut seen: Vec<String> = Vec::new();
    let all = wait_until(timeout, || {
        seen = cluster
            .live()
            .into_iter()
            .map(|i| alarm_list(cluster, i).trim().to_string())
            .collect();
        seen.iter().all(|s| s == want)
    });
    assert!(
        all,
        "alarm lists {seen:?}, want {want:?} on every member\n{}",
        cluster.logs()
    );
}

async fn clients(cluster: &Cluster) -> Vec<Client> {
    let mut out = Vec::new();
    for i in 0..cluster.specs.len() {
        out.push(cluster.client(i).await);
    }
    out
}

/// Every member refuses puts and lease grants with NOSPACE (member `id`'s), serves reads and
/// deletes, and lists the alarm in Status.
async fn refused_everywhere(c: &mut [Client], id: u64) {
    for (i, client) in c.iter_mut().enumerate() {
        let e = client.put("k", "v", None).await.unwrap_err().to_string();
        assert!(
            e.contains("etcdserver: mvcc: database space exceeded"),
            "member {i}: {e}"
        );
        let e = client.lease_grant(30, None).await.unwrap_err().to_string();
        assert!(e.contains("database space exceeded"), "member {i}: {e}");
        // Reads and deletes go on, as in etcd (applierV3Capped).
        assert_eq!(client.get("kept", None).await.unwrap().kvs().len(), 1);
        client.delete("absent", None).await.unwrap();
        let status = client.status().await.unwrap();
        let errors = status.errors().join(",");
        assert!(
            errors.contains(&format!("memberID:{id} alarm:NOSPACE")),
            "member {i}: {errors}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alarm_nospace_raised_on_one_member_is_everyones_until_disarmed_and_survives_restarts() {
    let _one = CLUSTER_LOCK.lock().await;
    // Snapshots every few entries, so that the restart below finds the alarm in a snapshot as
    // well as in the WAL after it.
    let mut cluster = Cluster::start(3, &["--snapshot-count", "5"]).await;
    let mut c = clients(&cluster).await;
    c[0].put("kept", "v", None).await.unwrap();
    let id = cluster.ids[0];
    let mut member = AlarmOptions::new();
    member.with_member(id);
    let raised = c[0]
        .alarm(AlarmAction::Activate, AlarmType::Nospace, Some(member))
        .await
        .unwrap();
    assert_eq!(raised.alarms().len(), 1);
    assert_eq!(raised.alarms()[0].member_id(), id);
    let listed = format!("memberID:{id} alarm:NOSPACE");
    wait_alarm_lists(&cluster, &listed, Duration::from_secs(10));

    refused_everywhere(&mut c, id).await;
    // Enough entries for a snapshot after the alarm on every member.
    for _ in 0..12 {
        c[1].delete("absent", None).await.unwrap();
    }

    // Every member restarts in turn: the alarm is part of what each recovers from its own
    // snapshot and WAL (Alarm GET is answered from the member's own table).
    for i in 0..3 {
        cluster.kill(i);
        cluster.restart(i);
        cluster.wait_for_leader(Duration::from_secs(20)).await;
        let got = alarm_list(&cluster, i);
        assert_eq!(got.trim(), listed, "member {i} after its restart");
    }
    let mut c = clients(&cluster).await;
    refused_everywhere(&mut c, id).await;

    // Disarming an alarm that is not raised changes nothing (etcd: a no-op).
    let mut other = AlarmOptions::new();
    other.with_member(cluster.ids[1]);
    let none = c[2]
        .alarm(AlarmAction::Deactivate, AlarmType::Nospace, Some(other))
        .await
        .unwrap();
    assert!(none.alarms().is_empty());
    wait_alarm_lists(&cluster, &listed, Duration::from_secs(5));

    // etcdctl on another member disarms it for everyone.
    let out = ok_stdout(&etcdctl(&cluster.endpoint(2), &["alarm", "disarm"], None));
    assert!(out.contains(&listed), "{out}");
    wait_alarm_lists(&cluster, "", Duration::from_secs(10));
    for (i, client) in c.iter_mut().enumerate() {
        client
            .put("k", format!("after disarm {i}"), None)
            .await
            .unwrap_or_else(|e| panic!("member {i}: {e}"));
        assert!(client.status().await.unwrap().errors().is_empty());
    }
}

/// Replaces, in place, `from` with `to` (same length) in every stored value holding it, in the
/// RocksDB shard databases of a stopped member: on-disk damage that RocksDB's checksums do not
/// see (the engine's layout: `k | key | 00 00 | rev | sub` -> `1 | create | version | lease |
/// value`). Returns how many versions it altered.
fn tamper_values(data_dir: &Path, from: &[u8], to: &[u8]) -> usize {
    assert_eq!(from.len(), to.len());
    let shards = data_dir.join("member").join("shards");
    let mut altered = 0;
    for entry in std::fs::read_dir(&shards).unwrap() {
        let path = entry.unwrap().path();
        if !path.is_dir() {
            continue;
        }
        let db = ::rocksdb::DB::open_default(&path).unwrap();
        let mut changes = Vec::new();
        for item in db.iterator(::rocksdb::IteratorMode::Start) {
            let (k, v) = item.unwrap();
            if k.first() != Some(&b'k') || v.first() != Some(&1) || v.len() < 25 {
                continue;
            }
            if let Some(at) = v[25..].windows(from.len()).position(|w| w == from) {
                let mut v = v.to_vec();
                v[25 + at..25 + at + from.len()].copy_from_slice(to);
                changes.push((k.to_vec(), v));
            }
        }
        for (k, v) in changes {
            db.put(k, v).unwrap();
            altered += 1;
        }
        db.flush().unwrap();
    }
    altered
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alarm_corrupt_is_raised_by_the_periodic_check_for_a_member_whose_data_diverged() {
    let _one = CLUSTER_LOCK.lock().await;
    let mut cluster = Cluster::start(
        3,
        &[
            "--storage-engine",
            "rocksdb",
            "--experimental-corrupt-check-time",
            "1s",
        ],
    )
    .await;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await;
    let mut c = cluster.client(leader).await;
    let lease = c.lease_grant(60, None).await.unwrap().id();
    for n in 0..20 {
        c.put(format!("data/{n:02}"), "original-value", None)
            .await
            .unwrap();
    }
    cluster.wait_converged(Duration::from_secs(20)).await;
    // Healthy members: a few checks pass without an alarm. The sleep is the point: it lets
    // several periodic checks run (there is nothing to wait for when none raises an alarm).
    tokio::time::sleep(Duration::from_secs(3)).await;
    wait_alarm_lists(&cluster, "", Duration::from_secs(1));

    let victim = (leader + 1) % 3;
    let victim_id = cluster.ids[victim];
    cluster.kill(victim);
    let altered = tamper_values(&cluster.data_dir(victim), b"original", b"tampered");
    assert!(altered > 0, "no stored value found to alter");
    cluster.restart(victim);

    let listed = format!("memberID:{victim_id} alarm:CORRUPT");
    wait_alarm_lists(&cluster, &listed, Duration::from_secs(30));
    let logs = cluster.logs();
    assert!(
        logs.contains("same compact revision then hashes must match"),
        "the mismatch is logged"
    );

    // Every member refuses writes as etcd's applierV3Corrupt does.
    for i in 0..3 {
        let mut c = cluster.client(i).await;
        let e = format!("{:?}", c.put("k", "v", None).await.unwrap_err());
        assert!(
            e.contains("etcdserver: corrupt cluster") && e.contains("DataLoss"),
            "member {i}: put: {e}"
        );
        let e = c.delete("data/00", None).await.unwrap_err().to_string();
        assert!(e.contains("corrupt cluster"), "member {i}: delete: {e}");
        let e = c.compact(2, None).await.unwrap_err().to_string();
        assert!(e.contains("corrupt cluster"), "member {i}: compact: {e}");
        let e = c
            .lease_grant(30, Some(LeaseGrantOptions::new()))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("corrupt cluster"),
            "member {i}: lease grant: {e}"
        );
        let e = c.lease_revoke(lease).await.unwrap_err().to_string();
        assert!(
            e.contains("corrupt cluster"),
            "member {i}: lease revoke: {e}"
        );
        let status = c.status().await.unwrap();
        assert!(
            status.errors().join(",").contains(&listed),
            "member {i}: {:?}",
            status.errors()
        );
        // As in etcd 3.5, ranges are served through the base applier, not the alarm one.
        assert_eq!(
            c.get("data/", Some(etcd_client::GetOptions::new().with_prefix()))
                .await
                .unwrap()
                .kvs()
                .len(),
            20
        );
    }
}
