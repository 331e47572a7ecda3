//! OpenAI-compatible chat completions: `POST {base_url}/chat/completions`.
//!
//! Works with OpenAI itself and with the servers that copy its API (Ollama's `/v1`, vLLM,
//! LiteLLM). The system prompt goes first in `messages`; the key, when one is configured,
//! as `Authorization: Bearer`.

use std::fmt;
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::{Completion, CompletionRequest, OpenAiConfig, Provider, ProviderError, TokenUsage};

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
}

#[derive(Deserialize)]
struct Usage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
}

impl Provider for OpenAiProvider {
    async fn complete(&self, req: &CompletionRequest) -> Result<Completion, ProviderError> {
        let system = req.system.as_deref().map(|content| WireMessage { role: "system", content });
        let messages = system
            .into_iter()
            .chain(req.messages.iter().map(|m| WireMessage { role: m.role.as_str(), content: &m.content }))
            .collect();
        let body = Body { model: &req.model, messages, max_tokens: req.max_tokens, temperature: req.temperature };
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
    Ok(Completion {
        text: message.content.unwrap_or_default(),
        // Read from the answer by the next commit.
        tool_calls: Vec::new(),
        usage,
        model: answer.model.ok_or_else(|| super::missing(NAME, "model"))?,
        finish_reason: choice.finish_reason,
    })
}
