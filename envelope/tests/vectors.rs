//! Checks the published test vectors in `tests/vectors/`: every positive vector encodes,
//! signs and verifies to exactly the stated bytes; every accepted one verifies to the stated
//! content; every negative one fails with exactly the stated error; and the conformance table
//! of `docs/wire-format.md` §11 lists each of them under its rule. If this fails after an intended wire change, regenerate with
//! `cargo run -p envelope --example vectors -- envelope/tests/vectors` and bump the spec.

mod common;

use common::vectors::{Accepted, KeysFile, Negative, Positive};
use envelope::keys::{Kid, MasterSecret};
use envelope::wire::{decode_frame, signing_input};
use envelope::{Envelope, MemoryReplayGuard, ReplayGuard, VerifyContext};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

fn keys() -> KeysFile {
    serde_json::from_str(include_str!("vectors/keys.json")).expect("keys.json parses")
}

fn positives() -> Vec<Positive> {
    serde_json::from_str(include_str!("vectors/positive.json")).expect("positive.json parses")
}

fn accepted() -> Vec<Accepted> {
    serde_json::from_str(include_str!("vectors/accepted.json")).expect("accepted.json parses")
}

fn negatives() -> Vec<Negative> {
    serde_json::from_str(include_str!("vectors/negative.json")).expect("negative.json parses")
}

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s).expect("vector hex")
}

#[test]
fn key_derivations_match() {
    let k = keys();
    let master = MasterSecret::from_bytes(unhex(&k.master_secret_hex).try_into().expect("32 bytes"));
    assert_eq!(k.hkdf_salt.as_bytes(), envelope::keys::EDGE_KEY_SALT);
    assert!(k.derivations.len() >= 3);
    for d in &k.derivations {
        let kid: Kid = d.kid.parse().expect("kid");
        assert_eq!(hex::encode(*master.derive(&kid)), d.key_hex, "derivation of {}", d.kid);
    }
}

#[test]
fn positive_vectors_encode_sign_and_verify_exactly() {
    let k = keys();
    let verifier = k.verifier(&common::permissions(), None);
    let all = positives();
    assert!(all.len() >= 5);
    for v in all {
        let body = v.fields.to_body_bytes();
        assert_eq!(hex::encode(&body), v.body_hex, "{}: body bytes", v.name);
        assert_eq!(Envelope::from_body_bytes(&body).expect("decodes"), v.fields, "{}: body round trip", v.name);
        let input = signing_input(1, &v.kid, "HS256", &body);
        assert_eq!(hex::encode(&input), v.signing_input_hex, "{}: signing input", v.name);
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&unhex(&v.key_hex)).expect("key");
        mac.update(&input);
        assert_eq!(hex::encode(mac.finalize().into_bytes()), v.signature_hex, "{}: signature", v.name);
        let wire = unhex(&v.wire_hex);
        let frame = decode_frame(&wire).expect("frame decodes");
        assert_eq!((frame.v, frame.kid, frame.alg), (1, v.kid.as_str(), "HS256"), "{}: frame header", v.name);
        assert_eq!(hex::encode(frame.body), v.body_hex, "{}: frame body", v.name);
        let ctx = VerifyContext { now_ms: v.now_ms, kill_epoch: v.kill_epoch };
        let ok = verifier
            .verify(&v.stream, &wire, ctx, &mut MemoryReplayGuard::new())
            .unwrap_or_else(|e| panic!("{}: must verify, got {e}", v.name));
        assert_eq!(*ok, v.fields, "{}: verified content", v.name);
        assert_eq!(ok.kid().to_string(), v.kid);
    }
}

#[test]
fn positive_vectors_are_what_the_keyring_seals() {
    // Sealing with the keyring (not the hand-rolled path above) gives the same bytes when
    // the vector used the newest generation.
    let ring = keys().keyring();
    for v in positives().into_iter().filter(|v| v.kid.ends_with(":3")) {
        assert_eq!(hex::encode(ring.seal(&v.fields).expect("seal")), v.wire_hex, "{}", v.name);
    }
}

