//! One function per route. Extractors run in argument order: the token (and role) is
//! checked first, then path and query, then the body, so an anonymous request learns
//! nothing about its body's problems.

use std::time::Duration;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::ApiState;
use super::auth::{AtLeastAdmin, AtLeastOperator, AtLeastViewer, Authorized, Caller};
use super::error::{ApiError, ApiJson, Described, OptionalJson};
use crate::state::TaskState;
use crate::tasks::{Actor, NewTask, Task};

/// Most tasks one list returns.
const MAX_LIST: i64 = 1000;
/// Tasks a list returns without `limit`.
const DEFAULT_LIST: i64 = 100;
/// Longest reason for a kill or an approval, in characters.
const MAX_REASON: usize = 1000;
/// How long `/readyz` waits for Postgres.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// An operator (or admin) whose token passed and whose intake bucket had a token.
#[derive(Debug)]
pub(super) struct Intake(Caller);

impl FromRequestParts<ApiState> for Intake {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, Self::Rejection> {
        let Authorized(caller, _) = Authorized::<AtLeastOperator>::from_request_parts(parts, state).await?;
        state.limiter.admit(&caller.sub).await?;
        Ok(Intake(caller))
    }
}

/// The task id of the path; anything but a UUID is a 400.
#[derive(Debug)]
pub(super) struct TaskId(Uuid);

impl<S: Send + Sync> FromRequestParts<S> for TaskId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::BadRequest(format!("cannot read the task id in the path: {}", e.body_text())))?;
        Uuid::parse_str(&raw).map(TaskId).map_err(|_| {
            let shown: String = raw.chars().take(64).collect();
            ApiError::BadRequest(format!(
                "{shown:?} is not a task id: task ids are UUIDs such as 0190a5e2-7c1d-7b3e-9f00-1a2b3c4d5e6f"
            ))
        })
    }
}

/// A task as answers show it: its title and every string of its submission redacted
/// ([`telemetry::redact`]), since a submission may quote a credential (a URL with a
/// password, a token in the instructions). The stored task keeps what was sent.
fn shown(mut task: Task) -> Task {
    telemetry::redact_string(&mut task.title);
    telemetry::redact_json(&mut task.spec);
    task
}

/// `POST /v1/tasks`: operator; rate-limited per client. 201 with the task.
pub(super) async fn submit(
    State(state): State<ApiState>,
    Intake(caller): Intake,
    headers: axum::http::HeaderMap,
    ApiJson(new): ApiJson<NewTask>,
) -> Result<impl IntoResponse, ApiError> {
    // The submitter's W3C trace context, if any: the task's trace continues it.
    let traceparent = headers.get("traceparent").and_then(|v| v.to_str().ok());
    let task = state.engine.submit_traced(&Actor::operator(&caller.sub), new, traceparent).await?;
    tracing::info!(task_id = %task.id, by = %caller.sub, "Task submitted.");
    let location = format!("/v1/tasks/{}", task.id);
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(shown(task))))
}

/// `GET /v1/tasks/{id}`: viewer.
pub(super) async fn get_task(
    State(state): State<ApiState>,
    _: Authorized<AtLeastViewer>,
    TaskId(id): TaskId,
) -> Result<Json<Task>, ApiError> {
    Ok(Json(shown(state.engine.get(id).await?)))
}

/// Query of `GET /v1/tasks`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    /// Only tasks in this state (empty means all).
    #[serde(default)]
    state: Option<String>,
    /// At most this many (1 to 1000; 100 by default).
    #[serde(default)]
    limit: Option<i64>,
}

/// `GET /v1/tasks?state=&limit=`: viewer. `{"tasks": [...]}`, newest first.
pub(super) async fn list(
    State(state): State<ApiState>,
    _: Authorized<AtLeastViewer>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|e| {
        let text = e.body_text();
        let detail = text.split_once(": ").map_or(text.as_str(), |(_, d)| d);
        ApiError::BadRequest(format!("bad query: {detail}; the parameters are `state` and `limit`"))
    })?;
    let wanted = match query.state.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(s) => Some(s.parse::<TaskState>().map_err(|e| ApiError::BadRequest(e.to_string()))?),
    };
    let limit = query.limit.unwrap_or(DEFAULT_LIST);
    if !(1..=MAX_LIST).contains(&limit) {
        return Err(ApiError::BadRequest(format!("`limit` must be between 1 and {MAX_LIST}, not {limit}")));
    }
    let tasks: Vec<Task> = state.engine.list(wanted, limit).await?.into_iter().map(shown).collect();
    Ok(Json(json!({ "tasks": tasks })))
}

