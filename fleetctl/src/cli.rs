//! The command line. The doc comments here are the `--help` texts: keep them accurate.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use envelope::Process;

/// The agentfleet operator's command line.
///
/// Every message on the fleet's Redis Streams is signed with the key of its directed edge
/// (`dev>orchestrator` and `orchestrator>dev` are two keys). All edge keys are derived from
/// one master secret that only operators hold; each process gets a keyset file with the keys
/// of the edges it is on, and nothing else. See docs/keys.md. The same permission file
/// also generates the Redis ACL users, so the broker refuses forbidden writes as well.
///
/// Exit codes: 0 success, 64 usage error (bad arguments, missing or invalid input file,
/// output file exists), 1 other failure.
#[derive(Debug, Parser)]
#[command(name = "fleetctl", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the master secret, derive per-process keysets, rotate and retire keys.
    ///
    /// Files (TOML, all secret, all written with mode 0600):
    ///
    /// - The master file (`keys master new`) holds the 32-byte master secret (`secret`, 64 hex
    ///   digits), the newest generation (`current_generation`), the one senders sign with
    ///   (`signing_generation`; newer ones are staged, verify-only) and the last retired
    ///   generation (`retired_through`). Whoever holds it can forge any message: operators
    ///   only, kept offline, never on a fleet host.
    ///
    /// - A keyset file (`keys derive`) holds one process's keys: `process` and one `[[key]]`
    ///   per kid, `kid = "<from>><to>:<generation>"` with `secret` (64 hex digits), or with
    ///   `retired = true` and no secret; `staged = true` marks a verify-only key. Each role's processes hold their role's keyset;
    ///   outbox-relay holds none.
    #[command(subcommand)]
    Keys(KeysCommand),

    /// Generate the Redis ACL file: one broker user per role, so Redis itself refuses a
    /// forbidden XADD.
    ///
    /// The permission file says which role may publish what on which streams; the ACL file
    /// makes the broker enforce the same thing, independently of the signatures: a Dev
    /// worker's `XADD fleet:tasks:qa` fails with NOPERM. Users: orchestrator, budget, dev,
    /// qa, review, refactor (publish to the streams their rules grant, consume the streams
    /// addressed to them), outbox-relay (XADD to the orchestrator's streams only), operator
    /// (read-only, for `fleetctl tail`/`status`), monitor (INFO, XINFO GROUPS/CONSUMERS,
    /// XLEN, XPENDING: counts, never entries), admin (everything; the operators' own user);
    /// the `default` user is off.
    ///
    /// Files: the secrets file (`acl secrets new`; TOML, mode 0600) holds one password per
    /// user under `[passwords]`. The ACL file (`acl generate`) holds only their SHA-256
    /// hashes; Redis loads it with `redis-server --aclfile FILE` (or `aclfile FILE` in
    /// redis.conf). See docs/operations.md, "Broker ACLs".
    #[command(subcommand)]
    Acl(AclCommand),

    /// Follow a stream live and print one verified line per entry.
    ///
    /// Read-only: a plain XREAD, never a consumer group, so tail claims, moves and
    /// acknowledges nothing; and it keeps no replay state. It needs the operator keyset (all
    /// edges) and, on a broker with `fleetctl acl` users, the read-only operator user.
    ///
    /// Columns: TIME (from the entry id, UTC, RFC 3339 with milliseconds), ENTRY (the stream
    /// entry id), TYPE, SENDER (role/instance), TASK (last 8 hex digits of the task id, or
    /// -), VERDICT, SUMMARY. The summary depends on the type: task.assign attempt,
    /// workspace, instructions; task.result status, attempt, summary (first 60 characters);
    /// heartbeat seq, busy; question text; tool.request action and input size;
    /// tool.response ok and output size; usage role, model, tokens (input+output), cost;
    /// outcome role, status, error kind; control.pause epoch, reason; control.resume epoch.
    /// A lease (a bearer token) is never shown, only `lease=<present>`. Text from senders is
    /// quoted and cut, with control characters escaped.
    ///
    /// Verdicts: `ok` means the entry passes every check of the fleet's verifiers except
    /// replay. Otherwise the verdict is the reason code verifiers write to fleet:rejected:
    /// decode (not an envelope, or no `env` field), too_large, unsupported_version,
    /// unsupported_alg, unknown_kid (a key the keyset lacks), retired_kid, bad_signature
    /// (tampered, or signed with another key), edge_mismatch, forbidden_type (not allowed
    /// on this stream by the permission table), ttl_too_long, future_dated, expired (past
    /// its ttl: normal for old entries with --from-start). TYPE, SENDER and TASK are what
    /// the envelope says; a summary whose signature did not check out is marked
    /// `unverified:` (forbidden_type, ttl_too_long, future_dated and expired entries had
    /// their signature checked first, so theirs is not).
    ///
    /// fleet:rejected entries read `rejected from STREAM ENTRY: REASON (DETAIL)`, their
    /// VERDICT is the reason the consumer recorded, and their envelope is decoded but never
    /// verified (`unverified:`). fleet:dlq entries read `dead-lettered from STREAM ENTRY
    /// after N deliveries: DETAIL`, and their envelope is verified against the stream it
    /// came from.
    ///
    /// Without --from-start, tail starts after the stream's newest entry. If Redis goes
    /// away it warns on stderr and reconnects with backoff, continuing after the last entry
    /// it printed. It stops after --count entries, or on Ctrl-C or SIGTERM (exit 0). Exit
    /// 64 for a bad argument, keyset, permission file or Redis URL; 1 when Redis can't be
    /// reached at start (after a few tries) or refuses the read.
    Tail(TailArgs),

    /// The fleet at a glance: kill switch, today's budget, stream backlog, live workers.
    ///
    /// Read-only (the `operator` Redis user is enough). Sections: KILL SWITCH (engaged or
    /// released, epoch, who, when, why) and the consecutive-failure count; BUDGET for the
    /// UTC day (tokens and money used, limit, held by live reservations, per role with its
    /// soft limits; limits from --budget-config's [ledger] section); STREAMS (length, and per
    /// consumer group pending, lag and consumers, for every fleet stream); WORKERS (from the
    /// heartbeats of the last --window seconds, each verified with the operator keyset: role,
    /// instance, busy, task, seconds since the last heartbeat). --json prints one object.
    /// Exit 64 for a bad argument, keyset, permission or budget file; 1 when Redis can't be
    /// read.
    Status(crate::status::StatusArgs),

    /// The fleet live in the terminal: tasks by state, each worker and what it is doing,
    /// stream lag and pending entries, the day's budget and its burn rate, the kill switch,
    /// the latest rejections and dead letters. Refreshes every --interval seconds; `q`
    /// (or Esc, Ctrl-C) quits. Works over a plain SSH terminal.
    ///
    /// Reads Redis like `status` (the read-only operator user and the operator keyset are
    /// enough) and, when a token is given, the API's task list (a viewer token is enough).
    Top(crate::top::TopArgs),

    /// One task's steps with their timings, from its history and audit trail in Postgres.
    ///
    /// A step is a stay in one state (dev, qa, review, …): when it started (from the
    /// task's first event), how long it took, where it went and why, the model calls paid
    /// for in it (CALLS, TOKENS), the agent tool calls the worker's policy refused (REFUSED)
    /// and the requests the tool proxy refused (PROXY). Then every event in time order:
    /// transitions, model calls with their model, tokens and prompt version, refusals.
    /// Read-only; a read-only database role is enough.
    Trace(crate::trace::TraceArgs),

    /// Verify the orchestrator's hash-chained audit trail; create its key; anchor its head
    /// outside Postgres (Ed25519) and create the anchor key.
    ///
    /// See `fleetctl audit verify --help`, `fleetctl audit anchor --help` and
    /// docs/operations.md, "Audit trail" and "Anchoring the audit trail".
    #[command(subcommand)]
    Audit(crate::audit::AuditCommand),

    /// The orchestrator's database: apply its schema migrations.
    #[command(subcommand)]
    Db(crate::db::DbCommand),

    /// Bearer tokens for the HTTP API: issue one, or create the secret they are signed with.
    #[command(subcommand)]
    Token(crate::token::TokenCommand),

    /// Submit a task (a JSON file) to the HTTP API; prints the task's id and state.
    ///
    /// Needs an operator or admin token. The file is checked before it is sent. Intake is
    /// rate-limited per token subject: over the limit the API answers 429 (exit 1; retry
    /// after the seconds it names). API commands exit 0 on success, 64 when the file, an
    /// argument or the token setting is wrong or the API refused the input (400, 413,
    /// 415, 422), and 1 otherwise (401 bad token, 403 role too low, 404, 409 state
    /// conflict or halted fleet, 429, 5xx, API unreachable); the API's error message is
    /// printed on stderr.
    Submit(crate::tasks_cmd::SubmitArgs),

    /// List tasks, newest first: ID, STATE, RISK, ATTEMPT, RETRIES, UPDATED, TITLE.
    ///
    /// Any token role may read. Exit codes as for `submit`.
    Tasks(crate::tasks_cmd::TasksArgs),

    /// Show one task.
    ///
    /// Any token role may read. Exit codes as for `submit`.
    Task(crate::tasks_cmd::TaskArgs),

    /// Approve a task that waits for a human (HIGH or CRITICAL risk, state
    /// awaiting_approval); prints its id and new state.
    ///
    /// Needs an operator or admin token. A task in any other state, or a halted fleet,
    /// is refused (409, exit 1).
    Approve(crate::tasks_cmd::ApproveArgs),

    /// List the questions workers asked that nobody has answered, oldest first: TASK,
    /// STATE, ASKED_BY, ASKED_AT, QUESTION.
    ///
    /// Any token role may read. Answer one with `fleetctl answer TASK "…"`. Exit codes as
    /// for `submit`.
    Questions(crate::tasks_cmd::QuestionsArgs),

    /// Answer a task's open question; prints the task's id, state and attempt.
    ///
    /// Needs an operator or admin token. The task's step is issued again (attempt + 1)
    /// with "answer from <you> to the question …: <text>" among its findings; the worker
    /// running the old attempt is refused at its next tool request. A task without an open
    /// question, or not in dev, qa, review or refactor, is refused (409, exit 1).
    Answer(crate::tasks_cmd::AnswerArgs),

    /// Cancel a task that is not finished; prints its id and new state (cancelled).
    ///
    /// Needs an operator or admin token. Its current assignment is withdrawn: the worker's
    /// next tool request is refused (lease_stale) and its result is ignored; nothing of
    /// the task is pushed. A merged, failed or cancelled task is refused (409, exit 1).
    Cancel(crate::tasks_cmd::ReasonedArgs),

    /// Retry a failed or blocked task: it returns to its step (a failed one to the step
    /// that failed, or to Dev) with its retries counted afresh; prints its id and new state.
    ///
    /// Needs an operator or admin token. A task in any other state, or a halted fleet, is
    /// refused (409, exit 1).
    Retry(crate::tasks_cmd::ReasonedArgs),

    /// Pull the kill switch: halt every open task and pause the budget manager.
    ///
    /// Needs an admin token. Idempotent; prints the kill epoch.
    Kill(crate::tasks_cmd::KillArgs),

    /// Resume a halted fleet: every halted task returns to its step.
    ///
    /// Needs an admin token. Idempotent; prints the kill epoch.
    Resume(crate::tasks_cmd::ResumeArgs),

    /// Incidents: open, list, show, resolve. A critical or high incident freezes
    /// automatic merges until an admin resolves it (docs/incident-response.md).
    #[command(subcommand)]
    Incident(crate::incident_cmd::IncidentCommand),

    /// Cut a worker that may be compromised off the fleet: its Redis user is disabled live
    /// (its next XADD is NOPERM), its pending tasks go back to its group for healthy
    /// workers, with --master/--keysets every edge is rotated so its old key is retired,
    /// and a critical incident freezes every automatic merge.
    ///
    /// Needs Redis as the admin user (FLEET_REDIS_URL) and an operator token (FLEET_TOKEN).
    /// One instance (ROLE/INSTANCE) only if it connects as a Redis user of its own
    /// (`[instances]` in the ACL secrets file); otherwise quarantine the role.
    Quarantine(crate::quarantine::QuarantineArgs),
}

