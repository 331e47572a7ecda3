//! The worker runtime shared by the four roles: connect, follow the kill switch, send
//! heartbeats, read tool responses, and consume the role's task stream one task at a time.
//!
//! Heartbeats name the running task and its assignment; one goes out as soon as a task is
//! claimed, so the orchestrator binds the assignment (and its lease) to this instance before
//! the role's first tool call. A peer of the same role cannot use that lease afterwards.
//!
//! A task is acknowledged only after its `task.result` is in Redis: the handler publishes
//! the result and only then returns `Ok`. A result that cannot be published makes the
//! handler fail transiently, so the entry is redelivered. On `control.pause` the consumer
//! drops the running task where it stands (its entry stays pending, retried after resume)
//! and the runtime removes this instance's sandbox containers.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bus::{
    ConsumerConfig, ControlEvent, ControlListener, Delivery, Gate, Handler, HandlerError, KillEpoch, Publisher,
    PublisherConfig, now_ms,
};
use envelope::{
    Envelope, Heartbeat, Instance, Payload, Question, Role, Sender, Status, StreamName, TaskAssign, TaskResult,
    Verifier, VerifierConfig, streams,
};
use futures_util::FutureExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::WorkerConfig;
use crate::roles::{self, Outcome, TaskContext};
use crate::sandbox::{Sandbox, SandboxLabels};
use crate::tools::{CallContext, ToolClient};
use crate::workspace::{Workspace, check_workspace_path};

/// How long a `task.result` stays valid for the orchestrator (it may be down for a while).
const RESULT_TTL_MS: u64 = 6 * 3600 * 1000;

