//! The fleet benchmark: N tasks through the whole fleet, every binary a separate OS process
//! (orchestrator, outbox-relay, budget, and 1, 2, 4, 8… workers of each role), on a private
//! Redis running the generated ACLs, a private Postgres and the Docker engine, with the
//! offline `scripted` model. It prints tasks per minute and each step's fleet overhead (the
//! time not spent in the model or the sandbox) at p50 and p99, for each number of workers,
//! without and with idle workers connected.
//!
//! ```sh
//! cargo build --release --workspace --bins
//! cargo run --release -p fleet-testkit --example fleet_bench -- --tasks 60 --workers 1,2,4,8 --idle 200
//! # smaller, while developing (a debug build: figures not to quote)
//! cargo build --workspace --bins
//! cargo run -p fleet-testkit --example fleet_bench -- --tasks 6 --workers 1,2 --idle 20
//! ```
//!
//! Options: `--tasks N` (default 40) measured tasks per run, submitted at once after
//! `--warmup N` (default 1) tasks have run through (each fresh fleet's first task pays for
//! cold caches); `--workers LIST` (default 1,2,4,8) workers per role, one fresh fleet each;
//! `--idle N` (default 200; 0 for none) idle workers, each worker count is run again with
//! them connected; `--perf` records the orchestrator with `perf record -g` during each
//! measured batch and prints the top of its report (data kept under `--out`, default
//! `target/fleet-bench`); `--timeout-secs N` (default 1800) per batch.
//!
//! # The tasks
//!
//! Each task goes through every role, as the demo's does: Dev (two model turns: it writes
//! `notes.txt` with a trailing space, then finishes; then the repository's build check, `true`,
//! in the sandbox) → QA (the test command `true` in the sandbox) → Review (the rules find
//! the trailing space, a style finding; the LLM reviewer approves in one turn) → Refactor
//! (the formatter `.agentfleet/format`, `true`, in the sandbox) → QA → Review → approved →
//! pushed to `agentfleet/task-<id>` of a local bare repository → merged. That is six worker
//! steps, four model calls and four sandbox runs a task. The model answers at once, and the
//! sandbox runs a command that does nothing, so what remains is the fleet's own work.
//!
//! # What is measured
//!
//! See `steps.rs`: each step's window from Postgres (`task_events`), the time in the
//! model and the sandbox from the processes' OpenTelemetry spans (every process exports
//! to an OTLP receiver in this program, as a traced production fleet would), and the rest
//! split into relay, pickup, tool proxy, worker and result. Tasks per minute is the measured
//! batch's task count over the time from its first submission to its last merge. The CPU
//! each process used during the batch comes from `/proc` (`cpu.rs`).
//!
//! # Idle workers
//!
//! See `idle.rs`: in this process, each with the worker's own heartbeat loop, kill-switch
//! listener, tool-response reader and a blocking consumer with the task consumer's
//! settings, on a stream that carries no work, each as its role's ACL user over its own
//! Redis pool.

#![forbid(unsafe_code)]

mod cpu;
mod idle;
mod steps;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use envelope::Role;
use fleet_testkit::fleet::{self, Fleet, FleetBuilder};
use fleet_testkit::otlp::OtlpReceiver;
use sqlx::PgPool;
use uuid::Uuid;

/// The scripted model's answers (see the module doc, "The tasks").
const FIXTURE: &str = r#"
[[response]]
role = "dev"
match = "FLEET-BENCH"
turn = 1
tool_calls = [{ name = "write_file", arguments = { path = "notes.txt", content = "benchmarked \n" } }]
input_tokens = 300
output_tokens = 20
model = "scripted-1"

[[response]]
role = "dev"
match = "FLEET-BENCH"
turn = 2
tool_calls = [{ name = "finish", arguments = { summary = "notes.txt written" } }]
input_tokens = 340
output_tokens = 10
model = "scripted-1"

[[response]]
role = "review"
tool_calls = [{ name = "finish", arguments = { verdict = "approve", reasons = ["the change is what the task asks"] } }]
input_tokens = 400
output_tokens = 12
model = "scripted-1"

