//! Model providers behind the tool proxy's `llm.complete`.
//!
//! Workers hold no model key: the orchestrator calls the model on their behalf and meters
//! the tokens from the provider's own answer. An answer that carries no usage is refused
//! ([`ProviderError::NoUsage`]) rather than billed as zero.
//!
//! # Layout
//! - this file: the request and answer types, [`ProviderError`], the [`Provider`] trait,
//!   [`ProviderConfig`] (one `[provider]` table, tagged by `kind`), [`build`] and the
//!   [`AnyProvider`] dispatcher, [`input_token_bound`] for the budget reservation.
//! - [`openai`]: OpenAI-compatible chat completions (OpenAI, Ollama, vLLM, LiteLLM).
//! - [`anthropic`]: the Anthropic Messages API.
//! - [`scripted`]: a deterministic offline provider answering from a TOML fixture file.

pub mod anthropic;
pub mod openai;
pub mod scripted;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use anthropic::AnthropicProvider;
pub use openai::OpenAiProvider;
pub use scripted::ScriptedProvider;

/// Longest provider error message kept in a [`ProviderError::Http`], in characters.
pub const MAX_ERROR_MESSAGE_CHARS: usize = 300;
/// Largest answer body read from a provider; a longer one is refused as undecodable.
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
/// Default whole-request timeout: a long completion can take minutes.
pub const DEFAULT_TIMEOUT_SECS: u64 = 120;

/// One model call, as the tool proxy asks for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionRequest {
    /// The provider's model name (`gpt-4o-mini`, `claude-sonnet-4-5`, `llama3.1`).
    pub model: String,
    /// The system prompt: Anthropic takes it as a top-level field, OpenAI as the first message.
    pub system: Option<String>,
    /// The conversation, oldest first.
    pub messages: Vec<Message>,
    /// The tools the model may call; none means a plain completion (and no `tools` field
    /// is sent).
    #[serde(default)]
    pub tools: Vec<ToolSpec>,
    /// Cap on the answer's length; also what the budget reserves for the output.
    pub max_tokens: u32,
    /// Sampling temperature; the provider's default when absent.
    pub temperature: Option<f32>,
    /// The task the call is made for: metering, and the scripted provider's error message.
    pub task_id: Option<Uuid>,
    /// The requesting worker's role (`dev`, `qa`, ...): the scripted provider matches on it.
    pub role: String,
}

/// A tool the model may call, as both APIs describe one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolSpec {
    /// What the model calls it by: `^[a-zA-Z0-9_-]{1,64}$` (both APIs' rule; the tool proxy
    /// checks it).
    pub name: String,
    /// What the tool does, for the model.
    pub description: String,
    /// The JSON Schema of its arguments (an object schema): OpenAI's `parameters`,
    /// Anthropic's `input_schema`.
    pub parameters: serde_json::Value,
}

/// A call of a tool, by the model: in an answer ([`Completion::tool_calls`]) and, sent back,
/// in an assistant [`Message`] of the conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The provider's id of the call; the [`Message::tool_result`] answering it names it.
    pub id: String,
    /// The tool called.
    pub name: String,
    /// The arguments as the model gave them: a JSON value (normally an object). OpenAI sends
    /// them as JSON text; text that is not JSON is kept as a JSON string holding it, never
    /// a failed call (the worker answers such a call with a tool error).
    pub arguments: serde_json::Value,
}

/// Who said a [`Message`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageRole {
    /// The agent's side of the conversation.
    User,
    /// A previous answer of the model.
    Assistant,
    /// The result of a tool call the model made (Anthropic: a `tool_result` block of a user
    /// message).
    Tool,
}

impl MessageRole {
    /// The role as OpenAI spells it (Anthropic has no `tool` role).
    pub fn as_str(self) -> &'static str {
        match self {
            MessageRole::User => "user",
            MessageRole::Assistant => "assistant",
            MessageRole::Tool => "tool",
        }
    }
}