/// How long an abandoned step (its entry no longer pending) may take to wind down once
/// cancelled: sandbox runs stop at once; a tool request in flight ends at its timeout.
const ABANDON_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs a worker until `shutdown`. Returns an error only when startup fails.
pub async fn run(cfg: WorkerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let role = cfg.role;
    let instance = cfg.instance.clone();
    // Held while the process lives: the instance name's slot (see `config::default_instance`).
    let _instance_slot = cfg.instance_slot;
    tracing::info!(role = %role, instance = %instance, "Worker starting.");

    let metrics = crate::metrics::WorkerMetrics::default();
    let sandbox = Sandbox::connect(cfg.sandbox.clone())
        .await
        .context("Failed to set up the sandbox")?
        .with_metrics(metrics.sandbox.clone());
    let removed = sandbox
        .sweep(Some(instance.as_str()))
        .await
        .context("Failed to remove this instance's leftover sandbox containers")?;
    if removed > 0 {
        tracing::warn!(removed, "Removed sandbox containers left by an earlier run of this instance.");
    }
    tokio::fs::create_dir_all(&cfg.workspace_root)
        .await
        .with_context(|| format!("Failed to create workspace_root {}", cfg.workspace_root.display()))?;

    let block = Duration::from_millis(cfg.consumer.block_ms).max(Duration::from_secs(1));
    let pool = bus::pool(&cfg.redis, 8, block).context("Failed to set up the Redis pool")?;
    wait_for_redis(&pool, &shutdown).await?;
    if shutdown.is_cancelled() {
        return Ok(());
    }

    // One keyring for the verifier and the publisher, replaced when the keyset file changes
    // (docs/keys.md, Rotation).
    let live = envelope::LiveKeyring::new(cfg.keyset.into_keyring());
    let keyset_metrics = bus::keyreload::KeysetMetrics::default();
    let reloader =
        bus::KeysetReloader::new(&cfg.keyset_path, envelope::Process::Role(role), live.clone(), cfg.keyset_reload)
            .with_metrics(keyset_metrics.clone());
    let verifier = Arc::new(Verifier::new(&live, cfg.permissions, VerifierConfig::default()));
    let publisher = Arc::new(Publisher::new(pool.clone(), live, PublisherConfig::default()));
    let epoch = KillEpoch::new(0);
    let gate = Gate::new(false);

    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let listener =
        ControlListener::new(pool.clone(), verifier.clone(), role, epoch.clone(), gate.clone()).with_events(events_tx);
    let state = listener.sync().await.context("Failed to read the kill switch state")?;
    if state.engaged {
        tracing::warn!(epoch = state.epoch, "The kill switch is engaged: starting paused.");
    }

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(listener.run(shutdown.clone()));
    tasks.spawn(reloader.run(shutdown.clone()));
    {
        let sandbox = sandbox.clone();
        let instance = instance.clone();
        tasks.spawn(async move {
            while let Some(ev) = events.recv().await {
                if let ControlEvent::Pause { epoch, reason } = ev {
                    tracing::warn!(epoch, reason = %reason, "Paused by the kill switch; killing this instance's sandboxes.");
                    if let Err(e) = sandbox.sweep(Some(instance.as_str())).await {
                        tracing::error!(error = %e, "Failed to remove sandbox containers after a pause.");
                    }
                }
            }
        });
    }

    let tools = ToolClient::start(
        pool.clone(),
        publisher.clone(),
        verifier.clone(),
        Sender { role, instance: instance.clone() },
        epoch.clone(),
        cfg.tool_timeout,
        shutdown.clone(),
    )
    .await
    .context("Failed to start the tool response reader")?;

    let busy = Busy::default();
    tasks.spawn(heartbeats(
        publisher.clone(),
        Sender { role, instance: instance.clone() },
        epoch.clone(),
        busy.clone(),
        cfg.heartbeat_every,
        shutdown.clone(),
    ));

    let mut consumer_cfg = ConsumerConfig::new(StreamName::tasks(role), role.as_str(), instance.as_str());
    consumer_cfg.batch = 1; // one task at a time per process; scale with processes
    consumer_cfg.block = Duration::from_millis(cfg.consumer.block_ms);
    consumer_cfg.claim_idle = Duration::from_secs(cfg.consumer.claim_idle_secs);
    consumer_cfg.retry_max = Duration::from_secs(cfg.consumer.retry_max_secs);
    consumer_cfg.max_deliveries = cfg.consumer.max_deliveries;
    consumer_cfg.grace = cfg.grace;
    // Workers may not delete consumers (a peer's pending task would go with it); the
    // orchestrator prunes this group.
    consumer_cfg.remove_idle_consumers_after = None;
    let handler = TaskHandler {
        inner: Arc::new(HandlerInner {
            role,
            instance: instance.clone(),
            pool: pool.clone(),
            publisher,
            epoch: epoch.clone(),
            sandbox,
            tools,
            busy,
            workspace_root: cfg.workspace_root,
            git_timeout: cfg.git_timeout,
            git_output_cap: cfg.git_output_cap,
            agents: cfg.agents.clone(),
            group: role.as_str().to_owned(),
            metrics: metrics.clone(),
            keep_alive_every: consumer_cfg.claim_idle / 4,
            shutdown: shutdown.clone(),
        }),
    };
    let stream = consumer_cfg.stream.to_string();
    let group = consumer_cfg.group.clone();
    let consumer = bus::Consumer::new(consumer_cfg, pool.clone(), verifier, epoch.clone(), handler)
        .context("Invalid consumer settings")?
        .with_gate(gate.clone());
    let bus_metrics = bus::metrics::BusMetrics::new();
    bus_metrics.watch(&stream, &group, consumer.stats());
    let mut registry = crate::metrics::registry(&metrics, &bus_metrics, epoch, gate);
    keyset_metrics.register(&mut registry);
    let refresh = telemetry::metrics::refresh(move || {
        let (pool, bus_metrics) = (pool.clone(), bus_metrics.clone());
        async move {
            match pool.get().await {
                Ok(mut c) => bus_metrics.refresh(&mut c).await,
                Err(e) => tracing::warn!(error = %e, "Metrics cannot reach Redis."),
            }
        }
    });
    telemetry::metrics::serve(&cfg.metrics, registry, Some(refresh), shutdown.clone()).await?;
    tracing::info!(role = %role, instance = %instance, stream = %StreamName::tasks(role), "Worker ready.");
    consumer.run(shutdown.clone()).await;
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    tracing::info!("Worker stopped.");
    Ok(())
}

