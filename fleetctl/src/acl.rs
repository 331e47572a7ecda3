//! `fleetctl acl …`: Redis ACL users generated from the permission table, so the broker
//! itself refuses what the verifiers would refuse (a Dev worker's `XADD` to
//! `fleet:tasks:qa` fails with `NOPERM` before any verifier sees it).
//!
//! [`render`] turns a [`PermissionTable`] and the fleet's [`Passwords`] into a Redis 7.0
//! ACL file (`aclfile`): one `user` line per [`User`], with `#<sha256>` password hashes, so
//! the file never holds a plaintext password.
//!
//! # Why selectors
//!
//! Redis key permissions only say "read" or "write", and most consumer commands need write
//! access to the stream key (`XACK`, `XAUTOCLAIM`, `XCLAIM` and `XGROUP CREATE`,
//! `CREATECONSUMER`, `DELCONSUMER` change the consumer group, which lives in the stream;
//! checked on Redis 7.0.15, where only `XREADGROUP` gets by with `%R~`). So "dev may write
//! `fleet:tasks:dev`" would let dev `XADD` forged assignments into its own inbox.
//! Each user therefore gets only connection commands at its root and one selector per
//! grant: a selector allows a command only when the command *and every key it touches*
//! are in that one selector. Publishing is `(%W~<streams it publishes to> +xadd)`;
//! consuming is `(~<its inbox streams> +xreadgroup +xack …)` without `+xadd`.
//!
//! # Layout
//! - [`User`], [`grants`], [`Selector`]: who gets what, derived from the table.
//! - [`render`]: the ACL file text.
//! - `passwords.rs`: [`Passwords`], the secrets file (`[passwords]`, one per user).
//! - `command.rs`: [`run`], `fleetctl acl generate` and `fleetctl acl secrets new`.

mod command;
mod passwords;

use std::collections::BTreeSet;
use std::fmt;

use envelope::{PermissionTable, Role, StreamName, streams};

pub use command::run;
pub use passwords::{MIN_PASSWORD_LEN, Password, Passwords, PasswordsError, instance_user};

/// Commands every user may run, on no key: what the `redis` crate and deadpool-redis send
/// when they connect and recycle (`AUTH` or `HELLO`, `CLIENT SETNAME`, `PING`; deadpool-redis
/// 0.23 recycles a pooled connection with `UNWATCH` and `PING <n>`, and a refused `UNWATCH`
/// is silently ignored by it but still an ACL refusal in Redis's `ACL LOG`). `UNWATCH`
/// only forgets the connection's own `WATCH`es.
///
/// Redis 7.0 never ACL-checks `AUTH` and `HELLO` (they must work before authentication);
/// they are listed so the line says what it means. `CLIENT SETINFO` is missing on purpose:
/// Redis 7.0 does not know it (it came in 7.2) and refuses an ACL file that names it; the
/// `redis` crate sends it on connect and ignores the error. `SELECT` is not granted: the
/// fleet uses database 0, and the crate sends `SELECT` only for another one.
///
/// On a Redis Cluster the client also asks a node for the slot map (`CLUSTER SLOTS`) and
/// follows `ASK` redirections during a slot migration (`ASKING`); neither touches a key, and
/// a single server answers both with an error, so one file serves both deployments.
pub const CONNECTION_COMMANDS: &[&str] =
    &["ping", "hello", "auth", "client|setname", "unwatch", "cluster|slots", "asking"];

/// What a publisher may do on the streams it publishes to, and nothing else.
pub const PUBLISH_COMMANDS: &[&str] = &["xadd"];

/// What a publisher reads of the streams it publishes to before it adds more: their length
/// and their groups' lag and pending counts (`bus::Publisher`'s backpressure, which keeps
/// `MAXLEN` trimming away from unread entries). No entry content.
pub const BACKLOG_COMMANDS: &[&str] = &["xlen", "xinfo|groups"];

/// What a consumer group member does on its own inbox streams: read, acknowledge, reclaim,
/// inspect, prune idle consumers. No `XADD`, `XDEL`, `XTRIM`, `XSETID`, `XGROUP DESTROY` or
/// `XGROUP SETID`. Workers get [`WORKER_CONSUMER_COMMANDS`].
pub const CONSUMER_COMMANDS: &[&str] = &[
    "xreadgroup",
    "xack",
    "xautoclaim",
    "xclaim",
    "xpending",
    "xgroup|create",
    "xgroup|createconsumer",
    "xgroup|delconsumer",
    "xinfo|groups",
    "xinfo|consumers",
    "xinfo|stream",
    "xlen",
    "xrange",
];

