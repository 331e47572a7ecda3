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
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::ApiState;
use super::auth::{AtLeastAdmin, AtLeastOperator, AtLeastViewer, Authorized, Caller};
use super::error::{ApiError, ApiJson, Described, OptionalJson};
use crate::state::TaskState;
use crate::tasks::incidents::{Incident, MAX_RESOLUTION, NewIncident};
use crate::tasks::{Actor, NewTask, Question, Task};

/// Most tasks one list returns.
const MAX_LIST: i64 = 1000;
/// Tasks a list returns without `limit`.
const DEFAULT_LIST: i64 = 100;
/// Longest reason for a kill, an approval, a cancellation or a retry, in characters.
const MAX_REASON: usize = 1000;
/// Longest answer to a worker's question, in characters.
const MAX_ANSWER: usize = 4000;
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

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ErrorBody {
    /// What is wrong and what to do (redacted).
    error: String,
}

/// `GET /v1/tasks`'s answer.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct TaskList {
    /// Newest first.
    tasks: Vec<Task>,
}

/// `GET /v1/questions`'s answer.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct QuestionList {
    /// Oldest first.
    questions: Vec<Question>,
}

/// The kill switch's state after `POST /v1/kill` or `POST /v1/resume`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct FleetSwitch {
    /// The kill epoch: envelopes of an older epoch are refused.
    kill_epoch: u64,
    /// Whether the fleet is halted.
    halted: bool,
}

/// `/healthz` and `/readyz`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Health {
    /// `ok` (healthz) or `ready` (readyz).
    status: String,
}

/// Trims an optional free-text field; `None` when empty; 422 when it is longer than
/// `max` characters or holds a NUL (Postgres cannot store it).
fn optional_text(field: &str, text: Option<String>, max: usize) -> Result<Option<String>, ApiError> {
    let text = text.map(|r| r.trim().to_owned()).filter(|r| !r.is_empty());
    if let Some(t) = &text {
        if t.chars().count() > max {
            return Err(ApiError::Unprocessable(format!("`{field}` must be at most {max} characters")));
        }
        if t.contains('\0') {
            return Err(ApiError::Unprocessable(format!("`{field}` must not contain NUL characters")));
        }
    }
    Ok(text)
}

/// `POST /v1/tasks`: operator; rate-limited per client. 201 with the task.
#[utoipa::path(post, path = "/v1/tasks", tag = "tasks",
    request_body = NewTask,
    responses(
        (status = 201, description = "Accepted and assigned to Dev", body = Task,
            headers(("location" = String, description = "The task's URL"))),
        (status = 400, description = "Not JSON", body = ErrorBody),
        (status = 401, description = "No or a refused token", body = ErrorBody),
        (status = 403, description = "A viewer token", body = ErrorBody),
        (status = 409, description = "The fleet is halted", body = ErrorBody),
        (status = 413, description = "Body over max_body_bytes", body = ErrorBody),
        (status = 415, description = "Not sent as application/json", body = ErrorBody),
        (status = 422, description = "Wrong fields or values", body = ErrorBody),
        (status = 429, description = "Intake rate limit", body = ErrorBody,
            headers(("retry-after" = u64, description = "Seconds until a submission is accepted again"))),
        (status = 503, description = "The rate limiter's Redis is down", body = ErrorBody),
    ),
    security(("bearer" = [])))]
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
#[utoipa::path(get, path = "/v1/tasks/{id}", tag = "tasks",
    params(("id" = Uuid, Path, description = "The task's id")),
    responses(
        (status = 200, description = "The task", body = Task),
        (status = 400, description = "The id is not a UUID", body = ErrorBody),
        (status = 401, description = "No or a refused token", body = ErrorBody),
        (status = 404, description = "No such task", body = ErrorBody),
    ),
    security(("bearer" = [])))]
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

/// Query of `GET /v1/questions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct QuestionsQuery {
    /// At most this many (1 to 1000; 100 by default).
    #[serde(default)]
    limit: Option<i64>,
}

