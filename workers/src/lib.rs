//! agentfleet's workers: one runtime shared by the Dev, QA, Review and Refactor binaries.
//!
//! A worker consumes its role's task stream (`fleet:tasks:<role>`) in its role's consumer
//! group, one task at a time, and answers each `task.assign` with a `task.result` on
//! `fleet:results`. It holds only its own keyset: model calls go through the orchestrator's
//! tool proxy (`tool.request` / `tool.response`), code runs in throwaway Docker sandboxes,
//! and the kill switch pauses it (`fleet:control:<role>`). `docs/workers.md` describes the
//! roles and the configuration.
//!
//! # Layout
//! - [`cli`]: the binaries' command line and `main`.
//! - [`config`]: the TOML configuration, checked.
//! - [`runtime`]: startup, heartbeats, kill-switch reactions, the task handler.
//! - [`tools`]: the tool-proxy client and its response reader.
//! - [`workspace`]: the task's checkout (git kept outside the mounted directory).
//! - [`roles`]: Dev, QA, Review and Refactor.
//! - [`checks`]: the seeds' static checks (injection, secrets, dangerous shell), shared by
//!   QA and Review.
//! - [`patch`]: unified diffs as text (extraction, paths, added lines, scope).
//! - [`sandbox`]: throwaway Docker containers (bollard).
//! - [`metrics`]: the worker's Prometheus series (steps, tool calls, sandbox runs, kill
//!   switch), served with the bus's at `[metrics] listen`.

#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod agent;
pub mod cli;
pub mod config;
pub mod deps;
pub mod egress;
pub mod metrics;
pub mod roles;
pub mod runner;
pub mod runtime;
pub mod sandbox;
pub mod tools;
pub mod workspace;

/// The static checks and the diff reading they share live in `changeset`, so the
/// orchestrator runs the same rules again at push.
pub use changeset::{checks, patch};
