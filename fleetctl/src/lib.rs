//! `fleetctl`, the agentfleet operator's command line.
//!
//! It manages the signing keys: it creates the master secret, derives each process's
//! keyset from it, rotates and retires key generations, and lists the kids of a keyset so
//! an operator can check a deployment. `docs/keys.md` describes the files and the
//! procedures; the key material itself is the `envelope` crate's. It also turns the same
//! permission file into the Redis ACL users (`fleetctl acl`, docs/operations.md), so the
//! broker refuses what the verifiers would refuse.
//!
//! Exit codes: 0 on success (and for `--help`/`--version`), 64 (EX_USAGE) for anything the
//! operator can fix (bad arguments, a missing or invalid input file, an output file that
//! already exists), 1 for other failures (I/O while writing), with the whole cause chain
//! on stderr. No message ever contains key material.
//!
//! # Layout
//! - [`cli`]: the command line (clap derive); its doc comments are the `--help` texts.
//! - [`keys`]: `fleetctl keys …`.
//! - [`rotation`]: `fleetctl keys rotate`, the resumable stage → promote → retire cycle.
//! - [`acl`]: `fleetctl acl …`: the Redis ACL file ([`acl::render`]) and the secrets file
//!   with the users' passwords ([`acl::Passwords`]).
//! - [`status`]: `fleetctl status`: kill switch, budget, stream backlog, live workers.
//! - [`top`]: `fleetctl top`: the same and tasks, rejections and dead letters, live (ratatui).
//! - [`trace`]: `fleetctl trace TASK`: one task's steps and timings from Postgres.
//! - [`tail`]: `fleetctl tail STREAM`: follow a stream, verify and summarise each entry.
//! - [`audit`]: `fleetctl audit verify` (the orchestrator's audit trail) and `audit key new`.
//! - [`anchor`]: `fleetctl audit anchor` (the trail's head signed and appended outside
//!   Postgres), `audit anchor-key new`, and the `--anchors` half of `audit verify`.
//! - [`db`]: `fleetctl db migrate`, and connecting to Postgres with the URL kept secret.
//! - [`token`]: `fleetctl token …`: the HTTP API's bearer tokens and their secret.
//! - [`tasks_cmd`]: `fleetctl submit|tasks|task|approve|kill|resume` over the HTTP API.
//! - [`client`]: the HTTP API's client (`--api`, `--token`, error answers to exit codes).
//! - [`files`]: reading the operator's input files, writing secret files (mode 0600,
//!   atomically when they replace something).
//! - [`exit`]: [`UsageError`](exit::UsageError) and the mapping of results to exit codes.

pub mod acl;
pub mod anchor;
pub mod audit;
pub mod cli;
pub mod client;
pub mod db;
pub mod exit;
pub mod files;
pub mod incident_cmd;
pub mod keys;
pub mod quarantine;
pub mod rotation;
pub mod status;
pub mod tail;
pub mod tasks_cmd;
pub mod token;
pub mod top;
pub mod trace;

pub use cli::Cli;

/// Runs one parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        cli::Command::Keys(cmd) => keys::run(cmd),
        cli::Command::Acl(cmd) => acl::run(cmd),
        cli::Command::Tail(args) => tail::command(args),
        cli::Command::Status(args) => status::command(args),
        cli::Command::Top(args) => top::command(args),
        cli::Command::Trace(args) => trace::command(args),
        cli::Command::Token(cmd) => token::run(cmd),
        cli::Command::Submit(args) => tasks_cmd::submit(args),
        cli::Command::Tasks(args) => tasks_cmd::tasks(args),
        cli::Command::Task(args) => tasks_cmd::task(args),
        cli::Command::Approve(args) => tasks_cmd::approve(args),
        cli::Command::Questions(args) => tasks_cmd::questions(args),
        cli::Command::Answer(args) => tasks_cmd::answer(args),
        cli::Command::Cancel(args) => tasks_cmd::cancel(args),
        cli::Command::Retry(args) => tasks_cmd::retry(args),
        cli::Command::Kill(args) => tasks_cmd::kill(args),
        cli::Command::Resume(args) => tasks_cmd::resume(args),
        cli::Command::Audit(cmd) => audit::run(cmd),
        cli::Command::Incident(cmd) => incident_cmd::run(cmd),
        cli::Command::Quarantine(args) => quarantine::run(args),
        cli::Command::Db(cmd) => db::run(cmd),
    }
}
