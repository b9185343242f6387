//! The watch workloads.
//!
//! * `watch`: `--streams` streams with `--watch-per-stream` watchers each, over
//!   `--watched-key-total` keys; puts go out open loop at `--put-rate` and every event's delivery
//!   latency is measured from its put's due time. The main summary is event delivery; `put` and
//!   `create` (watcher creation) are breakdowns.
//! * `watch-latency`: every watcher on one key; one put at a time, at most `--put-rate` per
//!   second, each followed by a wait until every watcher has its event. Delivery latency counts
//!   from the put's send time, so it is pure fan-out latency without queueing.
//!
//! Each put's value starts with its sequence number (8 bytes, big-endian), which is how an event
//! finds its put's send time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, EventType, PutOptions, WatchOptions, WatchRequestSender, WatchResponseStream,
};
use indicatif::ProgressBar;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::cli::{WatchArgs, WatchLatencyArgs};
use crate::driver::{error_text, stopped, Schedule, Stop};
use crate::report::Recorder;
use crate::workloads::key_bytes;

/// How long delivery may lag behind the last put before the missing events count as errors.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Shared between the putter and the stream readers.
struct Board {
    start: Instant,
    /// Send time of put `i`, ns since `start`, plus one (0 = not sent yet).
    sent_ns: Vec<AtomicU64>,
    /// Events received over all streams.
    received: AtomicU64,
    /// Woken on each received batch.
    notify: Notify,
}

impl Board {
    fn new(puts: u64) -> Arc<Board> {
        Arc::new(Board {
            start: Instant::now(),
            sent_ns: (0..puts).map(|_| AtomicU64::new(0)).collect(),
            received: AtomicU64::new(0),
            notify: Notify::new(),
        })
    }

    fn mark_sent(&self, i: u64, at: Instant) {
        let ns = (at - self.start).as_nanos() as u64 + 1;
        self.sent_ns[i as usize].store(ns, Ordering::Release);
    }

    /// Latency of an event carrying put `i`, if the put's time is known.
    fn latency(&self, i: u64, now: Instant) -> Option<Duration> {
        let sent = self.sent_ns.get(i as usize)?.load(Ordering::Acquire);
        (sent > 0).then(|| (now - self.start).saturating_sub(Duration::from_nanos(sent - 1)))
    }
}

fn value_for(i: u64, size: usize) -> Vec<u8> {
    let mut v = i.to_be_bytes().to_vec();
    v.resize(size.max(8), b'v');
    v
}

fn seq_of(value: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(value.get(..8)?.try_into().ok()?))
}

/// Opens `streams` watch streams of `per_stream` watchers each; watcher `w` watches
/// `key_of(w)`. Returns the streams once every watcher is confirmed created.
async fn open_streams(
    conns: &[Client],
    streams: usize,
    per_stream: usize,
    key_of: &(dyn Fn(usize) -> Vec<u8> + Sync),
    opts: WatchOptions,
    rec: &mut Recorder,
) -> Result<Vec<(WatchRequestSender, WatchResponseStream)>, etcd_client::Error> {
    let mut out = Vec::with_capacity(streams);
    for s in 0..streams {
        let mut client = conns[s % conns.len()].clone();
        let began = Instant::now();
        let first = key_of(s * per_stream);
        let stream = client.watch(first, Some(opts.clone())).await?;
        let (mut tx, mut rx) = stream.split();
        for w in 1..per_stream {
            tx.watch(key_of(s * per_stream + w), Some(opts.clone()))
                .await?;
        }
        let mut created = 0;
        while created < per_stream {
            match rx.message().await? {
                Some(r) if r.created() => created += 1,
                Some(_) => {}
                None => {
                    return Err(etcd_client::Error::WatchError(
                        "watch stream closed while creating watchers".into(),
                    ))
                }
            }
        }
        rec.sub("create", began.elapsed());
        out.push((tx, rx));
    }
    Ok(out)
}

