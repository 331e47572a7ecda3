//! Fixtures for the bus integration tests: a real redis-server, keyrings, a recording
//! handler, raw Redis access, and waiting for conditions with deadlines.
//!
//! Every test starts its own redis-server (tests run in parallel, one process each under
//! cargo-nextest), so stream and group names can be fixed.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus::Conn;
use bus::reply::{self, Pending};
use bus::{Consumer, ConsumerConfig, ConsumerStats, Delivery, Handler, HandlerError, KillEpoch, Publisher};
use envelope::*;
use fleet_testkit::RedisServer;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const PERMISSIONS: &str = include_str!("../../../config/permissions.toml");
/// The consumer group most tests read `fleet:results` with.
pub const GROUP: &str = "orchestrator";

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

pub fn pool(server: &RedisServer) -> bus::RedisPool {
    bus::pool(secrecy::SecretString::from(server.url()), 16, Duration::from_secs(2)).expect("pool")
}

pub fn dev_publisher(server: &RedisServer) -> Publisher {
    Publisher::new(pool(server), keyring(Role::Dev), bus::PublisherConfig::default())
}

pub fn results_stream() -> StreamName {
    StreamName::parse(streams::RESULTS).expect("stream")
}

fn dev_sender() -> Sender {
    Sender { role: Role::Dev, instance: Instance::parse("dev-1").expect("instance") }
}

/// A dev → orchestrator result carrying `n` in its summary.
pub fn result(n: u64) -> Envelope {
    result_at(n, bus::now_ms(), 0)
}

/// A dev → orchestrator result issued at `issued_at_ms` under `kill_epoch`.
pub fn result_at(n: u64, issued_at_ms: u64, kill_epoch: u64) -> Envelope {
    let payload = TaskResult {
        attempt: 1,
        status: Status::Success,
        summary: format!("result {n}"),
        findings: vec![],
        diff: None,
        log: None,
        change_sha256: None,
        calls: Vec::new(),
        containment: Vec::new(),
    };
    Envelope::new(dev_sender(), Role::Orchestrator, issued_at_ms, 60_000, kill_epoch, payload.into())
}

/// A dev → orchestrator heartbeat.
pub fn heartbeat(seq: u64) -> Envelope {
    Envelope::new(dev_sender(), Role::Orchestrator, bus::now_ms(), 60_000, 0, Heartbeat { seq, busy: false }.into())
}

/// Dev's signature over `env`: the bytes of a stream entry's `env` field.
pub fn seal_dev(env: &Envelope) -> Vec<u8> {
    keyring(Role::Dev).seal(env).expect("seal")
}

pub fn summary(d: &Delivery) -> String {
    match &d.envelope.payload {
        Payload::TaskResult(r) => r.summary.clone(),
        other => format!("{other:?}"),
    }
}

/// `result 17` → 17.
pub fn number(summary: &str) -> u64 {
    summary.trim_start_matches("result ").parse().unwrap_or_else(|_| panic!("not a result summary: {summary}"))
}

/// One handler call as the recorder saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Got {
    /// The recorder's name (which consumer handled it).
    pub by: String,
    /// Envelope id.
    pub id: Uuid,
    pub summary: String,
    /// Redis's delivery count as the consumer reported it.
    pub deliveries: u64,
    /// Stream entry id.
    pub entry: String,
}

type FailWhen = Arc<dyn Fn(&Delivery) -> Option<HandlerError> + Send + Sync>;

/// Records every call (`calls`, at its start) and sends every success to a channel. Can be
/// told to fail some calls, and to take its time.
#[derive(Clone)]
pub struct Recorder {
    pub name: String,
    pub tx: mpsc::UnboundedSender<Got>,
    pub calls: Arc<Mutex<Vec<Got>>>,
    pub fail_when: FailWhen,
    pub delay: Duration,
}

impl Recorder {
    /// Names the consumer this recorder is given to (shows up in [`Got::by`]).
    pub fn named(mut self, name: &str) -> Self {
        self.name = name.to_owned();
        self
    }

    /// Fails the calls for which `f` returns an error.
    pub fn failing(mut self, f: impl Fn(&Delivery) -> Option<HandlerError> + Send + Sync + 'static) -> Self {
        self.fail_when = Arc::new(f);
        self
    }

