//! Disk faults of the robustness profile: a full disk, and damaged WAL, snapshot and SST files.
//!
//! * **Full disk** ([`full_disk`]): one member's data directory lives on a small tmpfs that the
//!   run mounts ([`on_small_disk`]; needs root, otherwise the fault is skipped and the summary
//!   says so). The fault fills that file system with a filler file until the member runs into
//!   ENOSPC (its log says "No space left on device", or it stops with it), holds it full a
//!   little longer, then frees it. What the member does meanwhile is its choice — etcd stops on
//!   a failed WAL or backend write (`lg.Panic`), MetaStore's memory engine keeps serving and
//!   logs the failed snapshot (its WAL segments are preallocated), RocksDB stops the member —
//!   but the other two keep a leader, and once the space is back a stopped member is restarted
//!   and must rejoin and catch up. Lost writes show up in the profile's final checks.
//! * **Damaged files** ([`damage`]): a follower is SIGKILLed and one of its files damaged:
//!   - [`Damage::TornWalTail`]: half a record after the WAL's last one, what a crash in the
//!     middle of writing the next record leaves. It must be repaired at start (etcd truncates
//!     a torn tail): the member starts, logs `truncating torn WAL tail` naming the segment,
//!     and rejoins. Every complete record stays: each may hold an entry the member had
//!     acknowledged (fsynced), which no torn write can take away. (An earlier version cut
//!     the last record itself, and so took acknowledged entries away: raft-rs then panics
//!     on the leader's commit index, as etcd's raft does — see
//!     `a_follower_that_lost_acknowledged_entries_stops`.)
//!   - [`Damage::CorruptWalRecord`]: a byte flipped inside an earlier, complete WAL record.
//!     The member must refuse to start (`wal: corrupt record in <file> at offset <n>`, as etcd
//!     refuses with `walpb: crc mismatch`) and exit with a failure status.
//!   - [`Damage::CorruptSnapshot`]: a byte flipped in the newest `.snap` file. Either the member
//!     starts from the older snapshot and the WAL after it, warning and renaming the file
//!     `.broken` (etcd `LoadNewestAvailable`/`renameBroken`), or, when the WAL cannot stand in
//!     for it, refuses naming the file.
//!   - [`Damage::CorruptSst`] (RocksDB): bytes flipped in the first data block of an SST file.
//!     The member must refuse to start, or stop at the first read of that block, with RocksDB's
//!     `Corruption` naming the file; a read of everything (HashKV) must never succeed.
//!
//!   A member that refused is replaced as an operator would: `member remove`, its data
//!   directory emptied, `member add` with its peer URL, and a start with
//!   `--initial-cluster-state existing` (same name and ports, so the clients' endpoints stay
//!   valid); it catches up from the leader. Anything else (a member that starts on a corrupt
//!   WAL, a refusal that does not name the file, a torn tail that stops start-up) is reported
//!   as a violation.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::{sleep, timeout};

use crate::harness::{exit_code_of_failed_start, wait_until_async, Cluster};
use crate::small_disk::SmallDisk;
use crate::traffic::Lcg;

/// Size of the member's tmpfs, MiB: a preallocated WAL segment (64 MiB) and, with RocksDB, the
/// ballast (64 MiB), with room to spare before the filler takes the rest.
pub const DISK_MIB: u64 = 256;

/// The member on the small disk snapshots every this many entries, so that a full disk soon
/// makes it write (a snapshot file; with RocksDB also a checkpoint, which flushes the
/// memtables to SST files) and run into ENOSPC. Its snapshots also give the snapshot damage
/// something to damage.
pub const DISK_SNAPSHOT_COUNT: &str = "100";

/// What the OS says on ENOSPC (`strerror(28)`), as both engines' errors carry it.
const NO_SPACE: &str = "No space left on device";

/// Counters of the disk faults, for the summary line.
#[derive(Debug, Default, Clone)]
pub struct DiskCounts {
    /// Why the full-disk fault does not run (not root), if it does not.
    pub full_disk_skipped: Option<String>,
    /// Full-disk faults.
    pub full_disk: usize,
    /// Of which the member ran into ENOSPC while the disk was full (logged it, or stopped).
    pub full_disk_enospc: usize,
    /// Of which the member stopped (and was restarted once the space was back).
    pub full_disk_stopped: usize,
    /// Damage faults by kind, in [`Damage::ALL`] order.
    pub damaged: [usize; 4],
    /// Damage faults after which the member refused to start or stopped (then replaced).
    pub refused: usize,
    /// Damage faults after which the member started (a repaired torn tail, a snapshot fallback).
    pub repaired: usize,
}

impl DiskCounts {
    /// Total disk faults.
    pub fn total(&self) -> usize {
        self.full_disk + self.damaged.iter().sum::<usize>()
    }

    /// The summary-line fragment: `full-disk=… (enospc=…, stopped=…) damaged=… (torn-wal-tail=…,
    /// …; refused+replaced=…, repaired=…)`.
    pub fn summary(&self) -> String {
        let full = match &self.full_disk_skipped {
            Some(why) => format!("full-disk=skipped ({why})"),
            None => format!(
                "full-disk={} (enospc={}, stopped={})",
                self.full_disk, self.full_disk_enospc, self.full_disk_stopped
            ),
        };
        let kinds: Vec<String> = Damage::ALL
            .iter()
            .zip(self.damaged)
            .map(|(d, n)| format!("{}={n}", d.name()))
            .collect();
        format!(
            "{full} damaged={} ({}; refused+replaced={}, repaired={})",
            self.damaged.iter().sum::<usize>(),
            kinds.join(", "),
            self.refused,
            self.repaired
        )
    }
}

