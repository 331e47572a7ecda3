//! OpenAI-compatible chat completions: `POST {base_url}/chat/completions`.
//!
//! Works with OpenAI itself and with the servers that copy its API (Ollama's `/v1`, vLLM,
//! LiteLLM). The system prompt goes first in `messages`; the key, when one is configured,
//! as `Authorization: Bearer`.
//!
//! Tools are sent as `tools: [{"type": "function", "function": {name, description,
//! parameters}}]` (left out when there are none). An assistant message that called tools
//! carries `tool_calls: [{id, "type": "function", "function": {name, arguments}}]` with the
//! arguments as JSON text, and `content: null` when it said nothing; a tool result is a
//! `{"role": "tool", tool_call_id, content}` message. OpenAI has no error flag on a result:
//! a failed one's content starts with `ERROR: `. The answer's
//! `choices[0].message.tool_calls` become [`ToolCall`]s; arguments that are not JSON text
//! are kept as a JSON string holding the text.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::{
    Completion, CompletionRequest, Message, MessageRole, OpenAiConfig, Provider, ProviderError, TokenUsage, ToolCall,
    ToolSpec,
};

const NAME: &str = "openai";

/// A client of one OpenAI-compatible endpoint.
pub struct OpenAiProvider {
    /// Shared HTTP client (rustls, timeout, no redirects).
    client: reqwest::Client,
    /// `{base_url}/chat/completions`.
    url: reqwest::Url,
    /// The bearer key; `None` for servers that want none (Ollama).
    key: Option<SecretString>,
    /// `extra_headers`, values marked sensitive.
    headers: HeaderMap,
    /// The client's timeout, for [`ProviderError::Timeout`].
    timeout: Duration,
}

impl fmt::Debug for OpenAiProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiProvider")
            .field("url", &self.url.as_str())
            .field("key", &self.key.as_ref().map(|_| super::REDACTED))
            .field("extra_headers", &self.headers.keys().map(|k| k.as_str()).collect::<Vec<_>>())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl OpenAiProvider {
    /// Checks `cfg` and builds the client; `env` resolves `api_key_env`.
    pub fn new(cfg: &OpenAiConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ProviderError> {
        let key = super::resolve_key(cfg.api_key.as_ref(), cfg.api_key_env.as_deref(), env)?;
        let headers = super::extra_headers(&cfg.extra_headers)?;
        if key.is_some() && headers.contains_key(AUTHORIZATION) {
            return Err(ProviderError::config(
                "extra_headers.Authorization",
                "conflicts with api_key / api_key_env; set only one",
            ));
        }
        let timeout = super::timeout(cfg.timeout_secs)?;
        Ok(OpenAiProvider {
            client: super::http_client(timeout)?,
            url: super::endpoint(&cfg.base_url, "/chat/completions")?,
            key,
            headers,
            timeout,
        })
    }
}

#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    messages: Vec<WireMessage<'a>>,
    max_tokens: u32,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<WireTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
}

#[derive(Serialize)]
struct WireMessage<'a> {
    role: &'a str,
    /// `null` only on an assistant message that called tools and said nothing.
    content: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<WireToolCall<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<&'a str>,
}

impl<'a> WireMessage<'a> {
    fn of(m: &'a Message) -> Self {
        let content = match m.role {
            MessageRole::Assistant if !m.tool_calls.is_empty() && m.content.is_empty() => None,
            MessageRole::Tool if m.is_error => Some(Cow::Owned(format!("ERROR: {}", m.content))),
            _ => Some(Cow::Borrowed(m.content.as_str())),
        };
        WireMessage {
            role: m.role.as_str(),
            content,
            tool_calls: m.tool_calls.iter().map(WireToolCall::of).collect(),
            tool_call_id: m.tool_call_id.as_deref(),
        }
    }
}

#[derive(Serialize)]
struct WireTool<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    function: WireFunction<'a>,
}

#[derive(Serialize)]
struct WireFunction<'a> {
    name: &'a str,
    description: &'a str,
    parameters: &'a serde_json::Value,
}

impl<'a> WireTool<'a> {
    fn of(t: &'a ToolSpec) -> Self {
        WireTool {
            kind: "function",
            function: WireFunction { name: &t.name, description: &t.description, parameters: &t.parameters },
        }
    }
}

#[derive(Serialize)]
struct WireToolCall<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    function: WireCall<'a>,
}

