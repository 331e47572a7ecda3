//! Kill-switch propagation: from [`KillSwitch::engage`] to the last of 100 consumers no
//! longer claiming. Results: docs/benchmarks.md, "Kill switch".
//!
//! Run with `cargo run --release -p budget --example propagation [-- --consumers 100 --runs 30]`.
//!
//! 100 `bus::Consumer`s of `fleet:tasks:dev` (group `dev`), each with its own
//! `ControlListener` on `fleet:control:dev` and its own `Gate`, against one local
//! redis-server. Each run engages the switch with the budget crate's `KillSwitch::engage`
//! (the Lua record, then the signed pauses to every role) and measures the time until every
//! gate is paused: a consumer's blocked `XREADGROUP` races its gate, so the read returns in
//! the same wake-up, and it claims nothing until the gate opens. Then it resumes
//! (`KillSwitch::resume`) and waits until every gate is open again. Prints p50/p99/max, and
//! as a baseline the round trip of one `XADD` + `XREAD` notification to one listener
//! (a bare `PING` round trip too), measured in the same run.

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use budget::alert::{AlertSender, AlertsConfig};
use budget::killswitch::KillSwitch;
use bus::{Consumer, ConsumerConfig, ControlListener, Delivery, Gate, Handler, HandlerError, KillEpoch, Publisher};
use envelope::*;
use fleet_testkit::RedisServer;
use tokio_util::sync::CancellationToken;

struct Nothing;

impl Handler for Nothing {
    async fn handle(&self, _: Delivery) -> Result<(), HandlerError> {
        Ok(())
    }
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn show(name: &str, mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    let p50 = pct(&v, 0.5);
    println!(
        "{name:<48} n={:<4} p50={:>8.3} ms  p99={:>8.3} ms  max={:>8.3} ms",
        v.len(),
        p50.as_secs_f64() * 1e3,
        pct(&v, 0.99).as_secs_f64() * 1e3,
        v[v.len() - 1].as_secs_f64() * 1e3
    );
    p50
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let consumers = arg("--consumers", 100);
    let runs = arg("--runs", 30);
    let redis = RedisServer::start().expect("redis-server must be installed");
    let url: secrecy::SecretString = redis.url().into();
    let perms = PermissionTable::parse(include_str!("../../config/permissions.toml")).unwrap();
    let master = MasterFile::new(MasterSecret::from_bytes([1; 32]));
    let ring = |r: Role| Keyring::derive(&master, Process::Role(r), &perms).unwrap();
    let dev_verifier = Arc::new(Verifier::new(ring(Role::Dev), perms.clone(), VerifierConfig::default()));
    let pool = bus::pool(&url, 2 * consumers + 16, Duration::from_secs(2)).unwrap();
    let publisher =
        Arc::new(Publisher::new(pool.clone(), Arc::new(ring(Role::Budget)), bus::PublisherConfig::default()));
    let alerts = AlertSender::new(pool.clone(), &AlertsConfig::default());
    let switch = KillSwitch::new(pool.clone(), publisher, alerts, Instance::parse("budget-bench").unwrap());

    let stop = CancellationToken::new();
    let mut gates = Vec::new();
    for i in 0..consumers {
        let gate = Gate::default();
        let epoch = KillEpoch::new(0);
        let listener = ControlListener::new(pool.clone(), dev_verifier.clone(), Role::Dev, epoch.clone(), gate.clone());
        listener.sync().await.unwrap();
        tokio::spawn(listener.run(stop.clone()));
        let cfg = ConsumerConfig::new(StreamName::tasks(Role::Dev), "dev", format!("dev-{i}"));
        let consumer =
            Consumer::new(cfg, pool.clone(), dev_verifier.clone(), epoch, Nothing).unwrap().with_gate(gate.clone());
        tokio::spawn(consumer.run(stop.clone()));
        gates.push(gate);
    }
    // Let every consumer reach its blocking read and every listener its XREAD.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Baselines: a PING round trip, and one XADD reaching one blocked XREAD.
    let mut c = pool.dedicated().await.unwrap();
    let mut ping = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        let _: String = redis::cmd("PING").query_async(&mut c).await.unwrap();
        ping.push(t.elapsed());
    }
    let mut notify = Vec::new();
    for _ in 0..runs {
        let mut reader = pool.dedicated().await.unwrap();
        let read = tokio::spawn(async move {
            let _: redis::Value = redis::cmd("XREAD")
                .arg("BLOCK")
                .arg(5000)
                .arg("STREAMS")
                .arg("bench:notify")
                .arg("$")
                .query_async(&mut reader)
                .await
                .unwrap();
            Instant::now()
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let t = Instant::now();
        let _: String =
            redis::cmd("XADD").arg("bench:notify").arg("*").arg("a").arg(1).query_async(&mut c).await.unwrap();
        notify.push(read.await.unwrap().duration_since(t));
    }

    let mut engage_rt = Vec::new();
    let mut all_paused = Vec::new();
    for run in 0..runs {
        let t = Instant::now();
        let e = switch
            .engage(&budget::alert::Cause::automatic("bench", "bench", "propagation run"), 0, serde_json::Value::Null)
            .await
            .unwrap();
        engage_rt.push(t.elapsed());
        assert!(e.fresh, "run {run}: the switch was already engaged");
        for g in &gates {
            tokio::time::timeout(Duration::from_secs(10), g.wait_paused()).await.expect("every gate pauses");
        }
        all_paused.push(t.elapsed());
        let (epoch, resumed) =
            switch.resume(&budget::alert::Cause::operator(Some("bench"), "bench", ""), e.state.epoch).await.unwrap();
        assert!(resumed && epoch == e.state.epoch);
        for g in &gates {
            tokio::time::timeout(Duration::from_secs(10), g.wait_open()).await.expect("every gate opens");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "{consumers} consumers, {runs} runs, {} CPUs",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let base = show("baseline: PING round trip", ping);
    let notify50 = show("baseline: XADD -> one blocked XREAD returns", notify);
    show("engage() returns (Lua record + 5 pauses + alert)", engage_rt);
    let p50 = show(&format!("engage -> all {consumers} gates paused"), all_paused);
    println!(
        "ratio: all paused p50 / notify p50 = {:.1}x; / PING p50 = {:.1}x",
        p50.as_secs_f64() / notify50.as_secs_f64(),
        p50.as_secs_f64() / base.as_secs_f64()
    );
    stop.cancel();
}