/// `fleetctl acl …`
#[derive(Debug, Subcommand)]
pub enum AclCommand {
    /// Write the Redis 7 ACL file for the permission table and the secrets file.
    ///
    /// With it, Redis itself answers NOPERM to what the permission table does not allow
    /// (a dev worker's `XADD fleet:tasks:qa`, a DEL or FLUSHALL from anyone), whatever the
    /// process signs: a second layer under the envelope verifiers.
    ///
    /// One `user` line per user with its password as `#<sha256>` (never in plaintext), the
    /// connection commands (PING, HELLO, AUTH, CLIENT SETNAME) at its root, and one ACL
    /// selector per grant: XADD on the streams it publishes to; the consumer commands
    /// (XREADGROUP, XACK, XAUTOCLAIM, XCLAIM, XPENDING, XGROUP CREATE/CREATECONSUMER/
    /// DELCONSUMER, XINFO, XLEN, XRANGE) on the streams addressed to it, without XADD;
    /// SET/GET/EXISTS/PEXPIRE on its replay-guard keys (`fleet:seen:<role>:*`,
    /// `fleet:done:<role>:*`); and for orchestrator and budget, the ledger's Lua scripts on
    /// `fleet:budget:*` and `fleet:killswitch*`. Consumers may also XADD to `fleet:rejected`
    /// and `fleet:dlq`. Selectors are needed because XACK and XAUTOCLAIM need write access
    /// to the stream: with plain key patterns, a consumer could XADD into its own inbox.
    /// Two users are not the fleet's processes: `monitor` (INFO, XINFO GROUPS/CONSUMERS,
    /// XLEN and XPENDING on `fleet:*`; no entry contents, no writes) for monitoring, and
    /// `admin` (`~* &* +@all`) for the operators.
    ///
    /// Load the file with `redis-server --aclfile FILE` (or `aclfile FILE` in redis.conf,
    /// which must then have no `user` lines). Redis re-reads it when restarted, or on
    /// `ACL LOAD` run as `admin` (no fleet user may run it). Needs Redis 7.0 or later.
    ///
    /// Without --out the file goes to stdout.
    Generate(GenerateArgs),

