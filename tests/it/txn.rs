//! Txn through `etcd-client`: compares, branches, revisions, nesting, validation, and
//! atomicity across shards.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, GetOptions, Txn, TxnOp, TxnOpResponse, TxnResponse,
};
use tonic::Code;

use crate::harness::Server;
use crate::util::{grpc_err, keys, put_rev, strs, values, Rev};

/// Whether `cmp` holds, by running a txn with empty branches (which writes nothing).
async fn holds(c: &mut Client, cmp: Compare) -> bool {
    c.txn(Txn::new().when(vec![cmp])).await.unwrap().succeeded()
}

fn rev(r: &TxnResponse) -> i64 {
    r.rev()
}

#[tokio::test]
async fn compare_targets_and_ops() {
    let server = Server::start();
    let mut c = server.client().await;
    assert_eq!(put_rev(&mut c, "t", "v1").await, 2);
    assert_eq!(put_rev(&mut c, "t", "v2").await, 3);
    // t: value "v2", version 2, create 2, mod 3, lease 0.

    use CompareOp::{Equal as Eq, Greater as Gt, Less as Lt, NotEqual as Ne};
    let cases: Vec<(Compare, bool)> = vec![
        (Compare::value("t", Eq, "v2"), true),
        (Compare::value("t", Eq, "v1"), false),
        (Compare::value("t", Ne, "v1"), true),
        (Compare::value("t", Ne, "v2"), false),
        (Compare::value("t", Gt, "v1"), true),
        (Compare::value("t", Gt, "v3"), false),
        (Compare::value("t", Gt, "v2"), false),
        (Compare::value("t", Lt, "v3"), true),
        (Compare::value("t", Lt, "v1"), false),
        (Compare::version("t", Eq, 2), true),
        (Compare::version("t", Eq, 1), false),
        (Compare::version("t", Ne, 2), false),
        (Compare::version("t", Ne, 3), true),
        (Compare::version("t", Gt, 1), true),
        (Compare::version("t", Gt, 2), false),
        (Compare::version("t", Lt, 3), true),
        (Compare::version("t", Lt, 2), false),
        (Compare::create_revision("t", Eq, 2), true),
        (Compare::create_revision("t", Eq, 3), false),
        (Compare::create_revision("t", Ne, 3), true),
        (Compare::create_revision("t", Gt, 1), true),
        (Compare::create_revision("t", Gt, 2), false),
        (Compare::create_revision("t", Lt, 3), true),
        (Compare::create_revision("t", Lt, 2), false),
        (Compare::mod_revision("t", Eq, 3), true),
        (Compare::mod_revision("t", Eq, 2), false),
        (Compare::mod_revision("t", Ne, 2), true),
        (Compare::mod_revision("t", Gt, 2), true),
        (Compare::mod_revision("t", Gt, 3), false),
        (Compare::mod_revision("t", Lt, 4), true),
        (Compare::mod_revision("t", Lt, 3), false),
        (Compare::lease("t", Eq, 0), true),
        (Compare::lease("t", Ne, 0), false),
        (Compare::lease("t", Gt, 0), false),
        (Compare::lease("t", Lt, 1), true),
        // A missing key: version, create, mod and lease compare as 0 ...
        (Compare::version("nope", Eq, 0), true),
        (Compare::version("nope", Lt, 1), true),
        (Compare::version("nope", Gt, 0), false),
        (Compare::create_revision("nope", Eq, 0), true),
        (Compare::create_revision("nope", Ne, 0), false),
        (Compare::mod_revision("nope", Eq, 0), true),
        (Compare::mod_revision("nope", Gt, 0), false),
        (Compare::lease("nope", Eq, 0), true),
        // ... and a value compare on it is always false.
        (Compare::value("nope", Eq, ""), false),
        (Compare::value("nope", Ne, "x"), false),
        (Compare::value("nope", Lt, "zzz"), false),
        (Compare::value("nope", Gt, ""), false),
    ];
    for (cmp, want) in cases {
        let dbg = format!("{cmp:?}");
        assert_eq!(holds(&mut c, cmp).await, want, "{dbg}");
    }

    // Several compares: all must hold.
    let r = c
        .txn(Txn::new().when(vec![
            Compare::version("t", Eq, 2),
            Compare::value("t", Eq, "v2"),
        ]))
        .await
        .unwrap();
    assert!(r.succeeded());
    let r = c
        .txn(Txn::new().when(vec![
            Compare::version("t", Eq, 2),
            Compare::value("t", Eq, "v1"),
        ]))
        .await
        .unwrap();
    assert!(!r.succeeded());
    // None of this wrote anything.
    assert_eq!(rev(&r), 3);
    assert_eq!(put_rev(&mut c, "after", "x").await, 4);
}

