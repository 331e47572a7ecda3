//! [`AlertSender`]: persists an alert in the outbox stream, at most once per dedup key.

use std::time::Duration;

use redis::Value;

use super::{Alert, AlertError, AlertKind, AlertsConfig, names};

/// Claims the dedup marker and appends the alert in one atomic step, so a crash can leave
/// neither a marker without its alert (a lost alert) nor an alert without its marker.
///
/// KEYS[1] marker, KEYS[2] stream. ARGV[1] alert id, ARGV[2] marker TTL in ms,
/// ARGV[3] approximate MAXLEN, ARGV[4] field name, ARGV[5] alert JSON.
/// Returns `{1, entry id}` when enqueued, `{0, id of the alert that holds the marker}`.
const ENQUEUE_LUA: &str = r"
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {0, redis.call('GET', KEYS[1]) or ''}
end
local entry = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', ARGV[4], ARGV[5])
return {1, entry}
";

/// What [`AlertSender::enqueue`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enqueued {
    /// Persisted; the channels will deliver it.
    Queued {
        /// The stream entry id.
        entry: String,
    },
    /// An alert with the same dedup key is already queued (or was, within its rate-limit
    /// interval); nothing was written.
    Duplicate {
        /// The id of that earlier alert.
        first: String,
    },
}

/// Enqueues alerts. Cheap to clone; shares the pool.
#[derive(Clone)]
pub struct AlertSender {
    /// Connections for the enqueue script.
    pool: bus::RedisPool,
    /// Marker lifetime of soft-limit warnings: the rate limit.
    soft_limit_every: Duration,
    /// Marker lifetime of once-per-epoch alerts.
    epoch_dedup_ttl: Duration,
    /// Approximate cap of the outbox stream.
    stream_max_len: u64,
    /// The script, loaded on first use (`EVALSHA`, falling back to `EVAL`).
    script: redis::Script,
    /// The deployment every alert made through this sender names.
    deployment: String,
}

impl std::fmt::Debug for AlertSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertSender")
            .field("soft_limit_every", &self.soft_limit_every)
            .field("epoch_dedup_ttl", &self.epoch_dedup_ttl)
            .field("stream_max_len", &self.stream_max_len)
            .field("deployment", &self.deployment)
            .finish_non_exhaustive()
    }
}

impl AlertSender {
    /// A sender writing through `pool` with `cfg`'s dedup intervals and stream cap.
    pub fn new(pool: bus::RedisPool, cfg: &AlertsConfig) -> Self {
        Self {
            pool,
            soft_limit_every: cfg.soft_limit_every,
            epoch_dedup_ttl: cfg.epoch_dedup_ttl,
            stream_max_len: cfg.stream_max_len.max(1),
            script: redis::Script::new(ENQUEUE_LUA),
            deployment: super::DEFAULT_DEPLOYMENT.to_owned(),
        }
    }

    /// The same sender, for alerts naming `deployment` (the `deployment` setting).
    pub fn with_deployment(mut self, deployment: &str) -> Self {
        self.deployment = deployment.to_owned();
        self
    }

    /// The deployment the alerts name ([`super::DEFAULT_DEPLOYMENT`] unless set).
    pub fn deployment(&self) -> &str {
        &self.deployment
    }

    /// How long `kind`'s dedup marker lives.
    fn marker_ttl(&self, kind: AlertKind) -> Duration {
        match kind {
            AlertKind::SoftLimitWarning => self.soft_limit_every,
            AlertKind::KillEngaged | AlertKind::Resumed | AlertKind::Incident => self.epoch_dedup_ttl,
        }
    }

    /// Persists `alert` unless one with the same dedup key is already there. When this
    /// returns `Ok(Queued)`, the alert is in Redis and will be delivered; an `Err` means
    /// nothing was written (or, if the connection broke after the script ran, that it was
    /// written once: calling again is safe, the marker makes it a `Duplicate`).
    pub async fn enqueue(&self, alert: &Alert) -> Result<Enqueued, AlertError> {
        let json = serde_json::to_string(alert)?;
        let ttl_ms = self.marker_ttl(alert.kind).as_millis().max(1) as u64;
        let mut conn = self.pool.get().await?;
        let reply: Value = self
            .script
            .key(names::dedup_key(&alert.dedup_key))
            .key(names::STREAM)
            .arg(alert.id.to_string())
            .arg(ttl_ms)
            .arg(self.stream_max_len)
            .arg(names::FIELD)
            .arg(json)
            .invoke_async(&mut conn)
            .await?;
        let outcome = parse_reply(&reply)?;
        match &outcome {
            Enqueued::Queued { entry } => {
                tracing::info!(alert_id = %alert.id, kind = %alert.kind, epoch = alert.epoch, entry = %entry, "Alert queued.");
            }
            Enqueued::Duplicate { first } => {
                tracing::debug!(alert_id = %alert.id, kind = %alert.kind, dedup_key = %alert.dedup_key, first = %first, "Alert already queued; dropped.");
            }
        }
        Ok(outcome)
    }
}

fn parse_reply(reply: &Value) -> Result<Enqueued, AlertError> {
    let bad = |detail: &str| AlertError::Reply { command: "EVALSHA (alert enqueue)", detail: detail.to_owned() };
    let Value::Array(items) = reply else { return Err(bad("not an array")) };
    let [flag, text] = items.as_slice() else { return Err(bad("not a pair")) };
    let text = bus::reply::text(text).ok_or_else(|| bad("second item is not a string"))?;
    match bus::reply::int(flag) {
        Some(1) => Ok(Enqueued::Queued { entry: text }),
        Some(0) => Ok(Enqueued::Duplicate { first: text }),
        _ => Err(bad("first item is not 0 or 1")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn parses_both_outcomes() {
        let queued = Value::Array(vec![Value::Int(1), Value::BulkString(b"1-0".to_vec())]);
        assert_eq!(parse_reply(&queued).unwrap(), Enqueued::Queued { entry: "1-0".into() });
        let dup = Value::Array(vec![Value::Int(0), Value::BulkString(b"abc".to_vec())]);
        assert_eq!(parse_reply(&dup).unwrap(), Enqueued::Duplicate { first: "abc".into() });
        assert!(parse_reply(&Value::Nil).is_err());
        assert!(parse_reply(&Value::Array(vec![Value::Int(2), Value::Nil])).is_err());
    }
}
