//! The ledger's limits and price table: [`LedgerConfig`], read from TOML.
//!
//! ```toml
//! daily_tokens = 500_000
//! daily_micro_usd = 10_000_000          # $10.00
//! per_task_tokens = 100_000
//! per_task_micro_usd = 2_000_000        # $2.00
//! reservation_ttl_secs = 600
//!
//! [per_role.dev]
//! soft_tokens = 300_000
//! soft_micro_usd = 6_000_000
//! cheaper_model = "small-model"
//!
//! [prices.big-model]
//! input_micro_usd_per_mtok = 3_000_000  # $3 per million input tokens
//! output_micro_usd_per_mtok = 15_000_000
//!
//! [prices.small-model]
//! input_micro_usd_per_mtok = 250_000
//! output_micro_usd_per_mtok = 1_250_000
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use envelope::Role;
use serde::{Deserialize, Deserializer, Serialize};

/// Largest amount (tokens or micro-dollars) the ledger accepts anywhere: 10^15, i.e.
/// a billion dollars. The Lua scripts do their arithmetic in doubles, which are exact
/// only up to 2^53 ≈ 9·10^15; this cap keeps every sum of a few amounts below that.
pub const MAX_AMOUNT: u64 = 1_000_000_000_000_000;

/// Longest reservation lifetime accepted: a model call that needs longer is broken.
pub const MAX_RESERVATION_TTL: Duration = Duration::from_secs(24 * 3600);

/// Money in millionths of a US dollar. Never a float: sums of floats drift, and a budget
/// check that drifts is not a check.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MicroUsd(pub u64);

impl MicroUsd {
    /// Zero dollars.
    pub const ZERO: MicroUsd = MicroUsd(0);

    /// `dollars` whole dollars.
    pub const fn from_dollars(dollars: u64) -> Self {
        MicroUsd(dollars * 1_000_000)
    }

    /// The amount in micro-dollars.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for MicroUsd {
    /// `$1.234567`: exact, six decimals.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "${}.{:06}", self.0 / 1_000_000, self.0 % 1_000_000)
    }
}

/// What one model costs, per million tokens, in micro-dollars (so `3_000_000` is $3 per
/// million tokens). Integers, so that any price quoted to the micro-dollar per million
/// tokens is exact.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// Micro-dollars per million input (prompt) tokens.
    pub input_micro_usd_per_mtok: u64,
    /// Micro-dollars per million output (completion) tokens.
    pub output_micro_usd_per_mtok: u64,
}

impl Price {
    /// Highest price accepted per million tokens: $1M. Keeps `tokens × price` far from
    /// overflow and catches a price typed in the wrong unit.
    pub const MAX_PER_MTOK: u64 = 1_000_000_000_000;

    /// The cost of `input` and `output` tokens, rounded **up** to the next micro-dollar,
    /// once, on the sum (so a call never costs less than its exact price, and never more
    /// than one micro-dollar above it). `None` when it exceeds [`MAX_AMOUNT`].
    pub fn cost(&self, input: u64, output: u64) -> Option<MicroUsd> {
        let exact = u128::from(input) * u128::from(self.input_micro_usd_per_mtok)
            + u128::from(output) * u128::from(self.output_micro_usd_per_mtok);
        let micro = u64::try_from(exact.div_ceil(1_000_000)).ok()?;
        (micro <= MAX_AMOUNT).then_some(MicroUsd(micro))
    }
}

/// A role's soft limits for the day. Crossing one does not refuse the call: the ledger
/// reports it, and reserves for the role's cheaper model instead when one is configured.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleLimits {
    /// Tokens (input + output) the role may use per day before it counts as over.
    pub soft_tokens: Option<u64>,
    /// Money the role may spend per day before it counts as over.
    pub soft_micro_usd: Option<MicroUsd>,
    /// The model calls of this role are moved to once over a soft limit; it must be in the
    /// price table.
    pub cheaper_model: Option<String>,
}

