//! Generates the etcd v3 API (server side) and MetaStore's own peer/log protos with tonic/prost.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/etcdserverpb/rpc.proto",
        "proto/mvccpb/kv.proto",
        "proto/authpb/auth.proto",
        "proto/leasepb/lease.proto",
        "proto/v3lockpb/v3lock.proto",
        "proto/v3electionpb/v3election.proto",
        "proto/metastorepb/metastore.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // tonic-prost's codec with etcd's error for txns nested too deep (src/server/codec.rs).
        .codec_path("crate::server::codec::EtcdCodec")
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}
