//! Per-client rate limit on task intake: a token bucket in Redis, so every orchestrator
//! behind a load balancer draws from the same bucket.
//!
//! The bucket of client `sub` is the hash `fleet:ratelimit:<sub>` (`tokens`, `ts`). One
//! Lua script refills it for the time since `ts` (Redis's own clock, so orchestrators'
//! clocks don't matter), takes a token if there is one, and otherwise says how long
//! until there is. The key expires once the bucket would be full again.
//!
//! If Redis can't be reached the limiter fails closed: intake answers 503, because an
//! unguarded intake is what lets an outsider burn the budget.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::error::ApiError;

/// Prefix of the buckets' keys; the token's `sub` follows.
pub const KEY_PREFIX: &str = "fleet:ratelimit:";

/// KEYS[1] the bucket; ARGV[1] capacity, ARGV[2] tokens per second.
/// Returns {1, 0} when a token was taken, {0, milliseconds until one is back} otherwise.
const SCRIPT: &str = r"
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(bucket[1])
local ts = tonumber(bucket[2])
if tokens == nil or ts == nil then
  tokens = capacity
  ts = now
end
tokens = math.min(capacity, tokens + math.max(0, now - ts) * rate / 1000)
local allowed = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait = math.ceil((1 - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity * 1000 / rate) + 1000)
return {allowed, wait}
";

/// A setting the limiter can't work with.
#[derive(Debug, thiserror::Error)]
pub enum RateLimitConfigError {
    /// Capacity 0 would refuse everything.
    #[error("setting `rate_limit_burst` must be at least 1")]
    Burst,
    /// Refill must be positive and finite.
    #[error("setting `rate_limit_per_second` must be a positive number")]
    Rate,
}

/// The intake limiter. Cheap to clone.
#[derive(Clone)]
pub struct RateLimiter {
    /// Where the buckets live.
    pool: bus::RedisPool,
    /// Loaded once per connection (EVALSHA, falling back to EVAL).
    script: Arc<redis::Script>,
    /// Bucket capacity: submissions a client may make at once.
    burst: u32,
    /// Tokens per second a client gets back.
    per_second: f64,
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter").field("burst", &self.burst).field("per_second", &self.per_second).finish()
    }
}

/// What the bucket said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// A token was taken.
    Allowed,
    /// Empty: a token is back after this long.
    Limited(Duration),
}

impl RateLimiter {
    /// A limiter with buckets of `burst` tokens refilled at `per_second`.
    pub fn new(pool: bus::RedisPool, burst: u32, per_second: f64) -> Result<Self, RateLimitConfigError> {
        if burst == 0 {
            return Err(RateLimitConfigError::Burst);
        }
        if !(per_second.is_finite() && per_second > 0.0) {
            return Err(RateLimitConfigError::Rate);
        }
        Ok(Self { pool, script: Arc::new(redis::Script::new(SCRIPT)), burst, per_second })
    }

    /// Takes a token from `sub`'s bucket.
    pub async fn take(&self, sub: &str) -> Result<Decision, redis::RedisError> {
        let mut conn = self.pool.get().await.map_err(|e| match e {
            bus::RedisPoolError::Backend(e) => e,
            other => redis::RedisError::from((redis::ErrorKind::Io, "no Redis connection", other.to_string())),
        })?;
        let (allowed, wait_ms): (i64, i64) = self
            .script
            .key(format!("{KEY_PREFIX}{sub}"))
            .arg(self.burst)
            .arg(self.per_second)
            .invoke_async(&mut conn)
            .await?;
        Ok(if allowed == 1 {
            Decision::Allowed
        } else {
            Decision::Limited(Duration::from_millis(wait_ms.max(1) as u64))
        })
    }

    /// [`take`](Self::take) as the handlers need it: 429 with the wait rounded up to whole
    /// seconds, or 503 when Redis can't answer (failing closed).
    pub async fn admit(&self, sub: &str) -> Result<(), ApiError> {
        match self.take(sub).await {
            Ok(Decision::Allowed) => Ok(()),
            Ok(Decision::Limited(wait)) => Err(ApiError::RateLimited {
                sub: sub.to_owned(),
                burst: self.burst,
                per_second: self.per_second,
                retry_after_secs: wait.as_millis().div_ceil(1000).max(1) as u64,
            }),
            Err(e) => {
                tracing::warn!(error = %e, "The rate limiter cannot reach Redis; refusing task intake.");
                Err(ApiError::Unavailable(
                    "task intake is unavailable: the rate limiter cannot reach Redis (it fails closed); retry later"
                        .into(),
                ))
            }
        }
    }
}
