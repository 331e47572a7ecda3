//! End-to-end throughput and latency of the bus against one local `redis-server`, next to
//! `redis-benchmark`'s raw `XADD` rate on the same server. Results: `docs/benchmarks.md`.
//!
//! Run with `cargo bench -p bus --bench bus` (release profile with thin LTO). Options go
//! after `--`, e.g. `cargo bench -p bus --bench bus -- --runs 1 --consumers 3`; `--help`
//! lists them. Without `--bench` (as under `cargo test --benches`) it does a quick smoke run.
//!
//! Rows, each measured from an empty server (`FLUSHALL`) in every run:
//! - `raw XADD`: `redis-benchmark -c 50 -P 16 -n N -q --csv XADD bench:raw * env <512 B>`.
//! - `signed batched` / `signed unbatched`: N dev→orchestrator `task.result` envelopes with a
//!   512-byte summary, sealed and `XADD`ed by [`Publisher::publish_batch`] (64 per call) or
//!   [`Publisher::publish`], from several tasks sharing one `Publisher`, consumed by
//!   [`Consumer`]s in group `orchestrator` whose handler counts. Rate = N / (first publish →
//!   last entry acknowledged).
//! - `unsigned batched` / `unsigned unbatched`: the same envelopes MessagePack-encoded but not
//!   framed or signed, `XADD`ed by [`Publisher::publish_wire_batch`] (same pipelining, cap,
//!   backlog check), read by a copy of the consumer loop written here with the same Redis
//!   round trips (`XREADGROUP`, the replay guard's script, `XACK`) that only
//!   decodes the body: no frame, no HMAC, no permission, clock or epoch checks.
//! - `unsigned batched, no guard` (extra): as above without the replay-guard command.
//! - latency: one envelope at a time on an idle stream, publish call → handler entry.
//!   "Paced": the next publish 1 ms after the previous entry was acknowledged, so every
//!   thread involved has gone to sleep; "back to back": at once, threads still awake.
//!
//! The machines this runs on are shared, so for every row it prints where the CPU went
//! (redis-server, this process, everything else, from `INFO cpu` and `/proc`), repeats the
//! row after waiting for quiet when other processes used more than 10% of a core meanwhile,
//! and times 2,000 seals just before it as a gauge of how fast the host is at that moment.

#![forbid(unsafe_code)]

use std::fmt::Display;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bus::Conn;
use bus::names::ENV_FIELD;
use bus::{Consumer, ConsumerConfig, ConsumerStats, Delivery, Handler, HandlerError, KillEpoch, Publisher};
use envelope::{
    Envelope, Instance, Keyring, MasterFile, MasterSecret, PermissionTable, Process, Role, Sender, Status, StreamName,
    TaskResult, Verifier, VerifierConfig, VerifyContext, streams,
};
use fleet_testkit::RedisServer;
use secrecy::SecretString;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Result<T, E = BoxError> = std::result::Result<T, E>;

const PERMISSIONS: &str = include_str!("../../config/permissions.toml");
/// Size of `redis-benchmark`'s value and of the envelopes' summary.
const PAYLOAD: usize = 512;
const GROUP: &str = "orchestrator";
/// `redis-benchmark`'s shape, fixed by the issue this benchmark answers.
const RAW_CLIENTS: usize = 50;
const RAW_PIPELINE: usize = 16;
/// Longest a phase may take before the run is declared stuck.
const PHASE_TIMEOUT: Duration = Duration::from_secs(300);
/// Lets consumers reach their first blocking `XREADGROUP` before the clock starts.
const CONSUMER_STARTUP: Duration = Duration::from_millis(300);

trait Context<T> {
    fn context(self, what: &str) -> Result<T>;
}

impl<T, E: Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: &str) -> Result<T> {
        self.map_err(|e| format!("Failed to {what}: {e}").into())
    }
}

/// Command-line options.
#[derive(Debug, Clone)]
struct Options {
    /// Repetitions of every row; the table shows medians.
    runs: usize,
    /// Entries per throughput row (and `redis-benchmark -n`).
    n: usize,
    /// Consumers of the throughput rows (one connection and task each).
    consumers: usize,
    /// Concurrent publishing tasks of the batched rows.
    batch_publishers: usize,
    /// Concurrent publishing tasks of the unbatched rows.
    single_publishers: usize,
    /// Envelopes per `publish_batch` call.
    publish_batch: usize,
    /// Consumers' `COUNT` per `XREADGROUP`.
    read_batch: usize,
    /// Latency samples per run, after `warmup` unrecorded ones.
    samples: usize,
    warmup: usize,
    /// Paced latency row: pause between one sample's acknowledgement and the next publish, µs.
    gap_us: usize,
    /// Rows measured while other processes used more than this % of one core are repeated
    /// (after waiting for quiet); `None` in smoke runs, which never wait.
    max_others: Option<usize>,
    /// Rows to run (all when empty).
    only: Vec<String>,
    /// Print where each row's time went: CPU of both processes and Redis's per-command cost.
    profile: bool,
}

