//! The verifier's checks, one failure each, in order, through the public API.

mod common;

use common::*;
use envelope::{MemoryReplayGuard, Process, Role, Verifier, VerifierConfig, VerifyContext, VerifyError};

fn orchestrator_verifier() -> Verifier {
    Verifier::new(ring(Process::Role(Role::Orchestrator)), permissions(), VerifierConfig::default())
}

fn ctx() -> VerifyContext {
    VerifyContext { now_ms: NOW_MS, kill_epoch: 0 }
}

#[test]
fn a_sealed_envelope_verifies_once_then_is_a_replay() {
    let env = dev_result(512);
    let wire = ring(Process::Role(Role::Dev)).seal(&env).unwrap();
    let v = orchestrator_verifier();
    let mut guard = MemoryReplayGuard::new();
    let ok = v.verify("fleet:results", &wire, ctx(), &mut guard).unwrap();
    assert_eq!(*ok, env);
    assert_eq!(ok.kid().to_string(), "dev>orchestrator:1");
    let again = v.verify("fleet:results", &wire, ctx(), &mut guard).unwrap_err();
    assert_eq!(again, VerifyError::Replay(env.id));
}

#[test]
fn each_check_has_its_own_error() {
    let dev = ring(Process::Role(Role::Dev));
    let v = orchestrator_verifier();
    let check =
        |stream: &str, wire: &[u8], c: VerifyContext| v.check(stream, wire, c).map(|_| ()).unwrap_err().reason();

    let good = dev.seal(&dev_result(10)).unwrap();
    assert_eq!(check("fleet:results", &vec![0u8; (1 << 20) + 1], ctx()), "too_large");
    assert_eq!(check("fleet:results", &good[..good.len() - 1], ctx()), "decode");
    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    assert_eq!(check("fleet:results", &flipped, ctx()), "bad_signature");
    assert_eq!(check("fleet:tasks:dev", &good, ctx()), "forbidden_type");
    assert_eq!(check("fleet:results", &good, VerifyContext { now_ms: NOW_MS - 31_000, kill_epoch: 0 }), "future_dated");
    assert_eq!(check("fleet:results", &good, VerifyContext { now_ms: NOW_MS + 91_000, kill_epoch: 0 }), "expired");
    assert_eq!(check("fleet:results", &good, VerifyContext { now_ms: NOW_MS, kill_epoch: 1 }), "stale_epoch");

    // A key the orchestrator doesn't hold: qa>orchestrator exists, but sign as budget>dev.
    let budget = ring(Process::Role(Role::Budget));
    let mut env = dev_result(10);
    env.from.role = Role::Budget;
    env.to = Role::Dev;
    let foreign = budget.seal(&env).unwrap();
    assert_eq!(check("fleet:results", &foreign, ctx()), "unknown_kid");
}

#[test]
fn rotation_stages_then_promotes_then_retires_without_dropping_a_message() {
    let edge = envelope::Edge { from: Role::Dev, to: Role::Orchestrator };
    let derive =
        |m: &envelope::MasterFile, role| envelope::Keyring::derive(m, Process::Role(role), &permissions()).unwrap();
    let verifier = |ring| Verifier::new(ring, permissions(), VerifierConfig::default());
    let mut m = master();
    let dev_gen1 = derive(&m, Role::Dev);

    // Staged: every process can get the new keys while senders still sign with generation 1.
    m.rotate().unwrap();
    let dev_staged = derive(&m, Role::Dev);
    assert_eq!(dev_staged.signing_kid(edge).unwrap().generation, 1, "a staged generation must not sign");
    let orch_staged = verifier(derive(&m, Role::Orchestrator));
    assert!(orch_staged.check("fleet:results", &dev_gen1.seal(&dev_result(10)).unwrap(), ctx()).is_ok());

    // Promoted: senders move to generation 2; receivers still holding the staged keysets accept it,
    // and receivers already on the promoted keysets still accept generation 1.
    m.promote();
    let dev_gen2 = derive(&m, Role::Dev);
    assert_eq!(dev_gen2.signing_kid(edge).unwrap().generation, 2);
    let gen2_wire = dev_gen2.seal(&dev_result(10)).unwrap();
    assert!(orch_staged.check("fleet:results", &gen2_wire, ctx()).is_ok());
    let orch_promoted = verifier(derive(&m, Role::Orchestrator));
    let gen1_wire = dev_gen1.seal(&dev_result(10)).unwrap();
    assert!(orch_promoted.check("fleet:results", &gen1_wire, ctx()).is_ok());

    // Retired: generation 1 is refused by name.
    m.retire_through(1).unwrap();
    let orch_retired = verifier(derive(&m, Role::Orchestrator));
    assert_eq!(orch_retired.check("fleet:results", &gen1_wire, ctx()).unwrap_err().reason(), "retired_kid");
    assert!(orch_retired.check("fleet:results", &gen2_wire, ctx()).is_ok());
}

#[test]
fn keysets_round_trip_through_their_file_format() {
    let mut m = master();
    m.rotate().unwrap();
    let keyset = m.derive_keyset(Process::Role(Role::Dev), &permissions());
    let text = keyset.to_toml();
    assert!(text.contains("staged = true"), "{}", text.as_str());
    let back = envelope::Keyset::parse(&text).unwrap();
    let wire = back.into_keyring().seal(&dev_result(10)).unwrap();
    let orch = Verifier::new(ring(Process::Role(Role::Orchestrator)), permissions(), VerifierConfig::default());
    let ok = orch.check("fleet:results", &wire, ctx()).unwrap();
    assert_eq!(ok.envelope().from.role, Role::Dev);
}

#[test]
fn a_body_that_lies_about_its_edge_is_refused() {
    // The dev key signs a body claiming to come from QA: the signature is valid, the edge is not.
    let dev = ring(Process::Role(Role::Dev));
    let mut env = dev_result(10);
    env.from.role = Role::Qa;
    let body = env.to_body_bytes();
    let kid = "dev>orchestrator:1";
    let key = master().secret.derive(&kid.parse().unwrap());
    use hmac::{KeyInit, Mac};
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key.as_ref()).unwrap();
    mac.update(&envelope::wire::signing_input(1, kid, "HS256", &body));
    let sig = mac.finalize().into_bytes().to_vec();
    let wire = envelope::wire::SignedEnvelope { v: 1, kid: kid.into(), alg: "HS256".into(), body, sig }.to_wire();
    let err = orchestrator_verifier().check("fleet:results", &wire, ctx()).unwrap_err();
    assert_eq!(err.reason(), "edge_mismatch", "{err}");
    drop(dev);
}
