//! OpenTelemetry trace export, configured from the standard `OTEL_…` variables.
//!
//! [`OtelConfig::from_lookup`] reads the settings through a lookup function (the process
//! environment in [`crate::init`], a map in tests), so a test never mutates the process
//! environment. [`OtelConfig::tracer_provider`] builds the SDK provider: always (so every
//! span has a trace and span id, logs carry them and envelopes propagate them), with an
//! OTLP exporter behind a batch processor only when an endpoint is set.
//!
//! A collector that is down never slows the fleet: spans go into a bounded queue (dropped
//! when full, never blocking), a background thread exports them with a short timeout.

use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::resource::{ResourceDetector, TelemetryResourceDetector};
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};

/// How long one export may take when `OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT` is not set: short,
/// so a collector that does not answer costs a background thread a few seconds, nothing more.
pub const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(3);

/// How many finished spans wait for export at most; more are dropped.
pub const DEFAULT_MAX_QUEUE_SIZE: usize = 2_048;

/// How long the batch processor waits before exporting what it has.
pub const DEFAULT_SCHEDULE_DELAY: Duration = Duration::from_secs(5);

/// An `OTEL_…` setting that cannot be used. Names the variable; the binary exits with 64.
#[derive(Debug, thiserror::Error)]
pub enum OtelConfigError {
    /// The value does not parse.
    #[error("{var}: {detail} (got {value:?})")]
    Invalid {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        detail: &'static str,
    },
    /// The exporter could not be built from otherwise valid settings.
    #[error("OTLP trace exporter: {0}")]
    Exporter(String),
}

/// The OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// `http/protobuf` (the default): `POST <endpoint>/v1/traces`.
    HttpProtobuf,
    /// `grpc`: the collector's `TraceService/Export`.
    Grpc,
}

/// Where and how spans are exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpExport {
    /// The full traces URL (`…/v1/traces` appended to a generic HTTP endpoint) or the gRPC
    /// endpoint.
    pub endpoint: String,
    /// HTTP/protobuf or gRPC.
    pub protocol: OtlpProtocol,
    /// The most one export may take.
    pub timeout: Duration,
    /// Finished spans waiting for export at most; more are dropped, never waited for.
    pub max_queue_size: usize,
    /// How long the processor gathers spans before exporting them.
    pub schedule_delay: Duration,
}

/// Trace settings of one process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtelConfig {
    /// `false` when `OTEL_SDK_DISABLED=true`: no spans at all, no ids in logs, envelopes go
    /// out without a `traceparent`.
    pub enabled: bool,
    /// `service.name`: `OTEL_SERVICE_NAME`, else `service.name` from
    /// `OTEL_RESOURCE_ATTRIBUTES`, else the binary's name.
    pub service_name: String,
    /// The other resource attributes from `OTEL_RESOURCE_ATTRIBUTES`.
    pub resource_attributes: Vec<(String, String)>,
    /// Export, when an endpoint is set; spans are still made (for ids and propagation)
    /// without it.
    pub export: Option<OtlpExport>,
}

impl OtelConfig {
    /// Tracing on, nothing exported: ids in logs and propagation across the bus only.
    pub fn local(service: &str) -> Self {
        Self { enabled: true, service_name: service.to_owned(), resource_attributes: Vec::new(), export: None }
    }