/// [`CONSUMER_COMMANDS`] less `XGROUP CREATECONSUMER` and `XGROUP DELCONSUMER`, for the
/// worker roles. Every instance of a role shares one user, and deleting a consumer drops its
/// pending entries: a compromised worker could delete the consumer of a peer and with it the
/// task the peer is working on. Workers never prune (`bus`'s `remove_idle_consumers_after`
/// is off for them); the orchestrator prunes their groups ([`PRUNE_COMMANDS`]). Reading
/// creates a consumer by itself, so nobody needs `CREATECONSUMER`.
pub const WORKER_CONSUMER_COMMANDS: &[&str] = &[
    "xreadgroup",
    "xack",
    "xautoclaim",
    "xclaim",
    "xpending",
    "xgroup|create",
    "xinfo|groups",
    "xinfo|consumers",
    "xinfo|stream",
    "xlen",
    "xrange",
];

/// What the orchestrator runs on the worker roles' task streams to delete their groups'
/// idle consumers (`bus::pruner`), the one thing the workers' users may not do there.
pub const PRUNE_COMMANDS: &[&str] = &["xinfo|consumers", "xgroup|delconsumer"];

/// The replay guard's commands, on `fleet:seen:{<stream>}:<group>:*` and the older
/// consumers' `fleet:done:<group>:*`: `HSETNX`, `HGET` and `PEXPIREAT` on the group's bucket
/// hashes (`bus::guard`) and `EXISTS` of an older consumer's done marker. No scripts: a
/// compromised worker with `EVAL` could run any Lua, such as a loop that stalls Redis for
/// everyone.
pub const REPLAY_GUARD_COMMANDS: &[&str] = &["hsetnx", "hget", "pexpireat", "exists"];

/// Prefix of the replay guard's keys; `{<inbox stream>}:<group>:*` follows (the group is
/// the role's name).
pub const REPLAY_GUARD_SEEN: &str = "fleet:seen";

/// Prefix of the done markers older consumers wrote (still read on redeliveries);
/// `<group>:*` follows.
pub const REPLAY_GUARD_DONE: &str = "fleet:done";

/// The roles that run the budget ledger's Lua scripts.
pub const LEDGER_ROLES: &[Role] = &[Role::Orchestrator, Role::Budget];

/// The ledger's keys.
pub const LEDGER_KEYS: &[&str] = &["fleet:budget:*"];

/// What only the budget manager writes: the kill switch's record, and its counters (the
/// resume script resets the failure counter in the same `EVAL`, so both keys are in one
/// selector). Commands: [`LEDGER_COMMANDS`].
pub const KILLSWITCH_WRITE_KEYS: &[&str] = &["fleet:killswitch", "fleet:budget:counters:*"];

/// Loading and running the ledger's scripts, plus every command the scripts call: Redis
/// checks the commands a script runs against the caller's ACL too, so a script that calls
/// anything else fails with "The user executing the script can't run this command". Extend
/// this list when the ledger's scripts need more.
pub const LEDGER_COMMANDS: &[&str] = &[
    "eval",
    "evalsha",
    "script|load",
    "get",
    "set",
    "incrby",
    "decrby",
    "hget",
    "hmget",
    "hgetall",
    "hset",
    "hincrby",
    "exists",
    "pexpire",
    "pttl",
];

/// The orchestrator's per-client intake rate limiter (a Lua token bucket,
/// orchestrator/src/api/ratelimit.rs): its keys, and the commands its script runs.
pub const RATE_LIMIT_KEYS: &str = "fleet:ratelimit:*";

/// Loading and running the rate limiter's script, and what the script calls.
pub const RATE_LIMIT_COMMANDS: &[&str] = &["eval", "evalsha", "script|load", "hmget", "hset", "pexpire", "time"];

/// The orchestrator's Redis sentinel (orchestrator/src/sentinel.rs): a value also kept in
/// Postgres, whose absence from Redis means Redis lost its data.
pub const SENTINEL_KEY: &str = "fleet:sentinel";

/// Reading and (only if absent) writing the sentinel.
pub const SENTINEL_COMMANDS: &[&str] = &["get", "set"];

/// The budget manager's alert outbox (budget/src/alert): the stream its dispatchers
/// consume, and the dedup markers its enqueue script sets.
pub const ALERT_KEYS: &[&str] = &["fleet:alerts", "fleet:alerts:dedup:*"];

