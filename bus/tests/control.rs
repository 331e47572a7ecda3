//! The kill switch as consumers see it: a pause reaches every consumer through its own
//! [`ControlListener`], no handler starts after it, running handlers are abandoned and their
//! entries handled exactly once after the resume; envelopes from before the epoch are
//! refused (`stale_epoch`, in `fleet:rejected`); a process started during a kill comes up
//! paused.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bus::control::{KILLSWITCH_KEY, read_state};
use bus::names::fields;
use bus::{Consumer, ControlEvent, ControlListener, Delivery, Gate, Handler, HandlerError, KillEpoch, Publisher};
use common::*;
use envelope::*;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Records when each handler call started and which numbers completed.
#[derive(Clone, Default)]
struct Timed {
    name: String,
    starts: Arc<Mutex<Vec<(String, Instant, u64)>>>,
    done: Arc<Mutex<Vec<u64>>>,
    work: Duration,
}

impl Handler for Timed {
    async fn handle(&self, d: Delivery) -> Result<(), HandlerError> {
        let n = number(&summary(&d));
        self.starts.lock().unwrap().push((self.name.clone(), Instant::now(), n));
        tokio::time::sleep(self.work).await;
        self.done.lock().unwrap().push(n);
        Ok(())
    }
}

/// A budget → orchestrator pause or resume, sealed under `epoch`.
fn control(payload: Payload, epoch: u64) -> Envelope {
    let from = Sender { role: Role::Budget, instance: Instance::parse("budget-0").unwrap() };
    Envelope::new(from, Role::Orchestrator, bus::now_ms(), 60_000, epoch, payload)
}

/// What the budget manager does, without the budget crate: the record, then the pause.
async fn engage(c: &mut bus::Conn, budget: &Publisher, epoch: u64) {
    let () = redis::cmd("HSET")
        .arg(KILLSWITCH_KEY)
        .arg("epoch")
        .arg(epoch)
        .arg("engaged")
        .arg("1")
        .arg("by")
        .arg("test")
        .arg("reason")
        .arg("drill")
        .arg("at_ms")
        .arg(bus::now_ms())
        .query_async(c)
        .await
        .unwrap();
    let pause = ControlPause { epoch, reason: "drill".into(), by: None };
    budget.publish(&StreamName::control(Role::Orchestrator), &control(pause.into(), epoch)).await.unwrap();
}

async fn release(c: &mut bus::Conn, budget: &Publisher, epoch: u64) {
    let () = redis::cmd("HSET").arg(KILLSWITCH_KEY).arg("engaged").arg("0").query_async(c).await.unwrap();
    let resume = ControlResume { epoch, by: None };
    budget.publish(&StreamName::control(Role::Orchestrator), &control(resume.into(), epoch)).await.unwrap();
}