const USAGE: &str = "\
Options (after `cargo bench -p bus --bench bus --`):
  --runs R            repetitions; medians are reported (3)
  --n N               entries per throughput row and redis-benchmark -n (200000)
  --consumers C       consumers in the throughput rows (3)
  --batch-publishers P   publishing tasks, batched rows (4)
  --single-publishers P  publishing tasks, unbatched rows (50)
  --publish-batch B   envelopes per publish_batch (64)
  --read-batch B      XREADGROUP COUNT (128)
  --samples S         latency samples per run (2000), after --warmup W (200)
  --gap-us G          pause between paced latency samples once acknowledged, µs (1000)
  --max-others PCT    repeat a row (after waiting for quiet, up to 5 times) if other
                      processes used more than PCT% of one core meanwhile (10)
  --only a,b          rows: raw, signed-batched, signed-unbatched, unsigned-batched,
                      unsigned-unbatched, unsigned-noguard, latency, latency-hot
  --profile           per row: CPU seconds of redis-server and of this process, and
                      Redis's INFO commandstats per entry";

impl Options {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Self, String> {
        let mut o = Options {
            runs: 3,
            n: 200_000,
            consumers: 3,
            batch_publishers: 4,
            single_publishers: 50,
            publish_batch: 64,
            read_batch: 128,
            samples: 2_000,
            warmup: 200,
            gap_us: 1_000,
            max_others: Some(10),
            only: Vec::new(),
            profile: false,
        };
        let mut bench = false;
        while let Some(arg) = args.next() {
            let mut value = |name: &str| -> Result<usize, String> {
                let v = args.next().ok_or(format!("{name} needs a value\n{USAGE}"))?;
                v.parse::<usize>().ok().filter(|n| *n > 0).ok_or(format!("{name}: `{v}` is not a positive integer"))
            };
            match arg.as_str() {
                "--bench" => bench = true,
                "--runs" => o.runs = value("--runs")?,
                "--n" => o.n = value("--n")?,
                "--consumers" => o.consumers = value("--consumers")?,
                "--batch-publishers" => o.batch_publishers = value("--batch-publishers")?,
                "--single-publishers" => o.single_publishers = value("--single-publishers")?,
                "--publish-batch" => o.publish_batch = value("--publish-batch")?,
                "--read-batch" => o.read_batch = value("--read-batch")?,
                "--samples" => o.samples = value("--samples")?,
                "--warmup" => o.warmup = value("--warmup")?,
                "--max-others" => o.max_others = Some(value("--max-others")?),
                "--gap-us" => {
                    let v = args.next().ok_or(format!("--gap-us needs a value\n{USAGE}"))?;
                    o.gap_us = v.parse().map_err(|_| format!("--gap-us: `{v}` is not a number"))?;
                }
                "--only" => {
                    let v = args.next().ok_or(format!("--only needs a value\n{USAGE}"))?;
                    o.only = v.split(',').map(str::to_owned).collect();
                }
                "--profile" => o.profile = true,
                other => return Err(format!("unknown option `{other}`\n{USAGE}")),
            }
        }
        if !bench {
            // `cargo test --benches`: prove it works, quickly.
            o.runs = 1;
            o.n = o.n.min(2_000);
            o.samples = o.samples.min(50);
            o.warmup = o.warmup.min(10);
            o.max_others = None;
        }
        Ok(o)
    }

    fn wants(&self, row: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|r| r == row)
    }
}