/// A query string as `T`, or a 400 naming the `parameters`.
fn query<T>(query: Result<Query<T>, QueryRejection>, parameters: &str) -> Result<T, ApiError> {
    query.map(|Query(q)| q).map_err(|e| {
        let text = e.body_text();
        let detail = text.split_once(": ").map_or(text.as_str(), |(_, d)| d);
        ApiError::BadRequest(format!("bad query: {detail}; the parameters are {parameters}"))
    })
}

/// `limit`, defaulted and checked.
fn limit_of(limit: Option<i64>) -> Result<i64, ApiError> {
    let limit = limit.unwrap_or(DEFAULT_LIST);
    if !(1..=MAX_LIST).contains(&limit) {
        return Err(ApiError::BadRequest(format!("`limit` must be between 1 and {MAX_LIST}, not {limit}")));
    }
    Ok(limit)
}

/// `GET /v1/tasks?state=&limit=`: viewer. `{"tasks": [...]}`, newest first.
#[utoipa::path(get, path = "/v1/tasks", tag = "tasks",
    params(
        ("state" = Option<TaskState>, Query, description = "Only tasks in this state"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 1000, description = "At most this many (100 by default)"),
    ),
    responses(
        (status = 200, description = "Tasks, newest first", body = TaskList),
        (status = 400, description = "A bad query parameter", body = ErrorBody),
        (status = 401, description = "No or a refused token", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn list(
    State(state): State<ApiState>,
    _: Authorized<AtLeastViewer>,
    raw: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<TaskList>, ApiError> {
    let query = query(raw, "`state` and `limit`")?;
    let wanted = match query.state.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(s) => Some(s.parse::<TaskState>().map_err(|e| ApiError::BadRequest(e.to_string()))?),
    };
    let limit = limit_of(query.limit)?;
    let tasks: Vec<Task> = state.engine.list(wanted, limit).await?.into_iter().map(shown).collect();
    Ok(Json(TaskList { tasks }))
}

/// `GET /v1/questions?limit=`: viewer. `{"questions": [...]}`: the questions workers asked
/// that nobody has answered, oldest first.
#[utoipa::path(get, path = "/v1/questions", tag = "questions",
    params(
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 1000, description = "At most this many (100 by default)"),
    ),
    responses(
        (status = 200, description = "Open questions, oldest first", body = QuestionList),
        (status = 400, description = "A bad query parameter", body = ErrorBody),
        (status = 401, description = "No or a refused token", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn questions(
    State(state): State<ApiState>,
    _: Authorized<AtLeastViewer>,
    raw: Result<Query<QuestionsQuery>, QueryRejection>,
) -> Result<Json<QuestionList>, ApiError> {
    let limit = limit_of(query(raw, "`limit`")?.limit)?;
    Ok(Json(QuestionList { questions: state.engine.open_questions(limit).await? }))
}

/// Body of `POST /v1/tasks/{id}/approve`, `…/cancel` and `…/retry` (optional).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReasonBody {
    /// Why, for the audit trail (at most 1000 characters; redacted).
    #[serde(default)]
    #[schema(max_length = 1000)]
    reason: Option<String>,
}

impl Described for ReasonBody {
    const WHAT: &'static str = "request body";
}

/// Body of `POST /v1/tasks/{id}/answer`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AnswerBody {
    /// The answer (1 to 4000 characters; redacted). The worker reads it among its findings.
    #[schema(min_length = 1, max_length = 4000)]
    text: String,
}

impl Described for AnswerBody {
    const WHAT: &'static str = "answer";
}

/// Body of `POST /v1/kill`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct KillBody {
    /// Why, for the audit trail and the budget manager (1 to 1000 characters).
    #[schema(min_length = 1, max_length = 1000)]
    reason: String,
}

impl Described for KillBody {
    const WHAT: &'static str = "kill request";
}

