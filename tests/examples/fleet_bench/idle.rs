//! The idle workers: workers that are connected and alive but get no task.
//!
//! Each one is what a real worker process keeps running between tasks, made of the same
//! library code (`workers::runtime::run` puts these pieces together), in this process:
//!
//! - its own Redis pool, as its role's ACL user (the workers' 8 connections; blocking reads
//!   take dedicated connections, as in the worker);
//! - a heartbeat every `heartbeat_secs` (the workers' default, 5 s): a signed `heartbeat`
//!   envelope on `fleet:heartbeats` through the bus's [`bus::Publisher`], which the
//!   orchestrator verifies, checks against the replay guard and acknowledges;
//! - the kill switch's [`bus::ControlListener`] on `fleet:control:<role>` (`XREAD BLOCK`, and
//!   the state record re-read every 5 s);
//! - the tool proxy's response reader, [`workers::tools::ToolClient`], on its own
//!   `fleet:tool:responses:<role>:<instance>` (`XREAD BLOCK`);
//! - a [`bus::Consumer`] with the task consumer's settings (one entry at a time, `XREADGROUP
//!   BLOCK` 1 s, its reclaim and maintenance cycle) in group `<role>`.
//!
//! The one difference is the stream that consumer reads. On `fleet:tasks:<role>` an idle
//! consumer is not idle: Redis hands a new entry to whichever consumer of the group has been
//! blocked longest, so 200 extra consumers would take the benchmark's tasks, and a handler
//! that refused them would only delay each by the reclaim time. So each idle consumer reads a
//! per-instance stream, `fleet:tool:responses:<role>:<instance>-tasks`, that the role's ACL
//! user may read and nothing ever writes: the same blocked client, re-issued every second,
//! on a stream of the same kind, with the group the worker would have. What this leaves
//! out: the task streams' groups do not list these 200 consumers (the orchestrator's
//! consumer pruning and `XINFO CONSUMERS` read fewer rows), and they start no sandbox sweep
//! and serve no metrics endpoint.
//!
//! Why in-process and not 200 more worker processes: on a 2-core machine 200 processes
//! would each hold a Tokio runtime and ~50 MB, and as real workers of the role they would
//! compete for the tasks (see above). Their CPU is charged to this process
//! (`fleet_bench`) in the run's CPU table.

use std::sync::Arc;
use std::time::Duration;

use bus::{
    ConsumerConfig, ControlListener, Delivery, Gate, Handler, HandlerError, KillEpoch, Publisher, PublisherConfig,
};
use envelope::{
    Envelope, Heartbeat, Instance, Keyset, LiveKeyring, Payload, PermissionTable, Role, Sender, StreamName,
};
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

/// The workers' default `heartbeat_secs`.
pub(crate) const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);

/// The workers' default `consumer.block_ms`.
const BLOCK: Duration = Duration::from_millis(1000);

/// How long a tool request may wait (the workers' default `tool_timeout_secs`); never
/// reached, nothing is requested.
const TOOL_TIMEOUT: Duration = Duration::from_secs(300);

/// A running swarm; [`Swarm::stop`] ends it.
pub(crate) struct Swarm {
    shutdown: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
    /// The consumers' counters: any delivery at all would mean the swarm was not idle.
    stats: Vec<Arc<bus::ConsumerStats>>,
}

/// One role's identity for the swarm: its Redis URL, keyset file and the permission table.
pub(crate) struct RoleAccess {
    pub(crate) role: Role,
    pub(crate) redis_url: String,
    pub(crate) keyset: std::path::PathBuf,
    pub(crate) permissions: std::path::PathBuf,
}

/// A handler for a stream nothing writes to. Acknowledging keeps a stray entry from
/// looping; [`Swarm::stop`] reports any.
#[derive(Clone)]
struct Idle;

impl Handler for Idle {
    async fn handle(&self, _delivery: Delivery) -> Result<(), HandlerError> {
        Ok(())
    }
}

