//! `fleetctl status`: the kill switch, the day's budget, the streams' backlog and the live
//! workers, in one read-only look.
//!
//! Everything is read with the operator's read-only Redis user: `HGETALL fleet:killswitch`;
//! the ledger's day hash (`HMGET`, through [`budget::ledger::Ledger::usage`] and
//! [`budget::ledger::Ledger::role_usage`]) and the budget manager's usage counters;
//! `XLEN` and `XINFO GROUPS` of every fleet stream; `XREVRANGE fleet:heartbeats` over the
//! last `--window` seconds, each entry verified like `fleetctl tail` does (unverified
//! heartbeats are counted, never shown as workers).
//!
//! [`gather`] reads a [`Status`]; [`render_text`] and [`Status::to_json`] print it, so tests
//! drive them directly.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use budget::ledger::{Day, Ledger, LedgerConfig, MicroUsd};
use bus::Conn;
use bus::control::KillState;
use bus::reply;
use clap::Args;
use envelope::{Keyset, Payload, Role, StreamName, Verifier, VerifierConfig, VerifyContext, streams};
use serde_json::{Value, json};

use crate::exit::UsageError;
use crate::{files, keys};

/// Arguments of `status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// One JSON object instead of text.
    #[arg(long)]
    pub json: bool,

    /// Where the figures come from.
    #[command(flatten)]
    pub source: Source,
}

/// Where `status` and `top` read the fleet: Redis, verified with the operator keyset, with
/// the budget's limits.
#[derive(Debug, Args)]
pub struct Source {
    /// The operator keyset (`fleetctl keys derive --process operator`): heartbeats are
    /// verified with it before they count as live workers.
    #[arg(long, value_name = "FILE")]
    pub keyset: PathBuf,

    /// The permission table the fleet's verifiers use.
    #[arg(long, value_name = "FILE", default_value = "config/permissions.toml")]
    pub permissions: PathBuf,

    /// The budget manager's configuration file: its `[ledger]` section gives the limits
    /// (without it, the seed defaults: 500,000 tokens and $10.00 a day).
    #[arg(long, value_name = "FILE")]
    pub budget_config: Option<PathBuf>,

    /// A worker is live if it sent a heartbeat within this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub window: u64,

    /// Redis URL, `redis://[USER:PASSWORD@]HOST[:PORT]` (the read-only `operator` user is
    /// enough) [default: redis://127.0.0.1:6379], or FLEET_REDIS_URL_FILE, a file holding it.
    /// Never printed.
    #[arg(
        long,
        value_name = "URL",
        env = "FLEET_REDIS_URL",
        hide_env_values = true,
        value_parser = |v: &str| Ok::<_, std::convert::Infallible>(secrecy::SecretString::from(v))
    )]
    pub redis: Option<secrecy::SecretString>,

    /// PEM file of the CA that signs the Redis server's certificate, for rediss:// URLs
    /// (default: the system's roots).
    #[arg(long, value_name = "FILE", env = "FLEET_REDIS_CA_FILE")]
    pub redis_ca: Option<PathBuf>,
}

/// A [`Source`], read and checked: the verifier, the ledger's limits, the Redis endpoint.
#[derive(Debug)]
pub struct Opened {
    /// Verifies heartbeats.
    pub verifier: Verifier,
    /// The budget's limits.
    pub ledger: LedgerConfig,
    /// Redis.
    pub redis: bus::RedisEndpoint,
    /// The live-worker window.
    pub window: Duration,
}

