//! W3C `traceparent` in and out of `tracing` spans: how one task stays one trace across
//! HTTP, the outbox and the bus.
//!
//! A received value is never trusted: anything that is not exactly
//! `00-<32 lowercase hex>-<16 lowercase hex>-<2 hex>` with non-zero ids is ignored.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Parses a W3C `traceparent` (version `00`); `None` for anything else.
pub fn parse(traceparent: &str) -> Option<SpanContext> {
    let b = traceparent.as_bytes();
    if b.len() != 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' || &b[..2] != b"00" {
        return None;
    }
    let lower_hex = |s: &[u8]| s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    if !lower_hex(&b[3..35]) || !lower_hex(&b[36..52]) || !lower_hex(&b[53..55]) {
        return None;
    }
    let trace_id = TraceId::from_hex(&traceparent[3..35]).ok()?;
    let span_id = SpanId::from_hex(&traceparent[36..52]).ok()?;
    let flags = u8::from_str_radix(&traceparent[53..55], 16).ok()?;
    let sc = SpanContext::new(trace_id, span_id, TraceFlags::new(flags & 1), true, TraceState::default());
    sc.is_valid().then_some(sc)
}

/// Formats a span context as a `traceparent`; `None` for an invalid (empty) one.
pub fn format(sc: &SpanContext) -> Option<String> {
    sc.is_valid().then(|| format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8()))
}

/// The `traceparent` of `span`, when tracing is on and the span is enabled.
pub fn of(span: &tracing::Span) -> Option<String> {
    format(span.context().span().span_context())
}

/// The `traceparent` of the current span.
pub fn current() -> Option<String> {
    of(&tracing::Span::current())
}

/// Makes `traceparent` (when valid) the remote parent of `span`. Call right after creating
/// the span, before entering it: a span that has started keeps its parent. Returns whether
/// the parent was set.
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>) -> bool {
    let Some(sc) = traceparent.and_then(parse) else { return false };
    span.set_parent(opentelemetry::Context::new().with_remote_span_context(sc)).is_ok()
}

/// The trace id (32 hex digits) of a `traceparent`, when valid.
pub fn trace_id(traceparent: &str) -> Option<String> {
    parse(traceparent).map(|sc| sc.trace_id().to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn round_trips_a_valid_traceparent() {
        let sc = parse(TP).unwrap();
        assert!(sc.is_remote() && sc.is_sampled());
        assert_eq!(format(&sc).unwrap(), TP);
        assert_eq!(trace_id(TP).unwrap(), "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn ignores_anything_else() {
        for bad in [
            "",
            "garbage",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473x-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-é",
        ] {
            assert!(parse(bad).is_none(), "{bad}");
        }
    }
}
