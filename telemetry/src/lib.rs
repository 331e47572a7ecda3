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
//!   for a writer of the caller's choice (tests). Spans are bridged to OpenTelemetry:
//!   every JSON line carries the `trace_id` and `span_id` of its span, and spans are
//!   exported over OTLP when an `OTEL_EXPORTER_OTLP_…` endpoint is set.
//! - [`metrics`] (`metrics.rs`): the `[metrics]` settings and the Prometheus endpoint
//!   (`GET /metrics`, optional bearer token) every long-running binary serves.
//! - [`otel`] (`otel.rs`): the `OTEL_…` settings ([`otel::OtelConfig`]) and the tracer
//!   provider with its OTLP exporter (HTTP/protobuf or gRPC) and bounded batch queue.
//! - [`propagate`] (`propagate.rs`): W3C `traceparent` to and from `tracing` spans, so a
//!   task's trace crosses HTTP, the outbox and the bus.
//! - [`shutdown`]: a cancellation token cancelled on SIGINT or SIGTERM, and a grace-period
//!   helper for draining.
//! - [`parse_args`]: command-line parsing with the fleet's exit codes (0 for `--help`, 64
//!   for usage errors).

pub mod metrics;
pub mod otel;
pub mod propagate;
pub mod redact;

use std::io::{self, Write};
use std::time::Duration;

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, Layer};

pub use otel::{OtelConfig, OtelConfigError};

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
    traced_subscriber(json, filter, writer, None)
}

/// [`subscriber`], with spans bridged to `provider`'s tracer when there is one: spans get
/// OpenTelemetry trace and span ids (on every JSON line, in envelopes' `traceparent`) and
/// are exported by the provider's processors.
pub fn traced_subscriber<W>(
    json: bool,
    filter: EnvFilter,
    writer: W,
    provider: Option<&SdkTracerProvider>,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let fmt = tracing_subscriber::fmt::layer().with_writer(Redacting(writer)).with_ansi(false).with_target(false);
    let fmt: Box<dyn Layer<_> + Send + Sync> = if json {
        Box::new(
            fmt.fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
                .event_format(WithTraceIds(tracing_subscriber::fmt::format().json())),
        )
    } else {
        Box::new(fmt)
    };
    let otel = provider.map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("agentfleet")).with_threads(false));
    Box::new(tracing_subscriber::registry().with(filter).with(otel).with(fmt))
}

/// A JSON event format that adds `trace_id` and `span_id` of the current span (when it
/// has one) to each line the inner format writes.
#[derive(Debug)]
struct WithTraceIds<F>(F);

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        // The OpenTelemetry layer attaches an entered span's context to the thread.
        let cx = opentelemetry::Context::current();
        let sc = cx.span().span_context().clone();
        let body = line.trim_end_matches('\n');
        match body.strip_suffix('}') {
            Some(open) if sc.is_valid() => {
                writer.write_str(open)?;
                write!(writer, ",\"trace_id\":\"{}\",\"span_id\":\"{}\"}}", sc.trace_id(), sc.span_id())?;
                writer.write_str(&line[body.len()..])
            }
            _ => writer.write_str(&line),
        }
    }
}

/// The running telemetry of a process; dropping it flushes the spans still queued (at most
/// [`FLUSH_GRACE`]) and stops the exporter.
#[derive(Debug)]
#[must_use = "dropping it stops trace export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// How long the exit waits for queued spans to be exported.
pub const FLUSH_GRACE: Duration = Duration::from_secs(3);

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown_with_timeout(FLUSH_GRACE);
        }
    }
}

/// Installs the global subscriber: JSON lines when `json`, text otherwise; level from
/// `RUST_LOG` (default `info`); spans bridged to OpenTelemetry and exported as the `OTEL_…`
/// variables say ([`OtelConfig::from_lookup`]). Call once, first thing in `main`, inside the
/// Tokio runtime, and keep the returned value until the end of `main`. An unusable `OTEL_…`
/// setting is printed and returned as exit code 64.
pub fn init(service: &'static str, json: bool) -> Result<Telemetry, std::process::ExitCode> {
    let otel = OtelConfig::from_lookup(service, |k| std::env::var(k).ok());
    init_with(service, json, otel).map_err(|e| {
        eprintln!("{service}: invalid configuration: {e}");
        std::process::ExitCode::from(EX_USAGE)
    })
}