    /// Sleeps this long in every call (before deciding its outcome).
    pub fn slow(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Every call so far, successful or not, in the order they started.
    pub fn calls(&self) -> Vec<Got> {
        self.calls.lock().expect("calls").clone()
    }

    pub fn call_count(&self) -> usize {
        self.calls.lock().expect("calls").len()
    }
}

impl Handler for Recorder {
    async fn handle(&self, d: Delivery) -> Result<(), HandlerError> {
        let got = Got {
            by: self.name.clone(),
            id: d.envelope.id,
            summary: summary(&d),
            deliveries: d.deliveries,
            entry: d.entry_id.clone(),
        };
        self.calls.lock().expect("calls").push(got.clone());
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        if let Some(err) = (self.fail_when)(&d) {
            return Err(err);
        }
        let _ = self.tx.send(got);
        Ok(())
    }
}

pub fn recorder() -> (Recorder, mpsc::UnboundedReceiver<Got>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let rec = Recorder {
        name: "recorder".into(),
        tx,
        calls: Arc::default(),
        fail_when: Arc::new(|_| None),
        delay: Duration::ZERO,
    };
    (rec, rx)
}

/// Fast timings for tests, reading `fleet:results`.
pub fn config(group: &str, consumer: &str) -> ConsumerConfig {
    config_for(results_stream(), group, consumer)
}

/// Fast timings for tests, reading `stream`.
pub fn config_for(stream: StreamName, group: &str, consumer: &str) -> ConsumerConfig {
    let mut c = ConsumerConfig::new(stream, group, consumer);
    c.block = Duration::from_millis(100);
    c.maintenance_every = Duration::from_millis(50);
    c.retry_base = Duration::from_millis(20);
    c.retry_max = Duration::from_millis(200);
    c.claim_idle = Duration::from_millis(1000);
    c.grace = Duration::from_secs(2);
    c
}

/// A consumer running in a task.
pub struct Running {
    pub stop: CancellationToken,
    pub handle: tokio::task::JoinHandle<()>,
    pub stats: Arc<ConsumerStats>,
    /// Raise it to play the kill switch.
    pub epoch: KillEpoch,
}

impl Running {
    /// Cancels the consumer and waits (at most 10 s) until its loop has returned.
    pub async fn shutdown(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.handle)
            .await
            .expect("the consumer stops within 10 s of being cancelled")
            .expect("the consumer task does not panic");
    }
}

/// Starts an orchestrator consumer under kill epoch 0.
pub fn spawn<H: Handler>(server: &RedisServer, cfg: ConsumerConfig, handler: H) -> Running {
    spawn_with(server, cfg, handler, KillEpoch::new(0))
}

pub fn spawn_with<H: Handler>(server: &RedisServer, cfg: ConsumerConfig, handler: H, epoch: KillEpoch) -> Running {
    let consumer =
        Consumer::new(cfg, pool(server), verifier(Role::Orchestrator), epoch.clone(), handler).expect("consumer");
    let stats = consumer.stats();
    let stop = CancellationToken::new();
    let handle = tokio::spawn(consumer.run(stop.clone()));
    Running { stop, handle, stats, epoch }
}

pub fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// Receives exactly `n` items within `within`, panicking with what arrived otherwise.
pub async fn take<T: std::fmt::Debug>(rx: &mut mpsc::UnboundedReceiver<T>, n: usize, within: Duration) -> Vec<T> {
    let mut got = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + within;
    while got.len() < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(x)) => got.push(x),
            Ok(None) | Err(_) => break,
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

/// Everything already in the channel, without waiting.
pub fn drain<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> Vec<T> {
    let mut got = Vec::new();
    while let Ok(x) = rx.try_recv() {
        got.push(x);
    }
    got
}

/// Polls `check` every 10 ms until it is true; panics naming `what` after `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {within:?} waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A plain connection, for raw commands and inspection.
pub async fn connect(server: &RedisServer) -> Conn {
    let client = redis::Client::open(server.url()).expect("client");
    Conn::Single(client.get_multiplexed_async_connection().await.expect("connect"))
}

/// `XADD stream * field value …` with raw bytes; returns the entry id.
pub async fn xadd_raw(c: &mut Conn, stream: &str, fields: &[(&str, &[u8])]) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(*v);
    }
    cmd.query_async(c).await.expect("XADD")
}

/// `XADD stream * env <wire>`.
pub async fn xadd_env(c: &mut Conn, stream: &str, wire: &[u8]) -> String {
    xadd_raw(c, stream, &[(bus::names::ENV_FIELD, wire)]).await
}

/// `XGROUP CREATE stream group 0 MKSTREAM`, tolerating an existing group.
pub async fn create_group(c: &mut Conn, stream: &str, group: &str) {
    bus::consumer::ensure_group(c, stream, group).await.expect("XGROUP CREATE");
}

/// `XREADGROUP GROUP group consumer COUNT count STREAMS stream >` without ever acking:
/// a consumer that read entries and died. Returns the entry ids it got.
pub async fn read_as(c: &mut Conn, stream: &str, group: &str, consumer: &str, count: usize) -> Vec<String> {
    let v: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(group)
        .arg(consumer)
        .arg("COUNT")
        .arg(count)
        .arg("STREAMS")
        .arg(stream)
        .arg(">")
        .query_async(c)
        .await
        .expect("XREADGROUP");
    reply::read_one_stream(&v).expect("entries").into_iter().map(|e| e.id).collect()
}