fn main() -> ExitCode {
    if std::env::args().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let opts = match Options::parse(std::env::args().skip(1)) {
        Ok(o) => o,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(64);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Failed to start the Tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Benchmark failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Everything the rows share: one server, the keys, a connection for resets and checks.
struct Bench {
    server: RedisServer,
    url: SecretString,
    admin: Conn,
    keyring: Arc<Keyring>,
    verifier: Arc<Verifier>,
    stream: StreamName,
    make: BenchEnvelopes,
    opts: Options,
}

/// CPU seconds consumed so far.
#[derive(Debug, Clone, Copy)]
struct Cpu {
    /// redis-server, all threads.
    redis: f64,
    /// This process and its waited-for children.
    own: f64,
    /// The whole machine.
    machine: f64,
}

impl Cpu {
    /// CPU seconds that neither redis-server nor this process used between `self` and `later`.
    fn others_until(&self, later: &Cpu) -> f64 {
        (later.machine - self.machine - (later.redis - self.redis) - (later.own - self.own)).max(0.0)
    }
}

/// One measurement of one row.
#[derive(Debug, Clone, Copy)]
struct Measured {
    /// The row's key in [`ROWS`] or [`LATENCIES`].
    row: &'static str,
    /// Entries per second, or the p50 latency in µs.
    value: f64,
    /// Latency rows: the p99 in µs.
    p99: Option<f64>,
    /// CPU other processes used meanwhile, % of one core.
    others: f64,
    /// µs per seal just before: how fast the (virtual) CPU was at the time.
    seal_us: f64,
    /// Throughput rows: redis-server's CPU per entry, µs.
    redis_us: Option<f64>,
}

/// Where a throughput row's CPU went, besides this process.
#[derive(Debug, Clone, Copy)]
struct Shares {
    /// Other processes' CPU, % of one core.
    others: f64,
    /// redis-server's CPU per entry, µs.
    redis_us: f64,
}

/// One run's numbers, in row order.
type RunResult = Vec<Measured>;

/// Latency rows: key, label, and whether paced (1 ms pause before each publish).
const LATENCIES: [(&str, &str, bool); 2] =
    [("latency", "idle latency, paced", true), ("latency-hot", "idle latency, back to back", false)];

const ROWS: [(&str, &str); 6] = [
    ("raw", "raw XADD (redis-benchmark)"),
    ("signed-batched", "signed batched"),
    ("signed-unbatched", "signed unbatched"),
    ("unsigned-batched", "unsigned batched"),
    ("unsigned-unbatched", "unsigned unbatched"),
    ("unsigned-noguard", "unsigned batched, no replay guard"),
];

async fn run(opts: Options) -> Result<()> {
    let server = RedisServer::builder().start().context("start redis-server")?;
    let url: SecretString = server.url().into();
    let client = redis::Client::open(server.url()).context("open a Redis client")?;
    // FLUSHALL of a row's leftovers takes longer than redis's default 500 ms response timeout.
    let admin_config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(60)));
    let admin = client.get_multiplexed_async_connection_with_config(&admin_config).await.context("connect to Redis")?;
    let master = MasterFile::new(MasterSecret::from_bytes([42; 32]));
    let permissions = PermissionTable::parse(PERMISSIONS).context("parse config/permissions.toml")?;
    let keyring = Keyring::derive(&master, Process::Role(Role::Dev), &permissions).context("derive dev keys")?;
    let orchestrator = Keyring::derive(&master, Process::Role(Role::Orchestrator), &permissions)
        .context("derive orchestrator keys")?;
    let verifier = Verifier::new(orchestrator, permissions, VerifierConfig::default());
    let summary: String = (0..PAYLOAD).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let b = Bench {
        url,
        admin: bus::Conn::Single(admin),
        keyring: Arc::new(keyring),
        verifier: Arc::new(verifier),
        stream: StreamName::parse(streams::RESULTS).context("parse the results stream name")?,
        make: BenchEnvelopes {
            sender: Sender { role: Role::Dev, instance: Instance::parse("dev-1").context("parse the instance")? },
            summary,
        },
        opts,
        server,
    };
    let o = &b.opts;
    println!(
        "redis-server on port {}; n = {}, runs = {}, consumers = {}, publishers batched/unbatched = {}/{}, publish batch = {}, read batch = {}, {} CPUs",
        b.server.port(),
        o.n,
        o.runs,
        o.consumers,
        o.batch_publishers,
        o.single_publishers,
        o.publish_batch,
        o.read_batch,
        std::thread::available_parallelism().map(usize::from).unwrap_or(0),
    );
    if let Some(limit) = o.max_others {
        wait_for_quiet(limit as f64).await;
    }
    diagnostics(&b).await?;

    // Untimed warm-up of the whole path (allocator, connections, server's memory).
    b.throughput(Path::Signed, true, o.n.min(20_000)).await?;

    let mut runs = Vec::new();
    for r in 1..=o.runs {
        let mut result = RunResult::new();
        for (row, label) in ROWS {
            if !o.wants(row) {
                continue;
            }
            let mut attempt = 1;
            let m = loop {
                let seal_us = b.seal_probe()?;
                let (rate, shares) = match row {
                    "raw" => b.raw_xadd().await?,
                    "signed-batched" => b.throughput(Path::Signed, true, o.n).await?,
                    "signed-unbatched" => b.throughput(Path::Signed, false, o.n).await?,
                    "unsigned-batched" => b.throughput(Path::Unsigned { guard: true }, true, o.n).await?,
                    "unsigned-unbatched" => b.throughput(Path::Unsigned { guard: true }, false, o.n).await?,
                    _ => b.throughput(Path::Unsigned { guard: false }, true, o.n).await?,
                };
                if !b.too_noisy(shares.others, &mut attempt).await {
                    let Shares { others, redis_us } = shares;
                    break Measured { row, value: rate, p99: None, others, seal_us, redis_us: Some(redis_us) };
                }
            };
            println!("run {r}: {label:<36} {:>10.0} /s", m.value);
            result.push(m);
        }
        for (row, label, paced) in LATENCIES {
            if !o.wants(row) {
                continue;
            }
            let mut attempt = 1;
            let m = loop {
                let seal_us = b.seal_probe()?;
                let gap_us = if paced { o.gap_us } else { 0 };
                let (p50, p99, others) = b.latency(gap_us).await?;
                if !b.too_noisy(others, &mut attempt).await {
                    let us = |d: Duration| d.as_secs_f64() * 1e6;
                    break Measured { row, value: us(p50), p99: Some(us(p99)), others, seal_us, redis_us: None };
                }
            };
            println!("run {r}: {label}: p50 {:.0} µs, p99 {:.0} µs", m.value, m.p99.unwrap_or(0.0));
            result.push(m);
        }
        runs.push(result);
    }
    report(&runs);
    Ok(())
}

