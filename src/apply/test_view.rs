//! An in-memory [`ShardView`] for the rules' unit tests: one [`Store`] as the whole keyspace
//! and a [`LeaseTable`], driven as the dispatcher drives its shards.

use std::cell::RefCell;

use super::compaction::CompactView;
use super::lease::LeaseView;
use super::txn::{self, ShardView, TxnOutcome};
use crate::error::EtcdError;
use crate::lease::LeaseTable;
use crate::mvcc::memory::MemoryEngine;
use crate::mvcc::range::{merge, MergedRange};
use crate::mvcc::store::{combine_compare, PutArgs};
use crate::mvcc::{KeyRange, KeyValue, Store};
use crate::proto::etcdserverpb::{Compare, PutRequest, RangeRequest, TxnRequest};

/// One in-memory store as the whole keyspace.
pub(crate) struct Memory {
    pub store: RefCell<Store>,
    pub revision: i64,
    pub leases: LeaseTable,
}

impl Memory {
    pub fn new() -> Self {
        Memory {
            store: RefCell::new(Store::new(Box::new(MemoryEngine::new()))),
            revision: 1,
            leases: LeaseTable::default(),
        }
    }

    /// Applies `txn` as the dispatcher does: the revision moves if it wrote.
    pub fn txn(&mut self, txn: &TxnRequest) -> Result<TxnOutcome, EtcdError> {
        let out = txn::apply(&*self, txn)?;
        if out.wrote {
            self.revision += 1;
        }
        Ok(out)
    }
}

impl ShardView for Memory {
    fn revision(&self) -> i64 {
        self.revision
    }
    fn compact_revision(&self) -> i64 {
        self.store.borrow().compact_revision()
    }
    fn compares_hold(&self, compares: &[Compare]) -> bool {
        let store = self.store.borrow();
        compares
            .iter()
            .all(|c| combine_compare(c, [store.compare(c, self.revision).unwrap()]))
    }
    fn latest(&self, key: &[u8]) -> Option<KeyValue> {
        self.store.borrow().get(key, self.revision).unwrap()
    }
    fn lease_granted(&self, id: i64) -> bool {
        self.leases.contains(id)
    }
    fn range(&self, r: &RangeRequest, rev: i64) -> MergedRange {
        let part = self.store.borrow().range(r, rev).unwrap().unwrap();
        merge(r, vec![part])
    }
    fn put(&self, p: PutRequest, rev: i64, sub: u32) -> Option<KeyValue> {
        let args = PutArgs {
            key: &p.key,
            value: &p.value,
            lease: p.lease,
            ignore_value: p.ignore_value,
            ignore_lease: p.ignore_lease,
        };
        let prev = self.store.borrow_mut().put(args, rev, sub);
        prev.unwrap().filter(|_| p.prev_kv)
    }
    fn delete(&self, range: &KeyRange, rev: i64, sub: u32) -> Vec<KeyValue> {
        self.store
            .borrow_mut()
            .delete_range(range, rev, sub)
            .unwrap()
    }
}

impl LeaseView for Memory {
    fn revoke_keys(&self, lease: i64, rev: i64, sub: u32) -> Vec<KeyValue> {
        self.store
            .borrow_mut()
            .revoke_lease(lease, rev, sub)
            .unwrap()
    }
}

impl CompactView for Memory {
    fn compact(&self, rev: i64) {
        self.store.borrow_mut().compact(rev);
    }
}
