//! The kill switch as every process sees it: the state record in Redis (`fleet:killswitch`),
//! the per-role control stream (`fleet:control:<role>`), and the [`Gate`] that consumers wait
//! at while the fleet is paused.
//!
//! The budget manager engages the switch by writing the state record once and then sending
//! `control.pause` on every role's control stream. A process learns of it either way: a
//! [`ControlListener`] reads the record at start (so a process started during a kill comes
//! up paused), follows the stream for prompt delivery, and re-reads the record every few
//! seconds in case a message was trimmed away or missed across a reconnect.

use std::sync::Arc;
use std::time::Duration;

use crate::Conn;
use envelope::{Payload, Role, StreamName, Verifier, VerifyContext};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::names::ENV_FIELD;
use crate::{BusError, KillEpoch, now_ms, reply};

/// The hash holding the kill switch's one state record.
pub const KILLSWITCH_KEY: &str = "fleet:killswitch";

/// The kill switch's state record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KillState {
    /// The kill epoch: envelopes issued under an older one are refused.
    pub epoch: u64,
    /// Whether the fleet is paused.
    pub engaged: bool,
    /// Who engaged (or last resumed) it.
    pub by: Option<String>,
    /// Why.
    pub reason: Option<String>,
    /// When, Unix ms.
    pub at_ms: Option<u64>,
}

/// Reads the state record; an absent record is epoch 0, not engaged.
pub async fn read_state(c: &mut Conn) -> Result<KillState, BusError> {
    let map: std::collections::HashMap<String, String> =
        redis::cmd("HGETALL").arg(KILLSWITCH_KEY).query_async(c).await?;
    Ok(KillState {
        epoch: map.get("epoch").and_then(|v| v.parse().ok()).unwrap_or(0),
        engaged: map.get("engaged").is_some_and(|v| v == "1"),
        by: map.get("by").cloned(),
        reason: map.get("reason").cloned(),
        at_ms: map.get("at_ms").and_then(|v| v.parse().ok()),
    })
}

/// Open or paused; consumers wait at it before claiming work and abandon a running handler
/// when it closes. Cloning shares the gate.
#[derive(Debug, Clone)]
pub struct Gate(Arc<watch::Sender<bool>>);

impl Default for Gate {
    fn default() -> Self {
        Self::new(false)
    }
}

impl Gate {
    /// A gate, paused or open.
    pub fn new(paused: bool) -> Self {
        Self(Arc::new(watch::Sender::new(paused)))
    }

    /// Closes the gate; true if it was open.
    pub fn pause(&self) -> bool {
        self.0.send_if_modified(|p| !std::mem::replace(p, true))
    }

    /// Opens the gate; true if it was closed.
    pub fn resume(&self) -> bool {
        self.0.send_if_modified(|p| std::mem::replace(p, false))
    }

    /// Whether the fleet is paused.
    pub fn is_paused(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the gate is open (at once if it is).
    pub async fn wait_open(&self) {
        let mut rx = self.0.subscribe();
        // The sender lives in `self`, so `wait_for` cannot see it closed.
        let _ = rx.wait_for(|paused| !paused).await;
    }

    /// Resolves once the gate is paused (at once if it is).
    pub async fn wait_paused(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|paused| *paused).await;
    }

    /// A receiver that sees every change.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.0.subscribe()
    }
}

/// A kill-switch change a [`ControlListener`] applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlEvent {
    /// The fleet paused under `epoch`.
    Pause {
        /// The new kill epoch.
        epoch: u64,
        /// Why.
        reason: String,
    },
    /// The fleet resumed; `epoch` stays in force.
    Resume {
        /// The epoch in force.
        epoch: u64,
    },
}

/// Follows one role's control stream and the state record; raises the [`KillEpoch`] and
/// closes or opens the [`Gate`].
#[derive(Debug)]
pub struct ControlListener {
    pool: crate::RedisPool,
    verifier: Arc<Verifier>,
    stream: StreamName,
    epoch: KillEpoch,
    gate: Gate,
    events: Option<mpsc::UnboundedSender<ControlEvent>>,
    resync_every: Duration,
    block: Duration,
    record_only: bool,
}

impl ControlListener {
    /// A listener for `role`'s control stream. The pool's response timeout must exceed one
    /// second (see [`crate::pool`]).
    pub fn new(pool: crate::RedisPool, verifier: Arc<Verifier>, role: Role, epoch: KillEpoch, gate: Gate) -> Self {
        Self {
            pool,
            verifier,
            stream: StreamName::control(role),
            epoch,
            gate,
            events: None,
            resync_every: Duration::from_secs(5),
            block: Duration::from_millis(1000),
            record_only: false,
        }
    }

    /// Follows the state record only, not the control stream. For the budget manager: its
    /// control stream carries the orchestrator's kill and resume *requests*, which only
    /// become the fleet's state once the budget manager engages (and writes the record).
    pub fn record_only(mut self) -> Self {
        self.record_only = true;
        self
    }

    /// Also reports every change it applies on `tx` (the orchestrator freezes merges on a
    /// pause; workers kill their sandboxes).
    pub fn with_events(mut self, tx: mpsc::UnboundedSender<ControlEvent>) -> Self {
        self.events = Some(tx);
        self
    }

    /// How often the state record is re-read (default 5 s).
    pub fn with_resync(mut self, every: Duration) -> Self {
        self.resync_every = every;
        self
    }

    /// Reads the state record once and applies it: call before starting consumers, so a
    /// process started during a kill never claims anything.
    pub async fn sync(&self) -> Result<KillState, BusError> {
        let mut c = self.pool.get().await?;
        let state = read_state(&mut c).await?;
        self.apply_state(&state);
        Ok(state)
    }