    /// Reads the standard variables through `get` (e.g. `|k| std::env::var(k).ok()`).
    ///
    /// Honoured: `OTEL_SDK_DISABLED`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` / `…_TRACES_ENDPOINT`, `OTEL_EXPORTER_OTLP_PROTOCOL` /
    /// `…_TRACES_PROTOCOL`, `OTEL_EXPORTER_OTLP_TIMEOUT` / `…_TRACES_TIMEOUT` (ms),
    /// `OTEL_BSP_MAX_QUEUE_SIZE`, `OTEL_BSP_SCHEDULE_DELAY` (ms). Headers and compression
    /// (`OTEL_EXPORTER_OTLP_[TRACES_]HEADERS`, `…_COMPRESSION`) are read by the exporter itself.
    pub fn from_lookup(service: &str, get: impl Fn(&str) -> Option<String>) -> Result<Self, OtelConfigError> {
        let get = |k: &str| get(k).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        let enabled = match get("OTEL_SDK_DISABLED") {
            None => true,
            Some(v) if v.eq_ignore_ascii_case("false") => true,
            Some(v) if v.eq_ignore_ascii_case("true") => false,
            Some(value) => {
                return Err(OtelConfigError::Invalid {
                    var: "OTEL_SDK_DISABLED",
                    value,
                    detail: "expected true or false",
                });
            }
        };
        let mut resource_attributes = match get("OTEL_RESOURCE_ATTRIBUTES") {
            None => Vec::new(),
            Some(v) => parse_resource_attributes(&v).ok_or(OtelConfigError::Invalid {
                var: "OTEL_RESOURCE_ATTRIBUTES",
                value: v,
                detail: "expected key=value pairs separated by commas",
            })?,
        };
        let from_attrs =
            resource_attributes.iter().position(|(k, _)| k == "service.name").map(|i| resource_attributes.remove(i).1);
        let service_name = get("OTEL_SERVICE_NAME").or(from_attrs).unwrap_or_else(|| service.to_owned());

        let protocol = match get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .map(|v| ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", v))
            .or_else(|| get("OTEL_EXPORTER_OTLP_PROTOCOL").map(|v| ("OTEL_EXPORTER_OTLP_PROTOCOL", v)))
        {
            None => OtlpProtocol::HttpProtobuf,
            Some((_, v)) if v == "http/protobuf" => OtlpProtocol::HttpProtobuf,
            Some((_, v)) if v == "grpc" => OtlpProtocol::Grpc,
            Some((var, value)) => {
                return Err(OtelConfigError::Invalid { var, value, detail: "expected http/protobuf or grpc" });
            }
        };
        let endpoint = if let Some(v) = get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            Some(check_url("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", v)?)
        } else if let Some(v) = get("OTEL_EXPORTER_OTLP_ENDPOINT") {
            let base = check_url("OTEL_EXPORTER_OTLP_ENDPOINT", v)?;
            Some(match protocol {
                // The generic endpoint is a base: the signal's path goes after it.
                OtlpProtocol::HttpProtobuf => format!("{}/v1/traces", base.trim_end_matches('/')),
                OtlpProtocol::Grpc => base,
            })
        } else {
            None
        };
        let millis = |var: &'static str| -> Result<Option<Duration>, OtelConfigError> {
            get(var)
                .map(|v| {
                    v.parse::<u64>().map(Duration::from_millis).map_err(|_| OtelConfigError::Invalid {
                        var,
                        value: v,
                        detail: "expected a whole number of milliseconds",
                    })
                })
                .transpose()
        };
        let timeout = match millis("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")? {
            Some(t) => t,
            None => millis("OTEL_EXPORTER_OTLP_TIMEOUT")?.unwrap_or(DEFAULT_EXPORT_TIMEOUT),
        };
        let schedule_delay = millis("OTEL_BSP_SCHEDULE_DELAY")?.unwrap_or(DEFAULT_SCHEDULE_DELAY);
        let max_queue_size = match get("OTEL_BSP_MAX_QUEUE_SIZE") {
            None => DEFAULT_MAX_QUEUE_SIZE,
            Some(v) => v.parse::<usize>().ok().filter(|n| *n > 0).ok_or(OtelConfigError::Invalid {
                var: "OTEL_BSP_MAX_QUEUE_SIZE",
                value: v,
                detail: "expected a positive whole number",
            })?,
        };
        let export =
            endpoint.map(|endpoint| OtlpExport { endpoint, protocol, timeout, max_queue_size, schedule_delay });
        Ok(Self { enabled, service_name, resource_attributes, export })
    }

    /// The process's tracer provider. For gRPC, call inside the Tokio runtime (the channel's
    /// worker runs there).
    pub fn tracer_provider(&self) -> Result<SdkTracerProvider, OtelConfigError> {
        let mut attributes: Vec<KeyValue> =
            self.resource_attributes.iter().map(|(k, v)| KeyValue::new(k.clone(), v.clone())).collect();
        attributes.extend(TelemetryResourceDetector.detect().iter().map(|(k, v)| KeyValue::new(k.clone(), v.clone())));
        let resource =
            Resource::builder_empty().with_attributes(attributes).with_service_name(self.service_name.clone()).build();
        let mut builder = SdkTracerProvider::builder().with_resource(resource);
        if let Some(x) = &self.export {
            let exporter = match x.protocol {
                OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(Protocol::HttpBinary)
                    .with_endpoint(x.endpoint.clone())
                    .with_timeout(x.timeout)
                    .build(),
                OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_protocol(Protocol::Grpc)
                    .with_endpoint(x.endpoint.clone())
                    .with_timeout(x.timeout)
                    .build(),
            }
            .map_err(|e| OtelConfigError::Exporter(e.to_string()))?;
            let batch = BatchConfigBuilder::default()
                .with_max_queue_size(x.max_queue_size)
                .with_max_export_batch_size(x.max_queue_size.min(512))
                .with_scheduled_delay(x.schedule_delay)
                .build();
            builder =
                builder.with_span_processor(BatchSpanProcessor::builder(exporter).with_batch_config(batch).build());
        }
        Ok(builder.build())
    }
}