/// Reads events off one stream, recording each event's latency, until `done` fires; the
/// request half is held (dropping it would close the stream) and dropped at the end.
fn spawn_reader(
    (tx, mut rx): (WatchRequestSender, WatchResponseStream),
    board: Arc<Board>,
    sample: bool,
    progress: ProgressBar,
    mut done: Stop,
) -> tokio::task::JoinHandle<Recorder> {
    tokio::spawn(async move {
        let _tx = tx;
        let mut rec = Recorder::new(sample);
        loop {
            let msg = tokio::select! {
                m = rx.message() => m,
                _ = stopped(&mut done) => return rec,
            };
            match msg {
                Ok(Some(resp)) => {
                    let now = Instant::now();
                    let mut n = 0;
                    for ev in resp.events() {
                        if ev.event_type() != EventType::Put {
                            continue;
                        }
                        let Some(seq) = ev.kv().and_then(|kv| seq_of(kv.value())) else {
                            continue;
                        };
                        if let Some(lat) = board.latency(seq, now) {
                            rec.success(now - board.start, lat);
                            n += 1;
                        }
                    }
                    if n > 0 {
                        progress.inc(n);
                        board.received.fetch_add(n, Ordering::AcqRel);
                        board.notify.notify_waiters();
                    }
                }
                Ok(None) => return rec,
                Err(e) => {
                    rec.failure(board.start.elapsed(), error_text(&e));
                    return rec;
                }
            }
        }
    })
}

/// The reader tasks of a run's streams, the board they share (its clock starts now) and the
/// sender that ends them.
type Readers = (
    Arc<Board>,
    watch::Sender<bool>,
    Vec<tokio::task::JoinHandle<Recorder>>,
);

fn start_readers(
    streams: Vec<(WatchRequestSender, WatchResponseStream)>,
    puts: u64,
    sample: bool,
    progress: ProgressBar,
) -> Readers {
    let board = Board::new(puts);
    let (done_tx, done) = watch::channel(false);
    let readers = streams
        .into_iter()
        .map(|s| spawn_reader(s, board.clone(), sample, progress.clone(), done.clone()))
        .collect();
    (board, done_tx, readers)
}

/// Waits until `want` events have been received, `stop` fires, or `timeout` passes; returns
/// false if stopped.
async fn wait_received(board: &Board, want: u64, timeout: Duration, stop: &mut Stop) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let notified = board.notify.notified();
        if board.received.load(Ordering::Acquire) >= want {
            return true;
        }
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep_until(deadline) => return true,
            _ = stopped(stop) => return false,
        }
    }
}

/// Result of a watch run: the event recorder (plus `put`/`create` breakdowns) and whether it
/// was interrupted.
pub struct WatchRun {
    /// Merged recorder.
    pub rec: Recorder,
    /// Whether Ctrl-C cut it short.
    pub interrupted: bool,
    /// Events expected: acknowledged puts times the watchers on each put's key.
    pub expected: u64,
    /// From the first put to the end of delivery (watcher creation excluded).
    pub elapsed: Duration,
}

/// Runs `watch`.
pub async fn run_watch(
    conns: &[Client],
    args: &WatchArgs,
    sample: bool,
    progress: ProgressBar,
    mut stop: Stop,
) -> Result<WatchRun, etcd_client::Error> {
    let keys = args.watched_key_total.max(1);
    let key_of = |w: usize| {
        let mut k = b"watch/".to_vec();
        k.extend(key_bytes(w as u64 % keys, args.key_size.max(1)));
        k
    };
    let mut rec = Recorder::new(sample);
    let watchers = args.streams * args.watch_per_stream;
    let streams = open_streams(
        conns,
        args.streams,
        args.watch_per_stream,
        &key_of,
        WatchOptions::new(),
        &mut rec,
    )
    .await?;
    // Watchers per key: watcher w watches key w mod keys.
    let per_key: Vec<u64> = (0..keys)
        .map(|k| (0..watchers as u64).filter(|w| w % keys == k).count() as u64)
        .collect();
    let (board, done_tx, readers) = start_readers(streams, args.put_total, sample, progress);

    let schedule = Schedule::new(board.start, args.put_rate);
    let kv = conns[0].kv_client();
    let mut interrupted = false;
    let mut expected = 0;
    // Puts go out concurrently so a slow put never delays the next one's due time.
    let mut puts = tokio::task::JoinSet::new();
    for i in 0..args.put_total {
        let due = schedule.due(i);
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = stopped(&mut stop) => { interrupted = true; break; }
        }
        let k = i % keys;
        board.mark_sent(i, due);
        let (mut kv, key, value) = (kv.clone(), key_of(k as usize), value_for(i, args.val_size));
        let watching = per_key[k as usize];
        puts.spawn(async move {
            let r = kv.put(key, value, None::<PutOptions>).await;
            (r.map(|_| ()), due.elapsed(), watching)
        });
        while let Some(done) = puts.try_join_next() {
            let (r, latency, watching) = done.expect("put task");
            if record_put(&mut rec, &board, (r, latency)) {
                expected += watching;
            }
        }
    }
    while let Some(done) = puts.join_next().await {
        let (r, latency, watching) = done.expect("put task");
        if record_put(&mut rec, &board, (r, latency)) {
            expected += watching;
        }
    }
    if !interrupted {
        interrupted = !wait_received(&board, expected, DRAIN_TIMEOUT, &mut stop).await;
    }
    finish(readers, done_tx, &board, expected, interrupted, rec).await
}

