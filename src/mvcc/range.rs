//! Key ranges with etcd's `key`/`range_end` rules, and the merge that turns per-shard range
//! results into one `RangeResponse` (etcd `server/etcdserver/apply.go`, `Range`).

use crate::proto::etcdserverpb::{
    range_request::SortOrder, range_request::SortTarget, RangeRequest,
};
use crate::proto::mvccpb::KeyValue;

/// Where a range stops (etcd `rpc.proto`, `RangeRequest.range_end`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RangeEnd {
    /// `range_end` empty: only `start` itself.
    Single,
    /// `range_end` is `"\0"`: every key >= `start`.
    Unbounded,
    /// Every key in `[start, end)`.
    Before(Vec<u8>),
}

/// A half-open key interval as etcd requests describe it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRange {
    /// First key (inclusive).
    pub start: Vec<u8>,
    /// Where the range ends.
    pub end: RangeEnd,
}

impl KeyRange {
    /// Every key (etcd's key "\0" with range end "\0").
    pub fn everything() -> Self {
        KeyRange {
            start: Vec::new(),
            end: RangeEnd::Unbounded,
        }
    }

    /// Builds the range from a request's `key` and `range_end` fields.
    pub fn from_request(key: &[u8], range_end: &[u8]) -> Self {
        let end = match range_end {
            [] => RangeEnd::Single,
            [0] => RangeEnd::Unbounded,
            end => RangeEnd::Before(end.to_vec()),
        };
        KeyRange {
            start: key.to_vec(),
            end,
        }
    }

    /// The single key, if this range names exactly one.
    pub fn single_key(&self) -> Option<&[u8]> {
        match self.end {
            RangeEnd::Single => Some(&self.start),
            _ => None,
        }
    }

    /// Whether `key` falls inside the range.
    pub fn contains(&self, key: &[u8]) -> bool {
        match &self.end {
            RangeEnd::Single => key == self.start.as_slice(),
            RangeEnd::Unbounded => key >= self.start.as_slice(),
            RangeEnd::Before(end) => key >= self.start.as_slice() && key < end.as_slice(),
        }
    }
}

/// One shard's answer to a range: matching keys in key order, and how many live keys the range
/// holds in that shard (before limit and min/max filters, as etcd counts).
#[derive(Clone, Debug, Default)]
pub struct PartialRange {
    /// Key-ordered matches, already filtered by min/max revisions and cut to `limit + 1` when
    /// the request allows pushing the limit down.
    pub kvs: Vec<KeyValue>,
    /// Live keys in the range at the read revision.
    pub count: i64,
}

/// The limit a shard may apply itself: etcd fetches everything when it must sort or filter,
/// and one extra key otherwise so it can report `more`.
pub fn pushdown_limit(req: &RangeRequest) -> usize {
    let filtered = req.min_mod_revision != 0
        || req.max_mod_revision != 0
        || req.min_create_revision != 0
        || req.max_create_revision != 0;
    if req.sort_order != SortOrder::None as i32 || filtered || req.limit <= 0 {
        0
    } else {
        req.limit as usize + 1
    }
}

/// Whether a key-value passes the request's min/max mod/create revision filters (0 = unset).
pub fn passes_filters(req: &RangeRequest, kv: &KeyValue) -> bool {
    !((req.max_mod_revision != 0 && kv.mod_revision > req.max_mod_revision)
        || (req.min_mod_revision != 0 && kv.mod_revision < req.min_mod_revision)
        || (req.max_create_revision != 0 && kv.create_revision > req.max_create_revision)
        || (req.min_create_revision != 0 && kv.create_revision < req.min_create_revision))
}

/// The merged result of a range over every shard it touched.
#[derive(Debug, Default)]
pub struct MergedRange {
    /// Key-values in the requested order, cut to `limit`.
    pub kvs: Vec<KeyValue>,
    /// Whether more keys matched than `limit` returned.
    pub more: bool,
    /// Live keys in the whole range, ignoring limit and filters.
    pub count: i64,
}

