//! `metastore snapshot restore FILE ...`: a new member's data directory from an etcd-format
//! snapshot file, whether MetaStore's `Maintenance.Snapshot` or etcd's made it. The flags are
//! `etcdctl snapshot restore`'s (etcd 3.4 `etcdctl/ctlv3/command/snapshot_command.go`), with
//! its defaults.
//!
//! What it writes, for each member of `--initial-cluster` (run once per member, as etcdctl):
//! * `<data-dir>/member/identity`: the member and cluster IDs, computed from
//!   `--initial-cluster` and `--initial-cluster-token` as a new cluster's first boot does (and
//!   as etcd does: every member restored with the same flags agrees on them);
//! * a MetaStore Raft snapshot (`member/snap/*.snap`, complete, with every key's history,
//!   leases, the auth store and alarms from the file) at index = the number of members, term 1
//!   (etcdctl's choice: the index the restored WAL's bootstrap entries would reach);
//! * a WAL (`--wal-dir`, default `<data-dir>/member/wal`) holding only the hard state
//!   (term 1, commit = that index), as after a snapshot a leader sent.
//!
//! The member then starts with the usual flags (its `--initial-cluster-state` no longer
//! matters: the identity exists) and serves the snapshot's keys at their revisions; the
//! members' Raft logs continue from the snapshot and they elect a leader among themselves.

use std::path::{Path, PathBuf};

use clap::Parser;

use crate::backup::{read_db, split_checked, BackupError};
use crate::config::ConfigError;
use crate::consensus::wal::{Wal, WalError};
use crate::identity::{cluster_id, member_id, Member, MemberError};
use crate::proto::metastorepb::{MemberRecord, StateSnapshot};
use crate::state_machine::snapshot::{SnapshotError, Snapshotter};

/// Why `metastore snapshot restore` ([`restore`]) or the take-over of an etcd data directory
/// ([`adopt_etcd_data_dir`]) failed. A variant that wraps a cause prints as its own text;
/// `{:#}` adds ": cause".
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// `metastore snapshot` with a subcommand other than `restore`.
    #[error(
        "unknown snapshot subcommand {0:?}; usage: metastore snapshot restore FILE \
         --data-dir DIR --name NAME --initial-cluster NAME=URL,... \
         --initial-cluster-token TOKEN --initial-advertise-peer-urls URL"
    )]
    UnknownSubcommand(String),
    /// The data directory exists already (etcdctl's message; the path as text).
    #[error("data-dir {0:?} exists")]
    DataDirExists(String),
    /// `--name` is not in `--initial-cluster`.
    #[error("couldn't find local name {0:?} in the initial cluster configuration")]
    LocalNameNotFound(String),
    /// The snapshot file (or the etcd database) cannot be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The snapshot file fails its hash check.
    #[error(transparent)]
    Hash(#[from] BackupError),
    /// The file is not an etcd backend database, or it cannot be decoded (named by its path).
    #[error("{}", path.display())]
    Database {
        /// The file.
        path: PathBuf,
        /// Why.
        source: BackupError,
    },
    /// The member directory cannot be created.
    #[error("cannot create {}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The snapshot cannot be written.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The WAL cannot be written.
    #[error(transparent)]
    Wal(#[from] WalError),
    /// The member identity cannot be written.
    #[error(transparent)]
    Member(#[from] MemberError),
    /// `--initial-cluster` does not parse (taking over an etcd directory).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The etcd data directory's membership does not include this member.
    #[error("etcd data directory {}: member {name:?} is not in its cluster", dir.display())]
    NotInCluster {
        /// The data directory.
        dir: PathBuf,
        /// `--name`.
        name: String,
    },
    /// etcd's files cannot be moved aside.
    #[error("cannot move {} to {}", from.display(), to.display())]
    MoveAside {
        /// The file or directory.
        from: PathBuf,
        /// Where it was to go.
        to: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A peer URL that does not parse.
    #[error("invalid URL {url:?}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// Why.
        source: url::ParseError,
    },
    /// An `--initial-cluster` entry without `=`.
    #[error("--initial-cluster: {0:?} is not name=url")]
    NotNameUrl(String),
    /// This member's `--initial-cluster` URLs differ from `--initial-advertise-peer-urls`.
    #[error(
        "--initial-cluster has {name}={cluster} but --initial-advertise-peer-urls is {advertised}"
    )]
    AdvertiseMismatch {
        /// `--name`.
        name: String,
        /// Its URLs in `--initial-cluster`, comma-separated.
        cluster: String,
        /// `--initial-advertise-peer-urls`, comma-separated.
        advertised: String,
    },
}

