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

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

use crate::backup::{read_db, split_checked};
use crate::consensus::snapshot::Snapshotter;
use crate::consensus::wal::Wal;
use crate::proto::metastorepb::{MemberRecord, StateSnapshot};
use crate::server::member::{cluster_id, member_id, Member};

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
pub fn main(args: Vec<std::ffi::OsString>) -> anyhow::Result<()> {
    let sub = args.get(1).and_then(|a| a.to_str()).unwrap_or("");
    match sub {
        "restore" => {
            let parsed = match RestoreArgs::try_parse_from(&args[1..]) {
                Ok(parsed) => parsed,
                Err(e) => e.exit(),
            };
            restore(&parsed)
        }
        _ => anyhow::bail!(
            "unknown snapshot subcommand {sub:?}; usage: metastore snapshot restore FILE \
             --data-dir DIR --name NAME --initial-cluster NAME=URL,... \
             --initial-cluster-token TOKEN --initial-advertise-peer-urls URL"
        ),
    }
}

/// Builds the data directory (see the module documentation).
///
/// Errors: the data directory exists ("data-dir ... exists", as etcdctl); the file cannot be
/// read, fails its hash check ("expected sha256 ..., got ..." / "snapshot missing hash but
/// --skip-hash-check=false") or is not an etcd backend database; `--initial-cluster` does not
/// parse or lacks `--name`; writing the directory fails.
pub fn restore(args: &RestoreArgs) -> anyhow::Result<()> {
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}.etcd", args.name)));
    anyhow::ensure!(
        !data_dir.exists(),
        "data-dir {:?} exists",
        data_dir.display().to_string()
    );
    let wal_dir = args
        .wal_dir
        .clone()
        .unwrap_or_else(|| data_dir.join("member").join("wal"));
    let members = initial_members(args)?;
    let me = members
        .iter()
        .find(|m| m.name == args.name)
        .with_context(|| {
            format!(
                "couldn't find local name {:?} in the initial cluster configuration",
                args.name
            )
        })?
        .clone();
    let ids: Vec<u64> = members.iter().map(|m| m.id).collect();
    let cluster = cluster_id(&ids);

    let file = std::fs::read(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let db = split_checked(&file, args.skip_hash_check)?;
    let imported = read_db(db).with_context(|| format!("{}", args.file.display()))?;

    let index = members.len() as u64;
    let snap = StateSnapshot {
        index,
        term: 1,
        voters: ids.clone(),
        learners: Vec::new(),
        members: members.clone(),
        removed: Vec::new(),
        complete: true,
        ..imported.state
    };

    let member_dir = data_dir.join("member");
    std::fs::create_dir_all(&member_dir)
        .with_context(|| format!("cannot create {}", member_dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o700));
    }
    Member::load_or_create(
        &member_dir,
        &me.name,
        me.peer_urls.clone(),
        Vec::new(),
        (me.id, cluster),
    )?;
    Snapshotter::new(member_dir.join("snap"))?.save(&snap)?;
    let (mut wal, _) = Wal::open(&wal_dir, index, true)?;
    let hs = raft::prelude::HardState {
        term: 1,
        commit: index,
        ..Default::default()
    };
    wal.append(&[], Some(&hs));
    wal.sync()?;
    println!(
        "restored snapshot {} (revision {}, {} keys) into {}: member {:x}, cluster {:x}",
        args.file.display(),
        snap.revision,
        snap.keys.len(),
        data_dir.display(),
        me.id,
        cluster
    );
    Ok(())
}

/// `--initial-cluster` as member records with etcd's IDs (sorted by ID).
fn initial_members(args: &RestoreArgs) -> anyhow::Result<Vec<MemberRecord>> {
    let normalize = |u: &str| -> anyhow::Result<String> {
        let url = url::Url::parse(u).with_context(|| format!("invalid URL {u:?}"))?;
        Ok(crate::server::member::url_string(&url))
    };
    let mut members: Vec<MemberRecord> = Vec::new();
    for part in args.initial_cluster.split(',').filter(|p| !p.is_empty()) {
        let (name, url) = part
            .split_once('=')
            .with_context(|| format!("--initial-cluster: {part:?} is not name=url"))?;
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
        .collect::<anyhow::Result<Vec<_>>>()?;
    advertised.sort();
    if let Some(me) = members.iter().find(|m| m.name == args.name) {
        let mut mine = me.peer_urls.clone();
        mine.sort();
        anyhow::ensure!(
            mine == advertised,
            "--initial-cluster has {}={} but --initial-advertise-peer-urls is {}",
            args.name,
            mine.join(","),
            advertised.join(",")
        );
    }
    Ok(members)
}
