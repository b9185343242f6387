//! The `metastore` binary: parses etcd-style flags and runs one member; `metastore snapshot
//! restore ...` builds a data directory from an etcd-format snapshot file instead.

/// jemalloc for every Rust allocation of the server (RocksDB's own C++ allocations stay with
/// glibc): measured against glibc malloc and mimalloc with `metastore-compare`, it cost the
/// least server CPU per request (put at 100 clients about 15 % less than glibc, txn-put about
/// 10 % less) at the same peak RSS; see bench/README.md, "Allocator".
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    // Fault-injection hooks (the `fail` crate), configured with FAILPOINTS; only in test
    // builds (`--features failpoints`).
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    // `metastore snapshot restore ...` (etcdctl's snapshot restore); every other command line
    // is etcd's server flags.
    let raw: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if raw.get(1).is_some_and(|a| a == "snapshot") {
        // Through anyhow so that `{:#}` prints the cause chain ("cannot read FILE: reason").
        if let Err(e) =
            metastore::backup::restore::main(raw[1..].to_vec()).map_err(anyhow::Error::from)
        {
            eprintln!("metastore: error: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    let args = match metastore::config::args_with_config_file(std::env::args_os().collect()) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("metastore: error: {e}");
            std::process::exit(2);
        }
    };
    let (cfg, warnings) = match metastore::config::parse_with_warnings(args) {
        Ok(parsed) => parsed,
        Err(e) => e.exit(),
    };
    if cfg.version {
        print!("{}", metastore::version::describe());
        return;
    }
    if let Err(e) = metastore::logging::init(&cfg) {
        eprintln!("metastore: error: {e}");
        std::process::exit(2);
    }
    // Logged once logging is up, so they reach every --log-outputs target.
    for w in &warnings {
        tracing::warn!("{w}");
    }

    let workers = 2
        .min(std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("grpc")
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = runtime.block_on(metastore::node::run(cfg)) {
        // anyhow prints the error with its causes: "what failed: why".
        eprintln!("metastore: error: {:#}", anyhow::Error::from(e));
        std::process::exit(1);
    }
    // After a graceful stop: tasks still running (peer connections, lease clock) are dropped,
    // and the exit does not wait long for blocking work still under way.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
}
