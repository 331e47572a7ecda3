//! Every Redis key and hash field the ledger uses, and the time buckets that make
//! reservations lapse on their own.
//!
//! # One hash tag for the whole ledger
//! Every key starts with `fleet:budget:{ledger}:`. The ACL grants `fleet:budget:*` (so the
//! hash tag cannot come first), and the part in braces puts every ledger key in one Redis
//! Cluster slot, so each script — which always touches a day's hash together with a task's
//! — is legal on a cluster. Spreading the ledger over slots would buy nothing: every
//! reservation reads and writes the day's hash, so reservations are serialised on that
//! key's shard whatever the layout.
//!
//! # Keys
//! | key | type | content | kept |
//! |---|---|---|---|
//! | `…:day:YYYYMMDD` | hash | the UTC day's committed `t` (tokens), `m` (µ$), `calls`, `refusals`, `late` (commits of reservations that no longer held), `over` (commits above their reservation); held amounts: running totals `ht`, `hm`, earliest lapse `nx`, ring slots `h:<s>:t`, `h:<s>:m`, `h:<s>:e`; per role `r:<role>:t`, `r:<role>:m`, `r:<role>:calls`, `r:<role>:rerouted`; `x`, set with the expiry | [`USAGE_RETENTION`] from its first write |
//! | `…:task:<uuid>` | hash | the task's committed `t`, `m`, `calls` over its life; `ht`, `hm`, `nx` and ring slots as above; `x` | [`USAGE_RETENTION`] from its first write, refreshed every 32 commits |
//! | `…:res:<uuid>` | string | one reservation: `held <t> <m> <slot> <end>`, `released <t> <m> <slot> <end>` or `committed <found> <t> <m> <over>` | [`RECORD_RETENTION`] from its last change: what makes commit and release idempotent |
//!
//! # Buckets and ring slots: how held amounts lapse without a sweeper process
//! Time is cut into buckets of `bucket_ms` = ⌈TTL / [`BUCKETS`]⌉. A reservation made at
//! `now` joins bucket `n = ⌊(now + TTL) / bucket_ms⌋` and lapses when that bucket ends, at
//! `end = (n + 1) · bucket_ms`: between TTL and TTL + TTL/4 after it was made.
//!
//! Each scope (a day, a task) keeps what its reservations hold twice: as running totals
//! `ht`/`hm`, which a reservation checks against its limits (two fields to read), and per
//! bucket in a ring of [`RING`] slots — bucket `n` in slot `n mod RING`, whose fields are the
//! held tokens, the held µ$ and `e`, the bucket's end. `nx` is the earliest `e` in the ring.
//! When a reservation finds `nx` passed, it first sweeps the scope: every slot whose bucket
//! ended is taken off the totals and cleared. That is a crashed caller's hold lapsing: at
//! most one sweep per bucket and scope, a fixed amount of work whatever the number of
//! crashed callers, and no process has to run for it. Commit and release take their amounts
//! off the totals and the slot if the slot still holds their bucket (else a sweep already did).
//! Reports sum the slots whose bucket has not ended, so they are exact even before a sweep.
//!
//! Live reservations span at most TTL + 2 buckets = 6 buckets, so a ring of 8 never wraps
//! onto a live one while the processes' clocks agree within 2 buckets (TTL / 2). Should a
//! slot still hold another live bucket all the same (a caller's clock far behind), the two
//! share it and lapse at the later end: over-counted for a while, never under-counted.
//!
//! Time comes from the caller's clock (passed to the scripts), not Redis's `TIME`: tests
//! drive it, and `TIME` is not in the ACL. A process whose clock runs Δ ahead sees, and
//! sweeps, other processes' reservations as lapsed Δ early; with NTP (Δ ≪ TTL) that is moot.
//!
//! Per-role figures are committed spend only: soft limits do not count what is held, so
//! a reservation touches two hashes, not three.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Datelike, NaiveDate};
use envelope::Role;
use uuid::Uuid;

/// Every ledger key starts with this; see the module docs for the hash tag.
pub const PREFIX: &str = "fleet:budget:{ledger}:";

