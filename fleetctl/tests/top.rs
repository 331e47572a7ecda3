//! `fleetctl top` against a real redis-server and the real API: one refresh is read the way
//! the live view reads it, rendered into ratatui's test backend, and the figures on screen
//! are checked against the state the test put into the fleet.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use budget::ledger::{Ledger, LedgerConfig, SystemClock};
use envelope::*;
use fleetctl::client::{ApiArgs, Client};
use fleetctl::status::Source;
use fleetctl::top::{self, Tasks};
use orchestrator::api::{self, ApiConfig, ApiState};
use orchestrator::audit::AuditKey;
use orchestrator::tasks::{Actor, Engine, EngineConfig, NewTask};
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use secrecy::SecretString;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const PERMISSIONS: &str = include_str!("../../config/permissions.toml");
const SECRET: &str = "5f1c0e9a7b3d2f4e6a8c0b1d3f5e7a9c5f1c0e9a7b3d2f4e6a8c0b1d3f5e7a9c";

fn master() -> MasterFile {
    MasterFile::new(MasterSecret::from_bytes([6; 32]))
}

fn permissions() -> PermissionTable {
    PermissionTable::parse(PERMISSIONS).unwrap()
}

fn screen(s: &top::Snapshot) -> String {
    let mut terminal = Terminal::new(TestBackend::new(180, 44)).unwrap();
    terminal.draw(|f| top::draw(f, s)).unwrap();
    let buffer = terminal.backend().buffer().clone();
    let mut text = String::new();
    for y in 0..buffer.area.height {
        for x in 0..buffer.area.width {
            text.push_str(buffer[(x, y)].symbol());
        }
        text.push('\n');
    }
    text
}

