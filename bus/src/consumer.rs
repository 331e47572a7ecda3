//! The consumer loop: read → verify → dedup → handle → ack, plus retries, reclaim and DLQ.
//!
//! Invariants:
//! - An entry is acknowledged only after one of: its handler succeeded; it was copied to
//!   `fleet:rejected` (verification failed, or a duplicate); it was copied to `fleet:dlq`
//!   (handler failed `max_deliveries` times, or permanently). The copy and the ack go in one
//!   ordered pipeline, copy first.
//! - A handler only ever receives a `Verified` envelope that passed the Redis replay guard.
//! - Nothing pending is forgotten: failed entries stay pending and are retried from Redis's
//!   pending list (surviving a restart of this process, whose consumer name is stable), and
//!   entries of a consumer that went silent are taken over with `XAUTOCLAIM`.
//! - A live consumer's entries are not taken over while they wait their turn in a batch:
//!   every quarter of `claim_idle` it settles what it finished and claims the rest afresh.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::Conn;
use envelope::{Checked, Envelope, StreamName, Verified, Verifier, VerifyContext, streams};
use tokio_util::sync::CancellationToken;

use crate::config::ConsumerConfig;
use crate::control::Gate;
use crate::names::{ENV_FIELD, SIDE_STREAM_CAP, done_key, fields, side_copy, side_detail};
use crate::reply::{self, Entry};
use crate::{BusError, HandlerError, KillEpoch, now_ms};

/// A verified envelope and where it came from.
#[derive(Debug)]
pub struct Delivery {
    /// The envelope: signature, edge, permissions, clock, epoch and replay all checked.
    pub envelope: Verified<Envelope>,
    /// The stream it was read from.
    pub stream: String,
    /// Its entry id there.
    pub entry_id: String,
    /// Redis's delivery count: 1 the first time, more on retries.
    pub deliveries: u64,
}

impl Delivery {
    /// The span its handling runs in: a child of the sender's span when the envelope
    /// carries a valid `traceparent`. None for an envelope without one (heartbeats, or a
    /// sender with tracing off): a span of its own would only make one-span traces.
    pub fn span(&self) -> tracing::Span {
        let env = &*self.envelope;
        if env.traceparent.is_none() {
            return tracing::Span::none();
        }
        let span = tracing::info_span!(
            "bus.handle",
            otel.name = format!("{} process", self.stream),
            otel.kind = "consumer",
            messaging.system = "redis",
            messaging.destination.name = %self.stream,
            messaging.message.id = %env.id,
            message_type = env.payload.message_type().as_str(),
            task_id = tracing::field::Empty,
            from_role = %env.from.role,
            from_instance = %env.from.instance,
            attempt = self.deliveries,
        );
        if let Some(t) = env.task_id {
            span.record("task_id", tracing::field::display(t));
        }
        telemetry::propagate::set_parent(&span, env.traceparent.as_deref());
        span
    }
}

/// Acts on deliveries. Return `Ok` only once the effect is durable: the entry is
/// acknowledged right after, and never handed out again.
pub trait Handler: Send + Sync + 'static {
    /// Handles one delivery.
    fn handle(&self, delivery: Delivery) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// Counters of one consumer, readable while it runs.
#[derive(Debug)]
pub struct ConsumerStats {
    /// Handler succeeded, entry acknowledged.
    pub handled: AtomicU64,
    /// Copied to `fleet:rejected` and acknowledged.
    pub rejected: AtomicU64,
    /// Copied to `fleet:dlq` and acknowledged.
    pub dead_lettered: AtomicU64,
    /// Handler returned an error (each attempt).
    pub handler_failures: AtomicU64,
    /// Redelivered after its handler had already succeeded: acknowledged, handler not rerun.
    pub already_done: AtomicU64,
    /// Pending entries that had been deleted from the stream before they were acknowledged.
    pub deleted_pending: AtomicU64,
    /// Times the loop lost its connection (or got a Redis error) and started over.
    pub reconnects: AtomicU64,
    rejected_by_reason: Mutex<BTreeMap<&'static str, u64>>,
    /// Seconds each handler call took, whatever it returned (a call the kill switch or the
    /// shutdown cut short is not observed).
    pub handler_seconds: prometheus_client::metrics::histogram::Histogram,
}

