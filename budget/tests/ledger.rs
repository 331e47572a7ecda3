//! The ledger against a real redis-server: limits hold under concurrency, refusals carry
//! their figures, soft limits reroute, commits are idempotent, and the holds of callers
//! that never come back lapse after the TTL.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use budget::ledger::{
    Clock, Found, Ledger, LedgerConfig, LedgerError, LimitHit, ManualClock, MicroUsd, Price, Refusal, Release,
    ReserveError, RoleLimits, TaskCap, Unit,
};
use envelope::Role;
use fleet_testkit::RedisServer;
use secrecy::SecretString;
use uuid::Uuid;

/// 2030-01-01T12:00:00Z: noon, so a test's few minutes never cross midnight.
const NOON: u64 = 1_893_499_200_000;
const DAY_MS: u64 = 24 * 3600 * 1000;

const BIG: &str = "big-model";
const SMALL: &str = "small-model";

fn prices() -> BTreeMap<String, Price> {
    BTreeMap::from([
        // $3 / $15 per million tokens: 3 and 15 µ$ per token.
        (BIG.to_owned(), Price { input_micro_usd_per_mtok: 3_000_000, output_micro_usd_per_mtok: 15_000_000 }),
        // $0.25 / $1.25 per million: fractions of a µ$ per token.
        (SMALL.to_owned(), Price { input_micro_usd_per_mtok: 250_000, output_micro_usd_per_mtok: 1_250_000 }),
    ])
}

/// Generous limits (tests tighten the one they test) and an 80 s TTL: 20 s buckets.
fn config() -> LedgerConfig {
    LedgerConfig {
        daily_tokens: 100_000_000,
        daily_micro_usd: MicroUsd::from_dollars(1_000_000),
        per_task_tokens: 100_000_000,
        per_task_micro_usd: MicroUsd::from_dollars(1_000_000),
        prices: prices(),
        reservation_ttl: Duration::from_secs(80),
        ..LedgerConfig::default()
    }
}

struct Setup {
    /// Kept alive for the test; stops on drop.
    server: RedisServer,
    ledger: Ledger,
    clock: ManualClock,
}

fn pool(server: &RedisServer) -> bus::RedisPool {
    bus::pool(SecretString::from(server.url()), 64, Duration::from_secs(1)).unwrap()
}

fn setup(config: LedgerConfig) -> Setup {
    let server = RedisServer::start().expect("redis-server must be installed (apt-get install redis-server)");
    let clock = ManualClock::new(NOON);
    let ledger = Ledger::with_clock(pool(&server), config, Arc::new(clock.clone())).unwrap();
    Setup { server, ledger, clock }
}

