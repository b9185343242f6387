//! The "crash at a failpoint" fault (`--features failpoints`): a member is killed and
//! restarted with `FAILPOINTS` set for one of the server's crash points
//! (`metastore::failpoints`), runs until it aborts there, and is restarted clean. The profile
//! ([`crate::traffic::run`]) injects it with the WAL and apply points; the tests here drive
//! every point, the snapshot-install ones included, on a cluster under transactional writes
//! and check what a crash there must not break: every acknowledged write is there at its
//! revision, a txn is all or nothing, no entry is applied twice, and the members converge.

use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::harness::Cluster;

/// The points the profile crashes members at: those every member passes many times a second
/// under traffic. (The snapshot-install points need a follower the leader's log has left
/// behind; [`tests`] covers them on a cluster that snapshots every few entries.)
pub const PROFILE_POINTS: [&str; 4] = [
    metastore::failpoints::WAL_BEFORE_FSYNC,
    metastore::failpoints::WAL_AFTER_FSYNC,
    metastore::failpoints::APPLY_MID_BATCH,
    metastore::failpoints::APPLY_AFTER_BARRIER,
];

/// How long a member restarted with a failpoint may run before the fault gives up on it
/// firing (and kills it).
pub const FIRE_WITHIN: Duration = Duration::from_secs(5);

/// How one crash-at-a-failpoint fault went.
#[derive(Debug, PartialEq, Eq)]
pub enum Crash {
    /// The member aborted at the point (before or after its ready line); its exit status was
    /// SIGABRT and its log named the point.
    Fired,
    /// The point did not fire within [`FIRE_WITHIN`]: the member was killed.
    NotFired,
}

