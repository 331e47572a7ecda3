//! `fleetctl keys rotate` against live keyrings: every edge rotated (the generation is the
//! master's) while 10,000 envelopes flow from two senders (dev, qa) to two orchestrator
//! consumers over a real redis-server, and the cycle's resumption after a crash.
//!
//! The publisher and the consumers are the library's own (`bus::Publisher`,
//! `bus::Consumer`), each with a `LiveKeyring` loaded from a keyset FILE and a
//! `KeysetReloader` polling it; the rotation is `fleetctl::rotation::run_cycle`, the code
//! `fleetctl keys rotate` runs, with short waits.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bus::{Consumer, ConsumerConfig, Delivery, Handler, HandlerError, KeysetReloader, KillEpoch, Publisher};
use envelope::{
    Edge, Envelope, Instance, Keyset, LiveKeyring, MasterFile, MasterSecret, Payload, PermissionTable, Process, Role,
    Sender, Status, StreamName, TaskResult, Verifier, VerifierConfig, VerifyContext, VerifyError, streams,
};
use fleet_testkit::RedisServer;
use fleetctl::rotation::{Ended, PROCESSES, Phase, Plan, run_cycle};
use tokio_util::sync::CancellationToken;

const PERMISSIONS: &str = include_str!("../../config/permissions.toml");
const TOTAL: u64 = 10_000;
const BATCH: u64 = 50;
/// How often each process re-reads its keyset file in these tests.
const POLL: Duration = Duration::from_millis(50);
const DEV_TO_ORCH: Edge = Edge { from: Role::Dev, to: Role::Orchestrator };

struct Fleet {
    dir: tempfile::TempDir,
    plan: Plan,
}

impl Fleet {
    /// A master at generation 1, the permission file, and every process's keyset in `keys/`.
    fn new(wait: Duration, max_ttl: Duration) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let master = MasterFile::new(MasterSecret::from_bytes([9; 32]));
        std::fs::write(dir.path().join("master.toml"), master.to_toml().as_bytes()).unwrap();
        std::fs::set_permissions(dir.path().join("master.toml"), std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        std::fs::write(dir.path().join("permissions.toml"), PERMISSIONS).unwrap();
        std::fs::create_dir(dir.path().join("keys")).unwrap();
        let perms = PermissionTable::parse(PERMISSIONS).unwrap();
        let processes: Vec<Process> = PROCESSES.iter().map(|p| Process::parse(p).unwrap()).collect();
        for p in &processes {
            std::fs::write(
                dir.path().join("keys").join(format!("{p}.keyset.toml")),
                master.derive_keyset(*p, &perms).to_toml().as_bytes(),
            )
            .unwrap();
        }
        let plan = Plan {
            master: dir.path().join("master.toml"),
            permissions: dir.path().join("permissions.toml"),
            keysets: dir.path().join("keys"),
            processes,
            wait,
            max_ttl,
            skew: Duration::ZERO,
            hook: None,
        };
        Self { dir, plan }
    }

    fn keyset_file(&self, process: &str) -> PathBuf {
        self.plan.keysets.join(format!("{process}.keyset.toml"))
    }

    fn master(&self) -> MasterFile {
        MasterFile::parse(&std::fs::read_to_string(&self.plan.master).unwrap()).unwrap()
    }
}

