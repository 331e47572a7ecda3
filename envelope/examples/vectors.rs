//! Regenerates the test vectors in `tests/vectors/`:
//!
//! ```text
//! cargo run -p envelope --example vectors -- envelope/tests/vectors
//! ```
//!
//! Everything is deterministic (fixed master secret, fixed UUIDs, fixed clock), so running it
//! again must produce identical files; `tests/vectors.rs` checks the files, not this program.

#[path = "../tests/common/vectors.rs"]
mod vectors;

use std::path::PathBuf;

use envelope::keys::{Kid, MasterFile, MasterSecret};
use envelope::wire::{SignedEnvelope, signing_input};
use envelope::*;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use uuid::Uuid;
use vectors::*;

const NOW: u64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

fn master() -> MasterFile {
    let mut m = MasterFile::new(MasterSecret::from_bytes(std::array::from_fn(|i| i as u8)));
    m.rotate().expect("generation 2");
    m.rotate().expect("generation 3");
    m.promote();
    m.retire_through(1).expect("generation 1 is not the signing one");
    m
}

fn id(ms: u64, tail: u8) -> Uuid {
    uuid::Builder::from_unix_timestamp_millis(ms, &[tail; 10]).into_uuid()
}

fn key(kid: &str) -> [u8; 32] {
    *master().secret.derive(&kid.parse::<Kid>().expect("kid"))
}

fn mac(kid: &str, input: &[u8]) -> Vec<u8> {
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(&key(kid)).expect("any key length");
    m.update(input);
    m.finalize().into_bytes().to_vec()
}

/// Signs `body` exactly as given (it may be malformed on purpose) under `kid`.
fn frame(kid: &str, body: Vec<u8>) -> SignedEnvelope {
    let sig = mac(kid, &signing_input(1, kid, "HS256", &body));
    SignedEnvelope { v: 1, kid: kid.into(), alg: "HS256".into(), body, sig }
}

fn sender(role: Role, instance: &str) -> Sender {
    Sender { role, instance: Instance::parse(instance).expect("instance") }
}

fn base(from: Sender, to: Role, n: u8, payload: impl Into<Payload>) -> Envelope {
    let mut e = Envelope::new(from, to, NOW, 60_000, 0, payload.into());
    e.id = id(NOW, n);
    e
}

fn dev_result(n: u8) -> Envelope {
    base(
        sender(Role::Dev, "dev-1"),
        Role::Orchestrator,
        n,
        TaskResult {
            attempt: 1,
            status: Status::Success,
            summary: "ok".into(),
            findings: vec![],
            diff: None,
            log: None,
            change_sha256: None,
            calls: Vec::new(),
        },
    )
}

fn positive(name: &str, description: &str, kid: &str, env: Envelope, stream: &str) -> Positive {
    let body = env.to_body_bytes();
    let input = signing_input(1, kid, "HS256", &body);
    let f = frame(kid, body.clone());
    Positive {
        name: name.into(),
        description: description.into(),
        kid: kid.into(),
        key_hex: hex::encode(key(kid)),
        kill_epoch: env.kill_epoch,
        fields: env,
        body_hex: hex::encode(&body),
        signing_input_hex: hex::encode(input),
        signature_hex: hex::encode(&f.sig),
        wire_hex: hex::encode(f.to_wire()),
        stream: stream.into(),
        now_ms: NOW + 1_000,
    }
}

