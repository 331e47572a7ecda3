//! The HTTP API's client: where the API is, the bearer token, one request at a time.
//!
//! The token is sent only in the `Authorization` header (marked sensitive) and never
//! printed. An error answer's `{"error": "…"}` becomes the message; 400, 413, 415 and 422
//! (the server refused what the operator passed) are [`UsageError`]s, so they exit 64;
//! everything else (401, 403, 404, 409, 429, 5xx, an unreachable API) exits 1.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use reqwest::{Method, StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde_json::Value;

use crate::exit::UsageError;

/// Where the API listens unless told otherwise.
pub const DEFAULT_API: &str = "http://127.0.0.1:8080";

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The options every API command shares.
#[derive(Debug, Args)]
pub struct ApiArgs {
    /// The orchestrator's HTTP API.
    #[arg(long = "api", value_name = "URL", env = "FLEET_API_URL", default_value = DEFAULT_API, value_parser = parse_api_url)]
    pub api: Url,

    /// Bearer token (from `fleetctl token issue`). Never printed. Prefer the environment
    /// variable: a command line is visible to every user of the host.
    #[arg(long, value_name = "TOKEN", env = "FLEET_TOKEN", hide_env_values = true, value_parser = parse_secret)]
    pub token: Option<SecretString>,
}

/// An http(s) URL; its path becomes the prefix of every route.
fn parse_api_url(text: &str) -> Result<Url, String> {
    let mut url = Url::parse(text).map_err(|e| format!("not a URL ({e}); expected e.g. {DEFAULT_API}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("the API URL must start with http:// or https://, not {}://", url.scheme()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("the API URL must not hold credentials; pass the token with --token or FLEET_TOKEN".into());
    }
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    url.set_query(None);
    url.set_fragment(None);
    Ok(url)
}

/// Takes a secret as it is: a parse error here would make clap quote the value.
fn parse_secret(value: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(value.into())
}

/// A connection to the API with a token.
#[derive(Debug)]
pub struct Client {
    /// The API's base URL, ending in `/`.
    base: Url,
    /// Sent as `Authorization: Bearer …`.
    token: SecretString,
    /// Connection pool, timeouts.
    http: reqwest::Client,
}

impl Client {
    /// A client for `args`; no token is a usage error.
    pub fn new(args: &ApiArgs) -> anyhow::Result<Self> {
        let Some(token) = crate::files::secret_or_file(args.token.clone(), "FLEET_TOKEN")? else {
            return Err(UsageError::new(
                "no API token: pass --token, or set FLEET_TOKEN or FLEET_TOKEN_FILE (an admin issues tokens with `fleetctl token issue`)",
            )
            .into());
        };
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("fleetctl/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("Failed to set up the HTTP client")?;
        Ok(Self { base: args.api.clone(), token, http })
    }

    /// `GET path` (relative to the base, e.g. `v1/tasks`).
    pub async fn get(&self, path: &str, query: &[(&str, String)]) -> anyhow::Result<Value> {
        self.send(Method::GET, path, query, None::<&()>).await
    }

    /// `POST path` with an optional JSON body.
    pub async fn post<B: Serialize + ?Sized>(&self, path: &str, body: Option<&B>) -> anyhow::Result<Value> {
        self.send(Method::POST, path, &[], body).await
    }

    async fn send<B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&B>,
    ) -> anyhow::Result<Value> {
        let url = self.base.join(path).with_context(|| format!("Failed to build the URL for {path}"))?;
        let mut request = self.http.request(method.clone(), url.clone()).bearer_auth(self.token.expose_secret());
        if !query.is_empty() {
            request = request.query(query);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the API at {}: {}; is the orchestrator running, and is --api (FLEET_API_URL) right?",
                self.base,
                chain(&e)
            )
        })?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| anyhow::anyhow!("the API's answer to {method} {url} was cut off: {}", chain(&e)))?;
        if status.is_success() {
            return serde_json::from_str(&text)
                .with_context(|| format!("the API's answer to {method} {url} is not JSON ({status})"));
        }
        let message = error_message(&text);
        let described = format!("the API refused {method} /{path}: {status}: {message}");
        if is_input_error(status) { Err(UsageError::new(described).into()) } else { Err(anyhow::anyhow!(described)) }
    }
}

/// 400, 413, 415, 422: the server refused what the operator passed (exit 64).
pub fn is_input_error(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::BAD_REQUEST
            | StatusCode::PAYLOAD_TOO_LARGE
            | StatusCode::UNSUPPORTED_MEDIA_TYPE
            | StatusCode::UNPROCESSABLE_ENTITY
    )
}

/// The `error` of a JSON error body, or the start of whatever else came back.
fn error_message(body: &str) -> String {
    let parsed: Option<String> =
        serde_json::from_str::<Value>(body).ok().and_then(|v| v.get("error")?.as_str().map(str::to_owned));
    match parsed {
        Some(message) => message,
        None if body.trim().is_empty() => "(no details)".into(),
        None => crate::tasks_cmd::clean(body.trim(), 300),
    }
}

/// An error and its causes, ": "-separated (reqwest's own text omits the cause).
fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let _ = write!(out, ": {c}");
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn api_urls_get_a_trailing_slash_and_credentials_are_refused() {
        assert_eq!(parse_api_url("http://127.0.0.1:8080").unwrap().as_str(), "http://127.0.0.1:8080/");
        let prefixed = parse_api_url("https://fleet.example/api?x=1").unwrap();
        assert_eq!(prefixed.join("v1/tasks").unwrap().as_str(), "https://fleet.example/api/v1/tasks");
        assert!(parse_api_url("ftp://host").is_err());
        assert!(parse_api_url("http://user:pw@host").is_err());
        assert!(parse_api_url("localhost:8080").is_err());
    }

    #[test]
    fn error_bodies_become_messages() {
        assert_eq!(error_message(r#"{"error":"task x not found"}"#), "task x not found");
        assert_eq!(error_message(""), "(no details)");
        assert_eq!(error_message("plain\ttext"), "plain\\ttext");
        assert!(is_input_error(StatusCode::UNPROCESSABLE_ENTITY) && !is_input_error(StatusCode::CONFLICT));
    }
}