[[response]]
role = "refactor"
text = "NO CHANGES"
input_tokens = 100
output_tokens = 3
model = "scripted-1"
"#;

/// The repository every task works on: the build check and the formatter do nothing.
const REPOSITORY: [(&str, &str); 4] = [
    ("README.md", "The fleet benchmark's repository.\n"),
    ("notes.txt", "notes\n"),
    (".agentfleet/build", "true\n"),
    (".agentfleet/format", "true\n"),
];

/// How long no task may change state before the run is declared stuck (a step's
/// worst case here is a few sandbox runs and a takeover).
const STALL: Duration = Duration::from_secs(180);

/// The states a task ends in.
const TERMINAL: [&str; 4] = ["merged", "failed", "blocked", "cancelled"];

#[derive(Debug, Clone)]
struct Options {
    tasks: usize,
    warmup: usize,
    workers: Vec<usize>,
    idle: usize,
    perf: bool,
    out: PathBuf,
    timeout: Duration,
}

const USAGE: &str = "usage: fleet_bench [--tasks N] [--warmup N] [--workers 1,2,4,8] [--idle N] [--perf] \
                     [--out DIR] [--timeout-secs N]";

fn options() -> anyhow::Result<Options> {
    let mut o = Options {
        tasks: 40,
        warmup: 1,
        workers: vec![1, 2, 4, 8],
        idle: 200,
        perf: false,
        out: fleet::repo_root().join("target/fleet-bench"),
        timeout: Duration::from_secs(1800),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value; {USAGE}"));
        let number = |v: String| v.parse::<usize>().with_context(|| format!("{v:?} is not a number; {USAGE}"));
        match arg.as_str() {
            "--tasks" => o.tasks = number(value()?)?,
            "--warmup" => o.warmup = number(value()?)?,
            "--idle" => o.idle = number(value()?)?,
            "--timeout-secs" => o.timeout = Duration::from_secs(number(value()?)? as u64),
            "--out" => o.out = PathBuf::from(value()?),
            "--perf" => o.perf = true,
            "--workers" => {
                o.workers = value()?.split(',').map(|w| number(w.trim().to_owned())).collect::<Result<_, _>>()?;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}; {USAGE}"),
        }
    }
    if o.tasks == 0 || o.workers.is_empty() || o.workers.contains(&0) {
        bail!("--tasks and every --workers count must be at least 1; {USAGE}");
    }
    Ok(o)
}

/// What one run found.
struct Outcome {
    workers: usize,
    idle: usize,
    tasks: usize,
    elapsed: Duration,
    steps: Vec<steps::Step>,
}

impl Outcome {
    fn per_minute(&self) -> f64 {
        self.tasks as f64 * 60.0 / self.elapsed.as_secs_f64()
    }

    fn worker_steps(&self) -> impl Iterator<Item = &steps::Step> {
        self.steps.iter().filter(|s| steps::WORKER_STATES.contains(&s.state.as_str()))
    }

    fn worker_overheads(&self) -> Vec<f64> {
        self.worker_steps().map(|s| s.overhead).collect()
    }
}