struct Member {
    gate: Gate,
    epoch: KillEpoch,
    paused_at: Arc<Mutex<Option<Instant>>>,
    events: mpsc::UnboundedReceiver<ControlEvent>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_reaches_every_consumer_and_no_handler_starts_after_it() {
    const CONSUMERS: usize = 6;
    const EPOCH: u64 = 1;
    let server = redis();
    let mut c = connect(&server).await;
    let budget = Publisher::new(pool(&server), keyring(Role::Budget), bus::PublisherConfig::default());
    let stop = CancellationToken::new();
    let handler = Timed { work: Duration::from_millis(30), ..Timed::default() };
    let mut members = Vec::new();
    let mut runs = Vec::new();
    for i in 0..CONSUMERS {
        let gate = Gate::default();
        let epoch = KillEpoch::new(0);
        let (tx, events) = mpsc::unbounded_channel();
        let listener = ControlListener::new(
            pool(&server),
            verifier(Role::Orchestrator),
            Role::Orchestrator,
            epoch.clone(),
            gate.clone(),
        )
        .with_events(tx);
        listener.sync().await.unwrap();
        runs.push(tokio::spawn(listener.run(stop.clone())));
        let paused_at = Arc::new(Mutex::new(None));
        let (g, p) = (gate.clone(), paused_at.clone());
        tokio::spawn(async move {
            g.wait_paused().await;
            *p.lock().unwrap() = Some(Instant::now());
        });
        let mut h = handler.clone();
        h.name = format!("c{i}");
        let consumer = Consumer::new(
            config(GROUP, &format!("c{i}")),
            pool(&server),
            verifier(Role::Orchestrator),
            epoch.clone(),
            h,
        )
        .unwrap()
        .with_gate(gate.clone());
        runs.push(tokio::spawn(consumer.run(stop.clone())));
        members.push(Member { gate, epoch, paused_at, events });
    }

    // Work arrives continuously, sealed under the coming epoch so it survives the kill.
    let producer_stop = CancellationToken::new();
    let publisher = Arc::new(dev_publisher(&server));
    let producer = {
        let (publisher, stop) = (publisher.clone(), producer_stop.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.is_cancelled() {
                publisher.publish(&results_stream(), &result_at(n, bus::now_ms(), EPOCH)).await.unwrap();
                n += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            n
        })
    };
    eventually(Duration::from_secs(10), "every consumer is busy", || {
        let starts = handler.starts.clone();
        async move {
            let s = starts.lock().unwrap();
            (0..CONSUMERS).all(|i| s.iter().filter(|(by, _, _)| *by == format!("c{i}")).count() >= 3)
        }
    })
    .await;

    let engaged_at = Instant::now();
    engage(&mut c, &budget, EPOCH).await;
    for (i, m) in members.iter_mut().enumerate() {
        tokio::time::timeout(Duration::from_secs(5), m.gate.wait_paused())
            .await
            .unwrap_or_else(|_| panic!("consumer c{i} never saw the pause"));
        assert_eq!(m.epoch.get(), EPOCH);
        assert_eq!(m.events.recv().await, Some(ControlEvent::Pause { epoch: EPOCH, reason: "drill".into() }));
    }
    let propagation = engaged_at.elapsed();
    // Work keeps arriving during the kill; nothing may start.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let slack = Duration::from_millis(20);
    let paused: BTreeMap<String, Instant> = members
        .iter()
        .enumerate()
        .map(|(i, m)| (format!("c{i}"), m.paused_at.lock().unwrap().expect("pause time recorded")))
        .collect();
    let late: Vec<_> = handler
        .starts
        .lock()
        .unwrap()
        .iter()
        .filter(|(by, at, _)| *at > paused[by] + slack)
        .map(|(by, at, n)| (by.clone(), *n, at.duration_since(paused[by])))
        .collect();
    assert!(late.is_empty(), "handlers started after their consumer's pause: {late:?}");
    let started_before_resume = handler.starts.lock().unwrap().len();

    // Resume; stop producing; everything published is handled exactly once.
    release(&mut c, &budget, EPOCH).await;
    for m in &members {
        tokio::time::timeout(Duration::from_secs(5), m.gate.wait_open()).await.expect("resumed");
    }
    producer_stop.cancel();
    let published = producer.await.unwrap();
    eventually(Duration::from_secs(30), "every entry handled after the resume", || {
        let done = handler.done.clone();
        async move { done.lock().unwrap().len() as u64 >= published }
    })
    .await;
    wait_all_acked(&mut c, streams::RESULTS, GROUP, Duration::from_secs(10)).await;
    let mut done = handler.done.lock().unwrap().clone();
    done.sort_unstable();
    assert_eq!(done, (0..published).collect::<Vec<_>>(), "each entry completed exactly once");
    let restarts = handler.starts.lock().unwrap().len() as u64 - published;
    eprintln!(
        "{CONSUMERS} consumers paused within {propagation:?}; {published} entries, {started_before_resume} starts before the resume, {restarts} abandoned and handled again after it"
    );

    // An envelope from before the epoch changes nothing: refused as stale_epoch.
    let stale = publisher.publish(&results_stream(), &result_at(999_999, bus::now_ms(), 0)).await.unwrap();
    eventually(Duration::from_secs(10), "the stale envelope is in fleet:rejected", || {
        let mut c = c.clone();
        async move { xlen(&mut c, streams::REJECTED).await == 1 }
    })
    .await;
    let rejected = read_stream(&mut c, streams::REJECTED).await;
    assert_eq!(rejected[0].text(fields::ENTRY), stale);
    assert_eq!(rejected[0].text(fields::REASON), "stale_epoch");
    assert!(!handler.done.lock().unwrap().contains(&999_999));
    stop.cancel();
    for r in runs {
        tokio::time::timeout(Duration::from_secs(10), r).await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_started_during_a_kill_claims_nothing_until_the_resume() {
    let server = redis();
    let mut c = connect(&server).await;
    let budget = Publisher::new(pool(&server), keyring(Role::Budget), bus::PublisherConfig::default());
    engage(&mut c, &budget, 3).await;
    assert!(read_state(&mut c).await.unwrap().engaged);
    create_group(&mut c, streams::RESULTS, GROUP).await;
    let publisher = dev_publisher(&server);
    for n in 0..5 {
        publisher.publish(&results_stream(), &result_at(n, bus::now_ms(), 3)).await.unwrap();
    }

    let gate = Gate::default();
    let epoch = KillEpoch::new(0);
    let listener = ControlListener::new(
        pool(&server),
        verifier(Role::Orchestrator),
        Role::Orchestrator,
        epoch.clone(),
        gate.clone(),
    )
    .with_resync(Duration::from_millis(200));
    let state = listener.sync().await.unwrap();
    assert!(state.engaged && gate.is_paused() && epoch.get() == 3);
    let stop = CancellationToken::new();
    let listening = tokio::spawn(listener.run(stop.clone()));
    let (rec, mut rx) = recorder();
    let consumer =
        Consumer::new(config(GROUP, "late"), pool(&server), verifier(Role::Orchestrator), epoch, rec.clone())
            .unwrap()
            .with_gate(gate.clone());
    let running = tokio::spawn(consumer.run(stop.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rec.call_count(), 0, "nothing is claimed while the kill switch is engaged");
    assert_eq!(pending_count(&mut c, streams::RESULTS, GROUP).await, 0);

    // The resume message is lost (trimmed, say): the record alone releases it at the next resync.
    let () = redis::cmd("HSET").arg(KILLSWITCH_KEY).arg("engaged").arg("0").query_async(&mut c).await.unwrap();
    let got = take(&mut rx, 5, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 5);
    assert!(!gate.is_paused());
    stop.cancel();
    running.await.unwrap();
    listening.await.unwrap();
}