/// Kills member `victim` (if it runs), restarts it with `FAILPOINTS="<point>=<action>"`,
/// waits (up to [`FIRE_WITHIN`]) until it aborts at the point, or kills it, then restarts it
/// without failpoints and waits until it is ready.
///
/// Panics if the member stops in any other way than at the point (another exit, a failed
/// start without the point's line), or if the clean restart fails: both are bugs.
pub async fn crash_at(cluster: &mut Cluster, victim: usize, point: &str, action: &str) -> Crash {
    cluster.kill(victim);
    let config = format!("{point}={action}");
    let line = metastore::failpoints::abort_line(point);
    let crash = match cluster.try_restart_with_env(victim, &[("FAILPOINTS", config.as_str())]) {
        // It aborted at the point while starting (replaying or catching up).
        Err(out) => {
            assert!(
                out.contains(&line),
                "member {victim} with {config} failed to start, not at the point:\n{out}"
            );
            Crash::Fired
        }
        Ok(()) => match cluster.wait_member_exit(victim, FIRE_WITHIN) {
            Some((status, log)) => {
                assert_eq!(
                    status.signal(),
                    Some(libc::SIGABRT),
                    "member {victim} with {config} exited with {status}, not at the point:\n{log}"
                );
                assert!(
                    log.contains(&line),
                    "member {victim} aborted without {line:?}:\n{log}"
                );
                Crash::Fired
            }
            None => {
                cluster.kill(victim);
                Crash::NotFired
            }
        },
    };
    cluster.restart(victim);
    crash
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::wait_until_async;
    use crate::traffic::CLUSTERS;
    use etcd_client::{Client, ConnectOptions, GetOptions, Txn, TxnOp};
    use metastore::failpoints::{
        APPLY_AFTER_BARRIER, APPLY_MID_BATCH, SNAPSHOT_AFTER_INSTALL, SNAPSHOT_BEFORE_INSTALL,
        WAL_AFTER_FSYNC, WAL_BEFORE_FSYNC,
    };
    use std::sync::atomic::AtomicU64;

    /// Writers of the scenario; each owns two keys.
    const WRITERS: usize = 6;

    /// What one writer did: its acknowledged attempts (attempt number, revision) and how many
    /// attempts it made in all.
    struct Written {
        acked: Vec<(u64, i64)>,
        attempts: u64,
    }

    fn keys(w: usize) -> (String, String) {
        (format!("fp/w{w}/a"), format!("fp/w{w}/b"))
    }

    /// Writer `w`: attempt n puts value n into both of its keys in one txn (the keys fall on
    /// different shards for most writers), through `endpoints`, until `stop`. A failed or
    /// timed-out attempt has an unknown outcome; the writer reconnects and goes on. `acked`
    /// counts acknowledged writes over all writers.
    async fn writer(
        w: usize,
        endpoints: Vec<String>,
        stop: Arc<AtomicBool>,
        acked: Arc<AtomicU64>,
    ) -> Written {
        let opts = || {
            ConnectOptions::new()
                .with_connect_timeout(Duration::from_secs(2))
                .with_timeout(Duration::from_secs(2))
        };
        let (a, b) = keys(w);
        let mut out = Written {
            acked: Vec::new(),
            attempts: 0,
        };
        let mut client: Option<Client> = None;
        while !stop.load(Ordering::Relaxed) {
            let c = match client.as_mut() {
                Some(c) => c,
                None => match Client::connect(endpoints.clone(), Some(opts())).await {
                    Ok(c) => client.insert(c),
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            out.attempts += 1;
            let n = out.attempts.to_string();
            let txn = Txn::new().and_then(vec![
                TxnOp::put(a.as_str(), n.as_str(), None),
                TxnOp::put(b.as_str(), n.as_str(), None),
            ]);
            match tokio::time::timeout(Duration::from_secs(3), c.txn(txn)).await {
                Ok(Ok(r)) => {
                    let rev = r.header().expect("header").revision();
                    out.acked.push((out.attempts, rev));
                    acked.fetch_add(1, Ordering::Relaxed);
                }
                _ => client = None,
            }
        }
        out
    }

    /// Checks one writer's keys on member `i` (serializable reads of a converged member):
    /// both keys hold the same attempt at the same revision (the txn is all or nothing), at
    /// least the last acknowledged one and at most the last tried; the key's version is at
    /// most its value (each attempt applied once: a replayed entry applied again would bump
    /// it past); and every acknowledged attempt is in the history at its revision. Returns
    /// the failures.
    async fn check_writer(c: &mut Client, w: usize, written: &Written) -> Vec<String> {
        let mut bad = Vec::new();
        let (a, b) = keys(w);
        let get = |rev: i64| {
            let opts = GetOptions::new().with_serializable().with_revision(rev);
            Some(opts)
        };
        let ka = c.get(a.as_str(), get(0)).await.expect("read a");
        let kb = c.get(b.as_str(), get(0)).await.expect("read b");
        let (Some(ka), Some(kb)) = (ka.kvs().first(), kb.kvs().first()) else {
            if !written.acked.is_empty() {
                bad.push(format!(
                    "writer {w}: keys missing after acknowledged writes"
                ));
            }
            return bad;
        };
        let value: u64 = ka.value_str().unwrap().parse().unwrap();
        if ka.value() != kb.value() || ka.mod_revision() != kb.mod_revision() {
            bad.push(format!(
                "writer {w}: a txn half applied: a={:?}@{} b={:?}@{}",
                ka.value_str(),
                ka.mod_revision(),
                kb.value_str(),
                kb.mod_revision()
            ));
        }
        let last_acked = written.acked.last().map_or(0, |(n, _)| *n);
        if value < last_acked || value > written.attempts {
            bad.push(format!(
                "writer {w}: holds attempt {value}; acknowledged up to {last_acked}, tried {}",
                written.attempts
            ));
        }
        if ka.version() as u64 > value {
            bad.push(format!(
                "writer {w}: version {} past attempt {value}: an entry applied twice",
                ka.version()
            ));
        }
        for &(n, rev) in &written.acked {
            let at = c.get(a.as_str(), get(rev)).await.expect("read at revision");
            let found = at
                .kvs()
                .first()
                .map(|kv| (kv.value_str().unwrap().to_string(), kv.mod_revision()));
            if found != Some((n.to_string(), rev)) {
                bad.push(format!(
                    "writer {w}: acknowledged attempt {n} at revision {rev}, found {found:?}"
                ));
            }
        }
        bad
    }

    /// A 3-member cluster (2 shards each) under [`WRITERS`] txn writers, half of them on every
    /// endpoint and half on `victim` alone; `victim` (a follower) is restarted with `point`
    /// set to fire on its first pass. The fault must fire (the member aborts with SIGABRT and
    /// logs the point's line), the clean restart must catch up, and afterwards every member
    /// must converge and pass [`check_writer`]. `extra` are the members' flags; `lag_entries`
    /// acknowledged writes must happen while the victim is down before it is restarted (so
    /// that the leader's log leaves it behind), and after the restart with the failpoint the
    /// writes go on until it has fired.
    async fn crash_and_recover(point: &str, extra: &[&str], lag_entries: u64) -> String {
        let mut flags = vec!["--shards", "2"];
        flags.extend_from_slice(extra);
        let mut cluster = Cluster::start(3, &flags).await;
        let leader = cluster.wait_for_leader(Duration::from_secs(60)).await;
        let victim = (leader + 1) % 3;
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..WRITERS)
            .map(|w| {
                let endpoints = if w % 2 == 0 {
                    cluster.endpoints()
                } else {
                    vec![cluster.endpoint(victim)]
                };
                tokio::spawn(writer(w, endpoints, stop.clone(), acked.clone()))
            })
            .collect();
        let progress = |at_least: u64| {
            let acked = acked.clone();
            async move {
                let ok = wait_until_async(Duration::from_secs(60), async || {
                    acked.load(Ordering::Relaxed) >= at_least
                })
                .await;
                assert!(ok, "writes stalled below {at_least} acknowledged");
            }
        };
        progress(50).await;
        cluster.kill(victim);
        progress(acked.load(Ordering::Relaxed) + lag_entries).await;
        let config = format!("{point}=return");
        let line = metastore::failpoints::abort_line(point);
        let log = match cluster.try_restart_with_env(victim, &[("FAILPOINTS", config.as_str())]) {
            Err(out) => out,
            Ok(()) => {
                let (status, log) = cluster
                    .wait_member_exit(victim, Duration::from_secs(30))
                    .unwrap_or_else(|| panic!("{point} did not fire\n{}", cluster.logs()));
                assert_eq!(status.signal(), Some(libc::SIGABRT), "{log}");
                log
            }
        };
        assert!(
            log.contains(&line),
            "member {victim} stopped, not at {point}:\n{log}"
        );
        cluster.restart(victim);
        // The restarted member takes part again: some writes through it are acknowledged.
        progress(acked.load(Ordering::Relaxed) + 30).await;
        stop.store(true, Ordering::Relaxed);
        let mut written = Vec::new();
        for t in tasks {
            written.push(t.await.expect("writer"));
        }
        cluster.wait_converged(Duration::from_secs(60)).await;
        let mut bad = Vec::new();
        for i in 0..3 {
            let mut c = cluster.client(i).await;
            for (w, wr) in written.iter().enumerate() {
                bad.extend(
                    check_writer(&mut c, w, wr)
                        .await
                        .into_iter()
                        .map(|b| format!("member {i}: {b}")),
                );
            }
        }
        assert!(
            bad.is_empty(),
            "after a crash at {point}:\n{}",
            bad.join("\n")
        );
        cluster.servers[victim]
            .as_ref()
            .expect("the victim runs")
            .log()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn crash_before_wal_fsync_recovers() {
        let _one = CLUSTERS.lock().await;
        crash_and_recover(WAL_BEFORE_FSYNC, &[], 20).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn crash_after_wal_fsync_recovers() {
        let _one = CLUSTERS.lock().await;
        crash_and_recover(WAL_AFTER_FSYNC, &[], 20).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn crash_mid_apply_batch_recovers() {
        let _one = CLUSTERS.lock().await;
        crash_and_recover(APPLY_MID_BATCH, &[], 20).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn crash_after_apply_barrier_recovers() {
        let _one = CLUSTERS.lock().await;
        crash_and_recover(APPLY_AFTER_BARRIER, &[], 20).await;
    }

    /// A snapshot every 20 entries, 5 kept behind it: a follower down for 150 writes can only
    /// catch up through the leader's snapshot.
    const SMALL_LOG: [&str; 4] = [
        "--snapshot-count",
        "20",
        "--experimental-snapshot-catchup-entries",
        "5",
    ];

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn crash_before_snapshot_install_recovers() {
        let _one = CLUSTERS.lock().await;
        let log = crash_and_recover(SNAPSHOT_BEFORE_INSTALL, &SMALL_LOG, 150).await;
        // Nothing was saved: the clean restart needed the leader's snapshot again.
        assert!(log.contains("log reset to the leader's snapshot"), "{log}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn crash_after_snapshot_install_recovers() {
        let _one = CLUSTERS.lock().await;
        crash_and_recover(SNAPSHOT_AFTER_INSTALL, &SMALL_LOG, 150).await;
    }

    /// The profile's fault: with a point that fires, it reports [`Crash::Fired`] and leaves
    /// the member running clean (it answers, and it is not the process that aborted); with a
    /// point that never fires (configured `off`), [`Crash::NotFired`] after [`FIRE_WITHIN`].
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_fault_crashes_the_member_at_the_point_and_restarts_it_clean() {
        let _one = CLUSTERS.lock().await;
        let mut cluster = Cluster::start(3, &[]).await;
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let load = tokio::spawn(writer(0, cluster.endpoints(), stop.clone(), acked.clone()));
        let leader = cluster.wait_for_leader(Duration::from_secs(60)).await;
        let victim = (leader + 1) % 3;
        let before = cluster.pid(victim);
        assert_eq!(
            crash_at(&mut cluster, victim, WAL_AFTER_FSYNC, "return").await,
            Crash::Fired
        );
        assert_ne!(cluster.pid(victim), before);
        assert!(!cluster.servers[victim]
            .as_ref()
            .unwrap()
            .log()
            .contains("failpoint"));
        assert!(
            cluster.status(victim).await.is_some(),
            "the clean member answers"
        );
        assert_eq!(
            crash_at(&mut cluster, victim, WAL_AFTER_FSYNC, "off").await,
            Crash::NotFired
        );
        stop.store(true, Ordering::Relaxed);
        let written = load.await.unwrap();
        assert!(!written.acked.is_empty());
        cluster.wait_converged(Duration::from_secs(60)).await;
        let mut c = cluster.client(victim).await;
        assert_eq!(
            check_writer(&mut c, 0, &written).await,
            Vec::<String>::new()
        );
        // The check is not vacuous: one key of the pair moved alone (a txn half applied) is
        // reported, and so is an acknowledged attempt missing from the history.
        let (a, _) = keys(0);
        c.put(a.as_str(), written.attempts.to_string(), None)
            .await
            .unwrap();
        let bad = check_writer(&mut c, 0, &written).await;
        assert!(bad.iter().any(|b| b.contains("half applied")), "{bad:?}");
        let mut lost = Written {
            acked: written.acked.clone(),
            attempts: written.attempts + 1,
        };
        lost.acked.push((written.attempts + 1, 1));
        let bad = check_writer(&mut c, 0, &lost).await;
        assert!(
            bad.iter().any(|b| b.contains("acknowledged attempt")),
            "{bad:?}"
        );
    }
}