/// `metastore snapshot restore` flags (etcdctl's names and defaults).
#[derive(Debug, Parser)]
#[command(
    name = "metastore snapshot restore",
    about = "Restores an etcd-format snapshot file into a new member data directory"
)]
pub struct RestoreArgs {
    /// The snapshot file (`etcdctl snapshot save` output, from etcd or MetaStore).
    pub file: PathBuf,
    /// Path to the data directory (default `<name>.etcd`); must not exist yet.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Path to the WAL directory (default `<data-dir>/member/wal`).
    #[arg(long)]
    pub wal_dir: Option<PathBuf>,
    /// Human-readable name for this member.
    #[arg(long, default_value = "default")]
    pub name: String,
    /// Initial cluster configuration for restore bootstrap (`name=peer-url,...`).
    #[arg(long, default_value = "default=http://localhost:2380")]
    pub initial_cluster: String,
    /// Initial cluster token for the cluster during restore bootstrap.
    #[arg(long, default_value = "etcd-cluster")]
    pub initial_cluster_token: String,
    /// This member's peer URLs to advertise to the rest of the cluster (comma-separated).
    #[arg(long, default_value = "http://localhost:2380")]
    pub initial_advertise_peer_urls: String,
    /// Ignore the snapshot's sha256 (needed for a file without one, such as a copied
    /// `member/snap/db`).
    #[arg(long)]
    pub skip_hash_check: bool,
}

/// Runs `metastore snapshot ...` with `args` (the words after `snapshot`, program name
/// first). Only `restore` exists.
///
/// Errors: unknown subcommand or bad flags (clap's message), and those of [`restore`].
pub fn main(args: Vec<std::ffi::OsString>) -> Result<(), RestoreError> {
    let sub = args.get(1).and_then(|a| a.to_str()).unwrap_or("");
    match sub {
        "restore" => {
            let parsed = match RestoreArgs::try_parse_from(&args[1..]) {
                Ok(parsed) => parsed,
                Err(e) => e.exit(),
            };
            restore(&parsed)
        }
        _ => Err(RestoreError::UnknownSubcommand(sub.to_string())),
    }
}

/// Builds the data directory (see the module documentation).
///
/// Errors: the data directory exists ("data-dir ... exists", as etcdctl); the file cannot be
/// read, fails its hash check ("expected sha256 ..., got ..." / "snapshot missing hash but
/// --skip-hash-check=false") or is not an etcd backend database; `--initial-cluster` does not
/// parse or lacks `--name`; writing the directory fails.
pub fn restore(args: &RestoreArgs) -> Result<(), RestoreError> {
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}.etcd", args.name)));
    if data_dir.exists() {
        return Err(RestoreError::DataDirExists(data_dir.display().to_string()));
    }
    let wal_dir = args
        .wal_dir
        .clone()
        .unwrap_or_else(|| data_dir.join("member").join("wal"));
    let members = initial_members(args)?;
    let me = members
        .iter()
        .find(|m| m.name == args.name)
        .ok_or_else(|| RestoreError::LocalNameNotFound(args.name.clone()))?
        .clone();
    let ids: Vec<u64> = members.iter().map(|m| m.id).collect();

    let file = std::fs::read(&args.file).map_err(|source| RestoreError::Read {
        path: args.file.clone(),
        source,
    })?;
    let db = split_checked(&file, args.skip_hash_check)?;
    let imported = read_db(db).map_err(|source| RestoreError::Database {
        path: args.file.clone(),
        source,
    })?;

    let index = members.len() as u64;
    let (revision, keys) = (imported.state.revision, imported.state.keys.len());
    write_member(
        &data_dir.join("member"),
        &wal_dir,
        &me,
        &members,
        imported.state,
        index,
        1,
    )?;
    println!(
        "restored snapshot {} (revision {revision}, {keys} keys) into {}: member {:x}, cluster {:x}",
        args.file.display(),
        data_dir.display(),
        me.id,
        cluster_id(&ids)
    );
    Ok(())
}

