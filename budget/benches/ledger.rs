//! Reservations per second through the budget ledger with 50 concurrent callers against one
//! local `redis-server`, next to `redis-benchmark`'s rates for plain `INCR` and for
//! `EVALSHA` of a script that only returns, on the same server. Results: `docs/benchmarks.md`.
//!
//! Run with `cargo bench -p budget --bench ledger` (release profile with thin LTO). Options
//! go after `--`; `--help` lists them. Without `--bench` (as under `cargo test --benches`)
//! it does a quick smoke run.
//!
//! Rows, each from an empty server (`FLUSHALL`) in every run:
//! - `INCR`: `redis-benchmark -c 50 -P 1 -n N -q --csv INCR bench:incr`.
//! - `EVALSHA trivial`: `redis-benchmark -c 50 -P 1 -n N -q --csv EVALSHA <sha of "return 1"> 0`.
//! - `reserve + commit`: 50 tasks, each its own task id and one pooled connection, loop
//!   `reserve` → `commit` of the full estimate (300 tokens) until together they made N
//!   reservations. The daily token limit is exactly N × 300, so the run ends with the day
//!   spent to the token: the bench then checks that exactly N × 300 tokens are committed,
//!   nothing is held, and one more reservation is refused ("zero overspend").
//! - `reserve only`: the same callers only reserve (as if every caller crashed after its
//!   reservation): the reserve script alone, with held amounts piling up.
//! - Both on a `deadpool_redis` pool (one connection per caller, like `redis-benchmark -c 50`)
//!   and on one shared multiplexed connection (`Ledger::with_shared_connection`), whose
//!   requests reach Redis together.
//!
//! Per row it also prints Redis's server-side µs per reservation (`INFO commandstats`,
//! all `EVALSHA`s of the row divided by its reservations) and the CPU used by redis-server
//! and by this process, in % of one core: on a 2-core machine they compete.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt::Display;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use budget::ledger::{Ledger, LedgerConfig, MicroUsd, Price, Refusal, ReserveError, RoleLimits, SystemClock};
use bus::Conn;
use envelope::Role;
use fleet_testkit::RedisServer;
use secrecy::{ExposeSecret, SecretString};
use uuid::Uuid;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Result<T, E = BoxError> = std::result::Result<T, E>;

const MODEL: &str = "bench-model";
/// Every reservation: 100 tokens in, at most 200 out.
const INPUT: u64 = 100;
const OUTPUT: u64 = 200;
/// Longest a row may take before the run is declared stuck.
const ROW_TIMEOUT: Duration = Duration::from_secs(300);

trait Context<T> {
    fn context(self, what: &str) -> Result<T>;
}

impl<T, E: Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: &str) -> Result<T> {
        self.map_err(|e| format!("Failed to {what}: {e}").into())
    }
}

const USAGE: &str = "\
Options (after `cargo bench -p budget --bench ledger --`):
  --runs R       repetitions; medians are reported (3)
  --n N          reservations per ledger row (100000)
  --raw-n N      redis-benchmark -n (200000)
  --callers C    concurrent callers (and redis-benchmark -c) (50)";

#[derive(Debug, Clone)]
struct Options {
    runs: usize,
    n: usize,
    raw_n: usize,
    callers: usize,
}

impl Options {
    fn parse(args: impl Iterator<Item = String>) -> Result<Self, String> {
        let mut o = Options { runs: 3, n: 100_000, raw_n: 200_000, callers: 50 };
        let mut bench = false;
        let mut args = args.peekable();
        while let Some(arg) = args.next() {
            let mut value = |name: &str| -> Result<usize, String> {
                let v = args.next().ok_or(format!("{name} needs a value\n{USAGE}"))?;
                v.parse::<usize>().ok().filter(|n| *n > 0).ok_or(format!("{name}: `{v}` is not a positive integer"))
            };
            match arg.as_str() {
                "--bench" => bench = true,
                "--runs" => o.runs = value("--runs")?,
                "--n" => o.n = value("--n")?,
                "--raw-n" => o.raw_n = value("--raw-n")?,
                "--callers" => o.callers = value("--callers")?,
                "--help" | "-h" => return Err(USAGE.to_owned()),
                other => return Err(format!("unknown option `{other}`\n{USAGE}")),
            }
        }
        if !bench {
            // `cargo test --benches`: prove it works, quickly.
            o.runs = 1;
            o.n = o.n.min(2_000);
            o.raw_n = o.raw_n.min(2_000);
        }
        Ok(o)
    }
}

