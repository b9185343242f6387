//! Integration tests: real `metastore` processes driven by real clients (the `etcd-client`
//! crate and `etcdctl`).

mod abuse;
mod alarm;
mod auth;
mod check_perf;
mod cluster;
mod disk_full;
mod downgrade;
mod durability;
mod etcdctl;
mod flags;
mod force_new;
mod gateway;
#[path = "../common/harness.rs"]
mod harness;
mod http;
mod kv;
mod lease;
mod loadgen;
mod logging;
mod recipes;
mod rocksdb;
mod shutdown;
#[path = "../common/small_disk.rs"]
mod small_disk;
mod smoke;
mod snapshot;
mod tls;
mod txn;
mod util;
mod watch;
mod watch_checker;