/// Writes a member directory whose state machine is `state` at Raft index `index`, term
/// `term`: the identity of `me` in the cluster `members`, a complete MetaStore snapshot, and
/// a WAL holding only the hard state (term, commit = `index`), the way a member looks after
/// installing a leader's snapshot.
///
/// Errors: a file cannot be written.
fn write_member(
    member_dir: &Path,
    wal_dir: &Path,
    me: &MemberRecord,
    members: &[MemberRecord],
    state: StateSnapshot,
    index: u64,
    term: u64,
) -> Result<(), RestoreError> {
    let ids: Vec<u64> = members.iter().map(|m| m.id).collect();
    let snap = StateSnapshot {
        index,
        term,
        voters: members
            .iter()
            .filter(|m| !m.is_learner)
            .map(|m| m.id)
            .collect(),
        learners: members
            .iter()
            .filter(|m| m.is_learner)
            .map(|m| m.id)
            .collect(),
        members: members.to_vec(),
        removed: Vec::new(),
        complete: true,
        ..state
    };
    std::fs::create_dir_all(member_dir).map_err(|source| RestoreError::CreateDir {
        path: member_dir.to_path_buf(),
        source,
    })?;
    #[cfg(unix)]
    if let Some(data_dir) = member_dir.parent() {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700));
    }
    Snapshotter::new(member_dir.join("snap"))?.save(&snap)?;
    let (mut wal, _) = Wal::open(wal_dir, index, true)?;
    let hs = raft::prelude::HardState {
        term,
        commit: index,
        ..Default::default()
    };
    wal.append(&[], Some(&hs));
    wal.sync()?;
    // Last: the identity marks the directory as a member's.
    Member::load_or_create(
        member_dir,
        &me.name,
        me.peer_urls.clone(),
        Vec::new(),
        (me.id, cluster_id(&ids)),
    )?;
    Ok(())
}

/// Whether `member_dir` holds an etcd member (etcd's backend `snap/db`) that MetaStore has not
/// taken over yet (no MetaStore identity), such as one `etcdctl snapshot restore` wrote.
pub fn is_etcd_member_dir(member_dir: &Path) -> bool {
    !Member::exists(member_dir) && member_dir.join("snap").join("db").is_file()
}