impl Source {
    /// Reads the keyset, permissions and budget configuration; usage errors name the file.
    pub fn open(&self) -> anyhow::Result<Opened> {
        let text = files::read_input(&self.keyset, "keyset file", KEYSET_HINT)?;
        let keyset = Keyset::parse(&text).map_err(|e| {
            UsageError::new(format!("invalid keyset file '{}': {e}; {KEYSET_HINT}", self.keyset.display()))
        })?;
        let table = keys::load_permissions(&self.permissions)?;
        let verifier = Verifier::new(keyset.into_keyring(), table, VerifierConfig::default());
        let ledger = match &self.budget_config {
            None => LedgerConfig::default(),
            Some(path) => {
                let text = files::read_input(path, "budget configuration file", "pass the budget's TOML file")?;
                let doc: toml::Table = toml::from_str(&text)
                    .map_err(|e| UsageError::new(format!("invalid budget configuration '{}': {e}", path.display())))?;
                let section = doc.get("ledger").cloned().unwrap_or(toml::Value::Table(toml::Table::new()));
                let cfg: LedgerConfig = section
                    .try_into()
                    .map_err(|e| UsageError::new(format!("invalid [ledger] section in '{}': {e}", path.display())))?;
                cfg.validate().map_err(|e| UsageError::new(format!("'{}': {e}", path.display())))?;
                cfg
            }
        };
        let redis = bus::RedisEndpoint::new(crate::files::redis_url(self.redis.clone())?, self.redis_ca.as_deref())
            .map_err(|e| UsageError::new(format!("--redis / --redis-ca: {e}")))?;
        Ok(Opened { verifier, ledger, redis, window: Duration::from_secs(self.window) })
    }
}

/// One consumer group of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    /// The group's name.
    pub name: String,
    /// Delivered, not acknowledged.
    pub pending: u64,
    /// Not yet delivered (`None`: Redis cannot tell).
    pub lag: Option<u64>,
    /// Consumers in the group.
    pub consumers: u64,
}

/// One stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    /// Its name.
    pub name: String,
    /// `XLEN`.
    pub length: u64,
    /// Its consumer groups.
    pub groups: Vec<GroupInfo>,
}

/// One live worker, from its newest heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Worker {
    /// Its role.
    pub role: Role,
    /// Its instance name.
    pub instance: String,
    /// Whether it runs a task.
    pub busy: bool,
    /// The task, if any.
    pub task: Option<uuid::Uuid>,
    /// When the heartbeat was issued, Unix ms.
    pub last_seen_ms: u64,
}

/// One role's spend today.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleSpend {
    /// The role.
    pub role: Role,
    /// Tokens committed (ledger), or reported (usage counters) if higher.
    pub tokens: u64,
    /// Money likewise.
    pub cost: MicroUsd,
    /// Model calls.
    pub calls: u64,
    /// Soft token limit, if any.
    pub soft_tokens: Option<u64>,
    /// Soft money limit, if any.
    pub soft_cost: Option<MicroUsd>,
}

/// Everything `status` shows.
#[derive(Debug, Clone)]
pub struct Status {
    /// When it was read, Unix ms.
    pub now_ms: u64,
    /// The kill switch's record.
    pub kill: KillState,
    /// The UTC day.
    pub day: Day,
    /// Committed tokens today, and held by live reservations.
    pub tokens: (u64, u64),
    /// Committed money today, and held.
    pub cost: (MicroUsd, MicroUsd),
    /// Daily limits.
    pub limit_tokens: u64,
    /// Daily limits.
    pub limit_cost: MicroUsd,
    /// Consecutive failed steps (the budget manager's counter).
    pub failures: u64,
    /// Per role.
    pub roles: Vec<RoleSpend>,
    /// Per stream.
    pub streams: Vec<StreamInfo>,
    /// Live workers, by role and instance.
    pub workers: Vec<Worker>,
    /// Heartbeats in the window that failed verification.
    pub unverified_heartbeats: u64,
    /// The window, seconds.
    pub window_secs: u64,
}

/// The streams `status` looks at.
pub fn fleet_streams() -> Vec<String> {
    let mut s: Vec<String> = Role::WORKERS.iter().map(|r| StreamName::tasks(*r).as_str().to_owned()).collect();
    s.extend(
        [
            streams::RESULTS,
            streams::HEARTBEATS,
            streams::QUESTIONS,
            streams::TOOL_REQUESTS,
            streams::USAGE,
            streams::OUTCOMES,
            budget::alert::names::STREAM,
        ]
        .map(str::to_owned),
    );
    s.extend(Role::ALL.iter().map(|r| StreamName::control(*r).as_str().to_owned()));
    s.extend([streams::REJECTED, streams::DLQ].map(str::to_owned));
    s
}

