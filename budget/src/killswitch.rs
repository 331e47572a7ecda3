//! Engaging and releasing the kill switch: the state record, the pauses, the alert.
//!
//! [`KillSwitch::engage`] runs one Lua script on the state record (`fleet:killswitch`,
//! [`bus::control::KILLSWITCH_KEY`]): if the switch is already engaged it changes nothing
//! and returns the record as it is; otherwise it raises the epoch to
//! `max(current + 1, proposed)`, sets `engaged = 1` and records who, why, when, a fresh
//! engagement id and the [`Cause`] (JSON: the admin's name or the trigger, for the alerts). So however many triggers fire at once (fifty callers finding the day spent,
//! three failure counters, an operator), the record is written **once per engagement**.
//! Only the caller whose script wrote the record then sends a signed `control.pause
//! {epoch, reason}` to `fleet:control:<role>` for every role (sealed under the new epoch, so
//! verifiers that already raised their epoch accept it) and enqueues one alert, whose dedup
//! key is the engagement id.
//!
//! Crash safety: a `budget` that dies between the script and the pauses finds the record
//! engaged when it starts again and calls [`KillSwitch::reassert`], which sends the pauses
//! again (listeners apply a pause idempotently) and enqueues the alert again (the dedup key
//! makes it a no-op if it was queued). Listeners also re-read the record every few seconds.
//!
//! [`KillSwitch::resume`] (an admin's resume, relayed by the orchestrator) clears `engaged`
//! (the epoch stays), resets the consecutive-failure counter in the same script, keeps the
//! engagement it ends (`kill_id`, `kill_at_ms`, `kill_by`, `kill_reason`, `kill_cause`), sends
//! `control.resume {epoch}` to every role and enqueues one `resumed` alert naming that kill.

use std::sync::Arc;
use std::time::Duration;

use bus::control::{KILLSWITCH_KEY, KillState};
use bus::{BusError, Publisher};
use envelope::{ControlPause, ControlResume, Envelope, Instance, Payload, Role, Sender, StreamName};
use redis::Value;
use uuid::Uuid;

use crate::alert::{Alert, AlertError, AlertSender, Cause, KillRef};

/// The roles whose control streams a pause or resume goes to.
pub const PAUSED_ROLES: &[Role] = &[Role::Dev, Role::Qa, Role::Review, Role::Refactor, Role::Orchestrator];

/// The consecutive-failure counter; reset by a success and by a resume.
pub const FAILURES_KEY: &str = "fleet:budget:counters:failures:{fleet:killswitch}";

/// KEYS[1] the record. ARGV[1] proposed epoch, ARGV[2] by, ARGV[3] reason, ARGV[4] at_ms,
/// ARGV[5] engagement id, ARGV[6] the cause (JSON). Returns
/// `{wrote (0/1), epoch, by, reason, at_ms, id, cause}`.
const ENGAGE_LUA: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'engaged', 'epoch', 'by', 'reason', 'at_ms', 'id', 'cause')
if cur[1] == '1' then
  return {0, cur[2] or '0', cur[3] or '', cur[4] or '', cur[5] or '0', cur[6] or '', cur[7] or ''}
end
local epoch = tonumber(cur[2] or '0') + 1
local proposed = tonumber(ARGV[1])
if proposed > epoch then epoch = proposed end
local e = string.format('%d', epoch)
redis.call('HSET', KEYS[1], 'epoch', e, 'engaged', '1', 'by', ARGV[2], 'reason', ARGV[3], 'at_ms', ARGV[4], 'id', ARGV[5], 'cause', ARGV[6])
return {1, e, ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]}
";

/// KEYS[1] the record, KEYS[2] the failure counter. ARGV[1] the epoch the resume was issued
/// under, ARGV[2] by, ARGV[3] at_ms, ARGV[4] the resume's cause (JSON). A resume issued under
/// an older epoch than the record's answers an older engagement and changes nothing. The
/// engagement it ends is kept as `kill_id`, `kill_at_ms`, `kill_by`, `kill_reason`,
/// `kill_cause` (the resume alert names it). Returns `{resumed (0/1), epoch}`.
const RESUME_LUA: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'engaged', 'epoch', 'id', 'at_ms', 'by', 'reason', 'cause')
local epoch = tonumber(cur[2] or '0')
if cur[1] ~= '1' or tonumber(ARGV[1]) < epoch then
  return {0, string.format('%d', epoch)}