/// CPU cost of the envelope layer and the loopback round trip, single-threaded and
/// uncontended: what the end-to-end numbers are made of.
async fn diagnostics(b: &Bench) -> Result<()> {
    let env = b.envelope();
    let body = env.to_body_bytes();
    let wire = b.keyring.seal(&env).context("seal")?;
    let ctx = VerifyContext { now_ms: bus::now_ms(), kill_epoch: 0 };
    const K: u32 = 20_000;
    let per = |t: Instant| t.elapsed().as_secs_f64() * 1e6 / f64::from(K);
    let t = Instant::now();
    for _ in 0..K {
        std::hint::black_box(b.envelope());
    }
    let build = per(t);
    let t = Instant::now();
    for _ in 0..K {
        std::hint::black_box(std::hint::black_box(&env).to_body_bytes());
    }
    let encode = per(t);
    let t = Instant::now();
    for _ in 0..K {
        std::hint::black_box(b.keyring.seal(std::hint::black_box(&env)).context("seal")?);
    }
    let seal = per(t);
    let t = Instant::now();
    for _ in 0..K {
        std::hint::black_box(Envelope::from_body_bytes(std::hint::black_box(&body)).is_ok());
    }
    let decode = per(t);
    let t = Instant::now();
    for _ in 0..K {
        std::hint::black_box(b.verifier.check(streams::RESULTS, std::hint::black_box(&wire), ctx).context("check")?);
    }
    let check = per(t);
    println!(
        "envelope: body {} B, frame {} B; per envelope: build {build:.2} µs, body encode {encode:.2} µs, seal {seal:.2} µs, body decode {decode:.2} µs, check {check:.2} µs",
        body.len(),
        wire.len(),
    );
    // The floor under the latency rows: one command's round trip through redis-rs's
    // multiplexed connection, back to back and after the threads have gone to sleep.
    let mut conn = b.admin.clone();
    for (label, gap) in [("back to back", Duration::ZERO), ("paced 1 ms", Duration::from_millis(1))] {
        let mut rtts = Vec::with_capacity(2_000);
        for _ in 0..2_000 {
            let t = Instant::now();
            let _: String = redis::cmd("PING").query_async(&mut conn).await.context("PING")?;
            rtts.push(t.elapsed());
            if !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
        }
        rtts.sort_unstable();
        println!(
            "PING round trip, {label}: p50 {} µs, p99 {} µs",
            percentile(&rtts, 50.0).as_micros(),
            percentile(&rtts, 99.0).as_micros()
        );
    }
    Ok(())
}

/// Which publish and consume path a throughput row uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// `Publisher::publish{,_batch}` and `bus::Consumer`.
    Signed,
    /// Body bytes through `Publisher::publish_wire_batch`, consumed by [`unsigned_consumer`].
    Unsigned {
        /// Whether the consumer runs the replay-guard `SET`s.
        guard: bool,
    },
}

/// Counts handler calls; wakes the waiter at the target; optionally stamps each entry.
#[derive(Debug, Clone)]
struct Counter {
    count: Arc<AtomicU64>,
    target: u64,
    all: Arc<Notify>,
    stamps: Option<mpsc::UnboundedSender<Instant>>,
}

impl Counter {
    fn new(target: u64, stamps: Option<mpsc::UnboundedSender<Instant>>) -> Self {
        Self { count: Arc::default(), target, all: Arc::default(), stamps }
    }

    fn hit(&self) {
        if self.count.fetch_add(1, Ordering::Relaxed) + 1 == self.target {
            self.all.notify_one();
        }
    }
}

impl Handler for Counter {
    async fn handle(&self, d: Delivery) -> Result<(), HandlerError> {
        let at = Instant::now();
        std::hint::black_box(&d.envelope);
        if let Some(tx) = &self.stamps {
            let _ = tx.send(at);
        }
        self.hit();
        Ok(())
    }
}

impl Bench {
    /// µs per seal of the benchmark envelope, over 2,000 seals (about 15 ms): a gauge of how
    /// fast the (virtual) CPU is at the moment, which varies on a shared host.
    fn seal_probe(&self) -> Result<f64> {
        let env = self.envelope();
        let t = Instant::now();
        for _ in 0..2_000 {
            std::hint::black_box(self.keyring.seal(std::hint::black_box(&env)).context("seal")?);
        }
        Ok(t.elapsed().as_secs_f64() * 1e6 / 2_000.0)
    }

    /// Whether a row measured while other processes used `others`% of a core must be
    /// measured again; if so, first waits until the machine is quiet.
    async fn too_noisy(&self, others: f64, attempt: &mut usize) -> bool {
        let Some(limit) = self.opts.max_others.map(|l| l as f64) else { return false };
        if others <= limit {
            return false;
        }
        if *attempt >= NOISY_ATTEMPTS {
            println!(
                "    other processes used {others:.0}% of a core; kept after {attempt} attempts (flagged in the table)"
            );
            return false;
        }
        *attempt += 1;
        println!(
            "    other processes used {others:.0}% of a core (limit {limit:.0}%); waiting for quiet to measure again"
        );
        wait_for_quiet(limit).await;
        true
    }

    fn envelope(&self) -> Envelope {
        self.make.envelope()
    }

    fn publisher(&self) -> Result<Arc<Publisher>> {
        let pool = bus::pool(&self.url, 4, Duration::from_secs(1)).context("build the publisher's pool")?;
        Ok(Arc::new(Publisher::new(pool, Arc::clone(&self.keyring), bus::PublisherConfig::default())))
    }

    /// Empties the server and creates the consumer group, so every row starts alike.
    async fn reset(&self) -> Result<()> {
        let mut c = self.admin.clone();
        let () = redis::cmd("FLUSHALL").arg("SYNC").query_async(&mut c).await.context("FLUSHALL")?;
        bus::consumer::ensure_group(&mut c, self.stream.as_str(), GROUP).await.context("create the group")?;
        Ok(())
    }

