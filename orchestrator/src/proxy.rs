//! The tool proxy: workers ask, the orchestrator acts with credentials the workers never
//! hold.
//!
//! Each `tool.request` on `fleet:tool:requests` is checked, in order: its capability lease
//! (signature, expiry), that the lease is for this task, role and the task's *current* step,
//! that the sending instance holds the step (the first to use an assignment binds it;
//! another instance presenting the same lease is refused with `lease_bound_elsewhere`),
//! that the action is granted, and the risk matrix's rule for the action's level. A refusal
//! is answered (`ok = false`, with a code) and audited. An allowed `llm.complete` reserves
//! an upper bound of its tokens (the prompt's bytes, plus `max_tokens`) and their money in
//! the ledger before the call — against the lease's limits and the ledger's, in one
//! script — commits the provider's figures after it, and sends a `usage` envelope to the
//! budget manager; the answer, its audit row and the usage go out in one transaction
//! through the outbox.
//!
//! `llm.complete` carries native tool calling: the input may offer tools and hold the
//! model's earlier tool calls and their results (checked by `CompleteInput::check`: which
//! fields each role may carry, results answering earlier calls, tool names and schemas;
//! anything else is `bad_input`); the output holds the tool calls the model made now and
//! why it stopped. The contract, with examples: docs/tool-proxy.md.
//!
//! Approved tasks are pushed by [`push_loop`] (`git.push_branch`), also under the matrix.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use budget::ledger::{Ledger, MicroUsd, Refusal, ReserveError, TaskCap};
use bus::{Delivery, Handler, HandlerError};
use envelope::{Envelope, Payload, Role, ToolRequest, ToolResponse, Usage, Verified};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::gitops::{self, GitConfig, PushError};
use crate::lease::{LeaseClaims, LeaseKeys};
use crate::providers::{
    AnyProvider, CompletionRequest, MAX_TOOL_NAME_CHARS, Message, MessageRole, Provider, ToolCall, ToolSpec,
    input_token_bound, is_tool_name,
};
use crate::risk::{Decision, RiskMatrix};
use crate::tasks::{Actor, Engine, EngineError, HOLD_ELSEWHERE, HOLD_STALE, Hold};

/// Model choice (`[models]` in the orchestrator's configuration).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The model every role uses unless `per_role` names another.
    pub default: String,
    /// Per role.
    #[serde(default)]
    pub per_role: BTreeMap<Role, String>,
    /// Largest `max_tokens` a worker may ask for.
    #[serde(default = "max_output")]
    pub max_output_tokens: u32,
    /// Attempts per call when the provider answers with a retryable error.
    #[serde(default = "attempts")]
    pub attempts: u32,
}

fn max_output() -> u32 {
    4096
}
fn attempts() -> u32 {
    3
}

impl ModelConfig {
    /// The model `role`'s calls go to.
    pub fn model_for(&self, role: Role) -> &str {
        self.per_role.get(&role).map_or(self.default.as_str(), String::as_str)
    }
}

/// Most tools one `llm.complete` may offer.
pub const MAX_TOOLS: usize = 32;
/// Longest `prompt_version`, in characters.
pub const MAX_PROMPT_VERSION_CHARS: usize = 80;

/// What `llm.complete` takes (the request's `input`, JSON), as sent; [`CompleteInput::check`]
/// makes the provider's request of it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CompleteInput {
    /// The system prompt.
    #[serde(default)]
    system: Option<String>,
    /// The conversation, oldest first.
    messages: Vec<InputMessage>,
    /// The tools the model may call.
    #[serde(default)]
    tools: Vec<InputTool>,
    /// The answer's cap; clamped to `models.max_output_tokens`.
    #[serde(default)]
    max_tokens: Option<u32>,
    /// Which prompt the worker used (its own label, e.g. a hash): recorded in the audit row.
    #[serde(default)]
    prompt_version: Option<String>,
}

