//! Member and cluster identity, computed as etcd computes it and kept in the data directory.

use std::fs;
use std::io::Write;
use std::path::Path;

use sha1::{Digest, Sha1};
use url::Url;

/// This member's identity.
#[derive(Clone, Debug)]
pub struct Member {
    /// Member ID (also the Raft node ID).
    pub id: u64,
    /// Cluster ID.
    pub cluster_id: u64,
    /// `--name`.
    pub name: String,
    /// Advertised peer URLs.
    pub peer_urls: Vec<String>,
    /// Advertised client URLs.
    pub client_urls: Vec<String>,
    /// When this start began, in microseconds since the Unix epoch: unique to this start of
    /// the data directory (proposal IDs and lease IDs are derived from it, so they never repeat
    /// those of an earlier start whose entries the log may still replay).
    pub boot_stamp: u64,
}

/// A URL as etcd prints it: `scheme://host:port`, no trailing slash.
pub fn url_string(u: &Url) -> String {
    let mut s = u.as_str().to_string();
    if u.path() == "/" && s.ends_with('/') {
        s.pop();
    }
    s
}

fn sha1_u64(bytes: &[u8]) -> u64 {
    let digest = Sha1::digest(bytes);
    u64::from_be_bytes(digest[..8].try_into().unwrap())
}

/// etcd `NewMember`: sha1 of the sorted peer URLs and the cluster token, first 8 bytes.
/// MemberAdd passes `""` and the current Unix time in seconds as the token (etcd
/// `computeMemberID` with an empty cluster name).
pub fn member_id(peer_urls: &[String], token: &str) -> u64 {
    let mut urls = peer_urls.to_vec();
    urls.sort();
    let mut b = urls.concat().into_bytes();
    b.extend_from_slice(token.as_bytes());
    sha1_u64(&b).max(1)
}

/// etcd `genID`: sha1 of the sorted member IDs, big-endian, first 8 bytes.
pub fn cluster_id(member_ids: &[u64]) -> u64 {
    let mut ids = member_ids.to_vec();
    ids.sort();
    let b: Vec<u8> = ids.iter().flat_map(|id| id.to_be_bytes()).collect();
    sha1_u64(&b)
}

/// Failures reading or writing the identity file.
#[derive(Debug, thiserror::Error)]
pub enum MemberError {
    /// The file cannot be read or written.
    #[error("member file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is damaged.
    #[error("member file {0} is malformed")]
    Malformed(String),
}

impl Member {
    /// Whether `member_dir` already holds an identity (this is not a first boot).
    pub fn exists(member_dir: &Path) -> bool {
        member_dir.join("identity").exists()
    }

    /// Loads the identity from `<member_dir>/identity`, or creates it on first boot from
    /// `identity` = (member ID, cluster ID).
    ///
    /// Only a first boot writes: a restart reads the file and nothing else, so a member whose
    /// disk is full still starts and serves reads.
    ///
    /// Errors: [`MemberError::Io`] when the file cannot be read (or, on first boot, written),
    /// [`MemberError::Malformed`] when it does not hold both IDs.
    pub fn load_or_create(
        member_dir: &Path,
        name: &str,
        peer_urls: Vec<String>,
        client_urls: Vec<String>,
        identity: (u64, u64),
    ) -> Result<Member, MemberError> {
        let path = member_dir.join("identity");
        let shown = path.display().to_string();
        let io = |source| MemberError::Io {
            path: shown.clone(),
            source,
        };
        let (id, cluster_id) = match fs::read_to_string(&path) {
            Ok(text) => {
                let field = |k: &str| {
                    text.lines()
                        .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
                        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                        .ok_or_else(|| MemberError::Malformed(shown.clone()))
                };
                (field("member_id")?, field("cluster_id")?)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let (id, cluster_id) = identity;
                let tmp = member_dir.join("identity.tmp");
                let mut f = fs::File::create(&tmp).map_err(io)?;
                write!(f, "member_id={id:x}\ncluster_id={cluster_id:x}\n").map_err(io)?;
                f.sync_all().map_err(io)?;
                fs::rename(&tmp, &path).map_err(io)?;
                fs::File::open(member_dir)
                    .and_then(|d| d.sync_all())
                    .map_err(io)?;
                (id, cluster_id)
            }
            Err(e) => return Err(io(e)),
        };
        Ok(Member {
            id,
            cluster_id,
            name: name.to_string(),
            peer_urls,
            client_urls,
            boot_stamp: boot_stamp(),
        })
    }
}

/// Microseconds since the Unix epoch, and never 0.
fn boot_stamp() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_stable_across_boots() {
        let dir = tempfile::tempdir().unwrap();
        let peers = vec!["http://localhost:2380".to_string()];
        let id = member_id(&peers, "etcd-cluster");
        let a = Member::load_or_create(dir.path(), "n", peers.clone(), vec![], (id, 7)).unwrap();
        let b = Member::load_or_create(dir.path(), "n", peers, vec![], (1, 1)).unwrap();
        assert_eq!((a.id, a.cluster_id), (b.id, b.cluster_id));
        assert_eq!((b.id, b.cluster_id), (id, 7), "a saved identity wins");
        assert!(b.boot_stamp >= a.boot_stamp && a.boot_stamp > 0);
        assert_ne!(
            member_id(&["http://a:1".into()], "t"),
            member_id(&["http://a:1".into()], "u")
        );
    }

    #[test]
    fn a_restart_writes_nothing() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let peers = vec!["http://localhost:2380".to_string()];
        Member::load_or_create(dir.path(), "n", peers.clone(), vec![], (5, 7)).unwrap();
        let path = dir.path().join("identity");
        let before = fs::metadata(&path).unwrap();
        // A file from before boot stamps (with a boot counter) still loads.
        fs::write(&path, "member_id=5\ncluster_id=7\nboot=3\n").unwrap();
        let before_ino = fs::metadata(&path).unwrap().ino();
        assert_eq!(before.ino(), before_ino, "rewritten in place by the test");
        let m = Member::load_or_create(dir.path(), "n", peers, vec![], (1, 1)).unwrap();
        assert_eq!((m.id, m.cluster_id), (5, 7));
        let after = fs::metadata(&path).unwrap();
        assert_eq!(after.ino(), before_ino, "the identity file was replaced");
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            "member_id=5\ncluster_id=7\nboot=3\n"
        );
    }
}
