//! A minimal read-only bbolt reader: enough to walk the buckets of an etcd snapshot file.
//!
//! Why not `bbolt-rs` (which writes our snapshot files): its 1.3.10 release refuses databases
//! whose freelist is not stored ("PGID_NO_FREE_LIST not currently supported"), and etcd opens
//! its backend with `NoFreelistSync`, so every file `etcdctl snapshot save` fetches from etcd
//! is one of those. A reader needs no freelist, so this walks the pages itself.
//!
//! Layout (go.etcd.io/bbolt `page.go`, `db.go`, `bucket.go`; native byte order, little-endian
//! on the platforms etcd ships for):
//! * every page starts with a 16-byte header: `id u64, flags u16, count u16, overflow u32`;
//!   flags 0x01 branch, 0x02 leaf, 0x04 meta, 0x10 freelist; a page spans `1 + overflow`
//!   pages.
//! * pages 0 and 1 are meta pages: after the header, `magic u32 (0xED0CDAED), version u32 (2),
//!   pageSize u32, flags u32, root {pgid u64, sequence u64}, freelist u64, pgid u64, txid u64,
//!   checksum u64` (FNV-1a 64 of the fields before it). The valid one with the higher txid
//!   is current.
//! * a branch page holds `count` elements `pos u32, ksize u32, pgid u64`; a leaf page
//!   `flags u32, pos u32, ksize u32, vsize u32`; `pos` is relative to the element itself.
//! * a leaf element with flag 0x01 is a sub-bucket: its value is `root u64, sequence u64`,
//!   followed, when `root` is 0, by an inline page holding the bucket's one leaf.

const MAGIC: u32 = 0xED0C_DAED;
const VERSION: u32 = 2;
const PAGE_HEADER: usize = 16;
const ELEMENT: usize = 16;
const BRANCH: u16 = 0x01;
const LEAF: u16 = 0x02;
const BUCKET_LEAF: u32 = 0x01;
/// Deeper trees than this are taken as a cycle in a damaged file.
const MAX_DEPTH: usize = 64;

/// Why a file could not be read as a bbolt database.
#[derive(Debug, thiserror::Error)]
#[error("invalid database: {0}")]
pub struct BoltError(String);

