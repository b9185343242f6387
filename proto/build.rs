//! Generates the etcd v3 API (server side) and MetaStore's own peer/log protos with tonic/prost,
//! and the etcd protos' JSON mapping (serde, with pbjson) for the JSON gateway.

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
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptors = out.join("descriptors.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptors)
        .build_server(true)
        .build_client(true)
        // tonic-prost's codec with etcd's error for txns nested too deep (src/server/codec.rs).
        .codec_path("crate::server::codec::EtcdCodec")
        .compile_protos(&protos, &["proto"])?;
    // serde impls with grpc-gateway's JSON mapping (`runtime.JSONPb{OrigName: true}`): proto
    // field names out, either name in; unknown fields ignored as the gateway's decoder does
    // (`AllowUnknownFields: true`). For the JSON gateway, src/server/gateway.rs.
    pbjson_build::Builder::new()
        .register_descriptors(&std::fs::read(&descriptors)?)?
        .preserve_proto_field_names()
        .ignore_unknown_fields()
        .build(&[
            ".etcdserverpb",
            ".mvccpb",
            ".authpb",
            ".v3lockpb",
            ".v3electionpb",
        ])?;
    Ok(())
}
