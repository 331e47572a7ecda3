//! [`ApiError`]: every way a request fails, its status code, and its JSON body
//! `{"error": "…"}`; and the JSON extractors whose rejections become such errors instead
//! of axum's plain-text ones.

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::header::{CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::state::{Event, IllegalTransition};
use crate::tasks::EngineError;

/// Why a request failed. The message is for the client: it says what is wrong and what to
/// do, and never holds a secret or an internal cause.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 401: no token, a malformed header, or a refused token.
    #[error("{message}")]
    Unauthenticated {
        /// What is wrong.
        message: String,
        /// The RFC 6750 `error_description` when a token was presented and refused.
        rejection: Option<&'static str>,
    },
    /// 403: the token's role is too low, or four eyes refuse a self-approval.
    #[error("{0}")]
    Forbidden(String),
    /// 400: unparseable JSON, a bad query or path parameter.
    #[error("{0}")]
    BadRequest(String),
    /// 404: no such task or route.
    #[error("{0}")]
    NotFound(String),
    /// 409: the task's state (or the halted fleet) does not allow it.
    #[error("{0}")]
    Conflict(String),
    /// 413: the body is over the limit.
    #[error("{0}")]
    TooLarge(String),
    /// 415: the body is not declared as JSON.
    #[error("{0}")]
    NotJson(String),
    /// 422: well-formed JSON with the wrong fields or values.
    #[error("{0}")]
    Unprocessable(String),
    /// 429: the client's task intake bucket is empty.
    #[error(
        "too many task submissions from {sub:?}: at most {burst} at once, then {per_second} per second; retry in {retry_after_secs} s"
    )]
    RateLimited {
        /// The client.
        sub: String,
        /// Bucket capacity.
        burst: u32,
        /// Refill rate.
        per_second: f64,
        /// Whole seconds until a token is back (rounded up).
        retry_after_secs: u64,
    },
    /// 503: a dependency is down (the rate limiter fails closed).
    #[error("{0}")]
    Unavailable(String),
    /// 500: logged where it happened; the client learns nothing more.
    #[error("internal error; the orchestrator's log has the cause")]
    Internal,
}