/// Puts member `member` of `cluster` on a small tmpfs (see [`SmallDisk`]): stops it (SIGKILL),
/// copies its data directory there, and restarts it with `--snapshot-count`
/// [`DISK_SNAPSHOT_COUNT`]. Returns the disk, which unmounts when dropped (drop it after the
/// cluster; lazily unmounted otherwise), or the reason it cannot (not root).
pub fn on_small_disk(cluster: &mut Cluster, member: usize) -> Result<SmallDisk, String> {
    let Some(disk) = SmallDisk::mount(DISK_MIB) else {
        return Err("mounting a tmpfs needs root".into());
    };
    cluster.kill(member);
    let old = cluster.data_dir(member);
    copy_dir(&old, &disk.path());
    std::fs::remove_dir_all(&old).expect("remove the old data directory");
    cluster.set_data_dir(member, &disk.path());
    cluster.add_extra(member, &["--snapshot-count", DISK_SNAPSHOT_COUNT]);
    cluster.restart(member);
    Ok(disk)
}

/// Copies a directory tree (a stopped member's data directory).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// What one full-disk fault did.
#[derive(Debug)]
pub struct FullDisk {
    /// The member ran into ENOSPC while the disk was full: its log says so, or it stopped.
    pub enospc: bool,
    /// The member stopped by itself (it was restarted once the space was back).
    pub stopped: bool,
    /// What it logged about it: the first line that mentions ENOSPC, or the end of its log.
    pub evidence: String,
}

/// The full-disk fault on member `member`, whose data directory is on `disk`: fills the disk,
/// waits (up to 20 s) until the member runs into ENOSPC or stops, holds the disk full for
/// `hold` more, checking that the other members keep a leader, then frees it; restarts the
/// member if it stopped and waits until it has caught up with the leader.
///
/// Panics (the profile fails) when the other members lose their leader, or when the member
/// cannot restart or catch up once the space is back.
pub async fn full_disk(
    cluster: &mut Cluster,
    disk: &SmallDisk,
    member: usize,
    hold: Duration,
) -> FullDisk {
    let seen = cluster.servers[member]
        .as_ref()
        .map_or(0, |s| s.log().len());
    // (The member may free a little meanwhile, deleting an old snapshot: fill again.)
    let full = (0..10).any(|_| {
        disk.fill();
        disk.is_full()
    });
    assert!(full, "the disk does not stay full");
    let mut outcome = FullDisk {
        enospc: false,
        stopped: false,
        evidence: String::new(),
    };
    // The member only notices when it writes outside its preallocated WAL: wait for it.
    wait_until_async(Duration::from_secs(20), async || {
        // Topped up as the member frees space (old snapshots it deletes), so it stays full.
        disk.fill();
        observe(cluster, member, seen, &mut outcome);
        outcome.enospc || outcome.stopped
    })
    .await;
    // The others go on: the running members agree on a leader (the member on the full disk,
    // if it still runs, may be it). A member that stops meanwhile drops out of the count.
    let mut statuses = Vec::new();
    let agreed = wait_until_async(Duration::from_secs(30), async || {
        disk.fill();
        observe(cluster, member, seen, &mut outcome);
        statuses.clear();
        for i in cluster.live() {
            statuses.push(cluster.status(i).await);
        }
        let first = statuses.first().copied().flatten();
        first.is_some_and(|(leader, term, _)| {
            leader != 0
                && statuses
                    .iter()
                    .all(|s| matches!(s, Some((l, t, _)) if *l == leader && *t == term))
        })
    })
    .await;
    assert!(
        agreed,
        "no leader while member {member}'s disk is full: {statuses:?}\n{}",
        cluster.logs()
    );
    let until = tokio::time::Instant::now() + hold;
    while tokio::time::Instant::now() < until {
        disk.fill();
        sleep(Duration::from_millis(100)).await;
    }
    observe(cluster, member, seen, &mut outcome);
    disk.free();
    assert!(!disk.is_full(), "the space is back");
    if outcome.stopped {
        if let Err(e) = cluster.try_restart(member) {
            panic!("member {member} does not restart once its disk has space again: {e}");
        }
    }
    wait_caught_up(cluster, member).await;
    outcome
}

/// Updates `outcome` from member `member`'s log after byte `seen` and whether it exited.
fn observe(cluster: &mut Cluster, member: usize, seen: usize, outcome: &mut FullDisk) {
    if outcome.stopped {
        return;
    }
    if let Some((status, log)) = cluster.take_exited(member) {
        outcome.stopped = true;
        outcome.enospc |= log.get(seen..).unwrap_or("").contains(NO_SPACE);
        let tail: Vec<&str> = log.lines().rev().take(3).collect();
        outcome.evidence = format!("exited ({status}): {}", tail.join(" | "));
        return;
    }
    if let Some(server) = cluster.servers[member].as_ref() {
        let log = server.log();
        if let Some(line) = log
            .get(seen..)
            .unwrap_or("")
            .lines()
            .find(|l| l.contains(NO_SPACE))
        {
            outcome.enospc = true;
            outcome.evidence = line.to_string();
        }
    }
}