async fn xadd(c: &mut bus::Conn, stream: &str, fields: &[(&str, &[u8])]) {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(*v);
    }
    let _: String = cmd.query_async(c).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_shows_what_the_fleet_holds() {
    let redis = fleet_testkit::RedisServer::start().expect("redis-server must be installed; tests never skip");
    let pg = fleet_testkit::Postgres::start().expect("postgres must be installed; tests never skip");
    let db = PgPool::connect(&pg.create_database().unwrap()).await.unwrap();
    orchestrator::db::migrate(&db).await.unwrap();
    let pool = bus::pool(&SecretString::from(redis.url()), 4, Duration::from_secs(2)).unwrap();

    // The API, with three tasks submitted (all wait in `dev`).
    let ring = Keyring::derive(&master(), Process::Role(Role::Orchestrator), &permissions()).unwrap();
    let engine = Engine::new(
        db,
        Arc::new(ring),
        AuditKey::new(vec![7; 32]).unwrap(),
        EngineConfig::new(Instance::parse("orchestrator-0").unwrap()),
    );
    let mut submitted = Vec::new();
    for title in ["Fix add()", "Validate login input", "Bump the parser"] {
        let new: NewTask =
            serde_json::from_value(serde_json::json!({"title": title, "instructions": "do it"})).unwrap();
        submitted.push(engine.submit(&Actor::operator("alice"), new).await.unwrap());
    }
    // Dev asks a person about the first task.
    let asked = &submitted[0];
    let from = Sender { role: Role::Dev, instance: Instance::parse("dev-7").unwrap() };
    let mut q = Envelope::new(
        from,
        Role::Orchestrator,
        bus::now_ms(),
        60_000,
        0,
        Question { text: "Round floats?".into() }.into(),
    );
    q.task_id = Some(asked.id);
    q.causation_id = engine.get(asked.id).await.unwrap().assignment_id;
    let wire = Keyring::derive(&master(), Process::Role(Role::Dev), &permissions()).unwrap().seal(&q).unwrap();
    let verifier = Verifier::new(
        Keyring::derive(&master(), Process::Role(Role::Orchestrator), &permissions()).unwrap(),
        permissions(),
        VerifierConfig::default(),
    );
    let ctx = VerifyContext { now_ms: bus::now_ms(), kill_epoch: 0 };
    let verified = verifier.verify(streams::QUESTIONS, &wire, ctx, &mut MemoryReplayGuard::new()).unwrap();
    engine.record_question(&verified, "Round floats?").await.unwrap();
    let state = ApiState::new(engine, pool.clone(), &ApiConfig::new(SecretString::from(SECRET))).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    tokio::spawn(api::serve(listener, api::router(state), shutdown.clone()));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("jwt.secret"), format!("{SECRET}\n")).unwrap();
    std::fs::set_permissions(dir.path().join("jwt.secret"), std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleetctl"))
        .current_dir(dir.path())
        .args(["token", "issue", "--role", "viewer", "--sub", "vera", "--ttl", "10m", "--secret-file", "jwt.secret"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let client = Client::new(&ApiArgs { api: url.parse().unwrap(), token: Some(SecretString::from(token)) }).unwrap();

    // Redis: the kill switch engaged, 1,500 tokens spent, two workers, a rejection, a dead
    // letter, a group with a backlog.
    let keyset = master().derive_keyset(Process::Operator, &permissions());
    std::fs::write(dir.path().join("operator.toml"), keyset.to_toml().as_bytes()).unwrap();
    std::fs::write(dir.path().join("permissions.toml"), PERMISSIONS).unwrap();
    let budget_toml = "[ledger]\ndaily_tokens = 10_000\n[ledger.prices.m]\ninput_micro_usd_per_mtok = 1_000_000\n\
                       output_micro_usd_per_mtok = 1_000_000\n";
    std::fs::write(dir.path().join("budget.toml"), budget_toml).unwrap();
    let cfg = LedgerConfig::from_toml(&budget_toml.replace("[ledger]\n", "").replace("[ledger.", "[")).unwrap();
    let ledger = Ledger::with_clock(pool.clone(), cfg, Arc::new(SystemClock)).unwrap();
    let r = ledger.reserve(uuid::Uuid::now_v7(), Role::Dev, "m", 1_000, 500).await.unwrap();
    ledger.commit(&r, 1_000, 500).await.unwrap();
    let mut c = pool.dedicated().await.unwrap();
    let () = redis::cmd("HSET")
        .arg("fleet:killswitch")
        .arg(&["epoch", "4", "engaged", "1", "by", "budget", "reason", "daily budget spent", "at_ms", "1"])
        .query_async(&mut c)
        .await
        .unwrap();
    let running = uuid::Uuid::now_v7();
    for (role, instance, busy) in [(Role::Dev, "dev-7", true), (Role::Review, "review-2", false)] {
        let ring = Keyring::derive(&master(), Process::Role(role), &permissions()).unwrap();
        let from = Sender { role, instance: Instance::parse(instance).unwrap() };
        let mut env =
            Envelope::new(from, Role::Orchestrator, bus::now_ms(), 60_000, 4, Heartbeat { seq: 1, busy }.into());
        env.task_id = busy.then_some(running);
        xadd(&mut c, streams::HEARTBEATS, &[("env", &ring.seal(&env).unwrap())]).await;
    }
    let () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(streams::HEARTBEATS)
        .arg("orchestrator")
        .arg("0")
        .query_async(&mut c)
        .await
        .unwrap();
    xadd(
        &mut c,
        streams::REJECTED,
        &[
            ("stream", b"fleet:results"),
            ("consumer", b"orchestrator-0"),
            ("reason", b"bad_signature"),
            ("detail", b"tag mismatch"),
        ],
    )
    .await;
    xadd(
        &mut c,
        streams::DLQ,
        &[
            ("stream", b"fleet:tasks:qa"),
            ("consumer", b"qa-3"),
            ("deliveries", b"5"),
            ("detail", b"handler kept failing"),
        ],
    )
    .await;

    let source = Source {
        keyset: dir.path().join("operator.toml"),
        permissions: dir.path().join("permissions.toml"),
        budget_config: Some(dir.path().join("budget.toml")),
        window: 30,
        redis: Some(SecretString::from(redis.url())),
        redis_ca: None,
    };
    let opened = source.open().unwrap();
    let first = top::snapshot(&pool, &opened, Some(&client), None).await.unwrap();
    assert_eq!(first.burn_tokens_per_min, None);
    let Tasks::Read { by_state, newest, questions } = &first.tasks else { panic!("{:?}", first.tasks) };
    assert_eq!(questions.len(), 1, "{questions:?}");
    assert_eq!(by_state.get("dev"), Some(&3));
    assert_eq!(newest.len(), 3);
    let text = screen(&first);
    for expected in [
        "KILL SWITCH ENGAGED (epoch 4): daily budget spent",
        "1500 / 10000 tokens",
        "burn —",
        "dev 3",
        "Validate login input",
        "dev-7",
        &format!("task {}", &running.to_string()[28..]),
        "review-2",
        "idle",
        "bad_signature",
        "fleet:results",
        "5 deliveries",
        "fleet:tasks:qa",
        "QUESTION",
        "dev/dev-7: Round floats?",
    ] {
        assert!(text.contains(expected), "missing {expected:?} on screen:\n{text}");
    }
    println!("{text}");
    let heartbeats_row = text.lines().find(|l| l.contains("fleet:heartbeats")).unwrap();
    assert!(heartbeats_row.contains("orchestrator") && heartbeats_row.contains(" 2 "), "lag 2: {heartbeats_row}");

    // 600 more tokens committed: the next refresh shows a burn rate.
    let r = ledger.reserve(uuid::Uuid::now_v7(), Role::Dev, "m", 400, 200).await.unwrap();
    ledger.commit(&r, 400, 200).await.unwrap();
    let at = Instant::now() - Duration::from_secs(60);
    let second = top::snapshot(&pool, &opened, Some(&client), Some((&first, at))).await.unwrap();
    let burn = second.burn_tokens_per_min.unwrap();
    assert!((590..=600).contains(&burn), "{burn}");
    assert!(screen(&second).contains(&format!("burn {burn} tokens/min")));

    // Without a token the tasks panel says why, and the rest still shows.
    let bare = top::snapshot(&pool, &opened, None, None).await.unwrap();
    let text = screen(&bare);
    assert!(text.contains("no API token") && text.contains("dev-7"), "{text}");
    shutdown.cancel();
}