/// Bucket bounds of [`ConsumerStats::handler_seconds`]: 1 ms to about 33 min, doubling,
/// which spans a control message and a whole agent step.
pub fn handler_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 22)
}

impl Default for ConsumerStats {
    fn default() -> Self {
        Self {
            handled: AtomicU64::default(),
            rejected: AtomicU64::default(),
            dead_lettered: AtomicU64::default(),
            handler_failures: AtomicU64::default(),
            already_done: AtomicU64::default(),
            deleted_pending: AtomicU64::default(),
            reconnects: AtomicU64::default(),
            rejected_by_reason: Mutex::default(),
            handler_seconds: prometheus_client::metrics::histogram::Histogram::new(handler_buckets()),
        }
    }
}

impl ConsumerStats {
    /// Rejections per verifier code.
    pub fn rejected_by_reason(&self) -> BTreeMap<&'static str, u64> {
        self.rejected_by_reason.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn reject(&self, reason: &'static str) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        *self.rejected_by_reason.lock().unwrap_or_else(|p| p.into_inner()).entry(reason).or_default() += 1;
    }
}

/// Resolves when `gate` pauses; never without a gate.
async fn paused(gate: Option<&Gate>) {
    match gate {
        Some(g) => g.wait_paused().await,
        None => std::future::pending().await,
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// How many `XAUTOCLAIM` pages one maintenance pass follows.
const AUTOCLAIM_PAGES: usize = 8;

/// What a batch ends in; written in one pipeline.
#[derive(Default)]
struct Outcome {
    rejects: Vec<(Entry, &'static str, String)>,
    dead: Vec<(Entry, u64, String)>,
    /// How many handlers succeeded (their entries are among `acks`).
    done: u64,
    acks: Vec<String>,
}

/// Consumes one stream in one consumer group.
pub struct Consumer<H> {
    cfg: ConsumerConfig,
    pool: crate::RedisPool,
    verifier: Arc<Verifier>,
    epoch: KillEpoch,
    handler: H,
    stats: Arc<ConsumerStats>,
    /// Last handler error per pending entry, for the DLQ record.
    last_errors: HashMap<String, String>,
    group_ready: bool,
    next_maintenance: Instant,
    next_prune: Instant,
    autoclaim_cursor: String,
    gate: Option<Gate>,
    /// Told of every entry refused (see [`RejectHook`]).
    on_reject: Option<RejectHook>,
}

/// An entry a consumer refused, as a [`RejectHook`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The stream it was on.
    pub stream: String,
    /// The reason code (`bad_signature`, `forbidden_type`, `decode`, …).
    pub reason: &'static str,
    /// The sender it claims to be, `(role, instance)`, when its body decodes. Unverified:
    /// whoever wrote it may claim anyone; counted per claim, it still shows where a burst
    /// of forgeries says it comes from.
    pub claimed: Option<(String, String)>,
}

/// Called (cheaply, synchronously) for every entry a consumer refuses, so a process can
/// notice a burst from one sender (the orchestrator opens an incident).
#[derive(Clone)]
pub struct RejectHook(pub Arc<dyn Fn(Rejection) + Send + Sync>);

impl std::fmt::Debug for RejectHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RejectHook")
    }
}

impl<H> std::fmt::Debug for Consumer<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer").field("cfg", &self.cfg).field("stats", &self.stats).finish_non_exhaustive()
    }
}

impl<H: Handler> Consumer<H> {
    /// A consumer; checks the configuration.
    pub fn new(
        cfg: ConsumerConfig,
        pool: crate::RedisPool,
        verifier: Arc<Verifier>,
        epoch: KillEpoch,
        handler: H,
    ) -> Result<Self, BusError> {
        cfg.validate()?;
        let now = Instant::now();
        Ok(Self {
            cfg,
            pool,
            verifier,
            epoch,
            handler,
            stats: Arc::default(),
            last_errors: HashMap::new(),
            group_ready: false,
            next_maintenance: now,
            next_prune: now,
            autoclaim_cursor: "0-0".into(),
            gate: None,
            on_reject: None,
        })
    }