/// Waits (up to 60 s) until every running member agrees on a leader and member `member`'s
/// applied index reaches the leader's at the start of the wait; panics otherwise.
pub async fn wait_caught_up(cluster: &Cluster, member: usize) {
    let leader = cluster.wait_for_leader(Duration::from_secs(60)).await;
    let Some((_, _, target)) = cluster.status(leader).await else {
        // The leader moved on meanwhile; one more agreement is enough.
        cluster.wait_for_leader(Duration::from_secs(60)).await;
        return;
    };
    let mut last = None;
    let ok = wait_until_async(Duration::from_secs(60), async || {
        last = cluster.status(member).await;
        last.is_some_and(|(_, _, applied)| applied >= target)
    })
    .await;
    assert!(
        ok,
        "member {member} did not catch up to index {target} of the leader: {last:?}\n{}",
        cluster.logs()
    );
}

/// A kind of damage to a stopped member's files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Damage {
    /// Half a record after the WAL's last one (a torn write of the next record): repaired at
    /// start.
    TornWalTail,
    /// A byte flipped in an earlier, complete WAL record: start-up refused.
    CorruptWalRecord,
    /// A byte flipped in the newest snapshot file: a fallback to the older one, or refused.
    CorruptSnapshot,
    /// Bytes flipped in an SST file's first data block (RocksDB): refused or stopped.
    CorruptSst,
}

impl Damage {
    /// Every kind, in the order of [`DiskCounts::damaged`].
    pub const ALL: [Damage; 4] = [
        Damage::TornWalTail,
        Damage::CorruptWalRecord,
        Damage::CorruptSnapshot,
        Damage::CorruptSst,
    ];

    /// The name in the summary line.
    pub fn name(self) -> &'static str {
        match self {
            Damage::TornWalTail => "torn-wal-tail",
            Damage::CorruptWalRecord => "corrupt-wal-record",
            Damage::CorruptSnapshot => "corrupt-snapshot",
            Damage::CorruptSst => "corrupt-sst",
        }
    }

    /// Its position in [`Damage::ALL`] (and [`DiskCounts::damaged`]).
    pub fn index(self) -> usize {
        Damage::ALL.iter().position(|d| *d == self).unwrap()
    }
}

/// The files of `kind` in a data directory, oldest (or, for SST files, smallest) first.
fn files(data_dir: &Path, kind: Damage) -> Vec<PathBuf> {
    let member = data_dir.join("member");
    let list = |dir: PathBuf, ext: &str| -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut out: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == ext))
            .collect();
        out.sort();
        out
    };
    match kind {
        Damage::TornWalTail | Damage::CorruptWalRecord => list(member.join("wal"), "wal"),
        Damage::CorruptSnapshot => list(member.join("snap"), "snap"),
        Damage::CorruptSst => {
            let mut ssts: Vec<PathBuf> = std::fs::read_dir(member.join("shards"))
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.path().is_dir())
                .flat_map(|e| list(e.path(), "sst"))
                .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 0))
                .collect();
            ssts.sort_by_key(|p| std::fs::metadata(p).map_or(0, |m| m.len()));
            ssts
        }
    }
}

/// File offsets of the records of a WAL segment (a record is `len u32 | crc32(len) |
/// crc32(body) | body`), and the length of their bodies.
fn wal_records(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 12 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
        if len == 0 || off + 12 + len > bytes.len() {
            break;
        }
        out.push((off, len));
        off += 12 + len;
    }
    out
}

/// Whether one of the 512-byte-sector chunks of `bytes[from..to]` is all zeros: a record
/// damaged so would read as a torn write (etcd `isTornEntry`), not as corruption.
fn has_zeroed_sector_chunk(bytes: &[u8], from: usize, to: usize) -> bool {
    let mut at = from;
    while at < to {
        let end = ((at / 512 + 1) * 512).min(to);
        if bytes[at..end].iter().all(|b| *b == 0) {
            return true;
        }
        at = end;
    }
    false
}

/// Applies `kind` to the stopped member's data directory; returns the damaged file, or `None`
/// when it has no file to damage so (no snapshot, no SST file, a WAL of one record).
pub fn apply(data_dir: &Path, kind: Damage) -> Option<PathBuf> {
    let files = files(data_dir, kind);
    match kind {
        Damage::TornWalTail => {
            let newest = files.last()?.clone();
            let mut bytes = std::fs::read(&newest).ok()?;
            let &(last, len) = wal_records(&bytes).last()?;
            // The next record's write cut short: a copy of the last record's header and half
            // its body after it, extending past the end of the file.
            let partial = bytes[last..last + 12 + len / 2].to_vec();
            bytes.truncate(last + 12 + len);
            bytes.extend(partial);
            std::fs::write(&newest, &bytes).expect("write the WAL segment");
            Some(newest)
        }
        Damage::CorruptWalRecord => {
            let newest = files.last()?.clone();
            let mut bytes = std::fs::read(&newest).ok()?;
            let records = wal_records(&bytes);
            // An earlier record (not the last), whose damage cannot pass for a torn write.
            let candidates: Vec<(usize, usize)> = records[..records.len().saturating_sub(1)]
                .iter()
                .copied()
                .filter(|&(off, len)| !has_zeroed_sector_chunk(&bytes, off, off + 12 + len))
                .collect();
            let &(off, len) = candidates.get(candidates.len() / 2)?;
            bytes[off + 12 + len / 2] ^= 0x41;
            std::fs::write(&newest, &bytes).expect("write the WAL segment");
            Some(newest)
        }
        Damage::CorruptSnapshot => {
            let newest = files.last()?.clone();
            let mut bytes = std::fs::read(&newest).ok()?;
            // The payload (after the magic and the checksum): its checksum fails.
            let at = 8 + (bytes.len().checked_sub(9)? / 2);
            bytes[at] ^= 0x41;
            std::fs::write(&newest, &bytes).expect("write the snapshot");
            Some(newest)
        }
        Damage::CorruptSst => {
            let largest = files.last()?.clone();
            let mut bytes = std::fs::read(&largest).ok()?;
            // A block-based table starts with its data blocks: bytes 8..11 are inside the
            // first one, which holds the file's smallest keys.
            if bytes.len() < 64 {
                return None;
            }
            for b in &mut bytes[8..11] {
                *b ^= 0xa5;
            }
            std::fs::write(&largest, &bytes).expect("write the SST file");
            Some(largest)
        }
    }
}