/// The ledger's limits. Every limit counts committed spend **plus** reservations still
/// held, so concurrent callers cannot overspend between them. Days are UTC days.
///
/// Unknown keys are refused. Missing keys take the defaults, which are the seed's
/// guardrails: 500 000 tokens and $10.00 a day, 100 000 tokens and $2.00 per task.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerConfig {
    /// Tokens (input + output, all models) the fleet may use per UTC day.
    pub daily_tokens: u64,
    /// Money the fleet may spend per UTC day.
    pub daily_micro_usd: MicroUsd,
    /// Tokens one task may use over its whole life.
    pub per_task_tokens: u64,
    /// Money one task may spend over its whole life.
    pub per_task_micro_usd: MicroUsd,
    /// Soft per-role daily limits and the cheaper model to move to.
    pub per_role: BTreeMap<Role, RoleLimits>,
    /// Price per model name, exactly as the model proxy names the model. A model that is
    /// not here cannot be reserved for: its cost would be unknown.
    pub prices: BTreeMap<String, Price>,
    /// How long a reservation holds budget without a commit or release. It must exceed the
    /// longest model call (the model proxy's request timeout): a call still running when
    /// its reservation lapses is charged all the same, but meanwhile others could reserve
    /// the budget it held. Reservations actually last up to a quarter longer (see
    /// [`keys`](super::keys)).
    #[serde(rename = "reservation_ttl_secs", deserialize_with = "secs")]
    pub reservation_ttl: Duration,
}

fn secs<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    u64::deserialize(d).map(Duration::from_secs)
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            daily_tokens: 500_000,
            daily_micro_usd: MicroUsd::from_dollars(10),
            per_task_tokens: 100_000,
            per_task_micro_usd: MicroUsd::from_dollars(2),
            per_role: BTreeMap::new(),
            prices: BTreeMap::new(),
            reservation_ttl: Duration::from_secs(600),
        }
    }
}

/// A configuration problem; the message names the setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid budget ledger configuration: {0}")]
pub struct ConfigError(pub String);

