//! The XP cycle end to end on a real Postgres: every transition writes the task, an event,
//! an audit row and its outgoing envelopes in one transaction.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use envelope::*;
use orchestrator::audit::{self, AuditKey};
use orchestrator::state::{Risk, TaskState};
use orchestrator::tasks::{Actor, Applied, Engine, EngineConfig, NewTask};
use sqlx::PgPool;
use uuid::Uuid;

const PERMISSIONS: &str = include_str!("../../config/permissions.toml");

fn master() -> MasterFile {
    MasterFile::new(MasterSecret::from_bytes([9; 32]))
}

fn ring(role: Role) -> Keyring {
    Keyring::derive(&master(), Process::Role(role), &PermissionTable::parse(PERMISSIONS).unwrap()).unwrap()
}

fn verifier(role: Role) -> Verifier {
    Verifier::new(ring(role), PermissionTable::parse(PERMISSIONS).unwrap(), VerifierConfig::default())
}

struct Fleet {
    _pg: fleet_testkit::Postgres,
    pool: PgPool,
    engine: Engine,
    key: AuditKey,
}

async fn fleet(tune: impl FnOnce(&mut EngineConfig)) -> Fleet {
    let pg = fleet_testkit::Postgres::start().expect("postgres must be installed; tests never skip");
    let url = pg.create_database().unwrap();
    let pool = PgPool::connect(&url).await.unwrap();
    orchestrator::db::migrate(&pool).await.unwrap();
    let mut cfg = EngineConfig::new(Instance::parse("orchestrator-0").unwrap());
    cfg.retry_base = Duration::from_millis(1);
    cfg.retry_max = Duration::from_millis(5);
    cfg.repositories.allowed_hosts = vec!["git.example".into()];
    tune(&mut cfg);
    let key = AuditKey::new(vec![3; 32]).unwrap();
    let engine = Engine::new(pool.clone(), Arc::new(ring(Role::Orchestrator)), key.clone(), cfg);
    Fleet { _pg: pg, pool, engine, key }
}

fn new_task(risk: Risk) -> NewTask {
    NewTask {
        title: "Validate login input".into(),
        instructions: "Add input validation to login()".into(),
        repository: Some("https://git.example/app.git".into()),
        test_command: Some("pytest -q".into()),
        risk,
        scope: vec![],
    }
}

/// The newest outbox row for `stream`, verified as its addressee would.
async fn last_sent(pool: &PgPool, stream: &str) -> Verified {
    let frame: Vec<u8> = sqlx::query_scalar("SELECT frame FROM outbox WHERE stream = $1 ORDER BY id DESC LIMIT 1")
        .bind(stream)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("nothing sent on {stream}: {e}"));
    let to = match stream.rsplit(':').next().unwrap() {
        "dev" => Role::Dev,
        "qa" => Role::Qa,
        "review" => Role::Review,
        "refactor" => Role::Refactor,
        _ => Role::Budget,
    };
    let ctx = VerifyContext { now_ms: bus::now_ms(), kill_epoch: 0 };
    verifier(to).verify(stream, &frame, ctx, &mut MemoryReplayGuard::new()).unwrap()
}

fn result_for(assign: &Verified, role: Role, status: Status, findings: &[&str]) -> Envelope {
    // As a worker does: the result names the change it was given.
    let judged = match &assign.payload {
        Payload::TaskAssign(a) => a.change.as_deref().map(|c| changeset::ChangeId::of(c).to_string()),
        _ => None,
    };
    let mut env = Envelope::new(
        Sender { role, instance: Instance::parse(&format!("{role}-1")).unwrap() },
        Role::Orchestrator,
        bus::now_ms(),
        60_000,
        0,
        TaskResult {
            attempt: 1,
            status,
            summary: format!("{role} says {status:?}"),
            findings: findings.iter().map(|s| (*s).to_owned()).collect(),
            diff: (role == Role::Dev).then(|| b"--- a\n+++ b\n".to_vec()),
            log: None,
            change_sha256: judged,
            calls: Vec::new(),
            containment: Vec::new(),
        }
        .into(),
    );
    env.task_id = assign.task_id;
    env.causation_id = Some(assign.id);
    env
}

/// Seals as the worker and verifies as the orchestrator: the only way to get a `Verified`.
fn deliver(env: &Envelope) -> Verified {
    let wire = ring(env.from.role).seal(env).unwrap();
    verifier(Role::Orchestrator)
        .verify(
            streams::RESULTS,
            &wire,
            VerifyContext { now_ms: bus::now_ms(), kill_epoch: 0 },
            &mut MemoryReplayGuard::new(),
        )
        .unwrap()
}

