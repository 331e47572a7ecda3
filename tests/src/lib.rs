//! The integration-test harness: starts real `redis-server` and PostgreSQL processes,
//! each on a free loopback port with a directory of its own, so that every test can have
//! services nobody else touches.
//!
//! Tests run under cargo-nextest, one process per test and many at once, so nothing here
//! is shared between tests except the PostgreSQL template cluster (made once per machine
//! under a file lock, then copied). A missing server program is an error that names it
//! and says how to install it: the harness never skips a test.
//!
//! ```no_run
//! # fn main() -> Result<(), fleet_testkit::HarnessError> {
//! let redis = fleet_testkit::RedisServer::start()?;
//! let postgres = fleet_testkit::Postgres::start()?;
//! let database_url = postgres.create_database()?;
//! // Connect to `redis.url()` and `database_url`; both servers stop when dropped.
//! # Ok(()) }
//! ```
//!
//! Starting a server blocks the calling thread (tens of milliseconds for Redis, a few
//! hundred for Postgres). Tests call it before they spawn any work, which is fine even
//! inside `#[tokio::test]`.
//!
//! # Layout
//!
//! - [`RedisServer`] (`redis_server.rs`): `redis-server` with `save ""` by default,
//!   optional `appendonly`, ACL file and extra directives; `stop`, `kill` (a crash) and
//!   `restart` on the same port and data directory.
//! - [`Postgres`] (`postgres.rs`): a PostgreSQL cluster copied from the template, run as
//!   the `postgres` user when we are root; `create_database` gives each test its own
//!   uniquely named database.
//! - [`HarnessError`] (`error.rs`): what went wrong, with the tail of the server's log
//!   when the server itself failed.
//! - `binary.rs`: finding the server programs, so a missing one is reported by name.
//! - `process.rs`: spawning with output in a log file, waiting for readiness, stopping.
//! - `scratch.rs`: the servers' directories, on `/dev/shm` when it has room (creating
//!   files there is far cheaper than on a VM's disk), else in the temp dir; each is
//!   locked by its test process, and the next start sweeps up those whose process died.
//! - [`otlp`]: an OTLP/HTTP trace receiver that keeps the spans the fleet's processes
//!   export, decoded with `opentelemetry-proto`.
//! - [`fleet`]: the whole fleet, every binary a separate process, on a private Redis
//!   (with the generated ACLs) and Postgres, its secrets made with `fleetctl`.
//! - [`secrets`]: made-up secrets of every kind in lines of text, with what the fleet's
//!   redaction must turn each line into; sinks' tests send every one through.

#![forbid(unsafe_code)]

mod binary;
mod error;
pub mod fleet;
pub mod otlp;
mod postgres;
mod process;
mod redis_cluster;
mod redis_server;
mod scratch;
pub mod secrets;
pub mod tls;

pub use error::HarnessError;
pub use postgres::{Postgres, PostgresBuilder};
pub use redis_cluster::{RedisCluster, RedisClusterBuilder};
pub use redis_server::{RedisServer, RedisServerBuilder};