fn pct(values: &[f64], p: f64) -> String {
    steps::percentile(values, p).map_or_else(|| "-".into(), |v| format!("{v:.0}"))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    // Interrupted, the run's future is dropped, and with it the fleet: its processes are
    // killed, its sandboxes and directory removed (an abrupt exit would leave them). The
    // handlers are installed first: the fleet's start blocks its thread for seconds, and a
    // signal then is acted on at the run's next await.
    use tokio::signal::unix::{SignalKind, signal};
    let (mut int, mut term) = match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(i), Ok(t)) => (i, t),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("fleet_bench: cannot install the SIGINT/SIGTERM handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let interrupted = async {
        tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        }
    };
    let result = tokio::select! {
        biased;
        signal = interrupted => Err(anyhow::anyhow!("stopped by {signal}; the fleet was shut down")),
        r = run_all() => r,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleet_bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_all() -> anyhow::Result<()> {
    let o = options()?;
    std::fs::create_dir_all(&o.out).with_context(|| format!("Failed to create {}", o.out.display()))?;
    let target = fleet::target_dir()?;
    let profile = target.file_name().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
    println!(
        "fleet_bench: {} measured task(s) per run after {} warm-up task(s); workers per role {:?}; idle workers {}",
        o.tasks, o.warmup, o.workers, o.idle
    );
    println!(
        "build: the fleet's binaries from {} ({profile} profile){}; {} CPU(s); times in ms unless marked",
        target.display(),
        if profile == "release" { "" } else { " — NOT a release build: figures are not to be quoted" },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let mut results = Vec::new();
    for &w in &o.workers {
        let idles = if o.idle > 0 { vec![0, o.idle] } else { vec![0] };
        for idle in idles {
            let outcome = run_one(&o, w, idle)
                .await
                .with_context(|| format!("the run with {w} worker(s) per role and {idle} idle"))?;
            results.push(outcome);
        }
    }
    summary(&results);
    Ok(())
}

/// One fresh fleet with `workers` per role and `idle` idle workers: warm-up, the measured
/// batch, its analysis.
async fn run_one(o: &Options, workers: usize, idle: usize) -> anyhow::Result<Outcome> {
    println!("\n== {workers} worker(s) per role, {idle} idle worker(s)");
    let otlp = OtlpReceiver::start().await.context("Failed to start the OTLP receiver")?;
    let builder = FleetBuilder::new(FIXTURE)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.endpoint())
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        .env("OTEL_BSP_SCHEDULE_DELAY", "200")
        .env("OTEL_BSP_MAX_QUEUE_SIZE", "65536")
        // The intake limiter guards the budget from outsiders; here it would only pace the
        // submissions.
        .orchestrator_settings("rate_limit_burst = 100000\nrate_limit_per_second = 10000.0\n");
    let mut f = tokio::task::block_in_place(|| builder.start()).context("Failed to start the fleet")?;
    let repo = fleet::bare_repository(f.dir(), "bench", &REPOSITORY)?;
    for role in fleet::ROLES {
        for n in 1..=workers {
            tokio::task::block_in_place(|| f.add_worker(role, &format!("{role}-{n}")))?;
        }
    }
    let pool = PgPool::connect(f.database_url()).await.context("Failed to connect to the fleet's Postgres")?;
    let http = reqwest::Client::new();
    let swarm = if idle > 0 {
        let access: Vec<idle::RoleAccess> = [Role::Dev, Role::Qa, Role::Review, Role::Refactor]
            .into_iter()
            .map(|role| {
                Ok(idle::RoleAccess {
                    role,
                    redis_url: f.redis_url(role.as_str())?,
                    keyset: f.keyset_path(role.as_str()),
                    permissions: f.permissions_path(),
                })
            })
            .collect::<Result<_, fleet::FleetError>>()?;
        let swarm = idle::Swarm::start(idle, &access).await?;
        // A full heartbeat period, so every idle worker is beating before the batch.
        tokio::time::sleep(idle::HEARTBEAT_EVERY + Duration::from_secs(1)).await;
        Some(swarm)
    } else {
        None
    };

    if o.warmup > 0 {
        let warm = submit(&f, &http, &repo, o.warmup, "warm-up").await?;
        wait(&mut f, &pool, &warm, o.timeout).await?;
    }
    let perf = if o.perf {
        let pid = f.pid("orchestrator").context("the orchestrator's pid")?;
        let data = o.out.join(format!("orchestrator-w{workers}-i{idle}.perf.data"));
        Some((cpu::Perf::start(pid, &data)?, data))
    } else {
        None
    };
    let cpu_before = cpu::snapshot();
    let started = Instant::now();
    let ids = submit(&f, &http, &repo, o.tasks, "measured").await?;
    wait(&mut f, &pool, &ids, o.timeout).await?;
    let wall = started.elapsed();
    let cpu_used = cpu::used(&cpu_before, &cpu::snapshot());
    let profile = match perf {
        Some((p, data)) => Some((p.finish(25)?, data)),
        None => None,
    };
    if let Some(swarm) = swarm {
        let handled = swarm.stop().await;
        if handled > 0 {
            println!("warning: the idle workers' consumers handled {handled} entries: they were not idle");
        }
    }

    let (tasks, events, elapsed) = history(&pool, &ids).await?;
    let spans = settled_spans(&otlp, &tasks).await;
    let (all, missing) = steps::steps(&tasks, &events, &spans);
    let outcome = Outcome { workers, idle, tasks: ids.len(), elapsed, steps: all };
    report(&outcome, missing, wall, &cpu_used);
    if let Some((text, data)) = profile {
        println!("perf: the orchestrator during the batch (data in {}):", data.display());
        println!("{text}");
    }
    Ok(outcome)
}

/// Submits `n` tasks over the HTTP API, as fast as it answers.
async fn submit(f: &Fleet, http: &reqwest::Client, repo: &str, n: usize, what: &str) -> anyhow::Result<Vec<Uuid>> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let answer = http
            .post(format!("{}/v1/tasks", f.api()))
            .bearer_auth(f.token())
            .json(&serde_json::json!({
                "title": format!("Fleet benchmark, {what} task {i}"),
                "instructions": "FLEET-BENCH: write notes.txt.",
                "repository": repo,
                "test_command": "true",
                "scope": ["notes.txt"],
            }))
            .send()
            .await
            .context("Failed to POST /v1/tasks")?;
        let status = answer.status();
        let body = answer.text().await.unwrap_or_default();
        if status != reqwest::StatusCode::CREATED {
            bail!("POST /v1/tasks answered {status}: {body}\n{}", f.log_tails());
        }
        let v: serde_json::Value = serde_json::from_str(&body).context("the task's JSON")?;
        ids.push(v["id"].as_str().context("no id in the answer")?.parse().context("the task id")?);
    }
    Ok(ids)
}

