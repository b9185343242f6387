//! A Jepsen-style robustness suite, after etcd's `tests/robustness`: real MetaStore processes
//! under process faults, concurrent KV traffic and watches, then a linearizability check of the
//! recorded history (Lowe's algorithm as porcupine implements it), watch validators and a
//! lost-write check. See `tests/robustness/README.md`.

mod disk;
#[cfg(feature = "failpoints")]
mod failpoint;
#[path = "../common/harness.rs"]
mod harness;
mod kubernetes;
mod linearizability;
mod links;
mod model;
#[path = "../common/small_disk.rs"]
mod small_disk;
mod traffic;
mod watch;
