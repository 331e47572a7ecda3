//! The budget manager's own Prometheus series, besides the bus's (`bus::metrics`):
//!
//! - `fleet_model_tokens_total{role, model, direction}` (`input`, `output`),
//!   `fleet_model_cost_usd_total{role, model}` and `fleet_model_calls_total{role, model}`:
//!   every usage report, counted once (a redelivered report is not counted again), as the
//!   orchestrator's model proxy metered it;
//! - `fleet_kill_epoch` and `fleet_halted`: the kill switch's record, read before each scrape.

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Shared families; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct BudgetMetrics {
    tokens: Family<[(&'static str, String); 3], Counter>,
    cost: Family<[(&'static str, String); 2], Counter<f64, AtomicU64>>,
    calls: Family<[(&'static str, String); 2], Counter>,
    epoch: Gauge,
    halted: Gauge,
}

impl BudgetMetrics {
    /// Counts one usage report (call it only for the first sighting of a report).
    pub fn usage(&self, u: &envelope::Usage) {
        let (role, model) = (u.role.as_str().to_owned(), u.model.clone());
        let by =
            |direction: &str| [("role", role.clone()), ("model", model.clone()), ("direction", direction.to_owned())];
        self.tokens.get_or_create(&by("input")).inc_by(u.input_tokens);
        self.tokens.get_or_create(&by("output")).inc_by(u.output_tokens);
        let rm = [("role", role), ("model", model)];
        self.cost.get_or_create(&rm).inc_by(u.cost_micro_usd as f64 / 1e6);
        self.calls.get_or_create(&rm).inc();
    }

    /// Records the kill switch's record as last read.
    pub fn kill_switch(&self, epoch: u64, engaged: bool) {
        self.epoch.set(epoch as i64);
        self.halted.set(i64::from(engaged));
    }

    /// Adds these series to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "fleet_model_tokens",
            "Model tokens metered, by role, model and direction (input or output).",
            self.tokens.clone(),
        );
        registry.register("fleet_model_cost_usd", "Model cost metered, in US dollars.", self.cost.clone());
        registry.register("fleet_model_calls", "Model calls metered.", self.calls.clone());
        registry.register(
            "fleet_kill_epoch",
            "The kill switch's epoch (each engagement raises it).",
            self.epoch.clone(),
        );
        registry.register("fleet_halted", "1 while the kill switch is engaged.", self.halted.clone());
    }
}