    /// Tells `hook` of every entry this consumer refuses.
    pub fn with_reject_hook(mut self, hook: RejectHook) -> Self {
        self.on_reject = Some(hook);
        self
    }

    /// Waits at `gate` (the kill switch): while it is paused nothing is claimed, read or
    /// retried, and a running handler is abandoned, its entry left pending for after resume.
    pub fn with_gate(mut self, gate: Gate) -> Self {
        self.gate = Some(gate);
        self
    }

    /// Counters, shareable with a metrics endpoint.
    pub fn stats(&self) -> Arc<ConsumerStats> {
        Arc::clone(&self.stats)
    }

    /// Runs until `shutdown` is cancelled. Redis failures never end the loop: it reconnects
    /// with backoff. On shutdown it stops reading, lets a running handler finish within the
    /// grace period, and leaves everything else pending.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut conn: Option<Conn> = None;
        let mut delays = crate::reconnect_delays();
        while !shutdown.is_cancelled() {
            let result = match conn.as_mut() {
                Some(c) => self.step(c, &shutdown).await,
                None => match self.pool.dedicated().await {
                    // A dedicated connection: a blocking read must not hold up anyone else.
                    Ok(c) => {
                        conn = Some(c);
                        continue;
                    }
                    Err(e) => Err(BusError::from(e)),
                },
            };
            match result {
                Ok(()) => delays = crate::reconnect_delays(),
                Err(e) => {
                    bump(&self.stats.reconnects);
                    conn = None;
                    self.group_ready = false;
                    let delay = delays.next().unwrap_or(Duration::from_secs(5));
                    tracing::warn!(stream = %self.cfg.stream, group = %self.cfg.group, error = %e, retry_in_ms = delay.as_millis() as u64, "Consumer lost Redis; reconnecting.");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = shutdown.cancelled() => {}
                    }
                }
            }
        }
        tracing::info!(stream = %self.cfg.stream, consumer = %self.cfg.consumer, "Consumer stopped.");
    }

    async fn step(&mut self, c: &mut Conn, shutdown: &CancellationToken) -> Result<(), BusError> {
        if let Some(gate) = self.gate.as_ref().filter(|g| g.is_paused()) {
            tokio::select! {
                () = gate.wait_open() => {}
                () = shutdown.cancelled() => {}
            }
            return Ok(());
        }
        if !self.group_ready {
            ensure_group(c, self.cfg.stream.as_str(), &self.cfg.group).await?;
            self.group_ready = true;
        }
        let now = Instant::now();
        if now >= self.next_maintenance {
            self.retry_own_pending(c, shutdown).await?;
            self.reclaim_dead(c).await?;
            self.next_maintenance = Instant::now() + self.cfg.maintenance_every;
        }
        if now >= self.next_prune {
            self.prune_idle_consumers(c).await?;
            self.next_prune = Instant::now() + self.cfg.prune_every;
        }
        let block = self
            .cfg
            .block
            .min(self.next_maintenance.saturating_duration_since(Instant::now()))
            .max(Duration::from_millis(1));
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.cfg.group)
            .arg(&self.cfg.consumer)
            .arg("COUNT")
            .arg(self.cfg.batch)
            .arg("BLOCK")
            .arg(block.as_millis() as u64)
            .arg("STREAMS")
            .arg(self.cfg.stream.as_str())
            .arg(">");
        let read_at = Instant::now();
        let read = cmd.query_async::<redis::Value>(c);
        let reply = tokio::select! {
            r = read => r?,
            // Entries this read may have claimed stay pending and are retried after restart.
            () = shutdown.cancelled() => return Ok(()),
            // Likewise on a pause: retried after resume.
            () = paused(self.gate.as_ref()) => return Ok(()),
        };
        let entries = reply::read_one_stream_owned(reply)?;
        if entries.is_empty() {
            return Ok(());
        }
        self.process(c, entries, read_at, &HashMap::new(), shutdown).await
    }

    /// Verifies, dedups, handles and settles a batch. `read_at` is when the command that
    /// delivered it was sent; `deliveries` gives Redis's delivery count of redelivered
    /// entries (absent: first delivery).
    async fn process(
        &mut self,
        c: &mut Conn,
        entries: Vec<Entry>,
        read_at: Instant,
        deliveries: &HashMap<String, u64>,
        shutdown: &CancellationToken,
    ) -> Result<(), BusError> {
        let stream = self.cfg.stream.as_str().to_owned();
        let now = now_ms();
        let ctx = VerifyContext { now_ms: now, kill_epoch: self.epoch.get() };
        let mut out = Outcome::default();
        let mut checked: Vec<(Entry, Checked)> = Vec::with_capacity(entries.len());
        for e in entries {
            match (e.field(ENV_FIELD), &e.fields) {
                (_, None) => {
                    // Deleted from the stream while pending: nothing left to act on.
                    bump(&self.stats.deleted_pending);
                    tracing::warn!(stream = %stream, entry = %e.id, "A pending entry was deleted from the stream before it was acknowledged.");
                    out.acks.push(e.id);
                }
                (None, Some(_)) => out.rejects.push((e, "decode", "stream entry has no `env` field".into())),
                (Some(wire), Some(_)) => match self.verifier.check(&stream, wire, ctx) {
                    Ok(chk) => checked.push((e, chk)),
                    Err(err) => {
                        let detail = err.to_string();
                        out.rejects.push((e, err.reason(), detail));
                    }
                },
            }
        }

        let mut to_handle = Vec::with_capacity(checked.len());
        if !checked.is_empty() {
            // One round trip marks every id as seen by this group, remembering which entry
            // carried it: the answer is `None` for a first sighting, else that entry.
            let sightings: Vec<crate::guard::Sighting<'_>> = checked
                .iter()
                .map(|(e, chk)| crate::guard::Sighting {
                    id: chk.id(),
                    until_ms: chk.remember_until_ms(),
                    entry: &e.id,
                })
                .collect();
            let previous = crate::guard::mark(c, &stream, &self.cfg.group, &sightings).await?;
            drop(sightings);
            let mut redelivered = Vec::new();
            for ((e, chk), prev) in checked.into_iter().zip(previous) {
                match prev {
                    None => to_handle.push((e, chk)),
                    Some(p) if p == e.id => redelivered.push((e, chk)),
                    Some(p) => {
                        let detail = format!("envelope {} was already carried by entry {p}", chk.id());
                        out.rejects.push((e, "replay", detail));
                    }
                }
            }
            if !redelivered.is_empty() {
                // Consumers no longer write done markers (the acknowledgement is the mark:
                // an acknowledged entry is never handed out again); one an older consumer
                // wrote before an upgrade is still honoured. Redeliveries only, so the hot
                // path has no round trip for it.
                let mut pipe = redis::pipe();
                for (_, chk) in &redelivered {
                    pipe.cmd("EXISTS").arg(done_key(&self.cfg.group, &chk.id()));
                }
                let done: Vec<bool> = pipe.query_async(c).await?;
                for ((e, chk), done) in redelivered.into_iter().zip(done) {
                    if done {
                        bump(&self.stats.already_done);
                        out.acks.push(e.id);
                    } else {
                        to_handle.push((e, chk));
                    }
                }
            }
        }

        // Entries wait their turn in the batch while their idle time, as Redis sees it, grows
        // toward `claim_idle`, after which other consumers would take them over and handle
        // them a second time. So every quarter of `claim_idle` the finished ones are settled
        // and the waiting ones claimed afresh.
        let mut kept_at = read_at;
        let mut queue: VecDeque<(Entry, Checked)> = to_handle.into();
        while let Some((e, chk)) = queue.pop_front() {
            if shutdown.is_cancelled() || self.gate.as_ref().is_some_and(Gate::is_paused) {
                break; // Not started: stays pending.
            }
            if kept_at.elapsed() >= self.cfg.claim_idle / 4 {
                self.settle(c, std::mem::take(&mut out)).await?;
                let waiting: Vec<&str> =
                    std::iter::once(e.id.as_str()).chain(queue.iter().map(|(w, _)| w.id.as_str())).collect();
                let since = kept_at;
                kept_at = Instant::now();
                let kept = self.keep(c, &waiting, since).await?;
                queue.retain(|(w, _)| kept.contains(&w.id));
                if !kept.contains(&e.id) {
                    continue;
                }
            }
            let n = deliveries.get(&e.id).copied().unwrap_or(1);
            // The Redis guard above answered "first sighting" (or "same entry, not done").
            let Ok(envelope) = chk.after_replay_check(true) else { continue };
            let delivery = Delivery { envelope, stream: stream.clone(), entry_id: e.id.clone(), deliveries: n };
            match self.run_handler(delivery, shutdown).await {
                Some(Ok(())) => {
                    // Hashing the id costs more than the rest of a success's bookkeeping.
                    if !self.last_errors.is_empty() {
                        self.last_errors.remove(&e.id);
                    }
                    out.done += 1;
                    out.acks.push(e.id);
                }
                Some(Err(HandlerError::Permanent(msg))) => {
                    bump(&self.stats.handler_failures);
                    out.dead.push((e, n, format!("permanent failure: {msg}")));
                }
                Some(Err(HandlerError::Transient(msg))) => {
                    bump(&self.stats.handler_failures);
                    if n >= self.cfg.max_deliveries {
                        out.dead.push((e, n, format!("failed {n} deliveries; last error: {msg}")));
                    } else {
                        tracing::warn!(stream = %stream, entry = %e.id, deliveries = n, error = %msg, "Handler failed; will retry.");
                        self.last_errors.insert(e.id, msg);
                    }
                }
                None => break, // Grace period over: left pending.
            }
        }
        self.settle(c, out).await
    }

    /// Resets the idle time of `ids`, entries of this batch not yet handled, with
    /// `XCLAIM … JUSTID` (which leaves the delivery counter alone), and returns those that
    /// are still ours. `since` is when they were last read or kept: an entry still ours has
    /// been idle about that long, while one another consumer took over (possible only after
    /// a handler overran `claim_idle`) has been idle at least `claim_idle` less; the
    /// `min-idle-time` between the two leaves the latter with its new owner.
    async fn keep(&self, c: &mut Conn, ids: &[&str], since: Instant) -> Result<HashSet<String>, BusError> {
        let min_idle = since.elapsed().saturating_sub(self.cfg.claim_idle / 2);
        let kept: Vec<String> = redis::cmd("XCLAIM")
            .arg(self.cfg.stream.as_str())
            .arg(&self.cfg.group)
            .arg(&self.cfg.consumer)
            .arg(min_idle.as_millis() as u64)
            .arg(ids)
            .arg("JUSTID")
            .query_async(c)
            .await?;
        if kept.len() < ids.len() {
            tracing::warn!(stream = %self.cfg.stream, consumer = %self.cfg.consumer, lost = ids.len() - kept.len(), "Entries waiting in a batch were taken over by another consumer (a handler overran claim_idle) or deleted; skipping them.");
        }
        Ok(kept.into_iter().collect())
    }

    async fn run_handler(&self, d: Delivery, shutdown: &CancellationToken) -> Option<Result<(), HandlerError>> {
        let span = d.span();
        let started = Instant::now();
        let fut = tracing::Instrument::instrument(self.handler.handle(d), span);
        tokio::pin!(fut);
        let result = tokio::select! {
            // The handler first: one that is ready at once (most are) then never registers
            // with the shutdown token or the gate, which costs a lock each way.
            biased;
            r = &mut fut => Some(r),
            () = shutdown.cancelled() => tokio::time::timeout(self.cfg.grace, fut).await.ok(),
            // The kill switch does not wait: the handler is dropped where it stands.
            () = paused(self.gate.as_ref()) => None,
        };
        if result.is_some() {
            self.stats.handler_seconds.observe(started.elapsed().as_secs_f64());
        }
        result
    }

    /// Copies rejects and dead letters, marks successes done, then acknowledges: one
    /// ordered pipeline, so nothing is acknowledged before its copy exists.
    async fn settle(&mut self, c: &mut Conn, out: Outcome) -> Result<(), BusError> {
        if out.rejects.is_empty() && out.dead.is_empty() && out.done == 0 && out.acks.is_empty() {
            return Ok(());
        }
        let stream = self.cfg.stream.as_str();
        let at = now_ms().to_string();
        let mut pipe = redis::pipe();
        let mut ack_ids: Vec<&str> = out.acks.iter().map(String::as_str).collect();
        for (e, reason, detail) in &out.rejects {
            tracing::warn!(stream, entry = %e.id, reason, detail = %detail, "Rejected an entry.");
            if let Some(hook) = &self.on_reject {
                let claimed = e
                    .field(ENV_FIELD)
                    .and_then(|wire| envelope::wire::decode_frame(wire).ok())
                    .and_then(|frame| envelope::Envelope::from_body_bytes(frame.body).ok())
                    .map(|env| (env.from.role.as_str().to_owned(), env.from.instance.as_str().to_owned()));
                (hook.0)(Rejection { stream: stream.to_owned(), reason, claimed });
            }
            let x = pipe.cmd("XADD").arg(streams::REJECTED).arg("MAXLEN").arg("~").arg(SIDE_STREAM_CAP).arg("*");
            x.arg(fields::STREAM).arg(stream).arg(fields::ENTRY).arg(&e.id).arg(fields::GROUP).arg(&self.cfg.group);
            x.arg(fields::CONSUMER)
                .arg(&self.cfg.consumer)
                .arg(fields::REASON)
                .arg(*reason)
                .arg(fields::DETAIL)
                .arg(side_detail(detail));
            let (kept, len, sha) = side_copy(e.field(ENV_FIELD).unwrap_or_default());
            x.arg(fields::AT_MS).arg(&at).arg(fields::ENV_LEN).arg(len).arg(fields::ENV_SHA256).arg(sha);
            x.arg(ENV_FIELD).arg(kept).ignore();
            ack_ids.push(&e.id);
        }
        for (e, n, detail) in &out.dead {
            tracing::error!(stream, entry = %e.id, deliveries = n, detail = %detail, "Moved an entry to the dead-letter stream; an operator must look at it.");
            let x = pipe.cmd("XADD").arg(streams::DLQ).arg("MAXLEN").arg("~").arg(SIDE_STREAM_CAP).arg("*");
            x.arg(fields::STREAM).arg(stream).arg(fields::ENTRY).arg(&e.id).arg(fields::GROUP).arg(&self.cfg.group);
            x.arg(fields::CONSUMER)
                .arg(&self.cfg.consumer)
                .arg(fields::DELIVERIES)
                .arg(*n)
                .arg(fields::DETAIL)
                .arg(side_detail(detail));
            let (kept, len, sha) = side_copy(e.field(ENV_FIELD).unwrap_or_default());
            x.arg(fields::AT_MS).arg(&at).arg(fields::ENV_LEN).arg(len).arg(fields::ENV_SHA256).arg(sha);
            x.arg(ENV_FIELD).arg(kept).ignore();
            ack_ids.push(&e.id);
        }
        if !ack_ids.is_empty() {
            pipe.cmd("XACK").arg(stream).arg(&self.cfg.group).arg(&ack_ids).ignore();
        }
        pipe.query_async::<()>(c).await?;
        for (e, reason, _) in &out.rejects {
            self.stats.reject(reason);
            self.last_errors.remove(&e.id);
        }
        for (e, _, _) in &out.dead {
            bump(&self.stats.dead_lettered);
            self.last_errors.remove(&e.id);
        }
        self.stats.handled.fetch_add(out.done, Ordering::Relaxed);
        Ok(())
    }

    /// Retries this consumer's own failed entries whose backoff has passed (and those taken
    /// over from dead consumers); dead-letters those out of deliveries.
    async fn retry_own_pending(&mut self, c: &mut Conn, shutdown: &CancellationToken) -> Result<(), BusError> {
        let stream = self.cfg.stream.as_str().to_owned();
        let stream = stream.as_str();
        let rows: redis::Value = redis::cmd("XPENDING")
            .arg(stream)
            .arg(&self.cfg.group)
            .arg("IDLE")
            .arg(self.cfg.retry_base.as_millis() as u64)
            .arg("-")
            .arg("+")
            .arg(self.cfg.batch)
            .arg(&self.cfg.consumer)
            .query_async(c)
            .await?;
        let due: Vec<reply::Pending> = reply::pending(&rows)?
            .into_iter()
            .filter(|p| Duration::from_millis(p.idle_ms) >= self.cfg.retry_delay(p.deliveries))
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        let (exhausted, retry): (Vec<_>, Vec<_>) =
            due.into_iter().partition(|p| p.deliveries >= self.cfg.max_deliveries);

        if !exhausted.is_empty() {
            let mut pipe = redis::pipe();
            for p in &exhausted {
                pipe.cmd("XRANGE").arg(stream).arg(&p.id).arg(&p.id);
            }
            let found: Vec<redis::Value> = pipe.query_async(c).await?;
            let mut out = Outcome::default();
            for (p, v) in exhausted.iter().zip(found) {
                match reply::entries("XRANGE", &v)?.into_iter().next() {
                    Some(e) => {
                        let last =
                            self.last_errors.get(&p.id).cloned().unwrap_or_else(|| "handler did not succeed".into());
                        out.dead.push((
                            e,
                            p.deliveries,
                            format!("failed {} deliveries; last error: {last}", p.deliveries),
                        ));
                    }
                    None => {
                        bump(&self.stats.deleted_pending);
                        out.acks.push(p.id.clone());
                    }
                }
            }
            self.settle(c, out).await?;
        }

        if !retry.is_empty() {
            let ids: Vec<&str> = retry.iter().map(|p| p.id.as_str()).collect();
            // XCLAIM to ourselves bumps Redis's delivery counter: the attempt is recorded
            // before the handler runs, so a crash mid-handler still counts it.
            let read_at = Instant::now();
            let claimed: redis::Value = redis::cmd("XCLAIM")
                .arg(stream)
                .arg(&self.cfg.group)
                .arg(&self.cfg.consumer)
                .arg(0)
                .arg(&ids)
                .query_async(c)
                .await?;
            let entries = reply::entries("XCLAIM", &claimed)?;
            let counts: HashMap<String, u64> = retry.iter().map(|p| (p.id.clone(), p.deliveries + 1)).collect();
            self.process(c, entries, read_at, &counts, shutdown).await?;
        }
        Ok(())
    }

    /// Takes over entries that other consumers left idle past `claim_idle`, following
    /// `XAUTOCLAIM`'s cursor across passes. They are then retried as our own pending entries.
    async fn reclaim_dead(&mut self, c: &mut Conn) -> Result<(), BusError> {
        for _ in 0..AUTOCLAIM_PAGES {
            let v: redis::Value = redis::cmd("XAUTOCLAIM")
                .arg(self.cfg.stream.as_str())
                .arg(&self.cfg.group)
                .arg(&self.cfg.consumer)
                .arg(self.cfg.claim_idle.as_millis() as u64)
                .arg(&self.autoclaim_cursor)
                .arg("COUNT")
                .arg(self.cfg.batch)
                .arg("JUSTID")
                .query_async(c)
                .await?;
            let page = reply::autoclaim_justid(&v)?;
            if !page.claimed.is_empty() {
                tracing::info!(stream = %self.cfg.stream, count = page.claimed.len(), "Took over entries from a silent consumer.");
            }
            if !page.deleted.is_empty() {
                self.stats.deleted_pending.fetch_add(page.deleted.len() as u64, Ordering::Relaxed);
                tracing::warn!(stream = %self.cfg.stream, count = page.deleted.len(), "Pending entries had been deleted from the stream before they were acknowledged.");
            }
            self.autoclaim_cursor = page.cursor;
            if self.autoclaim_cursor == "0-0" {
                break;
            }
        }
        Ok(())
    }

    /// Deletes other consumers that have nothing pending and have been idle for long, so
    /// restarts with new names don't grow the group forever. Not when
    /// `remove_idle_consumers_after` is `None` (workers: their groups are pruned by the
    /// orchestrator, see [`crate::pruner`]).
    async fn prune_idle_consumers(&mut self, c: &mut Conn) -> Result<(), BusError> {
        let Some(after) = self.cfg.remove_idle_consumers_after else { return Ok(()) };
        crate::pruner::prune_idle_consumers(
            c,
            self.cfg.stream.as_str(),
            &self.cfg.group,
            Some(&self.cfg.consumer),
            after,
        )
        .await?;
        Ok(())
    }
}

