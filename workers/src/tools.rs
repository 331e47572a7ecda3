//! The worker's side of the tool proxy: a worker holds no model key and no git credential,
//! so it *asks* the orchestrator to act for it.
//!
//! A request is a `tool.request` on `fleet:tool:requests`, from this role to the
//! orchestrator, carrying the task id, `causation_id` = the assignment's envelope id, the
//! assignment's capability lease, and `ToolRequest { request_id, action, input }`. The answer
//! is a `tool.response` on this process's own stream `fleet:tool:responses:<role>:<instance>`
//! with the same `request_id`. One background reader per process follows that stream with
//! plain `XREAD BLOCK` (no group: nobody else reads it), verifies every entry and hands each
//! answer to the request waiting for it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus::{KillEpoch, Publisher, now_ms, reply};
use envelope::{
    Envelope, MemoryReplayGuard, Payload, Role, Sender, StreamName, ToolRequest, ToolResponse, Verifier, VerifyContext,
    streams,
};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// What a tool call is made for: the task and the assignment that granted the lease.
#[derive(Debug, Clone)]
pub struct CallContext {
    /// The task.
    pub task_id: Uuid,
    /// The `task.assign` envelope's id; the orchestrator matches the lease to it.
    pub assignment_id: Uuid,
    /// The capability lease of the assignment (a JWT), presented with every request.
    pub lease: Option<String>,
}

/// The task's risk level as its lease states it (`low`, `medium`, `high`, `critical`), to
/// pick the sandbox runtime. The lease arrived in a verified `task.assign`, so its claims
/// are the orchestrator's; the worker cannot check the lease's own signature (it has no
/// lease secret) and needs not, since it only ever makes the sandbox stricter by them.
pub fn lease_risk(lease: &str) -> Option<String> {
    use base64::Engine as _;
    let payload = lease.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some(claims.get("risk")?.as_str()?.to_ascii_lowercase())
}

/// Why a tool call gave no result.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The request could not be published.
    #[error("cannot send the tool request: {0}")]
    Publish(#[from] bus::BusError),
    /// No answer in time.
    #[error("no answer to the {action} request within {} s", .after.as_secs())]
    Timeout { action: String, after: Duration },
    /// The proxy refused or failed the action (`ok = false`).
    #[error("the tool proxy refused {action}: {code}: {message}")]
    Refused { action: String, code: String, message: String },
    /// The answer did not parse.
    #[error("unreadable answer to {action}: {detail}")]
    BadAnswer { action: String, detail: String },
    /// The process is shutting down.
    #[error("shutting down")]
    Shutdown,
}

/// `llm.complete` input (the contract is in `docs/tool-proxy.md`).
#[derive(Debug, Clone, Serialize)]
pub struct CompletionRequest {
    /// The system prompt.
    pub system: String,
    /// The conversation, oldest first.
    pub messages: Vec<ChatMessage>,
    /// Longest answer, in tokens.
    pub max_tokens: u32,
    /// The tools offered (name, description, JSON-schema parameters); none: plain text.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<serde_json::Value>,
    /// A hash of the system prompt and the tool schemas, recorded in the call's audit row.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_version: Option<String>,
}

/// One message of the conversation.
#[derive(Debug, Clone, Serialize)]
pub struct ChatMessage {
    /// `user`, `assistant` or `tool`.
    pub role: String,
    /// The text (a tool result's text for `tool`).
    pub content: String,
    /// The tool calls of an assistant message.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ModelToolCall>,
    /// The call a `tool` message answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// Whether a `tool` message reports a failure or a refusal.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub is_error: bool,
}

impl ChatMessage {
    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: "user".into(),
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
            is_error: false,
        }
    }
    /// The model's earlier answer.
    pub fn assistant(content: impl Into<String>, tool_calls: Vec<ModelToolCall>) -> Self {
        Self { role: "assistant".into(), content: content.into(), tool_calls, tool_call_id: None, is_error: false }
    }
    /// The result of tool call `id`.
    pub fn tool(id: impl Into<String>, content: impl Into<String>, is_error: bool) -> Self {
        Self {
            role: "tool".into(),
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: Some(id.into()),
            is_error,
        }
    }
}

/// A tool call the model made.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelToolCall {
    /// The provider's id of the call, echoed in the result.
    pub id: String,
    /// The tool's name, as the model wrote it.
    pub name: String,
    /// The arguments (a JSON string when the model's were not JSON).
    #[serde(default)]
    pub arguments: serde_json::Value,
}