/// How a member responded to a damaged file.
#[derive(Debug)]
pub enum Response {
    /// It started; `log` is what it logged up to its ready line.
    Started {
        /// Its start-up log.
        log: String,
    },
    /// It started, then stopped by itself once it read the damage (a full read was asked
    /// of it); `log` is everything it logged.
    StoppedAfterRead {
        /// Its exit status.
        status: std::process::ExitStatus,
        /// Its log.
        log: String,
    },
    /// It started and answered a read of everything (HashKV) although a file was damaged.
    ServedAfterRead {
        /// Its log.
        log: String,
    },
    /// It refused to start; `output` is what the harness reported (its log and exit status).
    Refused {
        /// The harness's report.
        output: String,
    },
}

/// Whether the harness's report of a start that failed shows an exit by the process itself
/// with a failure code, rather than a signal.
fn exited_with_failure(output: &str) -> bool {
    exit_code_of_failed_start(output).is_some_and(|code| code != 0)
}

/// Judges `response` to `kind` on `file`: `Ok(true)` when the member must be replaced (it
/// refused or stopped as it should), `Ok(false)` when it started as it should, `Err` (a
/// violation, described) otherwise.
pub fn judge(kind: Damage, file: &Path, response: &Response) -> Result<bool, String> {
    let path = file.display().to_string();
    let name = file
        .file_name()
        .map_or(String::new(), |n| n.to_string_lossy().into_owned());
    let bad = |what: &str, log: &str| {
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        Err(format!(
            "{} of {path}: {what}; log tail: {}",
            kind.name(),
            tail.join(" | ")
        ))
    };
    match (kind, response) {
        (Damage::TornWalTail, Response::Started { log }) => {
            if log.contains("truncating torn WAL tail") && log.contains(&path) {
                Ok(false)
            } else {
                bad("started without logging the repair of the torn tail", log)
            }
        }
        (Damage::CorruptSnapshot, Response::Started { log }) => {
            let renamed = file.with_extension("snap.broken");
            if log.contains(&name) && !file.exists() && renamed.exists() {
                Ok(false)
            } else {
                bad(
                    "started without naming the snapshot and renaming it .broken",
                    log,
                )
            }
        }
        (Damage::TornWalTail, Response::Refused { output }) => {
            bad("refused to start (a torn tail must be repaired)", output)
        }
        (Damage::CorruptWalRecord, Response::Refused { output }) => {
            if !exited_with_failure(output) {
                bad("did not exit by itself with a failure status", output)
            } else if output.contains(&path) && output.contains("corrupt record") {
                Ok(true)
            } else {
                bad("refused without naming the corrupt record's file", output)
            }
        }
        (Damage::CorruptSnapshot, Response::Refused { output }) => {
            if !exited_with_failure(output) {
                bad("did not exit by itself with a failure status", output)
            } else if output.contains(&path) {
                Ok(true)
            } else {
                bad("refused without naming the snapshot", output)
            }
        }
        (Damage::CorruptSst, Response::Refused { output }) => {
            if !exited_with_failure(output) {
                bad("did not exit by itself with a failure status", output)
            } else if output.contains(&path) && output.contains("Corruption") {
                Ok(true)
            } else {
                bad(
                    "refused without RocksDB's Corruption naming the file",
                    output,
                )
            }
        }
        (Damage::CorruptSst, Response::StoppedAfterRead { status, log }) => {
            if status.success() {
                bad("exited with status 0", log)
            } else if log.contains(&path) && log.contains("Corruption") {
                Ok(true)
            } else {
                bad("stopped without RocksDB's Corruption naming the file", log)
            }
        }
        (Damage::CorruptSst, Response::ServedAfterRead { log }) => {
            bad("served a read of everything from a corrupt SST file", log)
        }
        (Damage::CorruptSst, Response::Started { log }) => {
            bad("the full read failed, but the member did not stop", log)
        }
        (Damage::CorruptWalRecord, Response::Started { log }) => {
            bad("started on a corrupt WAL record", log)
        }
        (_, Response::StoppedAfterRead { log, .. } | Response::ServedAfterRead { log }) => {
            bad("unexpected response", log)
        }
    }
}

