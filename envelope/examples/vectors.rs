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
            containment: Vec::new(),
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

fn negative(name: &str, rule: &str, description: &str, wire: Vec<u8>, expected: &str) -> Negative {
    Negative {
        name: name.into(),
        description: description.into(),
        rule: rule.into(),
        wire_hex: hex::encode(wire),
        stream: "fleet:results".into(),
        now_ms: NOW + 1_000,
        kill_epoch: 0,
        max_size: None,
        seen_ids: vec![],
        expected_error: expected.into(),
    }
}

/// A frame a verifier must accept: `body` is signed as given and must mean `fields`.
fn accepted(name: &str, rule: &str, description: &str, kid: &str, fields: Envelope, body: Vec<u8>) -> Accepted {
    let decoded = Envelope::from_body_bytes(&body).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(decoded, fields, "{name}: the body must mean `fields`");
    let stream = match fields.message_type() {
        MessageType::TaskResult => streams::RESULTS,
        MessageType::Heartbeat => streams::HEARTBEATS,
        other => panic!("{name}: no stream for {other}"),
    };
    Accepted {
        name: name.into(),
        description: description.into(),
        rule: rule.into(),
        kid: kid.into(),
        kill_epoch: fields.kill_epoch,
        fields,
        body_hex: hex::encode(&body),
        wire_hex: hex::encode(frame(kid, body).to_wire()),
        stream: stream.into(),
        now_ms: NOW + 1_000,
    }
}

/// The reference body of `env`, as an editable map.
fn body_map(env: &Envelope) -> raw::Map {
    raw::Map::parse(&env.to_body_bytes())
}

/// `body` signed correctly with the newest dev>orchestrator key: only the body is wrong.
fn dev_signed(body: Vec<u8>) -> Vec<u8> {
    frame("dev>orchestrator:3", body).to_wire()
}

/// A frame put together from its five items' encodings, headers included.
fn frame_of(items: [&[u8]; 5]) -> Vec<u8> {
    [&[0x95][..], items[0], items[1], items[2], items[3], items[4]].concat()
}

/// Hand-made MessagePack, for bodies and frames that the reference encoder would never write.
mod raw {
    /// The shortest `str` of `s`.
    pub(crate) fn str(s: &str) -> Vec<u8> {
        str_bytes(s.as_bytes())
    }

    /// The shortest `str` header followed by `b`, which need not be UTF-8.
    pub(crate) fn str_bytes(b: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        rmp::encode::write_str_len(&mut out, b.len() as u32).expect("in memory");
        out.extend_from_slice(b);
        out
    }

    /// The shortest `bin` of `b`.
    pub(crate) fn bin(b: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        rmp::encode::write_bin_len(&mut out, b.len() as u32).expect("in memory");
        out.extend_from_slice(b);
        out
    }

    /// `b` behind an explicit header `marker` + big-endian length of `width` bytes.
    pub(crate) fn with_header(marker: u8, width: usize, b: &[u8]) -> Vec<u8> {
        let mut out = vec![marker];
        out.extend_from_slice(&(b.len() as u64).to_be_bytes()[8 - width..]);
        out.extend_from_slice(b);
        out
    }

    /// The shortest unsigned integer.
    pub(crate) fn uint(v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        rmp::encode::write_uint(&mut out, v).expect("in memory");
        out
    }

    pub(crate) fn hex(h: &str) -> Vec<u8> {
        ::hex::decode(h.replace(' ', "")).expect("hex")
    }

    /// The length of the one MessagePack value at the start of `b`.
    pub(crate) fn value_len(b: &[u8]) -> usize {
        let be = |at: usize, n: usize| b[at..at + n].iter().fold(0usize, |a, x| a << 8 | usize::from(*x));
        let items = |head: usize, n: usize| {
            let mut at = head;
            for _ in 0..n {
                at += value_len(&b[at..]);
            }
            at
        };
        match b[0] {
            0x00..=0x7f | 0xc0 | 0xc2 | 0xc3 | 0xe0..=0xff => 1,
            m @ 0x80..=0x8f => items(1, 2 * usize::from(m & 0x0f)),
            m @ 0x90..=0x9f => items(1, usize::from(m & 0x0f)),
            m @ 0xa0..=0xbf => 1 + usize::from(m & 0x1f),
            0xc4 | 0xd9 => 2 + be(1, 1),
            0xc5 | 0xda => 3 + be(1, 2),
            0xc6 | 0xdb => 5 + be(1, 4),
            0xcc | 0xd0 => 2,
            0xcd | 0xd1 => 3,
            0xce | 0xd2 | 0xca => 5,
            0xcf | 0xd3 | 0xcb => 9,
            0xdc => items(3, be(1, 2)),
            0xde => items(3, 2 * be(1, 2)),
            m => panic!("marker {m:#x} not used by these vectors"),
        }
    }

    /// A map's entries, each as its key's and value's bytes; `b` must be a fixmap.
    pub(crate) fn entries(b: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        assert!((0x80..=0x8f).contains(&b[0]), "a fixmap");
        let mut at = 1;
        (0..b[0] & 0x0f)
            .map(|_| {
                let k = value_len(&b[at..]);
                let v = value_len(&b[at + k..]);
                let e = (b[at..at + k].to_vec(), b[at + k..at + k + v].to_vec());
                at += k + v;
                e
            })
            .collect()
    }

    /// A map, editable by key, written back as a fixmap.
    #[derive(Clone)]
    pub(crate) struct Map(pub(crate) Vec<(Vec<u8>, Vec<u8>)>);

    impl Map {
        pub(crate) fn parse(b: &[u8]) -> Self {
            Map(entries(b))
        }

        fn at(&self, key: &str) -> usize {
            self.0.iter().position(|(k, _)| *k == str(key)).unwrap_or_else(|| panic!("no key {key}"))
        }

        pub(crate) fn get(&self, key: &str) -> &[u8] {
            &self.0[self.at(key)].1
        }

        pub(crate) fn set(mut self, key: &str, value: Vec<u8>) -> Self {
            let i = self.at(key);
            self.0[i].1 = value;
            self
        }

