//! Code generated at build time from `proto/` by tonic/prost.
//!
//! The etcd packages keep etcd's names (`etcdserverpb`, `mvccpb`, `authpb`, `leasepb`, `v3lockpb`,
//! `v3electionpb`) so that the wire names match etcd 3.5 exactly. `metastorepb` is our own:
//! the Raft log payload, the snapshot image and the peer service. The etcd packages also get
//! serde impls in grpc-gateway's JSON mapping (pbjson; see `proto/build.rs`).
#![allow(missing_docs, clippy::all, clippy::pedantic)]

pub mod mvccpb {
    tonic::include_proto!("mvccpb");
    include!(concat!(env!("OUT_DIR"), "/mvccpb.serde.rs"));
}
pub mod authpb {
    tonic::include_proto!("authpb");
    include!(concat!(env!("OUT_DIR"), "/authpb.serde.rs"));
}
pub mod leasepb {
    tonic::include_proto!("leasepb");
}
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
    include!(concat!(env!("OUT_DIR"), "/etcdserverpb.serde.rs"));
}
pub mod v3lockpb {
    tonic::include_proto!("v3lockpb");
    include!(concat!(env!("OUT_DIR"), "/v3lockpb.serde.rs"));
}
pub mod v3electionpb {
    tonic::include_proto!("v3electionpb");
    include!(concat!(env!("OUT_DIR"), "/v3electionpb.serde.rs"));
}
pub mod metastorepb {
    tonic::include_proto!("metastorepb");
}