/// Waits until Redis answers `PING`, retrying with backoff, so a worker started before
/// Redis comes up when it does.
async fn wait_for_redis(pool: &bus::RedisPool, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let mut delays = bus::backoff(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let attempt = async {
            let mut c = pool.get().await.map_err(|e| e.to_string())?;
            redis::cmd("PING").query_async::<String>(&mut c).await.map_err(|e| e.to_string())
        };
        match attempt.await {
            Ok(_) => return Ok(()),
            Err(e) => {
                let delay = delays.next().unwrap_or(Duration::from_secs(5));
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "Cannot reach Redis (check redis_url / FLEET_REDIS_URL and the ACL user); retrying.");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => return Ok(()),
                }
            }
        }
    }
}

/// The step this process is working on (task and assignment envelope ids), for heartbeats.
/// Setting it wakes the heartbeat loop, so the orchestrator hears at once that this instance
/// holds the assignment (the first heartbeat naming it binds it here).
#[derive(Debug, Clone, Default)]
struct Busy(Arc<(Mutex<Option<Step>>, tokio::sync::Notify)>);

/// A task's assignment: the task and the `task.assign` envelope's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Step {
    task: Uuid,
    assignment: Uuid,
}

impl Busy {
    fn get(&self) -> Option<Step> {
        self.0.0.lock().map(|g| *g).unwrap_or(None)
    }
    fn set(&self, step: Option<Step>) {
        if let Ok(mut g) = self.0.0.lock() {
            *g = step;
        }
        if step.is_some() {
            self.0.1.notify_one();
        }
    }
    /// Until [`Busy::set`] names a step (at once if one was named since the last wait).
    async fn claimed(&self) {
        self.0.1.notified().await;
    }
}

/// Clears [`Busy`] when the task ends, also when its future is dropped (kill switch).
struct BusyGuard(Busy);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.set(None);
    }
}

async fn heartbeats(
    publisher: Arc<Publisher>,
    from: Sender,
    epoch: KillEpoch,
    busy: Busy,
    every: Duration,
    shutdown: CancellationToken,
) {
    let stream = StreamName::parse(streams::HEARTBEATS).expect("fleet stream names are valid");
    let mut seq = 0u64;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = busy.claimed() => {}
            () = shutdown.cancelled() => return,
        }
        seq += 1;
        let step = busy.get();
        let ttl = (every.as_millis() as u64).saturating_mul(3).max(10_000);
        let mut env = Envelope::new(
            from.clone(),
            Role::Orchestrator,
            now_ms(),
            ttl,
            epoch.get(),
            Payload::Heartbeat(Heartbeat { seq, busy: step.is_some() }),
        );
        // Naming the assignment: the orchestrator extends only the deadline of the step
        // this instance holds.
        env.task_id = step.map(|s| s.task);
        env.causation_id = step.map(|s| s.assignment);
        if let Err(e) = publisher.publish(&stream, &env).await {
            tracing::warn!(error = %e, seq, "Heartbeat not sent.");
        }
    }
}

/// Handles one `task.assign`.
#[derive(Clone)]
struct TaskHandler {
    inner: Arc<HandlerInner>,
}

struct HandlerInner {
    role: Role,
    instance: Instance,
    pool: bus::RedisPool,
    publisher: Arc<Publisher>,
    epoch: KillEpoch,
    sandbox: Sandbox,
    tools: ToolClient,
    busy: Busy,
    workspace_root: std::path::PathBuf,
    git_timeout: Duration,
    git_output_cap: usize,
    agents: Arc<crate::agent::policy::AgentsFile>,
    group: String,
    /// Results and tool calls are counted here.
    metrics: crate::metrics::WorkerMetrics,
    keep_alive_every: Duration,
    shutdown: CancellationToken,
}