/// One message as sent. Which fields a role may carry is checked by [`CompleteInput::check`],
/// so a refusal can say what is wrong.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputMessage {
    role: MessageRole,
    /// Required, except on an assistant message (default empty).
    #[serde(default)]
    content: Option<String>,
    /// Assistant messages only.
    #[serde(default)]
    tool_calls: Option<Vec<InputToolCall>>,
    /// Tool messages only, and required there.
    #[serde(default)]
    tool_call_id: Option<String>,
    /// Tool messages only; default false.
    #[serde(default)]
    is_error: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputToolCall {
    id: String,
    name: String,
    /// Whatever the model gave (normally an object; a string when it was not JSON).
    arguments: Value,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputTool {
    name: String,
    #[serde(default)]
    description: String,
    parameters: Value,
}

/// A checked `llm.complete` input.
#[derive(Debug)]
struct Checked {
    system: Option<String>,
    messages: Vec<Message>,
    tools: Vec<ToolSpec>,
    max_tokens: Option<u32>,
    prompt_version: Option<String>,
}

impl CompleteInput {
    /// The contract of docs/tool-proxy.md: which fields each role may carry, tool results
    /// answering earlier calls, tool names and schemas. The error says what is wrong.
    fn check(self) -> Result<Checked, String> {
        if self.messages.is_empty() {
            return Err("llm.complete needs at least one message".to_owned());
        }
        if let Some(v) = &self.prompt_version
            && v.chars().count() > MAX_PROMPT_VERSION_CHARS
        {
            return Err(format!("prompt_version is longer than {MAX_PROMPT_VERSION_CHARS} characters"));
        }
        if self.tools.len() > MAX_TOOLS {
            return Err(format!("{} tools offered; at most {MAX_TOOLS}", self.tools.len()));
        }
        let mut tools: Vec<ToolSpec> = Vec::with_capacity(self.tools.len());
        for (i, t) in self.tools.into_iter().enumerate() {
            if !is_tool_name(&t.name) {
                return Err(format!(
                    "tools[{i}].name {:?} is not a tool name: 1 to {MAX_TOOL_NAME_CHARS} of a-z, A-Z, 0-9, _ and -",
                    t.name
                ));
            }
            if tools.iter().any(|seen| seen.name == t.name) {
                return Err(format!("tools[{i}].name {:?} is offered twice", t.name));
            }
            if !t.parameters.is_object() {
                return Err(format!("tools[{i}].parameters must be a JSON object (a JSON Schema)"));
            }
            tools.push(ToolSpec { name: t.name, description: t.description, parameters: t.parameters });
        }
        let mut calls_so_far: Vec<String> = Vec::new();
        let mut messages = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.into_iter().enumerate() {
            let at = format!("messages[{i}] ({})", m.role.as_str());
            if m.tool_calls.is_some() && m.role != MessageRole::Assistant {
                return Err(format!("{at}: tool_calls are allowed only on assistant messages"));
            }
            if m.role != MessageRole::Tool {
                if m.tool_call_id.is_some() {
                    return Err(format!("{at}: tool_call_id is allowed only on tool messages"));
                }
                if m.is_error.is_some() {
                    return Err(format!("{at}: is_error is allowed only on tool messages"));
                }
            }
            let message = match m.role {
                MessageRole::User => Message::user(m.content.ok_or_else(|| format!("{at}: content is missing"))?),
                MessageRole::Assistant => {
                    let mut calls = Vec::new();
                    for (j, c) in m.tool_calls.unwrap_or_default().into_iter().enumerate() {
                        if c.id.is_empty() {
                            return Err(format!("{at}: tool_calls[{j}].id is empty"));
                        }
                        calls_so_far.push(c.id.clone());
                        calls.push(ToolCall { id: c.id, name: c.name, arguments: c.arguments });
                    }
                    Message::assistant_calls(m.content.unwrap_or_default(), calls)
                }
                MessageRole::Tool => {
                    let id = m.tool_call_id.ok_or_else(|| format!("{at}: tool_call_id is missing"))?;
                    if !calls_so_far.contains(&id) {
                        return Err(format!(
                            "{at}: tool_call_id {id:?} answers no tool call of an earlier assistant message"
                        ));
                    }
                    let content = m.content.ok_or_else(|| format!("{at}: content is missing"))?;
                    Message::tool_result(id, content, m.is_error.unwrap_or(false))
                }
            };
            messages.push(message);
        }
        Ok(Checked {
            system: self.system,
            messages,
            tools,
            max_tokens: self.max_tokens,
            prompt_version: self.prompt_version,
        })
    }
}

/// A refusal: code for machines, message for people.
#[derive(Debug)]
struct Refused {
    code: &'static str,
    message: String,
}

fn refused(code: &'static str, message: impl Into<String>) -> Refused {
    Refused { code, message: message.into() }
}

struct Inner {
    engine: Engine,
    leases: LeaseKeys,
    matrix: Arc<RiskMatrix>,
    provider: AnyProvider,
    ledger: Ledger,
    models: ModelConfig,
    redis: bus::RedisPool,
}

/// How long a paid answer is kept for a redelivered request (`fleet:budget:calls:<id>`).
const PAID_ANSWER_TTL_SECS: u64 = 3600;

/// A model answer that was paid for: kept so that a redelivered request (its first
/// handling failed after the call) is answered again without calling and paying twice.
#[derive(Debug, serde::Serialize, Deserialize)]
struct PaidAnswer {
    output: String,
    detail: Value,
    usage_role: Role,
    model: String,
    input_tokens: u64,
    output_tokens: u64,
    cost_micro_usd: u64,
}

impl PaidAnswer {
    fn usage(&self) -> Usage {
        Usage {
            role: self.usage_role,
            model: self.model.clone(),
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
            cost_micro_usd: self.cost_micro_usd,
        }
    }
}

fn paid_key(request_id: uuid::Uuid) -> String {
    format!("fleet:budget:calls:{request_id}")
}

/// The `fleet:tool:requests` handler.
#[derive(Clone)]
pub struct ToolProxy(Arc<Inner>);

impl std::fmt::Debug for ToolProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToolProxy").field("models", &self.0.models).finish_non_exhaustive()
    }
}