/// One turn of the conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Who said it.
    pub role: MessageRole,
    /// What was said (plain text); for a [`MessageRole::Tool`] message, the tool's result.
    /// May be empty on an assistant message that only calls tools.
    pub content: String,
    /// The tools an assistant message called; empty on every other role.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// The [`ToolCall::id`] a [`MessageRole::Tool`] message answers; `None` on every other role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// Whether a tool result reports a failure (Anthropic's `is_error`; OpenAI has none, so
    /// its content is prefixed with `ERROR: `). False on every other role.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub is_error: bool,
}

impl Message {
    /// A user turn.
    pub fn user(content: impl Into<String>) -> Self {
        Message::plain(MessageRole::User, content.into())
    }

    /// An assistant turn without tool calls.
    pub fn assistant(content: impl Into<String>) -> Self {
        Message::plain(MessageRole::Assistant, content.into())
    }

    /// An assistant turn that calls tools (its text may be empty).
    pub fn assistant_calls(content: impl Into<String>, tool_calls: Vec<ToolCall>) -> Self {
        Message { tool_calls, ..Message::assistant(content) }
    }

    /// The result of the tool call `tool_call_id`; `is_error` when the tool failed.
    pub fn tool_result(tool_call_id: impl Into<String>, content: impl Into<String>, is_error: bool) -> Self {
        Message {
            tool_call_id: Some(tool_call_id.into()),
            is_error,
            ..Message::plain(MessageRole::Tool, content.into())
        }
    }

    fn plain(role: MessageRole, content: String) -> Self {
        Message { role, content, tool_calls: Vec::new(), tool_call_id: None, is_error: false }
    }
}

/// The model's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Completion {
    /// The answer's text (Anthropic: all text blocks, concatenated); may be empty when the
    /// model only called tools.
    pub text: String,
    /// The tools the model called, in its order; empty when it called none.
    #[serde(default)]
    pub tool_calls: Vec<ToolCall>,
    /// Tokens as the provider counted them: what the budget commits.
    pub usage: TokenUsage,
    /// The model as the provider reported it (may be more specific than the one asked for).
    pub model: String,
    /// Why the model stopped (`stop`, `length`, `tool_calls`, `end_turn`, `tool_use`,
    /// `max_tokens`, ...), as reported.
    pub finish_reason: Option<String>,
}

/// Token counts of one call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUsage {
    /// Prompt tokens (Anthropic: including cache reads and writes).
    pub input_tokens: u64,
    /// Answer tokens.
    pub output_tokens: u64,
}

impl TokenUsage {
    /// Input plus output.
    pub fn total(&self) -> u64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }
}

/// Why a model call failed. No variant ever carries an API key or an auth header.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The provider answered with a non-success status.
    #[error("{provider} answered HTTP {status}: {message}")]
    Http {
        /// Which provider kind answered.
        provider: &'static str,
        /// The HTTP status code.
        status: u16,
        /// The provider's `error.message` (or the body), at most [`MAX_ERROR_MESSAGE_CHARS`]
        /// characters, with any occurrence of the API key replaced.
        message: String,
        /// The `Retry-After` header, when it was a number of seconds.
        retry_after: Option<Duration>,
    },
    /// No complete answer within the configured timeout.
    #[error("{provider} did not answer within {after:?}")]
    Timeout {
        /// Which provider kind was called.
        provider: &'static str,
        /// The configured timeout.
        after: Duration,
    },
    /// The provider could not be reached, or the connection broke off.
    #[error("{provider} could not be reached: {message}")]
    Connect {
        /// Which provider kind was called.
        provider: &'static str,
        /// The transport error and its causes (never the URL).
        message: String,
    },
    /// The answer was not what the API documents.
    #[error("{provider} sent an answer that could not be decoded: {problem}")]
    Decode {
        /// Which provider kind answered.
        provider: &'static str,
        /// What was missing or malformed (`choices[0].message`, `model`, ...).
        problem: String,
    },
    /// The provider configuration is unusable.
    #[error("invalid model provider configuration: {setting}: {problem}")]
    Config {
        /// The setting (or file) at fault.
        setting: String,
        /// What is wrong with it and, where useful, what to do.
        problem: String,
    },
    /// The answer carried no token usage: refused rather than billed as zero.
    #[error("{provider} answered without token usage; refusing to bill it as zero")]
    NoUsage {
        /// Which provider kind answered.
        provider: &'static str,
    },
    /// The scripted provider's fixture has no entry for this request.
    #[error(
        "no fixture entry in {fixture} matches task {task}, role {role:?}, turn {turn}, last user message {prompt:?}"
    )]
    Fixture {
        /// The fixture file.
        fixture: PathBuf,
        /// The request's task id, or `none`.
        task: String,
        /// The request's role.
        role: String,
        /// The model's turn the request asks for: 1 + the assistant messages so far.
        turn: u32,
        /// The start of the last user message.
        prompt: String,
    },
}

