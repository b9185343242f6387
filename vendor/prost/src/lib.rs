#![doc(html_root_url = "https://docs.rs/prost/0.14.4")]
#![cfg_attr(not(feature = "std"), no_std)]
#![doc = include_str!("../README.md")]

// Re-export the alloc crate for use within derived code.
#[doc(hidden)]
pub extern crate alloc;

// Re-export the bytes crate for use within derived code.
pub use bytes;

mod error;
mod message;
mod name;
mod types;

#[doc(hidden)]
pub mod encoding;

pub use crate::encoding::length_delimiter::{
    decode_length_delimiter, encode_length_delimiter, length_delimiter_len,
};
pub use crate::error::{DecodeError, EncodeError, UnknownEnumValue};
pub use crate::message::Message;
pub use crate::name::Name;

// See `encoding::DecodeContext` for more info.
// MetaStore patch (see PATCH.md): upstream uses 100, the C++ implementation's default. etcd
// accepts a Txn nested as deep as `--max-txn-ops` allows (128 by default), and each level of
// nesting is two messages deep (TxnRequest -> RequestOp -> TxnRequest), so 100 stops at about
// 49 levels. 1100 decodes the 512 levels MetaStore accepts, inside a Raft log `Proposal`.
#[cfg(not(feature = "no-recursion-limit"))]
const RECURSION_LIMIT: u32 = 1100;

// Re-export #[derive(Message, Enumeration, Oneof)].
// Based on serde's equivalent re-export [1], but enabled by default.
//
// [1]: https://github.com/serde-rs/serde/blob/v1.0.89/serde/src/lib.rs#L245-L256
#[cfg(feature = "derive")]
#[allow(unused_imports)]
#[macro_use]
extern crate prost_derive;
#[cfg(feature = "derive")]
#[doc(hidden)]
pub use prost_derive::*;
