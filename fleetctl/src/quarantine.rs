//! `fleetctl quarantine ROLE[/INSTANCE]`: cut a worker that may be compromised off the
//! fleet in seconds (docs/incident-response.md, step 4).
//!
//! 1. Its Redis user loses every command and selector and is switched off (`ACL SETUSER …
//!    off clearselectors -@all`). Redis applies a user's new rules to the connections
//!    already open, so its next `XADD` is `NOPERM`, and it cannot log in again.
//! 2. Its pending task entries go back to its group for others: claimed (`XCLAIM … JUSTID`,
//!    which counts no delivery) by a placeholder consumer with an idle time far past any
//!    `claim_idle`, so a healthy worker's next `XAUTOCLAIM` takes them; its consumer is
//!    then deleted.
//! 3. With `--master` and `--keysets`, every edge is rotated (stage, promote, retire, with
//!    the waits of `fleetctl keys rotate`): what it signed with its old key is then refused
//!    as `retired_kid`; the other processes reload their keysets live.
//! 4. A critical `quarantine` incident is opened through the API: every automatic merge is
//!    frozen and the alert channels are told.
//!
//! An instance can be cut off alone only when it connects as a Redis user of its own
//! (`<role>.<instance>`, from `[instances]` in the ACL secrets file); otherwise its role's
//! shared user is the smallest thing Redis can refuse, and the command says so.

use std::io::{self, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::Args;
use envelope::{Instance, Role, StreamName};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::client::{ApiArgs, Client};
use crate::exit::UsageError;
use crate::rotation;

/// The consumer that holds a quarantined worker's entries until a healthy worker claims
/// them.
pub const RETURNED_CONSUMER: &str = "quarantine-returned";

/// The idle time given to returned entries: longer than any `claim_idle`, so the next
/// `XAUTOCLAIM` of any healthy worker takes them.
const RETURNED_IDLE_MS: u64 = 30 * 24 * 3600 * 1000;

/// Most entries returned per `XPENDING` round.
const PAGE: usize = 500;

/// Arguments of `quarantine`.
#[derive(Debug, Args)]
pub struct QuarantineArgs {
    /// What to cut off: a worker role (`dev`: every instance), or one instance
    /// (`dev/dev-2`: only if it connects as a Redis user of its own, `dev.dev-2`).
    #[arg(value_name = "ROLE[/INSTANCE]")]
    pub target: String,

    /// Why, for the incident and the audit trail (required).
    #[arg(long, value_name = "TEXT")]
    pub reason: String,

    /// Redis as the `admin` user: `redis://admin:PASSWORD@HOST[:PORT]` (or
    /// FLEET_REDIS_URL_FILE, a file holding it). Never printed.
    #[arg(
        long,
        value_name = "URL",
        env = "FLEET_REDIS_URL",
        hide_env_values = true,
        value_parser = |v: &str| Ok::<_, std::convert::Infallible>(secrecy::SecretString::from(v))
    )]
    pub redis: Option<secrecy::SecretString>,

    /// PEM file of the CA that signs the Redis server's certificate, for rediss:// URLs.
    #[arg(long, value_name = "FILE", env = "FLEET_REDIS_CA_FILE")]
    pub redis_ca: Option<PathBuf>,

    /// The master file: with --keysets, rotate every edge so the quarantined worker's key
    /// generation is retired (as `fleetctl keys rotate`).
    #[arg(long, value_name = "FILE", requires = "keysets")]
    pub master: Option<PathBuf>,

    /// Where the processes' `<process>.keyset.toml` files are (with --master).
    #[arg(long, value_name = "DIR", requires = "master")]
    pub keysets: Option<PathBuf>,

    /// The permission file the keysets are derived with.
    #[arg(long, value_name = "FILE", default_value = "config/permissions.toml")]
    pub permissions: PathBuf,

    /// Between writing the keysets and the next rotation step (as `keys rotate --wait`).
    #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = rotation::parse_duration)]
    pub wait: Duration,

    /// The longest ttl of envelopes in flight, waited before retiring (as `keys rotate
    /// --max-ttl`); in an incident, what is really in flight.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = rotation::parse_duration)]
    pub max_ttl: Duration,

    /// Run after each write of the keysets (as `keys rotate --deploy-hook`).
    #[arg(long, value_name = "CMD")]
    pub deploy_hook: Option<String>,

    #[command(flatten)]
    pub api: ApiArgs,
}

/// Which Redis user to cut off, and whose entries to return.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The worker role.
    pub role: Role,
    /// One instance, or every instance of the role.
    pub instance: Option<Instance>,
}

