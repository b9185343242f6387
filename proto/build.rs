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
    build_info();
    Ok(())
}

/// `metastore --version`'s build facts, as environment variables for `env!`:
/// `METASTORE_GIT_SHA` (short commit, or etcd's "Not provided" wording outside a Git
/// checkout) and `METASTORE_RUSTC_VERSION` (the compiler's `rustc --version`).
fn build_info() {
    let run = |cmd: &str, args: &[&str]| -> Option<String> {
        let out = std::process::Command::new(cmd).args(args).output().ok()?;
        let text = String::from_utf8(out.stdout).ok()?;
        (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_string())
    };
    let sha = run("git", &["rev-parse", "--short", "HEAD"])
        .unwrap_or_else(|| "Not provided (built outside a Git checkout)".into());
    println!("cargo:rustc-env=METASTORE_GIT_SHA={sha}");
    // A branch switch (HEAD) or a new commit (a file under refs/heads, or packed-refs) reruns
    // this script, so the SHA is never stale. Only paths that exist are named: cargo reruns
    // the script, and rebuilds the crate, on every build while a named path is missing.
    for reference in ["HEAD", "refs/heads", "packed-refs"] {
        if let Some(path) = run("git", &["rev-parse", "--git-path", reference]) {
            if std::path::Path::new(&path).exists() {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = run(&rustc, &["--version"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=METASTORE_RUSTC_VERSION={version}");
}
