//! Operators driving tasks through the HTTP API against real Postgres and Redis: a
//! worker's question listed and answered (the step is issued again with the answer among
//! its findings), a task cancelled (its late result is stale, its tool requests are
//! refused, nothing is pushed), a failed or blocked task retried; each role-gated,
//! audited, and refused with 404 or 409 where it must be.
#![allow(clippy::unwrap_used)]

mod support;

use axum::http::{Method, StatusCode};
use envelope::{Envelope, Instance, Payload, Question, Role, Sender, Status, streams};
use orchestrator::api::auth::ApiRole;
use orchestrator::tasks::{Applied, Hold};
use serde_json::{Value, json};
use support::{App, app, deliver};
use uuid::Uuid;

const UNKNOWN: &str = "0190a5e2-7c1d-7b3e-9f00-1a2b3c4d5e6f";

async fn submit(app: &App, token: &str) -> String {
    let body = json!({"title": "Validate input", "instructions": "Add input validation to login()"});
    let created = app.call(Method::POST, "/v1/tasks", token, Some(&body)).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    created.json()["id"].as_str().unwrap().to_owned()
}

/// `role-1` asks `text` about its current assignment, delivered as the consumer would.
async fn ask(app: &App, role: Role, text: &str) -> Uuid {
    let assign = app.last_assignment(role).await;
    let mut env = Envelope::new(
        Sender { role, instance: Instance::parse(&format!("{role}-1")).unwrap() },
        Role::Orchestrator,
        bus::now_ms(),
        60_000,
        0,
        Question { text: text.to_owned() }.into(),
    );
    env.task_id = assign.task_id;
    env.causation_id = Some(assign.id);
    let verified = deliver(&env, streams::QUESTIONS);
    app.engine.record_question(&verified, text).await.unwrap();
    // Delivered twice (a redelivery after a crash): still one question.
    app.engine.record_question(&verified, text).await.unwrap();
    env.id
}

