//! The figures KEDA's redis-streams scaler reads for a worker role (deploy/k8s/keda.yaml),
//! on a real redis-server, for group `dev` on `fleet:tasks:dev`:
//!
//! - `queued`, the `lagCount` trigger: the group's `lag` in `XINFO GROUPS`; `XLEN` while the
//!   group does not exist yet, and 0 while the stream does not exist (KEDA's fallbacks);
//! - `running`, the `pendingEntriesCount` trigger: the count of `XPENDING` (summary form),
//!   which fails with `NOGROUP` until a worker has created the group.
//!
//! Every figure is read the way KEDA reads it, as the `monitor` user whose ACL line
//! keda.yaml documents; the line is taken from that file, so the documented line is the one
//! tested. The first test moves the figures one step at a time with raw `XADD`,
//! `XREADGROUP` and `XACK`; the second drains the stream with the bus's own [`Consumer`],
//! the loop every worker runs, its handler holding each task until the test lets it finish.
//! Both assert exact numbers at every stage. Like every test here, they fail when
//! redis-server is missing; they never skip.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bus::{Consumer, ConsumerConfig, Delivery, Handler, HandlerError, KillEpoch, Publisher, PublisherConfig};
use envelope::{
    Envelope, Instance, Keyring, MasterFile, MasterSecret, PermissionTable, Process, Role, Sender, StreamName,
    TaskAssign, Verifier, VerifierConfig,
};
use fleet_testkit::RedisServer;
use redis::aio::MultiplexedConnection;
use sha2::{Digest, Sha256};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

const STREAM: &str = "fleet:tasks:dev";
const GROUP: &str = "dev";
/// The file whose ACL line for KEDA's user is tested.
const KEDA_YAML: &str = include_str!("../../deploy/k8s/keda.yaml");
const PERMISSIONS: &str = include_str!("../../config/permissions.toml");
const MONITOR_PASSWORD: &str = "monitor-password-for-the-scaler-figures-test";

/// What `XINFO GROUPS fleet:tasks:dev` says about group `dev`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lag {
    /// `ERR no such key`: nothing was ever queued.
    NoStream,
    /// The stream exists and the group does not: no worker has started yet.
    NoGroup,
    /// Entries not yet delivered to any consumer of the group.
    Entries(u64),
}

/// Everything KEDA may read for one role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Figures {
    lag: Lag,
    /// `XPENDING fleet:tasks:dev dev`'s count; `None` when it answers `NOGROUP`.
    pending: Option<u64>,
    xlen: u64,
}

impl Figures {
    /// The `queued` trigger's value, with the scaler's own fallbacks
    /// (pkg/scalers/redis_streams_scaler.go): no stream, 0; no group, the stream's length.
    fn queued(&self) -> u64 {
        match self.lag {
            Lag::NoStream => 0,
            Lag::NoGroup => self.xlen,
            Lag::Entries(n) => n,
        }
    }
}

/// A redis-server whose ACL file holds an all-powerful `default` user (the test's producer
/// and workers) and keda.yaml's `monitor` line with the test's password.
fn redis_with_monitor(dir: &std::path::Path) -> RedisServer {
    let documented = KEDA_YAML
        .lines()
        .filter_map(|l| l.trim_start_matches('#').trim().strip_prefix("user monitor "))
        .collect::<Vec<_>>();
    assert_eq!(documented.len(), 1, "keda.yaml must document exactly one `user monitor` line: {documented:?}");
    let hash = hex::encode(Sha256::digest(MONITOR_PASSWORD.as_bytes()));
    let line = format!("user monitor {}", documented[0].replace("<sha256-hex>", &hash));
    assert!(line.contains(&format!("#{hash}")), "the documented line sets the password as #<sha256-hex>: {line}");
    let acl = dir.join("users.acl");
    std::fs::write(&acl, format!("user default on nopass ~* &* +@all\n{line}\n")).expect("write the ACL file");
    RedisServer::builder()
        .acl_file(&acl)
        .start()
        .expect("redis-server must be installed (apt-get install redis-server); tests never skip")
}

async fn connect(url: &str) -> MultiplexedConnection {
    redis::Client::open(url)
        .expect("parse the Redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis")
}

async fn monitor(redis: &RedisServer) -> MultiplexedConnection {
    connect(&format!("redis://monitor:{MONITOR_PASSWORD}@127.0.0.1:{}", redis.port())).await
}

fn text(v: &redis::Value) -> String {
    redis::from_redis_value_ref::<String>(v).unwrap_or_else(|e| panic!("not text: {v:?}: {e}"))
}

