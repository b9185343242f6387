//! `metastore-loadgen`: see the library docs (`src/lib.rs`) and `--help`.

use std::io::Write;

use clap::Parser;
use metastore_loadgen::cli::Cli;
use tokio::sync::watch;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (stop_tx, stop) = watch::channel(false);
    // Ctrl-C stops the run; the partial report is still printed.
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            let _ = stop_tx.send(true);
        }
    });
    let report = metastore_loadgen::run(&cli, stop).await?;
    let text = metastore_loadgen::render(&report, &cli.global)?;
    std::io::stdout().lock().write_all(text.as_bytes())?;
    Ok(())
}