end
redis.call('HSET', KEYS[1], 'kill_id', cur[3] or '', 'kill_at_ms', cur[4] or '0', 'kill_by', cur[5] or '',
  'kill_reason', cur[6] or '', 'kill_cause', cur[7] or '')
redis.call('HSET', KEYS[1], 'engaged', '0', 'by', ARGV[2], 'reason', 'resumed', 'at_ms', ARGV[3], 'cause', ARGV[4])
redis.call('SET', KEYS[2], '0')
return {1, string.format('%d', epoch)}
";

/// A cause as stored in the record; a record written by an older `budget` has none, and
/// its `by` and `reason` stand in.
fn stored_cause(json: &str, by: Option<&str>, reason: Option<&str>) -> Cause {
    serde_json::from_str(json).unwrap_or_else(|_| {
        let reason = reason.unwrap_or_default();
        match by.unwrap_or_default() {
            by if by.starts_with("operator via ") => Cause::operator(None, &by["operator via ".len()..], reason),
            by => Cause {
                trigger: String::new(),
                operator: None,
                via: Some(by.to_owned()).filter(|b| !b.is_empty()),
                reason: reason.to_owned(),
            },
        }
    })
}

/// What [`KillSwitch::engage`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Engagement {
    /// The record after the call.
    pub state: KillState,
    /// The engagement's id (fresh, or the one already in force).
    pub id: String,
    /// Who or what engaged it.
    pub cause: Cause,
    /// True if this call engaged the switch; false if it already was.
    pub fresh: bool,
}

/// The kill switch failed; nothing or only part of it happened (the record tells).
#[derive(Debug, thiserror::Error)]
pub enum KillSwitchError {
    /// Redis failed running the script or reading the record.
    #[error("Redis: {0}")]
    Redis(String),
    /// A pause or resume could not be published.
    #[error("cannot publish a control message: {0}")]
    Publish(#[from] BusError),
    /// The alert could not be queued.
    #[error("cannot queue the alert: {0}")]
    Alert(#[from] AlertError),
    /// The script answered something unexpected.
    #[error("unexpected reply from the kill-switch script: {0}")]
    Reply(String),
}

impl From<redis::RedisError> for KillSwitchError {
    fn from(e: redis::RedisError) -> Self {
        KillSwitchError::Redis(e.to_string().chars().take(300).collect())
    }
}

impl From<bus::RedisPoolError> for KillSwitchError {
    fn from(e: bus::RedisPoolError) -> Self {
        KillSwitchError::Redis(e.to_string().chars().take(300).collect())
    }
}

/// The kill switch as the budget manager drives it. Cheap to clone.
#[derive(Clone)]
pub struct KillSwitch {
    /// Connections for the scripts.
    pool: bus::RedisPool,
    /// Signs the pauses and resumes (keys `budget><role>`).
    publisher: Arc<Publisher>,
    /// Queues the alerts.
    alerts: AlertSender,
    /// This process, the sender of the control messages.
    instance: Instance,
    /// `ttl_ms` of control messages: a pause left in a stream is ignored after it.
    control_ttl: Duration,
    engage: Arc<redis::Script>,
    resume: Arc<redis::Script>,
}

impl std::fmt::Debug for KillSwitch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KillSwitch").field("instance", &self.instance).finish_non_exhaustive()
    }
}

impl KillSwitch {
    /// A kill switch writing through `pool`, publishing with `publisher` (the budget's
    /// keyring) as `instance`, alerting through `alerts`.
    pub fn new(pool: bus::RedisPool, publisher: Arc<Publisher>, alerts: AlertSender, instance: Instance) -> Self {
        Self {
            pool,
            publisher,
            alerts,
            instance,
            control_ttl: Duration::from_secs(60),
            engage: Arc::new(redis::Script::new(ENGAGE_LUA)),
            resume: Arc::new(redis::Script::new(RESUME_LUA)),
        }
    }

    /// Sets the `ttl_ms` of control messages (default 60 s).
    pub fn with_control_ttl(mut self, ttl: Duration) -> Self {
        self.control_ttl = ttl;
        self
    }

    /// This process's instance: the sender of the pauses, and the `via` of automatic causes.
    pub fn instance(&self) -> &Instance {
        &self.instance
    }

    /// Reads the record.
    pub async fn state(&self) -> Result<KillState, KillSwitchError> {
        let mut c = self.pool.get().await?;
        bus::control::read_state(&mut c).await.map_err(|e| KillSwitchError::Redis(e.to_string()))
    }

