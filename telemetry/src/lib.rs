//! What every agentfleet binary starts with.
//!
//! # Layout
//! - [`init`]: structured logs (`tracing`), JSON or text, filtered by `RUST_LOG`, written
//!   through [`Redactor`], a second net behind the `Secret` types that catches token
//!   patterns (bearer tokens, JWTs, API keys, passwords in URLs) before they reach a log.
//! - [`shutdown`]: a cancellation token cancelled on SIGINT or SIGTERM, and a grace-period
//!   helper for draining.
//! - [`parse_args`]: command-line parsing with the fleet's exit codes (0 for `--help`, 64
//!   for usage errors).

use std::io::{self, Write};
use std::sync::OnceLock;
use std::time::Duration;

use regex::Regex;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// Patterns that must never reach a log, with what replaces them.
fn patterns() -> &'static [(Regex, &'static str)] {
    static P: OnceLock<Vec<(Regex, &'static str)>> = OnceLock::new();
    P.get_or_init(|| {
        [
            // Passwords in URLs: scheme://user:password@host
            (r"(?P<pre>[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]+@", "${pre}**REDACTED**@"),
            (r"(?i)(?P<pre>bearer\s+)[A-Za-z0-9._~+/=-]+", "${pre}**REDACTED**"),
            // JWTs (capability leases, operator tokens).
            (r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]+", "**REDACTED**"),
            // Provider keys and tokens (OpenAI/Anthropic sk-…, GitHub gh?_…, Slack xox?-…, AWS AKIA…).
            (r"\bsk-[A-Za-z0-9_-]{16,}", "**REDACTED**"),
            (r"\bgh[pousr]_[A-Za-z0-9]{20,}", "**REDACTED**"),
            (r"\bxox[abposr]-[A-Za-z0-9-]{10,}", "**REDACTED**"),
            (r"\bAKIA[0-9A-Z]{16}\b", "**REDACTED**"),
            // Telegram bot tokens: <digits>:<35 chars>
            (r"\b[0-9]{6,12}:[A-Za-z0-9_-]{30,}", "**REDACTED**"),
        ]
        .into_iter()
        .map(|(p, r)| (Regex::new(p).expect("redaction patterns are valid"), r))
        .collect()
    })
}

/// Replaces every secret-looking token in `line`.
pub fn redact(line: &str) -> String {
    let mut out = line.to_owned();
    for (re, with) in patterns() {
        if re.is_match(&out) {
            out = re.replace_all(&out, *with).into_owned();
        }
    }
    out
}

/// A writer that redacts each formatted log record before writing it to stderr.
#[derive(Debug, Default, Clone, Copy)]
pub struct Redactor;

/// One log record being formatted.
#[derive(Debug, Default)]
pub struct RedactingWriter {
    buf: Vec<u8>,
}

impl Write for RedactingWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for RedactingWriter {
    fn drop(&mut self) {
        // tracing-subscriber formats one record per writer, so the record is whole here.
        let text = redact(&String::from_utf8_lossy(&self.buf));
        let _ = io::stderr().lock().write_all(text.as_bytes());
    }
}

impl<'a> MakeWriter<'a> for Redactor {
    type Writer = RedactingWriter;
    fn make_writer(&'a self) -> Self::Writer {
        RedactingWriter::default()
    }
}

/// Installs the global subscriber: JSON lines when `json`, text otherwise; level from
/// `RUST_LOG` (default `info`). Call once, first thing in `main`.
pub fn init(service: &'static str, json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(Redactor).with_target(false);
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
    tracing::info!(service, version = env!("CARGO_PKG_VERSION"), "Starting.");
}

/// Exit code for invalid arguments or configuration (sysexits' EX_USAGE).
pub const EX_USAGE: u8 = 64;

/// Parses the command line; on `--help`/`--version` prints and returns exit code 0, on a
/// usage error prints clap's message and returns 64.
pub fn parse_args<T: clap::Parser>() -> Result<T, std::process::ExitCode> {
    T::try_parse().map_err(|e| {
        let _ = e.print();
        if e.use_stderr() { std::process::ExitCode::from(EX_USAGE) } else { std::process::ExitCode::SUCCESS }
    })
}

/// The body every fleet binary's `main` shares, after [`parse_args`] and [`init`]: loads
/// the configuration (an error is the operator's to fix: logged, printed, exit 64), then
/// runs the service until SIGINT/SIGTERM (exit 0) or a failure (logged, printed, exit 1).
pub async fn serve<C, E, F, Fut, RE>(service: &str, config: Result<C, E>, run: F) -> std::process::ExitCode
where
    E: std::fmt::Display,
    F: FnOnce(C, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = Result<(), RE>>,
    RE: std::fmt::Display,
{
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "Invalid configuration.");
            eprintln!("{service}: invalid configuration: {e}");
            return std::process::ExitCode::from(EX_USAGE);
        }
    };
    match run(config, shutdown()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` shows an anyhow chain's causes on one line.
            let e = format!("{e:#}");
            tracing::error!(error = %e, "Stopped on an error.");
            eprintln!("{service}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Cancelled on the first SIGINT or SIGTERM.
pub fn shutdown() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("Shutdown signal received; draining.");
        t.cancel();
    });
    token
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Waits for `work` to finish, at most `grace`; returns false when it had to give up.
pub async fn drain(work: impl std::future::Future<Output = ()>, grace: Duration) -> bool {
    if tokio::time::timeout(grace, work).await.is_err() {
        tracing::warn!(grace_secs = grace.as_secs(), "Drain did not finish within the grace period; stopping anyway.");
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_and_the_rest_kept() {
        let line = "connect redis://orchestrator:s3cret-pass@127.0.0.1:6379 with Authorization: Bearer abc.def-ghi \
                    lease eyJhbGciOiJIUzI1NiJ9.eyJ0YXNrIjoiMDE5MyJ9.c2lnbmF0dXJl key sk-proj-ABCDEFGHIJKLMNOPQRST \
                    bot 123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw0 gh ghp_0123456789abcdefghijABCDEFGHIJ task 42";
        let out = redact(line);
        for secret in ["s3cret-pass", "abc.def-ghi", "eyJhbGciOiJIUzI1NiJ9", "sk-proj-ABCD", "AAHdqTcv", "ghp_0123"] {
            assert!(!out.contains(secret), "{secret} leaked: {out}");
        }
        assert!(out.contains("redis://orchestrator:**REDACTED**@127.0.0.1:6379"), "{out}");
        assert!(out.contains("task 42"));
    }
}