    /// Manage the secrets file (the users' Redis passwords).
    #[command(subcommand)]
    Secrets(SecretsCommand),
}

/// `fleetctl acl secrets …`
#[derive(Debug, Subcommand)]
pub enum SecretsCommand {
    /// Write a secrets file with a fresh random password for every user.
    ///
    /// Each password is 32 bytes from the OS random generator, as 64 hex digits (usable in a
    /// `redis://USER:PASSWORD@HOST` URL as it is). The file is TOML, mode 0600:
    /// `[passwords]` with `orchestrator = "…"`, `budget`, `dev`, `qa`, `review`, `refactor`,
    /// `outbox-relay`, `operator`, `monitor`, `admin`. An existing file is never overwritten.
    New(SecretsNewArgs),
}

/// Arguments of `acl generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The secrets file (from `acl secrets new`): one password per user under
    /// `[passwords]`.
    #[arg(long, value_name = "FILE")]
    pub secrets: PathBuf,

    /// The permission table the users' grants come from.
    #[arg(long, value_name = "FILE", default_value = "config/permissions.toml")]
    pub permissions: PathBuf,

    /// Write the ACL file to FILE (mode 0600) instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,

    /// With --out: replace an existing file (atomically), as after a change of the
    /// permission file or of a password.
    #[arg(long, requires = "out")]
    pub force: bool,
}