fn transient(e: impl std::fmt::Display) -> HandlerError {
    HandlerError::Transient(e.to_string())
}

impl ToolProxy {
    /// A proxy acting through `engine`.
    pub fn new(
        engine: Engine,
        leases: LeaseKeys,
        matrix: Arc<RiskMatrix>,
        provider: AnyProvider,
        ledger: Ledger,
        models: ModelConfig,
        redis: bus::RedisPool,
    ) -> Self {
        Self(Arc::new(Inner { engine, leases, matrix, provider, ledger, models, redis }))
    }

    /// The answer already paid for `request_id`, if a first handling got that far.
    async fn paid(&self, request_id: uuid::Uuid) -> Result<Option<PaidAnswer>, HandlerError> {
        let mut c = self.0.redis.get().await.map_err(transient)?;
        let stored: Option<String> =
            redis::cmd("GET").arg(paid_key(request_id)).query_async(&mut c).await.map_err(transient)?;
        Ok(stored.and_then(|s| serde_json::from_str(&s).ok()))
    }

    async fn answer_paid(
        &self,
        env: &Verified<Envelope>,
        req: &ToolRequest,
        paid: PaidAnswer,
    ) -> Result<(), HandlerError> {
        let response = ToolResponse { request_id: req.request_id, ok: true, output: paid.output.clone() };
        self.0
            .engine
            .answer_tool(env, response, "tool.llm.complete", paid.detail.clone(), Some(paid.usage()))
            .await
            .map_err(transient)
    }

    /// The lease and policy checks; the claims when they pass.
    async fn admit(
        &self,
        env: &Verified<Envelope>,
        req: &ToolRequest,
    ) -> Result<Result<LeaseClaims, Refused>, EngineError> {
        let claims = match self.0.leases.check(env.lease.as_deref()) {
            Ok(c) => c,
            Err(e) => return Ok(Err(refused(e.code(), e.to_string()))),
        };
        if Some(claims.task) != env.task_id || env.causation_id != Some(claims.jti) {
            return Ok(Err(refused("wrong_task", "the lease is for another task or step than the request names")));
        }
        if claims.role != env.from.role {
            return Ok(Err(refused("wrong_role", format!("the lease is for {}, not {}", claims.role, env.from.role))));
        }
        let task = self.0.engine.get(claims.task).await?;
        if task.assignment_id != Some(claims.jti) {
            return Ok(Err(refused("lease_stale", "the step this lease was issued for is over")));
        }
        // First use binds the lease to this instance; a peer presenting it is refused.
        match self.0.engine.hold(claims.task, Some(claims.jti), claims.role, env.from.instance.as_str()).await? {
            Hold::Held => {}
            Hold::Stale => {
                return Ok(Err(refused(HOLD_STALE, "the step this lease was issued for is over")));
            }
            Hold::Elsewhere { holder } => {
                let why = format!("the lease is bound to {holder}, the instance that first used it");
                return Ok(Err(refused(HOLD_ELSEWHERE, why)));
            }
        }
        if claims.grant(&req.action).is_none() {
            return Ok(Err(refused("action_not_granted", format!("the lease does not grant {}", req.action))));
        }
        // The matrix in force now decides, not the level written into the lease.
        let Some(risk) = self.0.matrix.risk_of(&req.action) else {
            return Ok(Err(refused("unknown_action", format!("{} is not in the risk matrix", req.action))));
        };
        let approved = self.0.engine.has_approval(claims.task).await?;
        match self.0.matrix.decide(&req.action, risk, approved, chrono::Utc::now()) {
            Decision::Allow => Ok(Ok(claims)),
            Decision::Deny { code, message } => Ok(Err(refused(code, message))),
        }
    }