/// `llm.complete` output.
#[derive(Debug, Clone, Deserialize)]
pub struct Completion {
    /// The model's answer.
    pub text: String,
    /// The tools the model called.
    #[serde(default)]
    pub tool_calls: Vec<ModelToolCall>,
    /// Why the model stopped, as the provider said.
    #[serde(default)]
    pub finish_reason: Option<String>,
    /// The model that answered.
    #[serde(default)]
    pub model: String,
    /// Prompt tokens billed.
    #[serde(default)]
    pub input_tokens: u64,
    /// Answer tokens billed.
    #[serde(default)]
    pub output_tokens: u64,
}

#[derive(Debug, Deserialize)]
struct Refusal {
    #[serde(default)]
    error: String,
    #[serde(default)]
    message: String,
}

type Waiters = Mutex<HashMap<Uuid, oneshot::Sender<ToolResponse>>>;

/// Sends tool requests and waits for their answers. Cheap to clone.
#[derive(Clone)]
pub struct ToolClient {
    inner: Arc<Inner>,
}

struct Inner {
    publisher: Arc<Publisher>,
    from: Sender,
    epoch: KillEpoch,
    timeout: Duration,
    waiting: Waiters,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for ToolClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToolClient").field("from", &self.inner.from).field("timeout", &self.inner.timeout).finish()
    }
}

/// Removes a waiter when its request ends, however it ends.
struct Waiting<'a>(&'a Waiters, Uuid);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Ok(mut w) = self.0.lock() {
            w.remove(&self.1);
        }
    }
}

impl ToolClient {
    /// Starts the response reader for `from` (this process's role and instance) and returns the client. The reader
    /// starts after the stream's last entry as of now (older answers belong to an earlier
    /// process of this instance, whose requests are gone) and runs until `shutdown`.
    pub async fn start(
        pool: bus::RedisPool,
        publisher: Arc<Publisher>,
        verifier: Arc<Verifier>,
        from: Sender,
        epoch: KillEpoch,
        timeout: Duration,
        shutdown: CancellationToken,
    ) -> Result<Self, bus::BusError> {
        let stream = StreamName::tool_responses(from.role, &from.instance);
        let cursor = {
            let mut c = pool.get().await?;
            bus::control::last_id(&mut c, stream.as_str()).await?
        };
        let inner = Arc::new(Inner {
            publisher,
            from,
            epoch: epoch.clone(),
            timeout,
            waiting: Mutex::new(HashMap::new()),
            shutdown: shutdown.clone(),
        });
        let reader = Reader { pool, verifier, stream, epoch, inner: Arc::clone(&inner) };
        tokio::spawn(reader.run(cursor, shutdown));
        Ok(Self { inner })
    }

    /// Calls `action` with `input` (JSON) and returns the proxy's output (JSON text) when it
    /// succeeded.
    pub async fn call(&self, ctx: &CallContext, action: &str, input: &serde_json::Value) -> Result<String, ToolError> {
        let span = tracing::info_span!(
            "tool.request",
            otel.kind = "client",
            task_id = %ctx.task_id,
            action,
        );
        tracing::Instrument::instrument(self.call_in_span(ctx, action, input), span).await
    }

    async fn call_in_span(
        &self,
        ctx: &CallContext,
        action: &str,
        input: &serde_json::Value,
    ) -> Result<String, ToolError> {
        let request_id = Uuid::now_v7();
        let (tx, rx) = oneshot::channel();
        self.inner.waiting.lock().map_err(|_| ToolError::Shutdown)?.insert(request_id, tx);
        let _guard = Waiting(&self.inner.waiting, request_id);
        let payload = ToolRequest { request_id, action: action.to_owned(), input: input.to_string() };
        let ttl = self.inner.timeout.as_millis() as u64 + 30_000;
        let mut env = Envelope::new(
            self.inner.from.clone(),
            Role::Orchestrator,
            now_ms(),
            ttl,
            self.inner.epoch.get(),
            Payload::ToolRequest(payload),
        );
        env.task_id = Some(ctx.task_id);
        env.causation_id = Some(ctx.assignment_id);
        env.lease.clone_from(&ctx.lease);
        let stream = StreamName::parse(streams::TOOL_REQUESTS).expect("fleet stream names are valid");
        self.inner.publisher.publish(&stream, &env).await?;
        tracing::debug!(task = %ctx.task_id, action, request = %request_id, "Tool request sent.");
        let answer = tokio::select! {
            r = tokio::time::timeout(self.inner.timeout, rx) => match r {
                Ok(Ok(answer)) => answer,
                Ok(Err(_)) => return Err(ToolError::Shutdown),
                Err(_) => return Err(ToolError::Timeout { action: action.to_owned(), after: self.inner.timeout }),
            },
            () = self.inner.shutdown.cancelled() => return Err(ToolError::Shutdown),
        };
        if answer.ok {
            return Ok(answer.output);
        }
        let refusal: Refusal = serde_json::from_str(&answer.output)
            .unwrap_or(Refusal { error: "unknown".into(), message: answer.output.chars().take(500).collect() });
        Err(ToolError::Refused { action: action.to_owned(), code: refusal.error, message: refusal.message })
    }