/// Body of `POST /v1/tasks/{id}/approve` (optional).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ApproveBody {
    /// Why, for the audit trail.
    #[serde(default)]
    reason: Option<String>,
}

impl Described for ApproveBody {
    const WHAT: &'static str = "approval";
}

/// `POST /v1/tasks/{id}/approve`: operator. 200 with the task; 403 when four eyes refuse
/// the task's own submitter (HIGH and CRITICAL risk).
pub(super) async fn approve(
    State(state): State<ApiState>,
    Authorized(caller, _): Authorized<AtLeastOperator>,
    TaskId(id): TaskId,
    OptionalJson(body): OptionalJson<ApproveBody>,
) -> Result<Json<Task>, ApiError> {
    let reason = body.and_then(|b| b.reason).map(|r| r.trim().to_owned()).filter(|r| !r.is_empty());
    if reason.as_ref().is_some_and(|r| r.chars().count() > MAX_REASON) {
        return Err(ApiError::Unprocessable(format!("`reason` must be at most {MAX_REASON} characters")));
    }
    let task = state.engine.approve(id, &Actor::operator(&caller.sub), reason).await?;
    tracing::info!(task_id = %id, by = %caller.sub, "Task approved.");
    Ok(Json(shown(task)))
}

/// Body of `POST /v1/kill`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct KillBody {
    /// Why, for the audit trail and the budget manager.
    reason: String,
}

impl Described for KillBody {
    const WHAT: &'static str = "kill request";
}

/// `POST /v1/kill`: admin. Halts the fleet (idempotent). `{"kill_epoch": n, "halted": true}`.
pub(super) async fn kill(
    State(state): State<ApiState>,
    Authorized(caller, _): Authorized<AtLeastAdmin>,
    ApiJson(body): ApiJson<KillBody>,
) -> Result<Json<Value>, ApiError> {
    let reason = body.reason.trim();
    if reason.is_empty() || reason.chars().count() > MAX_REASON {
        return Err(ApiError::Unprocessable(format!(
            "`reason` must be 1 to {MAX_REASON} characters: the audit trail records why the fleet was halted"
        )));
    }
    let epoch = state.engine.kill(&Actor::operator(&caller.sub), reason).await?;
    tracing::warn!(kill_epoch = epoch, by = %caller.sub, "Fleet halted by the kill switch.");
    Ok(Json(json!({"kill_epoch": epoch, "halted": true})))
}

/// `POST /v1/resume`: admin. Resumes the fleet (idempotent). `{"kill_epoch": n, "halted": false}`.
pub(super) async fn resume(
    State(state): State<ApiState>,
    Authorized(caller, _): Authorized<AtLeastAdmin>,
) -> Result<Json<Value>, ApiError> {
    let epoch = state.engine.resume(&Actor::operator(&caller.sub)).await?;
    tracing::warn!(kill_epoch = epoch, by = %caller.sub, "Fleet resumed.");
    Ok(Json(json!({"kill_epoch": epoch, "halted": false})))
}

/// `GET /healthz`: the process answers. No token.
pub(super) async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /readyz`: Postgres answers `SELECT 1` within 2 s (else 503). No token.
pub(super) async fn readyz(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let probe = sqlx::query("SELECT 1").execute(state.engine.pool());
    match tokio::time::timeout(READY_TIMEOUT, probe).await {
        Ok(Ok(_)) => Ok(Json(json!({"status": "ready"}))),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "Not ready: Postgres refused the probe.");
            Err(ApiError::Unavailable("not ready: cannot reach Postgres".into()))
        }
        Err(_) => {
            tracing::warn!("Not ready: Postgres did not answer the probe within 2 s.");
            Err(ApiError::Unavailable("not ready: Postgres did not answer within 2 s".into()))
        }
    }
}

/// `GET /metrics`: Prometheus text. No token (it shows counts, never task contents).
pub(super) async fn metrics(State(state): State<ApiState>) -> impl IntoResponse {
    let body = state.metrics.render(&state.engine).await;
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body)
}

/// Anything else: 404 with a JSON error.
pub(super) async fn no_route(method: Method, uri: Uri) -> ApiError {
    let path: String = uri.path().chars().take(100).collect();
    ApiError::NotFound(format!("no route {method} {path}; see docs/operations.md, \"HTTP API\", for the routes"))
}
