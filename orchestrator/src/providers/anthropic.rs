//! The Anthropic Messages API: `POST {base_url}/v1/messages`.
//!
//! The system prompt is the top-level `system` field, not a message; the key goes in
//! `x-api-key`, the API version in `anthropic-version`.
//!
//! Tools are sent as `tools: [{name, description, input_schema}]` (left out when there are
//! none). An assistant message that called tools is a list of blocks: a `text` block when it
//! said something, then one `tool_use` block (`id`, `name`, `input`) per call; one without
//! calls stays a plain string. The API has no tool role: tool results are `tool_result`
//! blocks (`tool_use_id`, `content`, `is_error`) of a **user** message, and since roles must
//! alternate, consecutive results share one user message, and a user message right after
//! them joins it as a `text` block. The answer's `tool_use` blocks become [`ToolCall`]s;
//! its `text` blocks, concatenated, the text.

use std::fmt;
use std::time::Duration;

use reqwest::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::{
    AnthropicConfig, Completion, CompletionRequest, Message, MessageRole, Provider, ProviderError, TokenUsage, ToolCall,
};

const NAME: &str = "anthropic";
const API_KEY: HeaderName = HeaderName::from_static("x-api-key");
const VERSION: HeaderName = HeaderName::from_static("anthropic-version");

/// A client of the Anthropic Messages API.
pub struct AnthropicProvider {
    /// Shared HTTP client (rustls, timeout, no redirects).
    client: reqwest::Client,
    /// `{base_url}/v1/messages`.
    url: reqwest::Url,
    /// The `x-api-key` value.
    key: SecretString,
    /// The `anthropic-version` value.
    version: HeaderValue,
    /// The client's timeout, for [`ProviderError::Timeout`].
    timeout: Duration,
}

impl fmt::Debug for AnthropicProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnthropicProvider")
            .field("url", &self.url.as_str())
            .field("key", &super::REDACTED)
            .field("version", &self.version)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl AnthropicProvider {
    /// Checks `cfg` and builds the client; `env` resolves `api_key_env`.
    pub fn new(cfg: &AnthropicConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ProviderError> {
        let key = super::resolve_key(cfg.api_key.as_ref(), cfg.api_key_env.as_deref(), env)?
            .ok_or_else(|| ProviderError::config("api_key", "the Anthropic API needs api_key or api_key_env"))?;
        let version = HeaderValue::from_str(cfg.version.trim())
            .map_err(|_| ProviderError::config("version", "not a valid header value"))?;
        let timeout = super::timeout(cfg.timeout_secs)?;
        Ok(AnthropicProvider {
            client: super::http_client(timeout)?,
            url: super::endpoint(&cfg.base_url, "/v1/messages")?,
            key,
            version,
            timeout,
        })
    }
}

#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<&'a str>,
    messages: Vec<WireMessage<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<WireTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
}