/// Arguments of `acl secrets new`.
#[derive(Debug, Args)]
pub struct SecretsNewArgs {
    /// Where to write the secrets file; it must not exist yet.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,

    /// Also a Redis user of its own for this worker instance (`dev/dev-2` connects as
    /// `dev.dev-2`), so that `fleetctl quarantine dev/dev-2` can cut it off alone.
    /// Repeatable.
    #[arg(long = "instance", value_name = "ROLE/INSTANCE")]
    pub instances: Vec<String>,
}

/// `fleetctl keys …`
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Manage the master file.
    #[command(subcommand)]
    Master(MasterCommand),

    /// Print (or write) the keyset of one process, derived from the master file.
    ///
    /// The keyset holds a key for every edge of the permission file the process is on
    /// (as sender or receiver), for every generation up to the current one; retired
    /// generations are listed without a secret so verifiers refuse them by name.
    ///
    /// Who holds which keyset: orchestrator, budget, dev, qa, review and refactor each go to
    /// the hosts running that role (all processes of a role share it). operator verifies
    /// every edge; HMAC keys can also sign, so it is as sensitive as the master file for the
    /// streams it covers: keep it with the operators. outbox-relay holds no keys: it forwards
    /// bytes the orchestrator already signed.
    ///
    /// Without --out the keyset goes to stdout: redirect it into a file only you can read.
    Derive(DeriveArgs),

    /// Rotate every edge key without restarts: stage → promote → retire, with the waits.
    ///
    /// One cycle: stage generation n+1 (verify-only) in the master file; write every
    /// process's keyset to --keysets DIR as <process>.keyset.toml (and run --deploy-hook);
    /// wait --wait (every process re-reads its keyset file every `keyset_reload_secs`, 5 s by
    /// default); promote n+1 (senders sign with it); write the keysets; wait --wait + --max-ttl
    /// + 30 s skew (nothing signed with n is valid any more); retire n; write the keysets.
    ///
    /// Resumable: the master file records the step (current, signing and retired
    /// generations), so after a crash or SIGINT/SIGTERM running the same command again
    /// continues where the cycle stood, serving that step's wait again in full. With --every
    /// it keeps rotating, pausing that long between cycles, until SIGINT or SIGTERM.
    Rotate(RotateArgs),

    /// Only the first step of a rotation: add a staged generation to the master file.
    ///
    /// Rewrites the master file atomically (same secret, `current_generation` + 1); verifiers
    /// accept it once they load re-derived keysets, nobody signs with it yet. `keys rotate`
    /// runs this, `promote` and `retire` with the waits between them; use the single steps
    /// only to drive a rotation by hand (re-derive and deploy every keyset after each).
    Stage(MasterArgs),

    /// Only the second step: make the newest (staged) generation the one senders sign with.
    ///
    /// Run it only after every process has loaded keysets derived after `stage`: until
    /// then a receiver may not hold the new generation yet.
    Promote(MasterArgs),

    /// Retire generations 1..=N: verifiers then refuse messages signed with them.
    ///
    /// Rewrites the master file atomically. The signing generation cannot be retired (rotate
    /// and promote first). Re-derive and redeploy every keyset afterwards: the retired keys disappear
    /// from the keysets, and verifiers refuse their kids as retired.
    Retire(RetireArgs),

    /// List the kids of a keyset file and whether each is active or retired (no secrets).
    ///
    /// Use it to check what a host holds: which process the keyset is for, which edges and
    /// generations it covers, and whether it matches the master's current generation.
    List(ListArgs),
}

