//! Small helpers shared by the test modules.

use etcd_client::{Client, KeyValue};
use tonic::Code;

/// The gRPC code and message of a failed etcd-client call; panics if the call succeeded or
/// failed with something other than a gRPC status.
pub fn grpc_err<T: std::fmt::Debug>(r: Result<T, etcd_client::Error>) -> (Code, String) {
    match r {
        Err(etcd_client::Error::GRpcStatus(s)) => (s.code(), s.message().to_string()),
        Err(e) => panic!("expected a gRPC status, got {e:?}"),
        Ok(v) => panic!("expected a gRPC error, got success: {v:?}"),
    }
}

/// The keys of `kvs` as strings, in order.
pub fn keys(kvs: &[KeyValue]) -> Vec<String> {
    kvs.iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect()
}

/// The values of `kvs` as strings, in order.
pub fn values(kvs: &[KeyValue]) -> Vec<String> {
    kvs.iter()
        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
        .collect()
}

/// Owned strings from string literals, for comparing with [`keys`].
pub fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The message etcd gives for a read or compaction below the compaction revision.
pub const COMPACTED: &str = "etcdserver: mvcc: required revision has been compacted";
/// The message etcd gives for a read or compaction above the current revision.
pub const FUTURE_REV: &str = "etcdserver: mvcc: required revision is a future revision";

/// The revision in a response's header: `r.rev()` for
/// `r.header().unwrap().revision()`.
pub trait Rev {
    /// The header's revision; panics if the response has no header.
    fn rev(&self) -> i64;
}

macro_rules! impl_rev {
    ($($t:ty),* $(,)?) => {
        $(impl Rev for $t {
            fn rev(&self) -> i64 {
                self.header().expect("response header").revision()
            }
        })*
    };
}

impl_rev!(
    etcd_client::PutResponse,
    etcd_client::GetResponse,
    etcd_client::DeleteResponse,
    etcd_client::TxnResponse,
    etcd_client::WatchResponse,
    etcd_client::CompactionResponse,
    etcd_client::LeaseGrantResponse,
    etcd_client::LeaseRevokeResponse,
    etcd_client::LockResponse,
    etcd_client::UnlockResponse,
    etcd_client::CampaignResponse,
    etcd_client::ProclaimResponse,
    etcd_client::ResignResponse,
    etcd_client::LeaderResponse,
    etcd_client::HashResponse,
    etcd_client::HashKvResponse,
);

/// Puts `k = v` and returns the revision the put got.
pub async fn put_rev(c: &mut Client, k: impl AsRef<[u8]>, v: impl AsRef<[u8]>) -> i64 {
    c.put(k.as_ref(), v.as_ref(), None).await.unwrap().rev()
}

/// The value of `k` as a string, or `None` if it is absent.
pub async fn get_value(c: &mut Client, k: impl AsRef<[u8]>) -> Option<String> {
    let r = c.get(k.as_ref(), None).await.unwrap();
    r.kvs()
        .first()
        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
}