#[tokio::test]
async fn branches() {
    let server = Server::start();
    let mut c = server.client().await;
    assert_eq!(put_rev(&mut c, "b", "1").await, 2);

    let txn = |v: &str| {
        Txn::new()
            .when(vec![Compare::value("b", CompareOp::Equal, v)])
            .and_then(vec![TxnOp::put("then", v, None), TxnOp::get("b", None)])
            .or_else(vec![TxnOp::put("else", v, None)])
    };
    let r = c.txn(txn("1")).await.unwrap();
    assert!(r.succeeded());
    assert_eq!(rev(&r), 3);
    let ops = r.op_responses();
    assert_eq!(ops.len(), 2);
    match &ops[0] {
        TxnOpResponse::Put(p) => assert_eq!(p.rev(), 3),
        other => panic!("expected a put response, got {other:?}"),
    }
    match &ops[1] {
        TxnOpResponse::Get(g) => assert_eq!(
            (keys(g.kvs()), values(g.kvs())),
            (strs(&["b"]), strs(&["1"]))
        ),
        other => panic!("expected a range response, got {other:?}"),
    }

    let r = c.txn(txn("2")).await.unwrap();
    assert!(!r.succeeded());
    assert_eq!(rev(&r), 4);
    let ops = r.op_responses();
    assert_eq!(ops.len(), 1);
    assert!(
        matches!(&ops[0], TxnOpResponse::Put(p) if p.rev() == 4),
        "{ops:?}"
    );

    assert_eq!(
        values(c.get("then", None).await.unwrap().kvs()),
        strs(&["1"])
    );
    assert_eq!(
        values(c.get("else", None).await.unwrap().kvs()),
        strs(&["2"])
    );

    // An empty txn: succeeds, writes nothing.
    let r = c.txn(Txn::new()).await.unwrap();
    assert!(r.succeeded());
    assert_eq!((rev(&r), r.op_responses().len()), (4, 0));
    // The header is complete.
    let h = r.header().unwrap();
    assert!(
        h.cluster_id() != 0 && h.member_id() != 0 && h.raft_term() != 0,
        "{h:?}"
    );
}

#[tokio::test]
async fn compare_over_a_range() {
    let server = Server::start();
    let mut c = server.client().await;
    for (k, want) in [("r/1", 2), ("r/2", 3), ("r/3", 4), ("r/2", 5)] {
        assert_eq!(put_rev(&mut c, k, "x").await, want);
    }
    // r/1: create 2 mod 2 ver 1; r/2: create 3 mod 5 ver 2; r/3: create 4 mod 4 ver 1.
    use CompareOp::{Equal as Eq, Greater as Gt, Less as Lt};
    let cases: Vec<(Compare, bool)> = vec![
        (Compare::value("r/", Eq, "x").with_prefix(), true),
        (Compare::version("r/", Gt, 0).with_prefix(), true),
        (Compare::version("r/", Eq, 1).with_prefix(), false),
        (Compare::mod_revision("r/", Lt, 5).with_prefix(), false),
        (Compare::mod_revision("r/", Lt, 6).with_prefix(), true),
        (
            Compare::create_revision("r/1", Lt, 4).with_range("r/3"),
            true,
        ),
        (
            Compare::create_revision("r/1", Lt, 4).with_range("r/4"),
            false,
        ),
        (Compare::version("r/1", Eq, 1).with_range("r/2"), true),
        // An empty range compares like a missing key.
        (Compare::version("q/", Eq, 0).with_prefix(), true),
        (Compare::mod_revision("q/", Eq, 0).with_prefix(), true),
        (Compare::value("q/", Eq, "").with_prefix(), false),
    ];
    for (cmp, want) in cases {
        let dbg = format!("{cmp:?}");
        assert_eq!(holds(&mut c, cmp).await, want, "{dbg}");
    }
    assert_eq!(put_rev(&mut c, "r/3", "y").await, 6);
    assert!(!holds(&mut c, Compare::value("r/", Eq, "x").with_prefix()).await);
    assert!(holds(&mut c, Compare::value("r/", Eq, "x").with_range("r/3")).await);
}