impl LedgerConfig {
    /// Parses and checks a TOML document.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: positive limits within range, known cheaper models, a
    /// sane TTL.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError(m));
        for (name, value) in [
            ("daily_tokens", self.daily_tokens),
            ("daily_micro_usd", self.daily_micro_usd.0),
            ("per_task_tokens", self.per_task_tokens),
            ("per_task_micro_usd", self.per_task_micro_usd.0),
        ] {
            if value == 0 || value > MAX_AMOUNT {
                return bad(format!("{name} must be between 1 and {MAX_AMOUNT}, not {value}"));
            }
        }
        for (role, limits) in &self.per_role {
            for (name, value) in
                [("soft_tokens", limits.soft_tokens), ("soft_micro_usd", limits.soft_micro_usd.map(|m| m.0))]
            {
                if value.is_some_and(|v| v > MAX_AMOUNT) {
                    return bad(format!("per_role.{role}.{name} must be at most {MAX_AMOUNT}"));
                }
            }
            if let Some(model) = &limits.cheaper_model
                && !self.prices.contains_key(model)
            {
                return bad(format!("per_role.{role}.cheaper_model {model:?} has no entry in [prices]"));
            }
        }
        for (model, price) in &self.prices {
            if model.is_empty() || model.len() > 200 || model.chars().any(char::is_control) {
                return bad(format!("price table: model name {model:?} must be 1 to 200 printable characters"));
            }
            if price.input_micro_usd_per_mtok > Price::MAX_PER_MTOK
                || price.output_micro_usd_per_mtok > Price::MAX_PER_MTOK
            {
                return bad(format!(
                    "prices.{model}: a price above {} micro-dollars per million tokens is surely a unit mistake",
                    Price::MAX_PER_MTOK
                ));
            }
        }
        if self.reservation_ttl < Duration::from_secs(1) || self.reservation_ttl > MAX_RESERVATION_TTL {
            return bad(format!(
                "reservation_ttl_secs must be between 1 and {}, not {}",
                MAX_RESERVATION_TTL.as_secs(),
                self.reservation_ttl.as_secs()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_seed_guardrails() {
        let c = LedgerConfig::default();
        assert_eq!(c.daily_tokens, 500_000);
        assert_eq!(c.daily_micro_usd, MicroUsd(10_000_000));
        assert_eq!(c.per_task_tokens, 100_000);
        assert_eq!(c.per_task_micro_usd, MicroUsd(2_000_000));
        assert_eq!(LedgerConfig::from_toml(""), Ok(c));
    }

    #[test]
    fn parses_roles_and_prices() {
        let c = LedgerConfig::from_toml(
            r#"
            daily_tokens = 1_000
            reservation_ttl_secs = 30
            [per_role.dev]
            soft_tokens = 500
            cheaper_model = "small"
            [prices.big]
            input_micro_usd_per_mtok = 3_000_000
            output_micro_usd_per_mtok = 15_000_000
            [prices.small]
            input_micro_usd_per_mtok = 1
            output_micro_usd_per_mtok = 2
            "#,
        )
        .expect("valid");
        assert_eq!(c.daily_tokens, 1_000);
        assert_eq!(c.per_task_tokens, 100_000);
        assert_eq!(c.reservation_ttl, Duration::from_secs(30));
        let dev = &c.per_role[&Role::Dev];
        assert_eq!(dev.soft_tokens, Some(500));
        assert_eq!(dev.soft_micro_usd, None);
        assert_eq!(dev.cheaper_model.as_deref(), Some("small"));
        assert_eq!(c.prices["big"].output_micro_usd_per_mtok, 15_000_000);
    }

    #[test]
    fn refuses_unknown_keys_roles_and_models() {
        let err = |t: &str| LedgerConfig::from_toml(t).expect_err(t).to_string();
        assert!(err("daily_dollars = 10").contains("daily_dollars"));
        assert!(err("[per_role.planner]\nsoft_tokens = 1").contains("planner"));
        assert!(err("[per_role.dev]\nsoft_token = 1").contains("soft_token"));
        assert!(err("[per_role.dev]\ncheaper_model = \"x\"").contains("has no entry in [prices]"));
        assert!(err("[prices.x]\ninput_micro_usd_per_mtok = 1").contains("output_micro_usd_per_mtok"));
        assert!(err("daily_tokens = 0").contains("daily_tokens"));
        assert!(err("daily_micro_usd = -1").contains("daily_micro_usd"));
        assert!(err("daily_micro_usd = 10.0").contains("daily_micro_usd"));
        assert!(err("reservation_ttl_secs = 0").contains("reservation_ttl_secs"));
    }

    #[test]
    fn cost_rounds_up_once_on_the_sum() {
        let p = Price { input_micro_usd_per_mtok: 3_000_000, output_micro_usd_per_mtok: 15_000_000 };
        // 1 input token = 3 micro-dollars exactly; 1 output token = 15.
        assert_eq!(p.cost(1, 1), Some(MicroUsd(18)));
        assert_eq!(p.cost(0, 0), Some(MicroUsd(0)));
        assert_eq!(p.cost(1_000_000, 0), Some(MicroUsd::from_dollars(3)));
        // 0.25 + 0.25 = 0.5 µ$ → 1 µ$ (rounding each part first would give 2).
        let cheap = Price { input_micro_usd_per_mtok: 250_000, output_micro_usd_per_mtok: 250_000 };
        assert_eq!(cheap.cost(1, 1), Some(MicroUsd(1)));
        assert_eq!(cheap.cost(4, 0), Some(MicroUsd(1)));
        assert_eq!(cheap.cost(5, 0), Some(MicroUsd(2)));
        // Never overflows; refuses beyond MAX_AMOUNT.
        let dear =
            Price { input_micro_usd_per_mtok: Price::MAX_PER_MTOK, output_micro_usd_per_mtok: Price::MAX_PER_MTOK };
        assert_eq!(dear.cost(u64::MAX, u64::MAX), None);
        assert_eq!(dear.cost(1_000_000_000, 0), Some(MicroUsd(MAX_AMOUNT)));
        assert_eq!(dear.cost(1_000_000_001, 0), None);
    }

    #[test]
    fn micro_usd_displays_exactly() {
        assert_eq!(MicroUsd(10_000_000).to_string(), "$10.000000");
        assert_eq!(MicroUsd(1_234_567).to_string(), "$1.234567");
        assert_eq!(MicroUsd(7).to_string(), "$0.000007");
    }
}