impl ProviderError {
    /// Whether trying the same call again later may succeed: 408, 429 and 5xx answers,
    /// timeouts and connection failures.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProviderError::Http { status, .. } => matches!(*status, 408 | 429 | 500..=599),
            ProviderError::Timeout { .. } | ProviderError::Connect { .. } => true,
            ProviderError::Decode { .. }
            | ProviderError::Config { .. }
            | ProviderError::NoUsage { .. }
            | ProviderError::Fixture { .. } => false,
        }
    }

    fn config(setting: impl Into<String>, problem: impl Into<String>) -> Self {
        ProviderError::Config { setting: setting.into(), problem: problem.into() }
    }
}

/// A model provider. Not dyn-compatible (it returns `impl Future`): hold an [`AnyProvider`].
pub trait Provider: Send + Sync {
    /// Calls the model once. No retry here: the caller decides with
    /// [`ProviderError::is_retryable`], since each attempt must be metered.
    fn complete(&self, req: &CompletionRequest) -> impl Future<Output = Result<Completion, ProviderError>> + Send;

    /// The provider kind (`openai`, `anthropic`, `scripted`), for logs and metrics.
    fn name(&self) -> &str;
}

/// The `[provider]` table of the orchestrator's configuration, tagged by `kind`.
///
/// ```toml
/// [provider]
/// kind = "openai"                       # or "anthropic", "scripted"
/// base_url = "http://localhost:11434/v1"
/// api_key_env = "OPENAI_API_KEY"        # or api_key = "...", or neither (Ollama)
/// timeout_secs = 120
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind")]
pub enum ProviderConfig {
    /// An OpenAI-compatible chat-completions endpoint.
    #[serde(rename = "openai")]
    OpenAi(OpenAiConfig),
    /// The Anthropic Messages API.
    #[serde(rename = "anthropic")]
    Anthropic(AnthropicConfig),
    /// Answers from a fixture file, offline (demo and tests).
    #[serde(rename = "scripted")]
    Scripted(ScriptedConfig),
}

/// `kind = "openai"`: any server speaking OpenAI's `/chat/completions`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiConfig {
    /// The API root, `/chat/completions` is appended: `https://api.openai.com/v1`,
    /// `http://localhost:11434/v1` (Ollama), a vLLM or LiteLLM address.
    pub base_url: String,
    /// The key, inline. Prefer `api_key_env`.
    #[serde(default)]
    pub api_key: Option<SecretString>,
    /// Name of the environment variable holding the key. With neither this nor `api_key`,
    /// no `Authorization` header is sent (local servers such as Ollama).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Whole-request timeout in seconds.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Headers added to every request (an organisation or project id, a gateway's header).
    /// Values are treated as secrets: never logged.
    #[serde(default)]
    pub extra_headers: BTreeMap<String, SecretString>,
}

/// `kind = "anthropic"`: the Anthropic Messages API.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnthropicConfig {
    /// The API root, `/v1/messages` is appended.
    #[serde(default = "default_anthropic_url")]
    pub base_url: String,
    /// The key, inline. Prefer `api_key_env`. One of the two is required.
    #[serde(default)]
    pub api_key: Option<SecretString>,
    /// Name of the environment variable holding the key.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// The `anthropic-version` header.
    #[serde(default = "default_anthropic_version")]
    pub version: String,
    /// Whole-request timeout in seconds.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

