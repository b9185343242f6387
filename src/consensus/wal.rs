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
//! Recovery reads every segment in order and tells a torn write from corruption as etcd does
//! (etcd `server/wal/decoder.go`): a crash in the middle of a write leaves a prefix of it, or
//! sectors that never reached the disk and read back as zeros. In the last segment only,
//! a record is a *torn write* when
//!
//! * its length field is zero (etcd: a zero length is the end of the data), or
//! * its header or body extends past the end of the file, or
//! * its header or body checksum fails and one of the 512-byte-sector chunks of its bytes
//!   (split on file offsets that are multiples of 512; partial first and last chunks count)
//!   is all zeros (etcd `isTornEntry`).
//!
//! A torn record was never fsynced, hence never acknowledged: it and everything after it are
//! truncated away. The zeros after the data of a preallocated segment (see [`preallocate`])
//! are its end, not a torn write: they are left as they are. Any other checksum failure (a
//! complete record whose bytes changed, such as a flipped bit in an acknowledged write) and
//! any damage in an earlier segment is corruption:
//! start-up stops with `wal: corrupt record in <file> at offset <n>: ... crc mismatch`, as
//! etcd refuses to start with `walpb: crc mismatch`, rather than silently dropping the record
//! and reusing its revision.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::prelude::{Entry, HardState};

/// A segment rolls over once it grows past this many bytes.
pub const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
const HEADER: usize = 12;
/// Bytes per disk sector when judging torn writes (etcd `minSectorSize`): a crash persists a
/// write sector by sector, so a sector that never reached the disk reads back as zeros.
const SECTOR: usize = 512;
/// Record type of a Raft entry.
pub(crate) const ENTRY: u8 = 1;
/// Record type of a Raft hard state.
pub(crate) const HARD_STATE: u8 = 2;

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
    /// Segment files kept (`--max-wals`; 0 = unlimited); see [`Wal::set_max_segments`].
    max_segments: usize,
    file: File,
    /// Where the newest segment's data ends, bytes: the next write goes there. The file is
    /// longer (preallocated, zeros) until the segment fills.
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

