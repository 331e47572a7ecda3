//! Seal and check of one dev→orchestrator `task.result` with a 512-byte summary, next to
//! the two things they are made of (bare HMAC-SHA256 and bare rmp-serde), so the
//! overhead of the envelope layer can be read off as a ratio. Results: `docs/benchmarks.md`.
//!
//! Run with `cargo bench -p envelope --bench envelope`.

#![allow(missing_docs, clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use envelope::wire::{ALG_HS256, WIRE_VERSION, decode_frame, signing_input};
use envelope::{Envelope, Kid, Process, Role, Verifier, VerifierConfig, VerifyContext};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use common::{NOW_MS, dev_result, master, permissions, ring};

const SUMMARY_LEN: usize = 512;

fn envelope_benches(c: &mut Criterion) {
    let env = dev_result(SUMMARY_LEN);
    let dev = ring(Process::Role(Role::Dev));
    let wire = dev.seal(&env).unwrap();
    let verifier = Verifier::new(ring(Process::Role(Role::Orchestrator)), permissions(), VerifierConfig::default());
    let ctx = VerifyContext { now_ms: NOW_MS, kill_epoch: 0 };
    assert!(verifier.check("fleet:results", &wire, ctx).is_ok());

    // The exact bytes the keyring signs, and a MAC keyed the way the keyring keys it:
    // the key absorbed once, the state cloned per message.
    let frame = decode_frame(&wire).unwrap();
    let input = signing_input(WIRE_VERSION, frame.kid, ALG_HS256, frame.body);
    let kid: Kid = frame.kid.parse().unwrap();
    let key = master().secret.derive(&kid);
    let keyed = <Hmac<Sha256> as KeyInit>::new_from_slice(key.as_ref()).unwrap();
    let mut mac = keyed.clone();
    mac.update(&input);
    assert_eq!(mac.finalize().into_bytes().as_slice(), frame.sig);
    let body = env.to_body_bytes();
    assert_eq!(body, frame.body);

    eprintln!(
        "sizes: summary {SUMMARY_LEN} B, body {} B, signing input {} B, wire {} B",
        body.len(),
        input.len(),
        wire.len()
    );

    let mut g = c.benchmark_group("envelope_512");
    g.throughput(Throughput::Elements(1));

    g.bench_function("seal", |b| b.iter(|| dev.seal(black_box(&env)).unwrap()));
    g.bench_function("check", |b| {
        b.iter(|| verifier.check(black_box("fleet:results"), black_box(&wire), ctx).unwrap())
    });

    g.bench_function("baseline_hmac", |b| {
        b.iter(|| {
            let mut mac = keyed.clone();
            mac.update(black_box(&input));
            mac.finalize().into_bytes()
        })
    });
    g.bench_function("baseline_body_encode", |b| b.iter(|| black_box(&env).to_body_bytes()));
    g.bench_function("baseline_body_decode", |b| b.iter(|| Envelope::from_body_bytes(black_box(&body)).unwrap()));
    g.finish();
}

criterion_group!(benches, envelope_benches);
criterion_main!(benches);
