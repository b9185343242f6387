//! The KV service through `etcd-client`: Range, Put, DeleteRange, Compact, MVCC history and
//! etcd's error statuses.

use etcd_client::{
    Client, CompactionOptions, DeleteOptions, GetOptions, PutOptions, SortOrder, SortTarget,
};
use tonic::Code;

use crate::harness::{wait_until_async, Server};
use crate::util::{grpc_err, keys, put_rev, strs, values, Rev, COMPACTED, FUTURE_REV};

#[tokio::test]
async fn headers_and_revision_counting() {
    let server = Server::start();
    let mut c = server.client().await;

    let put = c.put("a", "1", None).await.unwrap();
    let h = put.header().unwrap();
    assert_ne!(h.cluster_id(), 0, "cluster_id");
    assert_ne!(h.member_id(), 0, "member_id");
    assert_ne!(h.raft_term(), 0, "raft_term");
    assert_eq!(h.revision(), 2, "the first write gets revision 2");
    let (cluster_id, member_id) = (h.cluster_id(), h.member_id());

    // The header names the member that MemberList reports.
    let members = c.member_list().await.unwrap();
    assert_eq!(members.members().len(), crate::harness::members_started());
    assert!(members.members().iter().any(|m| m.id() == member_id));
    let mh = members.header().unwrap();
    assert_eq!(mh.cluster_id(), cluster_id);
    assert_ne!(mh.raft_term(), 0);
    // etcd's Cluster responses carry no revision (api/v3rpc/member.go `header()`).
    assert_eq!(mh.revision(), 0);

    let got = c.get("a", None).await.unwrap();
    let gh = got.header().unwrap();
    assert_eq!(
        (gh.cluster_id(), gh.member_id(), gh.revision()),
        (cluster_id, member_id, 2)
    );
    assert_ne!(gh.raft_term(), 0);
    assert_eq!(got.count(), 1);
    assert_eq!(got.kvs()[0].value(), b"1");

    assert_eq!(put_rev(&mut c, "b", "2").await, 3);
    assert_eq!(put_rev(&mut c, "a", "3").await, 4);

    // Deleting nothing does not consume a revision.
    let del = c.delete("missing", None).await.unwrap();
    assert_eq!(del.deleted(), 0);
    let dh = del.header().unwrap();
    assert_eq!(
        (dh.cluster_id(), dh.member_id(), dh.revision()),
        (cluster_id, member_id, 4)
    );
    let del = c
        .delete("nothing/", Some(DeleteOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!((del.deleted(), del.rev()), (0, 4));
    assert_eq!(c.get("a", None).await.unwrap().rev(), 4);

    assert_eq!(put_rev(&mut c, "c", "4").await, 5);
    let del = c.delete("a", None).await.unwrap();
    assert_eq!((del.deleted(), del.rev()), (1, 6));
    assert_eq!(put_rev(&mut c, "d", "5").await, 7);
}

/// k1: create 2, mod 5, version 2, value "c"
/// k2: create 3, mod 7, version 3, value "a"
/// k3: create 4, mod 4, version 1, value "b"
/// plus "a" (rev 8) and "z" (rev 9) outside the "k" prefix. Current revision 9.
async fn range_fixture(c: &mut Client) {
    for (i, (k, v)) in [
        ("k1", "c"),
        ("k2", "a"),
        ("k3", "b"),
        ("k1", "c"),
        ("k2", "a"),
        ("k2", "a"),
        ("a", "x"),
        ("z", "y"),
    ]
    .into_iter()
    .enumerate()
    {
        assert_eq!(put_rev(c, k, v).await, i as i64 + 2);
    }
}

/// The first request a member serves may well be a linearizable read (a client checking for a
/// key, an operator's `etcdctl get`): etcd answers it as soon as its leader has committed in its
/// term, it does not time out.
#[tokio::test]
async fn linearizable_read_right_after_start() {
    let server = Server::start();
    let mut c = server.client().await;
    let r = c.get("anything", None).await.unwrap();
    assert_eq!((r.count(), r.kvs().len(), r.rev()), (0, 0, 1));
    let r = c
        .get("anything", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!((r.count(), r.rev()), (0, 1));
}

#[tokio::test]
async fn range_key_selection() {
    let server = Server::start();
    let mut c = server.client().await;
    range_fixture(&mut c).await;

    let r = c
        .get("k", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(keys(r.kvs()), strs(&["k1", "k2", "k3"]));
    assert_eq!(values(r.kvs()), strs(&["c", "a", "b"]));
    assert_eq!((r.count(), r.more(), r.rev()), (3, false, 9));
    let kv = &r.kvs()[1];
    assert_eq!(
        (
            kv.create_revision(),
            kv.mod_revision(),
            kv.version(),
            kv.lease()
        ),
        (3, 7, 3, 0)
    );

    // from_key: range_end "\0".
    let r = c
        .get("k2", Some(GetOptions::new().with_from_key()))
        .await
        .unwrap();
    assert_eq!(keys(r.kvs()), strs(&["k2", "k3", "z"]));
    assert_eq!(r.count(), 3);

    // Every key: key "\0", range_end "\0", however it is spelled.
    let all = strs(&["a", "k1", "k2", "k3", "z"]);
    for opts in [
        ("\0", GetOptions::new().with_all_keys()),
        ("\0", GetOptions::new().with_from_key()),
        ("", GetOptions::new().with_from_key()),
        ("", GetOptions::new().with_prefix()),
        ("\0", GetOptions::new().with_range("\0")),
    ] {
        let r = c.get(opts.0, Some(opts.1.clone())).await.unwrap();
        assert_eq!(keys(r.kvs()), all, "{opts:?}");
        assert_eq!((r.count(), r.more()), (5, false), "{opts:?}");
    }

    // Explicit [key, range_end).
    let r = c
        .get("k1", Some(GetOptions::new().with_range("k3")))
        .await
        .unwrap();
    assert_eq!(keys(r.kvs()), strs(&["k1", "k2"]));
    assert_eq!(r.count(), 2);
    let r = c
        .get("a", Some(GetOptions::new().with_range("k2")))
        .await
        .unwrap();
    assert_eq!(keys(r.kvs()), strs(&["a", "k1"]));
    // A range that holds nothing.
    let r = c
        .get("b", Some(GetOptions::new().with_range("k")))
        .await
        .unwrap();
    assert_eq!((r.kvs().len(), r.count(), r.more()), (0, 0, false));
    // A single missing key.
    let r = c.get("k", None).await.unwrap();
    assert_eq!((r.kvs().len(), r.count(), r.rev()), (0, 0, 9));

    // Limit: `more` when cut, `count` is the whole range.
    let r = c
        .get("k", Some(GetOptions::new().with_prefix().with_limit(2)))
        .await
        .unwrap();
    assert_eq!(keys(r.kvs()), strs(&["k1", "k2"]));
    assert_eq!((r.count(), r.more()), (3, true));
    let r = c
        .get("k", Some(GetOptions::new().with_prefix().with_limit(3)))
        .await
        .unwrap();
    assert_eq!(keys(r.kvs()), strs(&["k1", "k2", "k3"]));
    assert_eq!((r.count(), r.more()), (3, false));
    let r = c
        .get("\0", Some(GetOptions::new().with_all_keys().with_limit(1)))
        .await
        .unwrap();
    assert_eq!(keys(r.kvs()), strs(&["a"]));
    assert_eq!((r.count(), r.more()), (5, true));

    // keys_only: no values, everything else intact.
    let r = c
        .get("k", Some(GetOptions::new().with_prefix().with_keys_only()))
        .await
        .unwrap();
    assert_eq!(keys(r.kvs()), strs(&["k1", "k2", "k3"]));
    assert!(
        r.kvs().iter().all(|kv| kv.value().is_empty()),
        "keys_only returned values"
    );
    assert_eq!(
        r.kvs()
            .iter()
            .map(|kv| kv.mod_revision())
            .collect::<Vec<_>>(),
        vec![5, 7, 4]
    );
    assert_eq!(
        r.kvs().iter().map(|kv| kv.version()).collect::<Vec<_>>(),
        vec![2, 3, 1]
    );
    assert_eq!(r.count(), 3);

    // count_only: no key-values at all.
    let r = c
        .get("k", Some(GetOptions::new().with_prefix().with_count_only()))
        .await
        .unwrap();
    assert_eq!((r.kvs().len(), r.count(), r.more()), (0, 3, false));
    let r = c
        .get(
            "\0",
            Some(
                GetOptions::new()
                    .with_all_keys()
                    .with_count_only()
                    .with_limit(1),
            ),
        )
        .await
        .unwrap();
    assert_eq!((r.kvs().len(), r.count(), r.more()), (0, 5, false));

    // Serializable reads see the same data.
    let r = c
        .get(
            "k",
            Some(GetOptions::new().with_prefix().with_serializable()),
        )
        .await
        .unwrap();
    assert_eq!(keys(r.kvs()), strs(&["k1", "k2", "k3"]));
    assert_eq!((r.count(), r.rev()), (3, 9));
}

#[tokio::test]
async fn range_sorting() {
    let server = Server::start();
    let mut c = server.client().await;
    range_fixture(&mut c).await;

    let cases: &[(SortTarget, SortOrder, &[&str])] = &[
        (SortTarget::Key, SortOrder::Ascend, &["k1", "k2", "k3"]),
        (SortTarget::Key, SortOrder::Descend, &["k3", "k2", "k1"]),
        (SortTarget::Version, SortOrder::Ascend, &["k3", "k1", "k2"]),
        (SortTarget::Version, SortOrder::Descend, &["k2", "k1", "k3"]),
        (SortTarget::Create, SortOrder::Ascend, &["k1", "k2", "k3"]),
        (SortTarget::Create, SortOrder::Descend, &["k3", "k2", "k1"]),
        (SortTarget::Mod, SortOrder::Ascend, &["k3", "k1", "k2"]),
        (SortTarget::Mod, SortOrder::Descend, &["k2", "k1", "k3"]),
        (SortTarget::Value, SortOrder::Ascend, &["k2", "k3", "k1"]),
        (SortTarget::Value, SortOrder::Descend, &["k1", "k3", "k2"]),
        // A non-key target without an order sorts ascending (etcd).
        (SortTarget::Mod, SortOrder::None, &["k3", "k1", "k2"]),
        (SortTarget::Value, SortOrder::None, &["k2", "k3", "k1"]),
    ];
    for (target, order, want) in cases {
        let r = c
            .get(
                "k",
                Some(GetOptions::new().with_prefix().with_sort(*target, *order)),
            )
            .await
            .unwrap();
        assert_eq!(keys(r.kvs()), strs(want), "sort {target:?} {order:?}");
        assert_eq!(
            (r.count(), r.more()),
            (3, false),
            "sort {target:?} {order:?}"
        );
        // Sorting happens before the limit.
        let r = c
            .get(
                "k",
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_sort(*target, *order)
                        .with_limit(2),
                ),
            )
            .await
            .unwrap();
        assert_eq!(
            keys(r.kvs()),
            strs(&want[..2]),
            "sort {target:?} {order:?} limit 2"
        );
        assert_eq!(
            (r.count(), r.more()),
            (3, true),
            "sort {target:?} {order:?} limit 2"
        );
    }
}

#[tokio::test]
async fn range_revision_filters() {
    let server = Server::start();
    let mut c = server.client().await;
    range_fixture(&mut c).await;
    let prefix = || GetOptions::new().with_prefix();

    let cases: Vec<(&str, GetOptions, &[&str])> = vec![
        (
            "min_mod 5",
            prefix().with_min_mod_revision(5),
            &["k1", "k2"],
        ),
        (
            "max_mod 5",
            prefix().with_max_mod_revision(5),
            &["k1", "k3"],
        ),
        (
            "min_mod 5 max_mod 6",
            prefix().with_min_mod_revision(5).with_max_mod_revision(6),
            &["k1"],
        ),
        (
            "min_create 3",
            prefix().with_min_create_revision(3),
            &["k2", "k3"],
        ),
        (
            "max_create 3",
            prefix().with_max_create_revision(3),
            &["k1", "k2"],
        ),
        (
            "min_create 3 max_create 3",
            prefix()
                .with_min_create_revision(3)
                .with_max_create_revision(3),
            &["k2"],
        ),
        ("min_mod 8", prefix().with_min_mod_revision(8), &[]),
    ];
    for (name, opts, want) in cases {
        let r = c.get("k", Some(opts)).await.unwrap();
        assert_eq!(keys(r.kvs()), strs(want), "{name}");
        assert_eq!(
            (r.count(), r.more()),
            (3, false),
            "{name}: count is the whole range"
        );
    }
    // The limit applies after filtering.
    let r = c
        .get("k", Some(prefix().with_min_mod_revision(5).with_limit(1)))
        .await
        .unwrap();
    assert_eq!(keys(r.kvs()), strs(&["k1"]));
    assert_eq!((r.count(), r.more()), (3, true));
}

#[tokio::test]
async fn put_options() {
    let server = Server::start();
    let mut c = server.client().await;
    assert_eq!(put_rev(&mut c, "p", "v1").await, 2);

    // prev_kv returns the replaced key-value.
    let r = c
        .put("p", "v2", Some(PutOptions::new().with_prev_key()))
        .await
        .unwrap();
    assert_eq!(r.rev(), 3);
    let prev = r.prev_key().expect("prev_kv");
    assert_eq!((prev.key(), prev.value()), (&b"p"[..], &b"v1"[..]));
    assert_eq!(
        (prev.create_revision(), prev.mod_revision(), prev.version()),
        (2, 2, 1)
    );
    // Without prev_kv: none.
    let r = c.put("p2", "x", None).await.unwrap();
    assert!(r.prev_key().is_none());
    assert_eq!(r.rev(), 4);
    // prev_kv on a new key: none.
    let r = c
        .put("new", "n", Some(PutOptions::new().with_prev_key()))
        .await
        .unwrap();
    assert!(r.prev_key().is_none(), "{:?}", r.prev_key());
    assert_eq!(r.rev(), 5);

    // ignore_value keeps the value but is a write.
    let r = c
        .put("p", "", Some(PutOptions::new().with_ignore_value()))
        .await
        .unwrap();
    assert_eq!(r.rev(), 6);
    let kv = c.get("p", None).await.unwrap().kvs()[0].clone();
    assert_eq!(
        (
            kv.value(),
            kv.version(),
            kv.mod_revision(),
            kv.create_revision()
        ),
        (&b"v2"[..], 3, 6, 2)
    );
    assert_eq!(
        grpc_err(
            c.put("p", "x", Some(PutOptions::new().with_ignore_value()))
                .await
        ),
        (
            Code::InvalidArgument,
            "etcdserver: value is provided".to_string()
        )
    );
    assert_eq!(
        grpc_err(
            c.put("missing", "", Some(PutOptions::new().with_ignore_value()))
                .await
        ),
        (
            Code::InvalidArgument,
            "etcdserver: key not found".to_string()
        )
    );

    // ignore_lease takes the new value and keeps the (absent) lease.
    let r = c
        .put("p", "v3", Some(PutOptions::new().with_ignore_lease()))
        .await
        .unwrap();
    assert_eq!(r.rev(), 7);
    let kv = c.get("p", None).await.unwrap().kvs()[0].clone();
    assert_eq!((kv.value(), kv.version(), kv.lease()), (&b"v3"[..], 4, 0));
    assert_eq!(
        grpc_err(
            c.put("missing", "v", Some(PutOptions::new().with_ignore_lease()))
                .await
        ),
        (
            Code::InvalidArgument,
            "etcdserver: key not found".to_string()
        )
    );
    assert_eq!(
        grpc_err(
            c.put(
                "p",
                "v",
                Some(PutOptions::new().with_lease(7).with_ignore_lease())
            )
            .await
        ),
        (
            Code::InvalidArgument,
            "etcdserver: lease is provided".to_string()
        )
    );

    // A lease that was never granted.
    assert_eq!(
        grpc_err(
            c.put("p", "v", Some(PutOptions::new().with_lease(12345)))
                .await
        ),
        (
            Code::NotFound,
            "etcdserver: requested lease not found".to_string()
        )
    );
    assert_eq!(
        grpc_err(
            c.put("brand-new", "v", Some(PutOptions::new().with_lease(12345)))
                .await
        ),
        (
            Code::NotFound,
            "etcdserver: requested lease not found".to_string()
        )
    );

    // None of the failures wrote anything.
    assert!(c.get("missing", None).await.unwrap().kvs().is_empty());
    assert!(c.get("brand-new", None).await.unwrap().kvs().is_empty());
    assert_eq!(put_rev(&mut c, "p", "v4").await, 8);
    let kv = c.get("p", None).await.unwrap().kvs()[0].clone();
    assert_eq!((kv.value(), kv.version()), (&b"v4"[..], 5));
}

#[tokio::test]
async fn delete_range() {
    let server = Server::start();
    let mut c = server.client().await;
    for (i, k) in ["d/1", "d/2", "d/3", "e"].into_iter().enumerate() {
        assert_eq!(put_rev(&mut c, k, &format!("val-{k}")).await, i as i64 + 2);
    }

    let r = c
        .delete("d/1", Some(DeleteOptions::new().with_prev_key()))
        .await
        .unwrap();
    assert_eq!((r.deleted(), r.rev()), (1, 6));
    assert_eq!(keys(r.prev_kvs()), strs(&["d/1"]));
    assert_eq!(values(r.prev_kvs()), strs(&["val-d/1"]));
    assert_eq!(r.prev_kvs()[0].mod_revision(), 2);

    // A prefix delete removes everything under it in one revision.
    let r = c
        .delete(
            "d/",
            Some(DeleteOptions::new().with_prefix().with_prev_key()),
        )
        .await
        .unwrap();
    assert_eq!((r.deleted(), r.rev()), (2, 7));
    assert_eq!(keys(r.prev_kvs()), strs(&["d/2", "d/3"]));
    assert_eq!(values(r.prev_kvs()), strs(&["val-d/2", "val-d/3"]));

    let r = c
        .delete(
            "d/",
            Some(DeleteOptions::new().with_prefix().with_prev_key()),
        )
        .await
        .unwrap();
    assert_eq!((r.deleted(), r.rev(), r.prev_kvs().len()), (0, 7, 0));

    // An explicit range, without prev_kv.
    let r = c
        .delete("a", Some(DeleteOptions::new().with_range("f")))
        .await
        .unwrap();
    assert_eq!((r.deleted(), r.rev(), r.prev_kvs().len()), (1, 8, 0));

    let all = c
        .get("\0", Some(GetOptions::new().with_all_keys()))
        .await
        .unwrap();
    assert_eq!((all.count(), all.rev()), (0, 8));

    // Delete everything.
    for k in ["x1", "x2", "y"] {
        c.put(k, "v", None).await.unwrap();
    }
    let r = c
        .delete("\0", Some(DeleteOptions::new().with_all_keys()))
        .await
        .unwrap();
    assert_eq!((r.deleted(), r.rev()), (3, 12));
    assert_eq!(put_rev(&mut c, "e", "again").await, 13);
}

#[tokio::test]
async fn mvcc_versions_and_history() {
    let server = Server::start();
    let mut c = server.client().await;

    assert_eq!(put_rev(&mut c, "m", "v1").await, 2);
    let kv = c.get("m", None).await.unwrap().kvs()[0].clone();
    assert_eq!(
        (kv.create_revision(), kv.mod_revision(), kv.version()),
        (2, 2, 1)
    );

    assert_eq!(put_rev(&mut c, "m", "v2").await, 3);
    let kv = c.get("m", None).await.unwrap().kvs()[0].clone();
    assert_eq!(
        (kv.create_revision(), kv.mod_revision(), kv.version()),
        (2, 3, 2)
    );

    assert_eq!(c.delete("m", None).await.unwrap().rev(), 4);
    assert_eq!(c.get("m", None).await.unwrap().count(), 0);

    // Re-created: a new life with version 1.
    assert_eq!(put_rev(&mut c, "m", "v3").await, 5);
    let kv = c.get("m", None).await.unwrap().kvs()[0].clone();
    assert_eq!(
        (
            kv.create_revision(),
            kv.mod_revision(),
            kv.version(),
            kv.value()
        ),
        (5, 5, 1, &b"v3"[..])
    );

    // Historical reads; the header always carries the current revision.
    let at = |rev| GetOptions::new().with_revision(rev);
    for (rev, want) in [
        (2, Some(("v1", 2, 2, 1))),
        (3, Some(("v2", 2, 3, 2))),
        (4, None),
        (5, Some(("v3", 5, 5, 1))),
    ] {
        let r = c.get("m", Some(at(rev))).await.unwrap();
        assert_eq!(r.rev(), 5, "at {rev}");
        match want {
            Some((v, create, modr, ver)) => {
                assert_eq!(r.count(), 1, "at {rev}");
                let kv = &r.kvs()[0];
                assert_eq!(
                    (
                        kv.value(),
                        kv.create_revision(),
                        kv.mod_revision(),
                        kv.version()
                    ),
                    (v.as_bytes(), create, modr, ver),
                    "at {rev}"
                );
            }
            None => assert_eq!((r.count(), r.kvs().len()), (0, 0), "at {rev}"),
        }
    }
    // Revision 1 is the empty store.
    let r = c.get("m", Some(at(1))).await.unwrap();
    assert_eq!(r.count(), 0);

    // Ranges at old revisions.
    assert_eq!(put_rev(&mut c, "h/a", "1").await, 6);
    assert_eq!(put_rev(&mut c, "h/b", "2").await, 7);
    assert_eq!(c.delete("h/a", None).await.unwrap().rev(), 8);
    assert_eq!(put_rev(&mut c, "h/b", "3").await, 9);
    let hist = |rev| GetOptions::new().with_prefix().with_revision(rev);
    let r = c.get("h/", Some(hist(5))).await.unwrap();
    assert_eq!(keys(r.kvs()), Vec::<String>::new());
    let r = c.get("h/", Some(hist(6))).await.unwrap();
    assert_eq!(keys(r.kvs()), strs(&["h/a"]));
    let r = c.get("h/", Some(hist(7))).await.unwrap();
    assert_eq!(
        (keys(r.kvs()), values(r.kvs()), r.count()),
        (strs(&["h/a", "h/b"]), strs(&["1", "2"]), 2)
    );
    let r = c.get("h/", Some(hist(8))).await.unwrap();
    assert_eq!(
        (keys(r.kvs()), values(r.kvs()), r.count()),
        (strs(&["h/b"]), strs(&["2"]), 1)
    );
    let r = c
        .get("h/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(
        (keys(r.kvs()), values(r.kvs())),
        (strs(&["h/b"]), strs(&["3"]))
    );
    assert_eq!(r.kvs()[0].version(), 2);
    // Historical count_only and limit.
    let r = c.get("h/", Some(hist(7).with_count_only())).await.unwrap();
    assert_eq!((r.count(), r.kvs().len()), (2, 0));
    let r = c.get("h/", Some(hist(7).with_limit(1))).await.unwrap();
    assert_eq!(
        (keys(r.kvs()), r.more(), r.count()),
        (strs(&["h/a"]), true, 2)
    );
}

#[tokio::test]
async fn compaction() {
    let server = Server::start();
    let mut c = server.client().await;
    for rev in 2..=6 {
        assert_eq!(put_rev(&mut c, "c", &format!("v{rev}")).await, rev);
    }
    let at = |rev| Some(GetOptions::new().with_revision(rev));

    let r = c.compact(4, None).await.unwrap();
    assert_eq!(r.rev(), 6, "compaction does not consume a revision");

    assert_eq!(
        grpc_err(c.get("c", at(3)).await),
        (Code::OutOfRange, COMPACTED.to_string())
    );
    assert_eq!(
        grpc_err(c.get("c", at(1)).await),
        (Code::OutOfRange, COMPACTED.to_string())
    );
    let r = c.get("c", at(4)).await.unwrap();
    assert_eq!(values(r.kvs()), strs(&["v4"]));
    assert_eq!((r.kvs()[0].version(), r.kvs()[0].create_revision()), (3, 2));
    assert_eq!(
        values(c.get("c", at(5)).await.unwrap().kvs()),
        strs(&["v5"])
    );
    assert_eq!(values(c.get("c", None).await.unwrap().kvs()), strs(&["v6"]));

    // Compacting again at or below the compaction revision.
    assert_eq!(
        grpc_err(c.compact(4, None).await),
        (Code::OutOfRange, COMPACTED.to_string())
    );
    assert_eq!(
        grpc_err(c.compact(2, None).await),
        (Code::OutOfRange, COMPACTED.to_string())
    );

    // The future.
    assert_eq!(
        grpc_err(c.get("c", at(7)).await),
        (Code::OutOfRange, FUTURE_REV.to_string())
    );
    assert_eq!(
        grpc_err(c.compact(7, None).await),
        (Code::OutOfRange, FUTURE_REV.to_string())
    );
    assert_eq!(
        grpc_err(c.compact(100, None).await),
        (Code::OutOfRange, FUTURE_REV.to_string())
    );

    // Physical compaction.
    let r = c
        .compact(5, Some(CompactionOptions::new().with_physical()))
        .await
        .unwrap();
    assert_eq!(r.rev(), 6);
    assert_eq!(
        grpc_err(c.get("c", at(4)).await),
        (Code::OutOfRange, COMPACTED.to_string())
    );
    assert_eq!(
        values(c.get("c", at(5)).await.unwrap().kvs()),
        strs(&["v5"])
    );

    // None of this consumed revisions; compacting at the current revision works.
    assert_eq!(put_rev(&mut c, "c", "v7").await, 7);
    c.compact(7, None).await.unwrap();
    let r = c.get("c", at(7)).await.unwrap();
    assert_eq!((values(r.kvs()), r.kvs()[0].version()), (strs(&["v7"]), 6));
    assert_eq!(
        grpc_err(c.get("c", at(6)).await),
        (Code::OutOfRange, COMPACTED.to_string())
    );
    // A key deleted before the compaction revision is gone from every readable revision.
    assert_eq!(put_rev(&mut c, "gone", "x").await, 8);
    assert_eq!(c.delete("gone", None).await.unwrap().rev(), 9);
    c.compact(9, None).await.unwrap();
    assert_eq!(c.get("gone", at(9)).await.unwrap().count(), 0);
    assert_eq!(
        values(c.get("c", at(9)).await.unwrap().kvs()),
        strs(&["v7"])
    );
}

/// `--auto-compaction-retention 1s` in periodic mode: the leader compacts by itself, as
/// etcd's compactor does, a retention (1 s) after start-up and then every retention.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_auto_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let flags = [
        "--auto-compaction-mode=periodic",
        "--auto-compaction-retention=1s",
    ];
    let server = Server::try_start(dir.path(), &flags).unwrap();
    let mut c = server.client().await;
    for i in 1..=5 {
        put_rev(&mut c, &format!("auto/{i}"), "v").await;
    }
    let compacted = wait_until_async(std::time::Duration::from_secs(20), async || {
        match c
            .get("auto/1", Some(GetOptions::new().with_revision(2)))
            .await
        {
            Err(e) => {
                assert_eq!(
                    grpc_err::<()>(Err(e)),
                    (Code::OutOfRange, COMPACTED.to_string())
                );
                true
            }
            Ok(_) => false,
        }
    })
    .await;
    assert!(
        compacted,
        "no auto-compaction after 20 s:\n{}",
        server.log()
    );
    assert!(server.wait_log(
        "finished auto-compaction",
        std::time::Duration::from_secs(10)
    ));
    // Compaction drops history only: the latest values stay.
    let got = c
        .get("auto/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(got.kvs().len(), 5);

    let refused = Server::try_start(
        tempfile::tempdir().unwrap().path(),
        &[
            "--auto-compaction-mode=revision",
            "--auto-compaction-retention=1h",
        ],
    )
    .err()
    .expect("a revision retention is a number");
    assert!(
        refused.contains("invalid --auto-compaction-retention"),
        "{refused}"
    );
}

#[tokio::test]
async fn request_errors() {
    let server = Server::start();
    let mut c = server.client().await;
    let empty = (
        Code::InvalidArgument,
        "etcdserver: key is not provided".to_string(),
    );
    assert_eq!(grpc_err(c.get("", None).await), empty);
    assert_eq!(grpc_err(c.put("", "v", None).await), empty);
    assert_eq!(grpc_err(c.delete("", None).await), empty);

    // Above --max-request-bytes (1.5 MiB) but below gRPC's own limit (+512 KiB).
    let big = vec![b'x'; 1_700_000];
    assert_eq!(
        grpc_err(c.put("big", big, None).await),
        (
            Code::InvalidArgument,
            "etcdserver: request is too large".to_string()
        )
    );
    // Above gRPC's limit: grpc-go's own refusal, as etcd answers (regression, issue 11: tonic
    // answered OUT_OF_RANGE "Error, decoded message length too large").
    let huge = vec![b'z'; 3_000_000];
    assert_eq!(
        grpc_err(c.put("huge", huge, None).await),
        (
            Code::ResourceExhausted,
            "grpc: received message larger than max (3000011 vs. 2097152)".to_string()
        )
    );
    // Just under the limit is fine.
    let r = c.put("ok", vec![b'y'; 1_500_000], None).await.unwrap();
    assert_eq!(r.rev(), 2, "the failures consumed no revision");
    let got = c.get("ok", None).await.unwrap();
    assert_eq!(got.kvs()[0].value().len(), 1_500_000);
    assert_eq!(c.get("big", None).await.unwrap().count(), 0);
    assert_eq!(c.get("huge", None).await.unwrap().count(), 0);
}

/// etcd-client cannot express an unknown sort order or target; the raw generated client can.
#[tokio::test]
async fn invalid_sort_option() {
    use metastore::proto::etcdserverpb::{kv_client::KvClient, RangeRequest};
    let server = Server::start();
    let mut kv = KvClient::connect(format!("http://{}", server.endpoint))
        .await
        .unwrap();
    let want = (
        Code::InvalidArgument,
        "etcdserver: invalid sort option".to_string(),
    );
    for (order, target) in [(9, 0), (0, 9), (-1, 0)] {
        let req = RangeRequest {
            key: b"a".to_vec(),
            sort_order: order,
            sort_target: target,
            ..Default::default()
        };
        let s = kv
            .range(req)
            .await
            .expect_err("invalid sort option accepted");
        assert_eq!(
            (s.code(), s.message().to_string()),
            want,
            "order {order} target {target}"
        );
    }
    // Valid options on the same client succeed.
    let req = RangeRequest {
        key: b"a".to_vec(),
        sort_order: 2,
        sort_target: 3,
        ..Default::default()
    };
    let r = kv.range(req).await.unwrap().into_inner();
    assert_eq!((r.count, r.header.unwrap().revision), (0, 1));
}

#[tokio::test]
async fn cross_shard_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::try_start(dir.path(), &["--shards", "4"]).unwrap();
    let mut c = server.client().await;

    // Written in a scrambled order so no shard sees its keys in key order by accident.
    let order: Vec<usize> = (0..200).map(|i| (i * 7) % 200).collect();
    for (n, i) in order.iter().enumerate() {
        let r = c
            .put(format!("cs/{i:03}"), format!("v{i}"), None)
            .await
            .unwrap();
        assert_eq!(r.rev(), n as i64 + 2);
    }
    c.put("ct", "outside", None).await.unwrap();
    c.put("cr", "outside", None).await.unwrap();
    let all: Vec<String> = (0..200).map(|i| format!("cs/{i:03}")).collect();
    let prefix = || GetOptions::new().with_prefix();

    let r = c.get("cs/", Some(prefix())).await.unwrap();
    assert_eq!(keys(r.kvs()), all);
    assert_eq!(
        values(r.kvs()),
        (0..200).map(|i| format!("v{i}")).collect::<Vec<_>>()
    );
    assert_eq!((r.count(), r.more(), r.rev()), (200, false, 203));

    let r = c.get("cs/", Some(prefix().with_limit(10))).await.unwrap();
    assert_eq!(keys(r.kvs()), all[..10].to_vec());
    assert_eq!((r.count(), r.more()), (200, true));

    let r = c
        .get(
            "cs/",
            Some(prefix().with_sort(SortTarget::Key, SortOrder::Descend)),
        )
        .await
        .unwrap();
    let mut rev_all = all.clone();
    rev_all.reverse();
    assert_eq!(keys(r.kvs()), rev_all);
    assert_eq!(r.count(), 200);
    let r = c
        .get(
            "cs/",
            Some(
                prefix()
                    .with_sort(SortTarget::Key, SortOrder::Descend)
                    .with_limit(5),
            ),
        )
        .await
        .unwrap();
    assert_eq!(keys(r.kvs()), rev_all[..5].to_vec());
    assert_eq!((r.count(), r.more()), (200, true));

    // Creation order is the scrambled write order.
    let r = c
        .get(
            "cs/",
            Some(prefix().with_sort(SortTarget::Create, SortOrder::Ascend)),
        )
        .await
        .unwrap();
    assert_eq!(
        keys(r.kvs()),
        order
            .iter()
            .map(|i| format!("cs/{i:03}"))
            .collect::<Vec<_>>()
    );

    let r = c
        .get("cs/050", Some(GetOptions::new().with_range("cs/060")))
        .await
        .unwrap();
    assert_eq!(keys(r.kvs()), all[50..60].to_vec());
    let r = c
        .get("cs/", Some(prefix().with_count_only()))
        .await
        .unwrap();
    assert_eq!((r.count(), r.kvs().len()), (200, 0));
    let r = c
        .get(
            "\0",
            Some(GetOptions::new().with_all_keys().with_keys_only()),
        )
        .await
        .unwrap();
    assert_eq!(r.count(), 202);
    assert_eq!(keys(&r.kvs()[..2]), strs(&["cr", "cs/000"]));
    assert_eq!(keys(&r.kvs()[201..]), strs(&["ct"]));

    // A prefix delete across shards is one revision.
    let r = c
        .delete("cs/", Some(DeleteOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!((r.deleted(), r.rev()), (200, 204));
    let r = c
        .get("cs/", Some(prefix().with_revision(203)))
        .await
        .unwrap();
    assert_eq!(r.count(), 200);
    assert_eq!(c.get("cs/", Some(prefix())).await.unwrap().count(), 0);
}

/// Maintenance.Hash (python-etcd3's and aetcd's test suites call it): the same state hashes
/// the same, a write changes the hash, and the header carries the revision.
#[tokio::test]
async fn maintenance_hash_follows_the_kv_state() {
    let server = Server::start();
    let mut c = server.client().await;
    c.put("hash/a", "1", None).await.unwrap();
    let first = c.hash().await.expect("Hash is served");
    let again = c.hash().await.unwrap();
    assert_eq!(first.hash(), again.hash(), "no write, same hash");
    let rev = put_rev(&mut c, "hash/a", "2").await;
    let after = c.hash().await.unwrap();
    assert_ne!(first.hash(), after.hash(), "a write changes the hash");
    assert_eq!(after.rev(), rev);
}