    async fn refuse(&self, env: &Verified<Envelope>, req: &ToolRequest, r: Refused) -> Result<(), HandlerError> {
        tracing::warn!(task = ?env.task_id, from = %env.from.instance, action = %req.action, code = r.code, "Refused a tool request.");
        let output = json!({"error": r.code, "message": r.message}).to_string();
        let detail = json!({"action": req.action, "request_id": req.request_id.to_string(), "code": r.code, "message": r.message});
        self.0
            .engine
            .refuse_tool(env, ToolResponse { request_id: req.request_id, ok: false, output }, detail)
            .await
            .map_err(transient)
    }

    async fn complete(
        &self,
        env: &Verified<Envelope>,
        req: &ToolRequest,
        claims: &LeaseClaims,
    ) -> Result<(), HandlerError> {
        if let Some(paid) = self.paid(req.request_id).await? {
            tracing::info!(request = %req.request_id, "Answering a redelivered model request from its paid answer.");
            return self.answer_paid(env, req, paid).await;
        }
        let input = match serde_json::from_str::<CompleteInput>(&req.input) {
            Ok(i) => i.check(),
            Err(e) => Err(e.to_string()),
        };
        let input = match input {
            Ok(i) => i,
            Err(why) => return self.refuse(env, req, refused("bad_input", format!("llm.complete input: {why}"))).await,
        };
        let models = &self.0.models;
        let max_tokens = input.max_tokens.unwrap_or(models.max_output_tokens).clamp(1, models.max_output_tokens);
        let mut call = CompletionRequest {
            model: models.model_for(claims.role).to_owned(),
            system: input.system,
            messages: input.messages,
            tools: input.tools,
            max_tokens,
            temperature: None,
            task_id: Some(claims.task),
            role: claims.role.as_str().to_owned(),
        };
        // A true upper bound (input bytes, and the whole output allowance), held against the
        // lease's limits and the ledger's by one script: concurrent calls of the task (four
        // proxy consumers, any number of orchestrators) cannot all pass a check that only
        // some of them fit, and no prompt costs more than it reserved.
        let bound_in = input_token_bound(&call);
        let cap = TaskCap { tokens: claims.max_tokens, cost: MicroUsd(claims.max_cost_micro_usd) };
        let reservation = match self
            .0
            .ledger
            .reserve_within(claims.task, claims.role, &call.model, bound_in, u64::from(max_tokens), cap)
            .await
        {
            Ok(r) => r,
            Err(ReserveError::Refused(Refusal::TaskLimit { hit, .. })) => {
                let why = format!(
                    "the task is over its budget (lease: {} tokens, {} micro-dollars): {hit}",
                    claims.max_tokens, claims.max_cost_micro_usd
                );
                self.0.engine.block(claims.task, &why).await.map_err(transient)?;
                return self.refuse(env, req, refused("budget_exceeded", why)).await;
            }
            Err(ReserveError::Refused(Refusal::DailyLimit { day, hit })) => {
                let why = format!("the daily budget of {day} is spent: {hit}");
                let me = Actor { role: "orchestrator".into(), instance: "tool-proxy".into() };
                self.0.engine.kill(&me, &why).await.map_err(transient)?;
                return self.refuse(env, req, refused("budget_exceeded", why)).await;
            }
            Err(ReserveError::Ledger(e)) => return Err(transient(format!("ledger: {e}"))),
        };
        call.model.clone_from(&reservation.model);
        // The model call, under the GenAI semantic conventions.
        let span = tracing::info_span!(
            "gen_ai.chat",
            otel.name = format!("chat {}", call.model),
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            gen_ai.operation.name = "chat",
            gen_ai.system = self.0.provider.name(),
            gen_ai.request.model = %call.model,
            gen_ai.request.max_tokens = max_tokens,
            gen_ai.response.model = tracing::field::Empty,
            gen_ai.response.finish_reasons = tracing::field::Empty,
            gen_ai.usage.input_tokens = tracing::field::Empty,
            gen_ai.usage.output_tokens = tracing::field::Empty,
            task_id = %claims.task,
            role = claims.role.as_str(),
            attempts = tracing::field::Empty,
        );
        let answer = tracing::Instrument::instrument(
            async {
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    match self.0.provider.complete(&call).await {
                        Ok(c) => break (Ok(c), attempt),
                        Err(e) if e.is_retryable() && attempt < models.attempts => {
                            let wait = Duration::from_millis(250 << attempt.min(6));
                            tracing::warn!(error = %e, attempt, "Model call failed; retrying.");
                            tokio::time::sleep(wait).await;
                        }
                        Err(e) => break (Err(e), attempt),
                    }
                }
            },
            span.clone(),
        )
        .await;
        let (answer, attempts) = answer;
        span.record("attempts", attempts);
        match &answer {
            Ok(c) => {
                span.record("gen_ai.response.model", c.model.as_str());
                span.record("gen_ai.usage.input_tokens", c.usage.input_tokens);
                span.record("gen_ai.usage.output_tokens", c.usage.output_tokens);
                if let Some(r) = &c.finish_reason {
                    span.record("gen_ai.response.finish_reasons", r.as_str());
                }
            }
            Err(_) => {
                span.record("otel.status_code", "ERROR");
            }
        }
        drop(span);
        let completion = match answer {
            Ok(c) => c,
            Err(e) => {
                if let Err(le) = self.0.ledger.release(&reservation).await {
                    tracing::warn!(error = %le, "Cannot release a reservation; it lapses by itself.");
                }
                return self.refuse(env, req, refused("provider_error", e.to_string())).await;
            }
        };
        let commit = match self
            .0
            .ledger
            .commit(&reservation, completion.usage.input_tokens, completion.usage.output_tokens)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                // Free the hold now rather than at its lapse; the retry reserves afresh.
                if let Err(le) = self.0.ledger.release(&reservation).await {
                    tracing::warn!(error = %le, "Cannot release a reservation; it lapses by itself.");
                }
                return Err(transient(e));
            }
        };
        let mut detail = json!({
            "request_id": req.request_id.to_string(),
            "model": reservation.model,
            "rerouted": reservation.rerouted(),
            "input_tokens": completion.usage.input_tokens,
            "output_tokens": completion.usage.output_tokens,
            "cost_micro_usd": commit.cost.0,
            "tool_calls": completion.tool_calls.len(),
        });
        if let Some(version) = input.prompt_version {
            detail["prompt_version"] = Value::String(version);
        }
        let output = json!({
            "text": completion.text,
            "tool_calls": completion.tool_calls,
            "finish_reason": completion.finish_reason,
            "model": completion.model,
            "input_tokens": completion.usage.input_tokens,
            "output_tokens": completion.usage.output_tokens,
        })
        .to_string();
        let paid = PaidAnswer {
            output,
            detail,
            usage_role: claims.role,
            model: reservation.model.clone(),
            input_tokens: completion.usage.input_tokens,
            output_tokens: completion.usage.output_tokens,
            cost_micro_usd: commit.cost.0,
        };
        // Kept before the answer's transaction: if that fails, the redelivery answers from here.
        match serde_json::to_string(&paid) {
            Ok(text) => {
                let stored: Result<(), HandlerError> = async {
                    let mut c = self.0.redis.get().await.map_err(transient)?;
                    redis::cmd("SET")
                        .arg(paid_key(req.request_id))
                        .arg(text)
                        .arg("EX")
                        .arg(PAID_ANSWER_TTL_SECS)
                        .query_async::<()>(&mut c)
                        .await
                        .map_err(transient)
                }
                .await;
                if let Err(e) = stored {
                    tracing::warn!(error = ?e, "Cannot keep the paid answer; a redelivery would call the model again.");
                }
            }
            Err(e) => tracing::warn!(error = %e, "Cannot encode the paid answer."),
        }
        self.answer_paid(env, req, paid).await
    }
}