impl Target {
    /// `dev` or `dev/dev-2`.
    pub fn parse(text: &str) -> Result<Self, UsageError> {
        let (role, instance) = match text.split_once('/') {
            Some((r, i)) => (r, Some(i)),
            None => (text, None),
        };
        let role: Role = role.parse().map_err(|_| {
            UsageError::new(format!(
                "{:?} is not a worker role; quarantine dev, qa, review or refactor, or one instance as ROLE/INSTANCE",
                role.chars().take(40).collect::<String>()
            ))
        })?;
        if !role.is_worker() {
            return Err(UsageError::new(format!(
                "{role} is not a worker: only dev, qa, review and refactor can be quarantined; for the {role}, \
                 pull the kill switch (`fleetctl kill`) and replace it"
            )));
        }
        let instance = instance
            .map(|i| {
                Instance::parse(i).map_err(|_| {
                    UsageError::new(format!(
                        "{:?} is not an instance name (letters, digits, '.', '_', '-', at most 64)",
                        i.chars().take(70).collect::<String>()
                    ))
                })
            })
            .transpose()?;
        Ok(Self { role, instance })
    }

    /// The Redis user it connects as.
    pub fn user(&self) -> String {
        match &self.instance {
            Some(i) => crate::acl::instance_user(self.role, i),
            None => self.role.as_str().to_owned(),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.instance {
            Some(i) => write!(f, "{}/{i}", self.role),
            None => write!(f, "{} (every instance)", self.role),
        }
    }
}

/// `fleetctl quarantine`.
pub fn run(args: QuarantineArgs) -> anyhow::Result<()> {
    let target = Target::parse(&args.target)?;
    let reason = args.reason.trim();
    if reason.is_empty() {
        return Err(UsageError::new("--reason is empty; say why, for the incident and the audit trail").into());
    }
    let redis = bus::RedisEndpoint::new(crate::files::redis_url(args.redis.clone())?, args.redis_ca.as_deref())
        .map_err(|e| UsageError::new(format!("--redis / --redis-ca: {e}")))?;
    let client = Client::new(&args.api)?;
    let rt =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("Failed to start the runtime")?;
    let mut out = io::stdout().lock();
    let cut = rt.block_on(cut_off(redis, &target))?;
    writeln!(out, "redis user {} disabled: its open connections now get NOPERM and it cannot log in again", cut.user)
        .context("Failed to write to stdout")?;
    writeln!(
        out,
        "returned {} pending task entr{} of {} to group {} for healthy workers",
        cut.returned,
        if cut.returned == 1 { "y" } else { "ies" },
        target,
        target.role
    )
    .context("Failed to write to stdout")?;
    if !cut.persisted {
        writeln!(
            out,
            "note: Redis has no ACL file to save to; remove {} from the ACL secrets file and regenerate the ACL file \
             (`fleetctl acl generate`), or a restart enables it again",
            cut.user
        )
        .context("Failed to write to stdout")?;
    }
    let incident = rt.block_on(open_incident(&client, &target, reason, &cut));
    let incident_id = match &incident {
        Ok(id) => {
            writeln!(out, "opened incident {id}: every automatic merge is frozen; `fleetctl incident show {id}`")
                .context("Failed to write to stdout")?;
            Some(id.clone())
        }
        Err(e) => {
            crate::keys::warn(&format!("could not open the incident (the quarantine stands): {e:#}"));
            None
        }
    };
    let keys = match (&args.master, &args.keysets) {
        (Some(master), Some(keysets)) => {
            let plan = rotation::Plan {
                master: master.clone(),
                permissions: args.permissions.clone(),
                keysets: keysets.clone(),
                processes: rotation::PROCESSES
                    .iter()
                    .map(|p| envelope::Process::parse(p).expect("fleet process names parse"))
                    .collect(),
                wait: args.wait,
                max_ttl: args.max_ttl,
                skew: rotation::SKEW,
                hook: args.deploy_hook.clone(),
            };
            let stop = CancellationToken::new();
            Some(rt.block_on(async {
                rotation::stop_on_signals(stop.clone())?;
                rotation::run_cycle(&plan, &mut out, &stop).await
            })?)
        }
        _ => {
            writeln!(
                out,
                "keys not rotated: what it signed stays valid until you run `fleetctl keys rotate --master … --keysets …`"
            )
            .context("Failed to write to stdout")?;
            None
        }
    };
    if let Some(rotation::Ended::Interrupted(phase)) = keys {
        return Err(anyhow!(
            "quarantined, but the key rotation was interrupted ({phase:?}); run `fleetctl keys rotate` with the same \
             --master and --keysets to finish it"
        ));
    }
    if incident_id.is_none() {
        return Err(anyhow!(
            "quarantined, but no incident was opened; open one: fleetctl incident open --severity critical --title \
             'Quarantined {target}'"
        ));
    }
    Ok(())
}

/// What [`cut_off`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutOff {
    /// The Redis user disabled.
    pub user: String,
    /// Pending task entries handed back to the group.
    pub returned: usize,
    /// Whether `ACL SAVE` wrote the change to Redis's ACL file.
    pub persisted: bool,
}

