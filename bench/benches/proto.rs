//! Protobuf micro-benchmarks: prost encode and decode of the messages every request carries,
//! by value size (64 to 4096 bytes).
//!
//! Why: each put is decoded from gRPC (`etcdserverpb.PutRequest`), wrapped in a
//! `metastorepb.Proposal` and encoded as the Raft payload, then decoded again by the apply
//! dispatcher; each range answer is encoded as an `etcdserverpb.RangeResponse`. These costs
//! are paid on the front end and dispatcher threads for every request and grow with the value
//! size and, for ranges, with the number of key-values returned.
//!
//! * `proto_put_request/{encode,decode}/<value bytes>`: a `PutRequest` with a 16-byte key.
//!   Encoding goes into a reused buffer (as tonic's codec encodes into its buffer); decoding
//!   builds the message from the wire bytes.
//! * `proto_range_response/{encode,decode}_<n>kv/<value bytes>`: a `RangeResponse` with a
//!   header and n = 1, 10 or 100 `mvccpb.KeyValue`s.
//! * `proto_proposal/{encode,decode}/<value bytes>`: the Raft payload, a `Proposal` carrying
//!   the `PutRequest`: encoded with `encode_to_vec` exactly as `Core::propose` does, decoded
//!   with `decode_length_delimited` from the length-delimited framing the batching proposer
//!   writes, exactly as the dispatcher does.
//!
//! Throughput is reported in encoded bytes.

mod common;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use metastore::proto::etcdserverpb::{PutRequest, RangeResponse, ResponseHeader};
use metastore::proto::metastorepb::{proposal, Proposal};
use metastore::proto::mvccpb::KeyValue;
use prost::Message;

const VALUE_SIZES: [usize; 4] = [64, 256, 1024, 4096];
const RANGE_KVS: [usize; 3] = [1, 10, 100];

fn value(size: usize) -> Vec<u8> {
    (0..size).map(|i| b'a' + (i % 26) as u8).collect()
}

fn put_request(size: usize) -> PutRequest {
    PutRequest {
        key: b"bench/key/000042".to_vec(),
        value: value(size),
        ..Default::default()
    }
}

fn range_response(kvs: usize, size: usize) -> RangeResponse {
    RangeResponse {
        header: Some(ResponseHeader {
            cluster_id: 0x1c8f_2a4e_93b0_77d1,
            member_id: 0x8e9e_05c5_2164_694d,
            revision: 1_000_000,
            raft_term: 2,
        }),
        kvs: (0..kvs)
            .map(|i| KeyValue {
                key: format!("bench/key/{i:06}").into_bytes(),
                create_revision: 1_000 + i as i64,
                mod_revision: 900_000 + i as i64,
                version: 3,
                value: value(size),
                lease: 0,
            })
            .collect(),
        more: false,
        count: kvs as i64,
    }
}

fn proposal(size: usize) -> Proposal {
    Proposal {
        id: 123_456_789,
        origin: 0x1234_5678_9abc_def0,
        request: Some(proposal::Request::Put(put_request(size))),
        auth: None,
    }
}

/// Benchmarks encode (into a reused buffer) and decode of `msg`.
fn encode_decode<M: Message + Default + PartialEq + std::fmt::Debug>(
    c: &mut Criterion,
    group: &str,
    suffix: &str,
    size: usize,
    msg: &M,
) {
    let wire = msg.encode_to_vec();
    assert_eq!(&M::decode(wire.as_slice()).expect("decodes"), msg);
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Bytes(wire.len() as u64));
    let mut buf = Vec::with_capacity(wire.len());
    g.bench_function(BenchmarkId::new(format!("encode{suffix}"), size), |b| {
        b.iter(|| {
            buf.clear();
            black_box(msg).encode(&mut buf).expect("buffer grows");
            black_box(&buf);
        });
    });
    assert_eq!(buf, wire);
    g.bench_function(BenchmarkId::new(format!("decode{suffix}"), size), |b| {
        b.iter(|| M::decode(black_box(wire.as_slice())).expect("decodes"));
    });
    g.finish();
}

fn bench_put_request(c: &mut Criterion) {
    for size in VALUE_SIZES {
        encode_decode(c, "proto_put_request", "", size, &put_request(size));
    }
}

fn bench_range_response(c: &mut Criterion) {
    for kvs in RANGE_KVS {
        for size in VALUE_SIZES {
            let suffix = format!("_{kvs}kv");
            encode_decode(
                c,
                "proto_range_response",
                &suffix,
                size,
                &range_response(kvs, size),
            );
        }
    }
}

fn bench_proposal(c: &mut Criterion) {
    let mut g = c.benchmark_group("proto_proposal");
    for size in VALUE_SIZES {
        let msg = proposal(size);
        let data = msg.encode_to_vec();
        // The framing the batching proposer writes into a Raft entry.
        let mut framed = Vec::new();
        prost::encoding::encode_varint(data.len() as u64, &mut framed);
        framed.extend_from_slice(&data);
        let mut slice = framed.as_slice();
        assert_eq!(
            Proposal::decode_length_delimited(&mut slice).expect("decodes"),
            msg
        );
        assert!(slice.is_empty());

        g.throughput(Throughput::Bytes(data.len() as u64));
        g.bench_function(BenchmarkId::new("encode", size), |b| {
            b.iter(|| black_box(&msg).encode_to_vec());
        });
        g.bench_function(BenchmarkId::new("decode", size), |b| {
            b.iter(|| {
                let mut data = black_box(framed.as_slice());
                Proposal::decode_length_delimited(&mut data).expect("decodes")
            });
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::config();
    targets = bench_put_request, bench_range_response, bench_proposal
}
criterion_main!(benches);
