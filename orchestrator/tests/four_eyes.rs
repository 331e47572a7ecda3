//! Four eyes (issue 10, item 9): a HIGH or CRITICAL task is approved by someone other than
//! its submitter. The attack: an operator (or a stolen operator token) submits a risky
//! change and approves it alone. Through the HTTP API, on a real Postgres.
#![allow(clippy::unwrap_used)]

mod support;

use axum::http::{Method, StatusCode};
use envelope::{Role, Status};
use orchestrator::api::auth::ApiRole;
use orchestrator::state::TaskState;
use orchestrator::tasks::Applied;
use serde_json::{Value, json};
use support::App;

/// Submits a task of `risk` as `token` and drives it through Dev, QA and Review.
async fn awaiting_approval(app: &App, token: &str, risk: &str) -> String {
    let body = json!({"title": "Rotate the signing key", "instructions": "Replace keys.rs", "risk": risk});
    let created = app.call(Method::POST, "/v1/tasks", token, Some(&body)).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    for (role, to) in
        [(Role::Dev, TaskState::Qa), (Role::Qa, TaskState::Review), (Role::Review, TaskState::AwaitingApproval)]
    {
        assert_eq!(app.step(role, Status::Success, "done", &[]).await, Applied::Moved(to));
    }
    created.json()["id"].as_str().unwrap().to_owned()
}

async fn refusals(app: &App, id: &str) -> Vec<(String, String, Value)> {
    sqlx::query_as(
        "SELECT actor_role, actor_instance, details FROM audit_trail WHERE action = 'task.approve.refused' AND task_id = $1::uuid ORDER BY seq",
    )
    .bind(id)
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

async fn approvals(app: &App, id: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT decided_by FROM approvals WHERE task_id = $1::uuid ORDER BY decided_at")
        .bind(id)
        .fetch_all(&app.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_submitter_of_a_high_or_critical_task_cannot_approve_it_a_second_operator_can() {
    let app = support::app(|_| {}).await;
    let olga = app.token(ApiRole::Operator, "olga");
    // An admin is no exception, and the name's case does not make another person.
    let olga_admin = app.token(ApiRole::Admin, "OLGA");
    let oscar = app.token(ApiRole::Operator, "oscar");

    for risk in ["HIGH", "CRITICAL"] {
        let id = awaiting_approval(&app, &olga, risk).await;
        let uri = format!("/v1/tasks/{id}/approve");
        let own = app.call(Method::POST, &uri, &olga, Some(&json!({"reason": "lgtm"}))).await;
        assert_eq!(own.status, StatusCode::FORBIDDEN, "{}", own.text);
        assert_eq!(
            own.json(),
            json!({"error": format!(
                "\"olga\" submitted task {id} ({risk} risk) and cannot also approve it: a HIGH or CRITICAL change \
                 needs a second person; ask another operator to approve it"
            )})
        );
        let as_admin = app.call(Method::POST, &uri, &olga_admin, None).await;
        assert_eq!(as_admin.status, StatusCode::FORBIDDEN, "{}", as_admin.text);

        // Refused, audited, and nothing else changed.
        let task = app.call(Method::GET, &format!("/v1/tasks/{id}"), &oscar, None).await;
        assert_eq!(task.json()["state"], "awaiting_approval");
        assert!(approvals(&app, &id).await.is_empty());
        let details = json!({"rule": "four_eyes", "risk": risk, "submitted_by": "olga"});
        assert_eq!(
            refusals(&app, &id).await,
            vec![
                ("operator".into(), "olga".into(), details.clone()),
                ("operator".into(), "OLGA".into(), details.clone())
            ]
        );

        let reason = "read the diff; the key was postgres://app:hunter2@db/app";
        let other = app.call(Method::POST, &uri, &oscar, Some(&json!({"reason": reason}))).await;
        assert_eq!(other.status, StatusCode::OK, "{}", other.text);
        assert_eq!(other.json()["state"], "approved");
        assert_eq!(approvals(&app, &id).await, vec!["oscar".to_owned()]);
        let kept: String = sqlx::query_scalar("SELECT reason FROM approvals WHERE task_id = $1::uuid")
            .bind(&id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
        assert_eq!(kept, "read the diff; the key was postgres://app:**REDACTED**@db/app", "reasons are kept redacted");
    }
    let report = orchestrator::audit::verify(&app.pool, &orchestrator::audit::AuditKey::new(vec![7; 32]).unwrap())
        .await
        .unwrap();
    assert!(report.broken_row.is_none(), "the refusals are part of an intact chain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_four_eyes_off_the_submitter_may_approve() {
    let app = support::app(|c| c.four_eyes = false).await;
    let olga = app.token(ApiRole::Operator, "olga");
    let id = awaiting_approval(&app, &olga, "HIGH").await;
    let own = app.call(Method::POST, &format!("/v1/tasks/{id}/approve"), &olga, None).await;
    assert_eq!(own.status, StatusCode::OK, "{}", own.text);
    assert_eq!(own.json()["state"], "approved");
    assert_eq!(approvals(&app, &id).await, vec!["olga".to_owned()]);
    assert!(refusals(&app, &id).await.is_empty());
}