/// Reads one stream's length and groups; a missing stream is empty.
async fn stream_info(c: &mut Conn, name: &str) -> anyhow::Result<StreamInfo> {
    let length: u64 = redis::cmd("XLEN").arg(name).query_async(c).await.context("XLEN")?;
    let groups = match redis::cmd("XINFO").arg("GROUPS").arg(name).query_async::<redis::Value>(c).await {
        Ok(v) => reply::info_maps("XINFO GROUPS", &v)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .iter()
            .map(|g| GroupInfo {
                name: reply::info_get(g, "name").and_then(reply::text).unwrap_or_default(),
                pending: reply::info_get(g, "pending").and_then(reply::int).unwrap_or(0).max(0) as u64,
                lag: reply::info_get(g, "lag").and_then(reply::int).map(|l| l.max(0) as u64),
                consumers: reply::info_get(g, "consumers").and_then(reply::int).unwrap_or(0).max(0) as u64,
            })
            .collect(),
        Err(e) if e.to_string().contains("no such key") => Vec::new(),
        Err(e) => return Err(e).context(format!("XINFO GROUPS {name}")),
    };
    Ok(StreamInfo { name: name.to_owned(), length, groups })
}

/// Live workers from the heartbeats of the last `window`, verified with `verifier`.
async fn workers(
    c: &mut Conn,
    verifier: &Verifier,
    now_ms: u64,
    window: Duration,
) -> anyhow::Result<(Vec<Worker>, u64)> {
    let since = now_ms.saturating_sub(window.as_millis() as u64);
    let v: redis::Value = redis::cmd("XREVRANGE")
        .arg(streams::HEARTBEATS)
        .arg("+")
        .arg(format!("{since}-0"))
        .arg("COUNT")
        .arg(100_000)
        .query_async(c)
        .await
        .context("XREVRANGE fleet:heartbeats")?;
    let mut latest: BTreeMap<(Role, String), Worker> = BTreeMap::new();
    let mut unverified = 0;
    let ctx = VerifyContext { now_ms, kill_epoch: 0 };
    for e in reply::entries("XREVRANGE", &v).map_err(|e| anyhow::anyhow!("{e}"))? {
        let Some(wire) = e.field("env") else {
            unverified += 1;
            continue;
        };
        let Ok(checked) = verifier.check(streams::HEARTBEATS, wire, ctx) else {
            unverified += 1;
            continue;
        };
        let env = checked.envelope();
        let Payload::Heartbeat(hb) = &env.payload else { continue };
        let key = (env.from.role, env.from.instance.as_str().to_owned());
        // Newest first: the first one seen per sender is its latest.
        latest.entry(key).or_insert_with(|| Worker {
            role: env.from.role,
            instance: env.from.instance.as_str().to_owned(),
            busy: hb.busy,
            task: env.task_id,
            last_seen_ms: env.issued_at_ms,
        });
    }
    Ok((latest.into_values().collect(), unverified))
}

/// Reads everything.
pub async fn gather(
    redis_url: impl Into<bus::RedisEndpoint>,
    verifier: &Verifier,
    ledger: LedgerConfig,
    window: Duration,
) -> anyhow::Result<Status> {
    let pool = bus::pool(redis_url, 2, Duration::from_secs(1)).context("Invalid Redis URL")?;
    gather_on(&pool, verifier, ledger, window).await
}