/// Records a put's outcome; true if it succeeded (so its events are expected).
fn record_put(
    rec: &mut Recorder,
    board: &Board,
    (r, latency): (Result<(), etcd_client::Error>, Duration),
) -> bool {
    match r {
        Ok(()) => {
            rec.sub("put", latency);
            true
        }
        Err(e) => {
            rec.failure(board.start.elapsed(), format!("put: {}", error_text(&e)));
            false
        }
    }
}

async fn finish(
    readers: Vec<tokio::task::JoinHandle<Recorder>>,
    done: watch::Sender<bool>,
    board: &Board,
    expected: u64,
    interrupted: bool,
    mut rec: Recorder,
) -> Result<WatchRun, etcd_client::Error> {
    let _ = done.send(true);
    for r in readers {
        rec.merge(r.await.expect("watch reader panicked"));
    }
    let got = board.received.load(Ordering::Acquire);
    if !interrupted && got < expected {
        *rec.errors
            .entry("events not delivered within the drain timeout".into())
            .or_default() += expected - got;
    }
    Ok(WatchRun {
        rec,
        interrupted,
        expected,
        elapsed: board.start.elapsed(),
    })
}

/// Runs `watch-latency`.
pub async fn run_watch_latency(
    conns: &[Client],
    args: &WatchLatencyArgs,
    sample: bool,
    progress: ProgressBar,
    mut stop: Stop,
) -> Result<WatchRun, etcd_client::Error> {
    let key = b"watch-latency/key".to_vec();
    let mut opts = WatchOptions::new();
    if args.prev_kv {
        opts = opts.with_prev_key();
    }
    let mut rec = Recorder::new(sample);
    let watchers = (args.streams * args.watchers_per_stream) as u64;
    let streams = open_streams(
        conns,
        args.streams,
        args.watchers_per_stream,
        &|_| key.clone(),
        opts,
        &mut rec,
    )
    .await?;
    let (board, done_tx, readers) = start_readers(streams, args.put_total, sample, progress);
    let schedule = Schedule::new(board.start, args.put_rate);
    let mut kv = conns[0].kv_client();
    let mut interrupted = false;
    let mut expected = 0;
    for i in 0..args.put_total {
        if schedule.is_open_loop() {
            tokio::select! {
                _ = tokio::time::sleep_until(schedule.due(i)) => {}
                _ = stopped(&mut stop) => { interrupted = true; break; }
            }
        }
        let sent = Instant::now();
        board.mark_sent(i, sent);
        let put = kv.put(key.clone(), value_for(i, args.val_size), None).await;
        if !record_put(&mut rec, &board, (put.map(|_| ()), sent.elapsed())) {
            continue;
        }
        expected += watchers;
        if !wait_received(&board, expected, DRAIN_TIMEOUT, &mut stop).await {
            interrupted = true;
            break;
        }
    }
    finish(readers, done_tx, &board, expected, interrupted, rec).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_carry_their_sequence_number() {
        let v = value_for(0x0102_0304_0506_0708, 32);
        assert_eq!(v.len(), 32);
        assert_eq!(seq_of(&v), Some(0x0102_0304_0506_0708));
        assert_eq!(value_for(5, 2).len(), 8);
        assert_eq!(seq_of(b"short"), None);
    }

    #[tokio::test]
    async fn latency_needs_a_sent_time() {
        let b = Board::new(2);
        assert_eq!(b.latency(0, Instant::now()), None);
        assert_eq!(b.latency(7, Instant::now()), None);
        b.mark_sent(1, b.start);
        let l = b.latency(1, b.start + Duration::from_millis(3)).unwrap();
        assert_eq!(l, Duration::from_millis(3));
    }
}