/// `kind = "scripted"`: the fixture file's format is described in [`scripted`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptedConfig {
    /// The TOML fixture file, loaded and checked once by [`build`].
    pub fixture: PathBuf,
}

fn default_timeout() -> u64 {
    DEFAULT_TIMEOUT_SECS
}
fn default_anthropic_url() -> String {
    "https://api.anthropic.com".to_owned()
}
fn default_anthropic_version() -> String {
    "2023-06-01".to_owned()
}

impl fmt::Debug for OpenAiConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiConfig")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| REDACTED))
            .field("api_key_env", &self.api_key_env)
            .field("timeout_secs", &self.timeout_secs)
            .field("extra_headers", &self.extra_headers.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl fmt::Debug for AnthropicConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnthropicConfig")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| REDACTED))
            .field("api_key_env", &self.api_key_env)
            .field("version", &self.version)
            .field("timeout_secs", &self.timeout_secs)
            .finish()
    }
}

const REDACTED: &str = "**REDACTED**";

/// The configured provider, whichever it is.
#[derive(Debug)]
pub enum AnyProvider {
    /// OpenAI-compatible.
    OpenAi(OpenAiProvider),
    /// Anthropic.
    Anthropic(AnthropicProvider),
    /// Fixture-driven.
    Scripted(ScriptedProvider),
}

impl Provider for AnyProvider {
    async fn complete(&self, req: &CompletionRequest) -> Result<Completion, ProviderError> {
        let result = match self {
            AnyProvider::OpenAi(p) => p.complete(req).await,
            AnyProvider::Anthropic(p) => p.complete(req).await,
            AnyProvider::Scripted(p) => p.complete(req).await,
        };
        match &result {
            Ok(c) => tracing::debug!(
                provider = self.name(),
                model = %c.model,
                input_tokens = c.usage.input_tokens,
                output_tokens = c.usage.output_tokens,
                "Model call completed."
            ),
            Err(e) => tracing::warn!(
                provider = self.name(),
                model = %req.model,
                retryable = e.is_retryable(),
                error = %e,
                "Model call failed."
            ),
        }
        result
    }

    fn name(&self) -> &str {
        match self {
            AnyProvider::OpenAi(p) => p.name(),
            AnyProvider::Anthropic(p) => p.name(),
            AnyProvider::Scripted(p) => p.name(),
        }
    }
}

/// Builds the configured provider; keys named by `api_key_env` are read from the process
/// environment.
pub fn build(cfg: &ProviderConfig) -> Result<AnyProvider, ProviderError> {
    build_with_env(cfg, |name| std::env::var(name).ok())
}

/// [`build`], reading `api_key_env` variables through `env` (tests never touch the process
/// environment).
pub fn build_with_env(
    cfg: &ProviderConfig,
    env: impl Fn(&str) -> Option<String>,
) -> Result<AnyProvider, ProviderError> {
    Ok(match cfg {
        ProviderConfig::OpenAi(c) => AnyProvider::OpenAi(OpenAiProvider::new(c, &env)?),
        ProviderConfig::Anthropic(c) => AnyProvider::Anthropic(AnthropicProvider::new(c, &env)?),
        ProviderConfig::Scripted(c) => AnyProvider::Scripted(ScriptedProvider::load(&c.fixture)?),
    })
}

/// Longest tool name both APIs accept.
pub const MAX_TOOL_NAME_CHARS: usize = 64;