fn main() -> ExitCode {
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

/// One measurement of one row.
#[derive(Debug, Clone, Copy)]
struct Measured {
    /// Operations (reservations, or commands for the redis-benchmark rows) per second.
    rate: f64,
    /// Redis's µs per operation (commandstats); 0 for redis-benchmark rows.
    server_us: f64,
    /// redis-server's CPU, % of one core.
    redis_cpu: f64,
    /// This process's CPU (redis-benchmark's, for its rows), % of one core.
    own_cpu: f64,
}

const ROWS: [&str; 6] = [
    "INCR (redis-benchmark)",
    "EVALSHA trivial (redis-benchmark)",
    "reserve + commit, pool",
    "reserve only, pool",
    "reserve + commit, shared connection",
    "reserve only, shared connection",
];

struct Bench {
    server: RedisServer,
    url: SecretString,
    admin: Conn,
    opts: Options,
}

async fn run(opts: Options) -> Result<()> {
    let server = RedisServer::start().context("start redis-server (apt-get install redis-server)")?;
    let url = SecretString::from(server.url());
    let client = redis::Client::open(server.url()).context("open a Redis client")?;
    let admin = client.get_multiplexed_async_connection().await.context("connect to Redis")?;
    let bench = Bench { server, url, admin: bus::Conn::Single(admin), opts: opts.clone() };
    println!(
        "budget ledger: {} callers, {} reservations per ledger row, redis-benchmark -n {}, {} run(s)",
        opts.callers, opts.n, opts.raw_n, opts.runs
    );
    let mut runs: Vec<[Measured; 6]> = Vec::new();
    for run in 1..=opts.runs {
        let incr = bench.redis_benchmark(&["INCR", "bench:incr"]).await?;
        let sha: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg("return 1")
            .query_async(&mut bench.admin.clone())
            .await
            .context("SCRIPT LOAD")?;
        let eval = bench.redis_benchmark(&["EVALSHA", &sha, "0"]).await?;
        let row = [
            incr,
            eval,
            bench.ledger_row(true, false).await?,
            bench.ledger_row(false, false).await?,
            bench.ledger_row(true, true).await?,
            bench.ledger_row(false, true).await?,
        ];
        for (name, m) in ROWS.iter().zip(&row) {
            println!(
                "run {run}: {name:<36} {:>9.0}/s  server {:>5.1} µs/op  redis CPU {:>3.0}%  client CPU {:>3.0}%",
                m.rate, m.server_us, m.redis_cpu, m.own_cpu
            );
        }
        runs.push(row);
    }
    println!("\nmedians of {} run(s):", runs.len());
    println!("| row | ops/s | server µs/op | redis CPU | client CPU |");
    println!("|---|---:|---:|---:|---:|");
    for (i, name) in ROWS.iter().enumerate() {
        let med = |f: fn(&Measured) -> f64| median(runs.iter().map(|r| f(&r[i])).collect());
        println!(
            "| {name} | {:.0} | {:.1} | {:.0}% | {:.0}% |",
            med(|m| m.rate),
            med(|m| m.server_us),
            med(|m| m.redis_cpu),
            med(|m| m.own_cpu)
        );
    }
    let rate = |i: usize| median(runs.iter().map(|r| r[i].rate).collect());
    for (i, name) in ROWS.iter().enumerate().skip(2) {
        println!("{name}: {:.2}× the trivial EVALSHA rate", rate(i) / rate(1));
    }
    Ok(())
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let m = xs.len() / 2;
    if xs.is_empty() {
        0.0
    } else if xs.len() % 2 == 1 {
        xs[m]
    } else {
        (xs[m - 1] + xs[m]) / 2.0
    }
}

/// CPU seconds so far: redis-server's (from `INFO cpu`) and this process's with its
/// waited-for children (from `/proc/self/stat`).
#[derive(Debug, Clone, Copy)]
struct Cpu {
    redis: f64,
    own: f64,
}

impl Bench {
    async fn reset(&self) -> Result<()> {
        let mut c = self.admin.clone();
        let () = redis::cmd("FLUSHALL").query_async(&mut c).await.context("FLUSHALL")?;
        let () = redis::cmd("CONFIG").arg("RESETSTAT").query_async(&mut c).await.context("CONFIG RESETSTAT")?;
        Ok(())
    }

    async fn cpu(&self) -> Result<Cpu> {
        let info: String =
            redis::cmd("INFO").arg("cpu").query_async(&mut self.admin.clone()).await.context("INFO cpu")?;
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(':'))?.trim().parse::<f64>().ok())
        };
        let redis = field("used_cpu_sys").unwrap_or(0.0) + field("used_cpu_user").unwrap_or(0.0);
        // Fields 14–17 (utime, stime, cutime, cstime) in clock ticks of 1/100 s, counted
        // after the parenthesised command name.
        let stat = std::fs::read_to_string("/proc/self/stat").context("read /proc/self/stat")?;
        let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
        let ticks: f64 = after_name.split_whitespace().skip(11).take(4).filter_map(|v| v.parse::<f64>().ok()).sum();
        Ok(Cpu { redis, own: ticks / 100.0 })
    }

    /// Redis's total µs in `EVALSHA` since the last reset.
    async fn evalsha_usec(&self) -> Result<f64> {
        let stats: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut self.admin.clone())
            .await
            .context("INFO commandstats")?;
        Ok(stats
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_evalsha:"))
            .and_then(|rest| rest.split(',').find_map(|kv| kv.strip_prefix("usec=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0))
    }

    async fn redis_benchmark(&self, command: &[&str]) -> Result<Measured> {
        self.reset().await?;
        let before = self.cpu().await?;
        let start = Instant::now();
        let out = tokio::process::Command::new("redis-benchmark")
            .args(["-h", "127.0.0.1", "-p", &self.server.port().to_string()])
            .args(["-c", &self.opts.callers.to_string(), "-P", "1", "-n", &self.opts.raw_n.to_string(), "-q", "--csv"])
            .args(command)
            .output()
            .await
            .context("run redis-benchmark (apt-get install redis-tools)")?;
        let elapsed = start.elapsed().as_secs_f64();
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(
                format!("redis-benchmark failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr)).into()
            );
        }
        // CSV: a header, then `"INCR bench:incr","167504.19",…`.
        let rps = stdout
            .lines()
            .find(|l| l.starts_with(&format!("\"{}", command[0])))
            .and_then(|l| l.split("\",\"").nth(1))
            .and_then(|v| v.trim_matches('"').parse::<f64>().ok())
            .ok_or_else(|| format!("cannot find requests per second in redis-benchmark's output: {stdout}"))?;
        let after = self.cpu().await?;
        Ok(Measured {
            rate: rps,
            server_us: 0.0,
            redis_cpu: (after.redis - before.redis) / elapsed * 100.0,
            own_cpu: (after.own - before.own) / elapsed * 100.0,
        })
    }

    /// `n` reservations by `callers` concurrent tasks, each followed by a commit when
    /// `commit`; then the zero-overspend check.
    async fn ledger_row(&self, commit: bool, shared: bool) -> Result<Measured> {
        self.reset().await?;
        let n = self.opts.n as u64;
        let per_call = INPUT + OUTPUT;
        let config = LedgerConfig {
            daily_tokens: n * per_call,
            daily_micro_usd: MicroUsd::from_dollars(1_000_000),
            per_task_tokens: n * per_call,
            per_task_micro_usd: MicroUsd::from_dollars(1_000_000),
            // A soft limit nobody reaches: the reserve script does its whole job.
            per_role: BTreeMap::from([(
                Role::Dev,
                RoleLimits { soft_tokens: Some(n * per_call), soft_micro_usd: None, cheaper_model: None },
            )]),
            prices: BTreeMap::from([(
                MODEL.to_owned(),
                Price { input_micro_usd_per_mtok: 3_000_000, output_micro_usd_per_mtok: 15_000_000 },
            )]),
            ..LedgerConfig::default()
        };
        let callers = self.opts.callers;
        let ledger = if shared {
            let client = redis::Client::open(self.url.expose_secret()).context("open a Redis client")?;
            let conn = client.get_connection_manager().await.context("connect")?;
            Ledger::with_shared_connection(conn, config, Arc::new(SystemClock)).context("build the ledger")?
        } else {
            let pool = bus::pool(&self.url, callers + 2, Duration::from_secs(1)).context("build the pool")?;
            Ledger::new(pool, config).context("build the ledger")?
        };
        // Load the scripts and open the connections before the clock starts.
        let warm = ledger.reserve(Uuid::now_v7(), Role::Dev, MODEL, 0, 0).await.context("warm up")?;
        ledger.commit(&warm, 0, 0).await.context("warm up")?;

        let left = Arc::new(AtomicU64::new(n));
        let before = self.cpu().await?;
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..callers {
            let (ledger, left) = (ledger.clone(), left.clone());
            tasks.push(tokio::spawn(async move {
                let task = Uuid::now_v7();
                while left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| l.checked_sub(1)).is_ok() {
                    let r = ledger.reserve(task, Role::Dev, MODEL, INPUT, OUTPUT).await.map_err(|e| e.to_string())?;
                    if commit {
                        ledger.commit(&r, INPUT, OUTPUT).await.map_err(|e| e.to_string())?;
                    }
                }
                Ok::<(), String>(())
            }));
        }
        for t in tasks {
            tokio::time::timeout(ROW_TIMEOUT, t).await.context("finish the row in time")?.context("join")??;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let after = self.cpu().await?;
        let usec = self.evalsha_usec().await?;

        // Zero overspend: the day is spent to the token and not one more.
        let day = ledger.usage(ledger.today()).await.context("read usage")?;
        let (committed, held) = if commit { (n * per_call, 0) } else { (0, n * per_call) };
        if day.usage.tokens != committed
            || day.usage.held_tokens != held
            || day.usage.calls != if commit { n + 1 } else { 1 }
        {
            return Err(format!("expected {committed} committed and {held} held tokens, got {:?}", day.usage).into());
        }
        match ledger.reserve(Uuid::now_v7(), Role::Dev, MODEL, 1, 0).await {
            Err(ReserveError::Refused(Refusal::DailyLimit { .. })) => {}
            other => return Err(format!("the reservation past the limit was not refused: {other:?}").into()),
        }
        Ok(Measured {
            rate: n as f64 / elapsed,
            // Both scripts of a reservation, plus the warm-up's two (negligible).
            server_us: usec / n as f64,
            redis_cpu: (after.redis - before.redis) / elapsed * 100.0,
            own_cpu: (after.own - before.own) / elapsed * 100.0,
        })
    }
}
