//! The cost of the redaction set on the log hot path: a typical JSON log record without a
//! secret (the common case: one scan, no copy), the same record with a token in it, and a
//! 4 KiB worker summary. Results: `docs/benchmarks.md`.
//!
//! Run with `cargo bench -p telemetry --bench redact`.

#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const CLEAN: &str = r#"{"timestamp":"2026-12-02T05:19:27.513947Z","level":"INFO","fields":{"message":"Applied a result.","task":"Some(0190a5e2-7c1d-7b3e-9f00-1a2b3c4d5e6f)","to":"qa","from":"dev-1"}}"#;
const WITH_TOKEN: &str = r#"{"timestamp":"2026-12-02T05:19:27.513947Z","level":"INFO","fields":{"message":"Worker said: pushed with ghp_0123456789abcdefghijABCDEFGHIJ012345.","task":"0190a5e2-7c1d-7b3e-9f00-1a2b3c4d5e6f"}}"#;

fn summary() -> String {
    let line = "test_login_rejects_empty_password PASSED in 0.03s (tests/test_auth.py::TestLogin)\n";
    line.repeat(4096 / line.len() + 1)
}

fn redact_benches(c: &mut Criterion) {
    assert_eq!(telemetry::redact(CLEAN), CLEAN);
    assert!(telemetry::redact(WITH_TOKEN).contains("**REDACTED**"));
    let summary = summary();
    let mut g = c.benchmark_group("redact");
    for (name, text) in
        [("log_record_clean", CLEAN), ("log_record_with_token", WITH_TOKEN), ("summary_4k_clean", &summary)]
    {
        g.throughput(Throughput::Bytes(text.len() as u64));
        g.bench_function(name, |b| b.iter(|| telemetry::redact(black_box(text)).len()));
    }
    g.finish();
}

criterion_group!(benches, redact_benches);
criterion_main!(benches);