/// Reads the figures as KEDA does: `INFO` (it refuses lag before Redis 7), `XINFO GROUPS`,
/// `XPENDING` and `XLEN`.
async fn figures(con: &mut MultiplexedConnection) -> Figures {
    let info: String = redis::cmd("INFO").query_async(con).await.expect("INFO as monitor");
    let version = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .expect("INFO names redis_version")
        .trim()
        .to_owned();
    let major: u32 = version.split('.').next().and_then(|m| m.parse().ok()).expect("a numeric major version");
    assert!(major >= 7, "the lag figure needs Redis 7 or later, this is {version}");

    let groups: redis::RedisResult<redis::Value> = redis::cmd("XINFO").arg("GROUPS").arg(STREAM).query_async(con).await;
    let lag = match groups {
        Err(e) if e.to_string().contains("no such key") => Lag::NoStream,
        Err(e) => panic!("XINFO GROUPS as monitor: {e}"),
        Ok(redis::Value::Array(groups)) => {
            let mut lag = Lag::NoGroup;
            for g in &groups {
                let redis::Value::Array(fields) = g else { panic!("a group is not an array: {g:?}") };
                let field = |name: &str| {
                    fields.chunks(2).find(|kv| text(&kv[0]) == name).map(|kv| kv[1].clone()).expect("field")
                };
                if text(&field("name")) == GROUP {
                    lag = match field("lag") {
                        redis::Value::Int(n) => Lag::Entries(u64::try_from(n).expect("lag is not negative")),
                        other => panic!("Redis could not tell the lag ({other:?}): nothing here deletes entries"),
                    };
                }
            }
            lag
        }
        Ok(other) => panic!("XINFO GROUPS answered {other:?}"),
    };
    let pending: redis::RedisResult<redis::Value> =
        redis::cmd("XPENDING").arg(STREAM).arg(GROUP).query_async(con).await;
    let pending = match pending {
        Err(e) if e.code() == Some("NOGROUP") => None,
        Err(e) => panic!("XPENDING as monitor: {e}"),
        Ok(redis::Value::Array(summary)) => match summary.first() {
            Some(redis::Value::Int(n)) => Some(u64::try_from(*n).expect("a count")),
            other => panic!("XPENDING's summary starts with {other:?}"),
        },
        Ok(other) => panic!("XPENDING answered {other:?}"),
    };
    let xlen: u64 = redis::cmd("XLEN").arg(STREAM).query_async(con).await.expect("XLEN as monitor");
    Figures { lag, pending, xlen }
}

async fn queue(con: &mut MultiplexedConnection, n: usize) {
    for i in 0..n {
        let _: String = redis::cmd("XADD")
            .arg(STREAM)
            .arg("*")
            .arg("env")
            .arg(format!("task {i}"))
            .query_async(con)
            .await
            .expect("XADD");
    }
}

/// One `XREADGROUP` of a worker (one task at a time, as workers read); the entry ids.
async fn read_one(con: &mut MultiplexedConnection, consumer: &str) -> Vec<String> {
    let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg(consumer)
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(STREAM)
        .arg(">")
        .query_async(con)
        .await
        .expect("XREADGROUP");
    reply.keys.iter().flat_map(|k| k.ids.iter().map(|e| e.id.clone())).collect()
}

async fn ack(con: &mut MultiplexedConnection, ids: &[String]) {
    let n: u64 = redis::cmd("XACK").arg(STREAM).arg(GROUP).arg(ids).query_async(con).await.expect("XACK");
    assert_eq!(n, ids.len() as u64, "every id was pending");
}

