//! `etcdserverpb.Watch`: one task per gRPC stream, every watcher a cursor over the history.
//!
//! A watcher is owed every event from a next revision on. Whenever the member's shared
//! [`feed`] moves (it reads each applied batch's events once, for every stream), the stream
//! task gives its watchers the events for their keys from the feed's ring, in (revision,
//! sub-revision, key) order: the synced ones together, through an index by key, and the others
//! one by one (`watchers.rs`). A watcher that is behind the ring (a watch from an old revision,
//! a stream that fell behind) asks the shards that hold its keys for the events in
//! `[next, applied]` itself. Because events come from the MVCC history rather than from a
//! queue, a watcher that falls behind simply catches up from history (or is canceled with
//! `compact_revision` once its revision is compacted); nothing is ever dropped, and memory per
//! stream is bounded by one batch plus the outbound channel. A slow client only blocks its own
//! task on the bounded outbound channel, so other streams are not delayed.
//!
//! Guarantees (etcd `api_guarantees`): events are ordered and unique (the cursor only moves
//! forward), reliable (no gaps: the cursor moves to exactly the revision the ring or the
//! shards report complete), atomic (a batch is cut only between revisions), resumable (any
//! uncompacted `start_revision`), and a progress response's revision never precedes an event
//! not yet sent (it is sent only when every watcher of the stream is synced).

pub mod feed;
mod watchers;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use tokio_util::sync::CancellationToken;

use self::feed::{EventFeed, Served};
use self::watchers::{Watcher, Watchers};
use super::{Access, Core, Reader};
use crate::consensus::NodeStatus;
use crate::error::EtcdError;
use crate::mvcc::store::HistoryCompacted;
use crate::mvcc::{KeyRange, RangeEnd};
use crate::proto::etcdserverpb::{
    watch_create_request::FilterType, watch_request::RequestUnion, watch_server::Watch,
    WatchCreateRequest, WatchRequest, WatchResponse,
};
use crate::proto::mvccpb::Event;

/// Responses buffered per stream before a slow client blocks its stream task.
const OUTBOUND_CAPACITY: usize = 16;
/// Soft cap on the events fetched for one watcher at a time (cut between revisions).
const EVENT_BATCH: usize = 1000;

/// etcd's error for a client-chosen watch ID already in use on the stream.
const DUPLICATE_ID: &str = "mvcc: duplicate watch ID provided on the WatchStream";
/// etcd's error for `range_end <= key`.
const EMPTY_RANGE: &str = "mvcc: watcher range is empty";

/// The Watch service.
pub struct WatchService {
    ctx: Arc<WatchContext>,
}

/// What every watch stream of the member reads.
struct WatchContext {
    reader: Reader,
    /// The member's shared feed of applied events.
    feed: Arc<EventFeed>,
    access: Access,
    /// For streams opened with `hasleader`.
    status: Arc<NodeStatus>,
    /// `--election-timeout`.
    election_timeout: Duration,
    /// Ends every stream when the member stops.
    stopping: CancellationToken,
    /// etcd's progress-notify interval.
    progress_interval: Duration,
    /// `--max-request-bytes`: a response is split (fragment) or cut past it (bytes).
    max_request_bytes: usize,
}

impl WatchService {
    /// Serves Watch with `core`'s handles.
    pub fn new(core: &Core) -> Self {
        WatchService {
            ctx: Arc::new(WatchContext {
                reader: core.reader.clone(),
                feed: core.watch_feed.clone(),
                access: core.access.clone(),
                status: core.node.status.clone(),
                election_timeout: Duration::from_millis(core.cfg.election_timeout),
                stopping: core.stopping.clone(),
                progress_interval: core.cfg.watch_progress_notify_interval(),
                max_request_bytes: core.cfg.max_request_bytes,
            }),
        }
    }
}

type WatchStreamOut =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = WatchStreamOut;

    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let creds = super::auth::Credentials::of(&request);
        let (metadata, _, inbound) = request.into_parts();
        let (tx, rx) = mpsc::channel(OUTBOUND_CAPACITY);
        super::gate::end_stream_without_leader(
            &metadata.into_headers(),
            self.ctx.status.clone(),
            self.ctx.election_timeout,
            tx.clone(),
            self.ctx.stopping.clone(),
        );
        let stream = StreamState {
            ctx: self.ctx.clone(),
            tx,
            watchers: Watchers::new(),
            auth_checked: None,
            next_auto_id: 0,
            progress_requested: false,
            creds,
            counted: Counted::default(),
        };
        crate::metrics::WATCH_STREAMS.inc();
        tokio::spawn(stream.run(inbound));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// The client went away; the stream task ends and every watcher with it.