/// Buckets per reservation TTL. More: reservations lapse closer to their TTL, but every
/// script reads more fields.
pub const BUCKETS: u64 = 4;

/// Slots per scope: more than the buckets live reservations can span (TTL + 2 buckets).
pub const RING: u64 = 2 * BUCKETS;

/// How long usage hashes outlive their first write: long enough for a month's report.
pub const USAGE_RETENTION: Duration = Duration::from_secs(40 * 24 * 3600);

/// How long a reservation's record outlives its last change. A commit or release repeated
/// within this window does nothing; one repeated later is treated as a first commit of an
/// unknown reservation (and charges again).
pub const RECORD_RETENTION: Duration = Duration::from_secs(2 * 24 * 3600);

/// A UTC calendar day: the period of the daily limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Day(NaiveDate);

impl Day {
    /// The UTC day that contains `unix_ms`.
    pub fn from_unix_ms(unix_ms: u64) -> Self {
        let ms = i64::try_from(unix_ms).unwrap_or(i64::MAX);
        let date = DateTime::from_timestamp_millis(ms).map(|t| t.date_naive()).unwrap_or(NaiveDate::MAX);
        Day(date)
    }

    /// The day's date.
    pub fn date(self) -> NaiveDate {
        self.0
    }

    /// `YYYYMMDD`, as it appears in keys.
    pub fn compact(self) -> String {
        format!("{:04}{:02}{:02}", self.0.year(), self.0.month(), self.0.day())
    }
}

impl From<NaiveDate> for Day {
    fn from(date: NaiveDate) -> Self {
        Day(date)
    }
}

impl fmt::Display for Day {
    /// `YYYY-MM-DD`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.format("%Y-%m-%d"))
    }
}

/// A string that is neither `YYYY-MM-DD` nor `YYYYMMDD`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid day {0:?}: expected YYYY-MM-DD")]
pub struct InvalidDay(String);

impl FromStr for Day {
    type Err = InvalidDay;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NaiveDate::parse_from_str(s, "%Y-%m-%d")
            .or_else(|_| NaiveDate::parse_from_str(s, "%Y%m%d"))
            .map(Day)
            .map_err(|_| InvalidDay(s.to_owned()))
    }
}

/// The day's hash: committed counters and held slots, the fleet's and each role's.
pub(crate) fn day_key(day: Day) -> String {
    format!("{PREFIX}day:{}", day.compact())
}

/// The task's hash, over its whole life.
pub(crate) fn task_key(task: Uuid) -> String {
    format!("{PREFIX}task:{task}")
}

/// One reservation's record.
pub(crate) fn reservation_key(id: Uuid) -> String {
    format!("{PREFIX}res:{id}")
}

/// A slot's three field names: held tokens, held µ$, and the end of the bucket it holds.
pub(crate) fn slot_fields(slot: u64) -> [String; 3] {
    ["t", "m", "e"].map(|f| format!("h:{slot}:{f}"))
}

/// The fields a report reads: `counters`, then every slot's.
pub(crate) fn report_fields(counters: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = counters.iter().map(|c| (*c).to_owned()).collect();
    for s in 0..RING {
        v.extend(slot_fields(s));
    }
    v
}

/// A role's field in the day's hash: `r:<role>:<name>`.
pub(crate) fn role_field(role: Role, name: &str) -> String {
    format!("r:{role}:{name}")
}

/// Sums the held tokens and µ$ of the slots in `values` (three per slot: tokens, µ$, end)
/// whose bucket ends after `now_ms`.
pub(crate) fn held(values: &[Option<u64>], now_ms: u64) -> (u64, u64) {
    values.chunks_exact(3).fold((0, 0), |(t, m), slot| match slot {
        [tokens, micro, Some(end)] if *end > now_ms => (t + tokens.unwrap_or(0), m + micro.unwrap_or(0)),
        _ => (t, m),
    })
}

/// The bucket arithmetic for one reservation TTL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Buckets {
    /// Length of one bucket.
    pub(crate) bucket_ms: u64,
    /// The reservation TTL.
    ttl_ms: u64,
}

