//! Logging set-up from etcd's logging flags: `--log-level` (or 3.4's `--debug`) and
//! `--log-outputs`. Everything, raft-rs included, goes through `tracing`.

use std::sync::Arc;

use tracing_subscriber::fmt::writer::{BoxMakeWriter, MakeWriterExt};

use crate::config::{Config, LogLevel};

/// The `tracing` level filter for `cfg`: `--debug` (etcd 3.4) raises it to debug.
pub fn level(cfg: &Config) -> &'static str {
    if cfg.debug {
        return "debug";
    }
    match cfg.log_level {
        LogLevel::Debug => "debug",
        LogLevel::Info => "info",
        LogLevel::Warn => "warn",
        LogLevel::Error | LogLevel::Panic | LogLevel::Fatal => "error",
    }
}

/// One writer for every `--log-outputs` target: `default` and `stderr` are standard error
/// (etcd's `default` means journald under systemd, stderr otherwise; journald captures a
/// service's stderr anyway), `stdout` is standard output, anything else a file opened for
/// appending (created if missing). A target listed twice is written once.
///
/// Errors: a file target cannot be opened.
pub fn writer(outputs: &[String]) -> Result<BoxMakeWriter, String> {
    let mut targets: Vec<&str> = Vec::new();
    for o in outputs.iter().map(|o| o.trim()).filter(|o| !o.is_empty()) {
        let o = if o == "default" { "stderr" } else { o };
        if !targets.contains(&o) {
            targets.push(o);
        }
    }
    if targets.is_empty() {
        targets.push("stderr");
    }
    let mut combined: Option<BoxMakeWriter> = None;
    for t in targets {
        let w = match t {
            "stderr" => BoxMakeWriter::new(std::io::stderr),
            "stdout" => BoxMakeWriter::new(std::io::stdout),
            path => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| format!("--log-outputs {path}: {e}"))?;
                // `&File` is `Write`: concurrent events append whole lines (O_APPEND).
                BoxMakeWriter::new(Arc::new(file))
            }
        };
        combined = Some(match combined {
            None => w,
            Some(acc) => BoxMakeWriter::new(acc.and(w)),
        });
    }
    Ok(combined.expect("at least one target"))
}

/// Installs the global subscriber for `cfg`; `METASTORE_LOG` (an `EnvFilter` directive)
/// overrides the level.
///
/// Errors: a `--log-outputs` file cannot be opened.
pub fn init(cfg: &Config) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("METASTORE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level(cfg)));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer(&cfg.log_outputs)?)
        .with_ansi(false)
        .init();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use tracing_subscriber::fmt::MakeWriter;

    #[test]
    fn file_targets_are_appended_to() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        std::fs::write(&path, "old\n").unwrap();
        let p = path.display().to_string();
        // Listed twice: written once.
        let w = writer(&[p.clone(), p]).unwrap();
        w.make_writer().write_all(b"new\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old\nnew\n");
        assert!(writer(&["/nonexistent/dir/x.log".into()]).is_err());
    }
}