    /// `llm.complete`: one completion from the model the orchestrator's policy chooses.
    pub async fn complete(&self, ctx: &CallContext, request: &CompletionRequest) -> Result<Completion, ToolError> {
        let input = serde_json::to_value(request)
            .map_err(|e| ToolError::BadAnswer { action: "llm.complete".into(), detail: e.to_string() })?;
        let output = self.call(ctx, "llm.complete", &input).await?;
        serde_json::from_str(&output)
            .map_err(|e| ToolError::BadAnswer { action: "llm.complete".into(), detail: e.to_string() })
    }
}

struct Reader {
    pool: bus::RedisPool,
    verifier: Arc<Verifier>,
    stream: StreamName,
    epoch: KillEpoch,
    inner: Arc<Inner>,
}

impl Reader {
    async fn run(self, mut cursor: String, shutdown: CancellationToken) {
        let mut guard = MemoryReplayGuard::new();
        let mut delays = bus::reconnect_delays();
        while !shutdown.is_cancelled() {
            match self.follow(&mut cursor, &mut guard, &shutdown).await {
                Ok(()) => return,
                Err(e) => {
                    let delay = delays.next().unwrap_or(Duration::from_secs(5));
                    tracing::warn!(stream = %self.stream, error = %e, retry_in_ms = delay.as_millis() as u64, "Tool response reader lost Redis; reconnecting.");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = shutdown.cancelled() => return,
                    }
                }
            }
        }
    }

    async fn follow(
        &self,
        cursor: &mut String,
        guard: &mut MemoryReplayGuard,
        shutdown: &CancellationToken,
    ) -> Result<(), bus::BusError> {
        let mut c = self.pool.dedicated().await?;
        loop {
            let Some(entries) =
                bus::control::read_after(&mut c, self.stream.as_str(), cursor, 64, Duration::from_secs(1), shutdown)
                    .await?
            else {
                return Ok(());
            };
            for e in entries {
                cursor.clone_from(&e.id);
                self.deliver(&e, guard);
            }
        }
    }

    fn deliver(&self, e: &reply::Entry, guard: &mut MemoryReplayGuard) {
        let Some(wire) = e.field(bus::names::ENV_FIELD) else {
            tracing::warn!(stream = %self.stream, entry = %e.id, "Tool response without an envelope; ignored.");
            return;
        };
        let now = now_ms();
        let ctx = VerifyContext { now_ms: now, kill_epoch: self.epoch.get() };
        let verified = match self.verifier.check(self.stream.as_str(), wire, ctx).and_then(|c| c.accept(guard, now)) {
            Ok(v) => v,
            Err(err) => {
                tracing::warn!(stream = %self.stream, entry = %e.id, reason = err.reason(), error = %err, "Tool response refused.");
                return;
            }
        };
        let Payload::ToolResponse(answer) = verified.into_inner().payload else {
            tracing::warn!(stream = %self.stream, entry = %e.id, "Not a tool response; ignored.");
            return;
        };
        let waiter = self.inner.waiting.lock().ok().and_then(|mut w| w.remove(&answer.request_id));
        match waiter {
            Some(tx) => {
                let _ = tx.send(answer);
            }
            None => {
                tracing::info!(request = %answer.request_id, "Tool response for no waiting request (timed out or from before a restart); dropped.");
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use base64::Engine as _;

    fn jwt(claims: &str) -> String {
        let b = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.sig", b(r#"{"alg":"HS256","typ":"JWT"}"#), b(claims))
    }

    #[test]
    fn the_risk_is_read_from_the_lease() {
        assert_eq!(super::lease_risk(&jwt(r#"{"risk":"HIGH","task":"x"}"#)).as_deref(), Some("high"));
        assert_eq!(super::lease_risk(&jwt(r#"{"task":"x"}"#)), None);
        assert_eq!(super::lease_risk("garbage"), None);
        assert_eq!(super::lease_risk("a.!!!.c"), None);
    }
}
