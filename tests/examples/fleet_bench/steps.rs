//! Where each step's time went, from two sources that each hold what the other cannot:
//!
//! - **The step's window** comes from Postgres: a step is a stay in one state, from the
//!   `task_events` row of the transition into it to the row of the transition out (the
//!   orchestrator's own record, the one `fleetctl trace` shows). Those rows carry
//!   `now()`, the start of the transaction that made the transition: the step's window runs
//!   from the moment the orchestrator began to issue the step to the moment it began to
//!   apply its result. That is the time a user waits on the step.
//! - **The time in the model and in the sandbox** comes from the OpenTelemetry spans the
//!   processes export (one task is one trace): `chat <model>` spans (the orchestrator's
//!   provider call, inside its tool proxy) and `sandbox.run` spans (the worker's whole
//!   sandbox run: container create, start, wait, remove). Postgres records no durations of
//!   either. The other spans split the rest: the relay's `fleet:tasks:<role> publish` (the
//!   assignment reaching Redis), `worker.step` (the worker holding the step) and the
//!   worker's `tool.request` (each tool-proxy round trip, of which the model call is part).
//!
//! Overhead = window − model − sandbox − queued, where *queued* is the time the assignment
//! sat in Redis because every worker of the role was busy: from the relay's publish to the
//! moment the worker that took it finished its previous step. That wait is the fleet's
//! capacity, not its overhead, and is reported on its own.
//!
//! Spans and rows come from different clocks only in name: every process and Postgres run
//! on this machine and read the same system clock.

use std::collections::HashMap;

use fleet_testkit::otlp::CollectedSpan;
use uuid::Uuid;

/// The states whose steps a worker does.
pub(crate) const WORKER_STATES: [&str; 4] = ["dev", "qa", "review", "refactor"];

/// One transition of a task, as `task_events` holds it.
#[derive(Debug, Clone)]
pub(crate) struct Transition {
    /// `at`, microseconds since the Unix epoch.
    pub(crate) at_us: i64,
    /// The state entered.
    pub(crate) to: String,
}

/// The parts of a worker step's overhead, in milliseconds; each `None` when a span it
/// needs was not exported.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Parts {
    /// Transition into the state → the assignment's `XADD` done (the commit, the outbox
    /// relay's wake-up and claim, the publish).
    pub(crate) relay: Option<f64>,
    /// Assignment in Redis (or the worker free, if later) → the worker's step begins
    /// (`XREADGROUP` delivery, verification, replay guard).
    pub(crate) pickup: Option<f64>,
    /// Tool-proxy round trips minus the model calls in them (the request over Redis, the
    /// orchestrator's lease and policy checks, budget reservation and commit, audit row,
    /// the answer through the outbox and Redis).
    pub(crate) proxy: Option<f64>,
    /// The rest of the worker's step (workspace checkout, diffs, checks, the result's publish).
    pub(crate) worker: Option<f64>,
    /// The worker's step ended → the orchestrator begins applying the result (`XADD`,
    /// delivery, verification).
    pub(crate) result: Option<f64>,
}

/// One step.
#[derive(Debug, Clone)]
pub(crate) struct Step {
    /// The state (`dev`, `qa`, … or `submitted`, `approved` for the orchestrator's own).
    pub(crate) state: String,
    /// The whole stay in the state, ms.
    pub(crate) window: f64,
    /// Waiting for a free worker, ms.
    pub(crate) queued: f64,
    /// In model calls, ms.
    pub(crate) model: f64,
    /// In sandbox runs, ms.
    pub(crate) sandbox: f64,
    /// window − model − sandbox − queued, ms.
    pub(crate) overhead: f64,
    /// The overhead split (worker steps only).
    pub(crate) parts: Parts,
}

fn ms(nanos: i128) -> f64 {
    nanos as f64 / 1e6
}