/// Enqueueing (a script calling GET, SET, XADD) and dispatching (a consumer group per channel).
pub const ALERT_COMMANDS: &[&str] = &[
    "eval",
    "evalsha",
    "script|load",
    "get",
    "set",
    "xadd",
    "xgroup|create",
    "xreadgroup",
    "xack",
    "xpending",
    "xinfo|groups",
];

/// The kill switch's state record, which every process reads (`bus::control`).
pub const KILLSWITCH_KEY: &str = "fleet:killswitch";

/// What a [`bus::ControlListener`] runs: the newest entry of its role's control stream
/// (`XREVRANGE`), plain `XREAD` after it (no consumer group: every process of the role sees
/// every pause), and `HGETALL` of the state record. Workers read their tool-response streams
/// (`fleet:tool:responses:<role>:<instance>`) with the same commands.
pub const CONTROL_COMMANDS: &[&str] = &["xread", "xrevrange", "hgetall"];

/// The roles that follow `fleet:control:<role>` with a control listener.
pub const CONTROL_ROLES: &[Role] = &[Role::Orchestrator, Role::Dev, Role::Qa, Role::Review, Role::Refactor];

/// What `fleetctl status` reads besides streams: the kill switch, the ledger's and the
/// budget manager's counters. Read-only keys (`%R~`).
pub const STATUS_KEYS: &[&str] = &["fleet:killswitch", "fleet:budget:*"];

/// Hash and string reads of [`STATUS_KEYS`].
pub const STATUS_COMMANDS: &[&str] = &["hgetall", "hmget", "hget", "get"];

/// What `fleetctl tail` and `fleetctl status` run: reads without a consumer group.
pub const OPERATOR_COMMANDS: &[&str] = &["xread", "xrange", "xrevrange", "xlen", "xinfo", "xpending"];

/// The keys the operator may read.
pub const OPERATOR_KEYS: &str = "fleet:*";

/// What the `monitor` user may run: the server's `INFO`, and the sizes, groups, consumers
/// and pending counts of the fleet's streams, so a dashboard or an alerting probe can watch
/// backlogs. Nothing that returns an entry's fields (no `XRANGE`, `XREAD`, `XREADGROUP`,
/// and no `XINFO STREAM`, whose reply holds the first and last entries) and nothing that
/// writes. `PING` is a connection command every user has.
pub const MONITOR_COMMANDS: &[&str] = &["info", "xinfo|groups", "xinfo|consumers", "xlen", "xpending"];

/// The keys the monitor may look at (read-only).
pub const MONITOR_KEYS: &str = "fleet:*";

/// The `admin` user's rules after its password: every command, key and channel. It is the
/// operators' own user for `ACL LOAD`, `CONFIG`, `INFO` and repairs, separate from every
/// process of the fleet, so no fleet host needs its password.
pub const ADMIN_RULES: &str = "~* &* +@all";

/// A Redis user of the fleet: one per role, the outbox relay, the operator, the monitor and
/// the administrator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum User {
    Orchestrator,
    Budget,
    Dev,
    Qa,
    Review,
    Refactor,
    /// Forwards what the orchestrator signed into its outbox to the streams.
    OutboxRelay,
    /// `fleetctl tail` and `fleetctl status`: reads everything, writes nothing.
    Operator,
    /// Monitoring (dashboards, `redis-cli` probes): `INFO`, stream lengths, groups and
    /// pending counts; never an entry's contents, never a write.
    Monitor,
    /// The operators' administrative user: everything ([`ADMIN_RULES`]). No fleet process
    /// connects as it.
    Admin,
}

impl User {
    /// Every user, in the order of the ACL file.
    pub const ALL: [User; 10] = [
        User::Orchestrator,
        User::Budget,
        User::Dev,
        User::Qa,
        User::Review,
        User::Refactor,
        User::OutboxRelay,
        User::Operator,
        User::Monitor,
        User::Admin,
    ];

