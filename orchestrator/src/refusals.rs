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

/// A sender whose entries the bus refused past the burst within one window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Burst {
    /// The claimed role (`unknown` when the entry did not decode).
    pub role: String,
    /// The claimed instance (`unknown` likewise).
    pub instance: String,
    /// Entries refused in the window so far.
    pub count: u32,
    /// By reason code.
    pub reasons: std::collections::BTreeMap<&'static str, u32>,
}

/// Counts the entries the orchestrator's consumers refuse (`bad_signature`,
/// `forbidden_type`, …), per claimed sender in windows of [`SUMMARY_EVERY`], and reports a
/// sender once per window when it passes `burst`: a worker that may be compromised, or
/// someone forging in its name (issue 14: an incident).
#[derive(Debug)]
pub struct RejectionWatch {
    burst: u32,
    windows: Mutex<HashMap<(String, String), (Instant, Burst)>>,
    tx: tokio::sync::mpsc::Sender<Burst>,
}

impl RejectionWatch {
    /// A watch reporting past `burst` refusals a window, and where the reports go.
    pub fn new(burst: u32) -> (std::sync::Arc<Self>, tokio::sync::mpsc::Receiver<Burst>) {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        (std::sync::Arc::new(Self { burst, windows: Mutex::new(HashMap::new()), tx }), rx)
    }

    /// The hook for [`bus::Consumers::with_reject_hook`].
    pub fn hook(self: &std::sync::Arc<Self>) -> bus::RejectHook {
        let me = self.clone();
        bus::RejectHook(std::sync::Arc::new(move |r: bus::Rejection| me.observe(r, Instant::now())))
    }

    fn observe(&self, r: bus::Rejection, now: Instant) {
        let (role, mut instance) = r.claimed.unwrap_or_else(|| ("unknown".to_owned(), "unknown".to_owned()));
        let mut windows = self.windows.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if windows.len() >= MAX_SENDERS {
            windows.retain(|_, (start, _)| now.duration_since(*start) < SUMMARY_EVERY);
        }
        if windows.len() >= MAX_SENDERS && !windows.contains_key(&(role.clone(), instance.clone())) {
            // Instance names are the sender's choice: past the bound, a role's new names share
            // one window (at most one more entry per role).
            instance = "*".to_owned();
        }
        let key = (role.clone(), instance.clone());
        let entry = windows
            .entry(key)
            .or_insert_with(|| (now, Burst { role, instance, count: 0, reasons: Default::default() }));
        if now.duration_since(entry.0) >= SUMMARY_EVERY {
            *entry = (
                now,
                Burst {
                    role: entry.1.role.clone(),
                    instance: entry.1.instance.clone(),
                    count: 0,
                    reasons: Default::default(),
                },
            );
        }
        entry.1.count += 1;
        *entry.1.reasons.entry(r.reason).or_default() += 1;
        if entry.1.count == self.burst.saturating_add(1) {
            // Full means reports are already waiting; the incident is one per sender anyway.
            let _ = self.tx.try_send(entry.1.clone());
        }
    }
}

#[cfg(test)]
mod watch_tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn rejected(reason: &'static str, instance: Option<&str>) -> bus::Rejection {
        bus::Rejection {
            stream: "fleet:results".into(),
            reason,
            claimed: instance.map(|i| ("dev".to_owned(), i.to_owned())),
        }
    }

    #[test]
    fn one_report_per_sender_and_window_past_the_burst() {
        let (watch, mut rx) = RejectionWatch::new(3);
        let t0 = Instant::now();
        for i in 0..10 {
            let reason = if i % 2 == 0 { "bad_signature" } else { "forbidden_type" };
            watch.observe(rejected(reason, Some("dev-9")), t0);
            watch.observe(rejected("decode", None), t0);
        }
        watch.observe(rejected("bad_signature", Some("dev-1")), t0);
        let first = rx.try_recv().unwrap();
        assert_eq!((first.role.as_str(), first.instance.as_str(), first.count), ("dev", "dev-9", 4));
        assert_eq!(first.reasons.get("bad_signature"), Some(&2));
        let second = rx.try_recv().unwrap();
        assert_eq!((second.role.as_str(), second.instance.as_str()), ("unknown", "unknown"));
        assert!(rx.try_recv().is_err(), "one report each; dev-1 stayed under the burst");
        // A new window counts afresh.
        for _ in 0..4 {
            watch.observe(rejected("bad_signature", Some("dev-9")), t0 + SUMMARY_EVERY);
        }
        assert_eq!(rx.try_recv().unwrap().count, 4);
    }

    #[test]
    fn made_up_instance_names_past_the_bound_share_one_window() {
        let (watch, mut rx) = RejectionWatch::new(3);
        let t0 = Instant::now();
        for i in 0..MAX_SENDERS {
            watch.observe(rejected("bad_signature", Some(&format!("fake-{i}"))), t0);
        }
        for i in 0..4 {
            watch.observe(rejected("bad_signature", Some(&format!("more-{i}"))), t0);
        }
        let b = rx.try_recv().unwrap();
        assert_eq!((b.instance.as_str(), b.count), ("*", 4));
        assert_eq!(watch.windows.lock().unwrap().len(), MAX_SENDERS + 1);
    }
}
