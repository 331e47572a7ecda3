//! The token and money ledger: reserve before a model call, commit after it.
//!
//! The model proxy calls [`Ledger::reserve`] with the call's worst case (the prompt's
//! tokens and `max_tokens` for the output). One Lua script checks, atomically, that what
//! the task and the day have **committed**, plus what other calls still **hold**, plus
//! this call, stays within the task's and the day's limits in tokens and in money; if so it
//! holds the amounts and returns a [`Reservation`], else a [`Refusal`] with the figures.
//! Because headroom is taken before the call and the check and the hold are one script,
//! fifty concurrent calls cannot all pass a check that only one of them fits — the failure
//! of budgets checked after the spend.
//!
//! After the call, [`Ledger::commit`] charges the provider's actual figures to the task,
//! the role and the day, and frees the rest of the hold; [`Ledger::release`] frees a hold
//! whose call never happened. Both are idempotent per reservation. A caller that crashed
//! never commits: its hold lapses on its own after the reservation TTL (see [`keys`]).
//!
//! # Policies
//! - **Commits charge actual figures, even above the reservation.** The spend happened; a
//!   ledger that forgot it would be lying. Such a commit is flagged
//!   ([`Commit::exceeded_reservation`], the day's `over` counter, a warning), and only such
//!   commits can push committed spend past a limit. So callers must reserve an upper
//!   bound: `max_tokens` for the output, and for the input an exact count or a safe bound
//!   (the prompt's byte length bounds its tokens for byte-level BPE tokenizers).
//! - **A lapsed, released or forgotten reservation is still charged** on commit, flagged
//!   as late ([`Commit::found`]).
//! - **Soft role limits** are judged with the model asked for, on the role's committed
//!   spend plus this call (not what other calls hold: a soft limit only moves the role to a
//!   cheaper model, and counting holds per role would cost every reservation more work in
//!   Redis). When they would cross one, the reservation says so
//!   ([`Reservation::soft_limit_exceeded`]) and, if the role has a cheaper model, is made
//!   for that model instead ([`Reservation::model`]): the proxy calls the model the
//!   reservation names. Hard limits are then checked with that model's cost.
//! - **The day** is the UTC day of the reservation; a call that straddles midnight is
//!   charged to the day it reserved on. Per-task limits span the task's whole life.
//! - **Caller caps**: [`Ledger::reserve_within`] lowers the task's limits to a [`TaskCap`]
//!   (the capability lease's limits) inside the same script, so a cap is as atomic as the
//!   ledger's own limits; a call over it is refused as [`Refusal::TaskLimit`].
//! - **Refusal order**: the day's limits first (a day that cannot afford the call is the
//!   kill switch's business), then the task's.
//! - **Redis errors are returned, not retried**: the model proxy decides (the safe default
//!   is to not call the model).
//!
//! # Cost
//! Each operation is one `EVALSHA`; the scripts (in `ledger/lua/`) are written to do as
//! few `redis.call`s and move as few fields as possible, because on our hardware Redis's Lua
//! is what limits throughput (see [`keys`] and `docs/benchmarks.md`). For many concurrent
//! callers prefer [`Ledger::with_shared_connection`]: one multiplexed connection lets Redis
//! read and answer many requests per system call.

pub mod clock;
pub mod config;
pub mod keys;

use std::fmt;
use std::sync::Arc;

use envelope::Role;
use redis::Script;
use uuid::Uuid;

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{ConfigError, LedgerConfig, MAX_AMOUNT, MicroUsd, Price, RoleLimits};
pub use keys::{Day, InvalidDay};

use keys::{Buckets, RECORD_RETENTION, RING, USAGE_RETENTION, role_field, slot_fields};

const RESERVE_LUA: &str = concat!(include_str!("ledger/lua/common.lua"), include_str!("ledger/lua/reserve.lua"));
const COMMIT_LUA: &str = concat!(include_str!("ledger/lua/common.lua"), include_str!("ledger/lua/commit.lua"));
const RELEASE_LUA: &str = concat!(include_str!("ledger/lua/common.lua"), include_str!("ledger/lua/release.lua"));

/// The ledger over one Redis connection pool. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Ledger {
    inner: Arc<Inner>,
}