/// [`gather`] on an open pool (`top` reads again every few seconds).
pub async fn gather_on(
    pool: &bus::RedisPool,
    verifier: &Verifier,
    ledger: LedgerConfig,
    window: Duration,
) -> anyhow::Result<Status> {
    let mut c = pool.dedicated().await.context("Failed to connect to Redis")?;
    let now_ms = bus::now_ms();
    let kill = bus::control::read_state(&mut c).await.context("Failed to read the kill switch (fleet:killswitch)")?;
    let ledger = Ledger::new(pool.clone(), ledger).context("Invalid [ledger] section")?;
    let day = Day::from_unix_ms(now_ms);
    let daily = ledger.usage(day).await.context("Failed to read the ledger's day")?;
    let counters: BTreeMap<String, u64> = redis::cmd("HGETALL")
        .arg(budget::service::usage_key(day))
        .query_async(&mut c)
        .await
        .context("Failed to read the budget's usage counters")?;
    let failures: Option<u64> =
        redis::cmd("GET").arg(budget::killswitch::FAILURES_KEY).query_async(&mut c).await.context("GET failures")?;
    let mut roles = Vec::new();
    for role in Role::WORKERS {
        let r = ledger.role_usage(*role, day).await.context("Failed to read a role's spend")?;
        let counter = |f: &str| counters.get(&format!("role:{role}:{f}")).copied().unwrap_or(0);
        roles.push(RoleSpend {
            role: *role,
            tokens: r.tokens.max(counter("t")),
            cost: MicroUsd(r.cost.0.max(counter("m"))),
            calls: r.calls.max(counter("calls")),
            soft_tokens: r.limits.as_ref().and_then(|l| l.soft_tokens),
            soft_cost: r.limits.as_ref().and_then(|l| l.soft_micro_usd),
        });
    }
    let mut infos = Vec::new();
    for name in fleet_streams() {
        infos.push(stream_info(&mut c, &name).await?);
    }
    let (workers, unverified_heartbeats) = workers(&mut c, verifier, now_ms, window).await?;
    Ok(Status {
        now_ms,
        kill,
        day,
        tokens: (daily.usage.tokens.max(counters.get("t").copied().unwrap_or(0)), daily.usage.held_tokens),
        cost: (MicroUsd(daily.usage.cost.0.max(counters.get("m").copied().unwrap_or(0))), daily.usage.held_cost),
        limit_tokens: daily.limit_tokens,
        limit_cost: daily.limit_cost,
        failures: failures.unwrap_or(0),
        roles,
        streams: infos,
        workers,
        unverified_heartbeats,
        window_secs: window.as_secs(),
    })
}

fn percent(used: u64, limit: u64) -> String {
    if limit == 0 { "-".into() } else { format!("{:.1}%", used as f64 * 100.0 / limit as f64) }
}

fn time(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| "-".into())
}

/// Control characters out of text that came from the fleet.
fn clean(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { '?' } else { c }).take(200).collect()
}

/// The text report: aligned columns, one section per subject.
pub fn render_text(s: &Status) -> String {
    let mut out = String::new();
    let k = &s.kill;
    if k.engaged {
        out += &format!(
            "KILL SWITCH  ENGAGED  epoch {}  by {}  at {}\n             reason: {}\n",
            k.epoch,
            clean(k.by.as_deref().unwrap_or("?")),
            k.at_ms.map_or("-".into(), time),
            clean(k.reason.as_deref().unwrap_or("")),
        );
    } else {
        out += &format!("KILL SWITCH  released  epoch {}\n", k.epoch);
    }
    out += &format!("FAILURES     {} consecutive\n\n", s.failures);
    out += &format!("BUDGET {} (UTC)\n", s.day);
    out += &format!("  {:<8} {:>14} {:>14} {:>12} {:>8}\n", "", "USED", "LIMIT", "HELD", "USED%");
    out += &format!(
        "  {:<8} {:>14} {:>14} {:>12} {:>8}\n",
        "tokens",
        s.tokens.0,
        s.limit_tokens,
        s.tokens.1,
        percent(s.tokens.0, s.limit_tokens)
    );
    out += &format!(
        "  {:<8} {:>14} {:>14} {:>12} {:>8}\n\n",
        "money",
        s.cost.0.to_string(),
        s.limit_cost.to_string(),
        s.cost.1.to_string(),
        percent(s.cost.0.0, s.limit_cost.0)
    );
    out += &format!(
        "  {:<9} {:>12} {:>14} {:>7} {:>12} {:>14}\n",
        "ROLE", "TOKENS", "MONEY", "CALLS", "SOFT TOKENS", "SOFT MONEY"
    );
    for r in &s.roles {
        out += &format!(
            "  {:<9} {:>12} {:>14} {:>7} {:>12} {:>14}\n",
            r.role.as_str(),
            r.tokens,
            r.cost.to_string(),
            r.calls,
            r.soft_tokens.map_or("-".into(), |v| v.to_string()),
            r.soft_cost.map_or("-".into(), |v| v.to_string())
        );
    }
    out += &format!(
        "\nSTREAMS\n  {:<28} {:>9}  {:<14} {:>8} {:>8} {:>9}\n",
        "STREAM", "LENGTH", "GROUP", "PENDING", "LAG", "CONSUMERS"
    );
    for st in &s.streams {
        if st.groups.is_empty() {
            out += &format!("  {:<28} {:>9}  {:<14} {:>8} {:>8} {:>9}\n", st.name, st.length, "-", "-", "-", "-");
        }
        for (i, g) in st.groups.iter().enumerate() {
            let (name, len) = if i == 0 { (st.name.as_str(), st.length.to_string()) } else { ("", String::new()) };
            out += &format!(
                "  {:<28} {:>9}  {:<14} {:>8} {:>8} {:>9}\n",
                name,
                len,
                clean(&g.name),
                g.pending,
                g.lag.map_or("?".into(), |l| l.to_string()),
                g.consumers
            );
        }
    }
    out += &format!("\nWORKERS (heartbeats in the last {} s)\n", s.window_secs);
    if s.workers.is_empty() {
        out += "  none\n";
    } else {
        out += &format!("  {:<9} {:<24} {:<5} {:<36} {:>9}\n", "ROLE", "INSTANCE", "BUSY", "TASK", "SEEN AGO");
        for w in &s.workers {
            out += &format!(
                "  {:<9} {:<24} {:<5} {:<36} {:>8}s\n",
                w.role.as_str(),
                clean(&w.instance),
                if w.busy { "yes" } else { "no" },
                w.task.map_or("-".into(), |t| t.to_string()),
                s.now_ms.saturating_sub(w.last_seen_ms) / 1000
            );
        }
    }
    if s.unverified_heartbeats > 0 {
        out += &format!("  ({} heartbeats failed verification and are not shown)\n", s.unverified_heartbeats);
    }
    out
}

