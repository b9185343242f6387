//! Snapshot files: a point-in-time image of the state machine, so that the WAL before it can
//! be released (Raft paper, section 7, "Log compaction").
//!
//! File `<data-dir>/member/snap/<term:016x>-<index:016x>.snap`: a 4-byte magic, a little-endian
//! crc32 of the payload, then the payload (a `metastorepb.StateSnapshot`). Written to a
//! temporary file, fsynced and renamed, so a crash leaves either the old or the new snapshot.
//!
//! The newest `--max-snapshots` snapshots (etcd's default 5, 0 = all) stay on disk, and the
//! WAL is released only up to the oldest of them, so a newest snapshot that fails to load is
//! not fatal (given two or more are kept): as etcd does (`snap/snapshotter.go`
//! `Load`, `renameBroken`), start-up renames it to `<name>.broken` and falls back to the next
//! newest, replaying the WAL after that one (see [`crate::consensus::recover_log`], which checks
//! that the WAL still holds every entry the broken snapshot covered).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use prost::Message;

use crate::proto::metastorepb::StateSnapshot;

const MAGIC: &[u8; 4] = b"MSS1";
/// Snapshots kept on disk by default (`--max-snapshots`); older ones are removed after a new
/// one is saved.
const KEEP: usize = crate::config::defaults::MAX_SNAPSHOTS;

/// Failures reading or writing snapshots.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// An I/O error on the named file.
    #[error("snapshot {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file failed its checksum or could not be decoded.
    #[error("snapshot {0}: corrupt (bad magic, checksum or encoding)")]
    Corrupt(PathBuf),
}

/// A snapshot file that failed its checksum or could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokenSnapshot {
    /// The file.
    pub path: PathBuf,
    /// Raft term of the entry it was taken at (from its name, which a damaged body leaves
    /// intact).
    pub term: u64,
    /// Raft index it was taken at (from its name).
    pub index: u64,
}

/// What [`Snapshotter::load_newest_available`] found.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The newest snapshot that loads, if any.
    pub snapshot: Option<StateSnapshot>,
    /// The snapshot files newer than it that failed to load, newest first.
    pub broken: Vec<BrokenSnapshot>,
}

/// (term, index) from a snapshot file name `<term:016x>-<index:016x>.snap`.
fn parse_name(path: &Path) -> Option<(u64, u64)> {
    let stem = path.file_name()?.to_str()?.strip_suffix(".snap")?;
    let (term, index) = stem.split_once('-')?;
    Some((
        u64::from_str_radix(term, 16).ok()?,
        u64::from_str_radix(index, 16).ok()?,
    ))
}