/// Creates the group (and the stream) if missing; an existing group is fine.
pub async fn ensure_group(c: &mut Conn, stream: &str, group: &str) -> Result<(), BusError> {
    let r: redis::RedisResult<()> =
        redis::cmd("XGROUP").arg("CREATE").arg(stream).arg(group).arg("0").arg("MKSTREAM").query_async(c).await;
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// What every consumer of one process shares: the pool, the verifier, the kill epoch, its
/// group and consumer name, and the shutdown grace. Builds and starts the process's
/// consumers so each service's wiring names only the stream and the handler.
#[derive(Debug, Clone)]
pub struct Consumers {
    pool: crate::RedisPool,
    verifier: Arc<Verifier>,
    epoch: KillEpoch,
    group: String,
    consumer: String,
    grace: Duration,
    /// Where each started consumer's stats are exported, when the process serves metrics.
    metrics: Option<crate::metrics::BusMetrics>,
    /// Given to every consumer started from now on.
    on_reject: Option<RejectHook>,
}

impl Consumers {
    /// Exports the stats of every consumer started from now on through `metrics`.
    pub fn with_metrics(mut self, metrics: crate::metrics::BusMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Consumers in `group` named `consumer` (stable per process).
    pub fn new(
        pool: crate::RedisPool,
        verifier: Arc<Verifier>,
        epoch: KillEpoch,
        group: impl Into<String>,
        consumer: impl Into<String>,
        grace: Duration,
    ) -> Self {
        Self {
            pool,
            verifier,
            epoch,
            group: group.into(),
            consumer: consumer.into(),
            grace,
            metrics: None,
            on_reject: None,
        }
    }

    /// Tells `hook` of every entry the consumers started from now on refuse.
    pub fn with_reject_hook(mut self, hook: RejectHook) -> Self {
        self.on_reject = Some(hook);
        self
    }

    /// The defaults for `stream`, in this process's group, under its name and grace.
    pub fn config(&self, stream: StreamName) -> ConsumerConfig {
        let mut cfg = ConsumerConfig::new(stream, self.group.clone(), self.consumer.clone());
        cfg.grace = self.grace;
        cfg
    }

    /// Checks `cfg` and starts a consumer with `handler` on `tasks`, until `shutdown`.
    pub fn spawn<H: Handler>(
        &self,
        tasks: &mut tokio::task::JoinSet<()>,
        cfg: ConsumerConfig,
        handler: H,
        shutdown: &CancellationToken,
    ) -> Result<(), BusError> {
        let (stream, group) = (cfg.stream.to_string(), cfg.group.clone());
        let mut consumer = Consumer::new(cfg, self.pool.clone(), self.verifier.clone(), self.epoch.clone(), handler)?;
        if let Some(hook) = &self.on_reject {
            consumer = consumer.with_reject_hook(hook.clone());
        }
        if let Some(m) = &self.metrics {
            m.watch(&stream, &group, consumer.stats());
        }
        tasks.spawn(consumer.run(shutdown.clone()));
        Ok(())
    }
}
