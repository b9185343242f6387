//! The gRPC front end: the services and the handles they are built from. Start-up, listeners
//! and shutdown are the member's ([`crate::node`]).
//!
//! One file per etcd service (`kv.rs`, `watch/` with its shared feed, `lease.rs`,
//! `recipes.rs` for v3lock and v3election, `maintenance.rs`, `cluster.rs`, `auth.rs`, and
//! `peer.rs` for the members' own service), the HTTP endpoints (`http.rs`) and etcd's JSON
//! gateway (`gateway.rs`). Each service keeps only the narrow handles it needs ([`handles`]):
//! a [`Proposer`] (writes are validated, proposed through the Raft node and answered once
//! applied), a [`Reader`] (reads go straight to the shards at a revision every shard has
//! applied), [`Access`] (callers and permissions), [`Leases`] and
//! [`Members`]. [`Core`] is where start-up makes them.

pub mod auth;
pub(crate) mod cluster;
pub mod codec;
pub mod compactor;
pub(crate) mod corrupt;
pub mod gate;
pub mod gateway;
pub mod handles;
pub mod http;
pub mod keepalive;
pub(crate) mod kv;
pub(crate) mod lease;
pub(crate) mod maintenance;
pub mod peer;
pub(crate) mod recipes;
pub mod validate;
pub(crate) mod watch;

use std::sync::Arc;

use tokio::sync::watch as state_watch;

use crate::apply::alarms::SharedAlarms;
use crate::config::Config;
use crate::consensus::RaftHandle;
use crate::identity::Member;
use crate::lease::LeaseTable;
use crate::shard::ShardSet;
use crate::state_machine::{AppliedState, Pending};

pub use auth::Access;
pub use cluster::Members;
pub use handles::{Proposer, Reader};
pub use lease::Leases;

/// What [`Core::new`] is built from: the parts the member's start-up
/// ([`crate::node::Node::start`]) made.
pub struct CoreParts {
    /// Settings.
    pub cfg: Arc<Config>,
    /// This member.
    pub member: Member,
    /// The Raft node.
    pub node: RaftHandle,
    /// The shards' read queues.
    pub shards: ShardSet,
    /// The latest state every shard has applied.
    pub applied: state_watch::Receiver<AppliedState>,
    /// Granted leases and their deadlines.
    pub leases: LeaseTable,
    /// Waiters for this member's proposals (answered by the apply dispatcher).
    pub pending: Arc<Pending>,
    /// The replicated alarm table.
    pub alarms: SharedAlarms,
    /// The replicated auth store.
    pub auth: crate::auth::SharedAuth,
    /// The replicated downgrade state.
    pub downgrade: crate::apply::downgrade::SharedDowngrade,
    /// Each applied batch's watch events, from the dispatcher (see
    /// [`crate::apply::events`]).
    pub events: Arc<crate::apply::events::EventHandoff>,
}

/// The member's front-end handles, made once at start-up. Each service takes the handles it
/// needs from it ([`kv::KvService::new`] and the others) and keeps only those; the member's
/// own tasks (lease clock, compactor, corruption checks, shutdown) use it whole.
pub struct Core {
    /// Settings.
    pub cfg: Arc<Config>,
    /// This member.
    pub member: Member,
    /// The Raft node: its status, membership table and inbox.
    pub node: RaftHandle,
    /// Writes through Raft.
    pub proposer: Proposer,
    /// Reads of the applied state.
    pub reader: Reader,
    /// Who makes a request, and what they may do.
    pub access: Access,
    /// Lease grants, renewals and deadlines.
    pub leases: Leases,
    /// The membership table and the way to the leader.
    pub members: Members,
    /// The replicated alarm table (etcd's alarm store), as the dispatcher last applied it.
    pub alarms: SharedAlarms,
    /// The replicated downgrade state (etcd's `DowngradeInfo`), as the dispatcher last
    /// applied it.
    pub downgrade: crate::apply::downgrade::SharedDowngrade,
    /// Cancelled when the member begins to stop (the first SIGTERM/SIGINT, or its removal
    /// from the cluster; see [`crate::node::NodeHandle::shutdown`]): the client listeners
    /// stop accepting, and every open Watch and LeaseKeepAlive stream ends with "etcdserver:
    /// server stopped" ([`crate::error::EtcdError::Stopped`]), as etcd's `EtcdServer.Stop`
    /// ends its streams.
    pub stopping: tokio_util::sync::CancellationToken,
    /// The client requests being answered, which a stop waits for.
    pub in_flight: gate::InFlight,
    /// Each applied batch's events, read once and shared by every watch stream.
    pub watch_feed: Arc<watch::feed::EventFeed>,
}

impl Core {
    /// The front-end handles over the parts start-up made. Starts the watch feed's task, so it
    /// must run inside the member's tokio runtime.
    pub fn new(parts: CoreParts) -> Arc<Core> {
        let CoreParts {
            cfg,
            member,
            node,
            shards,
            applied,
            leases,
            pending,
            alarms,
            auth,
            downgrade,
            events,
        } = parts;
        let timeout = handles::request_timeout(cfg.election_timeout);
        let proposer = Proposer::new(handles::ProposerParts {
            member_id: member.id,
            // 4096 IDs per microsecond since the start before this one is more than any start
            // can use (the shift stays within 64 bits until the year 2112).
            first_id: member.boot_stamp << 12,
            node: node.tx.clone(),
            pending,
            max_request_bytes: cfg.max_request_bytes,
            request_timeout: timeout,
            alarms: alarms.clone(),
            shards: shards.clone(),
            quota_bytes: cfg.quota_bytes(),
        });
        let reader = Reader::new(
            member.cluster_id,
            member.id,
            node.clone(),
            applied,
            shards,
            timeout,
        );
        let access = Access::new(auth, reader.clone(), &cfg, timeout);
        let members = Members::new(
            member.clone(),
            node.clone(),
            proposer.clone(),
            reader.clone(),
            cfg.strict_reconfig_check,
            timeout,
        );
        let leases = Leases::new(
            leases,
            member.id ^ member.boot_stamp,
            proposer.clone(),
            reader.clone(),
            members.clone(),
        );
        let stopping = tokio_util::sync::CancellationToken::new();
        // Its task runs until the member stops (or its shards do).
        let watch_feed = watch::feed::EventFeed::spawn(reader.clone(), events, stopping.clone());
        Arc::new(Core {
            cfg,
            member,
            node,
            proposer,
            reader,
            access,
            leases,
            members,
            alarms,
            downgrade,
            stopping,
            in_flight: gate::InFlight::default(),
            watch_feed,
        })
    }

    /// etcd's request timeout (5 s plus two election timeouts): how long a request may wait
    /// for Raft.
    pub fn request_timeout(&self) -> std::time::Duration {
        handles::request_timeout(self.cfg.election_timeout)
    }
}