/// `POST /v1/tasks/{id}/approve`: operator. 200 with the task; 403 when four eyes refuse
/// the task's own submitter (HIGH and CRITICAL risk).
#[utoipa::path(post, path = "/v1/tasks/{id}/approve", tag = "tasks",
    params(("id" = Uuid, Path, description = "The task's id")),
    request_body(content = Option<ReasonBody>, description = "Optional"),
    responses(
        (status = 200, description = "Approved", body = Task),
        (status = 400, description = "A bad id or body", body = ErrorBody),
        (status = 401, description = "No or a refused token", body = ErrorBody),
        (status = 403, description = "A viewer token, or four eyes refuse the submitter", body = ErrorBody),
        (status = 404, description = "No such task", body = ErrorBody),
        (status = 409, description = "Not awaiting approval, or the fleet is halted", body = ErrorBody),
        (status = 413, description = "Body over max_body_bytes", body = ErrorBody),
        (status = 415, description = "Not sent as application/json", body = ErrorBody),
        (status = 422, description = "Wrong fields or values", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn approve(
    State(state): State<ApiState>,
    Authorized(caller, _): Authorized<AtLeastOperator>,
    TaskId(id): TaskId,
    OptionalJson(body): OptionalJson<ReasonBody>,
) -> Result<Json<Task>, ApiError> {
    let reason = optional_text("reason", body.and_then(|b| b.reason), MAX_REASON)?;
    let task = state.engine.approve(id, &Actor::operator(&caller.sub), reason).await?;
    tracing::info!(task_id = %id, by = %caller.sub, "Task approved.");
    Ok(Json(shown(task)))
}

/// `POST /v1/tasks/{id}/answer`: operator. Answers the task's open question: the step is
/// issued again with the answer among its findings. 200 with the task.
#[utoipa::path(post, path = "/v1/tasks/{id}/answer", tag = "questions",
    params(("id" = Uuid, Path, description = "The task's id")),
    request_body = AnswerBody,
    responses(
        (status = 200, description = "Answered; the step was issued again", body = Task),
        (status = 400, description = "A bad id or body", body = ErrorBody),
        (status = 401, description = "No or a refused token", body = ErrorBody),
        (status = 403, description = "A viewer token", body = ErrorBody),
        (status = 404, description = "No such task", body = ErrorBody),
        (status = 409, description = "No open question, or no step running", body = ErrorBody),
        (status = 413, description = "Body over max_body_bytes", body = ErrorBody),
        (status = 415, description = "Not sent as application/json", body = ErrorBody),
        (status = 422, description = "Wrong fields or values", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn answer(
    State(state): State<ApiState>,
    Authorized(caller, _): Authorized<AtLeastOperator>,
    TaskId(id): TaskId,
    ApiJson(body): ApiJson<AnswerBody>,
) -> Result<Json<Task>, ApiError> {
    let Some(text) = optional_text("text", Some(body.text), MAX_ANSWER)? else {
        return Err(ApiError::Unprocessable(format!("`text` must be 1 to {MAX_ANSWER} characters")));
    };
    let task = state.engine.answer(id, &Actor::operator(&caller.sub), &text).await?;
    tracing::info!(task_id = %id, by = %caller.sub, "Question answered; step issued again.");
    Ok(Json(shown(task)))
}

/// `POST /v1/tasks/{id}/cancel`: operator. Any unfinished task becomes `cancelled`. 200
/// with the task.
#[utoipa::path(post, path = "/v1/tasks/{id}/cancel", tag = "tasks",
    params(("id" = Uuid, Path, description = "The task's id")),
    request_body(content = Option<ReasonBody>, description = "Optional"),
    responses(
        (status = 200, description = "Cancelled", body = Task),
        (status = 400, description = "A bad id or body", body = ErrorBody),
        (status = 401, description = "No or a refused token", body = ErrorBody),
        (status = 403, description = "A viewer token", body = ErrorBody),
        (status = 404, description = "No such task", body = ErrorBody),
        (status = 409, description = "Already merged, failed or cancelled", body = ErrorBody),
        (status = 413, description = "Body over max_body_bytes", body = ErrorBody),
        (status = 415, description = "Not sent as application/json", body = ErrorBody),
        (status = 422, description = "Wrong fields or values", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn cancel(
    State(state): State<ApiState>,
    Authorized(caller, _): Authorized<AtLeastOperator>,
    TaskId(id): TaskId,
    OptionalJson(body): OptionalJson<ReasonBody>,
) -> Result<Json<Task>, ApiError> {
    let reason = optional_text("reason", body.and_then(|b| b.reason), MAX_REASON)?;
    let task = state.engine.cancel(id, &Actor::operator(&caller.sub), reason.as_deref()).await?;
    tracing::info!(task_id = %id, by = %caller.sub, "Task cancelled.");
    Ok(Json(shown(task)))
}

/// `POST /v1/tasks/{id}/retry`: operator. A failed or blocked task goes back to its step
/// with its retries counted afresh. 200 with the task.
#[utoipa::path(post, path = "/v1/tasks/{id}/retry", tag = "tasks",
    params(("id" = Uuid, Path, description = "The task's id")),
    request_body(content = Option<ReasonBody>, description = "Optional"),
    responses(
        (status = 200, description = "Back in its step", body = Task),
        (status = 400, description = "A bad id or body", body = ErrorBody),
        (status = 401, description = "No or a refused token", body = ErrorBody),
        (status = 403, description = "A viewer token", body = ErrorBody),
        (status = 404, description = "No such task", body = ErrorBody),
        (status = 409, description = "Not failed or blocked, or the fleet is halted", body = ErrorBody),
        (status = 413, description = "Body over max_body_bytes", body = ErrorBody),
        (status = 415, description = "Not sent as application/json", body = ErrorBody),
        (status = 422, description = "Wrong fields or values", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn retry(
    State(state): State<ApiState>,
    Authorized(caller, _): Authorized<AtLeastOperator>,
    TaskId(id): TaskId,
    OptionalJson(body): OptionalJson<ReasonBody>,
) -> Result<Json<Task>, ApiError> {
    let reason = optional_text("reason", body.and_then(|b| b.reason), MAX_REASON)?;
    let task = state.engine.retry(id, &Actor::operator(&caller.sub), reason.as_deref()).await?;
    tracing::info!(task_id = %id, by = %caller.sub, state = %task.state, "Task retried.");
    Ok(Json(shown(task)))
}

/// `POST /v1/kill`: admin. Halts the fleet (idempotent). `{"kill_epoch": n, "halted": true}`.
#[utoipa::path(post, path = "/v1/kill", tag = "fleet",
    request_body = KillBody,
    responses(
        (status = 200, description = "Halted", body = FleetSwitch),
        (status = 400, description = "Not JSON", body = ErrorBody),
        (status = 401, description = "No or a refused token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 413, description = "Body over max_body_bytes", body = ErrorBody),
        (status = 415, description = "Not sent as application/json", body = ErrorBody),
        (status = 422, description = "Wrong fields or values", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn kill(
    State(state): State<ApiState>,
    Authorized(caller, _): Authorized<AtLeastAdmin>,
    ApiJson(body): ApiJson<KillBody>,
) -> Result<Json<FleetSwitch>, ApiError> {
    let missing = || {
        ApiError::Unprocessable(format!(
            "`reason` must be 1 to {MAX_REASON} characters: the audit trail records why the fleet was halted"
        ))
    };
    let reason = optional_text("reason", Some(body.reason), MAX_REASON).map_err(|_| missing())?.ok_or_else(missing)?;
    let epoch = state.engine.kill(&Actor::operator(&caller.sub), &reason).await?;
    tracing::warn!(kill_epoch = epoch, by = %caller.sub, "Fleet halted by the kill switch.");
    Ok(Json(FleetSwitch { kill_epoch: epoch, halted: true }))
}

/// `POST /v1/resume`: admin. Resumes the fleet (idempotent). `{"kill_epoch": n, "halted": false}`.
#[utoipa::path(post, path = "/v1/resume", tag = "fleet",
    responses(
        (status = 200, description = "Running", body = FleetSwitch),
        (status = 401, description = "No or a refused token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn resume(
    State(state): State<ApiState>,
    Authorized(caller, _): Authorized<AtLeastAdmin>,
) -> Result<Json<FleetSwitch>, ApiError> {
    let epoch = state.engine.resume(&Actor::operator(&caller.sub)).await?;
    tracing::warn!(kill_epoch = epoch, by = %caller.sub, "Fleet resumed.");
    Ok(Json(FleetSwitch { kill_epoch: epoch, halted: false }))
}

/// `GET /healthz`: the process answers. No token.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "The process answers", body = Health)))]
pub(super) async fn healthz() -> Json<Health> {
    Json(Health { status: "ok".into() })
}

/// `GET /readyz`: Postgres answers `SELECT 1` within 2 s (else 503). No token.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses(
        (status = 200, description = "Postgres answers", body = Health),
        (status = 503, description = "Postgres does not answer", body = ErrorBody),
    ))]
pub(super) async fn readyz(State(state): State<ApiState>) -> Result<Json<Health>, ApiError> {
    let probe = sqlx::query("SELECT 1").execute(state.engine.pool());
    match tokio::time::timeout(READY_TIMEOUT, probe).await {
        Ok(Ok(_)) => Ok(Json(Health { status: "ready".into() })),
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

/// `GET /metrics`: OpenMetrics text. No token (it shows counts, never task contents).
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "OpenMetrics text 1.0.0 (Prometheus scrapes it)", body = String,
        content_type = "application/openmetrics-text")))]
pub(super) async fn metrics(State(state): State<ApiState>) -> impl IntoResponse {
    let body = state.metrics.render(&state.engine).await;
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body)
}

/// `GET /v1/openapi.json`: this API's OpenAPI document (docs/openapi.json). No token: it
/// describes the routes and holds nothing of the fleet.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "health",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json")))]
pub(super) async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], super::openapi::json())
}

/// Anything else: 404 with a JSON error.
pub(super) async fn no_route(method: Method, uri: Uri) -> ApiError {
    let path: String = uri.path().chars().take(100).collect();
    ApiError::NotFound(format!("no route {method} {path}; see docs/operations.md, \"HTTP API\", for the routes"))
}

/// The incident id of the path; anything but a UUID is a 400.
#[derive(Debug)]
pub(super) struct IncidentId(Uuid);

impl<S: Send + Sync> FromRequestParts<S> for IncidentId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::BadRequest(format!("cannot read the incident id in the path: {}", e.body_text())))?;
        Uuid::parse_str(&raw).map(IncidentId).map_err(|_| {
            let shown: String = raw.chars().take(64).collect();
            ApiError::BadRequest(format!(
                "{shown:?} is not an incident id: `fleetctl incident list` shows them (UUIDs)"
            ))
        })
    }
}