/// The audit rows of `action` for `task`: (actor_role, actor_instance, details).
async fn audited(app: &App, action: &str, task: &str) -> Vec<(String, String, Value)> {
    sqlx::query_as(
        "SELECT actor_role, actor_instance, details FROM audit_trail WHERE action = $1 AND task_id = $2::uuid ORDER BY seq",
    )
    .bind(action)
    .bind(task)
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

/// How many questions `GET /v1/questions` lists.
async fn open_questions(app: &App, token: &str) -> usize {
    app.call(Method::GET, "/v1/questions", token, None).await.json()["questions"].as_array().unwrap().len()
}

#[tokio::test]
async fn an_answer_closes_the_question_and_issues_the_step_again_with_it() {
    let app = app(|_| {}).await;
    let (viewer, op) = (app.token(ApiRole::Viewer, "vera"), app.token(ApiRole::Operator, "alice"));
    let id = submit(&app, &op).await;
    let first = app.last_assignment(Role::Dev).await;
    let question =
        ask(&app, Role::Dev, "Which hash: bcrypt or argon2? token=ghp_0123456789abcdefghijABCDEFGHIJ012345").await;

    let listed = app.call(Method::GET, "/v1/questions", &viewer, None).await;
    assert_eq!(listed.status, StatusCode::OK, "{}", listed.text);
    let questions = listed.json()["questions"].as_array().unwrap().clone();
    assert_eq!(questions.len(), 1, "{questions:?}");
    let q = &questions[0];
    assert_eq!(q["id"], question.to_string());
    assert_eq!(q["task_id"], id.as_str());
    assert_eq!(q["task_state"], "dev");
    assert_eq!((q["asked_by_role"].as_str(), q["asked_by_instance"].as_str()), (Some("dev"), Some("dev-1")));
    assert!(q["asked_at"].is_string());
    let text = q["text"].as_str().unwrap();
    assert!(text.starts_with("Which hash: bcrypt or argon2?") && !text.contains("ghp_0123"), "not redacted: {text}");

    let path = format!("/v1/tasks/{id}/answer");
    let answer = json!({"text": "argon2id, as in docs/security.md"});
    let refused = app.call(Method::POST, &path, &viewer, Some(&answer)).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.text);
    let unknown = app.call(Method::POST, &format!("/v1/tasks/{UNKNOWN}/answer"), &op, Some(&answer)).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND, "{}", unknown.text);
    let empty = app.call(Method::POST, &path, &op, Some(&json!({"text": "  "}))).await;
    assert_eq!(empty.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", empty.text);
    let wrong = app.call(Method::POST, &path, &op, Some(&json!({"answer": "x"}))).await;
    assert_eq!(wrong.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", wrong.text);
    // Postgres stores no NUL: refused before it gets there, not a 500.
    let nul = app.call(Method::POST, &path, &op, Some(&json!({"text": "a\u{0}b"}))).await;
    assert_eq!(nul.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", nul.text);
    let body = json!({"title": "a\u{0}b", "instructions": "x"});
    let nul = app.call(Method::POST, "/v1/tasks", &op, Some(&body)).await;
    assert_eq!(nul.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", nul.text);
    let nul = app.call(Method::POST, &format!("/v1/tasks/{id}/cancel"), &op, Some(&json!({"reason": "\u{0}"}))).await;
    assert_eq!(nul.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", nul.text);

    let answered = app.call(Method::POST, &path, &op, Some(&answer)).await;
    assert_eq!(answered.status, StatusCode::OK, "{}", answered.text);
    let task = answered.json();
    assert_eq!((task["state"].as_str(), task["attempt"].as_i64()), (Some("dev"), Some(2)));

    // The step is issued again, carrying the answer; the first assignment is stale.
    let second = app.last_assignment(Role::Dev).await;
    assert_ne!(second.id, first.id);
    assert_eq!(task["assignment_id"], second.id.to_string());
    let Payload::TaskAssign(assign) = &second.payload else { panic!("{:?}", second.payload) };
    assert_eq!(assign.attempt, 2);
    let finding = assign.findings.last().unwrap();
    assert!(
        finding.starts_with("answer from alice to the question \"Which hash: bcrypt or argon2?")
            && finding.ends_with(": argon2id, as in docs/security.md"),
        "{finding}"
    );
    let id_uuid = Uuid::parse_str(&id).unwrap();
    assert_eq!(app.engine.hold(id_uuid, Some(first.id), Role::Dev, "dev-1").await.unwrap(), Hold::Stale);

    let listed = app.call(Method::GET, "/v1/questions", &viewer, None).await;
    assert_eq!(listed.json(), json!({"questions": []}));
    let again = app.call(Method::POST, &path, &op, Some(&answer)).await;
    assert_eq!(again.status, StatusCode::CONFLICT, "{}", again.text);
    assert!(again.json()["error"].as_str().unwrap().contains("has no open question"), "{}", again.text);

    let rows = audited(&app, "task.answer", &id).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!((rows[0].0.as_str(), rows[0].1.as_str()), ("operator", "alice"));
    assert_eq!(rows[0].2["questions"], json!([question.to_string()]));
    assert_eq!(rows[0].2["replaced_assignment"], first.id.to_string());
}

#[tokio::test]
async fn a_cancelled_task_is_final_its_late_result_is_stale_and_nothing_is_pushed() {
    let app = app(|_| {}).await;
    let (viewer, op) = (app.token(ApiRole::Viewer, "vera"), app.token(ApiRole::Operator, "alice"));

    // A task in QA: cancelled while its worker runs.
    let running = submit(&app, &op).await;
    assert_eq!(
        app.step(Role::Dev, Status::Success, "done", &[]).await,
        Applied::Moved(orchestrator::state::TaskState::Qa)
    );
    ask(&app, Role::Qa, "Should the flaky test count?").await;
    let qa = app.last_assignment(Role::Qa).await;
    let path = format!("/v1/tasks/{running}/cancel");
    let refused = app.call(Method::POST, &path, &viewer, None).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.text);
    let unknown = app.call(Method::POST, &format!("/v1/tasks/{UNKNOWN}/cancel"), &op, None).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND, "{}", unknown.text);
    let cancelled = app.call(Method::POST, &path, &op, Some(&json!({"reason": "wrong repository"}))).await;
    assert_eq!(cancelled.status, StatusCode::OK, "{}", cancelled.text);
    assert_eq!(cancelled.json()["state"], "cancelled");
    assert_eq!(cancelled.json()["assignment_id"], Value::Null);

    let task_id = Uuid::parse_str(&running).unwrap();
    assert_eq!(app.engine.hold(task_id, Some(qa.id), Role::Qa, "qa-1").await.unwrap(), Hold::Stale);
    assert_eq!(app.step(Role::Qa, Status::Success, "late", &[]).await, Applied::Stale);
    let listed = app.call(Method::GET, "/v1/questions", &viewer, None).await;
    assert_eq!(listed.json(), json!({"questions": []}), "a cancelled task's questions are closed");

    let again = app.call(Method::POST, &path, &op, None).await;
    assert_eq!(again.status, StatusCode::CONFLICT, "{}", again.text);
    assert!(
        again.json()["error"].as_str().unwrap().contains("cannot cancel a task in state `cancelled`"),
        "{}",
        again.text
    );
    let rows = audited(&app, "task.cancel", &running).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        (rows[0].1.as_str(), &rows[0].2["from"], &rows[0].2["reason"]),
        ("alice", &json!("qa"), &json!("wrong repository"))
    );

    // An approved task waiting for its push: cancelled, it is never pushed.
    let approved = submit(&app, &op).await;
    for role in [Role::Dev, Role::Qa, Role::Review] {
        assert!(matches!(app.step(role, Status::Success, "ok", &[]).await, Applied::Moved(_)));
    }
    assert_eq!(app.engine.get(Uuid::parse_str(&approved).unwrap()).await.unwrap().state.as_str(), "approved");
    assert_eq!(app.engine.push_jobs(10).await.unwrap().len(), 1);
    let cancelled = app.call(Method::POST, &format!("/v1/tasks/{approved}/cancel"), &op, None).await;
    assert_eq!(cancelled.status, StatusCode::OK, "{}", cancelled.text);
    assert!(app.engine.push_jobs(10).await.unwrap().is_empty());
    let pushed = app.engine.pushed(Uuid::parse_str(&approved).unwrap(), "fleet/x", "0123").await.unwrap();
    assert!(!pushed, "a push that finishes after the cancellation is not recorded as the task's");
}

#[tokio::test]
async fn retry_moves_a_failed_or_blocked_task_back_to_its_step() {
    let app = app(|c| c.max_retries = 0).await;
    let (viewer, op) = (app.token(ApiRole::Viewer, "vera"), app.token(ApiRole::Operator, "alice"));
    let id = submit(&app, &op).await;
    let path = format!("/v1/tasks/{id}/retry");

    let early = app.call(Method::POST, &path, &op, None).await;
    assert_eq!(early.status, StatusCode::CONFLICT, "{}", early.text);
    assert!(early.json()["error"].as_str().unwrap().contains("cannot retry a task in state `dev`"), "{}", early.text);

    ask(&app, Role::Dev, "Which file?").await;
    assert_eq!(open_questions(&app, &viewer).await, 1);

    // Dev fails with no retries left: the task fails, and its question is not listed.
    assert_eq!(
        app.step(Role::Dev, Status::Error, "tool crashed", &[]).await,
        Applied::Moved(orchestrator::state::TaskState::Failed)
    );
    let refused = app.call(Method::POST, &path, &viewer, None).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.text);
    let unknown = app.call(Method::POST, &format!("/v1/tasks/{UNKNOWN}/retry"), &op, None).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND, "{}", unknown.text);
    let bad = app.call(Method::POST, &path, &op, Some(&json!({"reason": 5}))).await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", bad.text);
    assert_eq!(open_questions(&app, &viewer).await, 0);

    let retried = app.call(Method::POST, &path, &op, Some(&json!({"reason": "the tool is fixed"}))).await;
    assert_eq!(retried.status, StatusCode::OK, "{}", retried.text);
    let task = retried.json();
    assert_eq!(
        (task["state"].as_str(), task["attempt"].as_i64(), task["retries"].as_i64()),
        (Some("dev"), Some(1), Some(0))
    );
    let assign = app.last_assignment(Role::Dev).await;
    assert_eq!(task["assignment_id"], assign.id.to_string());
    assert_eq!(open_questions(&app, &viewer).await, 1, "a retried task's question is listed again");
    let rows = audited(&app, "task.retry", &id).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!((rows[0].1.as_str(), &rows[0].2["from"], &rows[0].2["to"]), ("alice", &json!("failed"), &json!("dev")));

    // The retried step runs on: Dev succeeds, QA starts.
    assert_eq!(
        app.step(Role::Dev, Status::Success, "done", &[]).await,
        Applied::Moved(orchestrator::state::TaskState::Qa)
    );

    // Blocked (over budget) in QA: retried, it is back in QA with a new assignment.
    let task_id = Uuid::parse_str(&id).unwrap();
    app.engine.block(task_id, "over budget").await.unwrap();
    let before = app.last_assignment(Role::Qa).await;
    let retried = app.call(Method::POST, &path, &op, None).await;
    assert_eq!(retried.status, StatusCode::OK, "{}", retried.text);
    assert_eq!(retried.json()["state"], "qa");
    assert_ne!(app.last_assignment(Role::Qa).await.id, before.id);

    // While the fleet is halted, nothing is retried.
    let admin = app.token(ApiRole::Admin, "root");
    assert_eq!(
        app.call(Method::POST, "/v1/kill", &admin, Some(&json!({"reason": "drill"}))).await.status,
        StatusCode::OK
    );
    let cancelled = app.call(Method::POST, &format!("/v1/tasks/{id}/cancel"), &op, None).await;
    assert_eq!(cancelled.json()["state"], "cancelled", "a halted task can be cancelled");
    let halted = app.call(Method::POST, &path, &op, None).await;
    assert_eq!(halted.status, StatusCode::CONFLICT, "{}", halted.text);
    assert!(halted.json()["error"].as_str().unwrap().contains("halted"), "{}", halted.text);
}
