//! The `metastore` binary: parses etcd-style flags and runs one member.

use clap::Parser;
use metastore::config::{Config, LogLevel};

fn main() {
    // Fault-injection hooks (the `fail` crate), configured with FAILPOINTS; inert otherwise.
    let _failpoints = fail::FailScenario::setup();
    let args = match metastore::config::args_with_config_file(std::env::args_os().collect()) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("metastore: error: {e}");
            std::process::exit(2);
        }
    };
    let cfg = Config::parse_from(args);
    let level = match cfg.log_level {
        LogLevel::Debug => "debug",
        LogLevel::Info => "info",
        LogLevel::Warn => "warn",
        LogLevel::Error | LogLevel::Panic | LogLevel::Fatal => "error",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("METASTORE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();

    let workers = 2
        .min(std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("grpc")
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = runtime.block_on(metastore::server::run(cfg)) {
        eprintln!("metastore: error: {e:#}");
        std::process::exit(1);
    }
}