impl Described for NewIncident {
    const WHAT: &'static str = "incident";
}

/// `GET /v1/incidents`'s answer.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct IncidentList {
    /// Newest first.
    incidents: Vec<Incident>,
}

/// Query of `GET /v1/incidents`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct IncidentsQuery {
    /// Resolved ones too (`true`); open ones only by default.
    #[serde(default)]
    all: Option<bool>,
    /// At most this many (1 to 1000; 100 by default).
    #[serde(default)]
    limit: Option<i64>,
}

/// Body of `POST /v1/incidents/{id}/resolve`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ResolveBody {
    /// What was found and done (1 to 2000 characters; redacted), for the audit trail.
    #[schema(min_length = 1, max_length = 2000)]
    resolution: String,
}

impl Described for ResolveBody {
    const WHAT: &'static str = "resolution";
}

/// An incident as answers show it: every free text redacted again (the stored one was
/// redacted when written; patterns added since then apply too).
fn shown_incident(mut i: Incident) -> Incident {
    telemetry::redact_string(&mut i.title);
    telemetry::redact_json(&mut i.details);
    if let Some(r) = &mut i.resolution {
        telemetry::redact_string(r);
    }
    i
}

/// `POST /v1/incidents`: operator. Opens an incident; a critical or high one freezes
/// automatic merges (of `repository`, or all). 201 with the incident.
#[utoipa::path(post, path = "/v1/incidents", tag = "incidents",
    request_body = NewIncident,
    responses(
        (status = 201, description = "Opened", body = Incident,
            headers(("location" = String, description = "The incident's URL"))),
        (status = 400, description = "Not JSON", body = ErrorBody),
        (status = 401, description = "No or a refused token", body = ErrorBody),
        (status = 403, description = "A viewer token", body = ErrorBody),
        (status = 404, description = "A named task does not exist", body = ErrorBody),
        (status = 409, description = "A fix task was asked while the fleet is halted", body = ErrorBody),
        (status = 413, description = "Body over max_body_bytes", body = ErrorBody),
        (status = 415, description = "Not sent as application/json", body = ErrorBody),
        (status = 422, description = "Wrong fields or values", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn open_incident(
    State(state): State<ApiState>,
    Authorized(caller, _): Authorized<AtLeastOperator>,
    ApiJson(new): ApiJson<NewIncident>,
) -> Result<impl IntoResponse, ApiError> {
    let incident = state.engine.open_incident(&Actor::operator(&caller.sub), new).await?;
    let location = format!("/v1/incidents/{}", incident.id);
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(shown_incident(incident))))
}

