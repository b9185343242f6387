//! Logging set-up from etcd's logging flags: `--log-level` (or 3.4's `--debug`),
//! `--log-outputs`, `--logger` and `--log-format`. Everything, raft-rs included, goes through
//! `tracing`.
//!
//! Two formats, with the same messages:
//! * `json` (the default, as etcd 3.5's zap logger writes): one object per line,
//!   `{"level":"info","ts":"2026-11-29T22:24:48.763828Z","caller":"node/mod.rs:412",
//!   "msg":"ready to serve client requests", ...fields}`, fields named in etcd's kebab case
//!   (`member-id`). See etcd's `client/pkg/logutil/zap.go` (`DefaultZapLoggerConfig`).
//! * `console` (`--log-format console`, or 3.4's `--logger capnslog`): tracing's text lines.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::writer::{BoxMakeWriter, MakeWriterExt};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::{Config, LogLevel};

/// The `tracing` level for `cfg`: `--debug` (etcd 3.4) raises it to debug.
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

/// The `EnvFilter` directive for `cfg`: `level` for MetaStore's own lines and raft-rs's, and
/// at most `info` for the libraries underneath (`--log-level debug` would otherwise print
/// every HTTP/2 frame h2 and hyper handle).
pub fn filter_directive(cfg: &Config) -> String {
    let own = level(cfg);
    let deps = if own == "debug" { "info" } else { own };
    format!("{deps},metastore={own},raft={own}")
}

/// Whether lines are written as JSON: `--log-format json` (the default) with the `zap`
/// logger; `--log-format console` or `--logger capnslog` (etcd 3.4's text logger) give text.
pub fn json_format(cfg: &Config) -> bool {
    cfg.log_format == "json" && cfg.logger == "zap"
}

static JSON: AtomicBool = AtomicBool::new(false);

/// Whether the installed subscriber writes JSON (see [`json_format`]).
pub fn json_enabled() -> bool {
    JSON.load(Ordering::Relaxed)
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
/// overrides [`filter_directive`].
///
/// Errors: a `--log-outputs` file cannot be opened.
pub fn init(cfg: &Config) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("METASTORE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter_directive(cfg)));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer(&cfg.log_outputs)?)
        .with_ansi(false)
        // tracing-subscriber reports a failed write with `eprint!`, which panics when
        // standard error is a closed pipe, killing whichever thread logged (the Raft thread,
        // say). A lost log line must not stop the member.
        .log_internal_errors(false);
    if json_format(cfg) {
        JSON.store(true, Ordering::Relaxed);
        builder.event_format(ZapJson).init();
    } else {
        builder.init();
    }
    Ok(())
}

/// Formats events as etcd 3.5's zap JSON encoder does: `level`, `ts` (RFC 3339, UTC, µs),
/// `caller` (`dir/file.rs:line` under `src/`), `msg`, then the event's fields with `_` in
/// their names written as `-`. A `caller` field (raft-rs records carry raft-rs's own
/// location) replaces the event's location.
pub struct ZapJson;

impl<S, N> FormatEvent<S, N> for ZapJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        let mut fields = JsonFields::default();
        event.record(&mut fields);
        let level = match *meta.level() {
            tracing::Level::ERROR => "error",
            tracing::Level::WARN => "warn",
            tracing::Level::INFO => "info",
            tracing::Level::DEBUG | tracing::Level::TRACE => "debug",
        };
        let mut ts = String::new();
        tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(&mut ts))?;
        let caller = fields.caller.take().unwrap_or_else(|| {
            let file = meta.file().unwrap_or("?");
            let file = file.strip_prefix("src/").unwrap_or(file);
            format!("{file}:{}", meta.line().unwrap_or(0))
        });
        write!(
            writer,
            "{{\"level\":\"{level}\",\"ts\":{},\"caller\":{},\"msg\":{}{}}}",
            json_string(&ts),
            json_string(&caller),
            json_string(&fields.msg),
            fields.rest
        )?;
        writeln!(writer)
    }
}

/// One event's fields as JSON: the message apart, the rest as `,"key":value` pairs.
#[derive(Default)]
struct JsonFields {
    msg: String,
    caller: Option<String>,
    rest: String,
}

impl JsonFields {
    fn push(&mut self, field: &Field, json: &str) {
        let key = field.name().replace('_', "-");
        let _ = write!(self.rest, ",{}:{json}", json_string(&key));
    }
}

impl Visit for JsonFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.msg = value.to_string(),
            "caller" => self.caller = Some(value.to_string()),
            _ => self.push(field, &json_string(value)),
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.record_str(field, &format!("{value:?}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.push(field, &value.to_string());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.push(field, &value.to_string());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        let v = serde_json::Number::from_f64(value).map_or("null".into(), |n| n.to_string());
        self.push(field, &v);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.push(field, if value { "true" } else { "false" });
    }
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
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
