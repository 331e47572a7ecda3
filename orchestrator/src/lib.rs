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
//! - [`anchor`]: the trail's head signed (Ed25519) and appended to a sink outside Postgres; checking it.
//! - [`control`]: the kill switch's pauses from the budget manager: halt the fleet, raise the kill epoch.
//! - [`service`]: bus handlers (results, heartbeats, questions) and the tick loop.
//! - [`outbox`]: inserting sealed envelopes in the caller's transaction.
//! - [`providers`]: the models behind the tool proxy's `llm.complete`: OpenAI-compatible, Anthropic, scripted.
//! - [`refusals`]: the per-sender rate limit on audited refusals (junk cannot grow the audit trail).
//! - [`risk`]: the risk matrix (`config/risk_matrix.toml`): action levels, their rules, role grants.
//! - [`sentinel`]: noticing that Redis lost its data, and re-issuing every open step at once.
//! - [`lease`]: capability leases (JWT) minted per assignment and checked on every tool request.
//! - [`proxy`]: the tool proxy (`llm.complete` metered by the budget ledger) and the push of approved tasks.
//! - [`gitops`]: `git.push_branch`: apply the approved diff to a fresh clone, push `agentfleet/task-<id>`.
//! - [`repos`]: where a task's repository may come from (`[repositories]`), checked at intake.
//! - [`tasks`]: the [`tasks::Engine`]: submit, apply results, heartbeats, deadlines, approvals, kill and resume;
//!   each assignment bound to the one worker instance that uses it first (`tasks/binding.rs`); operators'
//!   answers to workers' questions, cancel and retry (`tasks/drive.rs`).
//! - [`api`]: the operators' HTTP API (axum) over the engine: bearer tokens with roles, per-client
//!   intake rate limit, health, readiness and metrics; its OpenAPI document (`api/openapi.rs`).

pub mod anchor;
pub mod api;
pub mod app;
pub mod audit;
pub mod control;
pub mod db;
pub mod gitops;
pub mod lease;
pub mod outbox;
pub mod providers;
pub mod proxy;
pub mod refusals;
pub mod repos;
pub mod risk;
pub mod sentinel;
pub mod service;
pub mod state;
pub mod tasks;
