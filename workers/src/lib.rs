//! agentfleet's workers: one runtime shared by the Dev, QA, Review and Refactor binaries.

pub mod sandbox;