    /// The Redis user name, also the key in the secrets file.
    pub const fn as_str(self) -> &'static str {
        match self {
            User::Orchestrator => "orchestrator",
            User::Budget => "budget",
            User::Dev => "dev",
            User::Qa => "qa",
            User::Review => "review",
            User::Refactor => "refactor",
            User::OutboxRelay => "outbox-relay",
            User::Operator => "operator",
            User::Monitor => "monitor",
            User::Admin => "admin",
        }
    }

    /// The user with this name, if there is one.
    pub fn parse(name: &str) -> Option<User> {
        User::ALL.into_iter().find(|user| user.as_str() == name)
    }

    /// The user a role's processes connect as.
    pub const fn of_role(role: Role) -> User {
        match role {
            Role::Orchestrator => User::Orchestrator,
            Role::Budget => User::Budget,
            Role::Dev => User::Dev,
            Role::Qa => User::Qa,
            Role::Review => User::Review,
            Role::Refactor => User::Refactor,
        }
    }

    /// The role whose processes connect as this user; `None` for the relay, the operator, the
    /// monitor and the administrator.
    pub const fn role(self) -> Option<Role> {
        match self {
            User::Orchestrator => Some(Role::Orchestrator),
            User::Budget => Some(Role::Budget),
            User::Dev => Some(Role::Dev),
            User::Qa => Some(Role::Qa),
            User::Review => Some(Role::Review),
            User::Refactor => Some(Role::Refactor),
            User::OutboxRelay | User::Operator | User::Monitor | User::Admin => None,
        }
    }

    /// "orchestrator, budget, …, operator", for messages.
    pub fn list() -> String {
        User::ALL.map(User::as_str).join(", ")
    }
}

impl fmt::Display for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which of Redis's key permissions a selector's key patterns carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// `~pattern`: the consumer commands write the group state inside the stream.
    ReadWrite,
    /// `%R~pattern`: the operator's look-ups.
    Read,
    /// `%W~pattern`: `XADD` needs no read access.
    Write,
}

impl Access {
    /// The ACL rule prefix of a key pattern.
    pub const fn prefix(self) -> &'static str {
        match self {
            Access::ReadWrite => "~",
            Access::Read => "%R~",
            Access::Write => "%W~",
        }
    }
}

/// What a selector is for; the ACL file doesn't say, the docs and tests do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// `XADD` to the streams the role's rules let it publish to, plus `fleet:rejected` and
    /// `fleet:dlq` for a consumer.
    Publish,
    /// Length and group lag of the streams it publishes to (backpressure).
    Backlog,
    /// The consumer commands on the streams addressed to the role.
    Consume,
    /// The orchestrator's pruning of idle consumers in the worker roles' task groups.
    Prune,
    /// The replay guard's `fleet:seen:<role>:*` and `fleet:done:<role>:*` keys.
    ReplayGuard,
    /// The budget ledger's scripts and keys.
    Ledger,
    /// The orchestrator's intake rate limiter.
    RateLimit,
    /// The orchestrator's sentinel that tells it Redis lost its data.
    Sentinel,
    /// The budget manager's alert outbox.
    Alerts,
    /// Following the role's control stream and reading the kill switch's record.
    Control,
    /// The budget manager's writes of the kill switch's record and its counters.
    KillSwitch,
    /// The operator's reads of the kill switch and the budget counters.
    Status,
    /// The outbox relay's `XADD` to the orchestrator's streams.
    Forward,
    /// The operator's reads.
    Inspect,
    /// The monitor's counts: `INFO`, lengths, groups, pending entries.
    Monitor,
}

/// One ACL selector: `commands` on keys matching `keys`, and nothing in it applies to
/// other selectors' keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selector {
    /// Why the user has it.
    pub purpose: Purpose,
    /// The permission every pattern in `keys` carries.
    pub access: Access,
    /// Redis glob patterns, sorted and without duplicates so the file is stable.
    pub keys: BTreeSet<String>,
    /// Commands and `command|subcommand`s, granted with `+`.
    pub commands: &'static [&'static str],
}

impl Selector {
    fn new(purpose: Purpose, access: Access, keys: BTreeSet<String>, commands: &'static [&'static str]) -> Self {
        Self { purpose, access, keys, commands }
    }
}

impl fmt::Display for Selector {
    /// `(%W~fleet:a %W~fleet:b resetchannels +xadd)`. `resetchannels` because a new
    /// selector starts with every channel when the server runs with
    /// `acl-pubsub-default allchannels`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("(")?;
        for key in &self.keys {
            write!(f, "{}{key} ", self.access.prefix())?;
        }
        f.write_str("resetchannels")?;
        for command in self.commands {
            write!(f, " +{command}")?;
        }
        f.write_str(")")
    }
}

