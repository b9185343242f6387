//! A small file system the test mounts (tmpfs), for a member whose disk fills up: shared by
//! `tests/it` (`disk_full.rs`) and `tests/robustness` (`disk.rs`), each including this file
//! as `#[path = "../common/small_disk.rs"] mod small_disk;`.
//!
//! Mounting needs root (CI runs as root); [`SmallDisk::mount`] returns `None` elsewhere and the
//! callers skip what needs it, saying so.

// Each target uses a different part of it.
#![allow(dead_code)]

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `ENOSPC`, "No space left on device".
pub const ENOSPC: i32 = 28;

/// A tmpfs of a few MiB mounted on a fresh temporary directory; unmounted when dropped (also
/// when the test panics), so nothing outlives the test.
pub struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    /// Mounts a tmpfs of `megabytes` MiB, or `None` when this process may not mount (not
    /// root).
    pub fn mount(megabytes: u64) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().expect("tempdir");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallDisk { dir })
    }

    /// The mount point.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Where a member's data directory goes: `data` under the mount point.
    pub fn path(&self) -> PathBuf {
        self.root().join("data")
    }

    fn filler(&self) -> PathBuf {
        self.root().join("filler")
    }

    /// Writes a filler file until the file system refuses (ENOSPC); returns the bytes
    /// written. Panics on any other error.
    pub fn fill(&self) -> u64 {
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.filler())
            .unwrap();
        let chunk = vec![0x5au8; 64 * 1024];
        let mut written = 0;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(ENOSPC), "expected ENOSPC, got {e}");
                    break;
                }
            }
        }
        // And the last few bytes a partial write may have left.
        while let Ok(n) = f.write(&[0x5a]) {
            if n == 0 {
                break;
            }
            written += 1;
        }
        written
    }

    /// Deletes the filler file: the space it held is free again.
    pub fn free(&self) {
        match fs::remove_file(self.filler()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("remove {}: {e}", self.filler().display()),
        }
    }

    /// Whether a one-byte file can no longer be written (the file system is full).
    pub fn is_full(&self) -> bool {
        let probe = self.root().join("probe");
        let full = fs::write(&probe, b"x").is_err();
        let _ = fs::remove_file(probe);
        full
    }
}

impl Drop for SmallDisk {
    /// Unmounts; lazily (`umount -l`) if a process still holds files there (a member the
    /// harness is still stopping), so that the mount never outlives the test.
    fn drop(&mut self) {
        let plain = Command::new("umount")
            .arg(self.root())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !plain {
            let _ = Command::new("umount").arg("-l").arg(self.root()).status();
        }
    }
}