fn refusal(r: Result<budget::ledger::Reservation, ReserveError>) -> Refusal {
    match r {
        Err(ReserveError::Refused(refusal)) => refusal,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// 50 tasks reserve 300 tokens at a time against a daily limit of 10 000 and commit the
/// full estimate: exactly ⌊10 000 / 300⌋ = 33 reservations succeed, and 9 900 tokens are
/// committed — never more than the limit, whatever the interleaving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_reservers_never_overspend_the_daily_limit() {
    let s = setup(LedgerConfig { daily_tokens: 10_000, ..config() });
    let granted = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..50 {
        let ledger = s.ledger.clone();
        let granted = granted.clone();
        workers.push(tokio::spawn(async move {
            let task = Uuid::now_v7();
            loop {
                match ledger.reserve(task, Role::Dev, BIG, 100, 200).await {
                    Ok(r) => {
                        granted.fetch_add(1, Ordering::Relaxed);
                        let c = ledger.commit(&r, 100, 200).await.unwrap();
                        assert_eq!((c.found, c.exceeded_reservation, c.duplicate), (Found::Held, false, false));
                    }
                    Err(ReserveError::Refused(Refusal::DailyLimit { hit, .. })) => {
                        assert!(hit.committed + hit.held + hit.requested > hit.limit, "{hit}");
                        return;
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(granted.load(Ordering::Relaxed), 10_000 / 300);
    let day = s.ledger.usage(s.ledger.today()).await.unwrap();
    assert_eq!(day.usage.tokens, 33 * 300);
    assert_eq!(day.usage.calls, 33);
    assert_eq!(day.usage.held_tokens, 0);
    assert_eq!(day.refusals, 50);
}

/// 50 callers on one task against its money limit, committing between 0 and 100% of their
/// estimate and sometimes releasing instead: committed money never exceeds the limit, and
/// nothing stays held once they are done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_callers_on_one_task_stay_within_its_money_limit() {
    // One call of 1000 in + 500 out on the big model costs 3000 + 7500 = 10 500 µ$.
    let limit = MicroUsd(500_000);
    let s = setup(LedgerConfig { per_task_micro_usd: limit, ..config() });
    let task = Uuid::now_v7();
    let mut workers = Vec::new();
    for w in 0..50u64 {
        let ledger = s.ledger.clone();
        workers.push(tokio::spawn(async move {
            let (mut granted, mut refused) = (0u64, 0u64);
            for i in 0..20u64 {
                match ledger.reserve(task, Role::Qa, BIG, 1_000, 500).await {
                    Ok(r) => {
                        granted += 1;
                        // A cheap deterministic spread of actual figures, all ≤ the estimate.
                        let k = (w * 31 + i * 17) % 11;
                        if k == 10 {
                            assert_eq!(ledger.release(&r).await.unwrap(), Release::Released);
                        } else {
                            let c = ledger.commit(&r, 1_000 * k / 10, 500 * k / 10).await.unwrap();
                            assert!(!c.exceeded_reservation);
                        }
                    }
                    Err(ReserveError::Refused(Refusal::TaskLimit { task_id, hit })) => {
                        assert_eq!(task_id, task);
                        assert_eq!((hit.unit, hit.limit), (Unit::MicroUsd, limit.0));
                        refused += 1;
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            (granted, refused)
        }));
    }
    let (mut granted, mut refused) = (0, 0);
    for w in workers {
        let (g, r) = w.await.unwrap();
        granted += g;
        refused += r;
    }
    let usage = s.ledger.task_usage(task).await.unwrap();
    assert!(usage.usage.cost <= limit, "{usage:?}");
    assert_eq!((usage.usage.held_tokens, usage.usage.held_cost), (0, MicroUsd::ZERO));
    assert_eq!(granted + refused, 1_000);
    assert!(granted >= 500_000 / 10_500, "at least the full-estimate count fits: {granted}");
    assert!(refused > 0, "the limit was reached");
}

/// 50 callers on one task reserve against a cap of their own (a capability lease's 10 000
/// tokens and 50 000 µ$) far below the ledger's per-task limits: exactly as many fit as the
/// tighter of the two caps allows, whatever the interleaving, and the refusals name the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_callers_on_one_task_stay_within_the_cap_they_pass() {
    let s = setup(config());
    let cap = TaskCap { tokens: 10_000, cost: MicroUsd(50_000) };
    for (task, input, output, fits, unit, limit) in [
        // 1 907 tokens, 1 807 × 3 + 100 × 15 = 6 921 µ$: tokens bind, 5 fit.
        (Uuid::now_v7(), 1_807, 100, 5, Unit::Tokens, 10_000),
        // 507 tokens, 7 × 3 + 500 × 15 = 7 521 µ$: money binds, 6 fit.
        (Uuid::now_v7(), 7, 500, 6, Unit::MicroUsd, 50_000),
    ] {
        let mut callers = tokio::task::JoinSet::new();
        for _ in 0..50 {
            let ledger = s.ledger.clone();
            callers.spawn(async move { ledger.reserve_within(task, Role::Dev, BIG, input, output, cap).await });
        }
        let (mut held, mut refused) = (Vec::new(), 0);
        while let Some(r) = callers.join_next().await {
            match r.unwrap() {
                Ok(r) => held.push(r),
                Err(ReserveError::Refused(Refusal::TaskLimit { task_id, hit })) => {
                    assert_eq!((task_id, hit.unit, hit.limit), (task, unit, limit));
                    refused += 1;
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!((held.len(), refused), (fits, 50 - fits));
        let usage = s.ledger.task_usage(task).await.unwrap().usage;
        assert_eq!(usage.held_tokens, fits as u64 * (input + output));
        assert!(usage.held_tokens <= cap.tokens && usage.held_cost <= cap.cost, "{usage:?}");
        // The ledger's own limits still apply to a cap above them.
        let loose = TaskCap { tokens: u64::MAX, cost: MicroUsd(u64::MAX) };
        let lax = s.ledger.reserve_within(Uuid::now_v7(), Role::Dev, BIG, 1, 1, loose).await.unwrap();
        assert_eq!(lax.tokens, 2);
    }
    let capped = setup(LedgerConfig { per_task_tokens: 1_000, ..config() });
    let loose = TaskCap { tokens: 1_000_000, cost: MicroUsd(u64::MAX) };
    let r = refusal(capped.ledger.reserve_within(Uuid::now_v7(), Role::Dev, BIG, 600, 401, loose).await);
    assert!(matches!(r, Refusal::TaskLimit { hit: LimitHit { limit: 1_000, .. }, .. }), "{r:?}");
}

#[tokio::test]
async fn a_task_over_its_limit_is_refused_with_the_figures() {
    let s = setup(LedgerConfig { per_task_tokens: 1_000, ..config() });
    let task = Uuid::now_v7();
    let first = s.ledger.reserve(task, Role::Dev, BIG, 100, 500).await.unwrap();
    assert_eq!((first.tokens, first.cost), (600, MicroUsd(100 * 3 + 500 * 15)));

    let r = refusal(s.ledger.reserve(task, Role::Dev, BIG, 100, 400).await);
    let hit = LimitHit { unit: Unit::Tokens, committed: 0, held: 600, requested: 500, limit: 1_000 };
    assert_eq!(r, Refusal::TaskLimit { task_id: task, hit });
    assert_eq!(
        r.to_string(),
        format!("task {task} is over its budget: 0 tokens committed + 600 held + 500 requested > limit 1000")
    );

    // Committing for less frees the rest: 400 + 500 fits.
    s.ledger.commit(&first, 100, 300).await.unwrap();
    let second = s.ledger.reserve(task, Role::Dev, BIG, 100, 400).await.unwrap();
    let r = refusal(s.ledger.reserve(task, Role::Dev, BIG, 100, 100).await);
    assert_eq!(
        r,
        Refusal::TaskLimit {
            task_id: task,
            hit: LimitHit { unit: Unit::Tokens, committed: 400, held: 500, requested: 200, limit: 1_000 }
        }
    );
    // Other tasks are not affected.
    s.ledger.reserve(Uuid::now_v7(), Role::Dev, BIG, 100, 400).await.unwrap();
    s.ledger.release(&second).await.unwrap();

    let usage = s.ledger.task_usage(task).await.unwrap();
    assert_eq!((usage.usage.tokens, usage.usage.calls, usage.usage.held_tokens), (400, 1, 0));
    assert_eq!(usage.limit_tokens, 1_000);
}

#[tokio::test]
async fn the_day_over_its_money_limit_is_refused_before_the_task() {
    // Both limits would be crossed by the second call: the day's refusal wins.
    let s = setup(LedgerConfig { daily_micro_usd: MicroUsd(20_000), per_task_micro_usd: MicroUsd(15_000), ..config() });
    let task = Uuid::now_v7();
    let r = s.ledger.reserve(task, Role::Review, BIG, 1_000, 500).await.unwrap(); // 10 500 µ$
    s.ledger.commit(&r, 1_000, 500).await.unwrap();
    let other = s.ledger.reserve(Uuid::now_v7(), Role::Review, BIG, 1_000, 0).await.unwrap(); // 3 000 µ$ held

    let refused = refusal(s.ledger.reserve(task, Role::Review, BIG, 1_000, 500).await);
    let Refusal::DailyLimit { day, hit } = refused else { panic!("{refused:?}") };
    assert_eq!(day, s.ledger.today());
    assert_eq!(
        hit,
        LimitHit { unit: Unit::MicroUsd, committed: 10_500, held: 3_000, requested: 10_500, limit: 20_000 }
    );

    // Within the day but over the task: the task's refusal.
    let refused = refusal(s.ledger.reserve(task, Role::Review, BIG, 1_000, 200).await);
    assert!(matches!(refused, Refusal::TaskLimit { hit: LimitHit { unit: Unit::MicroUsd, .. }, .. }), "{refused:?}");

    s.ledger.commit(&other, 1_000, 0).await.unwrap();
    let usage = s.ledger.usage(s.ledger.today()).await.unwrap();
    assert_eq!(usage.usage.cost, MicroUsd(13_500));
    assert_eq!(usage.refusals, 2);
    assert!(!usage.exhausted());

    // Tomorrow the daily limit starts afresh; the task's limit does not.
    s.clock.advance(Duration::from_millis(DAY_MS));
    let fresh = s.ledger.reserve(Uuid::now_v7(), Role::Review, BIG, 1_000, 500).await.unwrap();
    s.ledger.release(&fresh).await.unwrap();
    let refused = refusal(s.ledger.reserve(task, Role::Review, BIG, 1_000, 500).await);
    assert!(matches!(refused, Refusal::TaskLimit { .. }), "{refused:?}");
}

#[tokio::test]
async fn a_role_over_its_soft_limit_is_flagged_and_moved_to_its_cheaper_model() {
    let per_role = BTreeMap::from([
        (
            Role::Dev,
            RoleLimits { soft_tokens: Some(1_000), soft_micro_usd: None, cheaper_model: Some(SMALL.to_owned()) },
        ),
        (Role::Qa, RoleLimits { soft_tokens: None, soft_micro_usd: Some(MicroUsd(5_000)), cheaper_model: None }),
    ]);
    let s = setup(LedgerConfig { per_role, ..config() });
    let task = Uuid::now_v7();

    let r = s.ledger.reserve(task, Role::Dev, BIG, 100, 500).await.unwrap();
    assert!(!r.soft_limit_exceeded && !r.rerouted());
    assert_eq!(r.model, BIG);
    // Held reservations do not count towards a soft limit: 0 committed + 600 ≤ 1000.
    let also = s.ledger.reserve(task, Role::Dev, BIG, 100, 500).await.unwrap();
    assert!(!also.soft_limit_exceeded);
    s.ledger.commit(&r, 100, 500).await.unwrap();
    s.ledger.release(&also).await.unwrap();
    // Committed ones do: 600 + 600 > 1000.
    let moved = s.ledger.reserve(task, Role::Dev, BIG, 100, 500).await.unwrap();
    assert!(moved.soft_limit_exceeded && moved.rerouted());
    assert_eq!((moved.requested_model.as_str(), moved.model.as_str()), (BIG, SMALL));
    // Priced with the small model: 100 × 0.25 + 500 × 1.25 = 650 µ$.
    assert_eq!(moved.cost, MicroUsd(650));
    // And committed with it.
    let c = s.ledger.commit(&moved, 100, 500).await.unwrap();
    assert_eq!(c.cost, MicroUsd(650));

    // Other roles are not affected by dev's usage.
    let review = s.ledger.reserve(task, Role::Review, BIG, 100, 500).await.unwrap();
    assert!(!review.soft_limit_exceeded);

    // Without a cheaper model the flag is all the caller gets.
    let qa = s.ledger.reserve(task, Role::Qa, BIG, 1_000, 500).await.unwrap(); // 10 500 µ$ > 5 000
    assert!(qa.soft_limit_exceeded && !qa.rerouted());
    assert_eq!(qa.model, BIG);
    s.ledger.commit(&qa, 1_000, 100).await.unwrap(); // 4 500 µ$

    let today = s.ledger.today();
    let dev = s.ledger.role_usage(Role::Dev, today).await.unwrap();
    assert_eq!((dev.tokens, dev.cost, dev.calls, dev.rerouted), (1_200, MicroUsd(7_800 + 650), 2, 1));
    assert_eq!(dev.limits.unwrap().soft_tokens, Some(1_000));
    let qa = s.ledger.role_usage(Role::Qa, today).await.unwrap();
    assert_eq!((qa.tokens, qa.cost, qa.calls, qa.rerouted), (1_100, MicroUsd(4_500), 1, 0));
    let refactor = s.ledger.role_usage(Role::Refactor, today).await.unwrap();
    assert_eq!((refactor.tokens, refactor.calls, refactor.limits), (0, 0, None));
}

#[tokio::test]
async fn costs_are_rounded_up_to_the_micro_dollar_once() {
    let s = setup(config());
    let task = Uuid::now_v7();
    // 1 × 0.25 + 1 × 1.25 = 1.5 µ$ → 2 µ$.
    let r = s.ledger.reserve(task, Role::Dev, SMALL, 1, 1).await.unwrap();
    assert_eq!(r.cost, MicroUsd(2));
    // 3 × 0.25 = 0.75 µ$ → 1 µ$; 0 tokens cost nothing.
    let c = s.ledger.commit(&r, 3, 0).await.unwrap();
    assert_eq!((c.tokens, c.cost), (3, MicroUsd(1)));
    let r = s.ledger.reserve(task, Role::Dev, SMALL, 0, 0).await.unwrap();
    assert_eq!(r.cost, MicroUsd::ZERO);
    let c = s.ledger.commit(&r, 0, 0).await.unwrap();
    assert_eq!(c.cost, MicroUsd::ZERO);
    assert_eq!(s.ledger.task_usage(task).await.unwrap().usage.cost, MicroUsd(1));
}

#[tokio::test]
async fn commit_is_idempotent_and_release_after_it_does_nothing() {
    let s = setup(config());
    let task = Uuid::now_v7();
    let r = s.ledger.reserve(task, Role::Dev, BIG, 1_000, 1_000).await.unwrap();
    let first = s.ledger.commit(&r, 800, 200).await.unwrap();
    assert_eq!((first.tokens, first.cost, first.found, first.duplicate), (1_000, MicroUsd(5_400), Found::Held, false));
    // A repeat with other figures charges nothing and reports the first commit.
    let again = s.ledger.commit(&r, 1_000, 1_000).await.unwrap();
    assert_eq!(again, budget::ledger::Commit { duplicate: true, ..first });
    assert_eq!(s.ledger.release(&r).await.unwrap(), Release::AlreadyCommitted);

    let usage = s.ledger.task_usage(task).await.unwrap().usage;
    assert_eq!((usage.tokens, usage.cost, usage.calls, usage.held_tokens), (1_000, MicroUsd(5_400), 1, 0));
}

#[tokio::test]
async fn release_frees_the_hold_without_charge() {
    let s = setup(LedgerConfig { per_task_tokens: 1_000, ..config() });
    let task = Uuid::now_v7();
    let r = s.ledger.reserve(task, Role::Dev, BIG, 0, 1_000).await.unwrap();
    assert!(matches!(refusal(s.ledger.reserve(task, Role::Dev, BIG, 0, 1).await), Refusal::TaskLimit { .. }));
    assert_eq!(s.ledger.task_usage(task).await.unwrap().usage.held_tokens, 1_000);

    assert_eq!(s.ledger.release(&r).await.unwrap(), Release::Released);
    assert_eq!(s.ledger.release(&r).await.unwrap(), Release::AlreadyReleased);
    let usage = s.ledger.task_usage(task).await.unwrap().usage;
    assert_eq!((usage.tokens, usage.held_tokens, usage.held_cost), (0, 0, MicroUsd::ZERO));
    let again = s.ledger.reserve(task, Role::Dev, BIG, 0, 1_000).await.unwrap();

    // A commit after a release still charges (the call happened after all), flagged late.
    let c = s.ledger.commit(&r, 0, 10).await.unwrap();
    assert_eq!((c.found, c.tokens), (Found::Released, 10));
    s.ledger.release(&again).await.unwrap();
    assert_eq!(s.ledger.usage(s.ledger.today()).await.unwrap().late_commits, 1);
}

/// A caller reserves and crashes. Its hold blocks others until the reservation lapses,
/// and not a moment longer; a process started afterwards sees the full headroom.
#[tokio::test]
async fn a_crashed_caller_s_hold_lapses_after_the_ttl() {
    let s = setup(LedgerConfig { daily_tokens: 1_000, ..config() });
    let crashed = {
        let ledger = Ledger::with_clock(pool(&s.server), s.ledger.config().clone(), Arc::new(s.clock.clone())).unwrap();
        ledger.reserve(Uuid::now_v7(), Role::Dev, BIG, 200, 800).await.unwrap()
        // The ledger and its pool are dropped: nobody will commit or release.
    };
    // Between the TTL (80 s) and the TTL plus one bucket (a quarter of it).
    let lapse = crashed.expires_at_ms - NOON;
    assert!((80_001..=100_000).contains(&lapse), "{lapse}");

    let today = s.ledger.today();
    s.clock.set(crashed.expires_at_ms - 1);
    assert_eq!(s.ledger.usage(today).await.unwrap().usage.held_tokens, 1_000);
    let r = refusal(s.ledger.reserve(Uuid::now_v7(), Role::Dev, BIG, 0, 1).await);
    assert!(matches!(r, Refusal::DailyLimit { hit: LimitHit { held: 1_000, .. }, .. }), "{r:?}");

    s.clock.set(crashed.expires_at_ms);
    let day = s.ledger.usage(today).await.unwrap();
    assert_eq!((day.usage.held_tokens, day.usage.held_cost, day.usage.tokens), (0, MicroUsd::ZERO, 0));
    let full = s.ledger.reserve(Uuid::now_v7(), Role::Dev, BIG, 0, 1_000).await.unwrap();
    s.ledger.release(&full).await.unwrap();

    // Should the caller come back after all, its call is charged, as a late commit.
    let c = s.ledger.commit(&crashed, 200, 700).await.unwrap();
    assert_eq!((c.found, c.tokens, c.duplicate), (Found::Lapsed, 900, false));
    let day = s.ledger.usage(today).await.unwrap();
    assert_eq!((day.usage.tokens, day.late_commits, day.usage.held_tokens), (900, 1, 0));
    // Releasing a lapsed reservation is harmless.
    let r2 = s.ledger.reserve(Uuid::now_v7(), Role::Dev, BIG, 0, 100).await.unwrap();
    s.clock.set(r2.expires_at_ms);
    assert_eq!(s.ledger.release(&r2).await.unwrap(), Release::Lapsed);
    assert_eq!(s.ledger.usage(today).await.unwrap().usage.held_tokens, 0);
}

/// Many callers crash at once: the hold of each lapses at the same cost to the next
/// reserver as one (no sweep work).
#[tokio::test]
async fn many_crashed_callers_lapse_together() {
    let s = setup(LedgerConfig { daily_tokens: 100_000, ..config() });
    let mut last = 0;
    for i in 0..200u64 {
        s.clock.set(NOON + i * 300); // spread over a minute: several buckets
        last = s.ledger.reserve(Uuid::now_v7(), Role::Dev, BIG, 100, 400).await.unwrap().expires_at_ms;
    }
    assert!(matches!(
        refusal(s.ledger.reserve(Uuid::now_v7(), Role::Dev, BIG, 0, 1).await),
        Refusal::DailyLimit { .. }
    ));
    s.clock.set(last);
    let day = s.ledger.usage(s.ledger.today()).await.unwrap();
    assert_eq!(day.usage.held_tokens, 0);
    s.ledger.reserve(Uuid::now_v7(), Role::Dev, BIG, 0, 100_000).await.unwrap();
}

#[tokio::test]
async fn a_commit_above_its_reservation_is_charged_and_flagged() {
    let s = setup(LedgerConfig { per_task_tokens: 1_000, ..config() });
    let task = Uuid::now_v7();
    let r = s.ledger.reserve(task, Role::Dev, BIG, 500, 500).await.unwrap();
    let c = s.ledger.commit(&r, 700, 500).await.unwrap();
    assert!(c.exceeded_reservation);
    assert_eq!((c.tokens, c.found), (1_200, Found::Held));
    let usage = s.ledger.task_usage(task).await.unwrap();
    assert_eq!(usage.usage.tokens, 1_200, "the spend happened: charged in full, over the limit");
    assert_eq!(s.ledger.usage(s.ledger.today()).await.unwrap().over_commits, 1);
    assert!(matches!(refusal(s.ledger.reserve(task, Role::Dev, BIG, 0, 0).await), Refusal::TaskLimit { .. }));
}

#[tokio::test]
async fn unknown_models_and_absurd_estimates_are_errors_not_refusals() {
    let s = setup(config());
    let task = Uuid::now_v7();
    let e = s.ledger.reserve(task, Role::Dev, "mystery", 1, 1).await.unwrap_err();
    assert!(matches!(e, ReserveError::Ledger(LedgerError::UnknownModel(ref m)) if m == "mystery"), "{e}");
    let e = s.ledger.reserve(task, Role::Dev, BIG, u64::MAX, 1).await.unwrap_err();
    assert!(matches!(e, ReserveError::Ledger(LedgerError::TooLarge(_))), "{e}");
    let r = s.ledger.reserve(task, Role::Dev, BIG, 1, 1).await.unwrap();
    let unknown = s.ledger.commit(&r, u64::MAX, 0).await.unwrap_err();
    assert!(matches!(unknown, LedgerError::TooLarge(_)), "{unknown}");
}

#[tokio::test]
async fn redis_down_is_a_ledger_error() {
    let mut s = setup(config());
    s.server.kill();
    let e = s.ledger.reserve(Uuid::now_v7(), Role::Dev, BIG, 1, 1).await.unwrap_err();
    assert!(matches!(e, ReserveError::Ledger(LedgerError::Redis(_) | LedgerError::Pool(_))), "{e}");
}

/// The scripts call only what the broker's ACL lets the ledger's users run
/// (`fleetctl/src/acl.rs`, `LEDGER_COMMANDS` on `fleet:budget:*`): Redis checks every
/// command a script runs against the caller's permissions.
#[tokio::test]
async fn the_scripts_run_under_the_ledger_acl() {
    let s = setup(LedgerConfig { per_task_tokens: 1_000, ..config() });
    let acl = include_str!("../../fleetctl/src/acl.rs");
    let start = acl.find("pub const LEDGER_COMMANDS: &[&str] = &[").expect("LEDGER_COMMANDS in fleetctl/src/acl.rs");
    let list = &acl[start..start + acl[start..].find("];").unwrap()];
    let commands: Vec<&str> = list.split('"').skip(1).step_by(2).collect();
    assert!(commands.contains(&"evalsha"), "{commands:?}");

    let client = redis::Client::open(s.server.url()).unwrap();
    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    let mut setuser = redis::cmd("ACL");
    setuser.arg("SETUSER").arg("ledger").arg("reset").arg("on").arg(">pw").arg("~fleet:budget:*").arg("resetchannels");
    for c in &commands {
        setuser.arg(format!("+{c}"));
    }
    let () = setuser.query_async(&mut admin).await.unwrap();

    let url = format!("redis://ledger:pw@127.0.0.1:{}", s.server.port());
    let pool = bus::pool(SecretString::from(url), 4, Duration::from_secs(1)).unwrap();
    let ledger = Ledger::with_clock(pool, s.ledger.config().clone(), Arc::new(s.clock.clone())).unwrap();
    let task = Uuid::now_v7();
    let r = ledger.reserve(task, Role::Dev, BIG, 100, 400).await.unwrap();
    let other = ledger.reserve(task, Role::Dev, BIG, 100, 400).await.unwrap();
    assert!(matches!(refusal(ledger.reserve(task, Role::Dev, BIG, 100, 400).await), Refusal::TaskLimit { .. }));
    ledger.commit(&r, 100, 300).await.unwrap();
    ledger.commit(&r, 100, 300).await.unwrap();
    ledger.release(&other).await.unwrap();
    let usage = ledger.task_usage(task).await.unwrap();
    assert_eq!((usage.usage.tokens, usage.usage.held_tokens), (400, 0));
    ledger.usage(ledger.today()).await.unwrap();
    ledger.role_usage(Role::Dev, ledger.today()).await.unwrap();
}

/// A small deterministic generator (xorshift64*), so a failure replays exactly.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) % n
    }
}

/// Two hours of random traffic from 23:00, across midnight and through hundreds of bucket
/// ends (the ring of slots wraps every 160 s): reservations, commits at or below the
/// estimate, commits of lapsed ones, releases, and callers that never come back. Before
/// every reservation an in-test model predicts the outcome from first principles (committed
/// plus the reservations that have not lapsed): every grant and every refusal, with its
/// figures, and every reported held amount must match it exactly.
#[tokio::test]
async fn held_amounts_match_a_model_through_many_ring_wraps_and_midnight() {
    struct Open {
        r: budget::ledger::Reservation,
        /// Its caller is gone: it is never committed or released, only lapses.
        crashed: bool,
    }
    const DAILY: u64 = 25_000;
    let s = setup(LedgerConfig { daily_tokens: DAILY, per_task_tokens: 4_000, ..config() });
    let start = NOON + 11 * 3600 * 1000; // 23:00
    s.clock.set(start);
    let mut tasks: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut open: Vec<Open> = Vec::new();
    let mut day_committed: BTreeMap<budget::ledger::Day, u64> = BTreeMap::new();
    let mut task_committed: BTreeMap<Uuid, u64> = BTreeMap::new();
    let (mut granted, mut refused, mut lapsed_commits) = (0, [0, 0], 0);

    while s.clock.now_ms() < start + 2 * 3600 * 1000 {
        s.clock.advance(Duration::from_millis(rng.below(6_000)));
        let now = s.clock.now_ms();
        let today = s.ledger.today();
        let live = |o: &&Open| o.r.expires_at_ms > now;
        // Tasks come and go, so that both kinds of limit keep being reached.
        if rng.below(50) == 0 {
            tasks[rng.below(3) as usize] = Uuid::now_v7();
        }
        // Lapsed reservations of crashed callers are gone for good.
        open.retain(|o| !o.crashed || o.r.expires_at_ms > now);
        /// Takes a random reservation whose caller is still there.
        fn take(open: &mut Vec<Open>, rng: &mut Rng) -> Open {
            let alive: Vec<usize> = (0..open.len()).filter(|i| !open[*i].crashed).collect();
            open.swap_remove(alive[rng.below(alive.len() as u64) as usize])
        }
        match rng.below(10) {
            // Reserve.
            0..=4 => {
                let task = tasks[rng.below(3) as usize];
                let (input, output) = (rng.below(300), rng.below(700));
                let tokens = input + output;
                let day_held: u64 = open.iter().filter(live).filter(|o| o.r.day == today).map(|o| o.r.tokens).sum();
                let task_held: u64 = open.iter().filter(live).filter(|o| o.r.task_id == task).map(|o| o.r.tokens).sum();
                let day_done = day_committed.get(&today).copied().unwrap_or(0);
                let task_done = task_committed.get(&task).copied().unwrap_or(0);
                let result = s.ledger.reserve(task, Role::Dev, BIG, input, output).await;
                if day_done + day_held + tokens > DAILY {
                    let hit = LimitHit {
                        unit: Unit::Tokens,
                        committed: day_done,
                        held: day_held,
                        requested: tokens,
                        limit: DAILY,
                    };
                    assert_eq!(refusal(result), Refusal::DailyLimit { day: today, hit });
                    refused[0] += 1;
                } else if task_done + task_held + tokens > 4_000 {
                    let hit = LimitHit {
                        unit: Unit::Tokens,
                        committed: task_done,
                        held: task_held,
                        requested: tokens,
                        limit: 4_000,
                    };
                    assert_eq!(refusal(result), Refusal::TaskLimit { task_id: task, hit });
                    refused[1] += 1;
                } else {
                    open.push(Open { r: result.unwrap(), crashed: false });
                    granted += 1;
                }
            }
            // Commit one, at or below its estimate (or a lapsed one: charged all the same).
            5..=6 if open.iter().any(|o| !o.crashed) => {
                let o = take(&mut open, &mut rng);
                let (input, output) = (rng.below(o.r.input_tokens + 1), rng.below(o.r.output_tokens + 1));
                let c = s.ledger.commit(&o.r, input, output).await.unwrap();
                let expected = if o.r.expires_at_ms > now { Found::Held } else { Found::Lapsed };
                assert_eq!((c.found, c.tokens, c.duplicate), (expected, input + output, false));
                lapsed_commits += u64::from(expected == Found::Lapsed);
                *day_committed.entry(o.r.day).or_default() += input + output;
                *task_committed.entry(o.r.task_id).or_default() += input + output;
            }
            // Release one.
            7 if open.iter().any(|o| !o.crashed) => {
                let o = take(&mut open, &mut rng);
                let expected = if o.r.expires_at_ms > now { Release::Released } else { Release::Lapsed };
                assert_eq!(s.ledger.release(&o.r).await.unwrap(), expected);
            }
            // A caller that never comes back: forget it (it lapses on its own).
            8 if open.iter().any(|o| !o.crashed) => {
                let o = take(&mut open, &mut rng);
                open.push(Open { crashed: true, ..o });
            }
            // Look at the reports.
            _ => {
                let day = s.ledger.usage(today).await.unwrap();
                let held: u64 = open.iter().filter(live).filter(|o| o.r.day == today).map(|o| o.r.tokens).sum();
                assert_eq!(day.usage.held_tokens, held, "day held at {now}");
                assert_eq!(day.usage.tokens, day_committed.get(&today).copied().unwrap_or(0));
                assert!(day.usage.tokens <= DAILY, "commits never exceed their reservations here");
                let task = tasks[rng.below(3) as usize];
                let t = s.ledger.task_usage(task).await.unwrap();
                let held: u64 = open.iter().filter(live).filter(|o| o.r.task_id == task).map(|o| o.r.tokens).sum();
                assert_eq!(
                    (t.usage.held_tokens, t.usage.tokens),
                    (held, task_committed.get(&task).copied().unwrap_or(0))
                );
            }
        }
    }
    assert!(day_committed.len() == 2, "crossed midnight: {day_committed:?}");
    assert!(
        granted > 300 && refused[0] > 20 && refused[1] > 20 && lapsed_commits > 5,
        "{granted} granted, {refused:?} refused (day, task), {lapsed_commits} late"
    );
}

/// A process whose clock is two TTLs behind puts its reservation into the ring slot of a
/// live one made by an accurate clock. The two share the slot and lapse together at the
/// later end: held amounts are over-counted until then, never under-counted, so the limit
/// still holds. (A clock that far *ahead* would see the other reservation as lapsed: the
/// ledger trusts its callers' clocks to agree within a fraction of the TTL.)
#[tokio::test]
async fn a_slow_clock_shares_a_slot_and_over_counts_but_never_under_counts() {
    let s = setup(LedgerConfig { daily_tokens: 1_000, ..config() });
    let slow =
        Ledger::with_clock(pool(&s.server), s.ledger.config().clone(), Arc::new(ManualClock::new(NOON - 160_000)))
            .unwrap();
    let a = s.ledger.reserve(Uuid::now_v7(), Role::Dev, BIG, 0, 400).await.unwrap();
    let b = slow.reserve(Uuid::now_v7(), Role::Dev, BIG, 0, 400).await.unwrap();
    assert_eq!(b.expires_at_ms + 160_000, a.expires_at_ms, "one ring apart: the same slot");
    let r = refusal(s.ledger.reserve(Uuid::now_v7(), Role::Dev, BIG, 0, 201).await);
    assert!(matches!(r, Refusal::DailyLimit { hit: LimitHit { held: 800, .. }, .. }), "{r:?}");
    // The slot now lapses with `a`: committing `b` cannot free `b`'s share, `a`'s can.
    slow.commit(&b, 0, 0).await.unwrap();
    assert_eq!(s.ledger.usage(s.ledger.today()).await.unwrap().usage.held_tokens, 800);
    s.ledger.commit(&a, 0, 0).await.unwrap();
    assert_eq!(s.ledger.usage(s.ledger.today()).await.unwrap().usage.held_tokens, 400);
    s.clock.set(a.expires_at_ms);
    assert_eq!(s.ledger.usage(s.ledger.today()).await.unwrap().usage.held_tokens, 0);
    s.ledger.reserve(Uuid::now_v7(), Role::Dev, BIG, 0, 1_000).await.unwrap();
}