/// The selectors of `user` under `table`. A role that neither publishes nor receives gets
/// none: it can connect and nothing else. The administrator has none either: its rules are
/// [`ADMIN_RULES`], at the root.
pub fn grants(table: &PermissionTable, user: User) -> Vec<Selector> {
    match user.role() {
        Some(role) => role_grants(table, role),
        None if user == User::Admin => Vec::new(),
        None if user == User::Monitor => vec![Selector::new(
            Purpose::Monitor,
            Access::Read,
            BTreeSet::from([MONITOR_KEYS.to_owned()]),
            MONITOR_COMMANDS,
        )],
        None if user == User::OutboxRelay => {
            let keys = publish_patterns(table, Role::Orchestrator);
            if keys.is_empty() {
                return Vec::new();
            }
            vec![
                Selector::new(Purpose::Forward, Access::Write, keys.clone(), PUBLISH_COMMANDS),
                Selector::new(Purpose::Backlog, Access::Read, keys, BACKLOG_COMMANDS),
            ]
        }
        None => vec![
            Selector::new(
                Purpose::Inspect,
                Access::Read,
                BTreeSet::from([OPERATOR_KEYS.to_owned()]),
                OPERATOR_COMMANDS,
            ),
            Selector::new(
                Purpose::Status,
                Access::Read,
                STATUS_KEYS.iter().map(|k| (*k).to_owned()).collect(),
                STATUS_COMMANDS,
            ),
        ],
    }
}

fn role_grants(table: &PermissionTable, role: Role) -> Vec<Selector> {
    let inbox: BTreeSet<String> =
        table.rules().iter().filter(|rule| rule.to == role).map(|rule| rule.stream.as_redis_pattern()).collect();
    let consumer = !inbox.is_empty();
    let control = StreamName::control(role).as_str().to_owned();
    let follows_control = CONTROL_ROLES.contains(&role) && inbox.contains(&control);
    let mut publish = publish_patterns(table, role);
    if consumer {
        // Consumers record what they refuse, and park what keeps failing.
        publish.insert(streams::REJECTED.to_owned());
        publish.insert(streams::DLQ.to_owned());
    }

    let mut selectors = Vec::new();
    if !publish.is_empty() {
        selectors.push(Selector::new(Purpose::Publish, Access::Write, publish.clone(), PUBLISH_COMMANDS));
        selectors.push(Selector::new(Purpose::Backlog, Access::Read, publish, BACKLOG_COMMANDS));
    }
    if consumer {
        let commands = if role.is_worker() { WORKER_CONSUMER_COMMANDS } else { CONSUMER_COMMANDS };
        selectors.push(Selector::new(Purpose::Consume, Access::ReadWrite, inbox.clone(), commands));
        // The consumer group is named after the role. Guard keys carry the stream they
        // guard as their hash tag (`bus::names::seen_key`), so the role's are those of its
        // inbox streams.
        let guard = inbox
            .iter()
            .map(|stream| format!("{REPLAY_GUARD_SEEN}:{{{stream}}}:{role}:*"))
            .chain(std::iter::once(format!("{REPLAY_GUARD_DONE}:{role}:*")))
            .collect();
        selectors.push(Selector::new(Purpose::ReplayGuard, Access::ReadWrite, guard, REPLAY_GUARD_COMMANDS));
    }
    if follows_control {
        let mut keys = BTreeSet::from([control, KILLSWITCH_KEY.to_owned()]);
        if role.is_worker() {
            // A worker's tool client reads its own response stream the same way: plain XREAD
            // after the newest entry, no consumer group.
            keys.insert(format!("fleet:tool:responses:{role}:*"));
        }
        selectors.push(Selector::new(Purpose::Control, Access::Read, keys, CONTROL_COMMANDS));
    }
    if LEDGER_ROLES.contains(&role) {
        let keys = LEDGER_KEYS.iter().map(|key| (*key).to_owned()).collect();
        selectors.push(Selector::new(Purpose::Ledger, Access::ReadWrite, keys, LEDGER_COMMANDS));
    }
    if role == Role::Budget {
        let keys = KILLSWITCH_WRITE_KEYS.iter().map(|key| (*key).to_owned()).collect();
        selectors.push(Selector::new(Purpose::KillSwitch, Access::ReadWrite, keys, LEDGER_COMMANDS));
        let keys = ALERT_KEYS.iter().map(|key| (*key).to_owned()).collect();
        selectors.push(Selector::new(Purpose::Alerts, Access::ReadWrite, keys, ALERT_COMMANDS));
    }
    if role == Role::Orchestrator {
        let keys = BTreeSet::from([RATE_LIMIT_KEYS.to_owned()]);
        selectors.push(Selector::new(Purpose::RateLimit, Access::ReadWrite, keys, RATE_LIMIT_COMMANDS));
        let keys = BTreeSet::from([SENTINEL_KEY.to_owned()]);
        selectors.push(Selector::new(Purpose::Sentinel, Access::ReadWrite, keys, SENTINEL_COMMANDS));
        let worker_tasks: BTreeSet<String> = table
            .rules()
            .iter()
            .filter(|rule| rule.to.is_worker() && rule.stream.as_redis_pattern() == StreamName::tasks(rule.to).as_str())
            .map(|rule| rule.stream.as_redis_pattern())
            .collect();
        if !worker_tasks.is_empty() {
            selectors.push(Selector::new(Purpose::Prune, Access::ReadWrite, worker_tasks, PRUNE_COMMANDS));
        }
    }
    selectors
}