#[test]
fn accepted_vectors_verify_to_their_content() {
    let k = keys();
    let verifier = k.verifier(&common::permissions(), None);
    let all = accepted();
    assert!(all.len() >= 10);
    for v in all {
        let wire = unhex(&v.wire_hex);
        let frame = decode_frame(&wire).expect("frame decodes");
        assert_eq!(hex::encode(frame.body), v.body_hex, "{}: frame body", v.name);
        let ctx = VerifyContext { now_ms: v.now_ms, kill_epoch: v.kill_epoch };
        let ok = verifier
            .verify(&v.stream, &wire, ctx, &mut MemoryReplayGuard::new())
            .unwrap_or_else(|e| panic!("{}: must verify, got {e}", v.name));
        assert_eq!(*ok, v.fields, "{}: verified content", v.name);
        assert_eq!(ok.kid().to_string(), v.kid);
    }
}

#[test]
fn negative_vectors_fail_with_the_named_error() {
    let k = keys();
    let permissions = common::permissions();
    let all = negatives();
    let required = [
        "bad_signature",
        "decode",
        "unknown_kid",
        "retired_kid",
        "edge_mismatch",
        "forbidden_type",
        "expired",
        "future_dated",
        "stale_epoch",
        "too_large",
    ];
    for r in required {
        assert!(all.iter().any(|v| v.expected_error == r), "no negative vector for {r}");
    }
    for v in all {
        let verifier = k.verifier(&permissions, v.max_size);
        let mut guard = MemoryReplayGuard::new();
        for id in &v.seen_ids {
            guard.first_sighting(*id, u64::MAX, v.now_ms);
        }
        let ctx = VerifyContext { now_ms: v.now_ms, kill_epoch: v.kill_epoch };
        match verifier.verify(&v.stream, &unhex(&v.wire_hex), ctx, &mut guard) {
            Ok(_) => panic!("{}: verified but must fail with {}", v.name, v.expected_error),
            Err(e) => assert_eq!(e.reason(), v.expected_error, "{}: got {e}", v.name),
        }
    }
}

/// `docs/examples/check_vectors.py`, a second implementation written from the spec with the
/// Python standard library only, agrees with every vector: a rule the vectors state but the
/// spec does not (or the other way round) shows up here.
#[test]
fn the_python_implementation_agrees_with_every_vector() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root");
    let out = std::process::Command::new("python3")
        .arg(root.join("docs/examples/check_vectors.py"))
        .arg(root.join("envelope/tests/vectors"))
        .output()
        .expect("python3 (3.11 or later) must be installed to check the vectors");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "check_vectors.py failed:\n{text}");
    assert!(text.contains("vectors agree"), "{text}");
}

/// §11 of `docs/wire-format.md` lists every accepted and negative vector in the row of the
/// rule it names, and names no vector that does not exist: a third party reading the table
/// sees exactly the vectors there are.
#[test]
fn the_conformance_table_lists_every_vector_under_its_rule() {
    let spec = include_str!("../../docs/wire-format.md");
    let section = spec.split("\n## 11. Conformance").nth(1).expect("the spec has §11");
    let section = section.split("\n## ").next().expect("§11's text");
    // `| `rule` | § | what it says | refused | accepted |`: the last two cells hold vectors.
    let rows: std::collections::HashMap<&str, String> = section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            assert_eq!(cells.len(), 7, "five cells: {l}");
            (cells[1].trim_matches('`'), format!("{} {}", cells[4], cells[5]))
        })
        .collect();
    assert!(rows.len() >= 40, "{} rules", rows.len());
    let mut names = std::collections::HashSet::new();
    for name in positives().into_iter().map(|v| v.name) {
        assert!(names.insert(name.clone()), "two vectors named {name}");
    }
    let listed: Vec<(String, String)> = accepted()
        .into_iter()
        .map(|v| (v.name, v.rule))
        .chain(negatives().into_iter().map(|v| (v.name, v.rule)))
        .collect();
    for (name, rule) in &listed {
        assert!(names.insert(name.clone()), "two vectors named {name}");
        let row = rows.get(rule.as_str()).unwrap_or_else(|| panic!("{name}: rule {rule} is not in §11"));
        assert!(row.contains(&format!("`{name}`")), "§11 row {rule} does not list {name}");
    }
    for (rule, cells) in &rows {
        for quoted in cells.split('`').skip(1).step_by(2) {
            assert!(names.contains(quoted), "§11 row {rule} names {quoted}, which is no vector");
        }
    }
}