#[tokio::test]
async fn one_revision_per_txn() {
    let server = Server::start();
    let mut c = server.client().await;
    assert_eq!(put_rev(&mut c, "pre", "0").await, 2);

    let r = c
        .txn(Txn::new().and_then(vec![
            TxnOp::put("a1", "1", None),
            TxnOp::put("a2", "2", None),
            TxnOp::put("a3", "3", None),
            TxnOp::put("pre", "1", None),
        ]))
        .await
        .unwrap();
    assert!(r.succeeded());
    assert_eq!(rev(&r), 3);
    for op in r.op_responses() {
        match op {
            TxnOpResponse::Put(p) => assert_eq!(p.rev(), 3),
            other => panic!("expected put responses, got {other:?}"),
        }
    }
    let g = c
        .get("", Some(GetOptions::new().with_from_key()))
        .await
        .unwrap();
    assert_eq!(keys(g.kvs()), strs(&["a1", "a2", "a3", "pre"]));
    assert_eq!(
        g.kvs()
            .iter()
            .map(|kv| kv.mod_revision())
            .collect::<Vec<_>>(),
        vec![3, 3, 3, 3]
    );
    assert_eq!(
        g.kvs()
            .iter()
            .map(|kv| kv.create_revision())
            .collect::<Vec<_>>(),
        vec![3, 3, 3, 2]
    );
    assert_eq!(
        g.kvs().iter().map(|kv| kv.version()).collect::<Vec<_>>(),
        vec![1, 1, 1, 2]
    );

    // Read-only.
    let r = c
        .txn(Txn::new().and_then(vec![
            TxnOp::get("a1", None),
            TxnOp::get("a", Some(GetOptions::new().with_prefix())),
        ]))
        .await
        .unwrap();
    assert_eq!(rev(&r), 3);
    match &r.op_responses()[1] {
        TxnOpResponse::Get(g) => {
            assert_eq!((keys(g.kvs()), g.count()), (strs(&["a1", "a2", "a3"]), 3))
        }
        other => panic!("{other:?}"),
    }

    // Deletes that delete nothing.
    let r = c
        .txn(Txn::new().and_then(vec![
            TxnOp::delete("nothing", None),
            TxnOp::delete("zz/", Some(DeleteOptions::new().with_prefix())),
        ]))
        .await
        .unwrap();
    assert_eq!(rev(&r), 3);
    for op in r.op_responses() {
        assert!(
            matches!(&op, TxnOpResponse::Delete(d) if d.deleted() == 0),
            "{op:?}"
        );
    }
    assert_eq!(put_rev(&mut c, "b", "x").await, 4);

    // A delete and a put (outside the deleted range): still one revision.
    let r = c
        .txn(Txn::new().and_then(vec![
            TxnOp::delete(
                "a",
                Some(DeleteOptions::new().with_prefix().with_prev_key()),
            ),
            TxnOp::put("b4", "4", None),
        ]))
        .await
        .unwrap();
    assert_eq!(rev(&r), 5);
    match &r.op_responses()[0] {
        TxnOpResponse::Delete(d) => {
            assert_eq!(d.deleted(), 3);
            assert_eq!(keys(d.prev_kvs()), strs(&["a1", "a2", "a3"]));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        c.get("a", Some(GetOptions::new().with_prefix()))
            .await
            .unwrap()
            .count(),
        0
    );
    let g = c.get("b4", None).await.unwrap();
    assert_eq!(
        (g.kvs()[0].mod_revision(), g.kvs()[0].create_revision()),
        (5, 5)
    );
    // The failure branch's writes count the same way.
    let r = c
        .txn(
            Txn::new()
                .when(vec![Compare::value("pre", CompareOp::Equal, "nope")])
                .or_else(vec![TxnOp::put("f", "1", None)]),
        )
        .await
        .unwrap();
    assert!(!r.succeeded());
    assert_eq!(rev(&r), 6);
    assert_eq!(put_rev(&mut c, "b", "y").await, 7);
}

#[tokio::test]
async fn nested_txn() {
    let server = Server::start();
    let mut c = server.client().await;
    assert_eq!(put_rev(&mut c, "n", "1").await, 2);

    let inner = Txn::new()
        // Compares see the state before the outer txn, not the outer put of "n".
        .when(vec![Compare::value("n", CompareOp::Equal, "1")])
        .and_then(vec![
            TxnOp::put("inner", "i", None),
            TxnOp::get("outer", None),
        ])
        .or_else(vec![TxnOp::put("inner-else", "e", None)]);
    let r = c
        .txn(Txn::new().and_then(vec![
            TxnOp::put("outer", "o", None),
            TxnOp::put("n", "2", None),
            TxnOp::txn(inner),
        ]))
        .await
        .unwrap();
    assert!(r.succeeded());
    assert_eq!(rev(&r), 3);
    let ops = r.op_responses();
    assert_eq!(ops.len(), 3);
    let nested = match &ops[2] {
        TxnOpResponse::Txn(t) => t.clone(),
        other => panic!("expected a txn response, got {other:?}"),
    };
    assert!(
        nested.succeeded(),
        "the nested compare must see n == 1 (pre-txn state)"
    );
    let nops = nested.op_responses();
    assert_eq!(nops.len(), 2);
    assert!(
        matches!(&nops[0], TxnOpResponse::Put(p) if p.rev() == 3),
        "{nops:?}"
    );
    match &nops[1] {
        TxnOpResponse::Get(g) => {
            assert_eq!(
                (keys(g.kvs()), values(g.kvs())),
                (strs(&["outer"]), strs(&["o"]))
            );
            assert_eq!(g.kvs()[0].mod_revision(), 3);
        }
        other => panic!("{other:?}"),
    }
    let g = c
        .get("", Some(GetOptions::new().with_from_key()))
        .await
        .unwrap();
    assert_eq!(keys(g.kvs()), strs(&["inner", "n", "outer"]));
    assert_eq!(values(g.kvs()), strs(&["i", "2", "o"]));
    assert!(g.kvs().iter().all(|kv| kv.mod_revision() == 3));

    // A nested failure branch, inside an outer failure branch.
    let inner = Txn::new()
        .when(vec![Compare::version("missing", CompareOp::Greater, 0)])
        .and_then(vec![TxnOp::put("x", "then", None)])
        .or_else(vec![TxnOp::put("x", "else", None)]);
    let r = c
        .txn(
            Txn::new()
                .when(vec![Compare::value("n", CompareOp::Equal, "1")])
                .or_else(vec![TxnOp::txn(inner)]),
        )
        .await
        .unwrap();
    assert!(!r.succeeded());
    assert_eq!(rev(&r), 4);
    match &r.op_responses()[0] {
        TxnOpResponse::Txn(t) => {
            assert!(!t.succeeded());
            assert_eq!(t.op_responses().len(), 1);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        values(c.get("x", None).await.unwrap().kvs()),
        strs(&["else"])
    );

    // A nested txn that only reads does not bump the revision.
    let inner = Txn::new().and_then(vec![TxnOp::get("x", None)]);
    let r = c
        .txn(Txn::new().and_then(vec![TxnOp::txn(inner)]))
        .await
        .unwrap();
    assert_eq!(rev(&r), 4);
}

#[tokio::test]
async fn reads_see_earlier_writes_of_the_same_txn() {
    let server = Server::start();
    let mut c = server.client().await;
    assert_eq!(put_rev(&mut c, "rw/old", "0").await, 2);
    assert_eq!(put_rev(&mut c, "rw/kept", "k").await, 3);

    let r = c
        .txn(Txn::new().and_then(vec![
            TxnOp::get("rw/new", None),
            TxnOp::put("rw/new", "1", None),
            TxnOp::get("rw/new", None),
            TxnOp::delete("rw/old", None),
            TxnOp::get("rw/", Some(GetOptions::new().with_prefix())),
        ]))
        .await
        .unwrap();
    assert_eq!(rev(&r), 4);
    let ops = r.op_responses();
    match &ops[0] {
        TxnOpResponse::Get(g) => assert_eq!((g.count(), g.kvs().len()), (0, 0)),
        other => panic!("{other:?}"),
    }
    match &ops[2] {
        TxnOpResponse::Get(g) => {
            assert_eq!(values(g.kvs()), strs(&["1"]));
            let kv = &g.kvs()[0];
            assert_eq!(
                (kv.create_revision(), kv.mod_revision(), kv.version()),
                (4, 4, 1)
            );
        }
        other => panic!("{other:?}"),
    }
    match &ops[3] {
        TxnOpResponse::Delete(d) => assert_eq!(d.deleted(), 1),
        other => panic!("{other:?}"),
    }
    match &ops[4] {
        TxnOpResponse::Get(g) => {
            assert_eq!(keys(g.kvs()), strs(&["rw/kept", "rw/new"]));
            assert_eq!(g.count(), 2);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn txn_validation() {
    let server = Server::start();
    let mut c = server.client().await;

    let puts = |n: usize| {
        (0..n)
            .map(|i| TxnOp::put(format!("many/{i:03}"), "v", None))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        grpc_err(c.txn(Txn::new().and_then(puts(129))).await),
        (
            Code::InvalidArgument,
            "etcdserver: too many operations in txn request".to_string()
        )
    );
    assert_eq!(
        grpc_err(c.txn(Txn::new().or_else(puts(129))).await),
        (
            Code::InvalidArgument,
            "etcdserver: too many operations in txn request".to_string()
        )
    );
    let many_cmps: Vec<Compare> = (0..129)
        .map(|i| Compare::version(format!("c{i}"), CompareOp::Equal, 0))
        .collect();
    assert_eq!(
        grpc_err(c.txn(Txn::new().when(many_cmps)).await),
        (
            Code::InvalidArgument,
            "etcdserver: too many operations in txn request".to_string()
        )
    );

    let dup = (
        Code::InvalidArgument,
        "etcdserver: duplicate key given in txn request".to_string(),
    );
    assert_eq!(
        grpc_err(
            c.txn(
                Txn::new().and_then(vec![TxnOp::put("k", "a", None), TxnOp::put("k", "b", None)])
            )
            .await
        ),
        dup
    );
    assert_eq!(
        grpc_err(
            c.txn(Txn::new().and_then(vec![
                TxnOp::delete("d/", Some(DeleteOptions::new().with_prefix())),
                TxnOp::put("d/x", "v", None)
            ]))
            .await
        ),
        dup
    );
    assert_eq!(
        grpc_err(
            c.txn(Txn::new().or_else(vec![TxnOp::put("k", "a", None), TxnOp::put("k", "b", None)]))
                .await
        ),
        dup
    );

    // Empty keys.
    assert_eq!(
        grpc_err(
            c.txn(Txn::new().and_then(vec![TxnOp::put("", "a", None)]))
                .await
        ),
        (
            Code::InvalidArgument,
            "etcdserver: key is not provided".to_string()
        )
    );

    // Nothing was written by the rejected txns.
    assert_eq!(
        c.get("", Some(GetOptions::new().with_from_key()))
            .await
            .unwrap()
            .count(),
        0
    );

    // 128 ops is allowed; the same key in both branches is allowed.
    let r = c.txn(Txn::new().and_then(puts(128))).await.unwrap();
    assert_eq!(rev(&r), 2);
    assert_eq!(
        c.get(
            "many/",
            Some(GetOptions::new().with_prefix().with_count_only())
        )
        .await
        .unwrap()
        .count(),
        128
    );
    let r = c
        .txn(
            Txn::new()
                .when(vec![Compare::version("k", CompareOp::Equal, 0)])
                .and_then(vec![TxnOp::put("k", "then", None)])
                .or_else(vec![TxnOp::put("k", "else", None)]),
        )
        .await
        .unwrap();
    assert!(r.succeeded());
    assert_eq!(rev(&r), 3);
}

#[tokio::test]
async fn kubernetes_style_create() {
    let server = Server::start();
    let mut c = server.client().await;
    let create = |v: &str| {
        Txn::new()
            .when(vec![Compare::mod_revision(
                "/registry/pods/default/p",
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![TxnOp::put("/registry/pods/default/p", v, None)])
            .or_else(vec![TxnOp::get("/registry/pods/default/p", None)])
    };
    let r = c.txn(create("first")).await.unwrap();
    assert!(r.succeeded());
    assert_eq!(rev(&r), 2);

    let r = c.txn(create("second")).await.unwrap();
    assert!(!r.succeeded());
    assert_eq!(rev(&r), 2);
    match &r.op_responses()[0] {
        TxnOpResponse::Get(g) => {
            assert_eq!(values(g.kvs()), strs(&["first"]));
            assert_eq!(g.kvs()[0].mod_revision(), 2);
        }
        other => panic!("{other:?}"),
    }
    // Guarded update at the right mod revision succeeds once.
    let update = || {
        Txn::new()
            .when(vec![Compare::mod_revision(
                "/registry/pods/default/p",
                CompareOp::Equal,
                2,
            )])
            .and_then(vec![TxnOp::put(
                "/registry/pods/default/p",
                "updated",
                None,
            )])
    };
    assert!(c.txn(update()).await.unwrap().succeeded());
    let r = c.txn(update()).await.unwrap();
    assert!(!r.succeeded());
    assert_eq!(rev(&r), 3);
    assert_eq!(
        values(c.get("/registry/pods/default/p", None).await.unwrap().kvs()),
        strs(&["updated"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_shard_txn_is_atomic() {
    const KEYS: usize = 20;
    const ROUNDS: i64 = 40;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::try_start(dir.path(), &["--shards", "4"]).unwrap();
    let names: Vec<String> = (0..KEYS).map(|i| format!("atomic/{i:02}")).collect();
    let mut shards_hit: Vec<usize> = names
        .iter()
        .map(|k| metastore::shard::shard_for(k.as_bytes(), 4))
        .collect();
    shards_hit.sort();
    shards_hit.dedup();
    assert_eq!(
        shards_hit,
        vec![0, 1, 2, 3],
        "the txn's keys must span every shard"
    );

    let mut writer = server.client().await;
    let reader_client = server.client().await;
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut c = reader_client;
            let (mut reads, mut after_done, mut full) = (0u64, 0, 0u64);
            loop {
                let finished = done.load(Ordering::SeqCst);
                let mut opts = GetOptions::new().with_prefix();
                if reads % 2 == 1 {
                    opts = opts.with_serializable();
                }
                let r = c.get("atomic/", Some(opts)).await.unwrap();
                let kvs = r.kvs();
                assert!(
                    kvs.is_empty() || kvs.len() == KEYS,
                    "partial txn visible: {} keys",
                    kvs.len()
                );
                assert_eq!(r.count() as usize, kvs.len());
                if let Some(first) = kvs.first() {
                    full += 1;
                    let (m, v) = (first.mod_revision(), first.value().to_vec());
                    assert!(
                        kvs.iter()
                            .all(|kv| kv.mod_revision() == m && kv.value() == v.as_slice()),
                        "mixed revisions in one read: {:?}",
                        kvs.iter()
                            .map(|kv| (kv.mod_revision(), kv.value_str().unwrap().to_string()))
                            .collect::<Vec<_>>()
                    );
                    // Round r was written at revision r + 2.
                    assert_eq!(format!("round-{}", m - 2).as_bytes(), v.as_slice());
                    assert!(r.rev() >= m);
                }
                reads += 1;
                if finished {
                    after_done += 1;
                    if after_done >= 3 {
                        break;
                    }
                }
                assert!(reads < 1_000_000, "reader did not finish");
            }
            (reads, full)
        })
    };
    for round in 0..ROUNDS {
        let ops: Vec<TxnOp> = names
            .iter()
            .map(|k| TxnOp::put(k.as_str(), format!("round-{round}"), None))
            .collect();
        let r = writer.txn(Txn::new().and_then(ops)).await.unwrap();
        assert_eq!(rev(&r), round + 2);
    }
    done.store(true, Ordering::SeqCst);
    let (reads, full) = reader.await.unwrap();
    assert!(
        full >= 3,
        "the reader saw the finished writes ({reads} reads, {full} complete)"
    );

    let g = writer
        .get("atomic/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(keys(g.kvs()), names);
    assert!(g
        .kvs()
        .iter()
        .all(|kv| kv.mod_revision() == ROUNDS + 1 && kv.version() == ROUNDS));
    assert!(g
        .kvs()
        .iter()
        .all(|kv| kv.value() == format!("round-{}", ROUNDS - 1).as_bytes()));
    // Every intermediate revision is complete too.
    for at in 2..=ROUNDS + 1 {
        let g = writer
            .get(
                "atomic/",
                Some(GetOptions::new().with_prefix().with_revision(at)),
            )
            .await
            .unwrap();
        assert_eq!(g.count() as usize, KEYS, "at {at}");
        assert!(g.kvs().iter().all(|kv| kv.mod_revision() == at), "at {at}");
    }
}

/// A chain of `depth` txns, each the only success op of its parent; the innermost puts
/// `key = value`.
fn txn_chain(depth: usize, key: &str, value: &str) -> Txn {
    let mut t = Txn::new().and_then(vec![TxnOp::put(key, value, None)]);
    for _ in 1..depth {
        t = Txn::new().and_then(vec![TxnOp::txn(t)]);
    }
    t
}

const TOO_MANY_OPS: &str = "etcdserver: too many operations in txn request";

/// Regression (issue 11, defect 1): a txn nested 50 deep passed the front end but did not
/// decode at apply, and apply then skipped every later proposal of the same Raft entry on every
/// member: innocent puts were committed and never applied, their clients timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_nested_txns_do_not_hold_up_other_writes() {
    let server = Server::start();
    for burst in 0..3 {
        let mut tasks = Vec::new();
        for i in 0..20 {
            let mut deep = server.client().await;
            let mut plain = server.client().await;
            tasks.push(tokio::spawn(async move {
                let key = format!("deep/{burst}/{i:02}");
                deep.txn(txn_chain(50, &key, "d")).await.map(|_| ())
            }));
            tasks.push(tokio::spawn(async move {
                let key = format!("plain/{burst}/{i:02}");
                plain.put(key, "p", None).await.map(|_| ())
            }));
        }
        for t in tasks {
            t.await.unwrap().expect("every write succeeds");
        }
    }
    let mut c = server.client().await;
    for prefix in ["deep/", "plain/"] {
        let r = c
            .get(
                prefix,
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await
            .unwrap();
        assert_eq!(r.count(), 60, "{prefix}");
    }
    // 120 writes, one revision each.
    assert_eq!(put_rev(&mut c, "last", "x").await, 122);
}

/// Runs `body` on a current-thread runtime in a thread with a 1 GiB stack: etcd-client encodes,
/// decodes and drops a nested txn recursively, a few hundred bytes of stack per level.
fn on_big_stack<F, Fut, T>(body: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
    T: Send + 'static,
{
    std::thread::Builder::new()
        .stack_size(1 << 30)
        .spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(body())
        })
        .unwrap()
        .join()
        .unwrap()
}

/// etcd's `checkTxnRequest` gives a nested txn what its parent leaves of `--max-txn-ops`, so
/// with the default 128 a chain of 128 txns is accepted and 129 is not. Deeper ones, up to
/// requests far deeper than any decoder follows, get the same error and write nothing.
#[test]
fn nested_txns_as_deep_as_etcd_allows() {
    let server = Server::start();
    let endpoint = server.endpoint.clone();
    on_big_stack(move || async move {
        let mut c = Client::connect([endpoint], None).await.unwrap();
        let r = c.txn(txn_chain(128, "deepest", "v")).await.unwrap();
        assert!(r.succeeded());
        let mut depth = 0;
        let mut op = r.op_responses().into_iter().next();
        while let Some(TxnOpResponse::Txn(inner)) = op {
            depth += 1;
            op = inner.op_responses().into_iter().next();
        }
        assert!(matches!(op, Some(TxnOpResponse::Put(_))));
        assert_eq!(depth, 127, "one response per nested txn");
        let got = c.get("deepest", None).await.unwrap();
        assert_eq!(values(got.kvs()), strs(&["v"]));

        for depth in [129, 600, 5_000] {
            let refused = grpc_err(c.txn(txn_chain(depth, "too-deep", "v")).await);
            assert_eq!(
                refused,
                (Code::InvalidArgument, TOO_MANY_OPS.into()),
                "{depth}"
            );
        }
        let got = c.get("too-deep", None).await.unwrap();
        assert!(got.kvs().is_empty());
        // The server is unharmed.
        put_rev(&mut c, "after", "x").await;
    });
}

/// With a larger `--max-txn-ops`, nesting is still capped at 512 levels (the depth the
/// protobuf decoder and apply are sized for).
#[test]
fn nesting_is_capped_at_512_levels() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::try_start(dir.path(), &["--max-txn-ops", "10000"]).unwrap();
    let endpoint = server.endpoint.clone();
    on_big_stack(move || async move {
        let mut c = Client::connect([endpoint], None).await.unwrap();
        assert!(c
            .txn(txn_chain(512, "k512", "v"))
            .await
            .unwrap()
            .succeeded());
        assert_eq!(
            grpc_err(c.txn(txn_chain(513, "k513", "v")).await),
            (Code::InvalidArgument, TOO_MANY_OPS.into())
        );
        let got = c
            .get("k", Some(GetOptions::new().with_prefix()))
            .await
            .unwrap();
        assert_eq!(keys(got.kvs()), strs(&["k512"]));
    });
}