/// Whether `name` is a tool name both APIs accept: `^[a-zA-Z0-9_-]{1,64}$`.
pub fn is_tool_name(name: &str) -> bool {
    (1..=MAX_TOOL_NAME_CHARS).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Tokens of a chat template's framing around each message (and the system prompt).
const PER_MESSAGE: u64 = 4;
/// Tokens priming the answer.
const PRIMING: u64 = 3;
/// Tokens of framing around each tool definition, each tool call and each tool result: the
/// template's wrapper and the keys of the API's JSON (`"name"`, `"input_schema"`, ...)
/// that [`input_token_bound`] does not count as bytes.
const PER_TOOL_ITEM: u64 = 32;
/// Tokens of the tool-use system prompt a provider adds when a call offers tools. The
/// largest Anthropic documents is 530 (Claude 3 Opus, `tool_choice` auto; 346 for the
/// Claude 4 models); OpenAI's `namespace functions` preamble is a few dozen.
const TOOL_PREAMBLE: u64 = 600;

/// An upper bound on the input tokens of a call, for the budget's reservation before the
/// call: the UTF-8 **bytes** of every text the prompt is made of, plus framing:
///
/// - the system prompt and each message's content, plus 4 each (`PER_MESSAGE`);
/// - each tool offered: its name, description and serialized `parameters`, plus 32
///   (`PER_TOOL_ITEM`); and, once when there is any, 600 (`TOOL_PREAMBLE`);
/// - each tool call of an assistant message: its id, name and serialized arguments, plus
///   32; each tool result: its `tool_call_id`, plus 32 (which also covers OpenAI's
///   `ERROR: ` prefix of a failed result);
/// - 3 for the answer (`PRIMING`).
///
/// A byte-level BPE tokenizer (GPT's, Claude's, Llama 3's) never makes more tokens of a
/// text than it has bytes, whatever the text; neither does a SentencePiece tokenizer with
/// byte fallback. The usual estimate, a quarter of the characters, is not a bound: CJK
/// text, emoji and base64 cost 1 to 3 tokens per character, so a prompt written to be
/// cheap to reserve and dear to run beat it 4 to 12 times. The framing constants cover the
/// providers' templates (which are not published) with room to spare. The provider's own
/// count is what the ledger commits after the call; a count above this bound is flagged
/// there (`Commit::exceeded_reservation`).
pub fn input_token_bound(req: &CompletionRequest) -> u64 {
    let bytes = |s: &str| s.len() as u64;
    let json = |v: &serde_json::Value| v.to_string().len() as u64;
    let mut bound = PRIMING;
    let mut add = |n: u64| bound = bound.saturating_add(n);
    if let Some(system) = &req.system {
        add(bytes(system) + PER_MESSAGE);
    }
    for m in &req.messages {
        add(bytes(&m.content) + PER_MESSAGE);
        for call in &m.tool_calls {
            add(bytes(&call.id) + bytes(&call.name) + json(&call.arguments) + PER_TOOL_ITEM);
        }
        if let Some(id) = &m.tool_call_id {
            add(bytes(id) + PER_TOOL_ITEM);
        }
    }
    if !req.tools.is_empty() {
        add(TOOL_PREAMBLE);
    }
    for tool in &req.tools {
        add(bytes(&tool.name) + bytes(&tool.description) + json(&tool.parameters) + PER_TOOL_ITEM);
    }
    bound
}

// ---------------------------------------------------------------------------------------
// Shared HTTP plumbing of the two HTTP providers.

/// The key from `api_key` or `api_key_env`; `None` when neither is set.
fn resolve_key(
    api_key: Option<&SecretString>,
    api_key_env: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<SecretString>, ProviderError> {
    match (api_key, api_key_env) {
        (Some(_), Some(_)) => Err(ProviderError::config("api_key", "set either api_key or api_key_env, not both")),
        (Some(key), None) => {
            if key.expose_secret().trim().is_empty() {
                return Err(ProviderError::config("api_key", "is empty"));
            }
            Ok(Some(SecretString::from(key.expose_secret().trim())))
        }
        (None, Some(var)) => match env(var) {
            Some(key) if !key.trim().is_empty() => Ok(Some(SecretString::from(key.trim()))),
            _ => Err(ProviderError::config("api_key_env", format!("environment variable {var} is unset or empty"))),
        },
        (None, None) => Ok(None),
    }
}

/// `{base_url}{suffix}`, checked to be an http(s) URL.
fn endpoint(base_url: &str, suffix: &str) -> Result<reqwest::Url, ProviderError> {
    let joined = format!("{}{suffix}", base_url.trim().trim_end_matches('/'));
    let url =
        reqwest::Url::parse(&joined).map_err(|e| ProviderError::config("base_url", format!("not a URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ProviderError::config("base_url", "must be an http or https URL"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ProviderError::config("base_url", "must not carry credentials; use api_key_env"));
    }
    Ok(url)
}

fn timeout(timeout_secs: u64) -> Result<Duration, ProviderError> {
    if timeout_secs == 0 {
        return Err(ProviderError::config("timeout_secs", "must be at least 1"));
    }
    Ok(Duration::from_secs(timeout_secs))
}

fn http_client(timeout: Duration) -> Result<reqwest::Client, ProviderError> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        // A redirect would re-send the key somewhere the operator did not configure.
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| ProviderError::config("http client", describe(e)))
}

/// A header value holding a secret: marked sensitive so it is never printed.
fn secret_header(setting: &str, value: &str) -> Result<HeaderValue, ProviderError> {
    let mut value = HeaderValue::from_str(value)
        .map_err(|_| ProviderError::config(setting, "contains characters not allowed in an HTTP header"))?;
    value.set_sensitive(true);
    Ok(value)
}

fn extra_headers(headers: &BTreeMap<String, SecretString>) -> Result<HeaderMap, ProviderError> {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        let setting = format!("extra_headers.{name}");
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| ProviderError::config(&setting, "not a valid header name"))?;
        map.insert(header, secret_header(&setting, value.expose_secret())?);
    }
    Ok(map)
}

