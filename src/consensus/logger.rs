//! Routes raft-rs's slog records into `tracing`, so one `--log-level` governs both.
//!
//! raft-rs prints member IDs in decimal and configurations as Rust debug dumps
//! (`Configuration { voters: Configuration { incoming: ... } }`). The records are rewritten
//! here the way etcd prints them: member IDs in hexadecimal (`8e9e05c52164694d`), also inside
//! the message text, and configurations as `voters=[...] learners=[...]`.

use slog::{Drain, Level, OwnedKVList, Record, KV};

/// Keys whose values raft-rs logs as member IDs.
const ID_KEYS: &[&str] = &["raft_id", "id", "from", "to", "vote", "leader_id", "lead"];

/// Keys whose values are raft-rs configuration dumps (`Configuration`, `JointConfig`).
const CONFIG_KEYS: &[&str] = &["config", "peers"];

struct TracingDrain;

/// Collects a record's key-value pairs as ` k=v` text, and the member IDs among them.
#[derive(Default)]
struct Collect {
    text: String,
    /// Decimal member IDs seen, to rewrite in the message too.
    ids: Vec<u64>,
}

impl slog::Serializer for Collect {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments<'_>) -> slog::Result {
        use std::fmt::Write;
        let val = val.to_string();
        let val = if ID_KEYS.contains(&key) {
            match val.parse::<u64>() {
                Ok(id) => {
                    self.ids.push(id);
                    format!("{id:x}")
                }
                // `to` is sometimes a list of IDs (`to=[1, 2]`).
                Err(_) => hex_numbers(&val),
            }
        } else if CONFIG_KEYS.contains(&key) {
            readable_config(&val)
        } else {
            val
        };
        // Repeated context keys (raft_id is in the logger's values and sometimes the record's).
        let pair = format!(" {key}={val}");
        if !self.text.contains(&pair) {
            let _ = write!(self.text, "{pair}");
        }
        Ok(())
    }
}

impl Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record<'_>, values: &OwnedKVList) -> Result<(), slog::Never> {
        let mut kv = Collect::default();
        let _ = record.kv().serialize(record, &mut kv);
        let _ = values.serialize(record, &mut kv);
        let msg = hex_ids_in(&record.msg().to_string(), &kv.ids);
        let kv = kv.text;
        // raft-rs's own location and `"logger":"raft"`, as etcd's zap lines mark raft's.
        let file = record.file();
        let file = file.rsplit_once("src/").map_or(file, |(_, f)| f);
        let caller = format!("raft/{file}:{}", record.line());
        if crate::logging::json_enabled() {
            match record.level() {
                Level::Critical | Level::Error => {
                    tracing::error!(target: "raft", caller, logger = "raft", "{msg}{kv}")
                }
                Level::Warning => {
                    tracing::warn!(target: "raft", caller, logger = "raft", "{msg}{kv}")
                }
                Level::Info => tracing::info!(target: "raft", caller, logger = "raft", "{msg}{kv}"),
                Level::Debug | Level::Trace => {
                    tracing::debug!(target: "raft", caller, logger = "raft", "{msg}{kv}")
                }
            }
        } else {
            match record.level() {
                Level::Critical | Level::Error => tracing::error!(target: "raft", "{msg}{kv}"),
                Level::Warning => tracing::warn!(target: "raft", "{msg}{kv}"),
                Level::Info => tracing::info!(target: "raft", "{msg}{kv}"),
                Level::Debug | Level::Trace => tracing::debug!(target: "raft", "{msg}{kv}"),
            }
        }
        Ok(())
    }
}

/// A slog logger for raft-rs that writes through `tracing`.
pub fn raft_logger() -> slog::Logger {
    slog::Logger::root(TracingDrain.fuse(), slog::o!())
}