impl Handler for TaskHandler {
    fn handle(&self, d: Delivery) -> impl Future<Output = Result<(), HandlerError>> + Send {
        let inner = Arc::clone(&self.inner);
        async move { inner.handle(d).await }
    }
}

impl HandlerInner {
    /// One step of a task, in its span (a child of the delivery's, so of the assignment's).
    async fn handle(&self, d: Delivery) -> Result<(), HandlerError> {
        let (task, attempt) = match (&d.envelope.task_id, &d.envelope.payload) {
            (Some(t), Payload::TaskAssign(a)) => (t.to_string(), a.attempt),
            _ => (String::new(), 0),
        };
        let span = tracing::info_span!(
            "worker.step",
            task_id = %task,
            role = self.role.as_str(),
            instance = %self.instance,
            step = self.role.as_str(),
            attempt,
            deliveries = d.deliveries,
        );
        tracing::Instrument::instrument(self.handle_step(d), span).await
    }

    async fn handle_step(&self, d: Delivery) -> Result<(), HandlerError> {
        let env = d.envelope.into_inner();
        let Payload::TaskAssign(assign) = env.payload.clone() else {
            return Err(HandlerError::Permanent(format!("a {} on the task stream", env.message_type())));
        };
        let Some(task_id) = env.task_id else {
            return Err(HandlerError::Permanent("task.assign without a task_id".into()));
        };
        // Wakes the heartbeat loop: its heartbeat naming this assignment binds it here
        // before the role's first tool call.
        self.busy.set(Some(Step { task: task_id, assignment: env.id }));
        let _busy = BusyGuard(self.busy.clone());
        tracing::info!(task = %task_id, attempt = assign.attempt, deliveries = d.deliveries, "Task received.");

        let cancel = self.shutdown.child_token();
        let work = AssertUnwindSafe(self.work(&env, task_id, &assign, &cancel)).catch_unwind();
        let mut work = std::pin::pin!(work);
        let keep_alive = self.keep_alive(&d.stream, &d.entry_id);
        let outcome = tokio::select! {
            o = &mut work => match o {
                Ok(o) => o,
                Err(panic) => {
                    let what = panic.downcast_ref::<&str>().map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into());
                    tracing::error!(task = %task_id, panic = %what, "The role panicked; reporting an error result.");
                    Outcome::error(format!("internal error in the {} worker: {what}", self.role))
                }
            },
            () = keep_alive => {
                // The entry left the pending list: acknowledged elsewhere, or deleted (Redis
                // lost its data and the orchestrator issued the step again, with a new
                // lease). Whatever this step would still do, nobody would take its result;
                // going on would only keep this worker from the steps that are live. The
                // step is cancelled and given time to wind down (its sandbox stopped, the
                // credential files it set aside put back) before it is dropped.
                cancel.cancel();
                tracing::warn!(task = %task_id, entry = %d.entry_id, "Abandoning the step: its entry is no longer pending (the step was issued again or settled elsewhere).");
                if tokio::time::timeout(ABANDON_GRACE, &mut work).await.is_err() {
                    tracing::error!(task = %task_id, grace_secs = ABANDON_GRACE.as_secs(), "The abandoned step did not wind down in time; dropped.");
                }
                return Ok(());
            }
        };
        if self.shutdown.is_cancelled() {
            // Cut short by shutdown: no result; the entry stays pending and is redone.
            return Err(HandlerError::Transient("shutting down before the task finished".into()));
        }
        let refused = outcome.refused_assignment.clone();
        self.publish_result(&env, task_id, assign.attempt, outcome).await?;
        if let Some(reason) = refused {
            return Err(HandlerError::Permanent(reason));
        }
        Ok(())
    }

    /// Waits for the task workspace's lock (`flock` on a file in the git store), racing
    /// `cancel`; the task's entry is kept fresh meanwhile by the caller's keep-alive, so
    /// waiting spends no delivery. `None` when the lock file cannot be used (logged; the
    /// step runs as it did before locks existed) or on cancellation.
    async fn lock_workspace(
        &self,
        rel: &std::path::Path,
        task_id: Uuid,
        cancel: &CancellationToken,
    ) -> Option<std::fs::File> {
        let dir = self.workspace_root.join(crate::workspace::GIT_STORE).join("locks");
        let path = dir.join(format!("{}.lock", rel.to_string_lossy().replace('/', "__")));
        let opened = std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path));
        let file = match opened {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(lock = %path.display(), error = %e, "Cannot open the workspace lock.");
                return None;
            }
        };
        let mut said = false;
        loop {
            match file.try_lock() {
                Ok(()) => return Some(file),
                Err(std::fs::TryLockError::WouldBlock) => {
                    if !said {
                        tracing::warn!(task = %task_id, lock = %path.display(), "Another process holds this task's workspace; waiting for it.");
                        said = true;
                    }
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    tracing::warn!(lock = %path.display(), error = %e, "Cannot take the workspace lock.");
                    return None;
                }
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
                () = cancel.cancelled() => return None,
            }
        }
    }

    async fn work(&self, env: &Envelope, task_id: Uuid, assign: &TaskAssign, cancel: &CancellationToken) -> Outcome {
        let rel = match check_workspace_path(&self.workspace_root, &assign.workspace) {
            Ok(rel) => rel,
            Err(e) => {
                tracing::warn!(task = %task_id, error = %e, "Assignment refused.");
                let mut o = Outcome::error(format!("refused: {e}"));
                o.refused_assignment = Some(e.to_string());
                return o;
            }
        };
        // One process at a time per workspace: a live worker whose entry was taken over
        // (it looked dead to Redis for a while) must not share the tree with its successor,
        // whose sandbox runs could swap links under its file operations.
        let _workspace_lock = self.lock_workspace(&rel, task_id, cancel).await;
        if cancel.is_cancelled() {
            return Outcome::error("shutting down");
        }
        // A container of this task may still be running (a dead worker's, under another
        // instance name, or one whose removal timed out): stop it before git touches the tree.
        if let Err(e) = self.sandbox.quiesce_task(&task_id.to_string()).await {
            return Outcome::error(format!("cannot stop this task's earlier sandbox containers: {e}"));
        }
        if self.sandbox.uses_runner() && rel.components().count() != 1 {
            let e = format!(
                "workspace {} is not directly under workspace_root, which the sandbox runner needs",
                assign.workspace
            );
            tracing::warn!(task = %task_id, error = %e, "Assignment refused.");
            let mut o = Outcome::error(format!("refused: {e}"));
            o.refused_assignment = Some(e);
            return o;
        }
        if let Err(e) = self.sandbox.prepare_workspace(&self.workspace_root.join(&rel)).await {
            return Outcome::error(format!("cannot prepare the workspace: {e}"));
        }
        let ws = match Workspace::prepare(&self.workspace_root, &rel, assign.repository.as_deref(), self.git_timeout)
            .await
        {
            Ok(ws) => ws.with_output_cap(self.git_output_cap),
            Err(e) => return Outcome::error(format!("cannot prepare the workspace: {e}")),
        };
        let ctx = TaskContext {
            task_id,
            assign: assign.clone(),
            workspace: ws,
            sandbox: self.sandbox.clone(),
            tools: self.tools.clone(),
            call: CallContext { task_id, assignment_id: env.id, lease: env.lease.clone() },
            labels: SandboxLabels {
                task: task_id.to_string(),
                role: self.role.as_str().to_owned(),
                instance: self.instance.as_str().to_owned(),
            },
            cancel: cancel.clone(),
            agents: self.agents.clone(),
        };
        // Boxed: the roles' futures (agent loop, tool calls, sandbox runs, each in a span) nest
        // deep enough to overflow the compiler's layout query limit in the binaries.
        Box::pin(roles::run(self.role, &ctx)).await
    }

    /// Keeps the entry of the running task fresh in Redis's pending list (`XCLAIM … JUSTID`
    /// by its own consumer, which leaves the delivery counter alone), so live workers never
    /// lose a long task to `XAUTOCLAIM`. Returns once the entry is no longer pending.
    async fn keep_alive(&self, stream: &str, entry: &str) {
        let mut tick = tokio::time::interval(self.keep_alive_every);
        tick.tick().await;
        loop {
            tick.tick().await;
            let result = async {
                let mut c = self.pool.get().await.map_err(|e| e.to_string())?;
                redis::cmd("XCLAIM")
                    .arg(stream)
                    .arg(&self.group)
                    .arg(self.instance.as_str())
                    .arg(0)
                    .arg(entry)
                    .arg("JUSTID")
                    .query_async::<Vec<String>>(&mut c)
                    .await
                    // The group itself is gone (Redis lost its data): so is the entry.
                    .or_else(|e| if e.code() == Some("NOGROUP") { Ok(Vec::new()) } else { Err(e.to_string()) })
            };
            match result.await {
                Ok(ids) if ids.is_empty() => {
                    tracing::warn!(entry, "The running task's entry is no longer pending (acknowledged or deleted).");
                    return;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(entry, error = %e, "Cannot refresh the running task's entry."),
            }
        }
    }

    async fn publish_result(
        &self,
        assign_env: &Envelope,
        task_id: Uuid,
        attempt: u32,
        o: Outcome,
    ) -> Result<(), HandlerError> {
        let status = o.status;
        if let Some(text) = &o.question {
            // Before the result: an operator reading the task's history sees the question
            // next to the failed attempt that raised it.
            let mut q = Envelope::new(
                Sender { role: self.role, instance: self.instance.clone() },
                Role::Orchestrator,
                now_ms(),
                RESULT_TTL_MS,
                self.epoch.get(),
                Payload::Question(Question { text: text.chars().take(4000).collect() }),
            );
            q.task_id = Some(task_id);
            q.causation_id = Some(assign_env.id);
            let stream = StreamName::parse(streams::QUESTIONS).expect("fleet stream names are valid");
            if let Err(e) = self.publisher.publish(&stream, &q).await {
                tracing::warn!(task = %task_id, error = %e, "Cannot publish the question; the task will be redelivered.");
                return Err(HandlerError::Transient(format!("cannot publish the question: {e}")));
            }
            tracing::info!(task = %task_id, "Asked a human.");
        }
        let result = TaskResult {
            attempt,
            status: o.status,
            summary: o.summary,
            findings: o.findings,
            diff: o.diff,
            log: o.log,
            change_sha256: judged_change(assign_env),
            calls: o.calls,
            containment: self.sandbox.take_containment(&task_id.to_string()),
        };
        let mut env = Envelope::new(
            Sender { role: self.role, instance: self.instance.clone() },
            Role::Orchestrator,
            now_ms(),
            RESULT_TTL_MS,
            self.epoch.get(),
            Payload::TaskResult(result),
        );
        env.task_id = Some(task_id);
        env.causation_id = Some(assign_env.id);
        // The step's span when tracing is on; else what the assignment carried.
        env.traceparent = telemetry::propagate::current().or_else(|| assign_env.traceparent.clone());
        let stream = StreamName::parse(streams::RESULTS).expect("fleet stream names are valid");
        match self.publisher.publish(&stream, &env).await {
            Ok(_) => {
                if let Payload::TaskResult(r) = &env.payload {
                    self.metrics.result(self.role.as_str(), status, &r.calls);
                }
                let level_ok = status == Status::Success;
                if level_ok {
                    tracing::info!(task = %task_id, attempt, status = ?status, "Result sent.");
                } else {
                    tracing::warn!(task = %task_id, attempt, status = ?status, "Result sent.");
                }
                Ok(())
            }
            Err(e) => {
                tracing::warn!(task = %task_id, error = %e, "Cannot publish the result; the task will be redelivered.");
                Err(HandlerError::Transient(format!("cannot publish the result: {e}")))
            }
        }
    }
}