fn bad<T>(why: impl Into<String>) -> Result<T, BoltError> {
    Err(BoltError(why.into()))
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, BoltError> {
    match b.get(at..at + 2) {
        Some(s) => Ok(u16::from_le_bytes(s.try_into().expect("2 bytes"))),
        None => bad("truncated page"),
    }
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, BoltError> {
    match b.get(at..at + 4) {
        Some(s) => Ok(u32::from_le_bytes(s.try_into().expect("4 bytes"))),
        None => bad("truncated page"),
    }
}

fn u64_at(b: &[u8], at: usize) -> Result<u64, BoltError> {
    match b.get(at..at + 8) {
        Some(s) => Ok(u64::from_le_bytes(s.try_into().expect("8 bytes"))),
        None => bad("truncated page"),
    }
}

fn fnv64a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Where a bucket's entries are: a page of the file, or an inline page inside its parent's
/// leaf.
#[derive(Clone, Copy)]
pub enum Bucket<'a> {
    /// The root page of the bucket's tree.
    Page(u64),
    /// An inline bucket's leaf page.
    Inline(&'a [u8]),
}

/// A bbolt database held in memory, read-only.
pub struct Db<'a> {
    data: &'a [u8],
    page_size: usize,
    root: u64,
}

impl<'a> Db<'a> {
    /// Reads the meta pages of `data` (a whole database file).
    ///
    /// Errors: neither meta page is valid (wrong magic, version or checksum).
    pub fn open(data: &'a [u8]) -> Result<Self, BoltError> {
        let meta = |off: usize| -> Option<(u64, usize, u64)> {
            let m = data.get(off + PAGE_HEADER..off + PAGE_HEADER + 64)?;
            let magic = u32::from_le_bytes(m[0..4].try_into().ok()?);
            let version = u32::from_le_bytes(m[4..8].try_into().ok()?);
            let page_size = u32::from_le_bytes(m[8..12].try_into().ok()?) as usize;
            let root = u64::from_le_bytes(m[16..24].try_into().ok()?);
            let txid = u64::from_le_bytes(m[48..56].try_into().ok()?);
            let checksum = u64::from_le_bytes(m[56..64].try_into().ok()?);
            (magic == MAGIC
                && version == VERSION
                && page_size >= 512
                && checksum == fnv64a(&m[..56]))
            .then_some((txid, page_size, root))
        };
        let first = meta(0);
        // The second meta page sits one page in: the first's page size, else the usual 4 KiB.
        let second = meta(first.map_or(4096, |(_, ps, _)| ps));
        let best = match (first, second) {
            (Some(a), Some(b)) => Some(if b.0 > a.0 { b } else { a }),
            (a, b) => a.or(b),
        };
        match best {
            Some((_, page_size, root)) => Ok(Db {
                data,
                page_size,
                root,
            }),
            None => bad("no valid meta page (not a bbolt file, or damaged)"),
        }
    }

    /// The database's page size, bytes.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    fn page(&self, id: u64) -> Result<&'a [u8], BoltError> {
        let start = (id as usize)
            .checked_mul(self.page_size)
            .filter(|&s| s + PAGE_HEADER <= self.data.len())
            .ok_or_else(|| BoltError(format!("page {id} beyond the end of the file")))?;
        let overflow = u32_at(self.data, start + 12)? as usize;
        let end = (start + (overflow + 1) * self.page_size).min(self.data.len());
        Ok(&self.data[start..end])
    }

    /// The top-level bucket `name`, if the file has it.
    ///
    /// Errors: a damaged page on the way.
    pub fn bucket(&self, name: &[u8]) -> Result<Option<Bucket<'a>>, BoltError> {
        let mut found = None;
        self.walk(Bucket::Page(self.root), 0, &mut |k, v, is_bucket| {
            if is_bucket && k == name {
                found = Some(sub_bucket(v)?);
            }
            Ok(())
        })?;
        Ok(found)
    }

    /// The names of the top-level buckets, in key order.
    ///
    /// Errors: a damaged page.
    pub fn bucket_names(&self) -> Result<Vec<&'a [u8]>, BoltError> {
        let mut names = Vec::new();
        self.walk(Bucket::Page(self.root), 0, &mut |k, _, is_bucket| {
            if is_bucket {
                names.push(k);
            }
            Ok(())
        })?;
        Ok(names)
    }

    /// Calls `f(key, value)` for every plain entry of `bucket` in key order (sub-buckets are
    /// skipped).
    ///
    /// Errors: a damaged page, or whatever `f` returns.
    pub fn for_each(
        &self,
        bucket: Bucket<'a>,
        f: &mut dyn FnMut(&'a [u8], &'a [u8]) -> Result<(), BoltError>,
    ) -> Result<(), BoltError> {
        self.walk(bucket, 0, &mut |k, v, is_bucket| {
            if is_bucket {
                Ok(())
            } else {
                f(k, v)
            }
        })
    }

    fn walk(
        &self,
        bucket: Bucket<'a>,
        depth: usize,
        f: &mut dyn FnMut(&'a [u8], &'a [u8], bool) -> Result<(), BoltError>,
    ) -> Result<(), BoltError> {
        if depth > MAX_DEPTH {
            return bad("tree too deep (a page cycle?)");
        }
        let page = match bucket {
            Bucket::Page(id) => self.page(id)?,
            Bucket::Inline(p) => p,
        };
        let flags = u16_at(page, 8)?;
        let count = u16_at(page, 10)? as usize;
        for i in 0..count {
            let e = PAGE_HEADER + i * ELEMENT;
            if flags & BRANCH != 0 {
                let child = u64_at(page, e + 8)?;
                self.walk(Bucket::Page(child), depth + 1, f)?;
            } else if flags & LEAF != 0 {
                let eflags = u32_at(page, e)?;
                let pos = u32_at(page, e + 4)? as usize;
                let ksize = u32_at(page, e + 8)? as usize;
                let vsize = u32_at(page, e + 12)? as usize;
                let k = e + pos;
                let key = page
                    .get(k..k + ksize)
                    .ok_or_else(|| BoltError("leaf key beyond its page".into()))?;
                let value = page
                    .get(k + ksize..k + ksize + vsize)
                    .ok_or_else(|| BoltError("leaf value beyond its page".into()))?;
                f(key, value, eflags & BUCKET_LEAF != 0)?;
            } else {
                return bad(format!("page with flags {flags:#x} inside a bucket tree"));
            }
        }
        Ok(())
    }
}

/// The bucket a bucket-leaf value describes.
fn sub_bucket(v: &[u8]) -> Result<Bucket<'_>, BoltError> {
    let root = u64_at(v, 0)?;
    if root != 0 {
        return Ok(Bucket::Page(root));
    }
    match v.get(16..) {
        Some(inline) if inline.len() >= PAGE_HEADER => Ok(Bucket::Inline(inline)),
        _ => bad("inline bucket without its page"),
    }
}