/// A reqwest error as text, with its causes, and without the URL.
fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Maps a transport error: a timeout, or a connection problem.
fn transport_error(provider: &'static str, after: Duration, e: reqwest::Error) -> ProviderError {
    if e.is_timeout() {
        ProviderError::Timeout { provider, after }
    } else {
        ProviderError::Connect { provider, message: describe(e) }
    }
}

/// Sends `request` and returns the success body, or the mapped error. `key` is scrubbed
/// from any error message the provider sends back.
async fn send(
    provider: &'static str,
    after: Duration,
    request: reqwest::RequestBuilder,
    key: Option<&SecretString>,
) -> Result<Vec<u8>, ProviderError> {
    let mut response = request.send().await.map_err(|e| transport_error(provider, after, e))?;
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let mut body = Vec::new();
    let mut too_long = false;
    while let Some(chunk) = response.chunk().await.map_err(|e| transport_error(provider, after, e))? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            too_long = true;
            break;
        }
        body.extend_from_slice(&chunk);
    }
    if !status.is_success() {
        let message = scrub(&error_message(&body), key);
        return Err(ProviderError::Http { provider, status: status.as_u16(), message, retry_after });
    }
    if too_long {
        return Err(ProviderError::Decode {
            provider,
            problem: format!("the answer is longer than {MAX_RESPONSE_BYTES} bytes"),
        });
    }
    Ok(body)
}

/// The provider's error message: `error.message` (with `error.type` before it) when the
/// body is the documented error JSON, `error` when it is a string, else the body itself.
fn error_message(body: &[u8]) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let from_json = parsed.as_ref().and_then(|v| v.get("error")).and_then(|error| match error {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => {
            let message = o.get("message").and_then(|m| m.as_str())?;
            Some(match o.get("type").and_then(|t| t.as_str()) {
                Some(kind) if !kind.is_empty() => format!("{kind}: {message}"),
                _ => message.to_owned(),
            })
        }
        _ => None,
    });
    let text = from_json.unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_owned());
    if text.is_empty() { "(empty body)".to_owned() } else { text }
}