/// Appends one record (`kind`: [`ENTRY`] or [`HARD_STATE`]) carrying `payload` to `buf`, in
/// the layout the module doc shows.
pub(crate) fn encode_record(buf: &mut Vec<u8>, kind: u8, payload: &[u8]) {
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
        let mut data_end = 0;
        for (i, (_, first_index, path)) in named.iter().enumerate() {
            data_end = read_segment(path, i + 1 == count, snapshot_index, &mut rec)?;
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
                    .write(true)
                    .open(&seg.path)
                    .map_err(io(&seg.path))?;
                (f, data_end)
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
        preallocate(&file, &segments.last().expect("at least one segment").path);
        let next_seq = next_seq.max(1);
        let wal = Wal {
            dir: dir.to_path_buf(),
            segments,
            // Covered segments go at once until the member's --max-wals is set.
            max_segments: 1,
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
    /// segment over if it is full. With `--unsafe-no-fsync` the fsync is skipped. The fsync's
    /// duration goes to `etcd_disk_wal_fsync_duration_seconds`, as etcd's `WAL.sync` records it.
    pub fn sync(&mut self) -> Result<(), WalError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let path = &self.segments.last().expect("at least one segment").path;
        crate::failpoints::crash_point(crate::failpoints::WAL_BEFORE_FSYNC);
        self.file
            .write_all_at(&self.buf, self.size)
            .map_err(io(path))?;
        if self.fsync {
            let started = std::time::Instant::now();
            let synced = self.file.sync_data();
            crate::metrics::WAL_FSYNC_SECONDS.observe(started.elapsed().as_secs_f64());
            synced.map_err(io(path))?;
        }
        crate::failpoints::crash_point(crate::failpoints::WAL_AFTER_FSYNC);
        self.size += self.buf.len() as u64;
        self.buf.clear();
        if self.size >= SEGMENT_BYTES {
            self.roll_over()?;
        }
        Ok(())
    }

    /// Starts a new segment (after the entries written so far), headed by the latest hard
    /// state. [`Wal::sync`] calls it once a segment is full.
    ///
    /// Errors: [`WalError::Io`] when the new segment cannot be created or synced.
    pub(crate) fn roll_over(&mut self) -> Result<(), WalError> {
        // The full segment drops its preallocated zeros (etcd `wal.cut` truncates it too), and
        // that is on disk before the next segment exists: only the newest segment ever ends
        // in zeros, and damage in an older one stays corruption.
        let full = &self.segments.last().expect("at least one segment").path;
        self.file.set_len(self.size).map_err(io(full))?;
        self.file.sync_all().map_err(io(full))?;
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
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        preallocate(&f, &path);
        self.file = f;
        self.size = head.len() as u64;
        self.next_seq += 1;
        self.segments.push(Segment { path, first_index });
        Ok(())
    }

    /// Keeps up to `max` segment files (`--max-wals`; 0 = unlimited): segments covered by a
    /// snapshot are deleted only while there are more than that, as etcd purges its WAL.
    /// Until this is called, covered segments are deleted at once.
    pub fn set_max_segments(&mut self, max: usize) {
        self.max_segments = max;
    }

    /// Deletes the oldest segments whose entries all lie at or below `index` (covered by a
    /// snapshot) while more than `--max-wals` segments exist. A segment with entries after
    /// `index` is never deleted, whatever `--max-wals` says, and the newest segment is always
    /// kept.
    pub fn release_to(&mut self, index: u64) {
        let keep = match self.max_segments {
            0 => return,
            n => n.max(1),
        };
        while self.segments.len() > keep && self.segments[1].first_index <= index + 1 {
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

/// Reserves disk space for a whole segment ([`SEGMENT_BYTES`]) and extends the file to that
/// size (`fallocate` mode 0; the new bytes read as zeros), as etcd preallocates its WAL files
/// (`fileutil.Preallocate` with `extendFile`). Appends then never need new space until the
/// segment rolls over, so a member whose disk filled up still restarts, elects, and serves
/// reads: the hard state it writes on the way lands in space it already holds. And an append
/// does not change the file's size, so its fdatasync has no size to record: a lone put's
/// fdatasync measured 64-77 µs at the median here against 99-136 µs with the space reserved
/// behind an unchanged size (`FALLOC_FL_KEEP_SIZE`, how this was done before).
///
/// Best effort: a file system without `fallocate`, or a disk already full, only gets a
/// warning, and the segment grows with its appends.
fn preallocate(file: &File, path: &Path) {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate only reads its integer arguments; `file` keeps the descriptor open.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, SEGMENT_BYTES as libc::off_t) };
    if rc != 0 {
        let error = std::io::Error::last_os_error();
        tracing::warn!(path = %path.display(), %error, "cannot reserve space for the WAL segment");
    }
}

/// Reads the segment `path` into `rec`; returns where its data ends, bytes. The newest
/// segment (`is_last`) may end in a torn write, which is truncated away, or in the zeros of its
/// preallocated space, which stay.
///
/// Errors: those of [`decode_segment`], and [`WalError::Io`].
fn read_segment(
    path: &Path,
    is_last: bool,
    snapshot_index: u64,
    rec: &mut Recovered,
) -> Result<u64, WalError> {
    let data = fs::read(path).map_err(io(path))?;
    let Some((off, torn)) = decode_segment(path, &data, is_last, snapshot_index, rec)? else {
        return Ok(data.len() as u64);
    };
    if data[off..].iter().all(|b| *b == 0) {
        // Zeros from here to the end: space preallocated that no write has reached yet (or
        // one the crash cut off before any of it reached the disk, all the same).
        return Ok(off as u64);
    }
    tracing::warn!(path = %path.display(), offset = off, reason = torn, "truncating torn WAL tail");
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io(path))?;
    f.set_len(off as u64).map_err(io(path))?;
    f.sync_all().map_err(io(path))?;
    Ok(off as u64)
}

/// Decodes the segment `data` (the bytes of the file `path`, named in errors) into `rec`,
/// record by record, without touching the file. Returns `None` when every byte was a valid
/// record, or `Some((offset, reason))` when the segment ends in a torn write at byte `offset`
/// (allowed only when `is_last`): `rec` then holds the valid prefix, and the caller truncates
/// the file there.
///
/// Errors: [`WalError::Corrupt`] for damage that is not a torn tail (any damage when not
/// `is_last`), [`WalError::Gap`] when an entry's index skips ahead.
pub(crate) fn decode_segment(
    path: &Path,
    data: &[u8],
    is_last: bool,
    snapshot_index: u64,
    rec: &mut Recovered,
) -> Result<Option<(usize, &'static str)>, WalError> {
    let len = data.len();
    let mut off = 0usize;
    let corrupt = |offset: usize, reason| WalError::Corrupt {
        path: path.to_path_buf(),
        offset: offset as u64,
        reason,
    };
    while off < len {
        let torn = match parse_record(data, off) {
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
        return Ok(Some((off, torn)));
    }
    Ok(None)
}

enum Damage {
    /// Damage that a crash during the final write explains: a torn tail, if in the last
    /// segment.
    Torn(&'static str),
    /// Damage no crash explains.
    Corrupt(&'static str),
}

/// Whether some chunk of `data[start..end]`, split on file offsets that are multiples of
/// [`SECTOR`] (partial first and last chunks included), is all zeros: the mark of a write that
/// a crash cut off (etcd `isTornEntry`). `data` is the whole segment, so indexes are file
/// offsets.
fn has_zeroed_sector(data: &[u8], start: usize, end: usize) -> bool {
    let mut at = start;
    while at < end {
        let chunk_end = ((at / SECTOR + 1) * SECTOR).min(end);
        if data[at..chunk_end].iter().all(|b| *b == 0) {
            return true;
        }
        at = chunk_end;
    }
    false
}

/// Parses the record at file offset `off` of the segment `data`; returns its type, payload and
/// the offset after it. [`Damage::Torn`] is only a candidate: the caller decides by segment.
fn parse_record(data: &[u8], off: usize) -> Result<(u8, &[u8], usize), Damage> {
    let rest = &data[off..];
    if rest.len() < HEADER {
        return Err(Damage::Torn("incomplete record header"));
    }
    let len_bytes: [u8; 4] = rest[0..4].try_into().unwrap();
    let body_len = u32::from_le_bytes(len_bytes) as usize;
    // No record is empty (the body holds at least its type byte): a zero length is space the
    // last write never reached, whatever follows it (etcd reads it as the end of the data).
    if body_len == 0 {
        return Err(Damage::Torn("zero record length"));
    }
    let len_crc = u32::from_le_bytes(rest[4..8].try_into().unwrap());
    if crc32fast::hash(&len_bytes) != len_crc {
        return if has_zeroed_sector(data, off, off + HEADER) {
            Err(Damage::Torn("header crc mismatch in a zeroed sector"))
        } else {
            Err(Damage::Corrupt("header crc mismatch"))
        };
    }
    let end = HEADER + body_len;
    if rest.len() < end {
        return Err(Damage::Torn("incomplete record body"));
    }
    let body = &rest[HEADER..end];
    let body_crc = u32::from_le_bytes(rest[8..12].try_into().unwrap());
    if crc32fast::hash(body) != body_crc {
        // A complete record with a bad checksum may have been fsynced and acknowledged: only
        // a zeroed sector shows that the write itself never finished.
        return if has_zeroed_sector(data, off, off + end) {
            Err(Damage::Torn("body crc mismatch in a zeroed sector"))
        } else {
            Err(Damage::Corrupt("body crc mismatch"))
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
    fn each_fsync_is_timed() {
        let fsyncs = || crate::metrics::WAL_FSYNC_SECONDS.get_sample_count();
        let before = fsyncs();
        let dir = tempfile::tempdir().unwrap();
        write_entries(dir.path(), 1..=3);
        // Other tests sync WALs at the same time: at least these three.
        assert!(fsyncs() >= before + 3, "{} -> {}", before, fsyncs());
    }

    /// The file offsets of the records in `seg`, in order (walking the length fields), and
    /// where they end; asserts that only zeros (preallocated space) follow.
    fn records(seg: &Path) -> (Vec<usize>, usize) {
        let bytes = fs::read(seg).unwrap();
        let mut offsets = Vec::new();
        let mut off = 0;
        while off + HEADER <= bytes.len() {
            let len = u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
            if len == 0 {
                break;
            }
            offsets.push(off);
            off += HEADER + len;
        }
        let rest = bytes.get(off..).unwrap_or_default();
        assert!(rest.iter().all(|b| *b == 0), "only zeros after the records");
        (offsets, off)
    }

    /// Where the records of `seg` end (see [`records`]).
    fn end_of_records(seg: &Path) -> usize {
        records(seg).1
    }

    /// Cuts `seg`'s preallocated zeros off (as a file system without `fallocate` leaves it),
    /// so a test can rewrite the file whole; returns its length.
    fn trim(seg: &Path) -> usize {
        let end = end_of_records(seg);
        let f = OpenOptions::new().write(true).open(seg).unwrap();
        f.set_len(end as u64).unwrap();
        end
    }

    #[test]
    fn the_open_segment_holds_its_space_and_its_zeros_are_its_end() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), 0, true).unwrap();
        wal.append(&[entry(1, 1, b"a")], None);
        wal.sync().unwrap();
        let seg = wal.segment_paths().pop().unwrap();
        let meta = fs::metadata(&seg).unwrap();
        assert_eq!(meta.len(), SEGMENT_BYTES, "the file has the segment's size");
        assert!(
            meta.blocks() * 512 >= SEGMENT_BYTES,
            "only {} bytes allocated",
            meta.blocks() * 512
        );
        let end = end_of_records(&seg);
        drop(wal);
        // Reopened: the zeros are no torn write, and the next append goes after the data.
        let (mut wal, rec) = Wal::open(dir.path(), 0, true).unwrap();
        assert_eq!(indexes(&rec), vec![1]);
        assert_eq!(fs::metadata(&seg).unwrap().len(), SEGMENT_BYTES);
        assert_eq!(end_of_records(&seg), end, "nothing truncated");
        wal.append(&[entry(2, 1, b"b")], None);
        wal.sync().unwrap();
        drop(wal);
        let (_, rec) = Wal::open(dir.path(), 0, true).unwrap();
        assert_eq!(indexes(&rec), vec![1, 2]);
    }

    /// A full segment keeps only its data: zeros at the end of any segment but the newest
    /// would be damage.
    #[test]
    fn a_rolled_over_segment_is_cut_to_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), 0, true).unwrap();
        wal.append(&[entry(1, 1, b"a")], None);
        wal.sync().unwrap();
        wal.roll_over().unwrap();
        wal.append(&[entry(2, 1, b"b")], None);
        wal.sync().unwrap();
        let paths = wal.segment_paths();
        drop(wal);
        let first = fs::metadata(&paths[0]).unwrap().len() as usize;
        assert_eq!(first, end_of_records(&paths[0]));
        assert_eq!(fs::metadata(&paths[1]).unwrap().len(), SEGMENT_BYTES);
        let (_, rec) = Wal::open(dir.path(), 0, true).unwrap();
        assert_eq!(indexes(&rec), vec![1, 2]);
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
        let len = end_of_records(&seg) as u64;
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

    /// File offsets of the records in `seg`, in order (see [`records`]).
    fn record_offsets(seg: &Path) -> Vec<usize> {
        records(seg).0
    }

    fn indexes(rec: &Recovered) -> Vec<u64> {
        rec.entries.iter().map(|e| e.index).collect()
    }

    #[test]
    fn flipped_byte_in_last_record_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let seg = write_entries(dir.path(), 1..=5).pop().unwrap();
        trim(&seg);
        let last = *record_offsets(&seg).last().unwrap();
        let mut bytes = fs::read(&seg).unwrap();
        // Inside the complete, fsynced last record's payload: no crash explains this.
        bytes[last + HEADER + 2] ^= 0x01;
        assert!(!has_zeroed_sector(&bytes, last, bytes.len()));
        fs::write(&seg, &bytes).unwrap();
        let err = Wal::open(dir.path(), 0, true)
            .err()
            .expect("refuses to open");
        assert!(matches!(err, WalError::Corrupt { .. }), "{err:?}");
        let err = err.to_string();
        assert!(
            err.contains(&seg.display().to_string())
                && err.contains(&format!("offset {last}"))
                && err.contains("crc mismatch"),
            "{err}"
        );
        // Nothing was truncated away.
        assert_eq!(fs::read(&seg).unwrap(), bytes);
    }

    #[test]
    fn zeroed_tail_followed_by_garbage_is_torn() {
        let dir = tempfile::tempdir().unwrap();
        let seg = write_entries(dir.path(), 1..=5).pop().unwrap();
        let len = trim(&seg);
        let mut tail = vec![0u8; 512];
        // Deterministic noise with no zero byte (xorshift).
        let mut x = 0x2545_f491_u32;
        tail.extend((0..300).map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x as u8) | 1
        }));
        OpenOptions::new()
            .append(true)
            .open(&seg)
            .unwrap()
            .write_all(&tail)
            .unwrap();
        let (mut wal, rec) = Wal::open(dir.path(), 0, true).expect("a zeroed tail is torn");
        assert_eq!(indexes(&rec), vec![1, 2, 3, 4, 5]);
        assert_eq!(end_of_records(&seg), len, "the tail is truncated");
        wal.append(&[entry(6, 1, b"after")], None);
        wal.sync().unwrap();
        let (_, rec) = Wal::open(dir.path(), 0, true).unwrap();
        assert_eq!(indexes(&rec), vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(rec.entries[5].data.as_ref(), b"after");
    }

    #[test]
    fn record_cut_inside_its_header_is_torn() {
        let dir = tempfile::tempdir().unwrap();
        let seg = write_entries(dir.path(), 1..=5).pop().unwrap();
        let last = *record_offsets(&seg).last().unwrap();
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(last as u64 + 7)
            .unwrap();
        let (_, rec) = Wal::open(dir.path(), 0, true).unwrap();
        assert_eq!(indexes(&rec), vec![1, 2, 3, 4]);
        assert_eq!(end_of_records(&seg), last);
    }

    #[test]
    fn zeroed_sector_in_an_unfinished_write_is_torn() {
        let dir = tempfile::tempdir().unwrap();
        let seg = write_entries(dir.path(), 1..=3).pop().unwrap();
        let synced = end_of_records(&seg);
        // One group commit of two large records that the crash cut off: the second reached
        // the disk, a sector in the middle of the first did not.
        let (mut wal, _) = Wal::open(dir.path(), 0, true).unwrap();
        wal.append(&[entry(4, 1, &[7; 1500]), entry(5, 1, &[9; 1500])], None);
        wal.sync().unwrap();
        drop(wal);
        trim(&seg);
        let mut bytes = fs::read(&seg).unwrap();
        let sector = (synced / SECTOR + 1) * SECTOR;
        assert!(
            sector + SECTOR < synced + 1500,
            "the sector lies inside entry 4"
        );
        bytes[sector..sector + SECTOR].fill(0);
        fs::write(&seg, &bytes).unwrap();
        let (_, rec) = Wal::open(dir.path(), 0, true).expect("a zeroed sector is torn");
        assert_eq!(indexes(&rec), vec![1, 2, 3]);
        assert_eq!(end_of_records(&seg), synced);
    }

    #[test]
    fn zeroed_sector_in_a_complete_last_record_is_torn() {
        let dir = tempfile::tempdir().unwrap();
        write_entries(dir.path(), 1..=3);
        let (mut wal, _) = Wal::open(dir.path(), 0, true).unwrap();
        wal.append(&[entry(4, 1, &[7; 1500])], None);
        wal.sync().unwrap();
        let seg = wal.segment_paths().pop().unwrap();
        drop(wal);
        trim(&seg);
        let last = *record_offsets(&seg).last().unwrap();
        let mut bytes = fs::read(&seg).unwrap();
        let sector = (last / SECTOR + 1) * SECTOR;
        bytes[sector..sector + SECTOR].fill(0);
        fs::write(&seg, &bytes).unwrap();
        let (_, rec) = Wal::open(dir.path(), 0, true).unwrap();
        assert_eq!(indexes(&rec), vec![1, 2, 3]);
        assert_eq!(end_of_records(&seg), last);
    }

    #[test]
    fn torn_looking_damage_in_an_earlier_segment_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), 0, true).unwrap();
        wal.append(&[entry(1, 1, b"a")], None);
        wal.sync().unwrap();
        wal.roll_over().unwrap();
        wal.append(&[entry(2, 1, b"b")], None);
        wal.sync().unwrap();
        let first = wal.segment_paths().remove(0);
        drop(wal);
        let len = fs::metadata(&first).unwrap().len();
        OpenOptions::new()
            .append(true)
            .open(&first)
            .unwrap()
            .write_all(&[0; 12])
            .unwrap();
        let err = Wal::open(dir.path(), 0, true).err().unwrap().to_string();
        assert!(
            err.contains(&first.display().to_string()) && err.contains(&format!("offset {len}")),
            "{err}"
        );
    }

    #[test]
    fn corrupt_middle_names_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let seg = write_entries(dir.path(), 1..=5).pop().unwrap();
        trim(&seg);
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

    #[test]
    fn max_wals_keeps_covered_segments_but_never_needed_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), 0, true).unwrap();
        // Six segments: entry i in segment i (the last one open).
        for i in 1..=6 {
            wal.append(&[entry(i, 1, b"x")], None);
            wal.sync().unwrap();
            if i < 6 {
                wal.roll_over().unwrap();
            }
        }
        assert_eq!(wal.segment_paths().len(), 6);
        wal.set_max_segments(0);
        wal.release_to(5);
        assert_eq!(wal.segment_paths().len(), 6, "0 = unlimited");
        wal.set_max_segments(4);
        wal.release_to(5);
        assert_eq!(
            wal.segment_paths().len(),
            4,
            "covered segments beyond --max-wals go"
        );
        // Only entries up to 4 are covered: segments 5 and 6 are needed whatever the limit.
        wal.set_max_segments(1);
        wal.release_to(4);
        let left = wal.segment_paths().len();
        assert_eq!(left, 2, "a segment with uncovered entries is never deleted");
        let (_, rec) = Wal::open(dir.path(), 4, true).unwrap();
        assert_eq!(
            rec.entries.iter().map(|e| e.index).collect::<Vec<_>>(),
            vec![5, 6]
        );
    }
}