/// `GET /v1/incidents?all=&limit=`: viewer. `{"incidents": [...]}`, newest first.
#[utoipa::path(get, path = "/v1/incidents", tag = "incidents",
    params(
        ("all" = Option<bool>, Query, description = "Resolved ones too (open ones only by default)"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 1000, description = "At most this many (100 by default)"),
    ),
    responses(
        (status = 200, description = "Incidents, newest first", body = IncidentList),
        (status = 400, description = "A bad query parameter", body = ErrorBody),
        (status = 401, description = "No or a refused token", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn incidents(
    State(state): State<ApiState>,
    _: Authorized<AtLeastViewer>,
    raw: Result<Query<IncidentsQuery>, QueryRejection>,
) -> Result<Json<IncidentList>, ApiError> {
    let q = query(raw, "`all` and `limit`")?;
    let limit = limit_of(q.limit)?;
    let incidents = state.engine.incidents(q.all.unwrap_or(false), limit).await?;
    Ok(Json(IncidentList { incidents: incidents.into_iter().map(shown_incident).collect() }))
}

/// `GET /v1/incidents/{id}`: viewer.
#[utoipa::path(get, path = "/v1/incidents/{id}", tag = "incidents",
    params(("id" = Uuid, Path, description = "The incident's id")),
    responses(
        (status = 200, description = "The incident", body = Incident),
        (status = 400, description = "The id is not a UUID", body = ErrorBody),
        (status = 401, description = "No or a refused token", body = ErrorBody),
        (status = 404, description = "No such incident", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn get_incident(
    State(state): State<ApiState>,
    _: Authorized<AtLeastViewer>,
    IncidentId(id): IncidentId,
) -> Result<Json<Incident>, ApiError> {
    Ok(Json(shown_incident(state.engine.incident(id).await?)))
}

/// `POST /v1/incidents/{id}/resolve`: admin. Lifts its freeze; audited. 200 with the
/// incident.
#[utoipa::path(post, path = "/v1/incidents/{id}/resolve", tag = "incidents",
    params(("id" = Uuid, Path, description = "The incident's id")),
    request_body = ResolveBody,
    responses(
        (status = 200, description = "Resolved", body = Incident),
        (status = 400, description = "A bad id or body", body = ErrorBody),
        (status = 401, description = "No or a refused token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 404, description = "No such incident", body = ErrorBody),
        (status = 409, description = "Already resolved", body = ErrorBody),
        (status = 413, description = "Body over max_body_bytes", body = ErrorBody),
        (status = 415, description = "Not sent as application/json", body = ErrorBody),
        (status = 422, description = "Wrong fields or values", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn resolve_incident(
    State(state): State<ApiState>,
    Authorized(caller, _): Authorized<AtLeastAdmin>,
    IncidentId(id): IncidentId,
    ApiJson(body): ApiJson<ResolveBody>,
) -> Result<Json<Incident>, ApiError> {
    let missing = || {
        ApiError::Unprocessable(format!(
            "`resolution` must be 1 to {MAX_RESOLUTION} characters: the audit trail records what was done"
        ))
    };
    let text = optional_text("resolution", Some(body.resolution), MAX_RESOLUTION)
        .map_err(|_| missing())?
        .ok_or_else(missing)?;
    let incident = state.engine.resolve_incident(id, &Actor::operator(&caller.sub), &text).await?;
    Ok(Json(shown_incident(incident)))
}
