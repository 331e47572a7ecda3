//! What every agentfleet binary starts with.
//!
//! # Layout
//! - [`redact`] (`redact.rs`): the fleet's one redaction set (AWS, GitHub, GitLab, Slack and
//!   model-provider keys, `Authorization` headers, JWTs, private key blocks, passwords in
//!   URLs and connection strings) and [`redact()`], [`redact_json`], [`redact_string`],
//!   which every sink of free text calls: logs, API answers, the audit trail, stored
//!   worker summaries, alerts.
//! - [`init`]: structured logs (`tracing`), JSON or text, filtered by `RUST_LOG`, written
//!   through [`Redacting`], a second net behind the `Secret` types that passes each whole
//!   record through [`redact()`] before it reaches stderr; [`subscriber`] builds the same
//!   for a writer of the caller's choice (tests).
//! - [`shutdown`]: a cancellation token cancelled on SIGINT or SIGTERM, and a grace-period
//!   helper for draining.
//! - [`parse_args`]: command-line parsing with the fleet's exit codes (0 for `--help`, 64
//!   for usage errors).

pub mod redact;

use std::io::{self, Write};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

pub use redact::{REDACTED, redact, redact_json, redact_string};

/// A [`MakeWriter`] whose writers redact each formatted log record before handing it to
/// the inner writer (stderr in [`init`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct Redacting<M>(pub M);

/// One log record being formatted; written, redacted, when dropped.
#[derive(Debug)]
pub struct RedactingWriter<W: Write> {
    buf: Vec<u8>,
    inner: W,
}

impl<W: Write> Write for RedactingWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<W: Write> Drop for RedactingWriter<W> {
    fn drop(&mut self) {
        // tracing-subscriber formats one record per writer, so the record is whole here: a
        // private key block over several lines is seen at once.
        // The record's final newline is kept out of it: a private key block cut short is
        // redacted up to where it stops looking like one, line breaks included.
        let text = String::from_utf8_lossy(&self.buf);
        let (body, end) = text.strip_suffix('\n').map_or((&*text, ""), |b| (b, "\n"));
        let _ = self.inner.write_all(redact(body).as_bytes());
        let _ = self.inner.write_all(end.as_bytes());
        let _ = self.inner.flush();
    }
}

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for Redacting<M> {
    type Writer = RedactingWriter<M::Writer>;
    fn make_writer(&'a self) -> Self::Writer {
        RedactingWriter { buf: Vec::new(), inner: self.0.make_writer() }
    }
}

/// The fleet's log subscriber: JSON lines when `json`, text otherwise, every record
/// redacted on its way to `writer`. No ANSI colours: escape codes between a field's name,
/// its `=` and its value would hide `password=…` or `…=ghp_…` from the redaction.
pub fn subscriber<W>(json: bool, filter: EnvFilter, writer: W) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Redacting(writer))
        .with_ansi(false)
        .with_target(false);
    if json { Box::new(builder.json().finish()) } else { Box::new(builder.finish()) }
}

/// Installs the global subscriber: JSON lines when `json`, text otherwise; level from
/// `RUST_LOG` (default `info`). Call once, first thing in `main`.
pub fn init(service: &'static str, json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // `try_init`, not `set_global_default`: it also routes the `log` crate's records here.
    let _ = tracing_subscriber::util::SubscriberInitExt::try_init(subscriber(json, filter, io::stderr));
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
    #![allow(clippy::unwrap_used)]

    use super::*;
    use fleet_testkit::secrets::SAMPLES;
    use std::sync::{Arc, Mutex};

    /// Collects what the subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    /// Logs `f`'s events through the fleet's subscriber; returns what reached the writer.
    fn logged(json: bool, f: impl FnOnce()) -> String {
        let out = Captured::default();
        tracing::subscriber::with_default(subscriber(json, EnvFilter::new("info"), out.clone()), f);
        let bytes = out.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn json_logs_redact_every_sample_in_messages_and_fields_also_after_an_escape() {
        for s in SAMPLES {
            let text = logged(true, || {
                tracing::info!(
                    summary = s.text,
                    after_newline = format!("ok\n{}", s.text),
                    "Worker said {} and stopped.",
                    s.text
                );
                tracing::warn!(error = %format!("failed:\t{}", s.text), "Tab before it.");
            });
            assert!(!text.contains(s.secret), "{}: {text}", s.name);
            let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
            assert_eq!(lines.len(), 2, "{}: {text}", s.name);
            assert_eq!(lines[0]["fields"]["message"], format!("Worker said {} and stopped.", s.redacted), "{}", s.name);
            assert_eq!(lines[0]["fields"]["summary"], s.redacted, "{}", s.name);
            assert_eq!(lines[0]["fields"]["after_newline"], format!("ok\n{}", s.redacted), "{}", s.name);
            assert_eq!(lines[1]["fields"]["error"], format!("failed:\t{}", s.redacted), "{}", s.name);
        }
    }

    #[test]
    fn text_logs_redact_every_sample_in_messages_and_fields_also_after_an_escape() {
        for s in SAMPLES {
            let text = logged(false, || {
                tracing::info!(summary = s.text, "Worker said {} and stopped.", s.text);
                tracing::info!(error = %format!("failed:\t{}", s.text), "Tab before it.");
                // A `Display` field is written bare after `name=`: with colours on, an escape
                // code would stand between the `=` and the secret.
                tracing::info!(token = %s.text, "Display field.");
            });
            assert!(!text.contains(s.secret), "{}: {text}", s.name);
            // A message is written as it is; a string field as Rust writes a `&str` with
            // `{:?}`: quoted, with `\n` for a newline.
            assert!(
                text.contains(&format!("Worker said {} and stopped. summary={:?}\n", s.redacted, s.redacted)),
                "{}: {text}",
                s.name
            );
            assert!(text.contains(&format!("Tab before it. error=failed:\t{}\n", s.redacted)), "{}: {text}", s.name);
            assert!(text.contains(&format!(" INFO Display field. token={}\n", s.redacted)), "{}: {text}", s.name);
        }
    }
}
