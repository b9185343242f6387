//! `metastore-wal-io`: one WAL sync by four I/O paths, to decide whether io_uring belongs in the
//! WAL (issue 17: "measure it against fdatasync with std I/O, and keep it only if it wins";
//! bench/README.md, step 9).
//!
//! Every iteration appends `--size` bytes at the end of the data in a file extended to 64 MiB
//! first (`fallocate` mode 0, as `src/consensus/wal.rs` preallocates a segment) and makes them
//! durable, the way `Wal::sync` does for one Raft Ready:
//!
//! - `std`: `pwrite` then `fdatasync` (what the WAL does);
//! - `std-dsync`: one `pwritev2` with `RWF_DSYNC` (the write carries the data sync);
//! - `uring`: an io_uring `WRITE` linked (`IOSQE_IO_LINK`) to an `FSYNC` with `DATASYNC`,
//!   submitted and waited for with one `io_uring_enter`;
//! - `uring-dsync`: one io_uring `WRITE` with `RWF_DSYNC`.
//!
//! It prints, per path, the latency of a sync (p50, p90, p99, µs) and the process's CPU time per
//! sync (user + system, µs, from `getrusage`, which counts io_uring's worker threads: they belong
//! to the process). The paths run one after the other, `--rounds` times, alternating, in files
//! under `--dir` (default: the current directory; use the disk the data dir lives on).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use io_uring::{opcode, squeue, types, IoUring};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Path {
    Std,
    StdDsync,
    Uring,
    UringDsync,
}

#[derive(Parser)]
#[command(about = "One WAL append + data sync by std I/O and by io_uring: latency and CPU")]
struct Args {
    /// Bytes per sync (a lone put's Ready is about 200; a loaded batch some KiB).
    #[arg(long, default_value_t = 200)]
    size: usize,
    /// Syncs per path per round.
    #[arg(long, default_value_t = 3000)]
    syncs: usize,
    /// Rounds; each runs every path once.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Directory for the test files (on the disk under test).
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// Paths to run (default: all four).
    #[arg(long, value_enum, value_delimiter = ',')]
    paths: Vec<Path>,
}

/// The size a WAL segment is extended to before appends land in it, bytes (the WAL's own).
const SEGMENT_BYTES: i64 = metastore::consensus::wal::SEGMENT_BYTES as i64;

fn main() -> Result<()> {
    let args = Args::parse();
    let paths = if args.paths.is_empty() {
        vec![Path::Std, Path::StdDsync, Path::Uring, Path::UringDsync]
    } else {
        args.paths.clone()
    };
    if args.size as i64 * args.syncs as i64 > SEGMENT_BYTES {
        bail!("--size x --syncs must fit in one 64 MiB segment");
    }
    println!("path           size  syncs   p50 us   p90 us   p99 us  CPU us/sync");
    for _ in 0..args.rounds {
        for &path in &paths {
            let m = run(path, &args)?;
            println!(
                "{:<13} {:>5} {:>6} {:>8.1} {:>8.1} {:>8.1} {:>12.1}",
                format!("{path:?}"),
                args.size,
                args.syncs,
                m.p50,
                m.p90,
                m.p99,
                m.cpu_per_sync
            );
        }
    }
    Ok(())
}

struct Measured {
    p50: f64,
    p90: f64,
    p99: f64,
    cpu_per_sync: f64,
}

fn run(path: Path, args: &Args) -> Result<Measured> {
    let file_path = args
        .dir
        .join(format!("metastore-wal-io-{}.tmp", std::process::id()));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&file_path)
        .with_context(|| format!("create {}", file_path.display()))?;
    let measured = measure(path, &file, args);
    let _ = std::fs::remove_file(&file_path);
    measured
}

fn measure(path: Path, file: &File, args: &Args) -> Result<Measured> {
    // SAFETY: fallocate on an open descriptor; no memory is passed.
    if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, SEGMENT_BYTES) } != 0 {
        bail!("fallocate: {}", std::io::Error::last_os_error());
    }
    file.sync_all()?;
    let buf = vec![0x5a_u8; args.size];
    let mut ring = IoUring::new(8).context("io_uring_setup")?;
    let mut offset = 0u64;
    let mut nanos = Vec::with_capacity(args.syncs);
    let cpu_before = process_cpu_us();
    for _ in 0..args.syncs {
        let started = Instant::now();
        match path {
            Path::Std => {
                file.write_all_at(&buf, offset)?;
                file.sync_data()?;
            }
            Path::StdDsync => {
                let iov = libc::iovec {
                    iov_base: buf.as_ptr() as *mut _,
                    iov_len: buf.len(),
                };
                // SAFETY: `iov` points into `buf`, which outlives the call.
                let n = unsafe {
                    libc::pwritev2(file.as_raw_fd(), &iov, 1, offset as i64, libc::RWF_DSYNC)
                };
                if n != buf.len() as isize {
                    bail!("pwritev2: {}", std::io::Error::last_os_error());
                }
            }
            Path::Uring | Path::UringDsync => {
                let fd = types::Fd(file.as_raw_fd());
                let write = opcode::Write::new(fd, buf.as_ptr(), buf.len() as u32).offset(offset);
                // No allocation per sync: the std paths make none either.
                let linked;
                let dsync;
                let ops: &[squeue::Entry] = if matches!(path, Path::Uring) {
                    linked = [
                        write.build().flags(squeue::Flags::IO_LINK),
                        opcode::Fsync::new(fd)
                            .flags(types::FsyncFlags::DATASYNC)
                            .build(),
                    ];
                    &linked
                } else {
                    dsync = [write.rw_flags(libc::RWF_DSYNC).build()];
                    &dsync
                };
                // SAFETY: the buffer and the file outlive the operations: they complete before
                // `submit_and_wait` returns and the loop goes on.
                unsafe {
                    let mut sq = ring.submission();
                    for op in ops {
                        sq.push(op).context("submission queue full")?;
                    }
                }
                ring.submit_and_wait(ops.len())?;
                for cqe in ring.completion() {
                    if cqe.result() < 0 {
                        bail!(
                            "io_uring: {}",
                            std::io::Error::from_raw_os_error(-cqe.result())
                        );
                    }
                }
            }
        }
        nanos.push(started.elapsed().as_nanos() as u64);
        offset += args.size as u64;
    }
    let cpu = process_cpu_us() - cpu_before;
    nanos.sort_unstable();
    let at = |q: f64| nanos[((nanos.len() as f64 * q) as usize).min(nanos.len() - 1)] as f64 / 1e3;
    Ok(Measured {
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        cpu_per_sync: cpu / args.syncs as f64,
    })
}

/// User + system CPU time of the whole process (its io_uring workers included), µs.
fn process_cpu_us() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let us = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    us(usage.ru_utime) + us(usage.ru_stime)
}
