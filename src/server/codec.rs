//! The protobuf codec of every gRPC service MetaStore serves and calls (set in `proto/build.rs`).
//!
//! It is tonic-prost's codec, except for one decode failure: a `TxnRequest` nested deeper than
//! the protobuf decoder follows (see `vendor/prost/PATCH.md`) is refused as etcd refuses it,
//! with InvalidArgument "etcdserver: too many operations in txn request", instead of INTERNAL
//! "failed to decode Protobuf message". etcd decodes any depth and then runs out of its op
//! budget (`checkTxnRequest`) long before this depth; the client sees the same error either
//! way, and nothing is proposed.

use std::any::TypeId;
use std::marker::PhantomData;

use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

use crate::error::EtcdError;
use crate::proto::etcdserverpb::TxnRequest;

/// tonic-prost's codec with etcd's error for over-deep txns (see the module docs).
#[derive(Debug, Clone)]
pub struct EtcdCodec<T, U> {
    inner: ProstCodec<T, U>,
}

impl<T, U> Default for EtcdCodec<T, U> {
    fn default() -> Self {
        EtcdCodec {
            inner: ProstCodec::default(),
        }
    }
}

impl<T, U> Codec for EtcdCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = EtcdDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.inner.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        EtcdDecoder {
            inner: self.inner.decoder(),
            _message: PhantomData,
        }
    }
}

/// Decodes `U` with prost; see [`EtcdCodec`].
#[derive(Debug)]
pub struct EtcdDecoder<U> {
    inner: ProstDecoder<U>,
    _message: PhantomData<U>,
}

impl<U> Decoder for EtcdDecoder<U>
where
    U: prost::Message + Default + 'static,
{
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.inner
            .decode(buf)
            .map_err(|status| map_decode_error::<U>(status))
    }

    fn buffer_settings(&self) -> tonic::codec::BufferSettings {
        self.inner.buffer_settings()
    }
}

/// etcd's status for a decode failure of a `U`.
fn map_decode_error<U: 'static>(status: Status) -> Status {
    if TypeId::of::<U>() == TypeId::of::<TxnRequest>()
        && status.message().contains("recursion limit reached")
    {
        return EtcdError::TooManyOps.into();
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::etcdserverpb::RangeRequest;

    #[test]
    fn only_over_deep_txns_get_etcds_error() {
        let deep = Status::internal("failed to decode Protobuf message: recursion limit reached");
        let mapped = map_decode_error::<TxnRequest>(deep.clone());
        assert_eq!(mapped.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            mapped.message(),
            "etcdserver: too many operations in txn request"
        );
        // Other messages cannot nest: whatever fails there stays as prost reported it.
        assert_eq!(
            map_decode_error::<RangeRequest>(deep).code(),
            tonic::Code::Internal
        );
        let other = Status::internal("failed to decode Protobuf message: invalid wire type");
        assert_eq!(
            map_decode_error::<TxnRequest>(other).code(),
            tonic::Code::Internal
        );
    }
}