    /// Runs until `shutdown`; Redis failures are retried with backoff.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut delays = crate::reconnect_delays();
        let mut guard = envelope::MemoryReplayGuard::new();
        while !shutdown.is_cancelled() {
            match self.follow(&mut guard, &shutdown).await {
                Ok(()) => return,
                Err(e) => {
                    let delay = delays.next().unwrap_or(Duration::from_secs(5));
                    tracing::warn!(stream = %self.stream, error = %e, retry_in_ms = delay.as_millis() as u64, "Control listener lost Redis; reconnecting.");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = shutdown.cancelled() => return,
                    }
                }
            }
        }
    }

    async fn follow(
        &self,
        guard: &mut envelope::MemoryReplayGuard,
        shutdown: &CancellationToken,
    ) -> Result<(), BusError> {
        let mut c = self.pool.dedicated().await?;
        if self.record_only {
            loop {
                let state = read_state(&mut c).await?;
                self.apply_state(&state);
                tokio::select! {
                    () = tokio::time::sleep(self.resync_every) => {}
                    () = shutdown.cancelled() => return Ok(()),
                }
            }
        }
        // The last id first, then the record: a pause written after the id is read from the
        // stream, one written before it is in the record.
        let mut cursor = last_id(&mut c, self.stream.as_str()).await?;
        let state = read_state(&mut c).await?;
        self.apply_state(&state);
        let mut next_sync = tokio::time::Instant::now() + self.resync_every;
        loop {
            let Some(entries) = read_after(&mut c, self.stream.as_str(), &cursor, 16, self.block, shutdown).await?
            else {
                return Ok(());
            };
            for e in entries {
                cursor.clone_from(&e.id);
                self.apply_entry(&e, guard);
            }
            if tokio::time::Instant::now() >= next_sync {
                let state = read_state(&mut c).await?;
                self.apply_state(&state);
                next_sync = tokio::time::Instant::now() + self.resync_every;
            }
        }
    }

    fn apply_entry(&self, e: &reply::Entry, guard: &mut envelope::MemoryReplayGuard) {
        let Some(wire) = e.field(ENV_FIELD) else {
            tracing::warn!(stream = %self.stream, entry = %e.id, "Control entry without an envelope; ignored.");
            return;
        };
        let now = now_ms();
        let ctx = VerifyContext { now_ms: now, kill_epoch: self.epoch.get() };
        let verified = match self.verifier.check(self.stream.as_str(), wire, ctx).and_then(|c| c.accept(guard, now)) {
            Ok(v) => v,
            Err(err) => {
                // Old pauses left in the stream fail the expiry or epoch check: expected.
                tracing::debug!(stream = %self.stream, entry = %e.id, reason = err.reason(), "Control entry refused.");
                return;
            }
        };
        match &verified.payload {
            Payload::ControlPause(p) => {
                self.epoch.raise(p.epoch);
                if self.gate.pause() {
                    tracing::warn!(epoch = p.epoch, reason = %p.reason, "Kill switch engaged: paused.");
                }
                self.emit(ControlEvent::Pause { epoch: p.epoch, reason: p.reason.clone() });
            }
            Payload::ControlResume(r) => {
                self.epoch.raise(r.epoch);
                if self.gate.resume() {
                    tracing::info!(epoch = r.epoch, "Kill switch released: resumed.");
                }
                self.emit(ControlEvent::Resume { epoch: r.epoch });
            }
            other => tracing::warn!(ty = %other.message_type(), "Unexpected type on a control stream; ignored."),
        }
    }

    fn apply_state(&self, s: &KillState) {
        self.epoch.raise(s.epoch);
        if s.engaged {
            if self.gate.pause() {
                tracing::warn!(
                    epoch = s.epoch,
                    reason = s.reason.as_deref().unwrap_or(""),
                    "Kill switch is engaged: paused."
                );
                self.emit(ControlEvent::Pause { epoch: s.epoch, reason: s.reason.clone().unwrap_or_default() });
            }
        } else if self.gate.resume() {
            tracing::info!(epoch = s.epoch, "Kill switch is released: resumed.");
            self.emit(ControlEvent::Resume { epoch: s.epoch });
        }
    }

    fn emit(&self, ev: ControlEvent) {
        if let Some(tx) = &self.events {
            let _ = tx.send(ev);
        }
    }
}

/// The id of the newest entry of `stream` ("0-0" when it is empty): reading after it sees
/// only what comes next. For followers without a consumer group (control listeners, the
/// workers' tool-response readers).
pub async fn last_id(c: &mut Conn, stream: &str) -> Result<String, BusError> {
    let last: redis::Value =
        redis::cmd("XREVRANGE").arg(stream).arg("+").arg("-").arg("COUNT").arg(1).query_async(c).await?;
    Ok(reply::entries("XREVRANGE", &last)?.pop().map_or_else(|| "0-0".to_owned(), |e| e.id))
}

/// One blocking `XREAD` of `stream` after `cursor`, without a group; `None` when `shutdown`
/// came first.
pub async fn read_after(
    c: &mut Conn,
    stream: &str,
    cursor: &str,
    count: usize,
    block: Duration,
    shutdown: &CancellationToken,
) -> Result<Option<Vec<reply::Entry>>, BusError> {
    let mut cmd = redis::cmd("XREAD");
    cmd.arg("COUNT").arg(count).arg("BLOCK").arg(block.as_millis() as u64).arg("STREAMS").arg(stream).arg(cursor);
    let read = cmd.query_async::<redis::Value>(c);
    tokio::select! {
        r = read => Ok(Some(reply::read_one_stream_owned(r?)?)),
        () = shutdown.cancelled() => Ok(None),
    }
}