/// Waits until every task of `ids` has ended; fails (with the logs) unless all merged.
async fn wait(f: &mut Fleet, pool: &PgPool, ids: &[Uuid], timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    // A fleet that stops moving fails the run long before the timeout.
    let (mut moved, mut events) = (Instant::now(), 0i64);
    loop {
        let now_events: i64 = sqlx::query_scalar("SELECT count(*) FROM task_events WHERE task_id = ANY($1)")
            .bind(ids)
            .fetch_one(pool)
            .await
            .context("Failed to count the task events")?;
        if now_events != events {
            (moved, events) = (Instant::now(), now_events);
        }
        if moved.elapsed() > STALL {
            bail!("no task changed state for {STALL:?}: the fleet is stuck\n{}", f.log_tails());
        }
        let states: Vec<(Uuid, String)> = sqlx::query_as("SELECT id, state FROM tasks WHERE id = ANY($1)")
            .bind(ids)
            .fetch_all(pool)
            .await
            .context("Failed to read the tasks' states")?;
        let ended: Vec<&(Uuid, String)> = states.iter().filter(|(_, s)| TERMINAL.contains(&s.as_str())).collect();
        if ended.len() == ids.len() {
            if let Some((id, state)) = ended.iter().find(|(_, s)| s != "merged") {
                bail!("task {id} ended {state}, not merged: the fleet is not healthy\n{}", f.log_tails());
            }
            return Ok(());
        }
        if let Some(exit) = f.exited() {
            bail!("{exit}\n{}", f.log_tails());
        }
        if Instant::now() >= deadline {
            let mut counts: HashMap<&str, usize> = HashMap::new();
            for (_, s) in &states {
                *counts.entry(s.as_str()).or_default() += 1;
            }
            bail!("tasks not done after {timeout:?}: {counts:?}\n{}", f.log_tails());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

type History = (Vec<(Uuid, String)>, HashMap<Uuid, Vec<steps::Transition>>, Duration);

/// Each task's trace id and transitions, and the batch's first submission to last merge.
async fn history(pool: &PgPool, ids: &[Uuid]) -> anyhow::Result<History> {
    let rows: Vec<(Uuid, Option<String>)> = sqlx::query_as("SELECT id, traceparent FROM tasks WHERE id = ANY($1)")
        .bind(ids)
        .fetch_all(pool)
        .await
        .context("Failed to read the tasks")?;
    let mut tasks = Vec::new();
    for (id, tp) in rows {
        // `00-<trace id>-<span id>-<flags>`
        let trace = tp.as_deref().and_then(|t| t.split('-').nth(1)).map(str::to_owned);
        let trace =
            trace.with_context(|| format!("task {id} has no traceparent: is tracing on in the orchestrator?"))?;
        tasks.push((id, trace));
    }
    let rows: Vec<(Uuid, i64, String)> = sqlx::query_as(
        "SELECT task_id, (extract(epoch FROM at) * 1000000)::bigint, to_state FROM task_events \
         WHERE task_id = ANY($1) ORDER BY task_id, seq",
    )
    .bind(ids)
    .fetch_all(pool)
    .await
    .context("Failed to read the task events")?;
    let mut events: HashMap<Uuid, Vec<steps::Transition>> = HashMap::new();
    for (id, at_us, to) in rows {
        events.entry(id).or_default().push(steps::Transition { at_us, to });
    }
    let first = events.values().filter_map(|e| e.first()).map(|t| t.at_us).min().unwrap_or(0);
    let last = events.values().filter_map(|e| e.last()).map(|t| t.at_us).max().unwrap_or(0);
    let elapsed = Duration::from_micros(u64::try_from(last - first).unwrap_or(0).max(1));
    Ok((tasks, events, elapsed))
}

/// The spans, once every task's push span is in and nothing new arrived for a second
/// (processes export every 200 ms), or after 30 s.
async fn settled_spans(otlp: &OtlpReceiver, tasks: &[(Uuid, String)]) -> Vec<fleet_testkit::otlp::CollectedSpan> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = usize::MAX;
    loop {
        let spans = otlp.spans();
        let pushed = tasks.iter().all(|(_, t)| spans.iter().any(|s| &s.trace_id == t && s.name == "git.push_branch"));
        if (pushed && spans.len() == last) || Instant::now() >= deadline {
            return spans;
        }
        last = spans.len();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Reads one part of a step's overhead.
type PartOf = fn(&steps::Parts) -> Option<f64>;

fn report(o: &Outcome, missing: usize, wall: Duration, cpu_used: &[(String, f64)]) {
    println!(
        "{} tasks merged, first submission to last merge {:.1} s: {:.1} tasks/min (wall clock of the batch {:.1} s)",
        o.tasks,
        o.elapsed.as_secs_f64(),
        o.per_minute(),
        wall.as_secs_f64()
    );
    if missing > 0 {
        println!("warning: {missing} worker step(s) had no worker.step span (not exported?) and are left out");
    }
    println!(
        "{:<10} {:>4} {:>9} {:>9} {:>10} {:>10} {:>9} {:>9} {:>9}",
        "step", "n", "window50", "window99", "overhead50", "overhead99", "queued50", "model50", "sandbox50"
    );
    let mut rows: Vec<&str> = steps::WORKER_STATES.to_vec();
    rows.extend(["all", "submitted", "approved"]);
    for state in rows {
        let chosen: Vec<&steps::Step> = if state == "all" {
            o.worker_steps().collect()
        } else {
            o.steps.iter().filter(|s| s.state == state).collect()
        };
        if chosen.is_empty() {
            continue;
        }
        let col = |f: fn(&steps::Step) -> f64| chosen.iter().map(|s| f(s)).collect::<Vec<f64>>();
        let (window, overhead) = (col(|s| s.window), col(|s| s.overhead));
        println!(
            "{:<10} {:>4} {:>9} {:>9} {:>10} {:>10} {:>9} {:>9} {:>9}",
            match state {
                "all" => "ALL WORKER",
                "submitted" => "intake",
                "approved" => "push",
                s => s,
            },
            chosen.len(),
            pct(&window, 50.0),
            pct(&window, 99.0),
            pct(&overhead, 50.0),
            pct(&overhead, 99.0),
            pct(&col(|s| s.queued), 50.0),
            pct(&col(|s| s.model), 50.0),
            pct(&col(|s| s.sandbox), 50.0),
        );
    }
    println!(
        "(intake: submitted → dev, the orchestrator alone; push: approved → merged, its git push; both all overhead)"
    );
    println!("worker steps' overhead by part, p50 / p99 / share of the summed overhead:");
    let parts: [(&str, PartOf); 5] = [
        ("relay: transition → assignment in Redis", |p| p.relay),
        ("pickup: in Redis → worker starts the step", |p| p.pickup),
        ("tool proxy round trips, minus the model", |p| p.proxy),
        ("worker's own work (checkout, diffs, checks)", |p| p.worker),
        ("result: worker done → orchestrator applies", |p| p.result),
    ];
    let total: f64 = o.worker_steps().map(|s| s.overhead).sum();
    for (name, get) in parts {
        let v: Vec<f64> = o.worker_steps().filter_map(|s| get(&s.parts)).collect();
        let share = if total > 0.0 { v.iter().sum::<f64>() / total * 100.0 } else { 0.0 };
        println!("  {name:<46} {:>7} / {:>7} / {share:>4.0}%", pct(&v, 50.0), pct(&v, 99.0));
    }
    let total_cpu: f64 = cpu_used.iter().map(|(_, s)| s).sum();
    println!(
        "CPU during the batch: {total_cpu:.1} s over {:.1} s of wall clock; by process (CPU ms per task):",
        wall.as_secs_f64()
    );
    let line: Vec<String> =
        cpu_used.iter().take(14).map(|(name, secs)| format!("{name} {:.0}", secs * 1000.0 / o.tasks as f64)).collect();
    println!("  {}", line.join(", "));
}

fn summary(results: &[Outcome]) {
    println!(
        "\n== Summary (overhead: each worker step's time not in the model, the sandbox or the queue for a free worker)"
    );
    println!(
        "{:>12} {:>5} {:>6} {:>10} {:>11} {:>11} {:>10} {:>10}",
        "workers/role", "idle", "tasks", "tasks/min", "vs 1 worker", "overhead50", "overhead99", "queued50"
    );
    let base = |idle: usize| results.iter().find(|r| r.idle == idle).map(Outcome::per_minute);
    for r in results {
        let ratio = base(r.idle).map_or_else(|| "-".into(), |b| format!("{:.2}x", r.per_minute() / b));
        let over = r.worker_overheads();
        let queued: Vec<f64> = r.worker_steps().map(|s| s.queued).collect();
        println!(
            "{:>12} {:>5} {:>6} {:>10.1} {:>11} {:>11} {:>10} {:>10}",
            r.workers,
            r.idle,
            r.tasks,
            r.per_minute(),
            ratio,
            pct(&over, 50.0),
            pct(&over, 99.0),
            pct(&queued, 50.0)
        );
    }
    for r in results.iter().filter(|r| r.idle > 0) {
        if let Some(b) = results.iter().find(|b| b.workers == r.workers && b.idle == 0) {
            let (with, without) = (r.worker_overheads(), b.worker_overheads());
            if let (Some(a50), Some(b50), Some(a99), Some(b99)) = (
                steps::percentile(&with, 50.0),
                steps::percentile(&without, 50.0),
                steps::percentile(&with, 99.0),
                steps::percentile(&without, 99.0),
            ) {
                println!(
                    "{} idle worker(s) at {} per role: overhead p50 {:.2}x, p99 {:.2}x, tasks/min {:.2}x of the run without",
                    r.idle,
                    r.workers,
                    a50 / b50,
                    a99 / b99,
                    r.per_minute() / b.per_minute()
                );
            }
        }
    }
}