#[derive(Serialize)]
struct WireMessage<'a> {
    role: &'static str,
    content: WireContent<'a>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum WireContent<'a> {
    /// A message of plain text.
    Text(&'a str),
    /// A message of blocks: an assistant's tool calls, a user's tool results.
    Blocks(Vec<WireBlock<'a>>),
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireBlock<'a> {
    Text { text: &'a str },
    ToolUse { id: &'a str, name: &'a str, input: &'a serde_json::Value },
    ToolResult { tool_use_id: &'a str, content: &'a str, is_error: bool },
}

#[derive(Serialize)]
struct WireTool<'a> {
    name: &'a str,
    description: &'a str,
    input_schema: &'a serde_json::Value,
}

/// The conversation as the API wants it: tool results in user messages, consecutive ones
/// (and a user message right after them) merged into one.
fn wire_messages(messages: &[Message]) -> Vec<WireMessage<'_>> {
    let mut out: Vec<WireMessage<'_>> = Vec::with_capacity(messages.len());
    for m in messages {
        // The user message of tool results just before this one, if it is that.
        let open = match out.last_mut() {
            Some(WireMessage { role: "user", content: WireContent::Blocks(blocks) }) => Some(blocks),
            _ => None,
        };
        match (m.role, open) {
            (MessageRole::Assistant, _) if m.tool_calls.is_empty() => {
                out.push(WireMessage { role: "assistant", content: WireContent::Text(&m.content) });
            }
            (MessageRole::Assistant, _) => {
                let text = (!m.content.is_empty()).then(|| WireBlock::Text { text: &m.content });
                let calls =
                    m.tool_calls.iter().map(|c| WireBlock::ToolUse { id: &c.id, name: &c.name, input: &c.arguments });
                out.push(WireMessage {
                    role: "assistant",
                    content: WireContent::Blocks(text.into_iter().chain(calls).collect()),
                });
            }
            (MessageRole::Tool, open) => {
                let block = WireBlock::ToolResult {
                    tool_use_id: m.tool_call_id.as_deref().unwrap_or_default(),
                    content: &m.content,
                    is_error: m.is_error,
                };
                match open {
                    Some(blocks) => blocks.push(block),
                    None => out.push(WireMessage { role: "user", content: WireContent::Blocks(vec![block]) }),
                }
            }
            (MessageRole::User, Some(blocks)) => {
                if !m.content.is_empty() {
                    blocks.push(WireBlock::Text { text: &m.content });
                }
            }
            (MessageRole::User, None) => out.push(WireMessage { role: "user", content: WireContent::Text(&m.content) }),
        }
    }
    out
}

#[derive(Deserialize)]
struct Answer {
    model: Option<String>,
    content: Option<Vec<Block>>,
    stop_reason: Option<String>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Block {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
    /// `tool_use` blocks: the call's id, tool and arguments.
    id: Option<String>,
    name: Option<String>,
    input: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Usage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
}

impl Provider for AnthropicProvider {
    async fn complete(&self, req: &CompletionRequest) -> Result<Completion, ProviderError> {
        let body = Body {
            model: &req.model,
            max_tokens: req.max_tokens,
            system: req.system.as_deref(),
            messages: wire_messages(&req.messages),
            tools: req
                .tools
                .iter()
                .map(|t| WireTool { name: &t.name, description: &t.description, input_schema: &t.parameters })
                .collect(),
            temperature: req.temperature,
        };
        let request = self
            .client
            .post(self.url.clone())
            .header(API_KEY, super::secret_header("api_key", self.key.expose_secret())?)
            .header(VERSION, self.version.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .json(&body);
        let bytes = super::send(NAME, self.timeout, request, Some(&self.key)).await?;
        parse(&bytes)
    }

    fn name(&self) -> &str {
        NAME
    }
}

fn parse(bytes: &[u8]) -> Result<Completion, ProviderError> {
    let answer: Answer = super::decode_json(NAME, bytes)?;
    let usage = answer.usage.ok_or(ProviderError::NoUsage { provider: NAME })?;
    // Cache reads and writes are input too; we send no cache_control, but a gateway might.
    let input_tokens = usage
        .input_tokens
        .ok_or_else(|| super::missing(NAME, "usage.input_tokens"))?
        .saturating_add(usage.cache_creation_input_tokens.unwrap_or(0))
        .saturating_add(usage.cache_read_input_tokens.unwrap_or(0));
    let usage = TokenUsage {
        input_tokens,
        output_tokens: usage.output_tokens.ok_or_else(|| super::missing(NAME, "usage.output_tokens"))?,
    };
    let blocks = answer.content.ok_or_else(|| super::missing(NAME, "content"))?;
    let mut text = String::new();
    let mut tool_calls = Vec::new();
    for (i, block) in blocks.into_iter().enumerate() {
        match block.kind.as_str() {
            "text" => text.push_str(block.text.as_deref().unwrap_or_default()),
            "tool_use" => {
                let field = |name: &str| format!("content[{i}].{name}");
                tool_calls.push(ToolCall {
                    id: block.id.ok_or_else(|| super::missing(NAME, &field("id")))?,
                    name: block.name.ok_or_else(|| super::missing(NAME, &field("name")))?,
                    arguments: block.input.unwrap_or_else(|| serde_json::Value::Object(serde_json::Map::new())),
                });
            }
            _ => {}
        }
    }
    Ok(Completion {
        text,
        tool_calls,
        usage,
        model: answer.model.ok_or_else(|| super::missing(NAME, "model"))?,
        finish_reason: answer.stop_reason,
    })
}