    /// Writes the record only (no pauses, no alert); see the module docs. `proposed` is the
    /// epoch the trigger asks for (an operator's kill already raised the orchestrator's).
    pub async fn write_record(&self, cause: &Cause, proposed: u64) -> Result<Engagement, KillSwitchError> {
        let id = Uuid::now_v7().to_string();
        let cause_json = serde_json::to_string(cause).map_err(|e| KillSwitchError::Reply(e.to_string()))?;
        let mut c = self.pool.get().await?;
        let reply: Value = self
            .engage
            .key(KILLSWITCH_KEY)
            .arg(proposed)
            .arg(cause.by())
            .arg(&cause.reason)
            .arg(bus::now_ms())
            .arg(&id)
            .arg(cause_json)
            .invoke_async(&mut c)
            .await?;
        let bad = || KillSwitchError::Reply(format!("{reply:?}"));
        let Value::Array(items) = &reply else { return Err(bad()) };
        let text = |i: usize| items.get(i).and_then(bus::reply::text).ok_or_else(bad);
        let fresh = items.first().and_then(bus::reply::int).ok_or_else(bad)? == 1;
        let by = text(2)?;
        let reason = text(3)?;
        let state = KillState {
            epoch: text(1)?.parse().map_err(|_| bad())?,
            engaged: true,
            by: Some(by).filter(|s| !s.is_empty()),
            reason: Some(reason).filter(|s| !s.is_empty()),
            at_ms: text(4)?.parse().ok(),
        };
        let cause = stored_cause(&text(6)?, state.by.as_deref(), state.reason.as_deref());
        Ok(Engagement { state, id: text(5)?, cause, fresh })
    }

    /// Engages the switch: the record once, then (only if this call wrote it) the pauses to
    /// every role and one alert. Idempotent: an engaged switch stays as it is.
    pub async fn engage(
        &self,
        cause: &Cause,
        proposed: u64,
        details: serde_json::Value,
    ) -> Result<Engagement, KillSwitchError> {
        let engagement = self.write_record(cause, proposed).await?;
        let (by, reason) = (cause.by(), cause.reason.as_str());
        if engagement.fresh {
            tracing::error!(
                epoch = engagement.state.epoch, by = %by, reason, trigger = %cause.trigger, engagement = %engagement.id,
                "Kill switch engaged: pausing every role."
            );
            self.broadcast_pause(&engagement).await?;
            self.alert_engaged(&engagement, details).await?;
        } else {
            tracing::debug!(epoch = engagement.state.epoch, by = %by, reason, "Kill switch already engaged.");
        }
        Ok(engagement)
    }

    /// After a restart: if the record says engaged, sends the pauses and queues the alert
    /// again (both idempotent). Returns the record.
    pub async fn reassert(&self) -> Result<KillState, KillSwitchError> {
        let mut c = self.pool.get().await?;
        let (id, cause): (Option<String>, Option<String>) =
            redis::cmd("HMGET").arg(KILLSWITCH_KEY).arg("id").arg("cause").query_async(&mut c).await?;
        drop(c);
        let state = self.state().await?;
        if state.engaged {
            let cause = stored_cause(cause.as_deref().unwrap_or(""), state.by.as_deref(), state.reason.as_deref());
            let engagement = Engagement { id: id.unwrap_or_default(), state: state.clone(), cause, fresh: false };
            tracing::warn!(epoch = state.epoch, "Kill switch is engaged: sending the pauses again.");
            self.broadcast_pause(&engagement).await?;
            self.alert_engaged(&engagement, serde_json::json!({"reasserted": true})).await?;
        }
        Ok(state)
    }

