//! A relay that dies between its `XADD` and its `COMMIT`: the rows are published again by
//! the next relay, nothing is lost, and a consumer acts on each envelope once.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus::{Consumer, ConsumerConfig, Delivery, Handler, HandlerError, KillEpoch};
use common::*;
use envelope::{
    Envelope, Instance, Keyring, MasterFile, MasterSecret, PermissionTable, Process, Role, Sender, StreamName,
    TaskAssign,
};
use envelope::{Verifier, VerifierConfig};
use outbox_relay::outbox;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const PERMISSIONS: &str = include_str!("../../config/permissions.toml");

fn permissions() -> PermissionTable {
    PermissionTable::parse(PERMISSIONS).expect("shipped permissions")
}

fn keyring(role: Role) -> Keyring {
    let master = MasterFile::new(MasterSecret::from_bytes([7; 32]));
    Keyring::derive(&master, Process::Role(role), &permissions()).expect("derive")
}

/// A `task.assign` for Dev, sealed with the orchestrator>dev key, as the orchestrator puts
/// it in the outbox.
fn sealed_assignment(orchestrator: &Keyring, n: u32) -> (Uuid, Vec<u8>) {
    let from = Sender { role: Role::Orchestrator, instance: Instance::parse("orchestrator-1").expect("instance") };
    let payload = TaskAssign {
        attempt: 1,
        instructions: format!("step {n}"),
        workspace: format!("/workspace/task-{n}"),
        repository: None,
        test_command: None,
        findings: vec![],
        scope: vec![],
        change: None,
        change_sha256: None,
    };
    let mut env = Envelope::new(from, Role::Dev, bus::now_ms(), 600_000, 0, payload.into());
    env.task_id = Some(Uuid::now_v7());
    (env.id, orchestrator.seal(&env).expect("seal"))
}

#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<Uuid>>>);

impl Handler for Seen {
    async fn handle(&self, d: Delivery) -> Result<(), HandlerError> {
        self.0.lock().expect("seen").push(d.envelope.id);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_published_but_not_marked_are_published_again_and_consumed_once() {
    const ROWS: u32 = 50;
    const CRASHED_BATCH: u32 = 20;
    let env = Env::start().await;
    let orchestrator = keyring(Role::Orchestrator);
    let mut ids = Vec::new();
    let mut tx = env.pool.begin().await.expect("begin");
    for n in 0..ROWS {
        let (id, frame) = sealed_assignment(&orchestrator, n);
        sqlx::query("INSERT INTO outbox (stream, envelope_id, frame) VALUES ($1, $2, $3)")
            .bind(DEV)
            .bind(id)
            .bind(frame)
            .execute(&mut *tx)
            .await
            .expect("insert");
        ids.push(id);
    }
    tx.commit().await.expect("commit");

    // The relay that dies: it claims a batch and XADDs it, then its process is gone before
    // the UPDATE and COMMIT (its connection drops, Postgres rolls back).
    let publisher = env.publisher();
    let mut doomed = env.pool.begin().await.expect("begin");
    let claim = outbox::claim(&mut doomed, CRASHED_BATCH, &[]).await.expect("claim");
    let items: Vec<(&str, &[u8])> = claim.ready.iter().map(|r| (r.stream.as_str(), r.frame.as_slice())).collect();
    publisher.publish_wire_batch(&items).await.expect("XADD");
    drop(doomed);
    let mut redis = env.redis().await;
    assert_eq!(read_stream(&mut redis, DEV).await.len(), CRASHED_BATCH as usize);
    eventually(Duration::from_secs(5), "the dead relay's rows are free again", || async {
        env.undispatched().await == i64::from(ROWS)
    })
    .await;

    // A fresh relay publishes everything, the crashed batch a second time.
    let relay = spawn(env.relay(fast()));
    env.drained(Duration::from_secs(10)).await;
    relay.shutdown().await;
    let entries = read_stream(&mut redis, DEV).await;
    assert_eq!(entries.len(), (ROWS + CRASHED_BATCH) as usize);
    for id in &ids {
        let copies = entries.iter().filter(|f| envelope_id_of(f) == *id).count();
        assert!(copies >= 1, "envelope {id} lost");
    }

    // A Dev consumer verifies every entry, hands each envelope to its handler once and
    // rejects the copies as replays.
    let verifier = Arc::new(Verifier::new(keyring(Role::Dev), permissions(), VerifierConfig::default()));
    let mut cfg = ConsumerConfig::new(StreamName::tasks(Role::Dev), "dev", "dev-1");
    cfg.block = Duration::from_millis(100);
    cfg.maintenance_every = Duration::from_millis(50);
    let seen = Seen::default();
    let redis_pool = bus::pool(secrecy::SecretString::from(env.redis.url()), 4, Duration::from_secs(1)).expect("pool");
    let consumer = Consumer::new(cfg, redis_pool, verifier, KillEpoch::new(0), seen.clone()).expect("consumer");
    let consumer_stats = consumer.stats();
    let stop = CancellationToken::new();
    let handle = tokio::spawn(consumer.run(stop.clone()));
    eventually(Duration::from_secs(10), "the consumer has settled every entry", || async {
        let c = &consumer_stats;
        bus_count(&c.handled) + bus_count(&c.rejected) == u64::from(ROWS + CRASHED_BATCH)
    })
    .await;
    stop.cancel();
    handle.await.expect("consumer task");

    let mut handled = seen.0.lock().expect("seen").clone();
    handled.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(handled, expected, "each envelope handled exactly once");
    assert_eq!(consumer_stats.rejected_by_reason().get("replay").copied(), Some(u64::from(CRASHED_BATCH)));
}

fn bus_count(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(std::sync::atomic::Ordering::Relaxed)
}

/// The envelope id inside a sealed frame.
fn envelope_id_of(frame: &[u8]) -> Uuid {
    let signed = envelope::wire::decode_frame(frame).expect("frame");
    Envelope::from_body_bytes(signed.body).expect("body").id
}