#[tokio::test]
async fn lag_and_pending_follow_queued_read_and_acknowledged_tasks() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let redis = redis_with_monitor(dir.path());
    let mut fleet = connect(&redis.url()).await;
    let mut keda = monitor(&redis).await;

    // Nothing queued yet: no stream, no group. KEDA reads 0 queued; XPENDING fails, which a
    // formula over both triggers would turn into "inactive" (keda.yaml says why it has none).
    let f = figures(&mut keda).await;
    assert_eq!(f, Figures { lag: Lag::NoStream, pending: None, xlen: 0 });
    assert_eq!(f.queued(), 0);

    // The relay publishes three assignments while the role has no worker, so no group: KEDA
    // falls back to XLEN, 3, and wakes the role from zero.
    queue(&mut fleet, 3).await;
    let f = figures(&mut keda).await;
    assert_eq!(f, Figures { lag: Lag::NoGroup, pending: None, xlen: 3 });
    assert_eq!(f.queued(), 3);

    // The first worker creates the group at 0, as the bus does at start: the three are lag.
    bus::consumer::ensure_group(&mut bus::Conn::Single(fleet.clone()), STREAM, GROUP).await.expect("XGROUP CREATE");
    assert_eq!(figures(&mut keda).await, Figures { lag: Lag::Entries(3), pending: Some(0), xlen: 3 });

    queue(&mut fleet, 2).await;
    assert_eq!(figures(&mut keda).await, Figures { lag: Lag::Entries(5), pending: Some(0), xlen: 5 });

    // Two workers take one task each: lag falls, pending rises by as much.
    let a1 = read_one(&mut fleet, "dev-worker-a").await;
    assert_eq!(a1.len(), 1);
    assert_eq!(figures(&mut keda).await, Figures { lag: Lag::Entries(4), pending: Some(1), xlen: 5 });
    let b1 = read_one(&mut fleet, "dev-worker-b").await;
    assert_eq!(figures(&mut keda).await, Figures { lag: Lag::Entries(3), pending: Some(2), xlen: 5 });

    // A finished task leaves the pending count; lag does not move.
    ack(&mut fleet, &a1).await;
    assert_eq!(figures(&mut keda).await, Figures { lag: Lag::Entries(3), pending: Some(1), xlen: 5 });

    // The last three are taken: lag is 0 while four tasks run. A lag-only trigger would now
    // scale the role down under its busy workers; the pending count still says 4.
    let a2 = read_one(&mut fleet, "dev-worker-a").await;
    let c1 = read_one(&mut fleet, "dev-worker-c").await;
    let d1 = read_one(&mut fleet, "dev-worker-d").await;
    let f = figures(&mut keda).await;
    assert_eq!(f, Figures { lag: Lag::Entries(0), pending: Some(4), xlen: 5 });
    assert_eq!(f.queued(), 0);
    assert!(read_one(&mut fleet, "dev-worker-e").await.is_empty(), "nothing is left to deliver");

    for ids in [&b1, &a2, &c1, &d1] {
        ack(&mut fleet, ids).await;
    }
    assert_eq!(figures(&mut keda).await, Figures { lag: Lag::Entries(0), pending: Some(0), xlen: 5 });

    // Publishers cap streams with MAXLEN, which only ever removes entries every group has
    // delivered (bus::publisher); trimming those leaves both figures exact.
    let trimmed: u64 =
        redis::cmd("XTRIM").arg(STREAM).arg("MAXLEN").arg(0).query_async(&mut fleet).await.expect("XTRIM");
    assert_eq!(trimmed, 5);
    assert_eq!(figures(&mut keda).await, Figures { lag: Lag::Entries(0), pending: Some(0), xlen: 0 });
    queue(&mut fleet, 1).await;
    assert_eq!(figures(&mut keda).await, Figures { lag: Lag::Entries(1), pending: Some(0), xlen: 1 });
}

#[tokio::test]
async fn the_monitor_user_reads_figures_and_nothing_else() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let redis = redis_with_monitor(dir.path());
    let mut fleet = connect(&redis.url()).await;
    queue(&mut fleet, 1).await;
    bus::consumer::ensure_group(&mut bus::Conn::Single(fleet.clone()), STREAM, GROUP).await.expect("XGROUP CREATE");
    let mut keda = monitor(&redis).await;
    assert_eq!(figures(&mut keda).await, Figures { lag: Lag::Entries(1), pending: Some(0), xlen: 1 });

    let refused = [
        redis::cmd("XADD").arg(STREAM).arg("*").arg("env").arg("forged").clone(),
        redis::cmd("XREADGROUP").arg("GROUP").arg(GROUP).arg("keda").arg("STREAMS").arg(STREAM).arg(">").clone(),
        redis::cmd("XACK").arg(STREAM).arg(GROUP).arg("0-1").clone(),
        redis::cmd("XRANGE").arg(STREAM).arg("-").arg("+").clone(),
        redis::cmd("XINFO").arg("STREAM").arg(STREAM).clone(),
        redis::cmd("XGROUP").arg("CREATE").arg(STREAM).arg("other").arg("0").clone(),
        redis::cmd("XLEN").arg("fleet:results").clone(),
        redis::cmd("GET").arg("fleet:killswitch").clone(),
        redis::cmd("CONFIG").arg("GET").arg("*").clone(),
    ];
    for cmd in refused {
        let r: redis::RedisResult<redis::Value> = cmd.query_async(&mut keda).await;
        let err = r.expect_err("the monitor user may not do this");
        assert_eq!(err.code(), Some("NOPERM"), "{err}");
    }
    // The task entry is untouched: still queued, nothing delivered.
    assert_eq!(figures(&mut keda).await, Figures { lag: Lag::Entries(1), pending: Some(0), xlen: 1 });
}