impl Swarm {
    /// Starts `count` idle workers, spread evenly over `roles`, named `idle-<role>-<n>`,
    /// their heartbeats staggered over one period as independently started processes' are.
    pub(crate) async fn start(count: usize, roles: &[RoleAccess]) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let shutdown = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        let mut stats = Vec::new();
        for n in 0..count {
            let access = &roles[n % roles.len()];
            let role = access.role;
            let instance = Instance::parse(&format!("idle-{role}-{n}")).context("an idle worker's instance name")?;
            let keyset = std::fs::read_to_string(&access.keyset)
                .with_context(|| format!("Failed to read {}", access.keyset.display()))?;
            let keyset = Keyset::parse(&keyset).context("Failed to parse the role's keyset")?;
            let permissions = std::fs::read_to_string(&access.permissions)
                .with_context(|| format!("Failed to read {}", access.permissions.display()))?;
            let permissions = PermissionTable::parse(&permissions).context("Failed to parse the permission table")?;
            let pool = bus::pool(SecretString::from(access.redis_url.clone()), 8, BLOCK.max(Duration::from_secs(1)))
                .context("Failed to set up an idle worker's Redis pool")?;
            let live = LiveKeyring::new(keyset.into_keyring());
            let verifier = Arc::new(envelope::Verifier::new(&live, permissions, envelope::VerifierConfig::default()));
            let publisher = Arc::new(Publisher::new(pool.clone(), live, PublisherConfig::default()));
            let epoch = KillEpoch::new(0);
            let gate = Gate::new(false);
            let from = Sender { role, instance: instance.clone() };

            let listener = ControlListener::new(pool.clone(), verifier.clone(), role, epoch.clone(), gate.clone());
            tasks.spawn(listener.run(shutdown.clone()));
            // Kept alive by its reader task until shutdown; the client itself is not needed.
            let _tools = workers::tools::ToolClient::start(
                pool.clone(),
                publisher.clone(),
                verifier.clone(),
                from.clone(),
                epoch.clone(),
                TOOL_TIMEOUT,
                shutdown.clone(),
            )
            .await
            .context("Failed to start an idle worker's tool response reader")?;
            let stagger = HEARTBEAT_EVERY.mul_f64(n as f64 / count as f64);
            tasks.spawn(heartbeats(publisher, from, epoch.clone(), stagger, shutdown.clone()));

            let quiet = Instance::parse(&format!("{instance}-tasks")).context("an idle stream's name")?;
            let mut cfg =
                ConsumerConfig::new(StreamName::tool_responses(role, &quiet), role.as_str(), instance.as_str());
            // The task consumer's settings (workers::runtime::run).
            cfg.batch = 1;
            cfg.block = BLOCK;
            cfg.remove_idle_consumers_after = None;
            let consumer = bus::Consumer::new(cfg, pool, verifier, epoch, Idle)
                .context("Invalid idle consumer settings")?
                .with_gate(gate);
            stats.push(consumer.stats());
            tasks.spawn(consumer.run(shutdown.clone()));
        }
        Ok(Self { shutdown, tasks, stats })
    }

    /// Stops every idle worker and returns how many entries their consumers handled
    /// (0 unless something wrote to their streams).
    pub(crate) async fn stop(mut self) -> u64 {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
        self.stats.iter().map(|s| s.handled.load(std::sync::atomic::Ordering::Relaxed)).sum()
    }
}

/// A worker's heartbeat loop (`workers::runtime`'s, which is private): never busy.
async fn heartbeats(
    publisher: Arc<Publisher>,
    from: Sender,
    epoch: KillEpoch,
    stagger: Duration,
    shutdown: CancellationToken,
) {
    let stream = match StreamName::parse(envelope::streams::HEARTBEATS) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("fleet_bench: the heartbeat stream's name is invalid: {e}");
            return;
        }
    };
    tokio::select! {
        () = tokio::time::sleep(stagger) => {}
        () = shutdown.cancelled() => return,
    }
    let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        seq += 1;
        let ttl = (HEARTBEAT_EVERY.as_millis() as u64).saturating_mul(3).max(10_000);
        let env = Envelope::new(
            from.clone(),
            Role::Orchestrator,
            bus::now_ms(),
            ttl,
            epoch.get(),
            Payload::Heartbeat(Heartbeat { seq, busy: false }),
        );
        if let Err(e) = publisher.publish(&stream, &env).await {
            eprintln!("fleet_bench: idle worker {}: heartbeat not sent: {e}", from.instance);
        }
    }
}