struct Gone;

struct StreamState {
    ctx: Arc<WatchContext>,
    tx: mpsc::Sender<Result<WatchResponse, Status>>,
    watchers: Watchers,
    /// The auth store (its revision, and whether auth was enabled) when the watchers created
    /// under auth were last found allowed to read their keys.
    auth_checked: Option<(u64, bool)>,
    next_auto_id: i64,
    progress_requested: bool,
    /// The stream's token or certificate user.
    creds: super::auth::Credentials,
    /// What this stream adds to the watcher gauges.
    counted: Counted,
}

/// A stream's share of `etcd_debugging_mvcc_watcher_total` and
/// `etcd_debugging_mvcc_slow_watcher_total`, and of the watchers registered with the feed,
/// taken back when the stream ends.
#[derive(Default)]
struct Counted {
    watchers: i64,
    slow: i64,
    prev_kv: i64,
}

impl Drop for StreamState {
    fn drop(&mut self) {
        crate::metrics::WATCH_STREAMS.dec();
        crate::metrics::WATCHERS.sub(self.counted.watchers);
        crate::metrics::SLOW_WATCHERS.sub(self.counted.slow);
        self.ctx
            .feed
            .register(-self.counted.watchers, -self.counted.prev_kv);
    }
}

impl StreamState {
    async fn run(mut self, mut inbound: Streaming<WatchRequest>) {
        let mut fed = self.ctx.feed.changes();
        let interval = self.ctx.progress_interval;
        let mut progress =
            tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        loop {
            if self.catch_up().await.is_err() {
                return;
            }
            self.account();
            let behind = self.behind();
            tokio::select! {
                biased;
                // etcd ends its watch streams with "etcdserver: server stopped" when the
                // member stops (`ErrGRPCStopped`); the client sees it rather than a transport
                // error and may go to another member.
                _ = self.ctx.stopping.cancelled() => {
                    let _ = self.tx.send(Err(EtcdError::Stopped.into())).await;
                    return;
                }
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => {
                        if self.handle(req).await.is_err() {
                            return;
                        }
                        self.account();
                    }
                    // Closed or broken: dropping the state releases every watcher.
                    _ => return,
                },
                // The feed moves after each applied batch; a stream without watchers has nothing
                // to do with it (a later change is still seen once it has one).
                changed = fed.changed(), if !behind && !self.watchers.is_empty() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = progress.tick() => {
                    if self.progress_notify().await.is_err() {
                        return;
                    }
                }
                _ = std::future::ready(()), if behind => {}
            }
        }
    }

    /// Brings the watcher gauges, and the watchers registered with the feed, up to date with
    /// this stream's watchers. A slow (unsynced) watcher is one behind the applied revision.
    fn account(&mut self) {
        let revision = self.ctx.reader.applied().revision;
        let watchers = self.watchers.len() as i64;
        let slow = self.watchers.behind_at(revision) as i64;
        let prev_kv = self.watchers.prev_kv() as i64;
        crate::metrics::WATCHERS.add(watchers - self.counted.watchers);
        crate::metrics::SLOW_WATCHERS.add(slow - self.counted.slow);
        self.ctx.feed.register(
            watchers - self.counted.watchers,
            prev_kv - self.counted.prev_kv,
        );
        self.counted = Counted {
            watchers,
            slow,
            prev_kv,
        };
    }

    /// Whether some watcher has events to catch up on now, without waiting for the feed: its
    /// next revision is applied and the feed has passed it (so the ring or the history has
    /// it).
    fn behind(&self) -> bool {
        let ready = self
            .ctx
            .reader
            .applied()
            .revision
            .min(self.ctx.feed.through());
        self.watchers.any_behind(ready)
    }

    async fn send(&self, resp: WatchResponse) -> Result<(), Gone> {
        self.tx.send(Ok(resp)).await.map_err(|_| Gone)
    }

    fn response(&self, watch_id: i64, revision: i64) -> WatchResponse {
        WatchResponse {
            header: self.ctx.reader.header(revision),
            watch_id,
            ..Default::default()
        }
    }

    async fn handle(&mut self, req: WatchRequest) -> Result<(), Gone> {
        match req.request_union {
            Some(RequestUnion::CreateRequest(c)) => {
                // etcd `isWatchPermitted`: READ on the key or range, as the stream's caller.
                let reader = if self.ctx.access.enabled() {
                    let caller = self.ctx.access.caller(&self.creds).await.ok().flatten();
                    let allowed = self
                        .ctx
                        .access
                        .check_read(caller.as_ref(), &c.key, &c.range_end)
                        .is_ok();
                    if !allowed {
                        let revision = self.ctx.reader.applied().revision;
                        let resp = WatchResponse {
                            created: true,
                            canceled: true,
                            cancel_reason: EtcdError::PermissionDenied.to_string(),
                            ..self.response(c.watch_id, revision)
                        };
                        return self.send(resp).await;
                    }
                    caller.map(|a| (a.user, c.key.clone(), c.range_end.clone()))
                } else {
                    None
                };
                let resp = self.create(c, reader);
                self.send(resp).await
            }
            Some(RequestUnion::CancelRequest(c)) => {
                if self.watchers.remove(c.watch_id).is_some() {
                    let revision = self.ctx.reader.applied().revision;
                    let resp = WatchResponse {
                        canceled: true,
                        ..self.response(c.watch_id, revision)
                    };
                    self.send(resp).await?;
                }
                Ok(())
            }
            Some(RequestUnion::ProgressRequest(_)) => {
                self.progress_requested = true;
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn create(
        &mut self,
        c: WatchCreateRequest,
        reader: Option<(String, Vec<u8>, Vec<u8>)>,
    ) -> WatchResponse {
        let revision = self.ctx.reader.applied().revision;
        let key = if c.key.is_empty() { vec![0] } else { c.key };
        let range = KeyRange::from_request(&key, &c.range_end);
        let refuse = |reason: &str, id: i64| WatchResponse {
            created: true,
            canceled: true,
            cancel_reason: reason.to_string(),
            ..self.response(id, revision)
        };
        if let RangeEnd::Before(end) = &range.end {
            if key >= *end {
                return refuse(EMPTY_RANGE, -1);
            }
        }
        let id = if c.watch_id != 0 {
            if self.watchers.contains(c.watch_id) {
                return refuse(DUPLICATE_ID, -1);
            }
            c.watch_id
        } else {
            while self.watchers.contains(self.next_auto_id) {
                self.next_auto_id += 1;
            }
            self.next_auto_id += 1;
            self.next_auto_id - 1
        };
        let has = |f: FilterType| c.filters.contains(&(f as i32));
        let mut watcher = Watcher::new(range);
        watcher.no_put = has(FilterType::Noput);
        watcher.no_delete = has(FilterType::Nodelete);
        watcher.prev_kv = c.prev_kv;
        watcher.progress_notify = c.progress_notify;
        watcher.fragment = c.fragment;
        watcher.reader = reader;
        let next_rev = if c.start_revision > 0 {
            c.start_revision
        } else {
            revision + 1
        };
        self.watchers.insert(id, watcher, next_rev);
        WatchResponse {
            created: true,
            ..self.response(id, revision)
        }
    }

    /// Sends every watcher what it is owed, one bounded batch per pass: the synced watchers
    /// together, from the feed's ring; then each watcher that is not synced alone, from the
    /// ring when it covers the watcher's next revision, else from the history.
    async fn catch_up(&mut self) -> Result<(), Gone> {
        // The view first: the feed reads only applied revisions, so every event it serves is at
        // or below `state.revision`, the revision of the responses' headers.
        let earliest = self.watchers.earliest();
        let feed = self.ctx.feed.view(earliest.unwrap_or(i64::MAX));
        let state = self.ctx.reader.applied();
        // After the view: a revoke applied before the view's events is seen before they are
        // sent.
        self.check_readers(state.revision).await?;
        let synced = self
            .watchers
            .serve_synced(&feed, state.compact_revision, EVENT_BATCH);
        for (target, events) in synced.unwrap_or_default() {
            self.send_events(target.id, state.revision, events, target.fragment)
                .await?;
        }
        for id in self.watchers.unsynced_through(state.revision) {
            let Some(w) = self.watchers.get(id) else {
                continue;
            };
            let next_rev = self.watchers.next_rev(w);
            let fetched = if next_rev < state.compact_revision {
                Ok(Err(HistoryCompacted {
                    compact_revision: state.compact_revision,
                }))
            } else {
                let served = feed.serve(
                    &w.range,
                    next_rev,
                    w.prev_kv,
                    state.compact_revision,
                    EVENT_BATCH,
                );
                match served {
                    Served::Events(batch) => Ok(Ok(batch)),
                    Served::Later => continue,
                    Served::History => {
                        self.ctx
                            .reader
                            .shards()
                            .events(&w.range, next_rev, state.revision, EVENT_BATCH, w.prev_kv)
                            .await
                    }
                }
            };
            match fetched {
                Ok(Ok(batch)) => {
                    let events: Vec<Event> = batch
                        .events
                        .into_iter()
                        .map(|e| e.event)
                        .filter(|e| w.wants(e))
                        .collect();
                    let fragment = w.fragment;
                    self.watchers.advance(id, batch.through + 1);
                    if !events.is_empty() {
                        self.send_events(id, state.revision, events, fragment)
                            .await?;
                    }
                }
                Ok(Err(HistoryCompacted { compact_revision })) => {
                    self.watchers.remove(id);
                    // The compaction that cut the watcher, as the shards answered: they apply a
                    // compaction before it is published, so `state` may still name an older
                    // one. etcd sets only compact_revision; the reason helps clients that read
                    // it.
                    let resp = WatchResponse {
                        canceled: true,
                        compact_revision,
                        cancel_reason: EtcdError::Compacted.to_string(),
                        ..self.response(id, state.revision)
                    };
                    self.send(resp).await?;
                }
                Err(_) => return Err(Gone),
            }
        }
        self.watchers.settle(feed.through());
        if self.progress_requested {
            // One read of the applied revision, both to see that every watcher is caught up
            // and for the notification: read twice, a revision applied in between would be
            // announced before its events were sent (a progress notification must never run
            // ahead of the events, etcd's "bookmarkable" guarantee).
            let revision = self.ctx.reader.applied().revision;
            if !self.watchers.any_behind(revision) {
                self.progress_requested = false;
                self.send(self.response(-1, revision)).await?;
            }
        }
        Ok(())
    }

    /// Cancels, with "etcdserver: permission denied", every watcher created under auth whose
    /// user may no longer read its keys. Permissions change only with the auth store, so the
    /// watchers are checked again only once its revision has moved or auth was enabled (which
    /// leaves the revision as it was, etcd `AuthEnable`).
    async fn check_readers(&mut self, revision: i64) -> Result<(), Gone> {
        if self.watchers.readers() == 0 {
            return Ok(());
        }
        let checked = self.auth_checked;
        let watchers = &self.watchers;
        let outcome = self.ctx.access.store().read(|a| {
            let now = (a.revision(), a.enabled());
            if checked == Some(now) {
                return None;
            }
            let read = crate::proto::authpb::permission::Type::Read;
            let denied: Vec<i64> = watchers
                .iter()
                .filter(|(_, w)| {
                    w.reader.as_ref().is_some_and(|(user, key, end)| {
                        a.check(user, a.revision(), key, end, read).is_err()
                    })
                })
                .map(|(id, _)| id)
                .collect();
            Some((now, denied))
        });
        let Some((now, denied)) = outcome else {
            return Ok(());
        };
        self.auth_checked = Some(now);
        for id in denied {
            self.watchers.remove(id);
            let resp = WatchResponse {
                canceled: true,
                cancel_reason: EtcdError::PermissionDenied.to_string(),
                ..self.response(id, revision)
            };
            self.send(resp).await?;
        }
        Ok(())
    }

    /// Sends events in one response, or, for a `fragment` watcher whose response would exceed
    /// `--max-request-bytes`, in several with `fragment` set on all but the last.
    async fn send_events(
        &self,
        id: i64,
        revision: i64,
        events: Vec<Event>,
        fragment: bool,
    ) -> Result<(), Gone> {
        let limit = self.ctx.max_request_bytes;
        let whole = WatchResponse {
            events,
            ..self.response(id, revision)
        };
        if !fragment || whole.encoded_len() <= limit || whole.events.len() < 2 {
            return self.send(whole).await;
        }
        let mut parts: Vec<Vec<Event>> = vec![Vec::new()];
        let mut size = 0;
        for e in whole.events {
            let len = e.encoded_len() + 4;
            if size + len > limit && !parts.last().unwrap().is_empty() {
                parts.push(Vec::new());
                size = 0;
            }
            size += len;
            parts.last_mut().unwrap().push(e);
        }
        let n = parts.len();
        for (i, events) in parts.into_iter().enumerate() {
            self.send(WatchResponse {
                events,
                fragment: i + 1 < n,
                ..self.response(id, revision)
            })
            .await?;
        }
        Ok(())
    }

    /// The periodic progress notification for synced watchers that asked for it.
    async fn progress_notify(&self) -> Result<(), Gone> {
        let revision = self.ctx.reader.applied().revision;
        for (id, w) in self.watchers.iter() {
            if w.progress_notify && self.watchers.next_rev(w) > revision {
                self.send(self.response(id, revision)).await?;
            }
        }
        Ok(())
    }
}