impl ApiError {
    /// The status code.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthenticated { .. } => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NotJson(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Maps a rejected JSON body of `what` ("task submission", "kill request").
    pub fn from_json(rejection: &JsonRejection, what: &str) -> Self {
        // axum's text is "<generic sentence>: <serde's detail>"; keep the detail.
        let text = rejection.body_text();
        let detail = text.split_once(": ").map_or(text.as_str(), |(_, d)| d).to_owned();
        match rejection {
            JsonRejection::JsonDataError(_) => ApiError::Unprocessable(format!(
                "the {what} has the wrong fields or values: {detail}; see docs/operations.md, \"HTTP API\""
            )),
            JsonRejection::JsonSyntaxError(_) => {
                ApiError::BadRequest(format!("the {what} is not valid JSON: {detail}"))
            }
            JsonRejection::MissingJsonContentType(_) => {
                ApiError::NotJson(format!("the {what} must be sent with `Content-Type: application/json`"))
            }
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge(format!(
                "the {what} is larger than this API accepts (the orchestrator's max_body_bytes); send a smaller body"
            )),
            _ => ApiError::BadRequest(format!("cannot read the {what}: {detail}")),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(err: EngineError) -> Self {
        match err {
            EngineError::NotFound(id) => ApiError::NotFound(format!("task {id} not found")),
            err @ EngineError::IncidentNotFound(_) => ApiError::NotFound(err.to_string()),
            EngineError::Illegal(t) => ApiError::Conflict(illegal_message(&t)),
            EngineError::Invalid(m) => ApiError::Unprocessable(m),
            EngineError::Halted => ApiError::Conflict(EngineError::Halted.to_string()),
            EngineError::Conflict(m) => ApiError::Conflict(m),
            err @ EngineError::SelfApproval { .. } => ApiError::Forbidden(err.to_string()),
            err @ (EngineError::Db(_) | EngineError::Outbox(_)) => {
                tracing::error!(error = %err, "The engine failed to handle an API request.");
                ApiError::Internal
            }
        }
    }
}

/// "cannot approve a task in state `dev`: …", naming the state and the attempted action.
fn illegal_message(t: &IllegalTransition) -> String {
    let (action, hint) = match t.event {
        Event::Approved => {
            ("approve", "only tasks in `awaiting_approval` (HIGH or CRITICAL risk, after review) wait for approval")
        }
        Event::Rejected => ("reject", "only tasks in `awaiting_approval` can be rejected"),
        Event::Merged => ("mark as merged", "only `approved` tasks can be merged"),
        Event::Halt => ("halt", "finished and already halted tasks stay as they are"),
        Event::Resume => ("resume", "only halted tasks resume"),
        Event::Cancel => ("cancel", "merged, failed and cancelled tasks are final"),
        Event::Reopen => ("retry", "only failed or blocked tasks can be retried"),
        _ => ("change", "the XP cycle does not allow this move"),
    };
    format!("cannot {action} a task in state `{}`: {hint}", t.from)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        // A message may quote what the client sent (a scope entry, a task id): redacted.
        let message = self.to_string();
        let mut response = (status, Json(json!({"error": telemetry::redact(&message)}))).into_response();
        let headers = response.headers_mut();
        match &self {
            ApiError::Unauthenticated { rejection, .. } => {
                let challenge = match rejection {
                    None => "Bearer realm=\"agentfleet\"".to_owned(),
                    Some(why) => {
                        format!("Bearer realm=\"agentfleet\", error=\"invalid_token\", error_description=\"{why}\"")
                    }
                };
                if let Ok(v) = HeaderValue::from_str(&challenge) {
                    headers.insert(WWW_AUTHENTICATE, v);
                }
            }
            ApiError::RateLimited { retry_after_secs, .. } => {
                headers.insert(RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            _ => {}
        }
        response
    }
}

/// A required JSON body; a bad one is an [`ApiError`] that names `T`'s problem.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned + Described, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(ApiError::from_json(&rejection, T::WHAT)),
        }
    }
}

/// An optional JSON body: `None` when the body is empty, whatever its content type.
#[derive(Debug)]
pub struct OptionalJson<T>(pub Option<T>);

impl<T: DeserializeOwned + Described, S: Send + Sync> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let (parts, body) = req.into_parts();
        let req = Request::from_parts(parts.clone(), body);
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|r| ApiError::from_json(&JsonRejection::BytesRejection(r), T::WHAT))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(None));
        }
        let req = Request::from_parts(parts, Body::from(bytes));
        let ApiJson(value) = ApiJson::<T>::from_request(req, state).await?;
        Ok(OptionalJson(Some(value)))
    }
}

/// What a body type is called in error messages.
pub trait Described {
    /// "task submission", "kill request", …
    const WHAT: &'static str;
}

impl Described for crate::tasks::NewTask {
    const WHAT: &'static str = "task submission";
}

/// Gives a JSON body to an error answer that has none (the timeout's 503, axum's 405), so
/// that every error a client sees is `{"error": "…"}`.
pub(crate) async fn json_for_bare_errors(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) || response.headers().contains_key(CONTENT_TYPE) {
        return response;
    }
    let message = match status {
        StatusCode::SERVICE_UNAVAILABLE => {
            "the request took longer than the orchestrator's request_timeout_secs and was cut off; it may or may not have taken \
             effect: check with a GET before retrying"
                .to_owned()
        }
        StatusCode::METHOD_NOT_ALLOWED => {
            "this route does not take that method; see docs/operations.md, \"HTTP API\"".to_owned()
        }
        other => other.canonical_reason().unwrap_or("error").to_lowercase(),
    };
    let (mut parts, _) = response.into_parts();
    parts.headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(json!({"error": message}).to_string()))
}