/// The stream patterns `role`'s rules let it publish to.
fn publish_patterns(table: &PermissionTable, role: Role) -> BTreeSet<String> {
    table.rules().iter().filter(|rule| rule.from == role).map(|rule| rule.stream.as_redis_pattern()).collect()
}

/// The ACL file for `table`: `default` off, then one line per [`User`], each with its
/// password's SHA-256 (`#<hex>`), connection commands at the root and one selector per
/// grant (see [`grants`]); the administrator's line has [`ADMIN_RULES`] instead.
///
/// Redis 7.0's ACL file has no comments, so the file says nothing about where it came
/// from; `docs/operations.md` does.
pub fn render(table: &PermissionTable, passwords: &Passwords) -> String {
    // `reset` = resetpass, resetkeys, off, -@all, clearselectors (and allchannels under
    // `acl-pubsub-default allchannels`, hence the explicit `resetchannels`): each line
    // stands on its own, whatever the user had before an `ACL LOAD`.
    //
    // `default` is off and has no password, so no connection can ever act as it; but Redis
    // 7.0 replays a MULTI/EXEC block of the append-only file *as `default`* and re-checks
    // each queued command against its grants (redis/redis#14541, fixed only in later
    // releases). Every Lua script's effects are logged as such a block, so a `-@all`
    // default made Redis drop the ledger's, the replay guard's and the kill switch's writes
    // silently on every restart. Hence all grants, on a user nobody can log in as.
    let mut out = String::from("user default reset off resetchannels ~* &* +@all\n");
    for user in User::ALL {
        let hash = passwords.get(user).redis_hash();
        if user == User::Admin {
            out.push_str(&format!("user {user} reset on #{hash} {ADMIN_RULES}\n"));
            continue;
        }
        out.push_str(&format!("user {user} reset on #{hash} resetchannels -@all"));
        for command in CONNECTION_COMMANDS {
            out.push_str(&format!(" +{command}"));
        }
        for selector in grants(table, user) {
            out.push_str(&format!(" {selector}"));
        }
        out.push('\n');
    }
    for (role, instance, password) in passwords.instances() {
        let name = passwords::instance_user(*role, instance);
        out.push_str(&format!("user {name} reset on #{} resetchannels -@all", password.redis_hash()));
        for command in CONNECTION_COMMANDS {
            out.push_str(&format!(" +{command}"));
        }
        for selector in instance_grants(table, *role, instance) {
            out.push_str(&format!(" {selector}"));
        }
        out.push('\n');
    }
    out
}