        /// Adds `key` before `before` (or at the end when `before` is `None`).
        pub(crate) fn insert(mut self, before: Option<&str>, key: Vec<u8>, value: Vec<u8>) -> Self {
            let i = before.map_or(self.0.len(), |b| self.at(b));
            self.0.insert(i, (key, value));
            self
        }

        pub(crate) fn remove(mut self, key: &str) -> Self {
            let i = self.at(key);
            self.0.remove(i);
            self
        }

        /// The entries in the order of `keys`, which must name each key once.
        pub(crate) fn reorder(self, keys: &[&str]) -> Self {
            assert_eq!(keys.len(), self.0.len());
            Map(keys.iter().map(|k| self.0[self.at(k)].clone()).collect())
        }

        /// Rewrites the payload map in place.
        pub(crate) fn payload(self, edit: impl FnOnce(Map) -> Map) -> Self {
            let p = edit(Map::parse(self.get("payload"))).bytes();
            self.set("payload", p)
        }

        pub(crate) fn bytes(&self) -> Vec<u8> {
            let mut out = vec![0x80 | u8::try_from(self.0.len()).expect("a fixmap")];
            for (k, v) in &self.0 {
                out.extend_from_slice(k);
                out.extend_from_slice(v);
            }
            out
        }

        /// The same entries behind a map16 header.
        pub(crate) fn bytes_map16(&self) -> Vec<u8> {
            let mut out = vec![0xde, 0x00];
            out.extend_from_slice(&self.bytes());
            out[2] = u8::try_from(self.0.len()).expect("a fixmap");
            out
        }
    }
}

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "envelope/tests/vectors".into()));
    // Every edge the vectors use, with generations 1 (retired), 2 and 3, as `fleetctl keys`
    // leaves a keyset after two rotations and `retire --through 1`. One verifier holds them
    // all, so it is no single role's keyset: it verifies envelopes addressed to four roles.
    let ring_kids: Vec<String> = ["dev>orchestrator", "orchestrator>dev", "budget>qa", "orchestrator>budget"]
        .iter()
        .flat_map(|edge| (1..=3).map(move |g| format!("{edge}:{g}")))
        .collect();
    let keys = KeysFile {
        description: "Master secret = bytes 00..1f; current generation 3. \
                      Edge key = HKDF-SHA256(salt, ikm = master, info = kid as UTF-8), 32 bytes. \
                      Every vector is verified by a verifier holding `verifier_keyring` (four edges, each with \
                      generation 1 retired and 2 and 3 active; any other kid is unknown) and the permission \
                      file `permissions`."
            .into(),
        master_secret_hex: hex::encode(std::array::from_fn::<u8, 32, _>(|i| i as u8)),
        hkdf_salt: String::from_utf8(envelope::keys::EDGE_KEY_SALT.to_vec()).expect("ascii"),
        derivations: [
            "dev>orchestrator:1",
            "dev>orchestrator:3",
            "orchestrator>dev:3",
            "budget>qa:3",
            "orchestrator>budget:3",
        ]
        .iter()
        .map(|k| Derivation { kid: (*k).into(), key_hex: hex::encode(key(k)) })
        .collect(),
        verifier_keyring: ring_kids
            .iter()
            .map(|k| {
                let retired = k.ends_with(":1");
                RingKey { kid: k.clone(), key_hex: (!retired).then(|| hex::encode(key(k))), retired }
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
        calls: vec![
            envelope::ToolCallRecord {
                tool: "read_file".into(),
                args: "path=\"app.py\"".into(),
                verdict: envelope::CallVerdict::Ok,
                reason: None,
                ms: 3,
            },
            envelope::ToolCallRecord {
                tool: "read_file".into(),
                args: "path=\".env\"".into(),
                verdict: envelope::CallVerdict::Refused,
                reason: Some(".env is an environment file (.env*); agents never read or write those".into()),
                ms: 0,
            },
        ],
        containment: vec!["network".into()],
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
        ControlPause { epoch: 7, reason: "daily token budget exceeded".into(), by: None },
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

    let incident = base(
        sender(Role::Orchestrator, "orchestrator-0"),
        Role::Budget,
        0x49,
        IncidentOpened {
            incident: id(NOW - 50, 0x49),
            severity: "critical".into(),
            trigger: "secret_after_approval".into(),
            title: "Approved change carries a credential".into(),
            repository: Some("https://git.example/app.git".into()),
            freezes_merges: true,
            opened_at_ms: NOW - 50,
            opened_by: "orchestrator/orchestrator-0".into(),
            tasks: vec![id(NOW - 5000, 0x4a)],
        },
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
            tool.clone(),
            "fleet:tool:responses:dev:dev-1",
        ),
        positive(
            "control_pause_epoch_7",
            "Kill switch to QA under kill epoch 7 (verify with epoch 7).",
            "budget>qa:3",
            pause,
            "fleet:control:qa",
        ),
        positive(
            "usage",
            "Metered usage to the budget manager.",
            "orchestrator>budget:3",
            usage.clone(),
            "fleet:usage",
        ),
        positive(
            "tool_request",
            "Worker asks the tool proxy for a model call.",
            "dev>orchestrator:3",
            req,
            "fleet:tool:requests",
        ),
        positive(
            "incident_opened",
            "An incident for the budget manager to alert on; optional key and list set.",
            "orchestrator>budget:3",
            incident,
            "fleet:control:budget",
        ),
    ];

    // ---- negative ----
    let good = frame("dev>orchestrator:3", dev_result(20).to_body_bytes());
    let good_wire = good.to_wire();
    let mut neg = Vec::new();

    let mut bad_sig = good.clone();
    bad_sig.sig[31] ^= 0x01;
    neg.push(negative(
        "bad_signature",
        "signature",
        "Last bit of the signature flipped.",
        bad_sig.to_wire(),
        "bad_signature",
    ));

    let mut bad_body = good.clone();
    let at = bad_body.body.len() - 1;
    bad_body.body[at] ^= 0x01;
    neg.push(negative(
        "tampered_body",
        "signature",
        "Last byte of the body changed after signing (still decodes).",
        bad_body.to_wire(),
        "bad_signature",
    ));

    neg.push(negative(
        "truncated",
        "frame-shape",
        "Valid frame with its last byte cut off.",
        good_wire[..good_wire.len() - 1].to_vec(),
        "decode",
    ));
    let mut trailing = good_wire.clone();
    trailing.push(0xc0);
    neg.push(negative(
        "trailing_byte",
        "frame-end",
        "Valid frame followed by one extra byte (nil).",
        trailing,
        "decode",
    ));
    neg.push(negative(
        "garbage",
        "frame-shape",
        "Bytes that are not MessagePack of a frame.",
        b"\xde\xad\xbe\xef not an envelope".to_vec(),
        "decode",
    ));
    neg.push(negative("empty", "frame-shape", "Zero bytes.", vec![], "decode"));

    let mut v2 = good.clone();
    v2.v = 2;
    neg.push(negative("unsupported_version", "frame-version", "Frame version 2.", v2.to_wire(), "unsupported_version"));
    let mut alg = good.clone();
    alg.alg = "none".into();
    neg.push(negative("unsupported_alg", "frame-alg", "Algorithm \"none\".", alg.to_wire(), "unsupported_alg"));

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
                containment: Vec::new(),
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
        "body-order",
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
        "body-payload-type",
        "Signed body says task.result but carries a heartbeat payload.",
        frame("dev>orchestrator:3", hex::decode(text).expect("hex")).to_wire(),
        "decode",
    ));

    neg.push(negative(
        "unknown_kid",
        "kid-known",
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
        "kid-known",
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
        "kid-retired",
        "Correctly signed with generation 1, which is retired.",
        frame("dev>orchestrator:1", dev_result(25).to_body_bytes()).to_wire(),
        "retired_kid",
    ));

    let mut liar = dev_result(26);
    liar.from = sender(Role::Qa, "qa-1");
    neg.push(negative(
        "edge_mismatch",
        "edge",
        "Signed with the dev>orchestrator key, body claims to be from qa.",
        frame("dev>orchestrator:3", liar.to_body_bytes()).to_wire(),
        "edge_mismatch",
    ));

    let mut wrong_stream = negative(
        "forbidden_type_on_stream",
        "permission",
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
        "permission",
        "A dev worker publishing task.assign (workers may not) with a valid dev key.",
        frame("dev>orchestrator:3", assign_by_dev.to_body_bytes()).to_wire(),
        "forbidden_type",
    ));

    let mut expired = negative(
        "expired",
        "clock-expired",
        "Verified 31 s after issued_at + ttl (ttl 60 s, skew 30 s).",
        good_wire.clone(),
        "expired",
    );
    expired.now_ms = NOW + 60_000 + 30_001;
    neg.push(expired);
    let mut future = negative(
        "future_dated",
        "clock-future",
        "Verified 30.001 s before issued_at (skew 30 s).",
        good_wire.clone(),
        "future_dated",
    );
    future.now_ms = NOW - 30_001;
    neg.push(future);
    let mut long = dev_result(28);
    long.ttl_ms = 86_400_001;
    neg.push(negative(
        "ttl_too_long",
        "ttl",
        "ttl one millisecond above the 24 h limit.",
        frame("dev>orchestrator:3", long.to_body_bytes()).to_wire(),
        "ttl_too_long",
    ));
    let mut stale = negative(
        "stale_epoch",
        "epoch",
        "Issued under kill epoch 0, verified under epoch 1.",
        good_wire.clone(),
        "stale_epoch",
    );
    stale.kill_epoch = 1;
    neg.push(stale);
    let mut big = negative(
        "oversized",
        "frame-size",
        "A valid frame larger than this vector's 64-byte limit.",
        good_wire.clone(),
        "too_large",
    );
    big.max_size = Some(64);
    neg.push(big);
    let mut replay =
        negative("replay", "replay", "A valid frame whose id the guard has already seen.", good_wire.clone(), "replay");
    replay.seen_ids = vec![id(NOW, 20)];
    neg.push(replay);

    // ---- negative: every rule the vectors above leave out (docs/wire-format.md §11) ----
    let kid3 = raw::str("dev>orchestrator:3");
    let hs256 = raw::str("HS256");
    let body20 = good.body.clone();
    let sig20 = good.sig.clone();
    let (b_body, b_sig) = (raw::bin(&body20), raw::bin(&sig20));
    let frame_vec = |name: &str, rule: &str, description: &str, wire: Vec<u8>, expected: &str| {
        negative(name, rule, description, wire, expected)
    };
    // The frame's shape: exactly [v, kid, alg, body, sig] with those MessagePack types.
    neg.push(frame_vec(
        "v_as_int8",
        "frame-shape",
        "v = 1 written as an int8 (d0 01): v is a positive fixint, or a uint8 from 128.",
        frame_of([&[0xd0, 0x01], &kid3, &hs256, &b_body, &b_sig]),
        "decode",
    ));
    neg.push(frame_vec(
        "v_negative",
        "frame-shape",
        "v = -1 (negative fixint ff).",
        frame_of([&[0xff], &kid3, &hs256, &b_body, &b_sig]),
        "decode",
    ));
    neg.push(frame_vec(
        "v_256",
        "frame-shape",
        "v = 256 (uint16 cd 0100): too large for v, not an unsupported version.",
        frame_of([&[0xcd, 0x01, 0x00], &kid3, &hs256, &b_body, &b_sig]),
        "decode",
    ));
    neg.push(frame_vec(
        "kid_as_bin",
        "frame-shape",
        "The kid written as a bin8 instead of a str.",
        frame_of([&[0x01], &raw::bin(b"dev>orchestrator:3"), &hs256, &b_body, &b_sig]),
        "decode",
    ));
    neg.push(frame_vec(
        "body_as_str8",
        "frame-shape",
        "The body written as a str8 (d9 ad): its header is as long as the bin8's, so only the type tells.",
        frame_of([&[0x01], &kid3, &hs256, &raw::with_header(0xd9, 1, &body20), &b_sig]),
        "decode",
    ));
    neg.push(frame_vec(
        "sig_as_str8",
        "frame-shape",
        "The signature written as a str8 (d9 20) instead of a bin8 of the same length.",
        frame_of([&[0x01], &kid3, &hs256, &b_body, &raw::with_header(0xd9, 1, &sig20)]),
        "decode",
    ));
    neg.push(frame_vec(
        "frame_four_items",
        "frame-shape",
        "A fixarray of 4: the signature is missing.",
        [&[0x94][..], &[0x01], &kid3, &hs256, &b_body].concat(),
        "decode",
    ));
    neg.push(frame_vec(
        "frame_six_items",
        "frame-shape",
        "A fixarray of 6: a nil after the signature.",
        [&[0x96][..], &[0x01], &kid3, &hs256, &b_body, &b_sig, &[0xc0]].concat(),
        "decode",
    ));
    neg.push(frame_vec(
        "frame_as_map",
        "frame-shape",
        "The five items as a map keyed by their names.",
        [
            &[0x85][..],
            &raw::str("v"),
            &[0x01],
            &raw::str("kid"),
            &kid3,
            &raw::str("alg"),
            &hs256,
            &raw::str("body"),
            &b_body,
            &raw::str("sig"),
            &b_sig,
        ]
        .concat(),
        "decode",
    ));
    // Shortest headers.
    neg.push(frame_vec(
        "v_as_uint8",
        "frame-shortest",
        "v = 1 written as a uint8 (cc 01).",
        frame_of([&[0xcc, 0x01], &kid3, &hs256, &b_body, &b_sig]),
        "decode",
    ));
    neg.push(frame_vec(
        "kid_str8",
        "frame-shortest",
        "The 18-byte kid behind a str8 header (d9 12) instead of a fixstr.",
        frame_of([&[0x01], &raw::with_header(0xd9, 1, b"dev>orchestrator:3"), &hs256, &b_body, &b_sig]),
        "decode",
    ));
    neg.push(frame_vec(
        "alg_str8",
        "frame-shortest",
        "\"HS256\" behind a str8 header (d9 05).",
        frame_of([&[0x01], &kid3, &raw::with_header(0xd9, 1, b"HS256"), &b_body, &b_sig]),
        "decode",
    ));
    neg.push(frame_vec(
        "body_bin16",
        "frame-shortest",
        "The 173-byte body behind a bin16 header (c5 00ad).",
        frame_of([&[0x01], &kid3, &hs256, &raw::with_header(0xc5, 2, &body20), &b_sig]),
        "decode",
    ));
    neg.push(frame_vec(
        "body_bin32",
        "frame-shortest",
        "The 173-byte body behind a bin32 header (c6 000000ad).",
        frame_of([&[0x01], &kid3, &hs256, &raw::with_header(0xc6, 4, &body20), &b_sig]),
        "decode",
    ));
    neg.push(frame_vec(
        "sig_bin16",
        "frame-shortest",
        "The signature behind a bin16 header (c5 0020).",
        frame_of([&[0x01], &kid3, &hs256, &b_body, &raw::with_header(0xc5, 2, &sig20)]),
        "decode",
    ));
    neg.push(frame_vec(
        "frame_array16",
        "frame-shortest",
        "The five items behind an array16 header (dc 0005).",
        [&[0xdc, 0x00, 0x05][..], &[0x01], &kid3, &hs256, &b_body, &b_sig].concat(),
        "decode",
    ));
    neg.push(frame_vec(
        "kid_not_utf8",
        "frame-utf8",
        "The kid's last byte is ff: a str that is not UTF-8.",
        frame_of([&[0x01], &raw::str_bytes(b"dev>orchestrator:\xff"), &hs256, &b_body, &b_sig]),
        "decode",
    ));
    let versioned = |v: u8, alg: &str, body: &[u8], sig: &[u8]| {
        let mut f =
            SignedEnvelope { v, kid: "dev>orchestrator:3".into(), alg: alg.into(), body: body.to_vec(), sig: vec![] };
        f.sig = mac("dev>orchestrator:3", &signing_input(v, &f.kid, alg, body));
        if !sig.is_empty() {
            f.sig = sig.to_vec();
        }
        f.to_wire()
    };
    neg.push(frame_vec(
        "version_0",
        "frame-version",
        "v = 0, correctly signed.",
        versioned(0, "HS256", &body20, &[]),
        "unsupported_version",
    ));
    neg.push(frame_vec(
        "version_255",
        "frame-version",
        "v = 255 (cc ff, its shortest form), correctly signed.",
        versioned(255, "HS256", &body20, &[]),
        "unsupported_version",
    ));
    neg.push(frame_vec(
        "alg_lowercase",
        "frame-alg",
        "alg \"hs256\": names are compared byte for byte.",
        versioned(1, "hs256", &body20, &[]),
        "unsupported_alg",
    ));
    for (name, len) in [("sig_31_bytes", 31), ("sig_33_bytes", 33), ("sig_empty", 0)] {
        let mut f = good.clone();
        f.sig.resize(len, 0);
        neg.push(frame_vec(
            name,
            "frame-sig-length",
            &format!("A {len}-byte sig: a sig is 32 bytes."),
            f.to_wire(),
            "decode",
        ));
    }

    // Which check answers when several would fail (§6's order).
    neg.push(frame_vec(
        "version_2_kid_str8",
        "order-shape-first",
        "v = 2 with its kid behind a str8 header: the shape and shortest-form checks come before the version.",
        frame_of([&[0x02], &raw::with_header(0xd9, 1, b"dev>orchestrator:3"), &hs256, &b_body, &b_sig]),
        "decode",
    ));
    neg.push(frame_vec(
        "version_2_alg_none",
        "order-version-alg-sig-body",
        "v = 2 and alg \"none\": the version is checked first.",
        versioned(2, "none", &body20, &[]),
        "unsupported_version",
    ));
    neg.push(frame_vec(
        "version_2_sig_31_bytes",
        "order-version-alg-sig-body",
        "v = 2 with a 31-byte sig: the version comes before the sig length.",
        versioned(2, "HS256", &body20, &[9; 31]),
        "unsupported_version",
    ));
    neg.push(frame_vec(
        "version_2_body_not_msgpack",
        "order-version-alg-sig-body",
        "v = 2 with a body that is not a body: the version comes before the body is decoded.",
        versioned(2, "HS256", b"\xc1 not a body", &[]),
        "unsupported_version",
    ));
    neg.push(frame_vec(
        "alg_none_sig_31_bytes",
        "order-version-alg-sig-body",
        "alg \"none\" with a 31-byte sig: the algorithm comes before the sig length.",
        versioned(1, "none", &body20, &[9; 31]),
        "unsupported_alg",
    ));
    neg.push(frame_vec(
        "sig_31_bytes_body_not_msgpack",
        "order-version-alg-sig-body",
        "A 31-byte sig and a body that is not MessagePack: both are decode.",
        versioned(1, "HS256", b"\xc1", &[9; 31]),
        "decode",
    ));
    neg.push(frame_vec(
        "unknown_kid_body_not_msgpack",
        "order-body-before-kid",
        "An unknown kid and an undecodable body: the body is decoded before the kid is looked up.",
        frame("qa>orchestrator:3", b"\xc1".to_vec()).to_wire(),
        "decode",
    ));
    neg.push(frame_vec(
        "unknown_kid_unknown_role",
        "order-body-before-kid",
        "Unknown kid; the body's `to` is the unknown role \"planner\": decode, before unknown_kid.",
        frame("qa>orchestrator:3", body_map(&dev_result(30)).set("to", raw::str("planner")).bytes()).to_wire(),
        "decode",
    ));
    neg.push(frame_vec(
        "tampered_body_undecodable",
        "order-body-before-signature",
        "The body's map header changed from 88 to 89 after signing: it no longer decodes, and decoding comes first.",
        {
            let mut f = good.clone();
            f.body[0] = 0x89;
            f.to_wire()
        },
        "decode",
    ));
    neg.push(frame_vec(
        "retired_kid_bad_signature",
        "order-kid-before-signature",
        "Generation 1 (retired) with a signature made by nobody.",
        {
            let mut f = frame("dev>orchestrator:1", dev_result(31).to_body_bytes());
            f.sig = vec![0; 32];
            f.to_wire()
        },
        "retired_kid",
    ));
    {
        let mut qa_assign = dev_result(32);
        qa_assign.from = sender(Role::Qa, "qa-1");
        qa_assign.payload = assign_by_dev.payload.clone();
        neg.push(frame_vec(
            "edge_mismatch_and_forbidden",
            "order-after-signature",
            "dev key, body from qa with task.assign: the edge is checked before the permission table.",
            dev_signed(qa_assign.to_body_bytes()),
            "edge_mismatch",
        ));
    }
    let mut v = frame_vec(
        "forbidden_and_expired",
        "order-after-signature",
        "Read from fleet:tasks:dev, an hour late: the permission table before the clock.",
        good_wire.clone(),
        "forbidden_type",
    );
    (v.stream, v.now_ms) = ("fleet:tasks:dev".into(), NOW + 3_600_000);
    neg.push(v);
    {
        let mut e = dev_result(33);
        e.ttl_ms = 86_400_001;
        let mut v = frame_vec(
            "ttl_too_long_and_future_dated",
            "order-after-signature",
            "ttl over the limit, verified a minute before issued_at: the ttl limit before the clock.",
            dev_signed(e.to_body_bytes()),
            "ttl_too_long",
        );
        v.now_ms = NOW - 60_000;
        neg.push(v);
    }
    let mut v = frame_vec(
        "future_dated_and_stale_epoch",
        "order-after-signature",
        "Verified a minute early under kill epoch 1: the clock before the epoch.",
        good_wire.clone(),
        "future_dated",
    );
    (v.now_ms, v.kill_epoch) = (NOW - 60_000, 1);
    neg.push(v);
    let mut v = frame_vec(
        "expired_and_stale_epoch",
        "order-after-signature",
        "Verified an hour late under kill epoch 1: the clock before the epoch.",
        good_wire.clone(),
        "expired",
    );
    (v.now_ms, v.kill_epoch) = (NOW + 3_600_000, 1);
    neg.push(v);
    let mut v = frame_vec(
        "stale_epoch_and_replay",
        "order-after-signature",
        "An id already seen, under kill epoch 1: the epoch before the replay guard.",
        good_wire.clone(),
        "stale_epoch",
    );
    (v.kill_epoch, v.seen_ids) = (1, vec![id(NOW, 20)]);
    neg.push(v);
    let mut v = frame_vec(
        "oversized_garbage",
        "order-size-first",
        "Twenty-two bytes of garbage over a 16-byte limit: the size is checked before anything is decoded.",
        b"\xde\xad\xbe\xef not an envelope".to_vec(),
        "too_large",
    );
    v.max_size = Some(16);
    neg.push(v);

    // The body (§3), each correctly signed with the dev>orchestrator key.
    let body = |n: u8| body_map(&dev_result(n));
    let payload_tr = |attempt: &[u8], status: &[u8], summary: &[u8]| {
        raw::Map(vec![
            (raw::str("attempt"), attempt.to_vec()),
            (raw::str("status"), status.to_vec()),
            (raw::str("summary"), summary.to_vec()),
        ])
    };
    let mut body_vec = |name: &str, rule: &str, description: &str, body: Vec<u8>| {
        neg.push(negative(name, rule, description, dev_signed(body), "decode"));
    };
    body_vec("body_array", "body-map", "The body as an array of its values in key order.", {
        let m = body(40);
        let mut out = vec![0x90 | m.0.len() as u8];
        m.0.iter().for_each(|(_, v)| out.extend_from_slice(v));
        out
    });
    body_vec(
        "body_unknown_key",
        "body-keys",
        "An extra key \"priority\": 1 before payload.",
        body(41).insert(Some("payload"), raw::str("priority"), raw::uint(1)).bytes(),
    );
    body_vec(
        "body_duplicate_key",
        "body-keys",
        "ttl_ms twice, both 60000.",
        body(42).insert(Some("payload"), raw::str("ttl_ms"), raw::uint(60_000)).bytes(),
    );
    body_vec("body_missing_ttl", "body-keys", "No ttl_ms.", body(43).remove("ttl_ms").bytes());
    body_vec("body_missing_payload", "body-keys", "No payload.", body(44).remove("payload").bytes());
    body_vec("body_key_as_bin", "body-keys", "The key \"id\" written as a bin.", {
        let mut m = body(45);
        m.0[0].0 = raw::bin(b"id");
        m.bytes()
    });
    body_vec(
        "body_id_as_str",
        "body-types",
        "id as its 36-character text instead of 16 bytes of bin.",
        body(46).set("id", raw::str(&id(NOW, 46).to_string())).bytes(),
    );
    body_vec(
        "body_id_15_bytes",
        "body-types",
        "id as a bin of 15 bytes.",
        body(47).set("id", raw::bin(&[47; 15])).bytes(),
    );
    body_vec(
        "body_to_as_bin",
        "body-types",
        "to = \"orchestrator\" written as a bin.",
        body(48).set("to", raw::bin(b"orchestrator")).bytes(),
    );
    body_vec(
        "body_traceparent_as_bin",
        "body-types",
        "traceparent written as a bin.",
        body(49)
            .insert(
                Some("payload"),
                raw::str("traceparent"),
                raw::bin(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            )
            .bytes(),
    );
    body_vec(
        "body_ttl_as_str",
        "body-types",
        "ttl_ms = \"60000\", a str.",
        body(50).set("ttl_ms", raw::str("60000")).bytes(),
    );
    body_vec(
        "body_task_id_nil",
        "body-nil",
        "task_id present with nil.",
        body(51).insert(Some("issued_at_ms"), raw::str("task_id"), vec![0xc0]).bytes(),
    );
    body_vec(
        "payload_optional_nil",
        "body-nil",
        "task.result with change_sha256 present as nil (absent optional keys are left out).",
        body(52).payload(|p| p.insert(None, raw::str("change_sha256"), vec![0xc0])).bytes(),
    );
    body_vec(
        "payload_list_nil",
        "body-nil",
        "task.result with findings present as nil.",
        body(53).payload(|p| p.insert(None, raw::str("findings"), vec![0xc0])).bytes(),
    );
    body_vec(
        "kill_epoch_negative",
        "body-integers",
        "kill_epoch = -1 (ff).",
        body(54).set("kill_epoch", vec![0xff]).bytes(),
    );
    body_vec(
        "attempt_over_u32",
        "body-integers",
        "attempt = 2^32, one more than a uint32 holds.",
        body(55).payload(|p| p.set("attempt", raw::uint(1 << 32))).bytes(),
    );
    body_vec(
        "ttl_as_float",
        "body-integers",
        "ttl_ms = 60000.0 as a float64.",
        body(56).set("ttl_ms", raw::hex("cb 40ed4c0000000000")).bytes(),
    );
    body_vec(
        "summary_not_utf8",
        "body-utf8",
        "summary is a str whose bytes (c3 28) are not UTF-8.",
        body(57).payload(|p| p.set("summary", raw::str_bytes(b"\xc3\x28"))).bytes(),
    );
    body_vec(
        "diff_str_not_utf8",
        "body-utf8",
        "diff given as a str (not a bin) whose byte ff is not UTF-8.",
        body(58).payload(|p| p.insert(None, raw::str("diff"), raw::str_bytes(b"\xff"))).bytes(),
    );
    body_vec("body_trailing_nil", "body-end", "A nil after the body map, inside the signed bytes.", {
        let mut b = body(59).bytes();
        b.push(0xc0);
        b
    });
    for (name, instance, why) in [
        ("instance_with_slash", "dev/1", "a '/'"),
        ("instance_empty", "", "no character"),
        ("instance_65_chars", &"d".repeat(65), "65 characters"),
        ("instance_non_ascii", "dév-1", "a non-ASCII letter"),
    ] {
        body_vec(
            name,
            "body-instance",
            &format!("from.instance with {why}."),
            body(60)
                .set("from", raw::Map::parse(body(60).get("from")).set("instance", raw::str(instance)).bytes())
                .bytes(),
        );
    }
    body_vec("to_unknown_role", "body-role", "to = \"planner\".", body(61).set("to", raw::str("planner")).bytes());
    body_vec(
        "from_unknown_role",
        "body-role",
        "from.role = \"planner\".",
        body(62).set("from", raw::Map::parse(body(62).get("from")).set("role", raw::str("planner")).bytes()).bytes(),
    );
    body_vec(
        "unknown_type",
        "body-type",
        "type = \"task.cancel\".",
        body(63).set("type", raw::str("task.cancel")).bytes(),
    );
    body_vec(
        "from_as_array",
        "from-shape",
        "from as the array [\"dev\", \"dev-1\"].",
        body(64).set("from", [&[0x92][..], &raw::str("dev"), &raw::str("dev-1")].concat()).bytes(),
    );
    body_vec(
        "from_unknown_key",
        "from-shape",
        "from with a third key \"host\".",
        body(65)
            .set("from", raw::Map::parse(body(65).get("from")).insert(None, raw::str("host"), raw::str("h1")).bytes())
            .bytes(),
    );
    body_vec(
        "from_missing_instance",
        "from-shape",
        "from without instance.",
        body(66).set("from", raw::Map::parse(body(66).get("from")).remove("instance").bytes()).bytes(),
    );
    body_vec(
        "from_duplicate_role",
        "from-shape",
        "from with role twice.",
        body(67)
            .set(
                "from",
                raw::Map::parse(body(67).get("from"))
                    .insert(Some("instance"), raw::str("role"), raw::str("dev"))
                    .bytes(),
            )
            .bytes(),
    );
    body_vec(
        "from_integer_keys",
        "from-shape",
        "from keyed by field numbers {0: \"dev\", 1: \"dev-1\"}.",
        body(68).set("from", [&[0x82, 0x00][..], &raw::str("dev"), &[0x01], &raw::str("dev-1")].concat()).bytes(),
    );
    body_vec(
        "payload_as_array",
        "payload-shape",
        "The task.result payload as the array [1, \"success\", \"ok\"].",
        body(69).set("payload", [&[0x93, 0x01][..], &raw::str("success"), &raw::str("ok")].concat()).bytes(),
    );
    body_vec(
        "payload_unknown_key",
        "payload-shape",
        "task.result with an extra key \"score\": 1.",
        body(70).payload(|p| p.insert(None, raw::str("score"), raw::uint(1))).bytes(),
    );
    body_vec(
        "payload_missing_key",
        "payload-shape",
        "task.result without summary.",
        body(71).payload(|p| p.remove("summary")).bytes(),
    );
    body_vec(
        "payload_duplicate_key",
        "payload-shape",
        "task.result with attempt twice.",
        body(72).payload(|p| p.insert(Some("status"), raw::str("attempt"), raw::uint(1))).bytes(),
    );
    body_vec(
        "payload_integer_keys",
        "payload-shape",
        "task.result keyed by field numbers {0: 1, 1: \"success\", 2: \"ok\"}.",
        body(73)
            .set("payload", [&[0x83, 0x00, 0x01][..], &[0x01], &raw::str("success"), &[0x02], &raw::str("ok")].concat())
            .bytes(),
    );
    body_vec(
        "status_unknown",
        "payload-types",
        "status = \"ok\", not one of success, failure, error.",
        body(74).set("payload", payload_tr(&[0x01], &raw::str("ok"), &raw::str("ok")).bytes()).bytes(),
    );
    body_vec(
        "status_as_integer",
        "payload-types",
        "status = 0 (the index of success).",
        body(75).set("payload", payload_tr(&[0x01], &[0x00], &raw::str("ok")).bytes()).bytes(),
    );
    body_vec(
        "summary_as_bin",
        "payload-types",
        "summary = \"ok\" written as a bin.",
        body(76).set("payload", payload_tr(&[0x01], &raw::str("success"), &raw::bin(b"ok")).bytes()).bytes(),
    );
    body_vec(
        "diff_as_str",
        "payload-types",
        "diff written as a str instead of a bin.",
        body(77).payload(|p| p.insert(None, raw::str("diff"), raw::str("--- a/x\n"))).bytes(),
    );
    body_vec(
        "findings_as_str",
        "payload-types",
        "findings = \"one\", a str instead of an array of str.",
        body(78).payload(|p| p.insert(None, raw::str("findings"), raw::str("one"))).bytes(),
    );
    {
        let mut hb = dev_result(79);
        hb.payload = Heartbeat { seq: 1, busy: true }.into();
        let mut v = negative(
            "busy_as_integer",
            "payload-types",
            "heartbeat with busy = 1 instead of true.",
            dev_signed(body_map(&hb).payload(|p| p.set("busy", vec![0x01])).bytes()),
            "decode",
        );
        v.stream = streams::HEARTBEATS.into();
        neg.push(v);
        let mut rq = dev_result(80);
        rq.payload =
            ToolRequest { request_id: id(NOW, 0x44), action: "llm.complete".into(), input: "{}".into() }.into();
        let text = raw::str(&id(NOW, 0x44).to_string());
        let mut v = negative(
            "request_id_as_str",
            "payload-types",
            "tool.request with request_id as its 36-character text.",
            dev_signed(body_map(&rq).payload(|p| p.set("request_id", text)).bytes()),
            "decode",
        );
        v.stream = streams::TOOL_REQUESTS.into();
        neg.push(v);
    }
    {
        let mut u = usage.clone();
        u.id = id(NOW, 81);
        let mut v = negative(
            "usage_unknown_role",
            "body-role",
            "usage whose payload role is \"planner\".",
            frame("orchestrator>budget:3", body_map(&u).payload(|p| p.set("role", raw::str("planner"))).bytes())
                .to_wire(),
            "decode",
        );
        v.stream = streams::USAGE.into();
        neg.push(v);
    }

    // Keys and signature (§4, §5).
    for (name, kid, why) in [
        ("kid_leading_zero", "dev>orchestrator:03", "a generation with a leading zero: no canonical kid, so unknown"),
        ("kid_unparseable", "dev-orchestrator-3", "a kid that does not parse: unknown"),
        ("kid_empty", "", "an empty kid"),
    ] {
        let body = dev_result(82).to_body_bytes();
        let sig = mac("dev>orchestrator:3", &signing_input(1, kid, "HS256", &body));
        let wire = SignedEnvelope { v: 1, kid: kid.into(), alg: "HS256".into(), body, sig }.to_wire();
        neg.push(negative(
            name,
            "kid-known",
            &format!("Signed with the dev>orchestrator:3 key under {why}."),
            wire,
            "unknown_kid",
        ));
    }
    neg.push(negative(
        "signature_other_generation",
        "signature",
        "kid dev>orchestrator:3, signed with the generation-2 key.",
        {
            let body = dev_result(83).to_body_bytes();
            let sig = mac("dev>orchestrator:2", &signing_input(1, "dev>orchestrator:3", "HS256", &body));
            SignedEnvelope { v: 1, kid: "dev>orchestrator:3".into(), alg: "HS256".into(), body, sig }.to_wire()
        },
        "bad_signature",
    ));
    {
        let mut e = dev_result(84);
        e.to = Role::Qa;
        neg.push(negative(
            "edge_mismatch_to",
            "edge",
            "Signed with the dev>orchestrator key, body addressed to qa.",
            dev_signed(e.to_body_bytes()),
            "edge_mismatch",
        ));
    }
    {
        let mut t = tool.clone();
        t.id = id(NOW, 85);
        let mut v = negative(
            "forbidden_prefix_stream_itself",
            "permission",
            "A tool.response read from fleet:tool:responses:dev: (the pattern's prefix, nothing after it).",
            frame("orchestrator>dev:3", t.to_body_bytes()).to_wire(),
            "forbidden_type",
        );
        v.stream = "fleet:tool:responses:dev:".into();
        neg.push(v);
    }

    // ---- accepted: forms a verifier must take although no signer writes them ----
    let r = dev_result(90);
    let mut acc = vec![accepted(
        "body_keys_reordered",
        "body-order",
        "Body keys in another order: type first, payload right after it, the rest afterwards.",
        "dev>orchestrator:3",
        r.clone(),
        body_map(&r).reorder(&["type", "payload", "kill_epoch", "to", "from", "ttl_ms", "id", "issued_at_ms"]).bytes(),
    )];
    let r = dev_result(91);
    acc.push(accepted(
        "payload_keys_reordered",
        "payload-shape",
        "task.result payload keys as summary, status, attempt.",
        "dev>orchestrator:3",
        r.clone(),
        body_map(&r).payload(|p| p.reorder(&["summary", "status", "attempt"])).bytes(),
    ));
    let r = dev_result(92);
    acc.push(accepted(
        "from_keys_reversed",
        "from-shape",
        "from as {instance, role}.",
        "dev>orchestrator:3",
        r.clone(),
        body_map(&r)
            .set("from", raw::Map::parse(body_map(&r).get("from")).reorder(&["instance", "role"]).bytes())
            .bytes(),
    ));
    let r = dev_result(93);
    acc.push(accepted(
        "payload_empty_list",
        "payload-shape",
        "findings present as an empty array (the signer leaves it out): the same as absent.",
        "dev>orchestrator:3",
        r.clone(),
        body_map(&r).payload(|p| p.insert(None, raw::str("findings"), vec![0x90])).bytes(),
    ));
    let r = dev_result(94);
    acc.push(accepted(
        "integers_wide",
        "body-integers",
        "Integers wider than needed: ttl_ms as uint64, kill_epoch as uint8, attempt as uint16.",
        "dev>orchestrator:3",
        r.clone(),
        body_map(&r)
            .set("ttl_ms", raw::hex("cf 000000000000ea60"))
            .set("kill_epoch", raw::hex("cc 00"))
            .payload(|p| p.set("attempt", raw::hex("cd 0001")))
            .bytes(),
    ));
    let r = dev_result(95);
    acc.push(accepted(
        "integers_signed",
        "body-integers",
        "Unsigned fields in signed formats holding values ≥ 0: issued_at_ms int64, ttl_ms int32, kill_epoch int8, attempt int16.",
        "dev>orchestrator:3",
        r.clone(),
        body_map(&r)
            .set("issued_at_ms", raw::hex("d3 0000019b76daa800"))
            .set("ttl_ms", raw::hex("d2 0000ea60"))
            .set("kill_epoch", raw::hex("d0 00"))
            .payload(|p| p.set("attempt", raw::hex("d1 0001")))
            .bytes(),
    ));
    let r = dev_result(96);
    acc.push(accepted(
        "body_headers_wide",
        "body-headers",
        "Headers wider than needed inside the body: map16 body, str8 key, bin16 id, str16 summary, map16 payload.",
        "dev>orchestrator:3",
        r.clone(),
        {
            let mut m = body_map(&r);
            m.0[1].0 = raw::with_header(0xd9, 1, b"type");
            let p = raw::Map::parse(m.get("payload")).set("summary", raw::with_header(0xda, 2, b"ok"));
            m.set("id", raw::with_header(0xc5, 2, r.id.as_bytes())).set("payload", p.bytes_map16()).bytes_map16()
        },
    ));
    let mut r = dev_result(97);
    r.from.instance = Instance::parse(&"Az09._-".repeat(10)[..64]).expect("64 chars");
    acc.push(accepted(
        "instance_64_chars",
        "body-instance",
        "An instance of exactly 64 characters using every allowed class.",
        "dev>orchestrator:3",
        r.clone(),
        r.to_body_bytes(),
    ));
    let mut r = dev_result(98);
    r.ttl_ms = 86_400_000;
    acc.push(accepted(
        "ttl_at_limit",
        "ttl",
        "ttl_ms exactly max_ttl (24 h).",
        "dev>orchestrator:3",
        r.clone(),
        r.to_body_bytes(),
    ));
    let r = dev_result(99);
    let mut a = accepted(
        "issued_at_skew_ahead",
        "clock-future",
        "Verified exactly skew (30 s) before issued_at.",
        "dev>orchestrator:3",
        r.clone(),
        r.to_body_bytes(),
    );
    a.now_ms = NOW - 30_000;
    acc.push(a);
    let r = dev_result(100);
    let mut a = accepted(
        "at_deadline",
        "clock-expired",
        "Verified exactly at issued_at + ttl + skew.",
        "dev>orchestrator:3",
        r.clone(),
        r.to_body_bytes(),
    );
    a.now_ms = NOW + 60_000 + 30_000;
    acc.push(a);
    let mut r = dev_result(101);
    r.kill_epoch = 5;
    let mut a = accepted(
        "epoch_newer",
        "epoch",
        "kill_epoch 5 verified under epoch 3: a newer epoch than the verifier's is fine.",
        "dev>orchestrator:3",
        r.clone(),
        r.to_body_bytes(),
    );
    a.kill_epoch = 3;
    acc.push(a);

    std::fs::create_dir_all(&dir).expect("create vector dir");
    let write = |name: &str, text: String| std::fs::write(dir.join(name), text + "\n").expect("write vector file");
    write("keys.json", serde_json::to_string_pretty(&keys).expect("json"));
    write("positive.json", serde_json::to_string_pretty(&positives).expect("json"));
    write("accepted.json", serde_json::to_string_pretty(&acc).expect("json"));
    write("negative.json", serde_json::to_string_pretty(&neg).expect("json"));
    eprintln!(
        "wrote {} positive, {} accepted and {} negative vectors to {}",
        positives.len(),
        acc.len(),
        neg.len(),
        dir.display()
    );
}