    /// Releases the switch if `epoch` (the epoch the orchestrator's resume was issued
    /// under) is not older than the record's; resets the failure counter; sends
    /// `control.resume` to every role; queues one `resumed` alert naming the kill it ends.
    /// Returns the epoch in force and whether this call released it.
    pub async fn resume(&self, cause: &Cause, epoch: u64) -> Result<(u64, bool), KillSwitchError> {
        let by = cause.by();
        let by = by.as_str();
        let cause_json = serde_json::to_string(cause).map_err(|e| KillSwitchError::Reply(e.to_string()))?;
        let mut c = self.pool.get().await?;
        let reply: Vec<Value> = self
            .resume
            .key(KILLSWITCH_KEY)
            .key(FAILURES_KEY)
            .arg(epoch)
            .arg(by)
            .arg(bus::now_ms())
            .arg(cause_json)
            .invoke_async(&mut c)
            .await?;
        drop(c);
        let bad = || KillSwitchError::Reply(format!("{reply:?}"));
        let resumed = reply.first().and_then(bus::reply::int).ok_or_else(bad)? == 1;
        let current: u64 = reply.get(1).and_then(bus::reply::text).and_then(|t| t.parse().ok()).ok_or_else(bad)?;
        let state = self.state().await?;
        if !state.engaged {
            // Also when this call found it released already: a crash may have come between
            // the script and the resumes. Listeners apply a resume idempotently.
            if resumed {
                tracing::warn!(epoch = current, by, "Kill switch released: resuming every role.");
            }
            self.broadcast(current, |_| ControlResume { epoch: current, by: None }.into()).await?;
            let (at_ms, ends) = self.ended_kill().await?;
            let alert = Alert::resumed(
                self.alerts.deployment(),
                current,
                cause.clone(),
                at_ms.unwrap_or_else(bus::now_ms),
                ends,
                serde_json::json!({"by": by}),
            );
            self.alerts.enqueue(&alert).await?;
        } else {
            tracing::warn!(record_epoch = current, resume_epoch = epoch, "Ignored a resume for an older engagement.");
        }
        Ok((current, resumed))
    }

    /// When the last resume happened, and the engagement it ended, from the record.
    async fn ended_kill(&self) -> Result<(Option<u64>, Option<KillRef>), KillSwitchError> {
        type Fields = (Option<String>, Option<String>, Option<String>, Option<String>, Option<String>, Option<String>);
        let mut c = self.pool.get().await?;
        let (at_ms, id, kill_at_ms, kill_by, kill_reason, kill_cause): Fields = redis::cmd("HMGET")
            .arg(KILLSWITCH_KEY)
            .arg(&["at_ms", "kill_id", "kill_at_ms", "kill_by", "kill_reason", "kill_cause"][..])
            .query_async(&mut c)
            .await?;
        let at_ms = at_ms.and_then(|v| v.parse().ok());
        let ends = id.filter(|id| !id.is_empty()).map(|engagement| KillRef {
            engagement,
            at_ms: kill_at_ms.and_then(|v| v.parse().ok()).unwrap_or(0),
            at: String::new(),
            cause: stored_cause(kill_cause.as_deref().unwrap_or(""), kill_by.as_deref(), kill_reason.as_deref()),
        });
        Ok((at_ms, ends))
    }

    async fn broadcast_pause(&self, e: &Engagement) -> Result<(), KillSwitchError> {
        let reason = e.state.reason.clone().unwrap_or_default();
        let epoch = e.state.epoch;
        self.broadcast(epoch, |_| ControlPause { epoch, reason: reason.clone(), by: None }.into()).await
    }

    /// One pipelined `XADD` per role, sealed under `epoch`.
    async fn broadcast(&self, epoch: u64, payload: impl Fn(Role) -> Payload) -> Result<(), KillSwitchError> {
        let now = bus::now_ms();
        let ttl = self.control_ttl.as_millis() as u64;
        let items: Vec<(StreamName, Envelope)> = PAUSED_ROLES
            .iter()
            .map(|&role| {
                let from = Sender { role: Role::Budget, instance: self.instance.clone() };
                (StreamName::control(role), Envelope::new(from, role, now, ttl, epoch, payload(role)))
            })
            .collect();
        self.publisher.publish_batch(&items).await?;
        Ok(())
    }

    async fn alert_engaged(&self, e: &Engagement, details: serde_json::Value) -> Result<(), KillSwitchError> {
        let by = e.state.by.as_deref().unwrap_or("budget");
        let reason = e.state.reason.as_deref().unwrap_or("");
        let mut alert = Alert::kill_engaged(
            self.alerts.deployment(),
            e.state.epoch,
            e.cause.clone(),
            e.state.at_ms.unwrap_or_else(bus::now_ms),
            serde_json::json!({"engagement": e.id, "by": by, "reason": reason, "at_ms": e.state.at_ms, "trigger": details}),
        );
        // Once per engagement, also across restarts of this process.
        alert.dedup_key = format!("kill_engaged:{}", e.id);
        self.alerts.enqueue(&alert).await?;
        Ok(())
    }
}