impl Buckets {
    pub(crate) fn new(ttl: Duration) -> Self {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        Self { bucket_ms: ttl_ms.div_ceil(BUCKETS), ttl_ms }
    }

    /// The bucket a reservation made at `now_ms` joins.
    pub(crate) fn target(&self, now_ms: u64) -> u64 {
        now_ms.saturating_add(self.ttl_ms) / self.bucket_ms
    }

    /// When bucket `n` ends: its reservations have lapsed from then on.
    pub(crate) fn end_ms(&self, n: u64) -> u64 {
        n.saturating_add(1).saturating_mul(self.bucket_ms)
    }

    /// Bucket `n`'s slot in the ring.
    pub(crate) fn slot(&self, n: u64) -> u64 {
        n % RING
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_under_the_acl_prefix_and_one_hash_tag() {
        let day: Day = "2030-01-31".parse().expect("day");
        let task = Uuid::nil();
        for key in [day_key(day), task_key(task), reservation_key(task)] {
            assert!(key.starts_with("fleet:budget:"), "{key}");
            // Redis hashes only the part between the first '{' and the next '}'.
            let open = key.find('{').expect("tag");
            let close = key[open..].find('}').expect("tag") + open;
            assert_eq!(&key[open + 1..close], "ledger", "{key}");
        }
        assert_eq!(day_key(day), "fleet:budget:{ledger}:day:20300131");
    }

    #[test]
    fn days_are_utc_and_parse_both_ways() {
        // 2030-01-01T00:00:00Z = 1_893_456_000 s.
        let midnight = 1_893_456_000_000;
        assert_eq!(Day::from_unix_ms(midnight).to_string(), "2030-01-01");
        assert_eq!(Day::from_unix_ms(midnight - 1).to_string(), "2029-12-31");
        assert_eq!("20300101".parse::<Day>(), Ok(Day::from_unix_ms(midnight)));
        assert!("2030-13-01".parse::<Day>().is_err());
    }

    #[test]
    fn a_reservation_lapses_between_ttl_and_ttl_plus_a_bucket() {
        let b = Buckets::new(Duration::from_secs(80));
        assert_eq!(b.bucket_ms, 20_000);
        for now in [0, 1, 19_999, 20_000, 123_456_789] {
            let end = b.end_ms(b.target(now));
            assert!(end > now + 80_000 && end <= now + 100_000, "now {now}: end {end}");
        }
    }

    #[test]
    fn live_reservations_never_share_a_slot_while_clocks_agree_within_two_buckets() {
        let b = Buckets::new(Duration::from_secs(80));
        let now = 1_000_000_000;
        // Reservations still live at `now` were made by clocks between now − TTL − 2 buckets
        // (a slow reserver, or an old reservation) and now + 2 buckets (a fast one).
        let oldest = b.target(now - 80_000 - 2 * b.bucket_ms);
        let newest = b.target(now + 2 * b.bucket_ms);
        let live: Vec<u64> = (oldest..=newest).filter(|n| b.end_ms(*n) > now).collect();
        assert!(live.len() as u64 <= RING, "{live:?}");
        let mut slots: Vec<u64> = live.iter().map(|n| b.slot(*n)).collect();
        slots.dedup();
        assert_eq!(slots.len(), live.len());
    }

    #[test]
    fn held_sums_only_slots_that_have_not_ended() {
        let v = [
            Some(10),
            Some(100),
            Some(5_000),
            Some(20),
            Some(200),
            Some(4_999),
            None,
            None,
            None,
            Some(1),
            None,
            Some(6_000),
        ];
        assert_eq!(held(&v, 4_999), (11, 100));
        assert_eq!(held(&v, 5_000), (1, 0));
    }

    #[test]
    fn field_names_match_the_scripts() {
        assert_eq!(slot_fields(7), ["h:7:t", "h:7:m", "h:7:e"]);
        assert_eq!(role_field(Role::Qa, "rerouted"), "r:qa:rerouted");
        let report = report_fields(&["t", "m"]);
        assert_eq!(report.len() as u64, 2 + 3 * RING);
        assert_eq!(&report[..5], ["t", "m", "h:0:t", "h:0:m", "h:0:e"]);
    }
}
