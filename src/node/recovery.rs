//! Start-up and recovery: the data directory, this member's identity, the engines and where
//! the state machine resumes (snapshot, shards on disk, WAL).

use std::path::Path;
use std::sync::Arc;

use super::NodeError;
use crate::apply::StartState;
use crate::config::{ClusterState, Config};
use crate::consensus::RecoveredLog;
use crate::identity as member;
use crate::proto::metastorepb::{MemberRecord, StateSnapshot};
use crate::server::peer;
use crate::shard::{ApplyCmd, EngineConfig, EngineKind, ShardSet, Shards};
use crate::state_machine::snapshot::Snapshotter;

/// Creates `<dir>/member` and locks it for this process.
///
/// Errors: the directory cannot be created or written, or another process holds the lock.
pub(super) fn prepare_data_dir(dir: &Path) -> Result<std::fs::File, NodeError> {
    let member_dir = dir.join("member");
    std::fs::create_dir_all(&member_dir).map_err(NodeError::io(format!(
        "cannot access data directory {}",
        dir.display()
    )))?;
    let lock_path = member_dir.join("lock");
    let lock = std::fs::File::create(&lock_path).map_err(NodeError::io(format!(
        "cannot write to data directory {}",
        dir.display()
    )))?;
    lock.try_lock().map_err(|_| {
        NodeError::DataDir(format!(
            "data directory {} is in use by another process",
            dir.display()
        ))
    })?;
    Ok(lock)
}