/// The change a step judged: the assignment's change, named by its SHA-256 (computed from
/// the bytes, never copied from the claim, so a result can only vouch for what was read).
fn judged_change(assign_env: &Envelope) -> Option<String> {
    match &assign_env.payload {
        Payload::TaskAssign(a) => a.change.as_deref().map(|c| changeset::ChangeId::of(c).to_string()),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use envelope::{
        Keyring, MasterFile, MasterSecret, MemoryReplayGuard, PermissionTable, Process, VerifyContext, streams,
    };

    use super::*;

    const PERMISSIONS: &str = include_str!("../../config/permissions.toml");

    fn ring(role: Role) -> Keyring {
        let master = MasterFile::new(MasterSecret::from_bytes([4; 32]));
        Keyring::derive(&master, Process::Role(role), &PermissionTable::parse(PERMISSIONS).unwrap()).unwrap()
    }

    /// The heartbeats on `fleet:heartbeats` so far, verified as the orchestrator would.
    async fn sent(pool: &bus::RedisPool) -> Vec<Envelope> {
        let verifier =
            Verifier::new(ring(Role::Orchestrator), PermissionTable::parse(PERMISSIONS).unwrap(), Default::default());
        let mut c = pool.get().await.unwrap();
        let reply: redis::Value =
            redis::cmd("XRANGE").arg(streams::HEARTBEATS).arg("-").arg("+").query_async(&mut c).await.unwrap();
        bus::reply::entries("XRANGE", &reply)
            .unwrap()
            .into_iter()
            .map(|e| {
                let ctx = VerifyContext { now_ms: now_ms(), kill_epoch: 0 };
                let wire = e.field(bus::names::ENV_FIELD).unwrap();
                verifier.verify(streams::HEARTBEATS, wire, ctx, &mut MemoryReplayGuard::new()).unwrap().into_inner()
            })
            .collect()
    }

    /// Issue 10, item 3: the orchestrator binds an assignment to the first instance that
    /// names it, so a worker names its assignment in a heartbeat the moment it claims it,
    /// not a heartbeat period later (after its peers could have used the lease).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn claiming_a_task_sends_a_heartbeat_naming_its_assignment_at_once() {
        let redis = fleet_testkit::RedisServer::start().expect("redis-server must be installed; tests never skip");
        let pool = bus::pool(&secrecy::SecretString::from(redis.url()), 4, Duration::from_secs(1)).unwrap();
        let publisher = Arc::new(Publisher::new(pool.clone(), Arc::new(ring(Role::Dev)), PublisherConfig::default()));
        let from = Sender { role: Role::Dev, instance: Instance::parse("dev-1").unwrap() };
        let busy = Busy::default();
        let stop = CancellationToken::new();
        // An hour between periodic heartbeats: any heartbeat after the first is the claim's.
        let every = Duration::from_secs(3600);
        let beats = tokio::spawn(heartbeats(publisher, from, KillEpoch::new(0), busy.clone(), every, stop.clone()));

        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while sent(&pool).await.is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "no heartbeat at start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let idle = sent(&pool).await;
        assert_eq!((idle.len(), idle[0].task_id, idle[0].causation_id), (1, None, None));

        let step = Step { task: Uuid::now_v7(), assignment: Uuid::now_v7() };
        let claimed_at = tokio::time::Instant::now();
        busy.set(Some(step));
        let beat = loop {
            if let Some(b) = sent(&pool).await.get(1).cloned() {
                break b;
            }
            assert!(tokio::time::Instant::now() < deadline, "no heartbeat after the claim");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(claimed_at.elapsed() < Duration::from_secs(5));
        assert_eq!((beat.task_id, beat.causation_id), (Some(step.task), Some(step.assignment)));
        assert!(matches!(beat.payload, Payload::Heartbeat(Heartbeat { seq: 2, busy: true })));
        stop.cancel();
        beats.await.unwrap();
    }
}