/// The steps of `tasks` (id and trace id), from their transitions (time order) and every
/// span collected. Stays in states other than the worker states, `submitted` and `approved`
/// are left out, and so is the final state. Also returns how many worker steps had no
/// `worker.step` span (left out as well).
pub(crate) fn steps(
    tasks: &[(Uuid, String)],
    events: &HashMap<Uuid, Vec<Transition>>,
    spans: &[CollectedSpan],
) -> (Vec<Step>, usize) {
    let mut by_trace: HashMap<&str, Vec<&CollectedSpan>> = HashMap::new();
    // Every step of every worker instance, to tell when each one was free again.
    let mut by_instance: HashMap<&str, Vec<(u64, u64)>> = HashMap::new();
    for s in spans {
        by_trace.entry(s.trace_id.as_str()).or_default().push(s);
        if s.name == "worker.step"
            && let Some(i) = s.attributes.get("instance")
        {
            by_instance.entry(i.as_str()).or_default().push((s.start_unix_nanos, s.end_unix_nanos));
        }
    }
    let mut out = Vec::new();
    let mut missing = 0;
    for (task, trace) in tasks {
        let Some(evs) = events.get(task) else { continue };
        let trace_spans = by_trace.get(trace.as_str()).map(Vec::as_slice).unwrap_or(&[]);
        for pair in evs.windows(2) {
            let state = pair[0].to.as_str();
            let (t_in, t_out) = (i128::from(pair[0].at_us) * 1000, i128::from(pair[1].at_us) * 1000);
            let window = ms(t_out - t_in);
            if matches!(state, "submitted" | "approved") {
                out.push(Step {
                    state: state.to_owned(),
                    window,
                    queued: 0.0,
                    model: 0.0,
                    sandbox: 0.0,
                    overhead: window,
                    parts: Parts::default(),
                });
                continue;
            }
            if !WORKER_STATES.contains(&state) {
                continue;
            }
            let inside = |s: &&&CollectedSpan| {
                let start = i128::from(s.start_unix_nanos);
                start >= t_in && start <= t_out
            };
            let total = |pred: &dyn Fn(&CollectedSpan) -> bool| -> i128 {
                trace_spans
                    .iter()
                    .filter(inside)
                    .filter(|s| pred(s))
                    .map(|s| i128::from(s.end_unix_nanos) - i128::from(s.start_unix_nanos))
                    .sum()
            };
            let model = total(&|s| s.name.starts_with("chat "));
            let sandbox = total(&|s| s.name == "sandbox.run");
            let tools = total(&|s| s.name == "tool.request");
            let publish = format!("fleet:tasks:{state} publish");
            let published =
                trace_spans.iter().filter(inside).filter(|s| s.name == publish).map(|s| s.end_unix_nanos).max();
            let role_steps: Vec<&&CollectedSpan> = trace_spans
                .iter()
                .filter(inside)
                .filter(|s| s.name == "worker.step" && s.attributes.get("role").map(String::as_str) == Some(state))
                .collect();
            let Some(first) = role_steps.iter().min_by_key(|s| s.start_unix_nanos) else {
                missing += 1;
                continue;
            };
            let picked = first.start_unix_nanos;
            let done = role_steps.iter().map(|s| s.end_unix_nanos).max().unwrap_or(first.end_unix_nanos);
            // When the worker that took the step had finished its previous one.
            let free = first
                .attributes
                .get("instance")
                .and_then(|i| by_instance.get(i.as_str()))
                .and_then(|v| v.iter().map(|&(_, end)| end).filter(|&end| end <= picked).max());
            let queued = match (published, free) {
                (Some(p), Some(f)) if f > p => i128::from(f.min(picked)) - i128::from(p),
                _ => 0,
            };
            let parts = Parts {
                relay: published.map(|p| ms(i128::from(p) - t_in)),
                pickup: published.map(|p| ms(i128::from(picked) - i128::from(p) - queued)),
                proxy: Some(ms(tools - model)),
                worker: Some(ms(i128::from(done) - i128::from(picked) - tools - sandbox)),
                result: Some(ms(t_out - i128::from(done))),
            };
            out.push(Step {
                state: state.to_owned(),
                window,
                queued: ms(queued),
                model: ms(model),
                sandbox: ms(sandbox),
                overhead: ms(t_out - t_in - model - sandbox - queued),
                parts,
            });
        }
    }
    (out, missing)
}

/// The `p`-th percentile (0–100) of `values` by nearest rank; `None` for none.
pub(crate) fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v.get(rank.min(v.len()) - 1).copied()
}
