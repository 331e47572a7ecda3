//! agentfleet's budget: what the fleet may spend on model calls, and what it has spent.
//!
//! The model proxy (in the orchestrator) reserves every call's worst case in the
//! [`ledger`] before making it and commits the provider's actual figures after, so
//! concurrent calls can never overspend a per-task or daily limit between them. The
//! `budget` process reads the same ledger to decide when the kill switch engages.
//!
//! The `budget` binary ([`app`]) consumes the orchestrator's usage reports and step
//! outcomes, keeps counters ([`service`]) and engages the [`killswitch`] when the day is
//! spent, steps keep failing, an unknown error appears, or an operator says so.
//!
//! # Layout
//! - [`app`]: the binary's configuration file and wiring.
//! - [`killswitch`]: engaging (one Lua script writes the state record once), the pauses to
//!   every role, resuming; [`killswitch::KillSwitch`].
//! - [`service`]: the bus handlers, the counters and the triggers.
//! - [`alert`]: kill, resume, soft-limit and incident alerts over Telegram and a signed
//!   webhook, each naming the deployment, the time, who or what caused it, what it affects
//!   and the command to act ([`alert::Facts`], rendered by [`alert::render`]); persisted in
//!   a Redis stream before they are sent and retried until delivered
//!   ([`alert::AlertSender`], [`alert::AlertDispatcher`], [`alert::standard_webhooks`]).
//! - [`metrics`]: tokens, cost and calls by role and model, and the kill switch, for
//!   Prometheus (with the bus's series, at `[metrics] listen`).
//! - [`ledger`]: reservations, commits and releases in Redis Lua scripts
//!   ([`ledger::Ledger`]); limits and prices ([`ledger::LedgerConfig`]); the keys and the
//!   time buckets that make a crashed caller's reservation lapse ([`ledger::keys`]).

#![forbid(unsafe_code)]

pub mod alert;
pub mod app;
pub mod killswitch;
pub mod ledger;
pub mod metrics;
pub mod service;
