//! A trace crosses the bus: a publisher inside a span stamps the envelope with that span's
//! `traceparent`, and the consumer runs the handler in a child span of it, in the same
//! trace. Envelopes without one get no span; an invalid one is ignored, never trusted.

#![allow(clippy::unwrap_used)]

mod common;

use std::future::Future;
use std::time::Duration;

use bus::{Delivery, Handler, HandlerError};
use common::*;
use tokio::sync::mpsc;

/// What a handler saw: the current span's `traceparent`, the envelope's, the summary.
type Seen = (Option<String>, Option<String>, String);

struct Tracing(mpsc::UnboundedSender<Seen>);

impl Handler for Tracing {
    fn handle(&self, d: Delivery) -> impl Future<Output = Result<(), HandlerError>> + Send {
        let tx = self.0.clone();
        async move {
            let _ = tx.send((telemetry::propagate::current(), d.envelope.traceparent.clone(), summary(&d)));
            Ok(())
        }
    }
}

fn ids(tp: &str) -> (&str, &str) {
    (&tp[3..35], &tp[36..52])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handler_runs_in_a_child_span_of_the_publishers() {
    // This test binary's own process: the global subscriber is ours alone.
    let provider = telemetry::OtelConfig::local("bus-test").tracer_provider().unwrap();
    let subscriber =
        telemetry::traced_subscriber(false, tracing_subscriber::EnvFilter::new("info"), std::io::sink, Some(&provider));
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let server = redis();
    let publisher = dev_publisher(&server);
    let stream = results_stream();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let consumer = spawn(&server, config(GROUP, "orch-1"), Tracing(tx));

    let span = tracing::info_span!("sender");
    let sent = telemetry::propagate::of(&span).unwrap();
    tracing::Instrument::instrument(publisher.publish(&stream, &result(1)), span).await.unwrap();
    publisher.publish(&stream, &result(2)).await.unwrap();
    let mut invalid = result(3);
    invalid.traceparent = Some("00-not-a-traceparent".into());
    publisher.publish(&stream, &invalid).await.unwrap();

    let mut got = take(&mut rx, 3, Duration::from_secs(10)).await;
    got.sort_by(|a, b| a.2.cmp(&b.2));
    let (handler, carried, _) = &got[0];
    assert_eq!(carried.as_deref(), Some(sent.as_str()), "the envelope carries the sender's span");
    let handler = handler.as_deref().expect("the handler runs in a span");
    assert_eq!(ids(handler).0, ids(&sent).0, "same trace");
    assert_ne!(ids(handler).1, ids(&sent).1, "its own span");

    assert_eq!(got[1], (None, None, "result 2".into()), "outside any trace: no span");

    let (handler, carried, _) = &got[2];
    assert_eq!(carried.as_deref(), Some("00-not-a-traceparent"));
    let handler = handler.as_deref().expect("a span of its own");
    assert!(telemetry::propagate::parse(handler).is_some());
    assert_ne!(ids(handler).0, ids(&sent).0, "a fresh trace, not a borrowed one");
    let stats = consumer.stats.clone();
    consumer.shutdown().await;
    assert_eq!(load(&stats.handled), 3);
}
