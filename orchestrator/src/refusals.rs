//! A per-sender rate limit on audited refusals.
//!
//! Every refused tool request (`tool.refused`), every stale or refused result
//! (`task.result.stale`, `task.result.refused`) and every heartbeat or result from a worker
//! that does not hold the assignment (`heartbeat.refused`, `task.result.refused`) used to
//! add one audit row, so a compromised worker could grow the audit trail (hash-chained,
//! append-only, never pruned) without limit by sending junk. Each sender — `(role, instance)` as signed in
//! the envelope — has a token bucket: up to `burst` refusals are audited at once, then
//! `per_minute`. Past that a refusal is still answered and logged, but only counted; the
//! counts are written as one `audit.refusals.suppressed` row per sender at most once a
//! minute ([`crate::tasks::Engine::flush_refusal_summaries`], from the tick loop).
//!
//! The buckets live in memory: a restart forgets them, which at worst lets one more burst
//! through. The number of senders tracked is bounded ([`MAX_SENDERS`]): instance names are
//! chosen by the sender, so past the bound a role's unknown instances share one bucket.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most senders with their own bucket; beyond, new instances of a role share `(<role>, *)`.
pub const MAX_SENDERS: usize = 4096;
/// Least time between two summary rows of one sender.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// How many refusals of one sender are audited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RefusalLimits {
    /// Refusals audited back to back before the rate applies.
    pub burst: u32,
    /// Refusals audited per minute after the burst.
    pub per_minute: u32,
}

impl Default for RefusalLimits {
    fn default() -> Self {
        Self { burst: 20, per_minute: 6 }
    }
}

/// Whether a refusal gets its own audit row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Write the row.
    Audit,
    /// Over the rate: count it, write nothing now.
    Count,
}

/// Counts of refusals that were not audited, per sender, ready for a summary row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suppressed {
    /// The sender's role.
    pub role: String,
    /// The sender's instance (`*` for the shared overflow bucket).
    pub instance: String,
    /// Refusals counted instead of audited since the last summary.
    pub count: u64,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
    suppressed: u64,
    last_summary: Option<Instant>,
}

/// The token buckets of every sender.
#[derive(Debug)]
pub struct RefusalLimiter {
    limits: RefusalLimits,
    buckets: Mutex<HashMap<(String, String), Bucket>>,
    /// When the table was last purged of quiet senders (at most once a second).
    last_purge: Mutex<Option<Instant>>,
}

impl RefusalLimiter {
    /// A limiter with `limits`.
    pub fn new(limits: RefusalLimits) -> Self {
        Self { limits, buckets: Mutex::new(HashMap::new()), last_purge: Mutex::new(None) }
    }

    /// The limits in force.
    pub fn limits(&self) -> RefusalLimits {
        self.limits
    }

    /// Whether this refusal from `(role, instance)` is audited now.
    pub fn admit(&self, role: &str, instance: &str) -> Admission {
        self.admit_at(role, instance, Instant::now())
    }

    fn admit_at(&self, role: &str, instance: &str, now: Instant) -> Admission {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let mut key = (role.to_owned(), instance.to_owned());
        if !buckets.contains_key(&key) && buckets.len() >= MAX_SENDERS {
            // Forget senders that are quiet and owe no summary, then share a role bucket.
            let mut last = self.last_purge.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
                *last = Some(now);
                let burst = f64::from(self.limits.burst);
                let rate = self.rate();
                buckets.retain(|_, b| b.suppressed > 0 || refill(b, now, rate, burst) < burst);
            }
            if buckets.len() >= MAX_SENDERS {
                key = (role.to_owned(), "*".to_owned());
            }
        }
        let burst = f64::from(self.limits.burst);
        let rate = self.rate();
        let bucket = buckets.entry(key).or_insert(Bucket { tokens: burst, at: now, suppressed: 0, last_summary: None });
        bucket.tokens = refill(bucket, now, rate, burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Admission::Audit
        } else {
            bucket.suppressed += 1;
            Admission::Count
        }
    }

    /// Takes the counts owed a summary row: senders with suppressed refusals whose last
    /// summary is at least [`SUMMARY_EVERY`] old (or `force`). Their counts restart at 0.
    pub fn take_suppressed(&self, force: bool) -> Vec<Suppressed> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for ((role, instance), b) in buckets.iter_mut() {
            let due = force || b.last_summary.is_none_or(|t| now.duration_since(t) >= SUMMARY_EVERY);
            if b.suppressed > 0 && due {
                out.push(Suppressed { role: role.clone(), instance: instance.clone(), count: b.suppressed });
                b.suppressed = 0;
                b.last_summary = Some(now);
            }
        }
        out.sort_by(|a, b| (&a.role, &a.instance).cmp(&(&b.role, &b.instance)));
        out
    }

    /// Puts counts back (their summary row could not be written).
    pub fn restore(&self, lost: &[Suppressed]) {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        for s in lost {
            if let Some(b) = buckets.get_mut(&(s.role.clone(), s.instance.clone())) {
                b.suppressed += s.count;
                b.last_summary = None;
            }
        }
    }

    fn rate(&self) -> f64 {
        f64::from(self.limits.per_minute) / 60.0
    }
}

fn refill(b: &Bucket, now: Instant, rate_per_sec: f64, burst: f64) -> f64 {
    (b.tokens + now.duration_since(b.at).as_secs_f64() * rate_per_sec).min(burst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate_per_sender() {
        let l = RefusalLimiter::new(RefusalLimits { burst: 3, per_minute: 6 });
        let t0 = Instant::now();
        let admitted = (0..100).filter(|_| l.admit_at("dev", "dev-1", t0) == Admission::Audit).count();
        assert_eq!(admitted, 3);
        // Another sender has its own bucket.
        assert_eq!(l.admit_at("dev", "dev-2", t0), Admission::Audit);
        // Six a minute: one every ten seconds.
        assert_eq!(l.admit_at("dev", "dev-1", t0 + Duration::from_secs(9)), Admission::Count);
        assert_eq!(l.admit_at("dev", "dev-1", t0 + Duration::from_secs(10)), Admission::Audit);
        let s = l.take_suppressed(false);
        assert_eq!(s, vec![Suppressed { role: "dev".into(), instance: "dev-1".into(), count: 98 }]);
        assert_eq!(l.admit_at("dev", "dev-1", t0 + Duration::from_secs(11)), Admission::Count);
        assert!(l.take_suppressed(false).is_empty(), "one summary a minute");
        assert_eq!(l.take_suppressed(true)[0].count, 1);
    }

    #[test]
    fn made_up_instance_names_cannot_grow_the_table_without_bound() {
        let l = RefusalLimiter::new(RefusalLimits { burst: 1, per_minute: 0 });
        let t0 = Instant::now();
        let admitted =
            (0..MAX_SENDERS * 3).filter(|i| l.admit_at("dev", &format!("dev-{i}"), t0) == Admission::Audit).count();
        assert_eq!(admitted, MAX_SENDERS + 1, "past the table's size, new names share one bucket");
        assert!(l.buckets.lock().unwrap().len() <= MAX_SENDERS + 1);
    }
}