fn negative(name: &str, description: &str, wire: Vec<u8>, expected: &str) -> Negative {
    Negative {
        name: name.into(),
        description: description.into(),
        wire_hex: hex::encode(wire),
        stream: "fleet:results".into(),
        now_ms: NOW + 1_000,
        kill_epoch: 0,
        max_size: None,
        seen_ids: vec![],
        expected_error: expected.into(),
    }
}

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "envelope/tests/vectors".into()));
    let ring_kids = [
        "dev>orchestrator:1",
        "dev>orchestrator:2",
        "dev>orchestrator:3",
        "orchestrator>dev:1",
        "orchestrator>dev:2",
        "orchestrator>dev:3",
        "budget>qa:3",
        "orchestrator>budget:3",
    ];
    let keys = KeysFile {
        description: "Master secret = bytes 00..1f; current generation 3, generation 1 retired. \
                      Edge key = HKDF-SHA256(salt, ikm = master, info = kid as UTF-8), 32 bytes. \
                      Every vector is verified by a verifier holding `verifier_keyring` and the permission file `permissions`."
            .into(),
        master_secret_hex: hex::encode(std::array::from_fn::<u8, 32, _>(|i| i as u8)),
        hkdf_salt: String::from_utf8(envelope::keys::EDGE_KEY_SALT.to_vec()).expect("ascii"),
        derivations: ["dev>orchestrator:1", "dev>orchestrator:3", "orchestrator>dev:3", "budget>qa:3", "orchestrator>budget:3"]
            .iter()
            .map(|k| Derivation { kid: (*k).into(), key_hex: hex::encode(key(k)) })
            .collect(),
        verifier_keyring: ring_kids
            .iter()
            .map(|k| {
                let retired = k.ends_with(":1");
                RingKey { kid: (*k).into(), key_hex: (!retired).then(|| hex::encode(key(k))), retired }
            })
            .collect(),
        permissions: "config/permissions.toml".into(),
        verifier_config: Config { max_size: 1 << 20, skew_ms: 30_000, max_ttl_ms: 86_400_000 },
    };

    // ---- positive ----
    let mut full = dev_result(2);
    full.task_id = Some(id(NOW - 5_000, 0x77));
    full.causation_id = Some(id(NOW - 4_000, 0x66));
    full.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
    full.payload = TaskResult {
        attempt: 2,
        status: Status::Failure,
        summary: "tests fail".into(),
        findings: vec!["test_login fails".into(), "eval() in app.py".into()],
        diff: Some(b"--- a/app.py\n+++ b/app.py\n".to_vec()),
        log: Some(b"FAILED test_login\n".to_vec()),
        change_sha256: None,
        calls: Vec::new(),
    }
    .into();

    let mut assign = base(
        sender(Role::Orchestrator, "orchestrator-0"),
        Role::Dev,
        3,
        TaskAssign {
            attempt: 1,
            instructions: "Add input validation to login()".into(),
            workspace: "/workspace/task-0193".into(),
            repository: Some("https://git.example/app.git".into()),
            test_command: Some("pytest -q".into()),
            findings: vec![],
            scope: vec![],
            change: None,
            change_sha256: None,
        },
    );
    assign.task_id = Some(id(NOW - 5_000, 0x77));
    assign.lease = Some("eyJhbGciOiJIUzI1NiJ9.eyJ0YXNrIjoiMDE5MyJ9.c2lnbmF0dXJl".into());

    let mut hb = base(sender(Role::Dev, "dev-1"), Role::Orchestrator, 4, Heartbeat { seq: 42, busy: true });
    hb.ttl_ms = 15_000;
    let tool = base(
        sender(Role::Orchestrator, "orchestrator-0"),
        Role::Dev,
        5,
        ToolResponse { request_id: id(NOW - 100, 0x55), ok: true, output: "{\"text\":\"done\"}".into() },
    );
    let mut pause = base(
        sender(Role::Budget, "budget-0"),
        Role::Qa,
        6,
        ControlPause { epoch: 7, reason: "daily token budget exceeded".into() },
    );
    pause.kill_epoch = 7;
    let usage = base(
        sender(Role::Orchestrator, "orchestrator-0"),
        Role::Budget,
        7,
        Usage {
            role: Role::Dev,
            model: "gpt-4o-mini".into(),
            input_tokens: 1200,
            output_tokens: 300,
            cost_micro_usd: 360,
        },
    );
    let req = base(
        sender(Role::Dev, "dev-1"),
        Role::Orchestrator,
        8,
        ToolRequest { request_id: id(NOW, 0x44), action: "llm.complete".into(), input: "{\"prompt\":\"hi\"}".into() },
    );

    let positives = vec![
        positive(
            "task_result_minimal",
            "Dev result with no optional field, newest key.",
            "dev>orchestrator:3",
            dev_result(1),
            "fleet:results",
        ),
        positive(
            "task_result_full",
            "Every optional body field set; bytes fields; signed with generation 2, still active during rotation.",
            "dev>orchestrator:2",
            full,
            "fleet:results",
        ),
        positive(
            "task_assign_with_lease",
            "Orchestrator assignment carrying a capability lease.",
            "orchestrator>dev:3",
            assign,
            "fleet:tasks:dev",
        ),
        positive("heartbeat", "Worker heartbeat with a 15 s ttl.", "dev>orchestrator:3", hb, "fleet:heartbeats"),
        positive(
            "tool_response_instance_stream",
            "Tool answer on a per-instance stream (prefix rule).",
            "orchestrator>dev:3",
            tool,
            "fleet:tool:responses:dev:dev-1",
        ),
        positive(
            "control_pause_epoch_7",
            "Kill switch to QA under kill epoch 7 (verify with epoch 7).",
            "budget>qa:3",
            pause,
            "fleet:control:qa",
        ),
        positive("usage", "Metered usage to the budget manager.", "orchestrator>budget:3", usage, "fleet:usage"),
        positive(
            "tool_request",
            "Worker asks the tool proxy for a model call.",
            "dev>orchestrator:3",
            req,
            "fleet:tool:requests",
        ),
    ];

    // ---- negative ----
    let good = frame("dev>orchestrator:3", dev_result(20).to_body_bytes());
    let good_wire = good.to_wire();
    let mut neg = Vec::new();

    let mut bad_sig = good.clone();
    bad_sig.sig[31] ^= 0x01;
    neg.push(negative("bad_signature", "Last bit of the signature flipped.", bad_sig.to_wire(), "bad_signature"));

    let mut bad_body = good.clone();
    let at = bad_body.body.len() - 1;
    bad_body.body[at] ^= 0x01;
    neg.push(negative(
        "tampered_body",
        "Last byte of the body changed after signing (still decodes).",
        bad_body.to_wire(),
        "bad_signature",
    ));

    neg.push(negative(
        "truncated",
        "Valid frame with its last byte cut off.",
        good_wire[..good_wire.len() - 1].to_vec(),
        "decode",
    ));
    let mut trailing = good_wire.clone();
    trailing.push(0xc0);
    neg.push(negative("trailing_byte", "Valid frame followed by one extra byte (nil).", trailing, "decode"));
    neg.push(negative(
        "garbage",
        "Bytes that are not MessagePack of a frame.",
        b"\xde\xad\xbe\xef not an envelope".to_vec(),
        "decode",
    ));
    neg.push(negative("empty", "Zero bytes.", vec![], "decode"));

    let mut v2 = good.clone();
    v2.v = 2;
    neg.push(negative("unsupported_version", "Frame version 2.", v2.to_wire(), "unsupported_version"));
    let mut alg = good.clone();
    alg.alg = "none".into();
    neg.push(negative("unsupported_alg", "Algorithm \"none\".", alg.to_wire(), "unsupported_alg"));

    let mut order = dev_result(21).to_body_bytes();
    // Swap to a body whose payload key precedes its type key: build it by hand.
    order.clear();
    {
        use serde::ser::{SerializeMap, Serializer as _};
        let e = dev_result(21);
        let mut s = rmp_serde::Serializer::new(&mut order).with_struct_map();
        let mut map = (&mut s).serialize_map(Some(8)).expect("map");
        map.serialize_entry("id", &e.id).expect("id");
        map.serialize_entry(
            "payload",
            &TaskResult {
                attempt: 1,
                status: Status::Success,
                summary: "ok".into(),
                findings: vec![],
                diff: None,
                log: None,
                change_sha256: None,
                calls: Vec::new(),
            },
        )
        .expect("payload");
        map.serialize_entry("type", "task.result").expect("type");
        map.serialize_entry("from", &e.from).expect("from");
        map.serialize_entry("to", &e.to).expect("to");
        map.serialize_entry("issued_at_ms", &e.issued_at_ms).expect("t");
        map.serialize_entry("ttl_ms", &e.ttl_ms).expect("ttl");
        map.serialize_entry("kill_epoch", &e.kill_epoch).expect("epoch");
        map.end().expect("end");
    }
    neg.push(negative(
        "payload_before_type",
        "Correctly signed body whose `payload` key precedes `type`.",
        frame("dev>orchestrator:3", order).to_wire(),
        "decode",
    ));

    let mut mismatched = dev_result(22);
    mismatched.payload = Heartbeat { seq: 1, busy: false }.into();
    let hb_body = mismatched.to_body_bytes();
    // Rewrite the type string so it claims task.result while the payload is a heartbeat.
    let text = hex::encode(&hb_body).replace(&hex::encode(b"\xa9heartbeat"), &hex::encode(b"\xabtask.result"));
    neg.push(negative(
        "type_payload_mismatch",
        "Signed body says task.result but carries a heartbeat payload.",
        frame("dev>orchestrator:3", hex::decode(text).expect("hex")).to_wire(),
        "decode",
    ));

    neg.push(negative(
        "unknown_kid",
        "Signed with a QA key the orchestrator's test keyring does not hold.",
        {
            let mut e = dev_result(23);
            e.from = sender(Role::Qa, "qa-1");
            frame("qa>orchestrator:3", e.to_body_bytes()).to_wire()
        },
        "unknown_kid",
    ));
    neg.push(negative(
        "future_generation_kid",
        "A generation that was never issued.",
        {
            let kid = "dev>orchestrator:4";
            let body = dev_result(24).to_body_bytes();
            let sig = mac("dev>orchestrator:3", &signing_input(1, kid, "HS256", &body));
            SignedEnvelope { v: 1, kid: kid.into(), alg: "HS256".into(), body, sig }.to_wire()
        },
        "unknown_kid",
    ));
    neg.push(negative(
        "retired_kid",
        "Correctly signed with generation 1, which is retired.",
        frame("dev>orchestrator:1", dev_result(25).to_body_bytes()).to_wire(),
        "retired_kid",
    ));

    let mut liar = dev_result(26);
    liar.from = sender(Role::Qa, "qa-1");
    neg.push(negative(
        "edge_mismatch",
        "Signed with the dev>orchestrator key, body claims to be from qa.",
        frame("dev>orchestrator:3", liar.to_body_bytes()).to_wire(),
        "edge_mismatch",
    ));

    let mut wrong_stream = negative(
        "forbidden_type_on_stream",
        "A valid dev task.result read from fleet:tasks:dev, where dev may not publish.",
        good_wire.clone(),
        "forbidden_type",
    );
    wrong_stream.stream = "fleet:tasks:dev".into();
    neg.push(wrong_stream);
    let mut assign_by_dev = dev_result(27);
    assign_by_dev.payload = TaskAssign {
        attempt: 1,
        instructions: "rm -rf /".into(),
        workspace: "/".into(),
        repository: None,
        test_command: None,
        findings: vec![],
        scope: vec![],
        change: None,
        change_sha256: None,
    }
    .into();
    neg.push(negative(
        "forbidden_type_worker_assign",
        "A dev worker publishing task.assign (workers may not) with a valid dev key.",
        frame("dev>orchestrator:3", assign_by_dev.to_body_bytes()).to_wire(),
        "forbidden_type",
    ));

    let mut expired =
        negative("expired", "Verified 31 s after issued_at + ttl (ttl 60 s, skew 30 s).", good_wire.clone(), "expired");
    expired.now_ms = NOW + 60_000 + 30_001;
    neg.push(expired);
    let mut future =
        negative("future_dated", "Verified 30.001 s before issued_at (skew 30 s).", good_wire.clone(), "future_dated");
    future.now_ms = NOW - 30_001;
    neg.push(future);
    let mut long = dev_result(28);
    long.ttl_ms = 86_400_001;
    neg.push(negative(
        "ttl_too_long",
        "ttl one millisecond above the 24 h limit.",
        frame("dev>orchestrator:3", long.to_body_bytes()).to_wire(),
        "ttl_too_long",
    ));
    let mut stale =
        negative("stale_epoch", "Issued under kill epoch 0, verified under epoch 1.", good_wire.clone(), "stale_epoch");
    stale.kill_epoch = 1;
    neg.push(stale);
    let mut big =
        negative("oversized", "A valid frame larger than this vector's 64-byte limit.", good_wire.clone(), "too_large");
    big.max_size = Some(64);
    neg.push(big);
    let mut replay =
        negative("replay", "A valid frame whose id the guard has already seen.", good_wire.clone(), "replay");
    replay.seen_ids = vec![id(NOW, 20)];
    neg.push(replay);

    std::fs::create_dir_all(&dir).expect("create vector dir");
    let write = |name: &str, text: String| std::fs::write(dir.join(name), text + "\n").expect("write vector file");
    write("keys.json", serde_json::to_string_pretty(&keys).expect("json"));
    write("positive.json", serde_json::to_string_pretty(&positives).expect("json"));
    write("negative.json", serde_json::to_string_pretty(&neg).expect("json"));
    eprintln!("wrote {} positive and {} negative vectors to {}", positives.len(), neg.len(), dir.display());
}