/// [`init`] with the trace settings given (tests build them without the environment).
pub fn init_with(
    service: &'static str,
    json: bool,
    otel: Result<OtelConfig, OtelConfigError>,
) -> Result<Telemetry, OtelConfigError> {
    let otel = otel?;
    let provider = if otel.enabled { Some(otel.tracer_provider()?) } else { None };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // `try_init`, not `set_global_default`: it also routes the `log` crate's records here.
    let _ = tracing_subscriber::util::SubscriberInitExt::try_init(traced_subscriber(
        json,
        filter,
        io::stderr,
        provider.as_ref(),
    ));
    let export = otel.export.as_ref().map(|x| x.endpoint.as_str()).unwrap_or("none");
    tracing::info!(service, version = env!("CARGO_PKG_VERSION"), otlp = export, "Starting.");
    Ok(Telemetry { provider })
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

    /// A provider that exports nowhere: spans get ids, nothing leaves the process.
    fn local() -> SdkTracerProvider {
        OtelConfig::local("test").tracer_provider().unwrap()
    }

    fn traced_lines(provider: &SdkTracerProvider, f: impl FnOnce()) -> Vec<serde_json::Value> {
        let out = Captured::default();
        tracing::subscriber::with_default(
            traced_subscriber(true, EnvFilter::new("info"), out.clone(), Some(provider)),
            f,
        );
        let bytes = out.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    #[test]
    fn json_lines_in_a_span_carry_its_trace_and_span_ids_and_are_still_redacted() {
        let p = local();
        let s = &SAMPLES[0];
        let mut seen = None;
        let lines = traced_lines(&p, || {
            tracing::info!("Outside any span.");
            let span = tracing::info_span!("task", task_id = "t1");
            propagate::set_parent(&span, Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
            let _g = span.enter();
            seen = propagate::current();
            tracing::info!(summary = s.text, "Inside.");
        });
        assert_eq!(lines.len(), 2);
        assert!(lines[0].get("trace_id").is_none(), "{}", lines[0]);
        assert_eq!(lines[1]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        let span_id = lines[1]["span_id"].as_str().unwrap();
        assert_eq!(span_id.len(), 16);
        assert_ne!(span_id, "00f067aa0ba902b7");
        assert_eq!(seen.unwrap(), format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{span_id}-01"));
        assert_eq!(lines[1]["fields"]["summary"], s.redacted);
        assert_eq!(lines[1]["span"]["task_id"], "t1");
    }

    #[test]
    fn an_invalid_traceparent_starts_a_fresh_trace() {
        let p = local();
        let mut seen = None;
        traced_lines(&p, || {
            let span = tracing::info_span!("task");
            assert!(!propagate::set_parent(&span, Some("00-zz-not-a-traceparent")));
            seen = propagate::of(&span);
        });
        let seen = seen.unwrap();
        assert!(propagate::parse(&seen).is_some(), "{seen}");
        assert!(!seen.contains("4bf92f3577b34da6a3ce929d0e0e4736"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_collector_that_is_down_neither_slows_nor_breaks_anything() {
        // A port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        for protocol in ["http/protobuf", "grpc"] {
            let endpoint = format!("http://127.0.0.1:{port}");
            let cfg = OtelConfig::from_lookup("test", |k| match k {
                "OTEL_EXPORTER_OTLP_ENDPOINT" => Some(endpoint.clone()),
                "OTEL_EXPORTER_OTLP_PROTOCOL" => Some(protocol.into()),
                "OTEL_BSP_SCHEDULE_DELAY" => Some("10".into()),
                "OTEL_BSP_MAX_QUEUE_SIZE" => Some("64".into()),
                _ => None,
            })
            .unwrap();
            let provider = cfg.tracer_provider().unwrap();
            let started = std::time::Instant::now();
            let lines = traced_lines(&provider, || {
                for i in 0..20_000 {
                    let span = tracing::info_span!("step", i);
                    let _g = span.enter();
                }
                tracing::info_span!("last").in_scope(|| tracing::info!("Done."));
            });
            let spent = started.elapsed();
            assert_eq!(lines.len(), 1);
            assert!(spent < Duration::from_secs(5), "{protocol}: {spent:?}");
            let started = std::time::Instant::now();
            drop(Telemetry { provider: Some(provider) });
            assert!(started.elapsed() < FLUSH_GRACE + Duration::from_secs(2), "{protocol}: {:?}", started.elapsed());
        }
    }

    /// Spans reach a receiver over both protocols, with the service name, the resource
    /// attributes and the parent links the settings and the spans give them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spans_are_exported_over_http_and_grpc() {
        use fleet_testkit::otlp::OtlpReceiver;
        for (protocol, rx) in [
            ("http/protobuf", OtlpReceiver::start().await.unwrap()),
            ("grpc", OtlpReceiver::start_grpc().await.unwrap()),
        ] {
            let endpoint = rx.endpoint();
            let cfg = OtelConfig::from_lookup("dev-worker", |k| match k {
                "OTEL_EXPORTER_OTLP_ENDPOINT" => Some(endpoint.clone()),
                "OTEL_EXPORTER_OTLP_PROTOCOL" => Some(protocol.into()),
                "OTEL_RESOURCE_ATTRIBUTES" => Some("deployment.environment=test".into()),
                _ => None,
            })
            .unwrap();
            let provider = cfg.tracer_provider().unwrap();
            traced_lines(&provider, || {
                let step = tracing::info_span!("worker.step", task_id = "t-1");
                propagate::set_parent(&step, Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
                step.in_scope(|| tracing::info_span!("sandbox.run").in_scope(|| {}));
            });
            // Dropping flushes what is queued.
            drop(Telemetry { provider: Some(provider) });
            let mut spans = rx.spans();
            spans.sort_by(|a, b| a.name.cmp(&b.name));
            assert_eq!(spans.len(), 2, "{protocol}: {spans:?}");
            let (run, step) = (&spans[0], &spans[1]);
            assert_eq!((run.name.as_str(), step.name.as_str()), ("sandbox.run", "worker.step"));
            for s in &spans {
                assert_eq!(s.service, "dev-worker", "{protocol}");
                assert_eq!(s.resource.get("deployment.environment").map(String::as_str), Some("test"));
                assert_eq!(s.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736", "{protocol}");
            }
            assert_eq!(step.parent_span_id, "00f067aa0ba902b7");
            assert_eq!(run.parent_span_id, step.span_id);
            assert_eq!(step.attributes.get("task_id").map(String::as_str), Some("t-1"));
        }
    }
}
