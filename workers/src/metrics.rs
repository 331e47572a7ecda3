//! A worker's own Prometheus series, besides the bus's (`bus::metrics`):
//!
//! - `fleet_worker_steps_total{role, status}`: results published (success, failure, error);
//! - `fleet_agent_tool_calls_total{role, tool, verdict}`: the agents' tool calls as their
//!   results report them (ok, refused, failed);
//! - `fleet_sandbox_runs_total{role, outcome}` and `fleet_sandbox_run_duration_seconds{role}`:
//!   sandbox runs by how they ended (ok, exit_nonzero, timed_out, oom_killed, disk_limit,
//!   cancelled, error);
//! - `fleet_kill_epoch`, `fleet_halted`: the kill switch as this process follows it.

use bus::{Gate, KillEpoch};
use envelope::{CallVerdict, Status, ToolCallRecord};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::sandbox::{RunOutput, SandboxError};

type Labels2 = [(&'static str, String); 2];
type Labels3 = [(&'static str, String); 3];

fn sandbox_histogram() -> Histogram {
    // 100 ms to about 55 min, doubling: a `true` to a whole test suite.
    Histogram::new(exponential_buckets(0.1, 2.0, 16))
}

/// Sandbox runs; cheap to clone (shared families).
#[derive(Debug, Clone)]
pub struct SandboxMetrics {
    runs: Family<Labels2, Counter>,
    seconds: Family<[(&'static str, String); 1], Histogram, fn() -> Histogram>,
}

impl Default for SandboxMetrics {
    fn default() -> Self {
        Self { runs: Family::default(), seconds: Family::new_with_constructor(sandbox_histogram) }
    }
}

impl SandboxMetrics {
    /// Counts one run of `role` and, when it ran, its duration.
    pub fn observe(&self, role: &str, run: &Result<RunOutput, SandboxError>) {
        let outcome = match run {
            Err(_) => "error",
            Ok(o) if o.cancelled => "cancelled",
            Ok(o) if o.timed_out => "timed_out",
            Ok(o) if o.oom_killed => "oom_killed",
            Ok(o) if o.disk_limit_exceeded => "disk_limit",
            Ok(o) if o.exit_code == Some(0) => "ok",
            Ok(_) => "exit_nonzero",
        };
        self.runs.get_or_create(&[("role", role.to_owned()), ("outcome", outcome.to_owned())]).inc();
        if let Ok(o) = run {
            self.seconds.get_or_create(&[("role", role.to_owned())]).observe(o.duration.as_secs_f64());
        }
    }

    fn register(&self, registry: &mut Registry) {
        registry.register("fleet_sandbox_runs", "Sandbox runs, by how they ended.", self.runs.clone());
        registry.register(
            "fleet_sandbox_run_duration_seconds",
            "Seconds from creating a sandbox container to having removed it.",
            self.seconds.clone(),
        );
    }
}

/// Everything a worker exports besides the bus's series.
#[derive(Debug, Clone, Default)]
pub struct WorkerMetrics {
    steps: Family<Labels2, Counter>,
    calls: Family<Labels3, Counter>,
    /// Shared with the process's [`crate::sandbox::Sandbox`].
    pub sandbox: SandboxMetrics,
}

impl WorkerMetrics {
    /// Counts a published result and its tool calls.
    pub fn result(&self, role: &str, status: Status, calls: &[ToolCallRecord]) {
        let status = match status {
            Status::Success => "success",
            Status::Failure => "failure",
            Status::Error => "error",
        };
        self.steps.get_or_create(&[("role", role.to_owned()), ("status", status.to_owned())]).inc();
        for call in calls {
            let verdict = match call.verdict {
                CallVerdict::Ok => "ok",
                CallVerdict::Refused => "refused",
                CallVerdict::Failed => "failed",
            };
            // The tool name comes from the model; only names the loop knows become labels, so
            // a hostile model cannot grow the series without bound.
            let tool = crate::agent::tools::ToolName::parse(&call.tool).map_or("other", |t| t.as_str());
            self.calls
                .get_or_create(&[("role", role.to_owned()), ("tool", tool.to_owned()), ("verdict", verdict.to_owned())])
                .inc();
        }
    }

    /// Registers these series and the kill switch's state as `epoch` and `gate` hold it.
    pub fn register(&self, registry: &mut Registry, epoch: KillEpoch, gate: Gate) {
        registry.register("fleet_worker_steps", "Task results published, by status.", self.steps.clone());
        registry.register(
            "fleet_agent_tool_calls",
            "The agents' tool calls, by tool and by the policy's verdict.",
            self.calls.clone(),
        );
        self.sandbox.register(registry);
        registry.register_collector(Box::new(KillSwitch { epoch, gate }));
    }
}

/// `fleet_kill_epoch` and `fleet_halted`, read at each scrape.
#[derive(Debug)]
pub struct KillSwitch {
    /// The epoch this process verifies against.
    pub epoch: KillEpoch,
    /// Paused while the kill switch is engaged.
    pub gate: Gate,
}

impl Collector for KillSwitch {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = encoder.encode_descriptor(
            "fleet_kill_epoch",
            "The kill switch's epoch as this process knows it (each engagement raises it).",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(self.epoch.get() as i64).encode(m)?;
        let m = encoder.encode_descriptor(
            "fleet_halted",
            "1 while the kill switch is engaged.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::from(self.gate.is_paused())).encode(m)?;
        Ok(())
    }
}

/// A registry with every series of a worker: the build info, the bus's, and these.
pub fn registry(metrics: &WorkerMetrics, bus: &bus::metrics::BusMetrics, epoch: KillEpoch, gate: Gate) -> Registry {
    let mut registry = telemetry::metrics::registry("worker");
    bus.register(&mut registry);
    metrics.register(&mut registry, epoch, gate);
    registry
}
