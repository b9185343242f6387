//! Snapshot files: a point-in-time image of the state machine, so that the WAL before it can
//! be released (Raft paper, section 7, "Log compaction").
//!
//! File `<data-dir>/member/snap/<term:016x>-<index:016x>.snap`: a 4-byte magic, a little-endian
//! crc32 of the payload, then the payload (a `metastorepb.StateSnapshot`). Written to a
//! temporary file, fsynced and renamed, so a crash leaves either the old or the new snapshot.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use prost::Message;

use crate::proto::metastorepb::StateSnapshot;

const MAGIC: &[u8; 4] = b"MSS1";
/// Snapshots kept on disk; older ones are removed after a new one is saved.
const KEEP: usize = 2;

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

/// Saves and loads snapshots in one directory.
pub struct Snapshotter {
    dir: PathBuf,
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
        Ok(Snapshotter { dir })
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
        let payload = snap.encode_to_vec();
        let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(MAGIC).map_err(io(&tmp))?;
        f.write_all(&crc32fast::hash(&payload).to_le_bytes())
            .map_err(io(&tmp))?;
        f.write_all(&payload).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        fs::rename(&tmp, &path).map_err(io(&path))?;
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        let files = self.list()?;
        for old in files.iter().take(files.len().saturating_sub(KEEP)) {
            let _ = fs::remove_file(old);
        }
        Ok(())
    }

    /// Where the durable engines' checkpoints for the snapshot at (`term`, `index`) go: one
    /// subdirectory per shard.
    pub fn checkpoint_dir(&self, term: u64, index: u64) -> PathBuf {
        self.dir.join(format!("{term:016x}-{index:016x}.ckpt"))
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

    /// Loads the newest snapshot, if any.
    ///
    /// Errors: [`SnapshotError::Corrupt`] naming the file when it fails its checksum: the WAL
    /// before it may already be released, so falling back to an older one could lose writes.
    pub fn load_latest(&self) -> Result<Option<StateSnapshot>, SnapshotError> {
        let Some(path) = self.list()?.pop() else {
            return Ok(None);
        };
        let bytes = fs::read(&path).map_err(io(&path))?;
        if bytes.len() < 8 || &bytes[..4] != MAGIC {
            return Err(SnapshotError::Corrupt(path));
        }
        let crc = u32::from_le_bytes(bytes[4..8].try_into().unwrap());
        if crc32fast::hash(&bytes[8..]) != crc {
            return Err(SnapshotError::Corrupt(path));
        }
        StateSnapshot::decode(&bytes[8..])
            .map(Some)
            .map_err(|_| SnapshotError::Corrupt(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_and_keep_newest() {
        let dir = tempfile::tempdir().unwrap();
        let s = Snapshotter::new(dir.path().to_path_buf()).unwrap();
        assert!(s.load_latest().unwrap().is_none());
        for index in [10, 20, 30] {
            s.save(&StateSnapshot {
                index,
                term: 1,
                revision: index as i64,
                ..Default::default()
            })
            .unwrap();
        }
        assert_eq!(s.load_latest().unwrap().unwrap().index, 30);
        assert_eq!(s.list().unwrap().len(), KEEP);
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
        let err = s.load_latest().unwrap_err().to_string();
        assert!(err.contains(".snap") && err.contains("corrupt"), "{err}");
    }
}