/// `pkg_install` input: which lockfiles the worker is about to install from.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InstallInput {
    /// Workspace-relative lockfile names (`requirements.txt`, `package-lock.json`).
    lockfiles: Vec<String>,
    /// SHA-256 (hex) over the lockfiles, as `workers::deps` computes it.
    digest: String,
}

/// The lockfiles `workers::deps` installs from; anything else is not an install.
const LOCKFILES: [&str; 3] = ["requirements.txt", "package-lock.json", "npm-shrinkwrap.json"];

impl InstallInput {
    fn check(self) -> Result<Self, String> {
        if self.lockfiles.is_empty() || self.lockfiles.len() > LOCKFILES.len() {
            return Err(format!("lockfiles: 1 to {} of {}", LOCKFILES.len(), LOCKFILES.join(", ")));
        }
        if let Some(bad) = self.lockfiles.iter().find(|l| !LOCKFILES.contains(&l.as_str())) {
            return Err(format!(
                "{:?} is not a lockfile this fleet installs from",
                bad.chars().take(64).collect::<String>()
            ));
        }
        if self.digest.len() != 64 || !self.digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("digest: the SHA-256 of the lockfiles, 64 hex digits".into());
        }
        Ok(self)
    }
}

impl ToolProxy {
    /// `pkg_install` is a permission, not something the orchestrator does: the lease and
    /// the risk matrix (MEDIUM: within work hours, or with an approval) were checked by
    /// [`Self::admit`]; granting it is audited with the lockfiles' digest, so the trail
    /// shows what a task installed from. The worker then runs the install in the sandbox's
    /// egress mode (`workers::deps`).
    async fn permit_install(&self, env: &Verified<Envelope>, req: &ToolRequest) -> Result<(), HandlerError> {
        let input = match serde_json::from_str::<InstallInput>(&req.input) {
            Ok(i) => i.check(),
            Err(e) => Err(e.to_string()),
        };
        let input = match input {
            Ok(i) => i,
            Err(why) => return self.refuse(env, req, refused("bad_input", format!("pkg_install input: {why}"))).await,
        };
        let detail =
            json!({"request_id": req.request_id.to_string(), "lockfiles": input.lockfiles, "digest": input.digest});
        let response =
            ToolResponse { request_id: req.request_id, ok: true, output: json!({"allowed": true}).to_string() };
        self.0.engine.answer_tool(env, response, "tool.pkg_install", detail, None).await.map_err(transient)
    }
}

