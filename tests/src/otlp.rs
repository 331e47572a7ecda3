//! An OTLP trace receiver: what a collector would be to the fleet's processes. Over HTTP
//! ([`OtlpReceiver::start`]) it takes `POST /v1/traces` (`application/x-protobuf`); over
//! gRPC ([`OtlpReceiver::start_grpc`]) the collector's `TraceService/Export`. Either way it
//! decodes each `ExportTraceServiceRequest` with `opentelemetry-proto` and keeps every span
//! with its process's resource, for tests to assert on.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message;

/// One span as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectedSpan {
    /// `service.name` of the resource that sent it: the process.
    pub service: String,
    /// The other attributes of that resource.
    pub resource: BTreeMap<String, String>,
    /// The span's name.
    pub name: String,
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// 16 lowercase hex digits.
    pub span_id: String,
    /// 16 lowercase hex digits, or empty for a root span.
    pub parent_span_id: String,
    /// Its attributes, each value as text (strings bare, numbers and booleans as written).
    pub attributes: BTreeMap<String, String>,
    /// When it started, in nanoseconds since the Unix epoch, by its process's clock.
    pub start_unix_nanos: u64,
    /// When it ended, likewise; the span's duration is the difference.
    pub end_unix_nanos: u64,
}

/// A running receiver on `127.0.0.1`; stops when dropped.
#[derive(Debug)]
pub struct OtlpReceiver {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<CollectedSpan>>>,
    server: tokio::task::JoinHandle<()>,
}

impl OtlpReceiver {
    /// Binds a free port and serves. Call inside a Tokio runtime.
    pub async fn start() -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let spans = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new().route("/v1/traces", axum::routing::post(traces)).with_state(Arc::clone(&spans));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, spans, server })
    }

    /// The same over OTLP/gRPC. Call inside a Tokio runtime.
    pub async fn start_grpc() -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let spans = Arc::new(Mutex::new(Vec::new()));
        let service = TraceServiceServer::new(Grpc(Arc::clone(&spans)));
        let server = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming).await;
        });
        Ok(Self { addr, spans, server })
    }

    /// The base URL, as `OTEL_EXPORTER_OTLP_ENDPOINT` wants it.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<CollectedSpan> {
        self.spans.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn traces(State(spans): State<Arc<Mutex<Vec<CollectedSpan>>>>, body: Bytes) -> impl IntoResponse {
    let Ok(req) = ExportTraceServiceRequest::decode(body) else {
        return (StatusCode::BAD_REQUEST, [(header::CONTENT_TYPE, "text/plain")], Vec::new());
    };
    spans.lock().unwrap_or_else(|p| p.into_inner()).extend(collect(req));
    // An empty ExportTraceServiceResponse: full success.
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/x-protobuf")], Vec::new())
}

struct Grpc(Arc<Mutex<Vec<CollectedSpan>>>);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).extend(collect(request.into_inner()));
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn collect(req: ExportTraceServiceRequest) -> Vec<CollectedSpan> {
    let mut got = Vec::new();
    for rs in req.resource_spans {
        let mut resource = rs.resource.map(|r| attributes(&r.attributes)).unwrap_or_default();
        let service = resource.remove("service.name").unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                got.push(CollectedSpan {
                    service: service.clone(),
                    resource: resource.clone(),
                    name: s.name,
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    attributes: attributes(&s.attributes),
                    start_unix_nanos: s.start_time_unix_nano,
                    end_unix_nanos: s.end_time_unix_nano,
                });
            }
        }
    }
    got
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter().map(|kv| (kv.key.clone(), kv.value.as_ref().map(text).unwrap_or_default())).collect()
}

fn text(v: &AnyValue) -> String {
    match &v.value {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