async fn step(f: &Fleet, role: Role, status: Status, findings: &[&str]) -> Applied {
    let assign = last_sent(&f.pool, &format!("fleet:tasks:{role}")).await;
    f.engine.apply_result(&deliver(&result_for(&assign, role, status, findings))).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_full_cycle_with_a_qa_loop_and_a_refactor() {
    let f = fleet(|_| {}).await;
    let op = Actor::operator("alice");
    let task = f.engine.submit(&op, new_task(Risk::Low)).await.unwrap();
    assert_eq!(task.state, TaskState::Dev);
    let assign = last_sent(&f.pool, "fleet:tasks:dev").await;
    let Payload::TaskAssign(a) = &assign.payload else { panic!("expected task.assign") };
    assert_eq!((a.attempt, a.test_command.as_deref()), (1, Some("pytest -q")));
    assert_eq!(a.workspace, format!("/workspace/task-{}", task.id));

    assert_eq!(step(&f, Role::Dev, Status::Success, &[]).await, Applied::Moved(TaskState::Qa));
    // QA fails: back to Dev with the findings, after a backoff (the tick issues it).
    assert_eq!(step(&f, Role::Qa, Status::Failure, &["test_login fails"]).await, Applied::Moved(TaskState::Dev));
    let t = f.engine.get(task.id).await.unwrap();
    assert_eq!((t.retries, t.assignment_id), (1, None));
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(f.engine.tick().await.unwrap() >= 1);
    let again = last_sent(&f.pool, "fleet:tasks:dev").await;
    let Payload::TaskAssign(a) = &again.payload else { panic!() };
    // A new Dev step (not a retry of the same one): attempts count from 1 again.
    assert_eq!((a.attempt, a.findings.clone()), (1, vec!["test_login fails".to_owned()]));

    assert_eq!(step(&f, Role::Dev, Status::Success, &[]).await, Applied::Moved(TaskState::Qa));
    assert_eq!(step(&f, Role::Qa, Status::Success, &[]).await, Applied::Moved(TaskState::Review));
    assert_eq!(
        step(&f, Role::Review, Status::Success, &["extract a helper"]).await,
        Applied::Moved(TaskState::Refactor)
    );
    assert_eq!(step(&f, Role::Refactor, Status::Success, &[]).await, Applied::Moved(TaskState::Qa));
    assert_eq!(step(&f, Role::Qa, Status::Success, &[]).await, Applied::Moved(TaskState::Review));
    // A second refactor is not asked for: findings now only inform.
    assert_eq!(step(&f, Role::Review, Status::Success, &["nit"]).await, Applied::Moved(TaskState::Approved));
    let merged = f.engine.mark_merged(task.id, &op).await.unwrap();
    assert_eq!(merged.state, TaskState::Merged);

    let path: Vec<String> = sqlx::query_scalar("SELECT to_state FROM task_events WHERE task_id = $1 ORDER BY seq")
        .bind(task.id)
        .fetch_all(&f.pool)
        .await
        .unwrap();
    assert_eq!(
        path,
        ["submitted", "dev", "qa", "dev", "qa", "review", "refactor", "qa", "review", "approved", "merged"]
    );
    let diffs: i64 = sqlx::query_scalar("SELECT count(*) FROM artifacts WHERE task_id = $1 AND kind = 'diff'")
        .bind(task.id)
        .fetch_one(&f.pool)
        .await
        .unwrap();
    assert_eq!(diffs, 2);
    let outcomes: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE stream = 'fleet:outcomes'")
        .fetch_one(&f.pool)
        .await
        .unwrap();
    assert_eq!(outcomes, 8, "one outcome per result");
    let report = audit::verify(&f.pool, &f.key).await.unwrap();
    assert_eq!(report.first_broken, None);
    assert_eq!(report.rows, 11, "submit + 10 transitions");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_are_applied_once_and_stale_ones_are_ignored() {
    let f = fleet(|_| {}).await;
    let task = f.engine.submit(&Actor::operator("bob"), new_task(Risk::Low)).await.unwrap();
    let assign = last_sent(&f.pool, "fleet:tasks:dev").await;
    let result = deliver(&result_for(&assign, Role::Dev, Status::Success, &[]));
    assert_eq!(f.engine.apply_result(&result).await.unwrap(), Applied::Moved(TaskState::Qa));
    assert_eq!(f.engine.apply_result(&result).await.unwrap(), Applied::Duplicate);
    // A second, different result for the old dev assignment: stale.
    let late = deliver(&result_for(&assign, Role::Dev, Status::Failure, &[]));
    assert_eq!(f.engine.apply_result(&late).await.unwrap(), Applied::Stale);
    // A QA result answering a dev assignment id: stale too.
    let wrong = deliver(&result_for(&assign, Role::Qa, Status::Success, &[]));
    assert_eq!(f.engine.apply_result(&wrong).await.unwrap(), Applied::Stale);
    assert_eq!(f.engine.get(task.id).await.unwrap().state, TaskState::Qa);
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM task_events WHERE task_id = $1")
        .bind(task.id)
        .fetch_one(&f.pool)
        .await
        .unwrap();
    assert_eq!(events, 3, "submitted, dev, qa");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_risk_waits_for_approval_and_illegal_moves_are_refused() {
    let f = fleet(|_| {}).await;
    let op = Actor::operator("carol");
    let task = f.engine.submit(&op, new_task(Risk::High)).await.unwrap();
    let err = f.engine.approve(task.id, &op, None).await.unwrap_err();
    assert!(err.to_string().contains("illegal transition"), "{err}");
    let err = f.engine.mark_merged(task.id, &op).await.unwrap_err();
    assert!(matches!(err, orchestrator::tasks::EngineError::Illegal(_)), "{err}");
    for (role, to) in
        [(Role::Dev, TaskState::Qa), (Role::Qa, TaskState::Review), (Role::Review, TaskState::AwaitingApproval)]
    {
        assert_eq!(step(&f, role, Status::Success, &[]).await, Applied::Moved(to));
    }
    // Four eyes: the submitter cannot approve; a second operator can.
    let own = f.engine.approve(task.id, &op, None).await.unwrap_err();
    assert!(matches!(own, orchestrator::tasks::EngineError::SelfApproval { .. }), "{own}");
    let approved =
        f.engine.approve(task.id, &Actor::operator("dave"), Some("looked at the diff".into())).await.unwrap();
    assert_eq!(approved.state, TaskState::Approved);
    let decided: String = sqlx::query_scalar("SELECT decided_by FROM approvals WHERE task_id = $1")
        .bind(task.id)
        .fetch_one(&f.pool)
        .await
        .unwrap();
    assert_eq!(decided, "dave");
    let missing = f.engine.get(Uuid::now_v7()).await.unwrap_err();
    assert!(missing.to_string().contains("not found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_worker_loses_the_step_then_the_task_fails() {
    let f = fleet(|c| {
        c.step_deadline = Duration::from_millis(50);
        c.max_retries = 2;
    })
    .await;
    let task = f.engine.submit(&Actor::operator("dave"), new_task(Risk::Low)).await.unwrap();
    let mut attempts = vec![];
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        f.engine.tick().await.unwrap();
        let t = f.engine.get(task.id).await.unwrap();
        attempts.push((t.state, t.attempt));
        if t.state == TaskState::Failed {
            break;
        }
    }
    let t = f.engine.get(task.id).await.unwrap();
    assert_eq!(t.state, TaskState::Failed, "{attempts:?}");
    assert_eq!(t.retries, 2);
    let assigns: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE task_id = $1 AND stream = 'fleet:tasks:dev'")
            .bind(task.id)
            .fetch_one(&f.pool)
            .await
            .unwrap();
    assert_eq!(assigns, 3, "first try and two reassignments");
    // A heartbeat would have kept it: shown on a fresh task.
    let kept = f.engine.submit(&Actor::operator("dave"), new_task(Risk::Low)).await.unwrap();
    let mut hb = Envelope::new(
        Sender { role: Role::Dev, instance: Instance::parse("dev-9").unwrap() },
        Role::Orchestrator,
        bus::now_ms(),
        10_000,
        0,
        Heartbeat { seq: 1, busy: true }.into(),
    );
    hb.task_id = Some(kept.id);
    // It names the assignment it keeps alive (and binds it to dev-9, the first to use it).
    hb.causation_id = Some(last_sent(&f.pool, "fleet:tasks:dev").await.id);
    let wire = ring(Role::Dev).seal(&hb).unwrap();
    let hb = verifier(Role::Orchestrator)
        .verify(
            streams::HEARTBEATS,
            &wire,
            VerifyContext { now_ms: bus::now_ms(), kill_epoch: 0 },
            &mut MemoryReplayGuard::new(),
        )
        .unwrap();
    assert!(f.engine.heartbeat(&hb).await.unwrap());
    assert_eq!(f.engine.get(kept.id).await.unwrap().assigned_to.as_deref(), Some("dev-9"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_halts_everything_and_resume_reissues_under_the_new_epoch() {
    let f = fleet(|_| {}).await;
    let op = Actor::operator("erin");
    let a = f.engine.submit(&op, new_task(Risk::Low)).await.unwrap();
    let b = f.engine.submit(&op, new_task(Risk::Low)).await.unwrap();
    step(&f, Role::Dev, Status::Success, &[]).await; // b → qa
    let epoch = f.engine.kill(&Actor::operator("root"), "runaway spend").await.unwrap();
    assert_eq!(epoch, 1);
    assert_eq!(f.engine.kill(&Actor::operator("root"), "again").await.unwrap(), 1, "idempotent");
    for id in [a.id, b.id] {
        assert_eq!(f.engine.get(id).await.unwrap().state, TaskState::Halted);
    }
    assert!(matches!(f.engine.submit(&op, new_task(Risk::Low)).await, Err(orchestrator::tasks::EngineError::Halted)));
    let pause = last_sent(&f.pool, "fleet:control:budget").await;
    // The admin's name goes to the budget manager, which names them in its alert.
    assert!(matches!(&pause.payload, Payload::ControlPause(p) if p.epoch == 1 && p.by.as_deref() == Some("root")));

    f.engine.resume(&Actor::operator("root")).await.unwrap();
    let resume = last_sent(&f.pool, "fleet:control:budget").await;
    assert!(matches!(&resume.payload, Payload::ControlResume(r) if r.epoch == 1 && r.by.as_deref() == Some("root")));
    let ta = f.engine.get(a.id).await.unwrap();
    let tb = f.engine.get(b.id).await.unwrap();
    assert_eq!((ta.state, tb.state), (TaskState::Dev, TaskState::Qa));
    for (t, stream) in [(ta, "fleet:tasks:dev"), (tb, "fleet:tasks:qa")] {
        let frame: Vec<u8> = sqlx::query_scalar("SELECT frame FROM outbox WHERE envelope_id = $1")
            .bind(t.assignment_id.unwrap())
            .fetch_one(&f.pool)
            .await
            .unwrap();
        let role = if stream.ends_with("dev") { Role::Dev } else { Role::Qa };
        let v = verifier(role)
            .verify(
                stream,
                &frame,
                VerifyContext { now_ms: bus::now_ms(), kill_epoch: 1 },
                &mut MemoryReplayGuard::new(),
            )
            .unwrap();
        assert_eq!(v.kill_epoch, 1, "re-issued under the new epoch");
    }
    assert_eq!(audit::verify(&f.pool, &f.key).await.unwrap().first_broken, None);
}

/// A task may name only a repository the policy allows: no credentials in the URL, no
/// plaintext transport, no host or local path outside the configured ones, never another
/// task's workspace. Refused at intake, before anything is stored or sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repositories_outside_the_policy_are_refused_at_intake() {
    let f = fleet(|cfg| {
        cfg.repositories.local_roots = vec!["/srv/repos".into(), "/".into()];
    })
    .await;
    let op = Actor::operator("alice");
    let refused = [
        ("https://alice:ghp_0123456789abcdefghij0123456789abcdef@git.example/app.git", "credential helper"),
        ("http://git.example/app.git", "plaintext"),
        ("https://evil.example/app.git", "repositories.allowed_hosts"),
        ("/workspace/task-0193/.git", "another's workspace"),
        ("ext::sh -c id", "remote helper"),
        ("git@git.example:app.git", "ssh location"),
    ];
    for (repo, says) in refused {
        let mut task = new_task(Risk::Low);
        task.repository = Some(repo.into());
        match f.engine.submit(&op, task).await {
            Err(orchestrator::tasks::EngineError::Invalid(why)) => {
                assert!(why.contains(says), "{repo}: {why}");
                assert!(!why.contains("ghp_"), "the refusal never echoes the credential: {why}");
            }
            other => panic!("{repo} was not refused: {other:?}"),
        }
    }
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks").fetch_one(&f.pool).await.unwrap();
    let sent: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(&f.pool).await.unwrap();
    assert_eq!((stored, sent), (0, 0), "nothing stored, nothing sent");
    let mut ok = new_task(Risk::Low);
    ok.repository = Some("/srv/repos/app.git".into());
    f.engine.submit(&op, ok).await.unwrap();
}