/// `text` without the key, cut to [`MAX_ERROR_MESSAGE_CHARS`] characters.
fn scrub(text: &str, key: Option<&SecretString>) -> String {
    let text = match key.map(|k| k.expose_secret()).filter(|k| !k.is_empty()) {
        Some(k) => text.replace(k, REDACTED),
        None => text.to_owned(),
    };
    let mut chars = text.chars();
    let mut cut: String = chars.by_ref().take(MAX_ERROR_MESSAGE_CHARS).collect();
    if chars.next().is_some() {
        cut.push('…');
    }
    cut
}

fn decode_json<T: serde::de::DeserializeOwned>(provider: &'static str, body: &[u8]) -> Result<T, ProviderError> {
    serde_json::from_slice(body).map_err(|e| ProviderError::Decode { provider, problem: e.to_string() })
}

fn missing(provider: &'static str, field: &str) -> ProviderError {
    ProviderError::Decode { provider, problem: format!("`{field}` is missing") }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(system: Option<&str>, messages: &[&str]) -> CompletionRequest {
        CompletionRequest {
            model: "m".into(),
            system: system.map(str::to_owned),
            messages: messages.iter().map(|m| Message::user(*m)).collect(),
            tools: Vec::new(),
            max_tokens: 10,
            temperature: None,
            task_id: None,
            role: "dev".into(),
        }
    }

    #[test]
    fn the_bound_counts_bytes_plus_framing() {
        assert_eq!(input_token_bound(&request(None, &[])), 3);
        // 5 bytes, + 4 framing, + 3 priming.
        assert_eq!(input_token_bound(&request(None, &["hello"])), 12);
        // system 4 bytes + 4; message 8 bytes + 4; + 3.
        assert_eq!(input_token_bound(&request(Some("abcd"), &["abcdefgh"])), 23);
        // Bytes, not characters: ñ is 2 bytes.
        assert_eq!(input_token_bound(&request(None, &["ñññññ"])), 17);
    }

    #[test]
    fn the_bound_counts_tools_calls_and_results() {
        let tool = ToolSpec {
            name: "search".into(),
            description: "Find text.".into(),
            parameters: serde_json::json!({"type": "object"}),
        };
        let call = ToolCall { id: "call_1".into(), name: "search".into(), arguments: serde_json::json!({"q": "x"}) };
        let mut req = request(None, &["go"]);
        // 2 + 4, + 3.
        assert_eq!(input_token_bound(&req), 9);
        // The tool: 6 + 10 + 17 (`{"type":"object"}`) + 32, and the preamble once.
        req.tools.push(tool.clone());
        assert_eq!(input_token_bound(&req), 9 + 65 + 600);
        req.tools.push(ToolSpec { name: "edit".into(), ..tool });
        assert_eq!(input_token_bound(&req), 9 + 65 + 63 + 600);
        req.tools.clear();
        // An assistant message "ok" calling it: 2 + 4; 6 + 6 + 9 (`{"q":"x"}`) + 32.
        req.messages.push(Message::assistant_calls("ok", vec![call]));
        assert_eq!(input_token_bound(&req), 9 + 6 + 53);
        // Its result "found" (an error or not): 5 + 4; 6 + 32.
        req.messages.push(Message::tool_result("call_1", "found", true));
        assert_eq!(input_token_bound(&req), 9 + 6 + 53 + 47);
    }

    #[test]
    fn hostile_tool_fields_cannot_make_the_bound_small() {
        // Every byte of a tool's and a call's fields counts, whatever the text.
        let cjk = "漢".repeat(100);
        let mut req = request(None, &[]);
        req.tools.push(ToolSpec {
            name: "t".into(),
            description: cjk.clone(),
            parameters: serde_json::json!({"description": cjk}),
        });
        req.messages.push(Message::assistant_calls(
            "",
            vec![ToolCall { id: "i".into(), name: "t".into(), arguments: serde_json::json!(cjk) }],
        ));
        req.messages.push(Message::tool_result(cjk.clone(), cjk.clone(), false));
        // 3 priming + 600 preamble; the tool: 1 + 300 + 318 + 32; the assistant message: 0 + 4,
        // its call: 1 + 1 + 302 + 32; the result: 300 + 4, its id: 300 + 32.
        assert_eq!(input_token_bound(&req), 3 + 600 + 651 + 4 + 336 + 636);
    }

    #[test]
    fn hostile_text_cannot_make_the_bound_small() {
        // Text whose tokens outnumber a quarter of its characters: CJK (3 bytes and 1 to 2
        // tokens a character), emoji (4 bytes, 1 to 3 tokens), base64 (about 3 characters a
        // token). For each, the bound covers one token per byte, the worst any byte-level
        // tokenizer can do.
        for (text, chars) in [("漢".repeat(600), 600), ("🦀".repeat(450), 450), ("QUJD".repeat(450), 1800)] {
            assert_eq!(text.chars().count(), chars);
            let bound = input_token_bound(&request(None, &[&text]));
            assert_eq!(bound, 1800 + 4 + 3, "{}", &text[..12]);
        }
    }

    #[test]
    fn error_message_prefers_the_documented_shape() {
        let openai = br#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":null}}"#;
        assert_eq!(error_message(openai), "requests: Rate limit reached");
        assert_eq!(error_message(br#"{"error":"model not found"}"#), "model not found");
        assert_eq!(error_message(b"upstream down"), "upstream down");
        assert_eq!(error_message(b""), "(empty body)");
    }

    #[test]
    fn scrub_removes_the_key_and_cuts() {
        let key = SecretString::from("sk-secret");
        assert_eq!(scrub("bad key sk-secret here", Some(&key)), "bad key **REDACTED** here");
        let long = "é".repeat(1000);
        assert_eq!(scrub(&long, None).chars().count(), MAX_ERROR_MESSAGE_CHARS + 1);
    }

    #[test]
    fn config_is_tagged_and_refuses_unknown_fields() {
        let cfg: ProviderConfig =
            toml::from_str("kind = \"openai\"\nbase_url = \"http://localhost:11434/v1\"\n").expect("valid");
        assert!(matches!(cfg, ProviderConfig::OpenAi(ref c) if c.timeout_secs == DEFAULT_TIMEOUT_SECS));
        let cfg: ProviderConfig = toml::from_str("kind = \"anthropic\"\napi_key = \"k\"\n").expect("valid");
        assert!(
            matches!(cfg, ProviderConfig::Anthropic(ref c) if c.version == "2023-06-01" && c.base_url == "https://api.anthropic.com")
        );
        let err = toml::from_str::<ProviderConfig>("kind = \"openai\"\nbase_url = \"x\"\nbase_uri = \"y\"\n")
            .expect_err("unknown field");
        assert!(err.to_string().contains("base_uri"), "{err}");
        assert!(toml::from_str::<ProviderConfig>("kind = \"gemini\"\n").is_err());
    }

    #[test]
    fn debug_redacts_keys_and_header_values() {
        let cfg: ProviderConfig = toml::from_str(
            "kind = \"openai\"\nbase_url = \"http://x/v1\"\napi_key = \"sk-live-123\"\n[extra_headers]\nOpenAI-Project = \"proj-secret\"\n",
        )
        .expect("valid");
        let text = format!("{cfg:?}");
        assert!(!text.contains("sk-live-123") && !text.contains("proj-secret"), "{text}");
        let provider = build(&cfg).expect("builds");
        let text = format!("{provider:?}");
        assert!(!text.contains("sk-live-123") && !text.contains("proj-secret"), "{text}");
    }

    #[test]
    fn key_from_env_through_the_lookup() {
        let cfg: ProviderConfig =
            toml::from_str("kind = \"anthropic\"\napi_key_env = \"FLEET_TEST_KEY\"\n").expect("valid");
        assert!(build_with_env(&cfg, |_| Some("k".into())).is_ok());
        let err = build_with_env(&cfg, |_| None).expect_err("unset");
        assert!(err.to_string().contains("FLEET_TEST_KEY"), "{err}");
    }
}
