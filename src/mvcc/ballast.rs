//! A ballast: disk space a RocksDB data directory holds in reserve, so that a member whose disk
//! filled up can still restart.
//!
//! Opening a RocksDB database writes (a new MANIFEST, an OPTIONS file, a new log), so on a
//! full disk it fails, and the member could neither restart nor serve the reads it holds. The
//! ballast is a file of [`BALLAST_BYTES`] in `member/shards/` that exists only to be deleted:
//! when a start-up finds less free space than that, it deletes the ballast (with a warning),
//! and RocksDB opens in the space released. Once the operator has freed space, a later start
//! lays the ballast again. CockroachDB keeps an emergency ballast in each store for the same
//! reason. The memory engine needs none: its WAL segments are preallocated
//! (`consensus::wal`), and its restart writes nothing else.

use std::fs::{self, File};
use std::path::Path;

/// Size of the ballast, bytes: far more than opening the shards' databases writes (they
/// replay their logs into memory, `avoid_flush_during_recovery`, rather than into new files).
pub const BALLAST_BYTES: u64 = 64 << 20;

/// Bytes available to this process on the file system holding `dir` (`statvfs` `f_bavail`).
fn available_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is NUL-terminated and `stat` is written in full on success.
    let rc = unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled `stat`.
    let stat = unsafe { stat.assume_init() };
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// At start-up, before the shards' databases open: releases the ballast in `dir` when the disk
/// has less than [`BALLAST_BYTES`] free, or lays it when there is room for it twice over.
/// Never fails: a ballast that cannot be laid or measured is only a warning.
pub fn prepare(dir: &Path) {
    let path = dir.join("ballast");
    let available = match available_bytes(dir) {
        Ok(n) => n,
        Err(error) => {
            tracing::warn!(dir = %dir.display(), %error, "cannot measure free disk space");
            return;
        }
    };
    if path.exists() {
        if available < BALLAST_BYTES {
            match fs::remove_file(&path) {
                Ok(()) => tracing::warn!(path = %path.display(), available_bytes = available,
                    ballast_bytes = BALLAST_BYTES,
                    "disk nearly full: released the ballast so that this member can start; free \
                     space on this disk, and the next start lays the ballast again"),
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "cannot release the ballast")
                }
            }
        }
        return;
    }
    if available < 2 * BALLAST_BYTES {
        return;
    }
    if let Err(error) = lay(&path) {
        let _ = fs::remove_file(&path);
        tracing::warn!(path = %path.display(), %error, "cannot lay the disk-space ballast");
    }
}

/// Writes the ballast: real blocks (`fallocate`), so that deleting it gives them back.
fn lay(path: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let tmp = path.with_extension("tmp");
    let f = File::create(&tmp)?;
    // SAFETY: fallocate only reads its integer arguments; `f` keeps the descriptor open.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, BALLAST_BYTES as libc::off_t) };
    if rc != 0 {
        let error = std::io::Error::last_os_error();
        let _ = fs::remove_file(&tmp);
        return Err(error);
    }
    f.sync_all()?;
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn laid_when_there_is_room_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        if available_bytes(dir.path()).unwrap() < 2 * BALLAST_BYTES {
            eprintln!("skipped: less than twice the ballast free here");
            return;
        }
        prepare(dir.path());
        let meta = fs::metadata(dir.path().join("ballast")).unwrap();
        assert_eq!(meta.len(), BALLAST_BYTES);
        assert!(meta.blocks() * 512 >= BALLAST_BYTES, "blocks are allocated");
        let ino = meta.ino();
        prepare(dir.path());
        assert_eq!(fs::metadata(dir.path().join("ballast")).unwrap().ino(), ino);
    }
}
