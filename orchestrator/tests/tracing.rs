//! A task is one trace: `POST /v1/tasks` continues the request's `traceparent` header (or
//! starts a trace when there is none, or an invalid one), stores the task's root context,
//! and the first assignment and its outbox row carry a context of that trace.

#![allow(clippy::unwrap_used)]

mod support;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use envelope::Role;
use orchestrator::api::auth::ApiRole;
use serde_json::json;
use support::App;
use tower::ServiceExt;
use uuid::Uuid;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER: &str = "00f067aa0ba902b7";

/// Spans with OpenTelemetry ids, for this test process.
fn traced() {
    let provider = telemetry::OtelConfig::local("orchestrator").tracer_provider().unwrap();
    let subscriber = telemetry::traced_subscriber(
        false,
        tracing_subscriber::EnvFilter::new("info"),
        std::io::sink,
        Some(Box::leak(Box::new(provider))),
    );
    // Several tests of this binary may share a process (`cargo test`): the first one wins.
    let _ = tracing::subscriber::set_global_default(subscriber);
}

/// Submits a task with `traceparent` (if any); returns the task's stored traceparent,
/// its first assignment's and its outbox row's.
async fn submit(app: &App, traceparent: Option<&str>) -> (String, String, String) {
    let body = json!({"title": "Fix add()", "instructions": "Fix calc.py"});
    let mut req = Request::builder()
        .method(Method::POST)
        .uri("/v1/tasks")
        .header(header::AUTHORIZATION, format!("Bearer {}", app.token(ApiRole::Operator, "alice")))
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(tp) = traceparent {
        req = req.header("traceparent", tp);
    }
    let resp = app.router.clone().oneshot(req.body(Body::from(body.to_string())).unwrap()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
    let id: Uuid =
        serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()["id"].as_str().unwrap().parse().unwrap();
    let task: Option<String> =
        sqlx::query_scalar("SELECT traceparent FROM tasks WHERE id = $1").bind(id).fetch_one(&app.pool).await.unwrap();
    let row: Option<String> =
        sqlx::query_scalar("SELECT traceparent FROM outbox WHERE task_id = $1 ORDER BY id DESC LIMIT 1")
            .bind(id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    let assign = app.last_assignment(Role::Dev).await;
    assert_eq!(assign.task_id, Some(id));
    (task.unwrap(), assign.traceparent.clone().unwrap(), row.unwrap())
}

fn trace_of(tp: &str) -> &str {
    assert!(telemetry::propagate::parse(tp).is_some(), "not a valid traceparent: {tp}");
    &tp[3..35]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intake_continues_the_traceparent_header_and_the_assignment_carries_the_trace() {
    traced();
    let app = support::app(|_| {}).await;
    let (task, assign, row) = submit(&app, Some(&format!("00-{TRACE}-{CALLER}-01"))).await;
    assert_eq!(trace_of(&task), TRACE);
    assert_ne!(&task[36..52], CALLER, "the task's root is a span of its own, under the caller's");
    assert_eq!(trace_of(&assign), TRACE);
    assert_eq!(assign, row, "the outbox row keeps the envelope's traceparent");

    // No header, or one that is not a traceparent: a trace of the task's own.
    for header in
        [None, Some("00-zz-not-a-trace-parent"), Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01")]
    {
        let (task, assign, _) = submit(&app, header).await;
        assert_ne!(trace_of(&task), TRACE, "{header:?}");
        assert_eq!(trace_of(&assign), trace_of(&task), "{header:?}");
    }
}