fn check_url(var: &'static str, v: String) -> Result<String, OtelConfigError> {
    let rest = v.strip_prefix("http://").or_else(|| v.strip_prefix("https://"));
    match rest {
        Some(r) if !r.is_empty() && !r.starts_with('/') && !r.contains(char::is_whitespace) => Ok(v),
        _ => Err(OtelConfigError::Invalid { var, value: v, detail: "expected an http:// or https:// URL" }),
    }
}

/// `key1=value1,key2=value2`, values percent-decoded (W3C Baggage octets).
fn parse_resource_attributes(s: &str) -> Option<Vec<(String, String)>> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=')?;
            let k = k.trim();
            if k.is_empty() {
                return None;
            }
            Some((k.to_owned(), percent_decode(v.trim())?))
        })
        .collect()
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::collections::HashMap;

    fn cfg(vars: &[(&str, &str)]) -> Result<OtelConfig, OtelConfigError> {
        let m: HashMap<String, String> = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        OtelConfig::from_lookup("dev-worker", |k| m.get(k).cloned())
    }

    #[test]
    fn nothing_set_means_local_spans_and_no_export() {
        assert_eq!(cfg(&[]).unwrap(), OtelConfig::local("dev-worker"));
    }

    #[test]
    fn the_generic_http_endpoint_gets_the_traces_path_the_signal_one_is_used_as_is() {
        let c = cfg(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")]).unwrap();
        let x = c.export.unwrap();
        assert_eq!(x.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(x.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(x.timeout, DEFAULT_EXPORT_TIMEOUT);
        let c = cfg(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://ignored:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://collector:4318/custom"),
            ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "250"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ])
        .unwrap();
        let x = c.export.unwrap();
        assert_eq!(x.endpoint, "http://collector:4318/custom");
        assert_eq!(x.timeout, Duration::from_millis(250));
        assert_eq!(x.schedule_delay, Duration::from_millis(100));
    }

    #[test]
    fn grpc_uses_the_generic_endpoint_as_is() {
        let c =
            cfg(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"), ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")])
                .unwrap();
        let x = c.export.unwrap();
        assert_eq!((x.endpoint.as_str(), x.protocol), ("http://collector:4317", OtlpProtocol::Grpc));
    }

    #[test]
    fn service_name_and_resource_attributes() {
        let c = cfg(&[("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod, service.name=from-attrs,team=a%2Cb")])
            .unwrap();
        assert_eq!(c.service_name, "from-attrs");
        assert_eq!(
            c.resource_attributes,
            vec![("deployment.environment".into(), "prod".into()), ("team".into(), "a,b".into())]
        );
        let c =
            cfg(&[("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attrs"), ("OTEL_SERVICE_NAME", "dev-1")]).unwrap();
        assert_eq!(c.service_name, "dev-1");
    }

    #[test]
    fn an_unusable_setting_names_its_variable() {
        for (var, value) in [
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "udp"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "ftp://x"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "3s"),
            ("OTEL_BSP_SCHEDULE_DELAY", "-1"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "0"),
            ("OTEL_SDK_DISABLED", "yes"),
            ("OTEL_RESOURCE_ATTRIBUTES", "novalue"),
        ] {
            let e = cfg(&[(var, value)]).unwrap_err().to_string();
            assert!(e.starts_with(&format!("{var}: ")), "{e}");
        }
    }

    #[test]
    fn disabled() {
        assert!(!cfg(&[("OTEL_SDK_DISABLED", "TRUE")]).unwrap().enabled);
    }
}