    /// `redis-benchmark`'s requests per second for `XADD` of a 512-byte value.
    ///
    /// redis-benchmark 7.0 replaces `__data__` only in its built-in tests, not in a command
    /// given on the command line (it would store the 8 bytes `__data__`), so the value is a
    /// literal 512-byte argument and `-d` is not passed.
    async fn raw_xadd(&self) -> Result<(f64, Shares)> {
        self.reset().await?;
        let value = "x".repeat(PAYLOAD);
        let before = self.cpu_snapshot(self.opts.profile).await?;
        let start = Instant::now();
        let out = tokio::process::Command::new("redis-benchmark")
            .args(["-h", "127.0.0.1", "-p", &self.server.port().to_string()])
            .args(["-c", &RAW_CLIENTS.to_string(), "-P", &RAW_PIPELINE.to_string(), "-n", &self.opts.n.to_string()])
            .args(["-q", "--csv", "XADD", "bench:raw", "*", "env", &value])
            .output()
            .await
            .context("run redis-benchmark (apt-get install redis-tools)")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(
                format!("redis-benchmark failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr)).into()
            );
        }
        // CSV: a header, then `"XADD bench:raw * env xxx…","167504.19",…`.
        let rps = stdout
            .lines()
            .find(|l| l.starts_with("\"XADD"))
            .and_then(|l| l.split("\",\"").nth(1))
            .and_then(|v| v.trim_matches('"').parse::<f64>().ok())
            .ok_or_else(|| format!("cannot find requests per second in redis-benchmark's output: {stdout}"))?;
        // This process's CPU here is redis-benchmark's (a waited-for child's).
        let elapsed = start.elapsed();
        let after = self.cpu_snapshot(false).await?;
        let shares = self.print_profile(self.opts.n, elapsed, elapsed, &before, &after).await?;
        let mut c = self.admin.clone();
        let len: u64 = redis::cmd("XLEN").arg("bench:raw").query_async(&mut c).await.context("XLEN")?;
        if len != self.opts.n as u64 {
            return Err(format!("redis-benchmark left {len} entries, expected {}", self.opts.n).into());
        }
        Ok((rps, shares))
    }