/// Steps 1 and 2 (module docs), as the admin user on `redis`.
pub async fn cut_off(redis: bus::RedisEndpoint, target: &Target) -> anyhow::Result<CutOff> {
    let pool = bus::pool(redis, 2, Duration::from_secs(5)).context("Invalid Redis URL")?;
    let mut c = pool.get().await.context("Cannot connect to Redis (the admin user is needed)")?;
    let user = target.user();
    let rules: redis::Value = redis::cmd("ACL")
        .arg("GETUSER")
        .arg(&user)
        .query_async(&mut c)
        .await
        .context("ACL GETUSER failed: connect as the admin user")?;
    if matches!(rules, redis::Value::Nil) {
        return Err(match &target.instance {
            Some(i) => UsageError::new(format!(
                "{}/{i} has no Redis user of its own ({user}): the {role} instances share user {role}. Quarantine \
                 the whole role (`fleetctl quarantine {role}`), or give instances users of their own (`[instances]` \
                 in the ACL secrets file, docs/operations.md)",
                target.role,
                role = target.role
            ))
            .into(),
            None => anyhow!("Redis has no user {user}: is this the fleet's Redis, with its ACL file loaded?"),
        });
    }
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&user)
        .arg("off")
        .arg("clearselectors")
        .arg("-@all")
        .arg("resetkeys")
        .arg("resetchannels")
        .query_async::<()>(&mut c)
        .await
        .with_context(|| format!("ACL SETUSER {user} failed"))?;
    let persisted = redis::cmd("ACL").arg("SAVE").query_async::<()>(&mut c).await.is_ok();

    let stream = StreamName::tasks(target.role);
    let group = target.role.as_str();
    let consumers: Vec<String> = match &target.instance {
        Some(i) => vec![i.as_str().to_owned()],
        None => {
            let groups: redis::Value = redis::cmd("XINFO")
                .arg("CONSUMERS")
                .arg(stream.as_str())
                .arg(group)
                .query_async(&mut c)
                .await
                .unwrap_or(redis::Value::Nil);
            consumer_names(&groups)
        }
    };
    let mut returned = 0;
    for consumer in consumers.iter().filter(|name| *name != RETURNED_CONSUMER) {
        loop {
            let pending: redis::Value = match redis::cmd("XPENDING")
                .arg(stream.as_str())
                .arg(group)
                .arg("-")
                .arg("+")
                .arg(PAGE)
                .arg(consumer)
                .query_async(&mut c)
                .await
            {
                Ok(v) => v,
                // No group yet: nothing was ever delivered.
                Err(e) if e.code() == Some("NOGROUP") => break,
                Err(e) => return Err(e).context("XPENDING failed"),
            };
            let ids = pending_ids(&pending);
            if ids.is_empty() {
                break;
            }
            let claimed: Vec<String> = redis::cmd("XCLAIM")
                .arg(stream.as_str())
                .arg(group)
                .arg(RETURNED_CONSUMER)
                .arg(0)
                .arg(&ids)
                .arg("IDLE")
                .arg(RETURNED_IDLE_MS)
                .arg("JUSTID")
                .query_async(&mut c)
                .await
                .context("XCLAIM failed")?;
            returned += claimed.len();
            if ids.len() < PAGE {
                break;
            }
        }
        let _: redis::RedisResult<i64> = redis::cmd("XGROUP")
            .arg("DELCONSUMER")
            .arg(stream.as_str())
            .arg(group)
            .arg(consumer)
            .query_async(&mut c)
            .await;
    }
    Ok(CutOff { user, returned, persisted })
}

/// The ids in an `XPENDING … count` answer.
fn pending_ids(v: &redis::Value) -> Vec<String> {
    let redis::Value::Array(rows) = v else { return Vec::new() };
    rows.iter()
        .filter_map(|row| match row {
            redis::Value::Array(fields) => match fields.first() {
                Some(redis::Value::BulkString(id)) => String::from_utf8(id.clone()).ok(),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// The `name`s in an `XINFO CONSUMERS` answer (RESP2 arrays or RESP3 maps).
fn consumer_names(v: &redis::Value) -> Vec<String> {
    let redis::Value::Array(consumers) = v else { return Vec::new() };
    consumers
        .iter()
        .filter_map(|c| {
            let pairs: Vec<(&redis::Value, &redis::Value)> = match c {
                redis::Value::Array(f) => f.chunks_exact(2).map(|kv| (&kv[0], &kv[1])).collect(),
                redis::Value::Map(m) => m.iter().map(|(k, v)| (k, v)).collect(),
                _ => return None,
            };
            pairs.into_iter().find_map(|(k, v)| if text(k).as_deref() == Some("name") { text(v) } else { None })
        })
        .collect()
}

fn text(v: &redis::Value) -> Option<String> {
    match v {
        redis::Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        redis::Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// Step 4: the critical incident, through the API; its id.
async fn open_incident(client: &Client, target: &Target, reason: &str, cut: &CutOff) -> anyhow::Result<String> {
    let title: String = format!("Quarantined {target}: {reason}").chars().take(200).collect();
    let body = json!({
        "severity": "critical",
        "trigger": "quarantine",
        "title": title,
        "details": {
            "role": target.role.as_str(),
            "instance": target.instance.as_ref().map(Instance::as_str),
            "redis_user": cut.user,
            "pending_returned": cut.returned,
        },
    });
    let incident = client.post("v1/incidents", Some(&body)).await?;
    Ok(incident.get("id").and_then(Value::as_str).unwrap_or("-").to_owned())
}
