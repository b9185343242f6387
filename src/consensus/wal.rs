//! The write-ahead log: Raft entries and hard state, appended and fsynced before anything they
//! carry is acknowledged.
//!
//! Layout: `<data-dir>/member/wal/<seq:016x>-<first_index:016x>.wal` segments. Each record is
//!
//! ```text
//! | len: u32 LE | crc32(len): u32 LE | crc32(body): u32 LE | body: type u8 + payload |
//! ```
//!
//! The header carries its own checksum so a damaged length is never trusted. A segment rolls
//! over past [`SEGMENT_BYTES`]; each new segment starts with the latest hard state, so older
//! segments can be deleted once a snapshot covers their entries.
//!
//! Recovery reads every segment in order. A damaged record at the very end of the last segment
//! is a torn write from a crash: it is truncated away (it was never fsynced, hence never
//! acknowledged). Damage anywhere else is corruption and stops start-up with the file and
//! offset.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::prelude::{Entry, HardState};

/// A segment rolls over once it grows past this many bytes.
pub const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
const HEADER: usize = 12;
const ENTRY: u8 = 1;
const HARD_STATE: u8 = 2;

/// WAL failures.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// An I/O error on the named file.
    #[error("wal {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A damaged record that is not a torn tail.
    #[error("wal: corrupt record in {path} at offset {offset}: {reason}")]
    Corrupt {
        /// The segment.
        path: PathBuf,
        /// Byte offset of the damaged record.
        offset: u64,
        /// What was wrong.
        reason: &'static str,
    },
    /// Entries are missing between two records or after the snapshot.
    #[error("wal: missing entries: expected index {expected}, found {found} in {path}")]
    Gap {
        /// The segment.
        path: PathBuf,
        /// The index that should have come next.
        expected: u64,
        /// The index found.
        found: u64,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WalError + '_ {
    move |source| WalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What recovery found.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Entries after the snapshot index, in index order, conflicts resolved (a later record
    /// with an index already seen replaces that entry and everything after it).
    pub entries: Vec<Entry>,
    /// The last hard state recorded.
    pub hard_state: Option<HardState>,
}

struct Segment {
    path: PathBuf,
    first_index: u64,
}

/// An open WAL, appending to its newest segment.
pub struct Wal {
    dir: PathBuf,
    segments: Vec<Segment>,
    file: File,
    size: u64,
    next_seq: u64,
    last_index: u64,
    last_hard_state: HardState,
    buf: Vec<u8>,
    fsync: bool,
}

fn parse_name(p: &Path) -> Option<(u64, u64)> {
    let stem = p.file_name()?.to_str()?.strip_suffix(".wal")?;
    let (seq, first) = stem.split_once('-')?;
    Some((
        u64::from_str_radix(seq, 16).ok()?,
        u64::from_str_radix(first, 16).ok()?,
    ))
}

fn encode_record(buf: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    let len = (payload.len() + 1) as u32;
    let len_bytes = len.to_le_bytes();
    let mut body_crc = crc32fast::Hasher::new();
    body_crc.update(&[kind]);
    body_crc.update(payload);
    buf.extend_from_slice(&len_bytes);
    buf.extend_from_slice(&crc32fast::hash(&len_bytes).to_le_bytes());
    buf.extend_from_slice(&body_crc.finalize().to_le_bytes());
    buf.push(kind);
    buf.extend_from_slice(payload);
}

impl Wal {
    /// Opens (or creates) the WAL in `dir` and recovers every record after `snapshot_index`.
    ///
    /// Errors: [`WalError::Corrupt`] for damage other than a torn tail, [`WalError::Gap`] when
    /// entries are missing, [`WalError::Io`] otherwise.
    pub fn open(
        dir: &Path,
        snapshot_index: u64,
        fsync: bool,
    ) -> Result<(Wal, Recovered), WalError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        let mut named: Vec<(u64, u64, PathBuf)> = fs::read_dir(dir)
            .map_err(io(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter_map(|p| parse_name(&p).map(|(s, f)| (s, f, p)))
            .collect();
        named.sort();
        // A `.tmp` left by an interrupted rollover does not parse as a segment name: ignored.
        let mut rec = Recovered::default();
        let mut segments = Vec::new();
        let count = named.len();
        for (i, (_, first_index, path)) in named.iter().enumerate() {
            read_segment(path, i + 1 == count, snapshot_index, &mut rec)?;
            segments.push(Segment {
                path: path.clone(),
                first_index: *first_index,
            });
        }
        let last_index = rec.entries.last().map_or(snapshot_index, |e| e.index);
        let next_seq = named.last().map_or(0, |(s, _, _)| s + 1);
        let last_hard_state = rec.hard_state.clone().unwrap_or_default();
        let (file, size) = match segments.last() {
            Some(seg) => {
                let f = OpenOptions::new()
                    .append(true)
                    .open(&seg.path)
                    .map_err(io(&seg.path))?;
                let size = f.metadata().map_err(io(&seg.path))?.len();
                (f, size)
            }
            None => {
                let path = dir.join(format!("{:016x}-{:016x}.wal", 0, snapshot_index + 1));
                let f = File::create(&path).map_err(io(&path))?;
                segments.push(Segment {
                    path,
                    first_index: snapshot_index + 1,
                });
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(io(dir))?;
                (f, 0)
            }
        };
        let next_seq = next_seq.max(1);
        let wal = Wal {
            dir: dir.to_path_buf(),
            segments,
            file,
            size,
            next_seq,
            last_index,
            last_hard_state,
            buf: Vec::new(),
            fsync,
        };
        Ok((wal, rec))
    }

    /// Buffers entries and a hard state for the next [`Wal::sync`].
    pub fn append(&mut self, entries: &[Entry], hard_state: Option<&HardState>) {
        for e in entries {
            let bytes = e
                .write_to_bytes()
                .expect("protobuf encoding of an in-memory entry");
            encode_record(&mut self.buf, ENTRY, &bytes);
            self.last_index = e.index;
        }
        if let Some(hs) = hard_state {
            let bytes = hs
                .write_to_bytes()
                .expect("protobuf encoding of an in-memory hard state");
            encode_record(&mut self.buf, HARD_STATE, &bytes);
            self.last_hard_state = hs.clone();
        }
    }

    /// Writes everything buffered with one write and one fsync (group commit), then rolls the
    /// segment over if it is full. With `--unsafe-no-fsync` the fsync is skipped.
    pub fn sync(&mut self) -> Result<(), WalError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let path = &self.segments.last().expect("at least one segment").path;
        self.file.write_all(&self.buf).map_err(io(path))?;
        if self.fsync {
            self.file.sync_data().map_err(io(path))?;
        }
        self.size += self.buf.len() as u64;
        self.buf.clear();
        if self.size >= SEGMENT_BYTES {
            self.roll_over()?;
        }
        Ok(())
    }

    fn roll_over(&mut self) -> Result<(), WalError> {
        let first_index = self.last_index + 1;
        let path = self
            .dir
            .join(format!("{:016x}-{first_index:016x}.wal", self.next_seq));
        let tmp = path.with_extension("tmp");
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        let mut head = Vec::new();
        let hs = self
            .last_hard_state
            .write_to_bytes()
            .expect("hard state encodes");
        encode_record(&mut head, HARD_STATE, &hs);
        f.write_all(&head).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        fs::rename(&tmp, &path).map_err(io(&path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        let f = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        self.file = f;
        self.size = head.len() as u64;
        self.next_seq += 1;
        self.segments.push(Segment { path, first_index });
        Ok(())
    }

    /// Deletes segments whose entries all lie at or below `index` (covered by a snapshot).
    /// The newest segment is always kept.
    pub fn release_to(&mut self, index: u64) {
        while self.segments.len() > 1 && self.segments[1].first_index <= index + 1 {
            let seg = self.segments.remove(0);
            if let Err(e) = fs::remove_file(&seg.path) {
                tracing::warn!(path = %seg.path.display(), error = %e, "could not remove released WAL segment");
            }
        }
    }

    /// Paths of the live segments, oldest first.
    pub fn segment_paths(&self) -> Vec<PathBuf> {
        self.segments.iter().map(|s| s.path.clone()).collect()
    }
}

fn read_segment(
    path: &Path,
    is_last: bool,
    snapshot_index: u64,
    rec: &mut Recovered,
) -> Result<(), WalError> {
    let data = fs::read(path).map_err(io(path))?;
    let len = data.len();
    let mut off = 0usize;
    let corrupt = |offset: usize, reason| WalError::Corrupt {
        path: path.to_path_buf(),
        offset: offset as u64,
        reason,
    };
    while off < len {
        let torn = match parse_record(&data, off) {
            Ok((kind, payload, next)) => {
                apply_record(path, kind, payload, snapshot_index, rec).map_err(|r| match r {
                    RecordError::Gap { expected, found } => WalError::Gap {
                        path: path.to_path_buf(),
                        expected,
                        found,
                    },
                    RecordError::Bad(reason) => corrupt(off, reason),
                })?;
                off = next;
                continue;
            }
            Err(Damage::Torn(reason)) => reason,
            Err(Damage::Corrupt(reason)) => return Err(corrupt(off, reason)),
        };
        if !is_last {
            return Err(corrupt(off, torn));
        }
        tracing::warn!(path = %path.display(), offset = off, reason = torn, "truncating torn WAL tail");
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io(path))?;
        f.set_len(off as u64).map_err(io(path))?;
        f.sync_all().map_err(io(path))?;
        break;
    }
    Ok(())
}

enum Damage {
    /// Damage that a crash during the final write explains.
    Torn(&'static str),
    Corrupt(&'static str),
}

fn parse_record(data: &[u8], off: usize) -> Result<(u8, &[u8], usize), Damage> {
    let rest = &data[off..];
    if rest.len() < HEADER {
        return Err(Damage::Torn("incomplete record header"));
    }
    let len_bytes: [u8; 4] = rest[0..4].try_into().unwrap();
    let len_crc = u32::from_le_bytes(rest[4..8].try_into().unwrap());
    if crc32fast::hash(&len_bytes) != len_crc {
        // A crash leaves a prefix of the last write, or zeros; garbage followed by data is not.
        return if rest.iter().all(|b| *b == 0) {
            Err(Damage::Torn("zeroed tail"))
        } else {
            Err(Damage::Corrupt("header checksum mismatch"))
        };
    }
    let body_len = u32::from_le_bytes(len_bytes) as usize;
    let end = HEADER + body_len;
    if body_len == 0 {
        return Err(Damage::Corrupt("empty record body"));
    }
    if rest.len() < end {
        return Err(Damage::Torn("incomplete record body"));
    }
    let body = &rest[HEADER..end];
    let body_crc = u32::from_le_bytes(rest[8..12].try_into().unwrap());
    if crc32fast::hash(body) != body_crc {
        return if rest.len() == end {
            Err(Damage::Torn("checksum mismatch in the last record"))
        } else {
            Err(Damage::Corrupt("body checksum mismatch"))
        };
    }
    Ok((body[0], &body[1..], off + end))
}

enum RecordError {
    Gap { expected: u64, found: u64 },
    Bad(&'static str),
}

fn apply_record(
    _path: &Path,
    kind: u8,
    payload: &[u8],
    snapshot_index: u64,
    rec: &mut Recovered,
) -> Result<(), RecordError> {
    match kind {
        ENTRY => {
            let mut e = Entry::default();
            e.merge_from_bytes(payload)
                .map_err(|_| RecordError::Bad("undecodable entry"))?;
            if e.index <= snapshot_index {
                return Ok(());
            }
            let expected = rec
                .entries
                .last()
                .map_or(snapshot_index + 1, |l| l.index + 1);
            if e.index > expected {
                return Err(RecordError::Gap {
                    expected,
                    found: e.index,
                });
            }
            // A rewritten index (a new leader's log replacing ours) drops the old suffix.
            let keep = rec.entries.partition_point(|x| x.index < e.index);
            rec.entries.truncate(keep);
            rec.entries.push(e);
        }
        HARD_STATE => {
            let mut hs = HardState::default();
            hs.merge_from_bytes(payload)
                .map_err(|_| RecordError::Bad("undecodable hard state"))?;
            rec.hard_state = Some(hs);
        }
        _ => return Err(RecordError::Bad("unknown record type")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            data: data.to_vec().into(),
            ..Default::default()
        }
    }

    fn write_entries(dir: &Path, range: std::ops::RangeInclusive<u64>) -> Vec<PathBuf> {
        let (mut wal, _) = Wal::open(dir, 0, true).unwrap();
        for i in range {
            wal.append(&[entry(i, 1, format!("v{i}").as_bytes())], None);
            wal.sync().unwrap();
        }
        wal.segment_paths()
    }

    #[test]
    fn roundtrip_with_hard_state() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut wal, rec) = Wal::open(dir.path(), 0, true).unwrap();
            assert!(rec.entries.is_empty());
            let hs = HardState {
                term: 2,
                commit: 2,
                ..Default::default()
            };
            wal.append(&[entry(1, 1, b"a"), entry(2, 2, b"b")], Some(&hs));
            wal.sync().unwrap();
        }
        let (_, rec) = Wal::open(dir.path(), 0, true).unwrap();
        assert_eq!(
            rec.entries.iter().map(|e| e.index).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(rec.hard_state.unwrap().commit, 2);
    }

    #[test]
    fn torn_tail_is_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let seg = write_entries(dir.path(), 1..=5).pop().unwrap();
        let len = fs::metadata(&seg).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let (mut wal, rec) = Wal::open(dir.path(), 0, true).unwrap();
        assert_eq!(rec.entries.last().unwrap().index, 4);
        // And appending after the truncation point works.
        wal.append(&[entry(5, 1, b"again")], None);
        wal.sync().unwrap();
        let (_, rec) = Wal::open(dir.path(), 0, true).unwrap();
        assert_eq!(rec.entries.last().unwrap().data.as_ref(), b"again");
    }

    #[test]
    fn corrupt_middle_names_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let seg = write_entries(dir.path(), 1..=5).pop().unwrap();
        let mut bytes = fs::read(&seg).unwrap();
        bytes[HEADER + 3] ^= 0x55; // inside the first record's body
        fs::write(&seg, bytes).unwrap();
        let err = Wal::open(dir.path(), 0, true).err().unwrap().to_string();
        assert!(
            err.contains(&seg.display().to_string()) && err.contains("offset 0"),
            "{err}"
        );
    }

    #[test]
    fn skips_entries_covered_by_snapshot_and_releases_segments() {
        let dir = tempfile::tempdir().unwrap();
        write_entries(dir.path(), 1..=3);
        let (mut wal, rec) = Wal::open(dir.path(), 2, true).unwrap();
        assert_eq!(
            rec.entries.iter().map(|e| e.index).collect::<Vec<_>>(),
            vec![3]
        );
        wal.roll_over().unwrap();
        wal.append(&[entry(4, 1, b"x")], None);
        wal.sync().unwrap();
        assert_eq!(wal.segment_paths().len(), 2);
        wal.release_to(3);
        assert_eq!(wal.segment_paths().len(), 1);
        let (_, rec) = Wal::open(dir.path(), 3, true).unwrap();
        assert_eq!(
            rec.entries.iter().map(|e| e.index).collect::<Vec<_>>(),
            vec![4]
        );
    }
}