struct Inner {
    /// Connections for the scripts and the readers.
    redis: Connections,
    /// Limits and prices, validated.
    config: LedgerConfig,
    /// The time reservations are made and lapse by.
    clock: Arc<dyn Clock>,
    /// Bucket arithmetic for the configured TTL.
    buckets: Buckets,
    reserve: Script,
    commit: Script,
    release: Script,
}

impl fmt::Debug for Ledger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ledger")
            .field("config", &self.inner.config)
            .field("clock", &self.inner.clock)
            .finish_non_exhaustive()
    }
}

/// Budget held for one model call, until [`Ledger::commit`] or [`Ledger::release`] — or
/// until it lapses at `expires_at_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// Names the reservation in Redis; commits and releases are idempotent per id.
    pub id: Uuid,
    /// The task charged.
    pub task_id: Uuid,
    /// The role charged.
    pub role: Role,
    /// The model the caller asked for.
    pub requested_model: String,
    /// The model to call: the requested one, or the role's cheaper model when the role is
    /// over a soft limit.
    pub model: String,
    /// The UTC day charged.
    pub day: Day,
    /// Estimated input tokens, as asked.
    pub input_tokens: u64,
    /// Estimated (maximum) output tokens, as asked.
    pub output_tokens: u64,
    /// Tokens held: input + output.
    pub tokens: u64,
    /// Money held, at [`Reservation::model`]'s price.
    pub cost: MicroUsd,
    /// Unix ms at which the hold lapses if neither committed nor released.
    pub expires_at_ms: u64,
    /// The role was over one of its soft limits (with the requested model's cost).
    pub soft_limit_exceeded: bool,
    /// The price the commit charges with: the one in force at reservation time.
    price: Price,
    /// The ring slot holding the amounts (its bucket ends at `expires_at_ms`).
    slot: u64,
}

impl Reservation {
    /// The reservation is for another model than the one asked for.
    pub fn rerouted(&self) -> bool {
        self.model != self.requested_model
    }
}

/// Per-task limits of the caller's own, tighter than the ledger's: the capability lease's
/// token and money limits for the task's risk level. [`Ledger::reserve_within`] checks the
/// lower of each pair in the same script that holds the amounts, so concurrent calls of one
/// task cannot both pass a cap that only one of them fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskCap {
    /// Tokens (input + output) the task may have committed and held, all calls together.
    pub tokens: u64,
    /// Money the task may have committed and held.
    pub cost: MicroUsd,
}

/// What a limit is counted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    /// Input plus output tokens.
    Tokens,
    /// Micro-dollars.
    MicroUsd,
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Unit::Tokens => "tokens",
            Unit::MicroUsd => "µ$",
        })
    }
}

/// The figures of a limit a reservation would have crossed:
/// `committed + held + requested > limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitHit {
    /// What the figures count.
    pub unit: Unit,
    /// Already charged.
    pub committed: u64,
    /// Held by other calls' reservations that have not lapsed.
    pub held: u64,
    /// This call's estimate.
    pub requested: u64,
    /// The limit.
    pub limit: u64,
}

impl fmt::Display for LimitHit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self { unit, committed, held, requested, limit } = self;
        write!(f, "{committed} {unit} committed + {held} held + {requested} requested > limit {limit}")
    }
}

/// Why a reservation was refused. The caller does not call the model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The task cannot afford the call: the orchestrator blocks the task. The limit is the
    /// ledger's per-task limit, or the caller's [`TaskCap`] where that is lower.
    #[error("task {task_id} is over its budget: {hit}")]
    TaskLimit {
        /// The task.
        task_id: Uuid,
        /// The figures.
        hit: LimitHit,
    },
    /// The day cannot afford the call: the kill switch's trigger.
    #[error("the daily budget of {day} is spent: {hit}")]
    DailyLimit {
        /// The UTC day.
        day: Day,
        /// The figures.
        hit: LimitHit,
    },
}

