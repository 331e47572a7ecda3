//! The orchestrator: the only process that changes task state.
//!
//! Every transition is one Postgres transaction that updates the task, appends a
//! `task_events` row and an audit row, and inserts the outgoing signed envelopes into the
//! outbox; the `outbox-relay` forwards them. The orchestrator never `XADD`s itself.
//!
//! # Layout
//! - [`db`]: connecting, migrations, monthly audit partitions.
//! - [`state`]: the task states and the legal transitions of the XP cycle.
//! - [`audit`]: appending to and verifying the hash-chained audit trail.
//! - [`outbox`]: inserting sealed envelopes in the caller's transaction.
//! - [`tasks`]: the [`tasks::Engine`]: submit, apply results, heartbeats, deadlines, approvals, kill and resume.

pub mod audit;
pub mod db;
pub mod outbox;
pub mod state;
pub mod tasks;