/// A snapshot file's bytes: magic, crc32 of the payload (little-endian), payload.
pub(crate) fn encode_file(snap: &StateSnapshot) -> Vec<u8> {
    let payload = snap.encode_to_vec();
    let mut out = Vec::with_capacity(8 + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Decodes a snapshot file's bytes; `None` when the magic, the checksum or the payload's
/// encoding is wrong.
pub(crate) fn decode_file(bytes: &[u8]) -> Option<StateSnapshot> {
    if bytes.len() < 8 || &bytes[..4] != MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes(bytes[4..8].try_into().unwrap());
    if crc32fast::hash(&bytes[8..]) != crc {
        return None;
    }
    StateSnapshot::decode(&bytes[8..]).ok()
}

/// Where the durable engines' checkpoints for the snapshot at (`term`, `index`) go, in the
/// snapshot directory `snap_dir`: one subdirectory per shard, which the shard creates.
pub fn checkpoint_dir(snap_dir: &Path, term: u64, index: u64) -> PathBuf {
    snap_dir.join(format!("{term:016x}-{index:016x}.ckpt"))
}

/// Saves and loads snapshots in one directory. Owned by the Raft node, the one writer of
/// snapshot files (start-up reads them, and renames damaged ones, before it starts).
#[derive(Clone)]
pub struct Snapshotter {
    dir: PathBuf,
    /// Snapshot files kept (0 = unlimited).
    keep: usize,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Snapshotter {
    /// Uses (and creates) `dir`.
    pub fn new(dir: PathBuf) -> Result<Self, SnapshotError> {
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(Snapshotter { dir, keep: KEEP })
    }

    /// Keeps the newest `keep` snapshot files (`--max-snapshots`; 0 = unlimited) instead of
    /// etcd's default 5.
    pub fn with_keep(mut self, keep: usize) -> Self {
        self.keep = keep;
        self
    }

    fn list(&self) -> Result<Vec<PathBuf>, SnapshotError> {
        let mut files: Vec<PathBuf> = fs::read_dir(&self.dir)
            .map_err(io(&self.dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "snap"))
            .collect();
        // Names are fixed-width hex of (term, index): lexical order is log order.
        files.sort();
        Ok(files)
    }

    /// Writes `snap` durably and removes all but the newest few snapshots.
    pub fn save(&self, snap: &StateSnapshot) -> Result<(), SnapshotError> {
        let name = format!("{:016x}-{:016x}.snap", snap.term, snap.index);
        let path = self.dir.join(&name);
        let tmp = self.dir.join(format!("{name}.tmp"));
        let write = || -> Result<(), SnapshotError> {
            let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(&encode_file(snap)).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
            fs::rename(&tmp, &path).map_err(io(&path))
        };
        if let Err(e) = write() {
            // A partial file (a full disk, say) would hold on to the space it took, and no
            // later save reuses its name: remove it, as etcd's snapshotter removes a snap file
            // it failed to write (`snap.Snapshotter.save`).
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        let files = self.list()?;
        let keep = if self.keep == 0 {
            files.len()
        } else {
            self.keep
        };
        for old in files.iter().take(files.len().saturating_sub(keep)) {
            let _ = fs::remove_file(old);
        }
        Ok(())
    }

    /// Where the durable engines' checkpoints for the snapshot at (`term`, `index`) go: one
    /// subdirectory per shard.
    pub fn checkpoint_dir(&self, term: u64, index: u64) -> PathBuf {
        checkpoint_dir(&self.dir, term, index)
    }

    /// Removes checkpoint directories older than the snapshot at (`term`, `index`).
    pub fn remove_checkpoints_before(&self, term: u64, index: u64) {
        let keep = self.checkpoint_dir(term, index);
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "ckpt") && p < keep {
                let _ = fs::remove_dir_all(&p);
            }
        }
    }

    /// Loads the newest snapshot that passes its checksum and decodes, if any, and lists the
    /// newer ones that do not (etcd `LoadNewestAvailable`). Nothing is renamed here: the
    /// caller first checks that the WAL can stand in for the broken ones, then calls
    /// [`Snapshotter::mark_broken`].
    ///
    /// Errors: [`SnapshotError::Io`] when the directory or a file cannot be read (an unreadable
    /// file is not known to be damaged, so it is not skipped).
    pub fn load_newest_available(&self) -> Result<Loaded, SnapshotError> {
        let mut loaded = Loaded::default();
        for path in self.list()?.into_iter().rev() {
            match Self::read(&path) {
                Ok(snap) => {
                    loaded.snapshot = Some(snap);
                    break;
                }
                Err(SnapshotError::Corrupt(path)) => {
                    let (term, index) = parse_name(&path).unwrap_or((u64::MAX, u64::MAX));
                    loaded.broken.push(BrokenSnapshot { path, term, index });
                }
                Err(e) => return Err(e),
            }
        }
        Ok(loaded)
    }

    /// Reads and checks one snapshot file.
    ///
    /// Errors: [`SnapshotError::Corrupt`] naming the file when its magic, checksum or encoding
    /// is wrong; [`SnapshotError::Io`] when it cannot be read.
    fn read(path: &Path) -> Result<StateSnapshot, SnapshotError> {
        let bytes = fs::read(path).map_err(io(path))?;
        decode_file(&bytes).ok_or_else(|| SnapshotError::Corrupt(path.to_path_buf()))
    }

    /// Renames a snapshot that failed to load to `<name>.broken` (etcd `renameBroken`), so the
    /// next start neither trips over it nor counts it among the snapshots kept; the file stays
    /// for inspection. Logs a warning naming it.
    ///
    /// Errors: [`SnapshotError::Io`] when the rename or the directory fsync fails.
    pub fn mark_broken(&self, broken: &BrokenSnapshot) -> Result<(), SnapshotError> {
        let mut name = broken.path.clone().into_os_string();
        name.push(".broken");
        let to = PathBuf::from(name);
        fs::rename(&broken.path, &to).map_err(io(&broken.path))?;
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        tracing::warn!(path = %broken.path.display(), renamed = %to.display(),
            "snapshot failed its checksum or did not decode; renamed, started from an older one");
        Ok(())
    }

    /// Raft index of the oldest snapshot file on disk (`None`: none, or the directory cannot
    /// be read). The WAL is released only up to it: if the newest snapshot turns out to be
    /// damaged at the next start, the WAL still reaches back to the one before.
    pub fn oldest_index(&self) -> Option<u64> {
        let oldest = self.list().ok()?.into_iter().next()?;
        parse_name(&oldest).map(|(_, index)| index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_and_keep_newest() {
        let dir = tempfile::tempdir().unwrap();
        let s = Snapshotter::new(dir.path().to_path_buf())
            .unwrap()
            .with_keep(2);
        assert!(s.load_newest_available().unwrap().snapshot.is_none());
        for index in [10, 20, 30] {
            s.save(&StateSnapshot {
                index,
                term: 1,
                revision: index as i64,
                ..Default::default()
            })
            .unwrap();
        }
        let loaded = s.load_newest_available().unwrap();
        assert_eq!(loaded.snapshot.unwrap().index, 30);
        assert!(loaded.broken.is_empty());
        assert_eq!(s.list().unwrap().len(), 2);
        assert_eq!(s.oldest_index(), Some(20));
    }

    #[test]
    fn max_snapshots_default_and_unlimited() {
        let save_all = |s: &Snapshotter| {
            for index in 1..=7 {
                s.save(&StateSnapshot {
                    index,
                    term: 1,
                    ..Default::default()
                })
                .unwrap();
            }
        };
        let dir = tempfile::tempdir().unwrap();
        let s = Snapshotter::new(dir.path().join("a")).unwrap();
        save_all(&s);
        assert_eq!(s.list().unwrap().len(), 5, "etcd's default --max-snapshots");
        assert_eq!(s.oldest_index(), Some(3));
        let s = Snapshotter::new(dir.path().join("b")).unwrap().with_keep(0);
        save_all(&s);
        assert_eq!(s.list().unwrap().len(), 7, "0 keeps every snapshot");
    }

    #[test]
    fn corrupt_snapshot_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let s = Snapshotter::new(dir.path().to_path_buf()).unwrap();
        s.save(&StateSnapshot {
            index: 5,
            term: 1,
            ..Default::default()
        })
        .unwrap();
        let path = s.list().unwrap().pop().unwrap();
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&path, bytes).unwrap();
        let loaded = s.load_newest_available().unwrap();
        assert!(loaded.snapshot.is_none());
        assert_eq!(
            loaded.broken,
            vec![BrokenSnapshot {
                path,
                term: 1,
                index: 5
            }]
        );
    }

    #[test]
    fn corrupt_newest_falls_back_to_the_older_and_is_renamed_broken() {
        let dir = tempfile::tempdir().unwrap();
        let s = Snapshotter::new(dir.path().to_path_buf()).unwrap();
        for index in [10, 20] {
            s.save(&StateSnapshot {
                index,
                term: 2,
                revision: index as i64,
                ..Default::default()
            })
            .unwrap();
        }
        let newest = s.list().unwrap().pop().unwrap();
        let mut bytes = fs::read(&newest).unwrap();
        bytes[9] ^= 0x01;
        fs::write(&newest, bytes).unwrap();

        let loaded = s.load_newest_available().unwrap();
        let older = loaded.snapshot.expect("the older snapshot loads");
        assert_eq!((older.index, older.revision), (10, 10));
        assert_eq!(loaded.broken.len(), 1);
        assert_eq!(loaded.broken[0].path, newest);
        assert_eq!((loaded.broken[0].term, loaded.broken[0].index), (2, 20));

        s.mark_broken(&loaded.broken[0]).unwrap();
        assert!(!newest.exists());
        let renamed = dir.path().join(format!(
            "{}.broken",
            newest.file_name().unwrap().to_str().unwrap()
        ));
        assert!(renamed.exists(), "{} exists", renamed.display());
        // The next start sees only the good one, and a new snapshot keeps it (KEEP counts
        // snapshots, not broken files).
        let loaded = s.load_newest_available().unwrap();
        assert_eq!(loaded.snapshot.unwrap().index, 10);
        assert!(loaded.broken.is_empty());
        s.save(&StateSnapshot {
            index: 30,
            term: 2,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.oldest_index(), Some(10));
        assert!(renamed.exists());
    }
}