/// A process's keys as it runs them: loaded from its keyset file, re-read every [`POLL`].
struct LiveKeys {
    live: LiveKeyring,
    reloads: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

fn live_keys(path: &Path, process: Process, stop: &CancellationToken) -> LiveKeys {
    let keyset = Keyset::parse(&std::fs::read_to_string(path).unwrap()).unwrap();
    let live = LiveKeyring::new(keyset.into_keyring());
    let reloader = KeysetReloader::new(path, process, live.clone(), POLL);
    let reloads = reloader.reloads();
    let task = tokio::spawn(reloader.run(stop.clone()));
    LiveKeys { live, reloads, task }
}

/// Counts each result number it handles and the key generation that signed it.
#[derive(Clone, Default)]
struct Tally {
    by_number: Arc<Mutex<BTreeMap<u64, u32>>>,
    by_generation: Arc<Mutex<BTreeMap<u32, u64>>>,
    by_kid: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl Handler for Tally {
    async fn handle(&self, d: Delivery) -> Result<(), HandlerError> {
        let Payload::TaskResult(r) = &d.envelope.payload else { panic!("not a result: {:?}", d.envelope.payload) };
        let n: u64 = r.summary.parse().expect("a number");
        *self.by_number.lock().unwrap().entry(n).or_default() += 1;
        *self.by_generation.lock().unwrap().entry(d.envelope.kid().generation).or_default() += 1;
        *self.by_kid.lock().unwrap().entry(d.envelope.kid().to_string()).or_default() += 1;
        Ok(())
    }
}

/// Result `n`, from dev when `n` is even and from qa when it is odd: two senders, two edges.
fn result(n: u64) -> Envelope {
    let payload = TaskResult {
        attempt: 1,
        status: Status::Success,
        summary: n.to_string(),
        findings: vec![],
        diff: None,
        log: None,
        change_sha256: None,
        calls: Vec::new(),
        containment: Vec::new(),
    };
    let role = if n.is_multiple_of(2) { Role::Dev } else { Role::Qa };
    let from = Sender { role, instance: Instance::parse(&format!("{role}-1")).unwrap() };
    Envelope::new(from, Role::Orchestrator, bus::now_ms(), 60_000, 0, payload.into())
}

fn pool(server: &RedisServer) -> bus::RedisPool {
    bus::pool(secrecy::SecretString::from(server.url()), 8, Duration::from_secs(2)).unwrap()
}

fn results() -> StreamName {
    StreamName::parse(streams::RESULTS).unwrap()
}

fn consumer_config(name: &str) -> ConsumerConfig {
    let mut c = ConsumerConfig::new(results(), "orchestrator", name);
    c.block = Duration::from_millis(100);
    c.maintenance_every = Duration::from_millis(50);
    c.retry_base = Duration::from_millis(20);
    c.retry_max = Duration::from_millis(200);
    c.claim_idle = Duration::from_secs(5);
    c.grace = Duration::from_secs(2);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_every_edge_while_10000_envelopes_flow() {
    let server = RedisServer::start().expect("redis-server must be installed; tests never skip");
    // --max-ttl 1s: longer than the consumers take to drain what was signed with
    // generation 1 (the real default is the fleet's longest ttl, 1 h).
    let fleet = Fleet::new(Duration::from_millis(400), Duration::from_secs(1));
    let stop = CancellationToken::new();
    let perms = PermissionTable::parse(PERMISSIONS).unwrap();

    // The senders: dev (dev>orchestrator) and qa (qa>orchestrator), each with its keyset file.
    let dev = live_keys(&fleet.keyset_file("dev"), Process::Role(Role::Dev), &stop);
    let publisher = Arc::new(Publisher::new(pool(&server), &dev.live, bus::PublisherConfig::default()));
    assert!(publisher.keyring().same_slot(&dev.live));
    let qa = live_keys(&fleet.keyset_file("qa"), Process::Role(Role::Qa), &stop);
    let qa_publisher = Arc::new(Publisher::new(pool(&server), &qa.live, bus::PublisherConfig::default()));

    // Two orchestrator consumers in one group, each with its own keyring and reloader.
    let tally = Tally::default();
    let mut receivers = Vec::new();
    for name in ["orchestrator-0", "orchestrator-1"] {
        let keys = live_keys(&fleet.keyset_file("orchestrator"), Process::Role(Role::Orchestrator), &stop);
        let verifier = Arc::new(Verifier::new(&keys.live, perms.clone(), VerifierConfig::default()));
        let consumer =
            Consumer::new(consumer_config(name), pool(&server), verifier.clone(), KillEpoch::new(0), tally.clone())
                .unwrap();
        let stats = consumer.stats();
        let task = tokio::spawn(consumer.run(stop.clone()));
        receivers.push((keys, verifier, stats, task));
    }
    let gen1_dev = dev.live.current().clone();

    // The flow: 10,000 results in batches; the rotation starts after the first 1,000, and the
    // last 1,000 go out only once it is over, so both generations carry traffic.
    let rotation_done = Arc::new(tokio::sync::Notify::new());
    let flow = {
        let (publisher, qa_publisher, done) = (publisher.clone(), qa_publisher.clone(), rotation_done.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while n < TOTAL {
                if n == TOTAL - 1000 {
                    done.notified().await;
                }
                let (dev_batch, qa_batch): (Vec<_>, Vec<_>) =
                    (n..n + BATCH).map(|i| (results(), result(i))).partition(|(_, e)| e.from.role == Role::Dev);
                publisher.publish_batch(&dev_batch).await.expect("publish as dev");
                qa_publisher.publish_batch(&qa_batch).await.expect("publish as qa");
                n += BATCH;
                tokio::time::sleep(Duration::from_millis(8)).await;
            }
        })
    };
    while tally.by_number.lock().unwrap().len() < 1000 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let mut out = Vec::new();
    let began = Instant::now();
    let ended = run_cycle(&fleet.plan, &mut out, &CancellationToken::new()).await.expect("rotation");
    let took = began.elapsed();
    let report = String::from_utf8(out).unwrap();
    assert_eq!(ended, Ended::Rotated { signing: 2 }, "{report}");
    assert!(took >= fleet.plan.wait + fleet.plan.retire_wait(), "the waits were served: {took:?}\n{report}");
    // Let every process read the last keyset (retired 1) before the rest flows.
    tokio::time::sleep(POLL * 4).await;
    rotation_done.notify_one();
    flow.await.expect("the flow task");

    let deadline = Instant::now() + Duration::from_secs(30);
    while tally.by_number.lock().unwrap().len() < TOTAL as usize {
        assert!(Instant::now() < deadline, "only {} of {TOTAL} handled", tally.by_number.lock().unwrap().len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Zero rejected, zero lost, each exactly once.
    let mut conn = redis::Client::open(server.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let rejected: u64 = redis::cmd("XLEN").arg(streams::REJECTED).query_async(&mut conn).await.unwrap();
    let dlq: u64 = redis::cmd("XLEN").arg(streams::DLQ).query_async(&mut conn).await.unwrap();
    assert_eq!((rejected, dlq), (0, 0), "nothing in fleet:rejected or fleet:dlq");
    let by_number = tally.by_number.lock().unwrap().clone();
    assert_eq!(by_number.len() as u64, TOTAL);
    assert!(by_number.iter().all(|(n, times)| *n < TOTAL && *times == 1), "every result handled exactly once");
    let by_generation = tally.by_generation.lock().unwrap().clone();
    assert!(by_generation.get(&1).is_some_and(|c| *c >= 1000), "generation 1 carried traffic: {by_generation:?}");
    assert!(by_generation.get(&2).is_some_and(|c| *c >= 1000), "generation 2 carried traffic: {by_generation:?}");
    assert_eq!(by_generation.values().sum::<u64>(), TOTAL);
    let by_kid = tally.by_kid.lock().unwrap().clone();
    for kid in ["dev>orchestrator:1", "dev>orchestrator:2", "qa>orchestrator:1", "qa>orchestrator:2"] {
        assert!(by_kid.get(kid).is_some_and(|c| *c >= 500), "{kid} carried traffic: {by_kid:?}");
    }
    eprintln!("handled per kid: {by_kid:?}; rotation took {took:?}");
    let handled: u64 = receivers.iter().map(|r| r.2.handled.load(Ordering::Relaxed)).sum();
    let refused: u64 = receivers.iter().map(|r| r.2.rejected.load(Ordering::Relaxed)).sum();
    assert_eq!((handled, refused), (TOTAL, 0));

    // Ended on generation 2 with 1 retired, in the master and in every running keyring.
    let master = fleet.master();
    assert_eq!((master.current_generation, master.signing_generation, master.retired_through), (2, 2, 1));
    assert_eq!(publisher.keyring().signing_kid(DEV_TO_ORCH).unwrap().generation, 2);
    let qa_to_orch = Edge { from: Role::Qa, to: Role::Orchestrator };
    assert_eq!(qa_publisher.keyring().signing_kid(qa_to_orch).unwrap().generation, 2);
    let old_frame = gen1_dev.seal(&result(TOTAL + 2)).unwrap(); // even: from dev
    let ctx = VerifyContext { now_ms: bus::now_ms(), kill_epoch: 0 };
    for (keys, verifier, _, _) in &receivers {
        assert_eq!(keys.live.signing_kid(Edge { from: Role::Orchestrator, to: Role::Dev }).unwrap().generation, 2);
        assert!(
            matches!(verifier.check(streams::RESULTS, &old_frame, ctx), Err(VerifyError::RetiredKid(_))),
            "generation 1 is refused as retired"
        );
    }

    // Nothing restarted: the same keyrings, reloaded in place (stage, promote, retire),
    // and every task still running until told to stop.
    for keys in [&dev, &qa].into_iter().chain(receivers.iter().map(|r| &r.0)) {
        assert_eq!(keys.reloads.load(Ordering::Relaxed), 3, "{report}");
        assert!(!keys.task.is_finished());
    }
    for (keys, verifier, _, task) in &receivers {
        assert!(verifier.keyring().same_slot(&keys.live));
        assert!(!task.is_finished(), "a consumer stopped during the rotation");
    }
    stop.cancel();
    for (keys, _, _, task) in receivers {
        tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap();
        keys.task.await.unwrap();
    }
    dev.task.await.unwrap();
    qa.task.await.unwrap();
    drop(fleet.dir);
}

/// `--every`: cycle after cycle until the stop signal; each one a full generation.
#[tokio::test]
async fn every_runs_cycles_until_stopped() {
    let fleet = Fleet::new(Duration::from_millis(50), Duration::ZERO);
    let stop = CancellationToken::new();
    let stopper = {
        let (stop, master) = (stop.clone(), fleet.plan.master.clone());
        tokio::spawn(async move {
            loop {
                let m = MasterFile::parse(&std::fs::read_to_string(&master).unwrap()).unwrap();
                if m.retired_through >= 2 {
                    stop.cancel();
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let mut out = Vec::new();
    tokio::time::timeout(
        Duration::from_secs(20),
        fleetctl::rotation::run_every(&fleet.plan, Duration::from_millis(100), &mut out, &stop),
    )
    .await
    .expect("stops when told")
    .unwrap();
    stopper.await.unwrap();
    let m = fleet.master();
    assert!(m.signing_generation >= 3 && m.retired_through == m.signing_generation - 1, "{m:?}");
    let report = String::from_utf8(out).unwrap();
    assert!(report.matches("Rotation done").count() >= 2, "{report}");
}

/// A crash (here SIGINT's token) while waiting to promote: the master says "staged", and
/// the next run promotes and retires without staging again, serving every wait in full.
#[tokio::test]
async fn rotate_resumes_after_a_crash_without_skipping_a_wait() {
    let fleet = Fleet::new(Duration::from_millis(300), Duration::from_millis(100));
    let stop = CancellationToken::new();
    let mut out = Vec::new();
    let cancel = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            stop.cancel();
        })
    };
    let ended = run_cycle(&fleet.plan, &mut out, &stop).await.unwrap();
    cancel.await.unwrap();
    assert_eq!(ended, Ended::Interrupted(Phase::Staged { old: 1, new: 2 }));
    let m = fleet.master();
    assert_eq!((m.current_generation, m.signing_generation, m.retired_through), (2, 1, 0));
    let dev = Keyset::parse(&std::fs::read_to_string(fleet.keyset_file("dev")).unwrap()).unwrap();
    assert_eq!(dev.generations().newest, 2, "the staged keysets were written before the wait");
    assert_eq!(dev.generations().signing, 1);

    // The "crash" left the master staged; a new run continues from there.
    let mut out = Vec::new();
    let began = Instant::now();
    let ended = run_cycle(&fleet.plan, &mut out, &CancellationToken::new()).await.unwrap();
    let took = began.elapsed();
    let report = String::from_utf8(out).unwrap();
    assert_eq!(ended, Ended::Rotated { signing: 2 }, "{report}");
    assert!(!report.contains("Staged generation"), "it did not stage again: {report}");
    assert!(took >= fleet.plan.wait + fleet.plan.retire_wait(), "both waits served again: {took:?}");
    let m = fleet.master();
    assert_eq!((m.current_generation, m.signing_generation, m.retired_through), (2, 2, 1));
    for p in PROCESSES {
        let k = Keyset::parse(&std::fs::read_to_string(fleet.keyset_file(p)).unwrap()).unwrap();
        assert_eq!((k.generations().signing, k.generations().retired_through), (2, 1), "{p}");
    }
}

/// A crash after the master was promoted but before the keysets were rewritten: the next
/// run writes them first and waits the whole retire wait before retiring.
#[tokio::test]
async fn a_crash_after_promote_rewrites_the_keysets_before_the_retire_wait() {
    let fleet = Fleet::new(Duration::from_millis(200), Duration::from_millis(200));
    let mut m = fleet.master();
    m.rotate().unwrap();
    m.promote();
    std::fs::write(&fleet.plan.master, m.to_toml().as_bytes()).unwrap();
    let (path, stop) = (fleet.keyset_file("qa"), CancellationToken::new());
    let started = Instant::now();
    let watcher = {
        let stop = stop.clone();
        tokio::spawn(async move {
            // The keyset must say "signing 2" long before the master retires 1.
            loop {
                let k = Keyset::parse(&std::fs::read_to_string(&path).unwrap()).unwrap();
                if k.generations().signing == 2 {
                    return started.elapsed();
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(5)) => {}
                    () = stop.cancelled() => return Duration::MAX,
                }
            }
        })
    };
    let mut out = Vec::new();
    let ended = run_cycle(&fleet.plan, &mut out, &CancellationToken::new()).await.unwrap();
    let took = started.elapsed();
    stop.cancel();
    let seen = watcher.await.unwrap();
    assert_eq!(ended, Ended::Rotated { signing: 2 });
    assert!(seen + fleet.plan.retire_wait() <= took, "keysets written at {seen:?}, retired at {took:?}");
    assert!(!String::from_utf8(out).unwrap().contains("Staged generation"));
}

/// A crash after the last master write (retire) but before the last keyset write: the next
/// run only finishes that write, and stages nothing.
#[tokio::test]
async fn a_crash_after_retire_is_finished_not_rotated_again() {
    let fleet = Fleet::new(Duration::from_millis(100), Duration::from_millis(100));
    let mut m = fleet.master();
    m.rotate().unwrap();
    m.promote();
    m.retire_through(1).unwrap();
    std::fs::write(&fleet.plan.master, m.to_toml().as_bytes()).unwrap();
    let mut out = Vec::new();
    let ended = run_cycle(&fleet.plan, &mut out, &CancellationToken::new()).await.unwrap();
    assert_eq!(ended, Ended::Finished { signing: 2 }, "{}", String::from_utf8_lossy(&out));
    let m = fleet.master();
    assert_eq!((m.current_generation, m.signing_generation, m.retired_through), (2, 2, 1));
    let k = Keyset::parse(&std::fs::read_to_string(fleet.keyset_file("budget")).unwrap()).unwrap();
    assert_eq!(k.generations().retired_through, 1);
}

/// The binary: operator mistakes exit 64 before anything changes; SIGTERM during a wait
/// exits 1 with the master file recording the step, and the next run finishes the cycle.
#[test]
fn the_binary_refuses_bad_flags_and_stops_cleanly_on_sigterm() {
    use std::process::{Command, Stdio};
    let fleet = Fleet::new(Duration::from_secs(1), Duration::ZERO);
    let master = fleet.plan.master.display().to_string();
    let keysets = fleet.plan.keysets.display().to_string();
    let perms = fleet.plan.permissions.display().to_string();
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_fleetctl"))
            .args(["keys", "rotate", "--master", &master, "--permissions", &perms])
            .args(extra)
            .output()
            .unwrap()
    };
    for (extra, says) in [
        (&["--keysets", "/nonexistent/keys"][..], "is not a directory"),
        (&["--keysets", &keysets, "--wait", "500ms"][..], "is too short"),
        (&["--keysets", &keysets, "--every", "10s"][..], "at least 60s"),
        (&["--keysets", &keysets, "--wait", "2d"][..], "not a duration"),
    ] {
        let out = run(extra);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{extra:?}: {stderr}");
        assert!(stderr.contains(says), "{extra:?}: {stderr}");
    }
    assert_eq!(fleet.master().current_generation, 1, "nothing was staged");

    let stdout_path = fleet.dir.path().join("rotate.out");
    let child = Command::new(env!("CARGO_BIN_EXE_fleetctl"))
        .args(["keys", "rotate", "--master", &master, "--permissions", &perms, "--keysets", &keysets])
        .args(["--wait", "60s"])
        .stdout(std::fs::File::create(&stdout_path).unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&stdout_path).unwrap().contains("Waiting") {
        assert!(Instant::now() < deadline, "rotate did not reach its first wait");
        std::thread::sleep(Duration::from_millis(20));
    }
    Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("run `fleetctl keys rotate` again"));
    let m = fleet.master();
    assert_eq!((m.current_generation, m.signing_generation), (2, 1), "staged, not promoted");

    // --wait 1s --max-ttl 0s: the next run promotes and retires (1 s + 1 s + 30 s skew).
    let out = run(&["--keysets", &keysets, "--wait", "1s", "--max-ttl", "0s"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(!stdout.contains("Staged generation"), "{stdout}");
    assert!(stdout.contains("Rotation done: generation 2 signs"), "{stdout}");
    let m = fleet.master();
    assert_eq!((m.current_generation, m.signing_generation, m.retired_through), (2, 2, 1));
}
