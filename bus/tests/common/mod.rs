//! Fixtures for the bus integration tests: a real redis-server, keyrings, and a recording
//! handler.
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::Duration;

use bus::{Consumer, ConsumerConfig, Delivery, Handler, HandlerError, KillEpoch, Publisher, PublisherConfig};
use envelope::*;
use fleet_testkit::RedisServer;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub const PERMISSIONS: &str = include_str!("../../../config/permissions.toml");

pub fn permissions() -> PermissionTable {
    PermissionTable::parse(PERMISSIONS).expect("shipped permissions")
}

pub fn master() -> MasterFile {
    MasterFile::new(MasterSecret::from_bytes([42; 32]))
}

pub fn keyring(role: Role) -> Arc<Keyring> {
    Arc::new(Keyring::derive(&master(), Process::Role(role), &permissions()).expect("derive"))
}

pub fn verifier(role: Role) -> Arc<Verifier> {
    Arc::new(Verifier::new(
        Keyring::derive(&master(), Process::Role(role), &permissions()).expect("derive"),
        permissions(),
        VerifierConfig::default(),
    ))
}

pub fn redis() -> RedisServer {
    RedisServer::start().expect("redis-server must be installed (apt-get install redis-server); tests never skip")
}

pub fn pool(server: &RedisServer) -> deadpool_redis::Pool {
    bus::pool(&server.url().into(), 16, Duration::from_secs(2)).expect("pool")
}

pub fn dev_publisher(server: &RedisServer) -> Publisher {
    Publisher::new(pool(server), keyring(Role::Dev), PublisherConfig::default())
}

/// A dev → orchestrator result carrying `n` in its summary.
pub fn result(n: u64) -> Envelope {
    let payload = TaskResult {
        attempt: 1,
        status: Status::Success,
        summary: format!("result {n}"),
        findings: vec![],
        diff: None,
        log: None,
    };
    Envelope::new(
        Sender { role: Role::Dev, instance: Instance::parse("dev-1").expect("instance") },
        Role::Orchestrator,
        bus::now_ms(),
        60_000,
        0,
        payload.into(),
    )
}

pub fn summary(d: &Delivery) -> String {
    match &d.envelope.payload {
        Payload::TaskResult(r) => r.summary.clone(),
        other => format!("{other:?}"),
    }
}

/// Sends every delivery's summary (and delivery count) to a channel; fails the first
/// `fail_first` attempts of each entry when asked to.
#[derive(Clone)]
pub struct Recorder {
    pub tx: mpsc::UnboundedSender<(String, u64, String)>,
    pub fail_when: Arc<dyn Fn(&Delivery) -> Option<HandlerError> + Send + Sync>,
    pub delay: Duration,
}

impl Handler for Recorder {
    async fn handle(&self, d: Delivery) -> Result<(), HandlerError> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        if let Some(err) = (self.fail_when)(&d) {
            return Err(err);
        }
        let _ = self.tx.send((summary(&d), d.deliveries, d.entry_id.clone()));
        Ok(())
    }
}

pub fn recorder() -> (Recorder, mpsc::UnboundedReceiver<(String, u64, String)>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Recorder { tx, fail_when: Arc::new(|_| None), delay: Duration::ZERO }, rx)
}

/// Fast timings for tests.
pub fn config(group: &str, consumer: &str) -> ConsumerConfig {
    let mut c = ConsumerConfig::new(StreamName::parse(streams::RESULTS).expect("stream"), group, consumer);
    c.block = Duration::from_millis(100);
    c.maintenance_every = Duration::from_millis(50);
    c.retry_base = Duration::from_millis(20);
    c.retry_max = Duration::from_millis(200);
    c.claim_idle = Duration::from_millis(1000);
    c.grace = Duration::from_secs(2);
    c
}

pub fn spawn<H: Handler>(
    server: &RedisServer,
    cfg: ConsumerConfig,
    handler: H,
) -> (CancellationToken, tokio::task::JoinHandle<()>, Arc<bus::ConsumerStats>) {
    let consumer =
        Consumer::new(cfg, pool(server), verifier(Role::Orchestrator), KillEpoch::new(0), handler).expect("consumer");
    let stats = consumer.stats();
    let token = CancellationToken::new();
    let handle = tokio::spawn(consumer.run(token.clone()));
    (token, handle, stats)
}

/// Receives exactly `n` items within `within`, panicking with what arrived otherwise.
pub async fn take<T: std::fmt::Debug>(rx: &mut mpsc::UnboundedReceiver<T>, n: usize, within: Duration) -> Vec<T> {
    let mut got = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + within;
    while got.len() < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(x)) => got.push(x),
            Ok(None) => break,
            Err(_) => break,
        }
    }
    assert_eq!(
        got.len(),
        n,
        "expected {n} deliveries within {within:?}, got {}: {:?}",
        got.len(),
        got.iter().take(5).collect::<Vec<_>>()
    );
    got
}

/// Reads a whole stream as (id, fields as strings) pairs.
pub async fn read_stream(server: &RedisServer, stream: &str) -> Vec<(String, Vec<(String, Vec<u8>)>)> {
    let client = redis::Client::open(server.url()).expect("client");
    let mut c = client.get_multiplexed_async_connection().await.expect("connect");
    let v: redis::Value = redis::cmd("XRANGE").arg(stream).arg("-").arg("+").query_async(&mut c).await.expect("xrange");
    bus::reply::entries("XRANGE", &v)
        .expect("entries")
        .into_iter()
        .map(|e| {
            (
                e.id,
                e.fields
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), v))
                    .collect(),
            )
        })
        .collect()
}