/// What one damage fault did.
#[derive(Debug)]
pub struct Damaged {
    /// The kind applied.
    pub kind: Damage,
    /// The member damaged.
    pub member: usize,
    /// The file damaged.
    pub file: PathBuf,
    /// Whether the member was replaced (it refused to start or stopped).
    pub replaced: bool,
    /// A wrong response (see [`judge`]), if any.
    pub violation: Option<String>,
}

/// The damage fault: SIGKILLs a follower, damages one of its files (`wanted`, or the first kind
/// after it, in [`Damage::ALL`] order, that the member has a file for; SST damage only on
/// RocksDB), restarts it and judges the response ([`judge`]); a member that refused or stopped
/// is replaced ([`replace`]). Returns `None` when no follower runs (nothing done).
///
/// Panics (the profile fails) when a replacement cannot join or the member does not catch up.
pub async fn damage(cluster: &mut Cluster, wanted: Damage, rocksdb: bool) -> Option<Damaged> {
    let leader = cluster.wait_for_leader(Duration::from_secs(60)).await;
    let followers: Vec<usize> = cluster
        .live()
        .into_iter()
        .filter(|i| *i != leader)
        .collect();
    // The follower with the file asked for, if one has it (listing a running member's files
    // is enough to choose; they are listed again once it is stopped).
    let victim = followers
        .iter()
        .copied()
        .find(|i| !files(&cluster.data_dir(*i), wanted).is_empty())
        .or(followers.first().copied())?;
    cluster.kill(victim);
    let dir = cluster.data_dir(victim);
    let start = Damage::ALL.iter().position(|d| *d == wanted).unwrap();
    let (kind, file) = (0..Damage::ALL.len())
        .map(|k| Damage::ALL[(start + k) % Damage::ALL.len()])
        .filter(|d| rocksdb || *d != Damage::CorruptSst)
        .find_map(|d| apply(&dir, d).map(|f| (d, f)))
        .expect("a stopped member has a WAL to damage");
    let response = match cluster.try_restart(victim) {
        Err(output) => Response::Refused { output },
        Ok(()) if kind == Damage::CorruptSst => read_everything(cluster, victim).await,
        Ok(()) => Response::Started {
            log: cluster.servers[victim]
                .as_ref()
                .map_or(String::new(), |s| s.startup_log.clone()),
        },
    };
    let (replaced, violation) = match judge(kind, &file, &response) {
        Ok(replace_it) => (replace_it, None),
        // A member that does not run cannot stay so: replace it too, so that the run goes on
        // (the violation fails it at the end).
        Err(v) => (cluster.servers[victim].is_none(), Some(v)),
    };
    if let Response::ServedAfterRead { .. } = response {
        // It serves damaged data: stop it and replace it, as an operator would.
        cluster.kill(victim);
    }
    if cluster.servers[victim].is_none() {
        replace(cluster, victim).await;
    }
    wait_caught_up(cluster, victim).await;
    Some(Damaged {
        kind,
        member: victim,
        file,
        replaced,
        violation,
    })
}

/// Asks member `victim` for a read of everything (HashKV, which reads every key's every
/// version) and waits (up to 20 s) to see whether it stops.
async fn read_everything(cluster: &mut Cluster, victim: usize) -> Response {
    let read = async {
        let mut c = cluster.try_client(victim).await?;
        c.hash_kv(0).await
    };
    let answered = matches!(timeout(Duration::from_secs(10), read).await, Ok(Ok(_)));
    let mut exited = None;
    wait_until_async(
        Duration::from_secs(if answered { 2 } else { 20 }),
        async || {
            exited = cluster.take_exited(victim);
            exited.is_some()
        },
    )
    .await;
    match exited {
        Some((status, log)) => Response::StoppedAfterRead { status, log },
        None if answered => Response::ServedAfterRead {
            log: cluster.servers[victim]
                .as_ref()
                .map_or(String::new(), |s| s.log()),
        },
        None => Response::Started {
            log: cluster.servers[victim]
                .as_ref()
                .map_or(String::new(), |s| s.log()),
        },
    }
}

/// Replaces member `i` (stopped), as an operator replaces a member whose data is damaged
/// (etcd's runtime-reconfiguration guide): `member remove` of its ID, its data directory
/// emptied, `member add` with its peer URL, then a start with `--initial-cluster-state
/// existing`. Its name and ports stay, so clients keep reaching it at the same endpoint.
///
/// Panics when the remove or the add does not succeed within 60 s or the member does not
/// start.
pub async fn replace(cluster: &mut Cluster, i: usize) {
    let old = cluster.ids[i];
    let mut last = None;
    let removed = wait_until_async(Duration::from_secs(60), async || {
        let leader = cluster.wait_for_leader(Duration::from_secs(60)).await;
        let r = async { cluster.try_client(leader).await?.member_remove(old).await };
        match timeout(Duration::from_secs(5), r).await {
            Ok(Ok(_)) => true,
            // Removed by an earlier try whose answer was lost.
            Ok(Err(e)) if e.to_string().contains("member not found") => true,
            other => {
                last = Some(format!("{other:?}"));
                false
            }
        }
    })
    .await;
    assert!(removed, "member remove {old:x}: {last:?}");
    let dir = cluster.data_dir(i);
    // Empty the directory but keep it: it may be a mount point (the small disk's `data` is
    // not, but emptying works the same everywhere).
    if dir.exists() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = entry.path();
            if p.is_dir() {
                std::fs::remove_dir_all(&p).unwrap();
            } else {
                std::fs::remove_file(&p).unwrap();
            }
        }
    }
    cluster.rejoin_as_new(i);
    let peer_url = cluster.specs[i].peer_url();
    let added = wait_until_async(Duration::from_secs(60), async || {
        let leader = cluster.wait_for_leader(Duration::from_secs(60)).await;
        let r = async {
            cluster
                .try_client(leader)
                .await?
                .member_add([peer_url.as_str()], None)
                .await
        };
        match timeout(Duration::from_secs(5), r).await {
            Ok(Ok(_)) => true,
            // Added by an earlier try whose answer was lost.
            Ok(Err(e)) if e.to_string().contains("Peer URLs already exists") => true,
            // "unhealthy cluster" until the voters have been connected a while: retry.
            other => {
                last = Some(format!("{other:?}"));
                false
            }
        }
    })
    .await;
    assert!(added, "member add {peer_url}: {last:?}");
    cluster.start_added(i).await;
}