/// The engine configuration. A RocksDB data dir records its shard count, because keys are
/// placed by `shard_for(key, count)`: reopening with another count would misplace them. The
/// count file also marks the data dir as initialised: without it the shards' databases are
/// created (see [`record_shard_count`]); with it, a missing shard database is an error.
pub(super) fn engine_config(
    cfg: &Config,
    member_dir: &Path,
    member_id: u64,
) -> Result<EngineConfig, NodeError> {
    let dir = member_dir.join("shards");
    let mut create = false;
    if cfg.storage_engine == EngineKind::Rocksdb {
        std::fs::create_dir_all(&dir)
            .map_err(NodeError::io(format!("cannot create {}", dir.display())))?;
        crate::mvcc::ballast::prepare(&dir);
        let count_file = dir.join("count");
        let count = cfg.shard_count();
        match std::fs::read_to_string(&count_file) {
            Ok(text) => {
                let existing: usize = text.trim().parse().map_err(|e| {
                    NodeError::DataDir(format!("malformed {}: {e}", count_file.display()))
                })?;
                if existing != count {
                    return Err(NodeError::DataDir(format!(
                        "the RocksDB data in {} was written with --shards {existing}; start with --shards {existing}",
                        dir.display()
                    )));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => create = true,
            Err(e) => {
                return Err(NodeError::io(format!(
                    "cannot read {}",
                    count_file.display()
                ))(e))
            }
        }
    }
    Ok(EngineConfig {
        kind: cfg.storage_engine,
        dir,
        rocks: cfg.rocks_options(),
        member_id,
        create,
    })
}

/// Writes the shard count of a RocksDB data dir being initialised, once every shard database
/// exists (so a start-up that stops before that simply initialises again).
///
/// Errors: the count file cannot be written.
pub(super) fn record_shard_count(engine: &EngineConfig, count: usize) -> Result<(), NodeError> {
    if engine.kind != EngineKind::Rocksdb || !engine.create {
        return Ok(());
    }
    let count_file = engine.dir.join("count");
    std::fs::write(&count_file, count.to_string()).map_err(NodeError::io(format!(
        "cannot write {}",
        count_file.display()
    )))
}

/// Where the state machine resumes. Memory engine: the snapshot (the dispatcher loads its
/// keys into the shards before anything else). RocksDB: the lowest applied index any shard
/// has on disk, with the dispatcher state stored beside it; shards that are further ahead skip
/// the entries they already hold. A complete snapshot newer than that (one a leader sent,
/// whose installation a crash interrupted) is installed again from the start.
///
/// `log_last_index` is the last Raft index the snapshot and the WAL hold.
///
/// Errors (RocksDB): a shard whose applied index is below the snapshot index (the entries it
/// lacks are no longer in the WAL: its data is stale or was replaced) or more than one entry
/// above `log_last_index` (it holds writes the log does not know). Either way the shard's
/// directory does not belong with this log, and serving from it would lose acknowledged writes.
pub(super) async fn recover_start(
    shards: &ShardSet,
    engine: &EngineConfig,
    snap: Option<&StateSnapshot>,
    log_last_index: u64,
) -> Result<StartState, NodeError> {
    let snapshot_index = snap.map_or(0, |s| s.index);
    let from_snapshot = |s: &StateSnapshot| StartState {
        index: s.index,
        term: s.term,
        revision: s.revision,
        compact_revision: s.compact_revision,
        leases: s.leases.clone(),
        snapshot_index,
        replay_until: 0,
        durable: engine.kind != EngineKind::Memory,
        membership: Default::default(),
        restore: Some(Arc::new(s.clone())),
        alarms: s.alarms.clone(),
        auth: s.auth.clone(),
        downgrade: s.downgrade.clone(),
        alarm_index: s.index,
    };
    if engine.kind == EngineKind::Memory {
        return Ok(snap.map(from_snapshot).unwrap_or_default());
    }
    let mut states = Vec::new();
    for i in 0..shards.len() {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let _ = shards.get(i).apply.send(ApplyCmd::Recover { reply });
        // A shard that stopped (its engine failed and reported it, or it panicked) has no
        // state to give: not the same as an empty one, which would be replayed from index 0.
        let state = rx.await.map_err(|_| {
            NodeError::DataDir(format!(
                "shard {i} stopped before it reported its recovered state"
            ))
        })?;
        states.push(state);
    }
    let applied: Vec<u64> = states
        .iter()
        .map(|s| s.as_ref().map_or(0, |s| s.applied_index))
        .collect();
    let replay_until = applied.iter().copied().max().unwrap_or(0);
    let lowest = states
        .into_iter()
        .min_by_key(|s| s.as_ref().map_or(0, |s| s.applied_index))
        .flatten();
    let lowest_index = lowest.as_ref().map_or(0, |r| r.applied_index);
    if let Some(s) = snap.filter(|s| s.complete && s.index > lowest_index) {
        tracing::info!(
            index = s.index,
            "installing the snapshot received from the leader"
        );
        // Every shard is emptied and loaded from the snapshot: what they held does not matter.
        return Ok(from_snapshot(s));
    }
    for (shard, &index) in applied.iter().enumerate() {
        let dir = engine.dir.join(shard.to_string());
        if index < snapshot_index {
            return Err(NodeError::DataDir(format!(            "shard directory {} has applied Raft entries only up to index {index}, but the log \
             starts after the snapshot at index {snapshot_index}: the entries it lacks are gone \
             (its data is stale or was replaced); restore the data directory from a backup, or \
             remove this member and add it again with an empty data directory",
            dir.display())));
        }
        // One entry of slack: the WAL truncates a torn final record at start-up, and if that
        // record was an entry the shards had applied (a disk that lost part of an fsynced
        // write), they are one entry ahead. That entry was committed, so nothing is lost by
        // skipping the entry the log gets at its index again: in a cluster the leader sends
        // the same committed entry, and a lone member's next entry is its new term's empty
        // one. Further ahead, the shard holds writes the log never had.
        if index > log_last_index + 1 {
            return Err(NodeError::DataDir(format!(
                "shard directory {} has applied Raft entries up to index {index}, past the last \
             index {log_last_index} of the WAL and snapshot: it holds writes the log does not \
             know (it belongs to another data directory, or the WAL lost entries)",
                dir.display()
            )));
        }
    }
    // The alarm table is only in snapshots and the log: it starts from the snapshot the WAL
    // follows, whatever the shards hold, and the dispatcher replays the alarm requests after it.
    let alarms = snap.map(|s| s.alarms.clone()).unwrap_or_default();
    // So is the auth store.
    let auth = snap.and_then(|s| s.auth.clone());
    // And the downgrade state.
    let downgrade = snap.and_then(|s| s.downgrade.clone());
    Ok(match lowest {
        Some(r) => StartState {
            index: r.applied_index,
            term: r.applied_term,
            revision: r.revision,
            compact_revision: r.compact_revision,
            leases: r.leases,
            snapshot_index,
            replay_until,
            durable: true,
            membership: Default::default(),
            restore: None,
            alarms,
            auth,
            downgrade,
            alarm_index: snapshot_index,
        },
        None => StartState {
            snapshot_index,
            replay_until,
            durable: true,
            alarms,
            auth,
            downgrade,
            alarm_index: snapshot_index,
            ..Default::default()
        },
    })
}

/// This member's identity on its first boot: from `--initial-cluster` for a new cluster (IDs
/// computed as etcd computes them), or from the cluster itself when joining (the ID MemberAdd
/// minted for this member's peer URLs).
///
/// Returns (member ID, cluster ID, the cluster's members when joining).
///
/// Errors: the cluster cannot be reached, or does not list this member's peer URLs.
pub(super) async fn first_boot_identity(
    cfg: &Config,
    initial: &[MemberRecord],
    peer_urls: &[String],
) -> Result<(u64, u64, Vec<MemberRecord>), NodeError> {
    if cfg.initial_cluster_state == ClusterState::New {
        let me = initial
            .iter()
            .find(|m| m.name == cfg.name)
            .expect("validate checks the local name");
        let ids: Vec<u64> = initial.iter().map(|m| m.id).collect();
        return Ok((me.id, member::cluster_id(&ids), Vec::new()));
    }
    let others: Vec<String> = initial
        .iter()
        .filter(|m| m.name != cfg.name)
        .flat_map(|m| m.peer_urls.clone())
        .collect();
    let (cluster_id, members) = peer::fetch_members(&others).await?;
    let mut mine = peer_urls.to_vec();
    mine.sort();
    let me = members.iter().find(|m| {
        let mut urls = m.peer_urls.clone();
        urls.sort();
        urls == mine
    });
    match me {
        Some(m) => Ok((m.id, cluster_id, members.clone())),
        None => Err(NodeError::Join(format!(
            "cannot join the cluster: no member has peer URLs {}; add this member first \
             (etcdctl member add {} --peer-urls={})",
            mine.join(","),
            cfg.name,
            mine.join(",")
        ))),
    }
}

/// Where the state machine resumes ([`recover_start`]) once the shards are up, after
/// recording a new RocksDB data dir's shard count. Snapshots that failed to load are renamed
/// `.broken` only once the start state is known not to need them.
///
/// Errors: those of [`recover_start`] and [`record_shard_count`]; a broken newest snapshot
/// that cannot be skipped (durable shards below the older snapshot the WAL starts from).
pub(super) async fn resume(
    shards: &Shards,
    engine: &EngineConfig,
    snapshotter: &Snapshotter,
    log: &RecoveredLog,
) -> Result<StartState, NodeError> {
    let snap = log.snapshot.as_ref();
    let snapshot_index = snap.map_or(0, |s| s.index);
    let log_last_index = log
        .recovered
        .entries
        .last()
        .map_or(snapshot_index, |e| e.index);
    record_shard_count(engine, shards.set.len())?;
    let start = recover_start(&shards.set, engine, snap, log_last_index).await?;
    if let Some(newest) = log.broken.first() {
        // Durable shards resume from their own applied index, and the WAL only reaches back to
        // the older snapshot: shards below it (emptied by an interrupted install of a leader's
        // snapshot, say) would skip entries nobody can replay.
        if start.restore.is_none() && start.index < snapshot_index {
            return Err(NodeError::DataDir(format!(            "snapshot {} is corrupt and cannot be skipped: the shards hold only up to index {}, \
             below the older snapshot at index {snapshot_index} the WAL starts from",
            newest.path.display(),
            start.index)));
        }
        for b in &log.broken {
            snapshotter.mark_broken(b)?;
        }
    }
    Ok(start)
}