impl Status {
    /// The JSON report.
    pub fn to_json(&self) -> Value {
        json!({
            "at_ms": self.now_ms,
            "kill_switch": {"engaged": self.kill.engaged, "epoch": self.kill.epoch, "by": self.kill.by,
                            "reason": self.kill.reason, "at_ms": self.kill.at_ms},
            "consecutive_failures": self.failures,
            "budget": {
                "day": self.day.to_string(),
                "tokens": {"used": self.tokens.0, "held": self.tokens.1, "limit": self.limit_tokens},
                "micro_usd": {"used": self.cost.0.0, "held": self.cost.1.0, "limit": self.limit_cost.0},
                "roles": self.roles.iter().map(|r| json!({"role": r.role.as_str(), "tokens": r.tokens,
                    "micro_usd": r.cost.0, "calls": r.calls, "soft_tokens": r.soft_tokens,
                    "soft_micro_usd": r.soft_cost.map(|c| c.0)})).collect::<Vec<_>>(),
            },
            "streams": self.streams.iter().map(|s| json!({"stream": s.name, "length": s.length,
                "groups": s.groups.iter().map(|g| json!({"group": g.name, "pending": g.pending, "lag": g.lag,
                    "consumers": g.consumers})).collect::<Vec<_>>()})).collect::<Vec<_>>(),
            "workers": self.workers.iter().map(|w| json!({"role": w.role.as_str(), "instance": w.instance,
                "busy": w.busy, "task_id": w.task, "last_seen_ms": w.last_seen_ms})).collect::<Vec<_>>(),
            "unverified_heartbeats": self.unverified_heartbeats,
            "window_secs": self.window_secs,
        })
    }
}

const KEYSET_HINT: &str = "derive the operator keyset with `fleetctl keys derive --master FILE --process operator --out operator.keyset.toml`";

/// Runs `fleetctl status`.
pub fn command(args: StatusArgs) -> anyhow::Result<()> {
    let opened = args.source.open()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("Failed to start the async runtime")?;
    let status = runtime.block_on(gather(opened.redis, &opened.verifier, opened.ledger, opened.window))?;
    if args.json {
        println!("{}", status.to_json());
    } else {
        print!("{}", render_text(&status));
    }
    Ok(())
}