/// The group's pending count (`XPENDING stream group` summary).
pub async fn pending_count(c: &mut Conn, stream: &str, group: &str) -> u64 {
    let v: redis::Value = redis::cmd("XPENDING").arg(stream).arg(group).query_async(c).await.expect("XPENDING");
    match v {
        redis::Value::Array(items) => items.first().and_then(reply::int).expect("XPENDING count") as u64,
        other => panic!("unexpected XPENDING reply {other:?}"),
    }
}

/// The group's pending entries (at most 10,000), all consumers.
pub async fn pending_entries(c: &mut Conn, stream: &str, group: &str) -> Vec<Pending> {
    let v: redis::Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .arg("-")
        .arg("+")
        .arg(10_000)
        .query_async(c)
        .await
        .expect("XPENDING");
    reply::pending(&v).expect("pending rows")
}

/// Whether the group has been handed every entry of the stream (its last-delivered id is
/// the stream's newest entry). Computed from ids rather than `lag`, which Redis may leave
/// undetermined.
pub async fn all_delivered(c: &mut Conn, stream: &str, group: &str) -> bool {
    let v: redis::Value = redis::cmd("XINFO").arg("GROUPS").arg(stream).query_async(c).await.expect("XINFO GROUPS");
    let groups = reply::info_maps("XINFO GROUPS", &v).expect("groups");
    let g = groups
        .iter()
        .find(|g| reply::info_get(g, "name").and_then(reply::text).as_deref() == Some(group))
        .unwrap_or_else(|| panic!("no group {group}"));
    let delivered = reply::info_get(g, "last-delivered-id").and_then(reply::text).expect("last-delivered-id");
    let v: redis::Value = redis::cmd("XREVRANGE")
        .arg(stream)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(c)
        .await
        .expect("XREVRANGE");
    match reply::entries("XREVRANGE", &v).expect("entries").first() {
        Some(newest) => newest.id == delivered,
        None => true,
    }
}

/// Consumers of the group: name → pending count.
pub async fn consumers(c: &mut Conn, stream: &str, group: &str) -> BTreeMap<String, i64> {
    let v: redis::Value =
        redis::cmd("XINFO").arg("CONSUMERS").arg(stream).arg(group).query_async(c).await.expect("XINFO CONSUMERS");
    reply::info_maps("XINFO CONSUMERS", &v)
        .expect("consumers")
        .iter()
        .map(|m| {
            let name = reply::info_get(m, "name").and_then(reply::text).expect("name");
            let pending = reply::info_get(m, "pending").and_then(reply::int).expect("pending");
            (name, pending)
        })
        .collect()
}

pub async fn xlen(c: &mut Conn, stream: &str) -> u64 {
    redis::cmd("XLEN").arg(stream).query_async(c).await.expect("XLEN")
}

/// One entry of a stream: its id and fields.
#[derive(Debug, Clone)]
pub struct Row {
    pub id: String,
    pub fields: Vec<(String, Vec<u8>)>,
}

impl Row {
    /// The field's value as bytes.
    pub fn bytes(&self, name: &str) -> Option<&[u8]> {
        self.fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice())
    }

    /// The field's value as text (panics when missing).
    pub fn text(&self, name: &str) -> String {
        let v = self.bytes(name).unwrap_or_else(|| panic!("entry {} has no field {name}: {:?}", self.id, self.names()));
        String::from_utf8_lossy(v).into_owned()
    }

    pub fn names(&self) -> Vec<&str> {
        self.fields.iter().map(|(k, _)| k.as_str()).collect()
    }
}

/// How many envelope ids the replay guard of `group` on `stream` holds: the fields of its
/// buckets (`bus::guard`).
pub async fn guarded_ids(c: &mut Conn, stream: &str, group: &str) -> u64 {
    let buckets: Vec<String> =
        redis::cmd("KEYS").arg(format!("fleet:seen:{{{stream}}}:{group}:*")).query_async(&mut *c).await.expect("KEYS");
    let mut n = 0;
    for b in buckets {
        n += redis::cmd("HLEN").arg(&b).query_async::<u64>(&mut *c).await.expect("HLEN");
    }
    n
}

/// Reads a whole stream.
pub async fn read_stream(c: &mut Conn, stream: &str) -> Vec<Row> {
    let v: redis::Value = redis::cmd("XRANGE").arg(stream).arg("-").arg("+").query_async(c).await.expect("XRANGE");
    reply::entries("XRANGE", &v)
        .expect("entries")
        .into_iter()
        .map(|e| Row {
            id: e.id,
            fields: e
                .fields
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), v))
                .collect(),
        })
        .collect()
}

/// Waits until the group has delivered everything and has nothing pending.
pub async fn wait_all_acked(c: &mut Conn, stream: &str, group: &str, within: Duration) {
    let what = format!("group {group} of {stream} was handed every entry and has nothing pending");
    eventually(within, &what, || {
        let mut c = c.clone();
        async move { all_delivered(&mut c, stream, group).await && pending_count(&mut c, stream, group).await == 0 }
    })
    .await;
}
