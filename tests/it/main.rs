//! Integration tests: real `metastore` processes driven by real clients (the `etcd-client`
//! crate and `etcdctl`).

mod harness;
mod smoke;