/// A ledger operation failed; nothing was reserved, committed or released.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// Talking to Redis failed (connection lost, timeout, script error). The one failure
    /// worth retrying; the caller decides.
    #[error("Redis: {0}")]
    Redis(String),
    /// No connection could be had from the pool.
    #[error("Redis connection pool: {0}")]
    Pool(String),
    /// A script answered something this code does not understand.
    #[error("unexpected reply from the ledger's {script} script: {detail}")]
    Reply {
        /// Which script.
        script: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The model is not in the price table, so its cost is unknown.
    #[error("model {0:?} has no price in the ledger's price table")]
    UnknownModel(String),
    /// Token counts or a cost above [`MAX_AMOUNT`].
    #[error("{0} is beyond what the ledger counts (at most {MAX_AMOUNT})")]
    TooLarge(&'static str),
}

impl From<redis::RedisError> for LedgerError {
    fn from(e: redis::RedisError) -> Self {
        // redis reports the kind and detail only, never the URL; cut to a sane length.
        LedgerError::Redis(e.to_string().chars().take(300).collect())
    }
}

impl From<bus::RedisPoolError> for LedgerError {
    fn from(e: bus::RedisPoolError) -> Self {
        LedgerError::Pool(e.to_string().chars().take(300).collect())
    }
}

/// [`Ledger::reserve`]'s failure: a refusal (an answer), or an error (no answer).
#[derive(Debug, thiserror::Error)]
pub enum ReserveError {
    /// Over a hard limit.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The ledger could not answer.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// What a commit or release found of the reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Found {
    /// Still holding its amounts: the normal case.
    Held,
    /// Had lapsed (its TTL passed): it held nothing any more.
    Lapsed,
    /// Had been released.
    Released,
    /// No record: never made, or forgotten (records are kept two days).
    Unknown,
}

impl Found {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "held" => Found::Held,
            "lapsed" => Found::Lapsed,
            "released" => Found::Released,
            "unknown" => Found::Unknown,
            _ => return None,
        })
    }
}

/// The result of [`Ledger::commit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    /// Tokens charged (by the first commit, for a duplicate).
    pub tokens: u64,
    /// Money charged.
    pub cost: MicroUsd,
    /// What the (first) commit found: anything but [`Found::Held`] is a late commit.
    pub found: Found,
    /// The actual figures exceeded the reservation: the estimate was not an upper bound,
    /// and committed spend may now be over a limit.
    pub exceeded_reservation: bool,
    /// The reservation had already been committed: nothing was charged this time.
    pub duplicate: bool,
}

/// The result of [`Ledger::release`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Release {
    /// The hold was freed.
    Released,
    /// The reservation had lapsed; nothing was held any more. Now marked released.
    Lapsed,
    /// Already committed: nothing done.
    AlreadyCommitted,
    /// Already released: nothing done.
    AlreadyReleased,
    /// No such reservation (or forgotten): nothing done.
    Unknown,
}

/// Spend in one scope (a day, a task, a role's day).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Tokens committed.
    pub tokens: u64,
    /// Money committed.
    pub cost: MicroUsd,
    /// Commits.
    pub calls: u64,
    /// Tokens held by reservations that have not lapsed.
    pub held_tokens: u64,
    /// Money held by reservations that have not lapsed.
    pub held_cost: MicroUsd,
}

/// The fleet's spend on one UTC day, for `fleetctl status` and the kill switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DailyUsage {
    /// The day.
    pub day: Day,
    /// Committed and held.
    pub usage: Usage,
    /// Reservations refused (any limit) that day.
    pub refusals: u64,
    /// Commits of reservations that had lapsed or been released.
    pub late_commits: u64,
    /// Commits whose actual figures exceeded their reservation.
    pub over_commits: u64,
    /// The daily token limit.
    pub limit_tokens: u64,
    /// The daily money limit.
    pub limit_cost: MicroUsd,
}

impl DailyUsage {
    /// Committed spend has reached a daily limit: no call can be afforded any more.
    pub fn exhausted(&self) -> bool {
        self.usage.tokens >= self.limit_tokens || self.usage.cost >= self.limit_cost
    }
}

/// One task's spend over its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskUsage {
    /// The task.
    pub task_id: Uuid,
    /// Committed and held.
    pub usage: Usage,
    /// The per-task token limit.
    pub limit_tokens: u64,
    /// The per-task money limit.
    pub limit_cost: MicroUsd,
}

/// One role's committed spend on one UTC day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleUsage {
    /// The role.
    pub role: Role,
    /// The day.
    pub day: Day,
    /// Tokens committed.
    pub tokens: u64,
    /// Money committed.
    pub cost: MicroUsd,
    /// Commits.
    pub calls: u64,
    /// Reservations moved to the role's cheaper model that day.
    pub rerouted: u64,
    /// The role's soft limits, if configured.
    pub limits: Option<RoleLimits>,
}