/// `msg` with each whole decimal number that is one of `ids` written in hexadecimal.
fn hex_ids_in(msg: &str, ids: &[u64]) -> String {
    map_numbers(msg, |n| {
        n.parse::<u64>()
            .ok()
            .filter(|id| ids.contains(id))
            .map(|id| format!("{id:x}"))
    })
}

/// `s` with every whole decimal number written in hexadecimal.
fn hex_numbers(s: &str) -> String {
    map_numbers(s, |n| n.parse::<u64>().ok().map(|id| format!("{id:x}")))
}

/// `s` with each maximal run of ASCII digits replaced by `f(run)` where that gives a value.
fn map_numbers(s: &str, f: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find(|c: char| c.is_ascii_digit()) {
        // A digit inside a word (`v2`, `0x1f`) is not a number on its own.
        let inside_word = rest[..start]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_');
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        let len = tail
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(tail.len());
        let run = &tail[..len];
        match (!inside_word).then(|| f(run)).flatten() {
            Some(v) => out.push_str(&v),
            None => out.push_str(run),
        }
        rest = &tail[len..];
    }
    out.push_str(rest);
    out
}

/// A raft-rs configuration dump as etcd-style text: `voters=[a,b] learners=[c]`, with
/// `outgoing-voters=[...]` during a joint change and `learners-next=[...]` when set. A dump
/// this does not recognise is returned with its IDs in hexadecimal.
fn readable_config(dump: &str) -> String {
    // Each `voters: {..}` set in order: the incoming configuration's, then the outgoing one's.
    let sets = |name: &str| -> Vec<String> {
        let pat = format!("{name}: {{");
        let mut found = Vec::new();
        let mut rest = dump;
        while let Some(i) = rest.find(&pat) {
            // A name ending in `_voters` would be another set.
            let before_ok = !rest[..i].ends_with('_');
            let after = &rest[i + pat.len()..];
            let Some(end) = after.find('}') else { break };
            if before_ok {
                let ids: Vec<String> = after[..end]
                    .split(',')
                    .filter_map(|id| id.trim().parse::<u64>().ok())
                    .map(|id| format!("{id:x}"))
                    .collect();
                found.push(format!("[{}]", ids.join(",")));
            }
            rest = &after[end..];
        }
        found
    };
    let voters = sets("voters");
    if voters.is_empty() {
        return hex_numbers(dump);
    }
    let mut out = format!("voters={}", voters[0]);
    if let Some(outgoing) = voters.get(1).filter(|s| s.as_str() != "[]") {
        out.push_str(&format!(" outgoing-voters={outgoing}"));
    }
    if let Some(learners) = sets("learners").first() {
        out.push_str(&format!(" learners={learners}"));
    }
    if let Some(next) = sets("learners_next").first().filter(|s| s.as_str() != "[]") {
        out.push_str(&format!(" learners-next={next}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configurations_read_as_etcd_prints_them() {
        let dump = "Configuration { voters: Configuration { incoming: Configuration { voters: \
                    {13668033151171901709} }, outgoing: Configuration { voters: {} } }, \
                    learners: {255}, learners_next: {}, auto_leave: false }";
        assert_eq!(
            readable_config(dump),
            "voters=[bdae9bbc11dd390d] learners=[ff]"
        );
        let joint = "Configuration { incoming: Configuration { voters: {1, 2} }, outgoing: \
                     Configuration { voters: {1} } }";
        assert_eq!(readable_config(joint), "voters=[1,2] outgoing-voters=[1]");
    }

    #[test]
    fn member_ids_are_hexadecimal_in_messages() {
        assert_eq!(
            hex_ids_in("RawNode created with id 255.", &[255]),
            "RawNode created with id ff."
        );
        // Terms and indexes stay decimal; numbers inside words are left alone.
        assert_eq!(
            hex_ids_in("Sending from 255 to 16 at term 3 v255", &[255, 16]),
            "Sending from ff to 10 at term 3 v255"
        );
        assert_eq!(hex_numbers("[10, 11]"), "[a, b]");
    }
}