/// `fleetctl keys master …`
#[derive(Debug, Subcommand)]
pub enum MasterCommand {
    /// Create a master file with a fresh 32-byte secret from the OS random generator.
    ///
    /// The file is TOML, mode 0600: `format = 1`, `secret` (64 hex digits),
    /// `current_generation = 1`, `signing_generation = 1`, `retired_through = 0`. Keep it offline and backed up: every
    /// key of the fleet is derived from it, and losing it means re-keying every process.
    /// The secret is never printed.
    New(MasterNewArgs),
}

/// Arguments of `keys master new`.
#[derive(Debug, Args)]
pub struct MasterNewArgs {
    /// Where to write the master file.
    #[arg(long, value_name = "FILE", default_value = "agentfleet.master.toml")]
    pub out: PathBuf,

    /// Replace an existing file. Its secret is lost, and every keyset derived from it stops
    /// working.
    #[arg(long)]
    pub force: bool,
}

/// Arguments of `keys derive`.
#[derive(Debug, Args)]
pub struct DeriveArgs {
    /// The master file (from `keys master new`).
    #[arg(long, value_name = "FILE")]
    pub master: PathBuf,

    /// Whose keyset: orchestrator, budget, dev, qa, review, refactor or operator.
    #[arg(long, value_name = "NAME", value_parser = parse_process)]
    pub process: Process,

    /// The permission table: its rules' `from`/`to` pairs are the edges that get keys.
    #[arg(long, value_name = "FILE", default_value = "config/permissions.toml")]
    pub permissions: PathBuf,

    /// Write the keyset to FILE (mode 0600) instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,

    /// With --out: replace an existing file (atomically), as when re-deriving after a
    /// rotation.
    #[arg(long, requires = "out")]
    pub force: bool,
}

/// Arguments of `keys stage` and `keys promote`.
#[derive(Debug, Args)]
pub struct MasterArgs {
    /// The master file (rewritten in place).
    #[arg(long, value_name = "FILE")]
    pub master: PathBuf,
}

/// Arguments of `keys rotate`.
#[derive(Debug, Args)]
pub struct RotateArgs {
    /// The master file; rewritten atomically after each step, it records where the cycle is.
    #[arg(long, value_name = "FILE")]
    pub master: PathBuf,

    /// The directory the keysets are written to, as <process>.keyset.toml for orchestrator,
    /// budget, dev, qa, review, refactor and operator (what the processes' `keyset` setting
    /// reads, or what --deploy-hook copies from).
    #[arg(long, value_name = "DIR")]
    pub keysets: PathBuf,