/// The damage kind to try next, at random (SST damage only on RocksDB).
pub fn pick(rng: &mut Lcg, rocksdb: bool) -> Damage {
    let kinds = if rocksdb { 4 } else { 3 };
    Damage::ALL[rng.below(kinds) as usize]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::os::unix::process::ExitStatusExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use etcd_client::{Client, GetOptions};

    use crate::traffic::{engines, CLUSTERS};

    /// Every key under `prefix` with its value, read serializably from member `i` alone (its
    /// own state, so a member that lost data cannot hide behind the leader).
    async fn dump(cluster: &Cluster, i: usize, prefix: &str) -> BTreeMap<String, String> {
        let mut c = cluster.client(i).await;
        let opts = GetOptions::new().with_prefix().with_serializable();
        let r = c.get(prefix, Some(opts)).await.expect("read the prefix");
        r.kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    String::from_utf8_lossy(kv.value()).into_owned(),
                )
            })
            .collect()
    }

    /// The full-disk fault acts: with the disk full the member runs into ENOSPC (its log says
    /// "No space left on device", or it stops with it) while writes go on through the other
    /// members; once the space is back it catches up, and every acknowledged write is on it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_full_disk_fault_makes_the_member_run_into_enospc() {
        let _one = CLUSTERS.lock().await;
        for engine in engines() {
            let mut cluster = Cluster::start(3, &["--storage-engine", engine.as_str()]).await;
            let disk = match on_small_disk(&mut cluster, 2) {
                Ok(disk) => disk,
                Err(why) => {
                    eprintln!("skipped: {why}");
                    return;
                }
            };
            // Writes through members 0 and 1 all along (member 2 may stop).
            let stop = Arc::new(AtomicBool::new(false));
            let endpoints = vec![cluster.endpoint(0), cluster.endpoint(1)];
            let writer = tokio::spawn({
                let stop = stop.clone();
                async move {
                    let mut c = Client::connect(endpoints, None).await.unwrap();
                    let mut acked = BTreeMap::new();
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let (k, v) = (format!("full/{:03}", i % 500), format!("v{i}"));
                        let put =
                            timeout(Duration::from_secs(2), c.put(k.clone(), v.clone(), None));
                        if let Ok(Ok(_)) = put.await {
                            acked.insert(k, v);
                        }
                        i += 1;
                        sleep(Duration::from_millis(5)).await;
                    }
                    acked
                }
            });
            let full = full_disk(&mut cluster, &disk, 2, Duration::from_secs(1)).await;
            stop.store(true, Ordering::Relaxed);
            let acked = writer.await.unwrap();
            println!(
                "full disk on {engine}: {full:?}; {} keys written",
                acked.len()
            );
            assert!(
                full.enospc,
                "{engine}: the member never ran into ENOSPC: {full:?}\n{}",
                cluster.logs()
            );
            assert!(full.evidence.contains(NO_SPACE) || full.stopped, "{full:?}");
            assert!(!acked.is_empty());
            // A snapshot that could not be written leaves no partial file behind (regression:
            // each failed save left a `.snap.tmp` holding the space it took).
            let snap_dir = disk.path().join("member").join("snap");
            let partial: Vec<PathBuf> = std::fs::read_dir(&snap_dir)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "tmp"))
                .collect();
            assert!(
                partial.is_empty(),
                "{engine}: partial snapshots left: {partial:?}"
            );
            cluster.wait_converged(Duration::from_secs(60)).await;
            for i in 0..3 {
                let got = dump(&cluster, i, "full/").await;
                assert_eq!(got, acked, "{engine}: member {i} after the full disk");
            }
            drop(cluster);
            drop(disk);
        }
    }

    /// A follower whose WAL lost entries it had acknowledged (cut right after a hard state
    /// record, with committed entries after it: what no torn write can do, as an entry is
    /// fsynced before it is acknowledged) gets a commit index past its log from the leader.
    /// raft-rs panics there, as etcd's raft does ("to_commit N is out of range"), and the
    /// member must then stop by itself with a failure status and say why (with RocksDB, whose
    /// shards keep their applied index, start-up refuses a shard ahead of the WAL first: a
    /// refusal as good). It used to keep running
    /// without its Raft thread, "waiting for a Raft leader" for ever (the long profile found
    /// it, through the old torn-tail damage, which cut an acknowledged record).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_follower_that_lost_acknowledged_entries_stops() {
        let _one = CLUSTERS.lock().await;
        let mut cluster = Cluster::start(3, &[]).await;
        let leader = cluster.wait_for_leader(Duration::from_secs(60)).await;
        let mut c = cluster.client(leader).await;
        for i in 0..100 {
            c.put(format!("lost/{i:03}"), "v", None).await.unwrap();
        }
        drop(c);
        cluster.wait_converged(Duration::from_secs(60)).await;
        let victim = (leader + 1) % 3;
        cluster.kill(victim);
        let segment = files(&cluster.data_dir(victim), Damage::TornWalTail)
            .pop()
            .expect("a WAL segment");
        let bytes = std::fs::read(&segment).unwrap();
        let records = wal_records(&bytes);
        let is_hard_state = |&(off, _): &(usize, usize)| bytes[off + 12] == 2;
        // The last hard state with at least 10 entries after it.
        let cut = (0..records.len().saturating_sub(10))
            .rev()
            .find(|&r| is_hard_state(&records[r]))
            .map(|r| records[r].0 + 12 + records[r].1)
            .expect("a hard state followed by entries");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&segment)
            .unwrap();
        f.set_len(cut as u64).unwrap();
        drop(f);
        let started = std::time::Instant::now();
        let output = cluster
            .try_restart(victim)
            .expect_err("a member that lost acknowledged entries must not serve");
        println!(
            "member {victim} stopped after {:?}; log tail:\n{}",
            started.elapsed(),
            output.lines().rev().take(6).collect::<Vec<_>>().join("\n")
        );
        assert!(
            exited_with_failure(&output),
            "the member exits by itself, with a failure status: {output}"
        );
        // Memory engine: raft-rs's panic on the leader's commit index. RocksDB: the shards'
        // applied index is durable, and start-up refuses a shard ahead of the WAL before Raft
        // ever runs.
        let raft_panicked =
            output.contains("the raft thread panicked") && output.contains("out of range");
        let shard_ahead = output.contains("past the last index") && output.contains("WAL");
        assert!(
            raft_panicked || shard_ahead,
            "the member says why it stopped: {output}"
        );
        // The other two still serve.
        let leader = cluster.wait_for_leader(Duration::from_secs(60)).await;
        let mut c = cluster.client(leader).await;
        c.put("lost/after", "v", None).await.unwrap();
    }

    /// Each damage kind acts and is answered as it must be, through the profile's own
    /// [`damage`]: a torn WAL tail repaired (the member starts and keeps every key), a corrupt
    /// WAL record refused with the file named (the member replaced), a corrupt snapshot
    /// skipped or refused naming it, a corrupt SST refused or stopped on with RocksDB's
    /// `Corruption` naming the file. After each, the damaged (or replaced) member holds every
    /// key the cluster acknowledged.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn each_damage_kind_is_detected_or_repaired() {
        let _one = CLUSTERS.lock().await;
        for engine in engines() {
            let rocksdb = engine == "rocksdb";
            // Frequent snapshots (checkpoints, with RocksDB, which flush to SST files), so
            // every member has snapshot and SST files to damage.
            let flags = [
                "--storage-engine",
                engine.as_str(),
                "--snapshot-count",
                "50",
            ];
            let mut cluster = Cluster::start(3, &flags).await;
            let mut want = BTreeMap::new();
            let mut c = cluster
                .client(cluster.wait_for_leader(Duration::from_secs(60)).await)
                .await;
            for i in 0..300 {
                let (k, v) = (format!("dmg/{i:03}"), format!("v{i}"));
                c.put(k.clone(), v.clone(), None).await.unwrap();
                want.insert(k, v);
            }
            drop(c);
            for kind in Damage::ALL {
                if kind == Damage::CorruptSst && !rocksdb {
                    continue;
                }
                cluster.wait_converged(Duration::from_secs(60)).await;
                let d = damage(&mut cluster, kind, rocksdb)
                    .await
                    .expect("a follower runs");
                println!(
                    "{engine}: {} of {} on member {}: replaced={}",
                    d.kind.name(),
                    d.file.display(),
                    d.member,
                    d.replaced
                );
                assert_eq!(d.kind, kind, "{engine}: the member had a file to damage");
                assert_eq!(d.violation, None, "{engine}");
                match kind {
                    Damage::TornWalTail => assert!(!d.replaced, "{engine}: torn tail repaired"),
                    Damage::CorruptWalRecord | Damage::CorruptSst => {
                        assert!(d.replaced, "{engine}: {} refused", kind.name())
                    }
                    Damage::CorruptSnapshot => {}
                }
                // One more acknowledged write, then every member has every key.
                let leader = cluster.wait_for_leader(Duration::from_secs(60)).await;
                let mut c = cluster.client(leader).await;
                let k = format!("dmg/after-{}", kind.name());
                c.put(k.clone(), "x", None).await.unwrap();
                want.insert(k, "x".into());
                cluster.wait_converged(Duration::from_secs(60)).await;
                assert_eq!(
                    dump(&cluster, d.member, "dmg/").await,
                    want,
                    "{engine}: {kind:?}"
                );
            }
        }
    }

    /// The judge is what turns a wrong response into a violation: each wrong response to each
    /// kind is caught, and the right ones pass.
    #[test]
    fn the_judge_catches_wrong_responses() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join("0000000000000000-0000000000000001.wal");
        let refused = |msg: &str, code: i32| Response::Refused {
            output: format!(
                "server did not become ready (exit: Some(ExitStatus(unix_wait_status({}))); \
                 output:\n{msg}\n",
                code << 8
            ),
        };
        let corrupt = format!(
            "metastore: error: wal: corrupt record in {} at offset 96: crc mismatch",
            wal.display()
        );
        assert_eq!(
            judge(Damage::CorruptWalRecord, &wal, &refused(&corrupt, 1)),
            Ok(true)
        );
        // Started on a corrupt WAL; refused without naming the file; exit code 0; killed.
        for wrong in [
            Response::Started {
                log: "ready".into(),
            },
            refused("metastore: error: something", 1),
            refused(&corrupt, 0),
        ] {
            assert!(
                judge(Damage::CorruptWalRecord, &wal, &wrong).is_err(),
                "{wrong:?}"
            );
        }
        let killed = Response::Refused {
            output: format!("exit: Some(ExitStatus(unix_wait_status(9))); {corrupt}"),
        };
        assert!(judge(Damage::CorruptWalRecord, &wal, &killed).is_err());

        let torn = format!(
            "WARN truncating torn WAL tail path={} offset=77",
            wal.display()
        );
        assert_eq!(
            judge(
                Damage::TornWalTail,
                &wal,
                &Response::Started { log: torn.clone() }
            ),
            Ok(false)
        );
        assert!(judge(
            Damage::TornWalTail,
            &wal,
            &Response::Started {
                log: "ready".into()
            }
        )
        .is_err());
        assert!(judge(Damage::TornWalTail, &wal, &refused(&torn, 1)).is_err());

        // A snapshot fallback must have renamed the file.
        let snap = dir.path().join("0000000000000002-0000000000000064.snap");
        std::fs::write(&snap, b"x").unwrap();
        let warned = Response::Started {
            log: format!("newest snapshot is damaged broken={}", snap.display()),
        };
        assert!(judge(Damage::CorruptSnapshot, &snap, &warned).is_err());
        std::fs::rename(&snap, snap.with_extension("snap.broken")).unwrap();
        assert_eq!(judge(Damage::CorruptSnapshot, &snap, &warned), Ok(false));

        let sst = dir.path().join("000012.sst");
        let corruption = format!(
            "Corruption: block checksum mismatch: file {}",
            sst.display()
        );
        assert_eq!(
            judge(Damage::CorruptSst, &sst, &refused(&corruption, 1)),
            Ok(true)
        );
        let stopped = |code: i32, log: &str| Response::StoppedAfterRead {
            status: std::process::ExitStatus::from_raw(code << 8),
            log: log.into(),
        };
        assert_eq!(
            judge(Damage::CorruptSst, &sst, &stopped(1, &corruption)),
            Ok(true)
        );
        assert!(judge(Damage::CorruptSst, &sst, &stopped(0, &corruption)).is_err());
        assert!(judge(Damage::CorruptSst, &sst, &stopped(1, "IO error")).is_err());
        assert!(judge(
            Damage::CorruptSst,
            &sst,
            &Response::ServedAfterRead { log: String::new() }
        )
        .is_err());
    }

    /// The WAL damage is what it says: a torn tail is half a record after the last one; a
    /// corrupt record keeps the length and changes a byte of an earlier record's body.
    #[test]
    fn wal_damage_hits_the_right_record() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join("member").join("wal");
        std::fs::create_dir_all(&wal).unwrap();
        let record = |body: &[u8]| {
            let mut r = (body.len() as u32).to_le_bytes().to_vec();
            r.extend([1, 2, 3, 4, 5, 6, 7, 8]);
            r.extend(body);
            r
        };
        let mut bytes = Vec::new();
        for i in 0..5u8 {
            bytes.extend(record(&[i + 1; 40]));
        }
        let seg = wal.join("0000000000000000-0000000000000001.wal");
        std::fs::write(&seg, &bytes).unwrap();
        assert_eq!(wal_records(&bytes).len(), 5);

        assert_eq!(
            apply(dir.path(), Damage::CorruptWalRecord),
            Some(seg.clone())
        );
        let damaged = std::fs::read(&seg).unwrap();
        let diff: Vec<usize> = (0..bytes.len())
            .filter(|i| bytes[*i] != damaged[*i])
            .collect();
        // The middle of the earlier records (0..4): record 2, body byte 20.
        assert_eq!(diff, vec![2 * 52 + 12 + 20]);

        std::fs::write(&seg, &bytes).unwrap();
        assert_eq!(apply(dir.path(), Damage::TornWalTail), Some(seg.clone()));
        let torn = std::fs::read(&seg).unwrap();
        // Every record kept, then half of one more.
        assert_eq!(torn.len(), 5 * 52 + 12 + 20);
        assert_eq!(&torn[..5 * 52], &bytes[..]);
        assert_eq!(&torn[5 * 52..], &bytes[4 * 52..4 * 52 + 12 + 20]);
        // No snapshot, no SST: nothing to damage.
        assert_eq!(apply(dir.path(), Damage::CorruptSnapshot), None);
        assert_eq!(apply(dir.path(), Damage::CorruptSst), None);
    }
}
