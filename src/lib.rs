//! MetaStore: an etcd v3 compatible key-value store.
//!
//! ```text
//! client --gRPC--> server (front end) --writes--> consensus: batching proposer -> raft-rs RawNode
//!                    |                                   -> WAL (crc32 records, one fsync per batch)
//!                    |                                   | committed entries, in log order
//!                    |                                   v   (state_machine::ApplyMsg)
//!                    |                      apply::Dispatcher: one revision per write, deterministic
//!                    |                                   | flume apply queue, per shard
//!                    +--reads (at an applied revision)-> shard 0 @core0 .. shard N @coreN
//!                                                        mvcc::Store over an engine (memory | RocksDB)
//! ```
//!
//! A write: validated ([`server::validate`]), encoded as a `metastorepb.Proposal`, batched with
//! whatever else is queued into one Raft entry, fsynced to the WAL, committed, and applied by the
//! dispatcher, which assigns its revision and sends its key operations to the owning shards. The
//! client gets its answer after every shard has passed the barrier behind it.
//!
//! A read: a ReadIndex (unless `serializable`), a wait until every shard has applied that index,
//! then a scatter to the shards at that revision and a merge in key order.
//!
//! Modules:
//! * [`config`]: flags and environment, etcd's names and defaults (imports no other module).
//! * [`identity`]: member and cluster IDs, as etcd computes them.
//! * [`node`]: one member's life: start-up and recovery, its threads and listeners, and the
//!   graceful stop (`Node::start`, `NodeHandle::shutdown`); the thread map is in its doc.
//! * [`server`]: the gRPC services (KV, Watch, Lease, Lock, Election, Maintenance, Cluster,
//!   Auth), one file each, the HTTP endpoints, and the narrow handles each service keeps (a
//!   proposer, a reader, access checks, leases, membership; made once in `server::Core`).
//! * [`consensus`]: the Raft node thread, the WAL and the peer transport (`PeerTransport`;
//!   `tests/consensus` runs three nodes over an in-memory one).
//! * [`state_machine`]: the boundary below consensus and apply (neither imports the other):
//!   committed entries, apply messages, snapshot files, the membership table, proposal waiters
//!   and the `StateMachine` trait.
//! * [`apply`]: the dispatcher that turns committed entries into revisions and shard work (the
//!   `StateMachine`).
//! * [`lease`]: the replicated lease table and leader-local deadlines.
//! * [`shard`]: shard executors (glommio, one per core) and their queues.
//! * [`mvcc`]: key history, the engine trait, the memory and RocksDB engines, range merging.
//! * [`error`]: etcd's exact gRPC statuses (per-request failures).
//! * [`failpoints`]: named crash points for the robustness tests (`--features failpoints`).
//! * [`fatal`]: the errors that stop a member, and the channel that carries them up.
//! * [`net`]: client and peer sockets (TCP or Unix, plain or TLS) and peer dialing.
//! * [`tls`]: certificates, verification and TLS settings for both ports.
//! * [`proto`]: generated etcd and MetaStore protos.
//! * [`backup`]: etcd-format snapshot files (Maintenance.Snapshot, `metastore snapshot restore`).
//! * [`auth`]: users, roles, permissions and tokens (the replicated auth store).
//! * [`logging`], [`metrics`]: etcd's log outputs; Prometheus metrics.
#![warn(missing_docs)]

pub mod apply;
pub mod auth;
pub mod backup;
pub mod config;
pub mod consensus;
pub mod error;
pub mod failpoints;
pub mod fatal;
/// Decoder fuzzing (the `fuzz/` targets and their CI replay); see the module doc.
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
pub mod lease;
pub mod logging;
pub mod metrics;
pub mod mvcc;
pub mod net;
pub mod node;
pub mod proto;
pub mod server;
pub mod shard;
pub mod state_machine;
pub mod tls;
pub mod version;