/// The grants of a worker instance with a user of its own: its role's, except that of the
/// role's tool response streams it reads only its own.
pub fn instance_grants(table: &PermissionTable, role: Role, instance: &envelope::Instance) -> Vec<Selector> {
    let all = format!("fleet:tool:responses:{role}:*");
    let own = StreamName::tool_responses(role, instance).as_str().to_owned();
    role_grants(table, role)
        .into_iter()
        .map(|mut s| {
            if s.keys.remove(&all) {
                s.keys.insert(own.clone());
            }
            s
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const SHIPPED: &str = include_str!("../../config/permissions.toml");

    fn shipped() -> PermissionTable {
        PermissionTable::parse(SHIPPED).unwrap()
    }

    fn selector(table: &PermissionTable, user: User, purpose: Purpose) -> Option<Selector> {
        grants(table, user).into_iter().find(|s| s.purpose == purpose)
    }

    fn keys(patterns: &[&str]) -> BTreeSet<String> {
        patterns.iter().map(|p| (*p).to_owned()).collect()
    }

    #[test]
    fn a_worker_publishes_its_four_streams_and_consumes_its_inbox() {
        let t = shipped();
        let publish = selector(&t, User::Dev, Purpose::Publish).unwrap();
        assert_eq!(publish.access, Access::Write);
        assert_eq!(publish.commands, ["xadd"]);
        assert_eq!(
            publish.keys,
            keys(&[
                "fleet:dlq",
                "fleet:heartbeats",
                "fleet:questions",
                "fleet:rejected",
                "fleet:results",
                "fleet:tool:requests"
            ])
        );
        let consume = selector(&t, User::Dev, Purpose::Consume).unwrap();
        assert_eq!(consume.keys, keys(&["fleet:control:dev", "fleet:tasks:dev", "fleet:tool:responses:dev:*"]));
        assert!(!consume.commands.contains(&"xadd"), "a consumer must not XADD to its inbox");
        // Deleting a consumer drops its pending entries: a peer's running task.
        assert!(!consume.commands.iter().any(|c| c.starts_with("xgroup|") && c.ends_with("consumer")));
        assert!(selector(&t, User::Dev, Purpose::Prune).is_none());
        let guard = selector(&t, User::Dev, Purpose::ReplayGuard).unwrap();
        assert_eq!(
            guard.keys,
            keys(&[
                "fleet:done:dev:*",
                "fleet:seen:{fleet:control:dev}:dev:*",
                "fleet:seen:{fleet:tasks:dev}:dev:*",
                "fleet:seen:{fleet:tool:responses:dev:*}:dev:*",
            ])
        );
        assert!(selector(&t, User::Dev, Purpose::Ledger).is_none());
    }

    #[test]
    fn the_orchestrator_and_budget_run_the_ledger_and_the_relay_forwards_for_the_orchestrator() {
        let t = shipped();
        for user in [User::Orchestrator, User::Budget] {
            let ledger = selector(&t, user, Purpose::Ledger).unwrap();
            assert_eq!(ledger.keys, keys(&["fleet:budget:*"]));
            assert!(ledger.commands.contains(&"evalsha") && ledger.commands.contains(&"script|load"));
        }
        let orchestrator = selector(&t, User::Orchestrator, Purpose::Publish).unwrap();
        let relay = grants(&t, User::OutboxRelay);
        assert_eq!(relay.len(), 2);
        assert_eq!(relay[0].purpose, Purpose::Forward);
        assert_eq!((relay[1].purpose, &relay[1].keys), (Purpose::Backlog, &relay[0].keys));
        let mut expected = orchestrator.keys.clone();
        expected.remove("fleet:rejected");
        expected.remove("fleet:dlq");
        assert_eq!(relay[0].keys, expected);
        assert!(relay[0].keys.contains("fleet:tool:responses:qa:*"));
        let switch = selector(&t, User::Budget, Purpose::KillSwitch).unwrap();
        assert_eq!(switch.keys, keys(&["fleet:budget:counters:*", "fleet:killswitch"]));
        assert!(selector(&t, User::Orchestrator, Purpose::KillSwitch).is_none(), "only budget writes the record");
        let control = selector(&t, User::Orchestrator, Purpose::Control).unwrap();
        assert_eq!(control.keys, keys(&["fleet:control:orchestrator", "fleet:killswitch"]));
        assert_eq!(control.access, Access::Read);
        let budget = selector(&t, User::Budget, Purpose::Consume).unwrap();
        assert_eq!(budget.keys, keys(&["fleet:control:budget", "fleet:outcomes", "fleet:usage"]));
        assert!(budget.commands.contains(&"xgroup|delconsumer"), "its own groups are its own to prune");
        // The orchestrator prunes the workers' task groups, and may do nothing else there.
        let prune = selector(&t, User::Orchestrator, Purpose::Prune).unwrap();
        assert_eq!(
            prune.to_string(),
            "(~fleet:tasks:dev ~fleet:tasks:qa ~fleet:tasks:refactor ~fleet:tasks:review resetchannels \
             +xinfo|consumers +xgroup|delconsumer)"
        );
    }

    #[test]
    fn the_operator_only_reads() {
        let operator = grants(&shipped(), User::Operator);
        assert_eq!(operator.len(), 2);
        assert!(operator.iter().all(|s| s.access == Access::Read));
        assert_eq!(
            operator[0].to_string(),
            "(%R~fleet:* resetchannels +xread +xrange +xrevrange +xlen +xinfo +xpending)"
        );
        assert_eq!(
            operator[1].to_string(),
            "(%R~fleet:budget:* %R~fleet:killswitch resetchannels +hgetall +hmget +hget +get)"
        );
    }

    #[test]
    fn the_file_has_one_line_per_user_with_hashes_and_no_plaintext() {
        let passwords = Passwords::generate().unwrap();
        let text = render(&shipped(), &passwords);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1 + User::ALL.len());
        assert_eq!(lines[0], "user default reset off resetchannels ~* &* +@all");
        for (line, user) in lines[1..].iter().zip(User::ALL) {
            let password = passwords.get(user);
            let prefix = if user == User::Admin {
                format!("user admin reset on #{} ~* &* +@all", password.redis_hash())
            } else {
                format!("user {user} reset on #{} resetchannels -@all +ping", password.redis_hash())
            };
            assert!(line.starts_with(&prefix), "{line}");
            assert!(!text.contains(password.expose()), "plaintext password of {user} in the file");
        }
        // Only characters that mean what they say in an ACL rule: no spaces inside a rule,
        // no glob characters other than the prefix `*` (and the administrator's `~*`, `&*`).
        // Braces are literal in Redis's globs: they are the replay guard's hash tags.
        for rule in text.split_whitespace() {
            assert!(
                rule.bytes().all(|b| b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || b":._-*~%#@|()+{}".contains(&b)
                    || b == b'R'
                    || b == b'W')
                    || rule == "&*",
                "{rule}"
            );
        }
        // Only the administrator has more than connection commands outside a selector (and
        // `default`, which is off with no password: only the append-only file's replay runs
        // as it, see `render`).
        let admin = lines[1..].iter().filter(|l| l.contains("+@all")).collect::<Vec<_>>();
        assert_eq!(admin.len(), 1, "{admin:?}");
        assert!(admin[0].starts_with("user admin "), "{admin:?}");
    }

    #[test]
    fn the_monitor_counts_and_reads_no_entry() {
        let monitor = grants(&shipped(), User::Monitor);
        assert_eq!(monitor.len(), 1);
        assert_eq!(
            monitor[0].to_string(),
            "(%R~fleet:* resetchannels +info +xinfo|groups +xinfo|consumers +xlen +xpending)"
        );
        assert!(grants(&shipped(), User::Admin).is_empty(), "the administrator's rules are at its root");
    }

    #[test]
    fn a_dev_line_reads_as_intended() {
        let passwords = Passwords::generate().unwrap();
        let text = render(&shipped(), &passwords);
        let dev = text.lines().find(|l| l.starts_with("user dev ")).unwrap();
        let hash = passwords.get(User::Dev).redis_hash();
        assert_eq!(
            dev,
            format!(
                "user dev reset on #{hash} resetchannels -@all +ping +hello +auth +client|setname +unwatch +cluster|slots +asking \
                 (%W~fleet:dlq %W~fleet:heartbeats %W~fleet:questions %W~fleet:rejected %W~fleet:results \
                 %W~fleet:tool:requests resetchannels +xadd) \
                 (%R~fleet:dlq %R~fleet:heartbeats %R~fleet:questions %R~fleet:rejected %R~fleet:results \
                 %R~fleet:tool:requests resetchannels +xlen +xinfo|groups) \
                 (~fleet:control:dev ~fleet:tasks:dev ~fleet:tool:responses:dev:* resetchannels +xreadgroup \
                 +xack +xautoclaim +xclaim +xpending +xgroup|create \
                 +xinfo|groups +xinfo|consumers +xinfo|stream +xlen +xrange) \
                 (~fleet:done:dev:* ~fleet:seen:{{fleet:control:dev}}:dev:* ~fleet:seen:{{fleet:tasks:dev}}:dev:* \
                 ~fleet:seen:{{fleet:tool:responses:dev:*}}:dev:* resetchannels +hsetnx +hget +pexpireat +exists) \
                 (%R~fleet:control:dev %R~fleet:killswitch %R~fleet:tool:responses:dev:* resetchannels +xread +xrevrange \
                 +hgetall)"
            )
        );
    }

    #[test]
    fn a_role_on_no_rule_can_only_connect() {
        let only_dev =
            "[[rule]]\nfrom = \"dev\"\nto = \"orchestrator\"\nstream = \"fleet:results\"\ntypes = [\"task.result\"]\n";
        let t = PermissionTable::parse(only_dev).unwrap();
        assert!(grants(&t, User::Qa).is_empty());
        assert!(grants(&t, User::OutboxRelay).is_empty());
        // dev publishes but receives nothing: no rejected/dlq, no consumer selector.
        let dev = grants(&t, User::Dev);
        assert_eq!(dev.len(), 2, "publish, and read the backlog of what it publishes to");
        assert_eq!(dev[0].keys, keys(&["fleet:results"]));
        assert_eq!((dev[1].purpose, dev[1].keys.clone()), (Purpose::Backlog, keys(&["fleet:results"])));
    }

    #[test]
    fn user_names_round_trip() {
        for user in User::ALL {
            assert_eq!(User::parse(user.as_str()), Some(user));
            if let Some(role) = user.role() {
                assert_eq!(User::of_role(role), user);
            }
        }
        assert_eq!(User::parse("default"), None);
    }
}
