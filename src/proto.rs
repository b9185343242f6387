//! Code generated at build time from `proto/` by tonic/prost.
//!
//! The etcd packages keep etcd's names (`etcdserverpb`, `mvccpb`, `authpb`, `leasepb`, `v3lockpb`,
//! `v3electionpb`) so that the wire names match etcd 3.5 exactly. `metastorepb` is our own:
//! the Raft log payload, the snapshot image and the peer service.
#![allow(missing_docs, clippy::all, clippy::pedantic)]

pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}
pub mod authpb {
    tonic::include_proto!("authpb");
}
pub mod leasepb {
    tonic::include_proto!("leasepb");
}
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}
pub mod v3lockpb {
    tonic::include_proto!("v3lockpb");
}
pub mod v3electionpb {
    tonic::include_proto!("v3electionpb");
}
pub mod metastorepb {
    tonic::include_proto!("metastorepb");
}