impl Handler for ToolProxy {
    async fn handle(&self, d: Delivery) -> Result<(), HandlerError> {
        let env = &d.envelope;
        let Payload::ToolRequest(req) = &env.payload else {
            return Err(HandlerError::Permanent(format!("expected tool.request, got {}", env.message_type())));
        };
        let claims = match self.admit(env, req).await {
            Ok(Ok(c)) => c,
            Ok(Err(r)) => return self.refuse(env, req, r).await,
            Err(EngineError::NotFound(id)) => {
                return self.refuse(env, req, refused("wrong_task", format!("task {id} does not exist"))).await;
            }
            Err(e) => return Err(transient(e)),
        };
        match req.action.as_str() {
            "llm.complete" => self.complete(env, req, &claims).await,
            "pkg_install" => self.permit_install(env, req).await,
            other => {
                let why = format!("{other} is not an action workers may request; the orchestrator performs it itself");
                self.refuse(env, req, refused("action_not_granted", why)).await
            }
        }
    }
}

/// Pushes approved tasks' branches (`git.push_branch`) and marks them merged, until
/// `shutdown`. A refused push fails the task; a git failure is retried next round.
pub async fn push_loop(
    engine: Engine,
    matrix: Arc<RiskMatrix>,
    git: GitConfig,
    every: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
        if !git.push_on_approve {
            continue;
        }
        let jobs = match engine.push_jobs(8).await {
            Ok(j) => j,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot list approved tasks; retrying.");
                continue;
            }
        };
        for job in jobs {
            // A kill during the batch stops the pushes not yet made.
            match engine.fleet_state().await {
                Ok((_, false)) => {}
                Ok((_, true)) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "Cannot read the fleet state; pushing later.");
                    break;
                }
            }
            let task = &job.task;
            let repo = task.spec.get("repository").and_then(Value::as_str).unwrap_or("");
            match engine.merge_freeze(task.id, repo).await {
                Ok(None) => {}
                Ok(Some(incident)) => {
                    tracing::info!(task = %task.id, incident = %incident, "Push waits: an open incident freezes merges.");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(task = %task.id, error = %e, "Cannot check for a merge freeze; pushing later.");
                    continue;
                }
            }
            let scope: Vec<String> =
                task.spec.get("scope").and_then(|v| serde_json::from_value(v.clone()).ok()).unwrap_or_default();
            let risk = matrix.risk_of("git.push_branch").unwrap_or(crate::state::Risk::Critical);
            let approved = engine.has_approval(task.id).await.unwrap_or(false);
            if let Decision::Deny { message, .. } = matrix.decide("git.push_branch", risk, approved, chrono::Utc::now())
            {
                tracing::info!(task = %task.id, reason = %message, "Push waits for the risk matrix.");
                continue;
            }
            // The push joins the task's trace, under its root span.
            let span = tracing::info_span!(
                "git.push_branch",
                otel.kind = "client",
                task_id = %task.id,
                role = "orchestrator",
            );
            telemetry::propagate::set_parent(&span, engine.traceparent_of(task.id).await.as_deref());
            tracing::Instrument::instrument(async {
            let result = if repo.is_empty() {
                Err(PushError::Refused("the task names no repository to push to".into()))
            } else if let Err(why) = job.vouched() {
                Err(PushError::Refused(why))
            } else if let Some(at_push) = crate::tasks::critical_at_push(&job.diff) {
                match engine.unsafe_after_approval(task.id, &at_push).await {
                    Ok(incident) => tracing::error!(task = %task.id, incident = ?incident, "An approved change carries what Review refuses: not pushed, incident opened."),
                    Err(e) => tracing::warn!(task = %task.id, error = %e, "Cannot record what was found at push; retrying."),
                }
                return;
            } else {
                let commit = gitops::CommitSpec { task: task.id, title: &task.title, at: job.approved_at };
                gitops::push_branch(&git, repo, &commit, &job.diff, &scope).await
            };
            match result {
                Ok(commit) => {
                    let branch = gitops::branch_of(task.id);
                    match engine.pushed(task.id, &branch, &commit).await {
                        Ok(_) => {
                            tracing::info!(task = %task.id, branch = %branch, commit = %commit, "Pushed the task's branch.")
                        }
                        Err(e) => {
                            tracing::warn!(task = %task.id, error = %e, "Pushed, but cannot record it; retrying.")
                        }
                    }
                }
                Err(PushError::Refused(why)) => {
                    tracing::warn!(task = %task.id, reason = %why, "Push refused; failing the task.");
                    if let Err(e) = engine.push_refused(task.id, &why).await {
                        tracing::warn!(task = %task.id, error = %e, "Cannot record the refused push; retrying.");
                    }
                }
                Err(PushError::Failed(why)) => tracing::warn!(task = %task.id, error = %why, "Push failed; retrying."),
            }
            }, span).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: Value) -> Result<Checked, String> {
        serde_json::from_value::<CompleteInput>(input).map_err(|e| e.to_string())?.check()
    }

    fn refused_with(input: Value, expected: &str) {
        let err = check(input).expect_err(expected);
        assert!(err.contains(expected), "{err}");
    }

    fn tool(name: &str) -> Value {
        json!({"name": name, "description": "d", "parameters": {"type": "object"}})
    }

    #[test]
    fn a_tool_loop_is_read_into_the_providers_types() {
        let checked = check(json!({
            "system": "s",
            "messages": [
                {"role": "user", "content": "fix it"},
                {"role": "assistant", "tool_calls": [{"id": "c1", "name": "search", "arguments": {"q": "x"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "found", "is_error": true},
                {"role": "assistant", "content": "bad call", "tool_calls": [{"id": "c2", "name": "edit", "arguments": "{oops"}]},
                {"role": "tool", "tool_call_id": "c2", "content": "not JSON"},
                {"role": "assistant", "content": "done"}
            ],
            "tools": [tool("search"), {"name": "edit", "parameters": {"type": "object"}}],
            "max_tokens": 10,
            "prompt_version": "sha256:0123456789abcdef"
        }))
        .expect("valid");
        assert_eq!(
            checked.messages,
            [
                Message::user("fix it"),
                Message::assistant_calls(
                    "",
                    vec![ToolCall { id: "c1".into(), name: "search".into(), arguments: json!({"q": "x"}) }]
                ),
                Message::tool_result("c1", "found", true),
                Message::assistant_calls(
                    "bad call",
                    vec![ToolCall { id: "c2".into(), name: "edit".into(), arguments: json!("{oops") }]
                ),
                Message::tool_result("c2", "not JSON", false),
                Message::assistant("done"),
            ]
        );
        assert_eq!(checked.tools.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["search", "edit"]);
        assert_eq!(checked.tools[1].description, "", "description is optional");
        assert_eq!(checked.prompt_version.as_deref(), Some("sha256:0123456789abcdef"));
        assert_eq!((checked.system.as_deref(), checked.max_tokens), (Some("s"), Some(10)));
    }

    #[test]
    fn fields_out_of_their_role_are_refused() {
        let user = |extra: Value| {
            let mut m = json!({"role": "user", "content": "x"});
            m.as_object_mut().expect("object").extend(extra.as_object().expect("object").clone());
            json!({"messages": [m]})
        };
        refused_with(user(json!({"tool_calls": []})), "messages[0] (user): tool_calls are allowed only on assistant");
        refused_with(user(json!({"tool_call_id": "c"})), "messages[0] (user): tool_call_id is allowed only on tool");
        refused_with(user(json!({"is_error": false})), "messages[0] (user): is_error is allowed only on tool");
        refused_with(json!({"messages": [{"role": "user"}]}), "messages[0] (user): content is missing");
        refused_with(json!({"messages": []}), "at least one message");
        refused_with(json!({"messages": [{"role": "system", "content": "x"}]}), "unknown variant `system`");
        refused_with(json!({"messages": [{"role": "user", "content": "x", "name": "y"}]}), "unknown field `name`");
        refused_with(json!({"messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"}), "unknown field");
    }

    #[test]
    fn tool_results_must_answer_an_earlier_call() {
        let call =
            json!({"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "name": "t", "arguments": {}}]});
        refused_with(
            json!({"messages": [{"role": "user", "content": "x"}, call, {"role": "tool", "content": "r"}]}),
            "messages[2] (tool): tool_call_id is missing",
        );
        refused_with(
            json!({"messages": [{"role": "user", "content": "x"}, call, {"role": "tool", "tool_call_id": "c9", "content": "r"}]}),
            "messages[2] (tool): tool_call_id \"c9\" answers no tool call of an earlier assistant message",
        );
        // A result before its call answers nothing either.
        refused_with(
            json!({"messages": [{"role": "tool", "tool_call_id": "c1", "content": "r"}, call]}),
            "messages[0] (tool): tool_call_id \"c1\" answers no tool call",
        );
        refused_with(
            json!({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [{"id": "", "name": "t", "arguments": {}}]}]}),
            "messages[1] (assistant): tool_calls[0].id is empty",
        );
        refused_with(
            json!({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "name": "t"}]}]}),
            "missing field `arguments`",
        );
    }

    #[test]
    fn tools_are_checked() {
        let with = |tools: Value| json!({"messages": [{"role": "user", "content": "x"}], "tools": tools});
        assert!(check(with(json!([tool("a-Z_09"), tool(&"n".repeat(64))]))).is_ok());
        refused_with(with(json!([tool("run tests")])), "tools[0].name \"run tests\" is not a tool name");
        refused_with(with(json!([tool("a"), tool("")])), "tools[1].name \"\" is not a tool name");
        refused_with(with(json!([tool(&"n".repeat(65))])), "is not a tool name");
        refused_with(with(json!([tool("só")])), "is not a tool name");
        refused_with(with(json!([tool("a"), tool("a")])), "tools[1].name \"a\" is offered twice");
        refused_with(
            with(json!([{"name": "a", "parameters": "{\"type\":\"object\"}"}])),
            "tools[0].parameters must be a JSON object",
        );
        refused_with(with(json!([{"name": "a"}])), "missing field `parameters`");
        let many: Vec<Value> = (0..=MAX_TOOLS).map(|i| tool(&format!("t{i}"))).collect();
        refused_with(with(json!(many)), "33 tools offered; at most 32");
        assert!(check(with(json!(many[..MAX_TOOLS]))).is_ok());
    }

    #[test]
    fn prompt_version_is_at_most_80_characters() {
        let with = |v: &str| json!({"messages": [{"role": "user", "content": "x"}], "prompt_version": v});
        assert!(check(with(&"é".repeat(80))).is_ok());
        refused_with(with(&"é".repeat(81)), "prompt_version is longer than 80 characters");
    }
}
