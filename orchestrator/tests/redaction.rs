//! Redaction that holds (issue 10, item 7), the orchestrator's sinks: every sample of
//! `fleet_testkit::secrets` goes through the task API's answers and errors, workers'
//! result summaries and findings as stored (events, audit, the next assignment), workers'
//! questions, and audit details, on a real Postgres; each comes out exactly redacted.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use axum::http::{Method, StatusCode};
use envelope::{Envelope, Instance, Payload, Question, Role, Sender, Status, streams};
use fleet_testkit::secrets::SAMPLES;
use orchestrator::api::auth::ApiRole;
use orchestrator::audit::{self, AuditEntry, AuditKey};
use orchestrator::state::{Risk, TaskState};
use orchestrator::tasks::{Actor, Applied, NewTask};
use serde_json::{Value, json};
use uuid::Uuid;

fn new_task(instructions: &str) -> NewTask {
    NewTask {
        title: "Fix the login".into(),
        instructions: instructions.into(),
        repository: None,
        test_command: None,
        risk: Risk::Low,
        scope: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_api_answers_and_errors_show_every_secret_redacted() {
    let app = support::app(|_| {}).await;
    let viewer = app.token(ApiRole::Viewer, "vera");
    for (i, s) in SAMPLES.iter().enumerate() {
        // One operator per sample: the intake bucket is per client.
        let op = app.token(ApiRole::Operator, &format!("op-{i}"));
        let body = json!({
            "title": format!("Fix {}", s.text),
            "instructions": s.text,
            "test_command": s.text,
        });
        let created = app.call(Method::POST, "/v1/tasks", &op, Some(&body)).await;
        assert_eq!(created.status, StatusCode::CREATED, "{}: {}", s.name, created.text);
        let id = created.json()["id"].as_str().unwrap().to_owned();
        let got = app.call(Method::GET, &format!("/v1/tasks/{id}"), &viewer, None).await;
        let listed = app.call(Method::GET, "/v1/tasks?limit=1", &viewer, None).await;
        for (what, task) in
            [("submit", created.json()), ("get", got.json()), ("list", listed.json()["tasks"][0].clone())]
        {
            assert_eq!(task["id"], id.as_str(), "{}: {what}", s.name);
            assert_eq!(task["title"], format!("Fix {}", s.redacted), "{}: {what}", s.name);
            // (A repository URL with credentials is refused at intake: docs/security.md.)
            for field in ["instructions", "test_command"] {
                assert_eq!(task["spec"][field], s.redacted, "{}: {what} {field}", s.name);
            }
        }
        for answer in [&created, &got, &listed] {
            assert!(!answer.text.contains(s.secret), "{}: {}", s.name, answer.text);
        }
        // Dev still gets what the operator wrote: only what is shown is redacted.
        let stored: Value = sqlx::query_scalar("SELECT spec FROM tasks WHERE id = $1::uuid")
            .bind(&id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
        assert_eq!(stored["instructions"], s.text, "{}", s.name);

        // An error that quotes the request.
        let bad = json!({"title": "t", "instructions": "i", "scope": [format!("/{}", s.text)]});
        let refused = app.call(Method::POST, "/v1/tasks", &op, Some(&bad)).await;
        assert_eq!(refused.status, StatusCode::UNPROCESSABLE_ENTITY, "{}: {}", s.name, refused.text);
        assert_eq!(
            refused.json()["error"],
            format!(
                "`scope` entry {:?} must be a relative path inside the repository, like \"src/\" or \"tests/test_calc.py\"",
                format!("/{}", s.redacted)
            ),
            "{}",
            s.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_summaries_findings_and_questions_are_stored_redacted() {
    let app = support::app(|c| {
        c.retry_base = Duration::from_millis(1);
        c.retry_max = Duration::from_millis(1);
    })
    .await;
    let op = Actor::operator("olga");
    for s in SAMPLES {
        let task = app.engine.submit(&op, new_task("Fix the login")).await.unwrap();
        assert_eq!(
            app.step(Role::Dev, Status::Success, s.text, &[]).await,
            Applied::Moved(TaskState::Qa),
            "{}",
            s.name
        );
        let finding = format!("test_login failed: {}", s.text);
        assert_eq!(
            app.step(Role::Qa, Status::Failure, s.text, &[&finding]).await,
            Applied::Moved(TaskState::Dev),
            "{}",
            s.name
        );
        let text = format!("May I use {} here", s.text);
        let mut question = Envelope::new(
            Sender { role: Role::Dev, instance: Instance::parse("dev-1").unwrap() },
            Role::Orchestrator,
            bus::now_ms(),
            60_000,
            0,
            Payload::Question(Question { text: text.clone() }),
        );
        question.task_id = Some(task.id);
        app.engine.record_question(&support::deliver(&question, streams::QUESTIONS), &text).await.unwrap();

        // Stored: the events' summaries, the audit trail, the findings handed to Dev.
        let summaries: Vec<Value> = sqlx::query_scalar(
            "SELECT detail->'summary' FROM task_events WHERE task_id = $1 AND cause = 'result' ORDER BY seq",
        )
        .bind(task.id)
        .fetch_all(&app.pool)
        .await
        .unwrap();
        assert_eq!(summaries, vec![json!(s.redacted), json!(s.redacted)], "{}", s.name);
        let audited: Vec<Value> = sqlx::query_scalar(
            "SELECT details->'detail'->'summary' FROM audit_trail WHERE task_id = $1 AND details->>'cause' = 'result' ORDER BY seq",
        )
        .bind(task.id)
        .fetch_all(&app.pool)
        .await
        .unwrap();
        assert_eq!(audited, vec![json!(s.redacted), json!(s.redacted)], "{}", s.name);
        let asked: Value = sqlx::query_scalar(
            "SELECT details->'text' FROM audit_trail WHERE task_id = $1 AND action = 'task.question'",
        )
        .bind(task.id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
        assert_eq!(asked, json!(format!("May I use {} here", s.redacted)), "{}", s.name);
        let findings: Value = sqlx::query_scalar("SELECT findings FROM tasks WHERE id = $1")
            .bind(task.id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
        let expected = format!("test_login failed: {}", s.redacted);
        assert_eq!(findings, json!([expected]), "{}", s.name);
        tokio::time::sleep(Duration::from_millis(5)).await;
        app.engine.tick().await.unwrap();
        let Payload::TaskAssign(again) = &app.last_assignment(Role::Dev).await.payload else {
            panic!("not an assignment")
        };
        assert_eq!(again.findings, vec![expected], "{}", s.name);

        let everything: Vec<String> = sqlx::query_scalar(
            "SELECT details::text FROM audit_trail WHERE task_id = $1 UNION ALL SELECT detail::text FROM task_events WHERE task_id = $1",
        )
        .bind(task.id)
        .fetch_all(&app.pool)
        .await
        .unwrap();
        assert!(everything.iter().all(|t| !t.contains(s.secret)), "{}: {everything:?}", s.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_details_are_redacted_before_the_row_is_written() {
    let app = support::app(|_| {}).await;
    let admin = app.token(ApiRole::Admin, "ada");
    let key = AuditKey::new(vec![7; 32]).unwrap();
    for s in SAMPLES {
        // Straight into the trail, as any caller of `append` does.
        let mut tx = app.pool.begin().await.unwrap();
        let entry = AuditEntry {
            actor_role: "operator",
            actor_instance: "olga",
            action: "test.redaction",
            task_id: Some(Uuid::now_v7()),
            prompt_version: None,
            details: json!({"reason": s.text, "nested": [{"said": s.text}]}),
        };
        let seq = audit::append(&mut tx, &key, entry).await.unwrap();
        tx.commit().await.unwrap();
        let details: Value = sqlx::query_scalar("SELECT details FROM audit_trail WHERE seq = $1")
            .bind(seq)
            .fetch_one(&app.pool)
            .await
            .unwrap();
        assert_eq!(details, json!({"reason": s.redacted, "nested": [{"said": s.redacted}]}), "{}", s.name);

        // Through the API: an operator's kill reason.
        let killed = app.call(Method::POST, "/v1/kill", &admin, Some(&json!({"reason": s.text}))).await;
        assert_eq!(killed.status, StatusCode::OK, "{}: {}", s.name, killed.text);
        let reason: Value = sqlx::query_scalar(
            "SELECT details->'reason' FROM audit_trail WHERE action = 'fleet.kill' ORDER BY seq DESC LIMIT 1",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        assert_eq!(reason, json!(s.redacted), "{}", s.name);
        let kept: String = sqlx::query_scalar("SELECT reason FROM fleet_state").fetch_one(&app.pool).await.unwrap();
        assert_eq!(kept, s.redacted, "{}: fleet_state", s.name);
        assert_eq!(app.call(Method::POST, "/v1/resume", &admin, None).await.status, StatusCode::OK);
    }
    let all: Vec<String> =
        sqlx::query_scalar("SELECT details::text FROM audit_trail").fetch_all(&app.pool).await.unwrap();
    for s in SAMPLES {
        assert!(all.iter().all(|t| !t.contains(s.secret)), "{} reached the trail", s.name);
    }
    let report = audit::verify(&app.pool, &key).await.unwrap();
    assert!(report.broken_row.is_none(), "redacted rows hash and verify as written");
}