/// Takes over an etcd data directory at start-up, so that MetaStore can start where etcd
/// stopped, or from `etcdctl snapshot restore`'s output: the backend database
/// `member/snap/db` becomes MetaStore's first snapshot (keys and history, leases, auth
/// store, alarms) at its `consistent_index`, and etcd's files are moved aside to
/// `member.etcd` (and an outside `--wal-dir` to `<wal-dir>.etcd`), kept, not read again.
///
/// Membership: the database's `members` bucket when it lists this member (by name or peer
/// URLs); otherwise (etcd 3.4's `snapshot restore` empties it) `--initial-cluster` and
/// `--initial-cluster-token`, with etcd's member IDs, as `snapshot restore` computed them.
///
/// Entries etcd had in its WAL past the database's consistent index are not replayed (etcd's
/// WAL is not read): stop etcd cleanly first, as for any backup.
///
/// Errors: the database cannot be read or decoded; the membership does not include this
/// member; files cannot be moved or written.
pub fn adopt_etcd_data_dir(cfg: &crate::config::Config) -> Result<(), RestoreError> {
    let data_dir = cfg.data_dir();
    let member_dir = data_dir.join("member");
    let db_path = member_dir.join("snap").join("db");
    let db = std::fs::read(&db_path).map_err(|source| RestoreError::Read {
        path: db_path.clone(),
        source,
    })?;
    let imported = read_db(&db).map_err(|source| RestoreError::Database {
        path: db_path.clone(),
        source,
    })?;
    drop(db);

    let peer_urls: Vec<String> = {
        let mut v: Vec<String> = cfg
            .initial_advertise_peer_urls
            .iter()
            .map(crate::identity::url_string)
            .collect();
        v.sort();
        v
    };
    let same_urls = |m: &MemberRecord| {
        let mut u = m.peer_urls.clone();
        u.sort();
        u == peer_urls
    };
    let members = if imported
        .members
        .iter()
        .any(|m| m.name == cfg.name || same_urls(m))
    {
        imported.members.clone()
    } else {
        let mut members: Vec<MemberRecord> = cfg
            .initial_members()?
            .into_iter()
            .map(|(name, urls)| {
                let urls: Vec<String> = urls.iter().map(crate::identity::url_string).collect();
                MemberRecord {
                    id: member_id(&urls, &cfg.initial_cluster_token),
                    name,
                    peer_urls: urls,
                    ..Default::default()
                }
            })
            .collect();
        members.sort_by_key(|m| m.id);
        members
    };
    let me = members
        .iter()
        .find(|m| m.name == cfg.name)
        .or_else(|| members.iter().find(|m| same_urls(m)))
        .ok_or_else(|| RestoreError::NotInCluster {
            dir: data_dir.clone(),
            name: cfg.name.clone(),
        })?
        .clone();

    let aside = |path: &Path| -> Result<PathBuf, RestoreError> {
        let mut to = PathBuf::from(format!("{}.etcd", path.display()));
        let mut n = 1;
        while to.exists() {
            to = PathBuf::from(format!("{}.etcd.{n}", path.display()));
            n += 1;
        }
        match std::fs::rename(path, &to) {
            Ok(()) => Ok(to),
            Err(source) => Err(RestoreError::MoveAside {
                from: path.to_path_buf(),
                to,
                source,
            }),
        }
    };
    let wal_dir = cfg.wal_dir();
    if !wal_dir.starts_with(&member_dir) && wal_dir.exists() {
        aside(&wal_dir)?;
    }
    let kept = aside(&member_dir)?;
    // etcd 3.4's restore leaves the consistent index at the member count (its bootstrap
    // entries); etcd 3.5 also records the term.
    let index = imported.state.index.max(members.len() as u64).max(1);
    let term = imported.state.term.max(1);
    let (revision, keys) = (imported.state.revision, imported.state.keys.len());
    write_member(
        &member_dir,
        &wal_dir,
        &me,
        &members,
        imported.state,
        index,
        term,
    )?;
    tracing::warn!(etcd_files = %kept.display(), index, revision, keys,
        member_id = %format!("{:x}", me.id),
        "took over an etcd data directory: started from its backend database");
    Ok(())
}

/// `--initial-cluster` as member records with etcd's IDs (sorted by ID).
fn initial_members(args: &RestoreArgs) -> Result<Vec<MemberRecord>, RestoreError> {
    let normalize = |u: &str| -> Result<String, RestoreError> {
        let url = url::Url::parse(u).map_err(|source| RestoreError::InvalidUrl {
            url: u.to_string(),
            source,
        })?;
        Ok(crate::identity::url_string(&url))
    };
    let mut members: Vec<MemberRecord> = Vec::new();
    for part in args.initial_cluster.split(',').filter(|p| !p.is_empty()) {
        let (name, url) = part
            .split_once('=')
            .ok_or_else(|| RestoreError::NotNameUrl(part.to_string()))?;
        let url = normalize(url)?;
        match members.iter_mut().find(|m| m.name == name) {
            Some(m) => m.peer_urls.push(url),
            None => members.push(MemberRecord {
                name: name.to_string(),
                peer_urls: vec![url],
                ..Default::default()
            }),
        }
    }
    for m in &mut members {
        m.id = member_id(&m.peer_urls, &args.initial_cluster_token);
    }
    members.sort_by_key(|m| m.id);
    // etcdctl checks that this member's advertised URLs match its --initial-cluster entry.
    let mut advertised = args
        .initial_advertise_peer_urls
        .split(',')
        .filter(|u| !u.is_empty())
        .map(normalize)
        .collect::<Result<Vec<_>, _>>()?;
    advertised.sort();
    if let Some(me) = members.iter().find(|m| m.name == args.name) {
        let mut mine = me.peer_urls.clone();
        mine.sort();
        if mine != advertised {
            return Err(RestoreError::AdvertiseMismatch {
                name: args.name.clone(),
                cluster: mine.join(","),
                advertised: advertised.join(","),
            });
        }
    }
    Ok(members)
}
