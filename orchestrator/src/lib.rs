//! The orchestrator: the only process that changes task state.
//!
//! Every transition is one Postgres transaction that updates the task, appends a
//! `task_events` row and an audit row, and inserts the outgoing signed envelopes into the
//! outbox; the `outbox-relay` forwards them. The orchestrator never `XADD`s itself.
//!
//! # Layout
//! - [`app`]: the binary's configuration file and wiring (consumers, tick loop, HTTP API).
//! - [`db`]: connecting, migrations, monthly audit partitions.
//! - [`state`]: the task states and the legal transitions of the XP cycle.
//! - [`audit`]: appending to and verifying the hash-chained audit trail.
//! - [`service`]: bus handlers (results, heartbeats, questions) and the tick loop.
//! - [`outbox`]: inserting sealed envelopes in the caller's transaction.
//! - [`providers`]: the models behind the tool proxy's `llm.complete`: OpenAI-compatible, Anthropic, scripted.
//! - [`tasks`]: the [`tasks::Engine`]: submit, apply results, heartbeats, deadlines, approvals, kill and resume.
//! - [`api`]: the operators' HTTP API (axum) over the engine: bearer tokens with roles, per-client
//!   intake rate limit, health, readiness and metrics.

pub mod api;
pub mod app;
pub mod audit;
pub mod db;
pub mod outbox;
pub mod providers;
pub mod service;
pub mod state;
pub mod tasks;