/// A handler that reports each task it starts and holds it until a permit is added.
#[derive(Clone)]
struct HeldTasks {
    started: mpsc::UnboundedSender<String>,
    release: Arc<Semaphore>,
}

impl Handler for HeldTasks {
    async fn handle(&self, delivery: Delivery) -> Result<(), HandlerError> {
        self.started.send(delivery.entry_id.clone()).expect("the test is listening");
        self.release.acquire().await.expect("the semaphore stays open").forget();
        Ok(())
    }
}

#[tokio::test]
async fn the_workers_consumer_moves_the_figures_task_by_task() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let redis = redis_with_monitor(dir.path());
    let mut keda = monitor(&redis).await;
    let pool = bus::pool(secrecy::SecretString::from(redis.url()), 8, Duration::from_secs(2)).expect("a Redis pool");

    let permissions = PermissionTable::parse(PERMISSIONS).expect("the shipped permission table");
    let master = MasterFile::new(MasterSecret::from_bytes([7; 32]));
    let keyring = |role| Keyring::derive(&master, Process::Role(role), &permissions).expect("derive a keyring");
    let publisher = Publisher::new(pool.clone(), Arc::new(keyring(Role::Orchestrator)), PublisherConfig::default());
    let stream = StreamName::tasks(Role::Dev);
    let orchestrator = Sender { role: Role::Orchestrator, instance: Instance::parse("orchestrator-0").expect("name") };
    for n in 0..3 {
        let assign = TaskAssign {
            attempt: 1,
            instructions: format!("task {n}"),
            workspace: format!("/var/lib/agentfleet/workspace/task-{n}"),
            repository: None,
            test_command: None,
            findings: vec![],
            scope: vec![],
            change: None,
            change_sha256: None,
        };
        let env = Envelope::new(orchestrator.clone(), Role::Dev, bus::now_ms(), 600_000, 0, assign.into());
        publisher.publish(&stream, &env).await.expect("publish a task.assign");
    }
    assert_eq!(figures(&mut keda).await, Figures { lag: Lag::NoGroup, pending: None, xlen: 3 });

    // A dev worker's consumer: group `dev`, one task at a time.
    let verifier = Arc::new(Verifier::new(keyring(Role::Dev), permissions.clone(), VerifierConfig::default()));
    let mut cfg = ConsumerConfig::new(stream.clone(), GROUP, "dev-worker-0");
    cfg.batch = 1;
    cfg.block = Duration::from_millis(100);
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let release = Arc::new(Semaphore::new(0));
    let handler = HeldTasks { started: started_tx, release: release.clone() };
    let consumer = Consumer::new(cfg, pool, verifier, KillEpoch::new(0), handler).expect("a valid consumer config");
    let stats = consumer.stats();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(consumer.run(shutdown.clone()));

    // When the handler starts task k, the consumer has acknowledged task k-1 and read task k
    // (it acknowledges a batch before it reads the next): the figures are settled.
    let next_start = async |started: &mut mpsc::UnboundedReceiver<String>| {
        tokio::time::timeout(Duration::from_secs(20), started.recv())
            .await
            .expect("the consumer starts the next task within 20 s")
            .expect("the handler is alive")
    };
    next_start(&mut started).await;
    assert_eq!(figures(&mut keda).await, Figures { lag: Lag::Entries(2), pending: Some(1), xlen: 3 });
    release.add_permits(1);
    next_start(&mut started).await;
    assert_eq!(figures(&mut keda).await, Figures { lag: Lag::Entries(1), pending: Some(1), xlen: 3 });
    release.add_permits(1);
    next_start(&mut started).await;
    assert_eq!(figures(&mut keda).await, Figures { lag: Lag::Entries(0), pending: Some(1), xlen: 3 });

    // The last one: its acknowledgement follows the handler's return, so wait for it.
    release.add_permits(1);
    let deadline = Instant::now() + Duration::from_secs(20);
    while stats.handled.load(std::sync::atomic::Ordering::Acquire) < 3 {
        assert!(Instant::now() < deadline, "the consumer did not acknowledge the third task within 20 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(figures(&mut keda).await, Figures { lag: Lag::Entries(0), pending: Some(0), xlen: 3 });

    shutdown.cancel();
    running.await.expect("the consumer stops cleanly");
}
