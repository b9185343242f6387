//! The real `etcdctl` (3.4) against MetaStore: its output formats are what operators see.

use crate::harness::{ok_stdout, Server};
use crate::util::{COMPACTED, FUTURE_REV};

/// stderr of a command that must fail.
fn err_stderr(out: &std::process::Output) -> String {
    assert!(
        !out.status.success(),
        "command unexpectedly succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn put_get_del() {
    let server = Server::start();
    let run = |args: &[&str]| ok_stdout(&server.etcdctl(args));

    assert_eq!(run(&["put", "foo/a", "1"]), "OK\n");
    assert_eq!(run(&["put", "foo/b", "2"]), "OK\n");
    assert_eq!(run(&["put", "foo/c", "3"]), "OK\n");
    assert_eq!(run(&["put", "foo/a", "4"]), "OK\n");
    assert_eq!(run(&["put", "other", "x"]), "OK\n");
    // Revisions: foo/a 2 then 5, foo/b 3, foo/c 4, other 6.

    assert_eq!(run(&["get", "foo/a"]), "foo/a\n4\n");
    assert_eq!(run(&["get", "missing"]), "");
    assert_eq!(
        run(&["get", "foo/", "--prefix"]),
        "foo/a\n4\nfoo/b\n2\nfoo/c\n3\n"
    );
    assert_eq!(
        run(&["get", "foo/", "--prefix", "--limit", "2"]),
        "foo/a\n4\nfoo/b\n2\n"
    );
    assert_eq!(run(&["get", "foo/a", "foo/c"]), "foo/a\n4\nfoo/b\n2\n");
    assert_eq!(
        run(&["get", "foo/b", "--from-key"]),
        "foo/b\n2\nfoo/c\n3\nother\nx\n"
    );
    assert_eq!(
        run(&["get", "", "--from-key", "--keys-only"]),
        "foo/a\n\nfoo/b\n\nfoo/c\n\nother\n\n"
    );
    assert_eq!(
        run(&[
            "get",
            "foo/",
            "--prefix",
            "--sort-by=MODIFY",
            "--order=DESCEND",
            "--keys-only"
        ]),
        "foo/a\n\nfoo/c\n\nfoo/b\n\n"
    );
    assert_eq!(
        run(&[
            "get",
            "foo/",
            "--prefix",
            "--sort-by=VALUE",
            "--order=ASCEND"
        ]),
        "foo/b\n2\nfoo/c\n3\nfoo/a\n4\n"
    );
    assert_eq!(
        run(&[
            "get",
            "foo/",
            "--prefix",
            "--sort-by=CREATE",
            "--order=DESCEND",
            "--limit",
            "1"
        ]),
        "foo/c\n3\n"
    );
    assert_eq!(
        run(&[
            "get",
            "foo/",
            "--prefix",
            "--sort-by=VERSION",
            "--order=DESCEND",
            "--limit",
            "1"
        ]),
        "foo/a\n4\n"
    );
    assert_eq!(
        run(&["get", "foo/", "--prefix", "--order=DESCEND"]),
        "foo/c\n3\nfoo/b\n2\nfoo/a\n4\n"
    );
    assert_eq!(run(&["get", "foo/a", "--rev=2"]), "foo/a\n1\n");
    assert_eq!(
        run(&["get", "foo/", "--prefix", "--rev=3"]),
        "foo/a\n1\nfoo/b\n2\n"
    );
    assert_eq!(run(&["get", "foo/a", "--print-value-only"]), "4\n");
    assert_eq!(run(&["get", "foo/a", "--consistency=s"]), "foo/a\n4\n");

    // JSON: keys and values are base64 ("foo/a" = Zm9vL2E=, "4" = NA==).
    let json = run(&["get", "foo/a", "-w", "json"]);
    for want in [
        "\"revision\":6",
        "\"raft_term\":",
        "\"kvs\":[{\"key\":\"Zm9vL2E=\",\"create_revision\":2,\"mod_revision\":5,\"version\":2,\"value\":\"NA==\"}]",
        "\"count\":1",
    ] {
        assert!(json.contains(want), "{want} not in {json}");
    }
    assert!(!json.contains("\"more\""), "{json}");
    let json = run(&["get", "foo/", "--prefix", "--limit", "1", "-w", "json"]);
    assert!(
        json.contains("\"more\":true") && json.contains("\"count\":3"),
        "{json}"
    );
    assert_eq!(json.matches("\"key\":").count(), 1, "{json}");

    assert_eq!(run(&["del", "foo/b"]), "1\n");
    assert_eq!(run(&["del", "nothing"]), "0\n");
    assert_eq!(run(&["del", "foo/", "--prefix"]), "2\n");
    assert_eq!(run(&["get", "foo/", "--prefix"]), "");
    assert_eq!(run(&["del", "foo/", "--prefix", "--prev-kv"]), "0\n");
    assert_eq!(run(&["del", "other", "--prev-kv"]), "1\nother\nx\n");
    // The deletes were revisions 7, 8, 9: the next put is 10.
    let json = run(&["put", "next", "v", "-w", "json"]);
    assert!(json.contains("\"revision\":10"), "{json}");
}

#[test]
fn txn_interactive() {
    let server = Server::start();
    let prompts =
        "compares:\nsuccess requests (get, put, del):\nfailure requests (get, put, del):\n";
    let script = "mod(\"k\") = \"0\"\n\nput k v\n\nput k v2\n\n";

    let out = server.etcdctl_stdin(&["txn", "-i"], script);
    assert_eq!(ok_stdout(&out), format!("{prompts}SUCCESS\n\nOK\n"));
    assert_eq!(ok_stdout(&server.etcdctl(&["get", "k"])), "k\nv\n");

    let out = server.etcdctl_stdin(&["txn", "-i"], script);
    assert_eq!(ok_stdout(&out), format!("{prompts}FAILURE\n\nOK\n"));
    assert_eq!(ok_stdout(&server.etcdctl(&["get", "k"])), "k\nv2\n");

    // Several compares and ops, JSON output.
    let script = "value(\"k\") = \"v2\"\nversion(\"k\") = \"2\"\n\nget k\nput other o\n\n\n";
    let json = ok_stdout(&server.etcdctl_stdin(&["txn", "-i", "-w", "json"], script));
    assert!(json.contains("\"succeeded\":true"), "{json}");
    assert!(json.contains("\"revision\":4"), "{json}");
    assert!(json.contains("\"key\":\"aw==\",\"create_revision\":2,\"mod_revision\":3,\"version\":2,\"value\":\"djI=\""), "{json}");

    let script = "create(\"k\") > \"2\"\n\n\ndel k\n\n";
    assert_eq!(
        ok_stdout(&server.etcdctl_stdin(&["txn", "-i"], script)),
        format!("{prompts}FAILURE\n\n1\n")
    );
    assert_eq!(ok_stdout(&server.etcdctl(&["get", "k"])), "");
}

#[test]
fn compaction() {
    let server = Server::start();
    for v in ["1", "2", "3", "4"] {
        assert_eq!(ok_stdout(&server.etcdctl(&["put", "k", v])), "OK\n");
    }
    // k: "1"@2 "2"@3 "3"@4 "4"@5.
    assert_eq!(
        ok_stdout(&server.etcdctl(&["compaction", "3"])),
        "compacted revision 3\n"
    );
    assert_eq!(
        ok_stdout(&server.etcdctl(&["get", "k", "--rev=3"])),
        "k\n2\n"
    );
    let err = err_stderr(&server.etcdctl(&["get", "k", "--rev=2"]));
    assert!(err.contains(&format!("Error: {COMPACTED}")), "{err}");

    assert_eq!(
        ok_stdout(&server.etcdctl(&["compaction", "--physical", "4"])),
        "compacted revision 4\n"
    );
    let err = err_stderr(&server.etcdctl(&["get", "k", "--rev=3"]));
    assert!(err.contains(&format!("Error: {COMPACTED}")), "{err}");
    assert_eq!(
        ok_stdout(&server.etcdctl(&["get", "k", "--rev=4"])),
        "k\n3\n"
    );

    let err = err_stderr(&server.etcdctl(&["compaction", "3"]));
    assert!(err.contains(&format!("Error: {COMPACTED}")), "{err}");
    let err = err_stderr(&server.etcdctl(&["compaction", "100"]));
    assert!(err.contains(&format!("Error: {FUTURE_REV}")), "{err}");
    let err = err_stderr(&server.etcdctl(&["get", "k", "--rev=100"]));
    assert!(err.contains(&format!("Error: {FUTURE_REV}")), "{err}");
    assert_eq!(ok_stdout(&server.etcdctl(&["get", "k"])), "k\n4\n");
}

#[tokio::test]
async fn endpoint_and_member_commands() {
    let server = Server::start();
    let mut c = server.client().await;
    let members = c.member_list().await.unwrap();
    let id = members.members()[0].id();
    let cluster_id = members.header().unwrap().cluster_id();
    c.put("x", "y", None).await.unwrap();

    let json = ok_stdout(&server.etcdctl(&["endpoint", "status", "-w", "json"]));
    for want in [
        format!("\"Endpoint\":\"{}\"", server.endpoint),
        format!("\"member_id\":{id}"),
        format!("\"cluster_id\":{cluster_id}"),
        format!("\"leader\":{id}"),
        "\"revision\":2".to_string(),
        "\"version\":\"".to_string(),
    ] {
        assert!(json.contains(&want), "{want} not in {json}");
    }
    // Simple format: endpoint, hex member id, version, ..., is leader.
    let simple = ok_stdout(&server.etcdctl(&["endpoint", "status"]));
    assert!(
        simple.starts_with(&format!("{}, {id:x}, ", server.endpoint)),
        "{simple}"
    );
    assert!(
        simple.contains(", true, false, "),
        "is leader, not a learner: {simple}"
    );

    let out = server.etcdctl(&["endpoint", "health"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // etcdctl 3.4 prints health to stderr.
    let health = String::from_utf8_lossy(&out.stderr);
    assert!(
        health.contains(&format!(
            "{} is healthy: successfully committed proposal",
            server.endpoint
        )),
        "{health}"
    );

    let list = ok_stdout(&server.etcdctl(&["member", "list"]));
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 1, "{list}");
    assert!(
        lines[0].starts_with(&format!("{id:x}, started, ")),
        "{list}"
    );
    assert!(lines[0].ends_with(", false"), "{list}");
    let json = ok_stdout(&server.etcdctl(&["member", "list", "-w", "json"]));
    assert!(json.contains(&format!("\"ID\":{id}")), "{json}");
    assert_eq!(json.matches("\"ID\":").count(), 1, "{json}");
}

/// etcdctl 3.4 sends an endpoint given as a URL as the whole `:authority`
/// (`http://127.0.0.1:PORT`); upstream h2 reset such streams with PROTOCOL_ERROR
/// (vendor/h2/PATCH.md). Regression test for that.
#[test]
fn endpoints_given_as_urls_work() {
    let server = Server::start();
    let url = format!("http://{}", server.endpoint);
    let run = |args: &[&str]| ok_stdout(&crate::harness::etcdctl(&url, args, None));
    assert_eq!(run(&["put", "k", "v"]), "OK\n");
    assert_eq!(run(&["get", "k", "--print-value-only"]), "v\n");
    let status = run(&["endpoint", "status", "-w", "table"]);
    assert!(status.contains(&url), "{status}");
}