    /// Entries per second from the first publish until the last of `n` is acknowledged.
    async fn throughput(&self, path: Path, batched: bool, n: usize) -> Result<(f64, Shares)> {
        self.reset().await?;
        let counter = Counter::new(n as u64, None);
        let shutdown = CancellationToken::new();
        let mut consumers = tokio::task::JoinSet::new();
        let mut stats: Vec<Arc<ConsumerStats>> = Vec::new();
        let acked = Arc::new(AtomicU64::new(0));
        for i in 0..self.opts.consumers {
            let mut cfg = ConsumerConfig::new(self.stream.clone(), GROUP, format!("orch-{i}"));
            cfg.batch = self.opts.read_batch;
            let pool = bus::pool(&self.url, 2, cfg.block).context("build a consumer's pool")?;
            match path {
                Path::Signed => {
                    let consumer =
                        Consumer::new(cfg, pool, Arc::clone(&self.verifier), KillEpoch::new(0), counter.clone())
                            .context("build a consumer")?;
                    stats.push(consumer.stats());
                    let token = shutdown.clone();
                    consumers.spawn(async move {
                        consumer.run(token).await;
                        Ok(())
                    });
                }
                Path::Unsigned { guard } => {
                    let conn = pool.dedicated().await.context("connect a consumer")?;
                    consumers.spawn(unsigned_consumer(
                        conn,
                        cfg,
                        guard,
                        counter.clone(),
                        Arc::clone(&acked),
                        shutdown.clone(),
                    ));
                }
            }
        }
        tokio::time::sleep(CONSUMER_STARTUP).await;

        let publisher = self.publisher()?;
        let before = self.cpu_snapshot(self.opts.profile).await?;
        let tasks = if batched { self.opts.batch_publishers } else { self.opts.single_publishers };
        let chunk = if batched { self.opts.publish_batch } else { 1 };
        let start = Instant::now();
        let mut publishers = tokio::task::JoinSet::new();
        for t in 0..tasks {
            let share = n / tasks + usize::from(t < n % tasks);
            let publisher = Arc::clone(&publisher);
            let stream = self.stream.clone();
            let bench = self.make.clone();
            publishers.spawn(async move {
                let mut left = share;
                while left > 0 {
                    let k = left.min(chunk);
                    left -= k;
                    match path {
                        Path::Signed if chunk == 1 => {
                            publisher.publish(&stream, &bench.envelope()).await.context("publish")?;
                        }
                        Path::Signed => {
                            let items: Vec<(StreamName, Envelope)> =
                                (0..k).map(|_| (stream.clone(), bench.envelope())).collect();
                            publisher.publish_batch(&items).await.context("publish a batch")?;
                        }
                        Path::Unsigned { .. } => {
                            let bodies: Vec<Vec<u8>> = (0..k).map(|_| bench.envelope().to_body_bytes()).collect();
                            let items: Vec<(&str, &[u8])> =
                                bodies.iter().map(|b| (stream.as_str(), b.as_slice())).collect();
                            publisher.publish_wire_batch(&items).await.context("publish unsigned bodies")?;
                        }
                    }
                }
                Ok::<(), BoxError>(())
            });
        }
        let finished = async {
            while let Some(r) = publishers.join_next().await {
                r.context("join a publisher")??;
            }
            let published = start.elapsed();
            counter.all.notified().await;
            // Handled is not yet acknowledged: wait for the consumers' settle pipelines.
            loop {
                let done = match path {
                    Path::Signed => stats.iter().map(|s| s.handled.load(Ordering::Relaxed)).sum::<u64>(),
                    Path::Unsigned { .. } => acked.load(Ordering::Relaxed),
                };
                if done >= n as u64 {
                    return Ok::<Duration, BoxError>(published);
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        let published = tokio::time::timeout(PHASE_TIMEOUT, finished).await.context("finish in time")??;
        let elapsed = start.elapsed();
        let after = self.cpu_snapshot(false).await?;
        let shares = self.print_profile(n, elapsed, published, &before, &after).await?;
        shutdown.cancel();
        while let Some(r) = consumers.join_next().await {
            r.context("join a consumer")??;
        }
        self.check_settled(n as u64, &stats).await?;
        Ok((n as f64 / elapsed.as_secs_f64(), shares))
    }

    /// CPU seconds used so far by redis-server, by this process (and its waited-for
    /// children: redis-benchmark) and by the whole machine. With `reset`, Redis's
    /// per-command statistics are zeroed first.
    async fn cpu_snapshot(&self, reset: bool) -> Result<Cpu> {
        let mut c = self.admin.clone();
        if reset {
            let () = redis::cmd("CONFIG").arg("RESETSTAT").query_async(&mut c).await.context("CONFIG RESETSTAT")?;
        }
        let info: String = redis::cmd("INFO").arg("cpu").query_async(&mut c).await.context("INFO cpu")?;
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(':')))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let redis = field("used_cpu_user") + field("used_cpu_sys");
        // Clock ticks (USER_HZ, 100 on Linux): utime, stime, cutime, cstime are fields 14–17
        // of /proc/self/stat.
        let stat = std::fs::read_to_string("/proc/self/stat").context("read /proc/self/stat")?;
        let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or_default();
        let ticks: Vec<f64> = after_name.split_whitespace().filter_map(|f| f.parse().ok()).collect();
        let own = ticks.get(10..14).map(|t| t.iter().sum::<f64>()).unwrap_or(0.0) / 100.0;
        let machine = machine_busy_ticks().ok_or("cannot read /proc/stat")? / 100.0;
        Ok(Cpu { redis, own, machine })
    }

    /// Where a row's time went: CPU of redis-server, of this process and of everything else
    /// on the machine (noise); with `--profile`, Redis's time per command.
    async fn print_profile(
        &self,
        n: usize,
        elapsed: Duration,
        published: Duration,
        before: &Cpu,
        after: &Cpu,
    ) -> Result<Shares> {
        let secs = elapsed.as_secs_f64();
        let redis_cpu = after.redis - before.redis;
        let own_cpu = after.own - before.own;
        let others = before.others_until(after) / secs * 100.0;
        let per_entry = |cpu: f64| cpu * 1e6 / n as f64;
        println!(
            "    {secs:.2} s (publishing done at {:.2} s); CPU, % of one core and µs per entry: redis-server {:.0}% {:.1} µs, bench {:.0}% {:.1} µs, other processes {:.0}%",
            published.as_secs_f64(),
            100.0 * redis_cpu / secs,
            per_entry(redis_cpu),
            100.0 * own_cpu / secs,
            per_entry(own_cpu),
            others,
        );
        let shares = Shares { others, redis_us: per_entry(redis_cpu) };
        if !self.opts.profile {
            return Ok(shares);
        }
        let mut c = self.admin.clone();
        let stats: String =
            redis::cmd("INFO").arg("commandstats").query_async(&mut c).await.context("INFO commandstats")?;
        let mut total_usec = 0.0;
        let mut rows = Vec::new();
        for line in stats.lines() {
            let Some((name, rest)) = line.strip_prefix("cmdstat_").and_then(|l| l.split_once(':')) else { continue };
            let get = |key: &str| {
                rest.split(',')
                    .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            let (calls, usec) = (get("calls"), get("usec"));
            if usec / (n as f64) < 0.05 {
                continue;
            }
            total_usec += usec;
            rows.push(format!("{name} {calls:.0} calls {:.2} µs/entry", usec / n as f64));
        }
        println!("    Redis time in commands: {}; total {:.2} µs/entry", rows.join(", "), total_usec / n as f64);
        Ok(shares)
    }

    /// Nothing pending, nothing rejected, and every entry handled exactly once.
    async fn check_settled(&self, n: u64, stats: &[Arc<ConsumerStats>]) -> Result<()> {
        let mut c = self.admin.clone();
        let summary: redis::Value = redis::cmd("XPENDING")
            .arg(self.stream.as_str())
            .arg(GROUP)
            .query_async(&mut c)
            .await
            .context("XPENDING")?;
        let pending = match &summary {
            redis::Value::Array(items) => items.first().and_then(bus::reply::int),
            _ => None,
        };
        if pending != Some(0) {
            return Err(format!("entries left pending: {summary:?}").into());
        }
        let rejected: u64 = stats.iter().map(|s| s.rejected.load(Ordering::Relaxed)).sum();
        let handled: u64 = stats.iter().map(|s| s.handled.load(Ordering::Relaxed)).sum();
        if rejected != 0 || (!stats.is_empty() && handled != n) {
            return Err(format!("expected {n} handled and none rejected, got {handled} and {rejected}").into());
        }
        Ok(())
    }

    /// p50 and p99 of publish call → handler entry, one envelope at a time on an idle stream.
    async fn latency(&self, gap_us: usize) -> Result<(Duration, Duration, f64)> {
        self.reset().await?;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let counter = Counter::new(u64::MAX, Some(tx));
        // Default timings: a 1 s block cut short by maintenance every 500 ms, as in production.
        let cfg = ConsumerConfig::new(self.stream.clone(), GROUP, "orch-latency");
        let pool = bus::pool(&self.url, 2, cfg.block).context("build the consumer's pool")?;
        let consumer = Consumer::new(cfg, pool, Arc::clone(&self.verifier), KillEpoch::new(0), counter)
            .context("build the consumer")?;
        let stats = consumer.stats();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(consumer.run(shutdown.clone()));
        tokio::time::sleep(CONSUMER_STARTUP).await;
        let publisher = self.publisher()?;
        let total = self.opts.warmup + self.opts.samples;
        let before = self.cpu_snapshot(false).await?;
        let start = Instant::now();
        let mut samples = Vec::with_capacity(self.opts.samples);
        let mut calls = Vec::with_capacity(self.opts.samples);
        for i in 0..total {
            let env = self.envelope();
            let t0 = Instant::now();
            publisher.publish(&self.stream, &env).await.context("publish")?;
            let returned = t0.elapsed();
            let at = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .context("see the handler run")?
                .ok_or("the consumer stopped")?;
            if i >= self.opts.warmup {
                samples.push(at.saturating_duration_since(t0));
                calls.push(returned);
            }
            // Idle again: acknowledged, and the consumer back in its blocking read.
            while stats.handled.load(Ordering::Relaxed) < i as u64 + 1 {
                tokio::task::yield_now().await;
            }
            if gap_us > 0 {
                tokio::time::sleep(Duration::from_micros(gap_us as u64)).await;
            }
        }
        let others = before.others_until(&self.cpu_snapshot(false).await?) / start.elapsed().as_secs_f64() * 100.0;
        shutdown.cancel();
        task.await.context("join the consumer")?;
        self.check_settled(total as u64, &[stats]).await?;
        samples.sort_unstable();
        calls.sort_unstable();
        println!(
            "    the publish call itself (seal + XADD round trip): p50 {} µs, p99 {} µs; other processes' CPU {others:.0}%",
            percentile(&calls, 50.0).as_micros(),
            percentile(&calls, 99.0).as_micros()
        );
        Ok((percentile(&samples, 50.0), percentile(&samples, 99.0), others))
    }
}

/// Builds the benchmark's envelope: a dev→orchestrator `task.result` with a 512-byte summary.
#[derive(Debug, Clone)]
struct BenchEnvelopes {
    sender: Sender,
    summary: String,
}

impl BenchEnvelopes {
    fn envelope(&self) -> Envelope {
        let payload = TaskResult {
            attempt: 1,
            status: Status::Success,
            summary: self.summary.clone(),
            findings: vec![],
            diff: None,
            log: None,
            change_sha256: None,
            calls: Vec::new(),
            containment: Vec::new(),
        };
        Envelope::new(self.sender.clone(), Role::Orchestrator, bus::now_ms(), 60_000, 0, payload.into())
    }
}

/// `bus::Consumer`'s read → dedup → handle → settle loop with the same Redis commands, minus
/// the frame, the HMAC and the verifier's checks: each entry's field is only decoded as an
/// envelope body. No maintenance (retries, reclaim), which the bus runs every 500 ms.
async fn unsigned_consumer(
    mut c: Conn,
    cfg: ConsumerConfig,
    guard: bool,
    handler: Counter,
    acked: Arc<AtomicU64>,
    shutdown: CancellationToken,
) -> Result<()> {
    let stream = cfg.stream.as_str();
    let skew = VerifierConfig::default().skew_ms;
    while !shutdown.is_cancelled() {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&cfg.group)
            .arg(&cfg.consumer)
            .arg("COUNT")
            .arg(cfg.batch)
            .arg("BLOCK")
            .arg(cfg.block.as_millis() as u64)
            .arg("STREAMS")
            .arg(stream)
            .arg(">");
        let reply = tokio::select! {
            r = cmd.query_async::<redis::Value>(&mut c) => r.context("XREADGROUP")?,
            () = shutdown.cancelled() => return Ok(()),
        };
        let entries = bus::reply::read_one_stream_owned(reply)?;
        if entries.is_empty() {
            continue;
        }
        let mut decoded = Vec::with_capacity(entries.len());
        for e in entries {
            let body = e.field(ENV_FIELD).ok_or("an entry has no `env` field")?;
            let env = Envelope::from_body_bytes(body).context("decode a body")?;
            let until = env.issued_at_ms + env.ttl_ms + skew;
            decoded.push((e, env, until));
        }
        if guard {
            let sightings: Vec<bus::guard::Sighting<'_>> = decoded
                .iter()
                .map(|(e, env, until)| bus::guard::Sighting { id: env.id, until_ms: *until, entry: &e.id })
                .collect();
            let previous = bus::guard::mark(&mut c, stream, &cfg.group, &sightings).await.context("mark seen")?;
            if previous.iter().any(Option::is_some) {
                return Err("the replay guard saw a duplicate".into());
            }
        }
        let mut pipe = redis::pipe();
        let mut acks = Vec::with_capacity(decoded.len());
        for (e, env, _) in &decoded {
            std::hint::black_box(env);
            handler.hit();
            acks.push(e.id.as_str());
        }
        pipe.cmd("XACK").arg(stream).arg(&cfg.group).arg(&acks).ignore();
        pipe.query_async::<()>(&mut c).await.context("settle")?;
        acked.fetch_add(decoded.len() as u64, Ordering::Relaxed);
    }
    Ok(())
}

/// How many times a row is measured at most while other processes are busy.
const NOISY_ATTEMPTS: usize = 5;

/// Waits (at most five minutes) until the whole machine has been below `limit`% of one core
/// busy for two seconds in a row; nothing of ours runs meanwhile.
async fn wait_for_quiet(limit: f64) {
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut quiet_seconds = 0;
    while quiet_seconds < 2 && Instant::now() < deadline {
        let Some(b0) = machine_busy_ticks() else { return };
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(b1) = machine_busy_ticks() else { return };
        quiet_seconds = if b1 - b0 <= limit { quiet_seconds + 1 } else { 0 };
    }
}

/// Clock ticks (hundredths of a second of one CPU) the whole machine spent running processes
/// since boot: user, nice, system and steal from the first line of /proc/stat. Interrupt
/// and softirq time are left out: loopback traffic puts much of that on no process, so it
/// would count this benchmark's own networking as other processes' work.
fn machine_busy_ticks() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu: Vec<f64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    let [user, nice, system, _idle, _iowait, _irq, _softirq, steal, ..] = cpu[..] else { return None };
    Some(user + nice + system + steal)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(mut xs: Vec<f64>) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    xs.sort_by(f64::total_cmp);
    let m = xs.len() / 2;
    Some(if xs.len() % 2 == 1 { xs[m] } else { (xs[m - 1] + xs[m]) / 2.0 })
}