#[derive(Serialize)]
struct WireCall<'a> {
    name: &'a str,
    /// JSON text. Arguments kept as a string (text the model sent that was not JSON) go
    /// back as that text.
    arguments: Cow<'a, str>,
}

impl<'a> WireToolCall<'a> {
    fn of(c: &'a ToolCall) -> Self {
        let arguments = match &c.arguments {
            serde_json::Value::String(raw) => Cow::Borrowed(raw.as_str()),
            other => Cow::Owned(other.to_string()),
        };
        WireToolCall { id: &c.id, kind: "function", function: WireCall { name: &c.name, arguments } }
    }
}

#[derive(Deserialize)]
struct Answer {
    model: Option<String>,
    #[serde(default)]
    choices: Vec<Choice>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice {
    message: Option<AnswerMessage>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct AnswerMessage {
    /// `null` when the model only called tools or refused.
    content: Option<String>,
    /// Absent or `null` when the model called none.
    #[serde(default)]
    tool_calls: Option<Vec<AnswerToolCall>>,
}

#[derive(Deserialize)]
struct AnswerToolCall {
    id: Option<String>,
    function: Option<AnswerFunction>,
}

#[derive(Deserialize)]
struct AnswerFunction {
    name: Option<String>,
    /// JSON text, as documented; some compatible servers send the object itself.
    arguments: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Usage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
}

impl Provider for OpenAiProvider {
    async fn complete(&self, req: &CompletionRequest) -> Result<Completion, ProviderError> {
        let system = req.system.as_deref().map(|content| WireMessage {
            role: "system",
            content: Some(Cow::Borrowed(content)),
            tool_calls: Vec::new(),
            tool_call_id: None,
        });
        let messages = system.into_iter().chain(req.messages.iter().map(WireMessage::of)).collect();
        let body = Body {
            model: &req.model,
            messages,
            max_tokens: req.max_tokens,
            tools: req.tools.iter().map(WireTool::of).collect(),
            temperature: req.temperature,
        };
        let mut request = self
            .client
            .post(self.url.clone())
            .headers(self.headers.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .json(&body);
        if let Some(key) = &self.key {
            let value = super::secret_header("api_key", &format!("Bearer {}", key.expose_secret()))?;
            request = request.header(AUTHORIZATION, value);
        }
        let bytes = super::send(NAME, self.timeout, request, self.key.as_ref()).await?;
        parse(&bytes)
    }

    fn name(&self) -> &str {
        NAME
    }
}

fn parse(bytes: &[u8]) -> Result<Completion, ProviderError> {
    let answer: Answer = super::decode_json(NAME, bytes)?;
    let usage = answer.usage.ok_or(ProviderError::NoUsage { provider: NAME })?;
    let usage = TokenUsage {
        input_tokens: usage.prompt_tokens.ok_or_else(|| super::missing(NAME, "usage.prompt_tokens"))?,
        output_tokens: usage.completion_tokens.ok_or_else(|| super::missing(NAME, "usage.completion_tokens"))?,
    };
    let choice = answer.choices.into_iter().next().ok_or_else(|| super::missing(NAME, "choices[0]"))?;
    let message = choice.message.ok_or_else(|| super::missing(NAME, "choices[0].message"))?;
    let tool_calls = message
        .tool_calls
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, call)| tool_call(i, call))
        .collect::<Result<_, _>>()?;
    Ok(Completion {
        text: message.content.unwrap_or_default(),
        tool_calls,
        usage,
        model: answer.model.ok_or_else(|| super::missing(NAME, "model"))?,
        finish_reason: choice.finish_reason,
    })
}

/// The `i`th tool call of the answer. Arguments that are not JSON text stay a JSON string
/// holding the text; absent arguments are an empty object.
fn tool_call(i: usize, call: AnswerToolCall) -> Result<ToolCall, ProviderError> {
    let field = |name: &str| format!("choices[0].message.tool_calls[{i}].{name}");
    let id = call.id.ok_or_else(|| super::missing(NAME, &field("id")))?;
    let function = call.function.ok_or_else(|| super::missing(NAME, &field("function")))?;
    let name = function.name.ok_or_else(|| super::missing(NAME, &field("function.name")))?;
    let arguments = match function.arguments {
        Some(serde_json::Value::String(text)) => serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        None | Some(serde_json::Value::Null) => serde_json::Value::Object(serde_json::Map::new()),
        Some(value) => value,
    };
    Ok(ToolCall { id, name, arguments })
}
