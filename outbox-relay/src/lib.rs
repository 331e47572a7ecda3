//! The outbox relay: forwards rows of the orchestrator's transactional outbox to Redis
//! Streams.
//!
//! The orchestrator inserts each outgoing envelope, already signed, into the `outbox` table
//! in the same transaction as the state change it announces. The relay claims committed
//! rows, `XADD`s their frames byte for byte to the stream each row names, and marks them
//! dispatched. It holds Postgres and Redis credentials and **no signing key**: it cannot
//! forge an envelope, only deliver (or delay) the orchestrator's.
//!
//! Guarantees (argued in [`outbox`]): every committed row is published at least once; two
//! relays running at once never both publish a row (only a relay that dies between `XADD`
//! and `COMMIT` leaves rows to be published again, and consumers drop those copies by
//! envelope id); one task's envelopes reach their streams in the order the orchestrator
//! wrote them.
//!
//! # Layout
//! - [`config`]: the TOML file, `FLEET_…` overrides, defaults, validation.
//! - [`outbox`]: the SQL: claim (with the visibility horizon and per-task order), mark,
//!   prune; and the argument for why it is correct.
//! - [`relay`]: [`Relay`]: one batch at a time ([`Relay::step`]) or the whole loop with
//!   `LISTEN`, poll fallback, retries, pruning and graceful shutdown ([`Relay::run`]);
//!   [`RelayStats`].
//!
//! The binary (`main.rs`) only parses the command line, sets up logging and the shutdown
//! signal (the shared `telemetry` crate), loads [`Config`] and runs a [`Relay`].

#![forbid(unsafe_code)]

pub mod config;
pub mod outbox;
pub mod relay;

pub use config::{Config, ConfigError, RelayConfig};
pub use relay::{Relay, RelayError, RelayStats, Step};