/// Merges per-shard results in key order, then sorts and limits exactly as etcd does.
pub fn merge(req: &RangeRequest, parts: Vec<PartialRange>) -> MergedRange {
    let count = parts.iter().map(|p| p.count).sum();
    if req.count_only {
        return MergedRange {
            kvs: Vec::new(),
            more: false,
            count,
        };
    }
    let multiple = parts.iter().filter(|p| !p.kvs.is_empty()).count() > 1;
    let mut kvs: Vec<KeyValue> = parts.into_iter().flat_map(|p| p.kvs).collect();
    if multiple {
        kvs.sort_unstable_by(|a, b| a.key.cmp(&b.key));
    }

    // etcd: a non-key target without an order sorts ascending; KEY/ASCEND is already the order.
    let target = SortTarget::try_from(req.sort_target).unwrap_or(SortTarget::Key);
    let mut order = SortOrder::try_from(req.sort_order).unwrap_or(SortOrder::None);
    if target != SortTarget::Key && order == SortOrder::None {
        order = SortOrder::Ascend;
    } else if target == SortTarget::Key && order == SortOrder::Ascend {
        order = SortOrder::None;
    }
    if order != SortOrder::None {
        let key = |kv: &KeyValue| -> (i64, Vec<u8>) {
            match target {
                SortTarget::Key => (0, kv.key.clone()),
                SortTarget::Version => (kv.version, Vec::new()),
                SortTarget::Create => (kv.create_revision, Vec::new()),
                SortTarget::Mod => (kv.mod_revision, Vec::new()),
                SortTarget::Value => (0, kv.value.clone()),
            }
        };
        // Stable, and reversed by comparator rather than by reversing the slice, so ties stay
        // in key order either way, as etcd's sort of a key-ordered slice leaves them.
        if order == SortOrder::Descend {
            kvs.sort_by_key(|kv| std::cmp::Reverse(key(kv)));
        } else {
            kvs.sort_by_key(key);
        }
    }
    let mut more = false;
    if req.limit > 0 && kvs.len() > req.limit as usize {
        kvs.truncate(req.limit as usize);
        more = true;
    }
    MergedRange { kvs, more, count }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, create: i64) -> KeyValue {
        KeyValue {
            key: key.into(),
            create_revision: create,
            mod_revision: create,
            version: 1,
            ..Default::default()
        }
    }

    #[test]
    fn range_end_rules() {
        assert_eq!(
            KeyRange::from_request(b"a", b"").single_key(),
            Some(&b"a"[..])
        );
        let all_from = KeyRange::from_request(b"b", b"\0");
        assert!(all_from.contains(b"zzz") && !all_from.contains(b"a"));
        let prefix = KeyRange::from_request(b"ab", b"ac");
        assert!(prefix.contains(b"ab") && prefix.contains(b"abz") && !prefix.contains(b"ac"));
        let all = KeyRange::from_request(b"\0", b"\0");
        assert!(all.contains(b"\0") && all.contains(b"a"));
    }

    #[test]
    fn merge_orders_limits_and_counts() {
        let parts = vec![
            PartialRange {
                kvs: vec![kv("a", 3), kv("c", 1)],
                count: 2,
            },
            PartialRange {
                kvs: vec![kv("b", 2)],
                count: 5,
            },
        ];
        let req = RangeRequest {
            limit: 2,
            ..Default::default()
        };
        let m = merge(&req, parts.clone());
        assert_eq!(m.count, 7);
        assert!(m.more);
        assert_eq!(
            m.kvs.iter().map(|k| k.key.clone()).collect::<Vec<_>>(),
            vec![b"a".to_vec(), b"b".to_vec()]
        );

        let req = RangeRequest {
            sort_target: SortTarget::Create as i32,
            sort_order: SortOrder::Descend as i32,
            ..Default::default()
        };
        let m = merge(&req, parts);
        assert_eq!(
            m.kvs.iter().map(|k| k.create_revision).collect::<Vec<_>>(),
            vec![3, 2, 1]
        );
        assert!(!m.more);

        // Ties under a descending sort keep ascending key order (matches etcd 3.4.23).
        let tied = vec![PartialRange {
            kvs: vec![kv("x", 6), kv("y", 6), kv("a", 2)],
            count: 3,
        }];
        let req = RangeRequest {
            sort_target: SortTarget::Mod as i32,
            sort_order: SortOrder::Descend as i32,
            ..Default::default()
        };
        let m = merge(&req, tied);
        assert_eq!(
            m.kvs.iter().map(|k| k.key.clone()).collect::<Vec<_>>(),
            vec![b"x".to_vec(), b"y".to_vec(), b"a".to_vec()]
        );
    }
}
