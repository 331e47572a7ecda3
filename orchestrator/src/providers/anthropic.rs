//! The Anthropic Messages API: `POST {base_url}/v1/messages`.
//!
//! The system prompt is the top-level `system` field, not a message; the key goes in
//! `x-api-key`, the API version in `anthropic-version`.

use std::fmt;
use std::time::Duration;

use reqwest::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::{AnthropicConfig, Completion, CompletionRequest, Provider, ProviderError, TokenUsage};

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
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
}

#[derive(Serialize)]
struct WireMessage<'a> {
    role: &'a str,
    content: &'a str,
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
            messages: req.messages.iter().map(|m| WireMessage { role: m.role.as_str(), content: &m.content }).collect(),
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
    let text = blocks.into_iter().filter(|b| b.kind == "text").filter_map(|b| b.text).collect::<String>();
    Ok(Completion {
        text,
        // Read from the answer by the next commit.
        tool_calls: Vec::new(),
        usage,
        model: answer.model.ok_or_else(|| super::missing(NAME, "model"))?,
        finish_reason: answer.stop_reason,
    })
}