fn report(runs: &[RunResult]) {
    let of =
        |row: &str| -> Vec<Measured> { runs.iter().flat_map(|r| r.iter().filter(|m| m.row == row)).copied().collect() };
    let med = |row: &str| median(of(row).iter().map(|m| m.value).collect());
    let list = |xs: Vec<String>| xs.join(", ");
    println!(
        "\nMedians of {} run(s). \"others\": the most CPU other processes used during one measurement of the row (% of one core); \"seal\": µs per seal measured just before each, a gauge of the CPU's speed at the time.",
        runs.len()
    );
    println!("| row | median | per run | Redis CPU µs/entry | others | seal |");
    println!("|---|---:|---|---|---:|---|");
    for (row, label) in ROWS {
        let each = of(row);
        if let Some(m) = med(row) {
            let others = each.iter().map(|m| m.others).fold(0.0, f64::max);
            println!(
                "| {label} | {m:.0} /s | {} | {} | {others:.0}% | {} |",
                list(each.iter().map(|m| format!("{:.0}", m.value)).collect()),
                list(each.iter().filter_map(|m| m.redis_us).map(|us| format!("{us:.1}")).collect()),
                list(each.iter().map(|m| format!("{:.1}", m.seal_us)).collect()),
            );
        }
    }
    for (row, label, _) in LATENCIES {
        let each = of(row);
        if let Some(p50) = med(row) {
            let p99 = median(each.iter().filter_map(|m| m.p99).collect()).unwrap_or(0.0);
            let others = each.iter().map(|m| m.others).fold(0.0, f64::max);
            println!(
                "| {label}, p50 / p99 | {p50:.0} / {p99:.0} µs | {} µs | {others:.0}% | {} |",
                list(each.iter().map(|m| format!("{:.0}/{:.0}", m.value, m.p99.unwrap_or(0.0))).collect()),
                list(each.iter().map(|m| format!("{:.1}", m.seal_us)).collect()),
            );
        }
    }
    // Ratios of the medians, and each run's own ratio (rows of one run ran minutes apart at most).
    // `unsigned-noguard` is the floor of the design: a consumer group's XADD, XREADGROUP and
    // XACK with no frame, HMAC, checks or replay guard.
    let rate = |m: &Measured| Some(m.value);
    let redis = |m: &Measured| m.redis_us;
    type Pick = fn(&Measured) -> Option<f64>;
    let ratios: [(&str, &str, &str, Pick, &str); 7] = [
        ("signed-batched", "raw", "rate", rate, "target ≥ 0.4× (issue 16)"),
        ("unsigned-noguard", "raw", "rate", rate, "floor"),
        ("signed-batched", "unsigned-batched", "rate", rate, "target ≥ 0.9×"),
        ("signed-unbatched", "unsigned-unbatched", "rate", rate, ""),
        ("signed-batched", "raw", "Redis CPU per entry", redis, "target ≤ 2.5× (issue 16)"),
        ("unsigned-batched", "raw", "Redis CPU per entry", redis, ""),
        ("unsigned-noguard", "raw", "Redis CPU per entry", redis, "floor"),
    ];
    for (num, den, what, pick, target) in ratios {
        let per_run: Vec<f64> = runs
            .iter()
            .filter_map(|r| {
                let a = pick(r.iter().find(|m| m.row == num)?)?;
                let b = pick(r.iter().find(|m| m.row == den)?)?;
                Some(a / b)
            })
            .collect();
        let medians =
            (median(of(num).iter().filter_map(pick).collect()), median(of(den).iter().filter_map(pick).collect()));
        let (Some(a), Some(b)) = medians else { continue };
        let each = list(per_run.iter().map(|x| format!("{x:.2}")).collect());
        println!("| {what}: {num} / {den} | {:.2}× | {each} | | {target} | |", a / b);
    }
}