/// An integer in a script's reply (Lua numbers arrive as integers).
fn as_u64(v: &redis::Value) -> Option<u64> {
    match v {
        redis::Value::Int(i) => u64::try_from(*i).ok(),
        redis::Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

/// A string in a script's reply.
fn as_str(v: &redis::Value) -> Option<&str> {
    match v {
        redis::Value::BulkString(b) => std::str::from_utf8(b).ok(),
        redis::Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

/// Where the ledger's Redis connections come from.
#[derive(Clone)]
enum Connections {
    /// One pooled connection per operation in flight.
    Pool(bus::RedisPool),
    /// One multiplexed connection shared by every operation: concurrent requests are written
    /// together and Redis reads them with one system call (see [`Ledger::with_shared_connection`]).
    Shared(redis::aio::ConnectionManager),
}

impl Connections {
    async fn invoke<T: redis::FromRedisValue>(&self, call: &redis::ScriptInvocation<'_>) -> Result<T, LedgerError> {
        Ok(match self {
            Connections::Pool(pool) => call.invoke_async(&mut pool.get().await?).await?,
            Connections::Shared(conn) => call.invoke_async(&mut conn.clone()).await?,
        })
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, LedgerError> {
        Ok(match self {
            Connections::Pool(pool) => cmd.query_async(&mut pool.get().await?).await?,
            Connections::Shared(conn) => cmd.query_async(&mut conn.clone()).await?,
        })
    }
}

fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Input + output tokens, within [`MAX_AMOUNT`].
fn total_tokens(input: u64, output: u64) -> Result<u64, LedgerError> {
    input.checked_add(output).filter(|t| *t <= MAX_AMOUNT).ok_or(LedgerError::TooLarge("the token count"))
}

impl Ledger {
    /// A ledger on the system clock. The configuration is validated here.
    pub fn new(pool: bus::RedisPool, config: LedgerConfig) -> Result<Self, ConfigError> {
        Self::with_clock(pool, config, Arc::new(SystemClock))
    }

    /// A ledger on `clock` (tests: a [`ManualClock`]).
    pub fn with_clock(pool: bus::RedisPool, config: LedgerConfig, clock: Arc<dyn Clock>) -> Result<Self, ConfigError> {
        Self::build(Connections::Pool(pool), config, clock)
    }

    /// A ledger whose operations all share one multiplexed connection, which reconnects
    /// by itself. Under load this is several times cheaper for Redis than a pool: requests
    /// of concurrent callers reach Redis together and are read, and answered, with one
    /// system call each way (see `docs/benchmarks.md`, "Budget ledger").
    pub fn with_shared_connection(
        conn: redis::aio::ConnectionManager,
        config: LedgerConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, ConfigError> {
        Self::build(Connections::Shared(conn), config, clock)
    }

    fn build(redis: Connections, config: LedgerConfig, clock: Arc<dyn Clock>) -> Result<Self, ConfigError> {
        config.validate()?;
        let buckets = Buckets::new(config.reservation_ttl);
        Ok(Self {
            inner: Arc::new(Inner {
                redis,
                config,
                clock,
                buckets,
                reserve: Script::new(RESERVE_LUA),
                commit: Script::new(COMMIT_LUA),
                release: Script::new(RELEASE_LUA),
            }),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &LedgerConfig {
        &self.inner.config
    }

    /// The UTC day by the ledger's clock.
    pub fn today(&self) -> Day {
        Day::from_unix_ms(self.inner.clock.now_ms())
    }

    /// The SHA1 of the reserve script (what `EVALSHA` names).
    pub fn reserve_script_sha(&self) -> &str {
        self.inner.reserve.get_hash()
    }

    /// Holds budget for one call of `model` by `role` for `task_id`, estimated at
    /// `input_tokens` in and at most `output_tokens` out; see the module docs.
    pub async fn reserve(
        &self,
        task_id: Uuid,
        role: Role,
        model: &str,
        input_tokens: u64,
        output_tokens: u64,
    ) -> Result<Reservation, ReserveError> {
        self.reserve_capped(task_id, role, model, input_tokens, output_tokens, None).await
    }

    /// [`Ledger::reserve`], with the task's limits lowered to `cap` where it is lower than
    /// the ledger's own: checked and held by the same script, atomically. The model proxy
    /// passes the capability lease's limits here rather than checking them first and
    /// reserving after (two steps, which concurrent calls of one task could all pass).
    pub async fn reserve_within(
        &self,
        task_id: Uuid,
        role: Role,
        model: &str,
        input_tokens: u64,
        output_tokens: u64,
        cap: TaskCap,
    ) -> Result<Reservation, ReserveError> {
        self.reserve_capped(task_id, role, model, input_tokens, output_tokens, Some(cap)).await
    }

    async fn reserve_capped(
        &self,
        task_id: Uuid,
        role: Role,
        model: &str,
        input_tokens: u64,
        output_tokens: u64,
        cap: Option<TaskCap>,
    ) -> Result<Reservation, ReserveError> {
        let inner = &*self.inner;
        let cfg = &inner.config;
        let task_tokens = cap.map_or(cfg.per_task_tokens, |c| c.tokens.min(cfg.per_task_tokens));
        let task_cost = cap.map_or(cfg.per_task_micro_usd.0, |c| c.cost.0.min(cfg.per_task_micro_usd.0));
        let price = *cfg.prices.get(model).ok_or_else(|| LedgerError::UnknownModel(model.to_owned()))?;
        let tokens = total_tokens(input_tokens, output_tokens)?;
        let cost = price.cost(input_tokens, output_tokens).ok_or(LedgerError::TooLarge("the estimated cost"))?;
        let role_limits = cfg.per_role.get(&role);
        // The cheaper model, unless it is the one asked for anyway.
        let cheaper = role_limits
            .and_then(|l| l.cheaper_model.as_deref())
            .filter(|m| *m != model)
            .map(|m| {
                let price = *cfg.prices.get(m).ok_or_else(|| LedgerError::UnknownModel(m.to_owned()))?;
                let cost =
                    price.cost(input_tokens, output_tokens).ok_or(LedgerError::TooLarge("the estimated cost"))?;
                Ok::<_, LedgerError>((m, price, cost))
            })
            .transpose()?;
        let soft_tokens = role_limits.and_then(|l| l.soft_tokens).map_or(-1, |v| v as i64);
        let soft_cost = role_limits.and_then(|l| l.soft_micro_usd).map_or(-1, |v| v.0 as i64);

        let now = inner.clock.now_ms();
        let day = Day::from_unix_ms(now);
        let id = Uuid::now_v7();
        let target = inner.buckets.target(now);
        let slot = inner.buckets.slot(target);
        let expires_at_ms = inner.buckets.end_ms(target);

        let mut call = inner.reserve.key(keys::day_key(day));
        call.key(keys::task_key(task_id))
            .key(keys::reservation_key(id))
            .arg(now)
            .arg(slot)
            .arg(expires_at_ms)
            .arg(ms(RECORD_RETENTION))
            .arg(ms(USAGE_RETENTION))
            .arg(cfg.daily_tokens)
            .arg(cfg.daily_micro_usd.0)
            .arg(task_tokens)
            .arg(task_cost)
            .arg(soft_tokens)
            .arg(soft_cost)
            .arg(tokens)
            .arg(model)
            .arg(cost.0)
            .arg(if cheaper.is_some() { "1" } else { "" })
            .arg(cheaper.map_or(0, |c| c.2.0))
            .arg(RING)
            .arg(&slot_fields(slot)[..])
            .arg(&[role_field(role, "t"), role_field(role, "m"), role_field(role, "rerouted")][..]);
        let reply: Vec<redis::Value> = inner.redis.invoke(&call).await?;

        let bad = || LedgerError::Reply { script: "reserve", detail: format!("{reply:?}") };
        let int = |i: usize| reply.get(i).and_then(as_u64).ok_or_else(bad);
        match int(0)? {
            1 => {
                let (soft_limit_exceeded, rerouted) = (int(1)? == 1, int(2)? == 1);
                let (model_to_call, price, cost) = match cheaper {
                    Some((m, p, c)) if rerouted => (m.to_owned(), p, c),
                    _ if !rerouted => (model.to_owned(), price, cost),
                    _ => return Err(bad().into()),
                };
                let reservation = Reservation {
                    id,
                    task_id,
                    role,
                    requested_model: model.to_owned(),
                    model: model_to_call,
                    day,
                    input_tokens,
                    output_tokens,
                    tokens,
                    cost,
                    expires_at_ms,
                    soft_limit_exceeded,
                    price,
                    slot,
                };
                if rerouted {
                    tracing::info!(
                        task_id = %task_id, role = %role, requested = model, model = %reservation.model,
                        "Role is over its soft budget; reserved for its cheaper model."
                    );
                }
                Ok(reservation)
            }
            0 => {
                let (committed, held, requested, limit) = (int(2)?, int(3)?, int(4)?, int(5)?);
                let hit = |unit| LimitHit { unit, committed, held, requested, limit };
                let refusal = match int(1)? {
                    1 => Refusal::DailyLimit { day, hit: hit(Unit::Tokens) },
                    2 => Refusal::DailyLimit { day, hit: hit(Unit::MicroUsd) },
                    3 => Refusal::TaskLimit { task_id, hit: hit(Unit::Tokens) },
                    4 => Refusal::TaskLimit { task_id, hit: hit(Unit::MicroUsd) },
                    _ => return Err(bad().into()),
                };
                tracing::debug!(task_id = %task_id, role = %role, model, refusal = %refusal, "Reservation refused.");
                Err(refusal.into())
            }
            _ => Err(bad().into()),
        }
    }

    /// Charges the call's actual figures and frees the rest of its hold. Idempotent: a
    /// second commit of the same reservation charges nothing and returns the first one's
    /// figures with `duplicate` set.
    pub async fn commit(
        &self,
        reservation: &Reservation,
        actual_input_tokens: u64,
        actual_output_tokens: u64,
    ) -> Result<Commit, LedgerError> {
        let inner = &*self.inner;
        let r = reservation;
        let tokens = total_tokens(actual_input_tokens, actual_output_tokens)?;
        let cost = r.price.cost(actual_input_tokens, actual_output_tokens).ok_or(LedgerError::TooLarge("the cost"))?;
        let mut call = inner.commit.key(keys::day_key(r.day));
        call.key(keys::task_key(r.task_id))
            .key(keys::reservation_key(r.id))
            .arg(inner.clock.now_ms())
            .arg(tokens)
            .arg(cost.0)
            .arg(ms(RECORD_RETENTION))
            .arg(ms(USAGE_RETENTION))
            .arg(r.tokens)
            .arg(r.cost.0)
            .arg(r.slot)
            .arg(r.expires_at_ms)
            .arg(&slot_fields(r.slot)[..])
            .arg(&[role_field(r.role, "t"), role_field(r.role, "m"), role_field(r.role, "calls")][..]);
        let reply: Vec<redis::Value> = inner.redis.invoke(&call).await?;
        let bad = || LedgerError::Reply { script: "commit", detail: format!("{reply:?}") };
        let (duplicate, found, tokens, cost, over) = match &reply[..] {
            [kind, found, tokens, cost, over] => (
                as_u64(kind).ok_or_else(bad)? == 2,
                as_str(found).and_then(Found::parse).ok_or_else(bad)?,
                as_u64(tokens).ok_or_else(bad)?,
                MicroUsd(as_u64(cost).ok_or_else(bad)?),
                as_u64(over).ok_or_else(bad)? == 1,
            ),
            _ => return Err(bad()),
        };
        let commit = Commit { tokens, cost, found, exceeded_reservation: over, duplicate };
        if !duplicate {
            if over {
                tracing::warn!(
                    reservation = %r.id, task_id = %r.task_id, model = %r.model,
                    reserved_tokens = r.tokens, reserved_cost = %r.cost, tokens, cost = %cost,
                    "Model call used more than it reserved; charged in full."
                );
            }
            if found != Found::Held {
                tracing::warn!(
                    reservation = %r.id, task_id = %r.task_id, found = ?found,
                    "Committed a reservation that no longer held budget; charged all the same."
                );
            }
        }
        Ok(commit)
    }

    /// Frees a reservation's hold without charging anything (the call did not happen).
    /// Idempotent; releasing a committed reservation does nothing.
    pub async fn release(&self, reservation: &Reservation) -> Result<Release, LedgerError> {
        let inner = &*self.inner;
        let r = reservation;
        let mut call = inner.release.key(keys::day_key(r.day));
        call.key(keys::task_key(r.task_id))
            .key(keys::reservation_key(r.id))
            .arg(inner.clock.now_ms())
            .arg(ms(RECORD_RETENTION))
            .arg(r.slot)
            .arg(r.expires_at_ms)
            .arg(&slot_fields(r.slot)[..]);
        let reply: Vec<String> = inner.redis.invoke(&call).await?;
        match reply.first().map(String::as_str) {
            Some("held") => Ok(Release::Released),
            Some("lapsed") => Ok(Release::Lapsed),
            Some("committed") => Ok(Release::AlreadyCommitted),
            Some("released") => Ok(Release::AlreadyReleased),
            Some("unknown") => Ok(Release::Unknown),
            _ => Err(LedgerError::Reply { script: "release", detail: format!("{reply:?}") }),
        }
    }

    /// Reads `counters` and the held slots of a day's or a task's hash in one `HMGET`:
    /// consistent with itself, good enough for reports.
    async fn read(&self, key: String, counters: &[&str]) -> Result<(Vec<u64>, u64, u64), LedgerError> {
        let inner = &*self.inner;
        let fields = keys::report_fields(counters);
        let values: Vec<Option<u64>> = inner.redis.query(redis::cmd("HMGET").arg(key).arg(&fields)).await?;
        if values.len() != fields.len() {
            return Err(LedgerError::Reply {
                script: "HMGET",
                detail: format!("{} values for {fields:?}", values.len()),
            });
        }
        let (counters, slots) = values.split_at(counters.len());
        let (held_tokens, held_cost) = keys::held(slots, inner.clock.now_ms());
        Ok((counters.iter().map(|v| v.unwrap_or(0)).collect(), held_tokens, held_cost))
    }

    /// The fleet's spend on `day`.
    pub async fn usage(&self, day: Day) -> Result<DailyUsage, LedgerError> {
        let counters = ["t", "m", "calls", "refusals", "late", "over"];
        let (c, held_tokens, held_cost) = self.read(keys::day_key(day), &counters).await?;
        let cfg = &self.inner.config;
        Ok(DailyUsage {
            day,
            usage: Usage {
                tokens: c[0],
                cost: MicroUsd(c[1]),
                calls: c[2],
                held_tokens,
                held_cost: MicroUsd(held_cost),
            },
            refusals: c[3],
            late_commits: c[4],
            over_commits: c[5],
            limit_tokens: cfg.daily_tokens,
            limit_cost: cfg.daily_micro_usd,
        })
    }

    /// One task's spend over its life.
    pub async fn task_usage(&self, task_id: Uuid) -> Result<TaskUsage, LedgerError> {
        let (c, held_tokens, held_cost) = self.read(keys::task_key(task_id), &["t", "m", "calls"]).await?;
        let cfg = &self.inner.config;
        Ok(TaskUsage {
            task_id,
            usage: Usage {
                tokens: c[0],
                cost: MicroUsd(c[1]),
                calls: c[2],
                held_tokens,
                held_cost: MicroUsd(held_cost),
            },
            limit_tokens: cfg.per_task_tokens,
            limit_cost: cfg.per_task_micro_usd,
        })
    }

    /// One role's committed spend on `day` (held amounts are not tracked per role).
    pub async fn role_usage(&self, role: Role, day: Day) -> Result<RoleUsage, LedgerError> {
        let fields = ["t", "m", "calls", "rerouted"].map(|f| role_field(role, f));
        let c: Vec<Option<u64>> =
            self.inner.redis.query(redis::cmd("HMGET").arg(keys::day_key(day)).arg(&fields[..])).await?;
        let c: Vec<u64> = c.into_iter().map(|v| v.unwrap_or(0)).collect();
        let [tokens, cost, calls, rerouted] = c[..] else {
            return Err(LedgerError::Reply { script: "HMGET", detail: format!("{} values for {fields:?}", c.len()) });
        };
        Ok(RoleUsage {
            role,
            day,
            tokens,
            cost: MicroUsd(cost),
            calls,
            rerouted,
            limits: self.inner.config.per_role.get(&role).cloned(),
        })
    }
}