    /// The permission table the keysets are derived with.
    #[arg(long, value_name = "FILE", default_value = "config/permissions.toml")]
    pub permissions: PathBuf,

    /// Between writing the keysets and the next step: longer than every process's
    /// `keyset_reload_secs` plus the time the files take to reach them (a Kubernetes
    /// Secret volume: about a minute). At least 1s.
    #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = crate::rotation::parse_duration)]
    pub wait: std::time::Duration,

    /// The longest `ttl_ms` of envelopes in flight (the orchestrator's `assign_ttl`, 1h by
    /// default): before retiring, the cycle waits --wait + this + 30s of clock skew.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = crate::rotation::parse_duration)]
    pub max_ttl: std::time::Duration,

    /// A command run with `sh -c` after each write of the keysets, with FLEET_KEYSETS_DIR
    /// set: it deploys them where the processes read them (docs/keys.md has one that patches
    /// the Kubernetes Secrets and one for compose). If it fails, the cycle stops before its
    /// wait; running rotate again resumes.
    #[arg(long, value_name = "COMMAND")]
    pub deploy_hook: Option<String>,

    /// Keep rotating: after each cycle, pause this long (units ms, s, m, h: 720h for 30
    /// days) and start the next, until SIGINT or SIGTERM. At least 60s. Each cycle itself
    /// takes about 2 x --wait + --max-ttl + 30s.
    #[arg(long, value_name = "DURATION", value_parser = crate::rotation::parse_duration)]
    pub every: Option<std::time::Duration>,
}

/// Arguments of `keys retire`.
#[derive(Debug, Args)]
pub struct RetireArgs {
    /// The master file (rewritten in place).
    #[arg(long, value_name = "FILE")]
    pub master: PathBuf,

    /// Retire generations 1 through N; N must be below the signing generation.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub through: u32,
}

/// Arguments of `keys list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// The keyset file to inspect (from `keys derive`).
    #[arg(long, value_name = "FILE")]
    pub keyset: PathBuf,
}

/// Parses a process name with envelope's rules, so `outbox-relay` gets its own message.
fn parse_process(name: &str) -> Result<Process, envelope::KeyError> {
    Process::parse(name)
}

/// Arguments of `tail`.
#[derive(Debug, Args)]
pub struct TailArgs {
    /// The stream: fleet:results, fleet:heartbeats, fleet:tasks:dev, fleet:rejected,
    /// fleet:dlq, …
    #[arg(value_name = "STREAM", value_parser = parse_stream)]
    pub stream: envelope::StreamName,

    /// Start with the stream's first entry instead of after its newest one.
    #[arg(long)]
    pub from_start: bool,

    /// Stop after N entries.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,

    /// One JSON object per line: time, entry, stream, type, sender, task_id, envelope_id,
    /// kid, verdict, authentic (signature and edge checked out), problem, summary, and
    /// origin (the bus's fields) for fleet:rejected and fleet:dlq entries.
    #[arg(long)]
    pub json: bool,

    /// The operator keyset (`fleetctl keys derive --process operator`): the keys of every
    /// edge, to verify any stream.
    #[arg(long, value_name = "FILE")]
    pub keyset: PathBuf,

    /// The permission table the fleet's verifiers use.
    #[arg(long, value_name = "FILE", default_value = "config/permissions.toml")]
    pub permissions: PathBuf,

    /// Redis URL, `redis://[USER:PASSWORD@]HOST[:PORT]` [default: redis://127.0.0.1:6379], or
    /// FLEET_REDIS_URL_FILE, a file holding it. Never printed: messages name only
    /// host:port.
    #[arg(
        long,
        value_name = "URL",
        env = "FLEET_REDIS_URL",
        hide_env_values = true,
        value_parser = parse_secret
    )]
    pub redis: Option<secrecy::SecretString>,

    /// PEM file of the CA that signs the Redis server's certificate, for rediss:// URLs
    /// (default: the system's roots).
    #[arg(long, value_name = "FILE", env = "FLEET_REDIS_CA_FILE")]
    pub redis_ca: Option<PathBuf>,
}

/// Parses a stream name with envelope's rules.
fn parse_stream(name: &str) -> Result<envelope::StreamName, envelope::names::InvalidStreamName> {
    envelope::StreamName::parse(name)
}

/// Takes a secret as it is: a parse error here would make clap quote the value.
fn parse_secret(value: &str) -> Result<secrecy::SecretString, std::convert::Infallible> {
    Ok(value.into())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
