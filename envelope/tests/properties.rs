//! Property tests: round trip, single-bit flips, and arbitrary input never panicking.

mod common;

use common::*;
use envelope::*;
use proptest::prelude::*;
use uuid::Uuid;

fn text() -> impl Strategy<Value = String> {
    "\\PC{0,40}"
}

fn uuid() -> impl Strategy<Value = Uuid> {
    any::<u128>().prop_map(Uuid::from_u128)
}

fn status() -> impl Strategy<Value = Status> {
    prop_oneof![Just(Status::Success), Just(Status::Failure), Just(Status::Error)]
}

fn role() -> impl Strategy<Value = Role> {
    proptest::sample::select(Role::ALL.to_vec())
}

fn payload(ty: MessageType) -> BoxedStrategy<Payload> {
    match ty {
        MessageType::TaskAssign => (
            any::<u32>(),
            text(),
            text(),
            proptest::option::of(text()),
            proptest::option::of(text()),
            proptest::collection::vec(text(), 0..3),
        )
            .prop_map(|(attempt, instructions, workspace, repository, test_command, findings)| {
                TaskAssign {
                    attempt,
                    instructions,
                    workspace,
                    repository,
                    test_command,
                    findings,
                    scope: vec![],
                    change: None,
                    change_sha256: None,
                }
                .into()
            })
            .boxed(),
        MessageType::TaskResult => (
            any::<u32>(),
            status(),
            text(),
            proptest::collection::vec(text(), 0..3),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..600)),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
        )
            .prop_map(|(attempt, status, summary, findings, diff, log)| {
                TaskResult {
                    attempt,
                    status,
                    summary,
                    findings,
                    diff,
                    log,
                    change_sha256: None,
                    calls: Vec::new(),
                    containment: Vec::new(),
                }
                .into()
            })
            .boxed(),
        MessageType::Heartbeat => {
            (any::<u64>(), any::<bool>()).prop_map(|(seq, busy)| Heartbeat { seq, busy }.into()).boxed()
        }
        MessageType::Question => text().prop_map(|text| Question { text }.into()).boxed(),
        MessageType::ToolRequest => (uuid(), text(), text())
            .prop_map(|(request_id, action, input)| ToolRequest { request_id, action, input }.into())
            .boxed(),
        MessageType::ToolResponse => (uuid(), any::<bool>(), text())
            .prop_map(|(request_id, ok, output)| ToolResponse { request_id, ok, output }.into())
            .boxed(),
        MessageType::Usage => (role(), text(), any::<u64>(), any::<u64>(), any::<u64>())
            .prop_map(|(role, model, input_tokens, output_tokens, cost_micro_usd)| {
                Usage { role, model, input_tokens, output_tokens, cost_micro_usd }.into()
            })
            .boxed(),
        MessageType::Outcome => (role(), status(), proptest::option::of(text()))
            .prop_map(|(role, status, error_kind)| Outcome { role, status, error_kind }.into())
            .boxed(),
        MessageType::ControlPause => (any::<u64>(), text(), proptest::option::of(text()))
            .prop_map(|(epoch, reason, by)| ControlPause { epoch, reason, by }.into())
            .boxed(),
        MessageType::ControlResume => (any::<u64>(), proptest::option::of(text()))
            .prop_map(|(epoch, by)| ControlResume { epoch, by }.into())
            .boxed(),
        MessageType::IncidentOpened => (
            (uuid(), text(), text(), text()),
            (proptest::option::of(text()), any::<bool>(), any::<u64>(), text()),
            proptest::collection::vec(uuid(), 0..3),
        )
            .prop_map(
                |(
                    (incident, severity, trigger, title),
                    (repository, freezes_merges, opened_at_ms, opened_by),
                    tasks,
                )| {
                    IncidentOpened {
                        incident,
                        severity,
                        trigger,
                        title,
                        repository,
                        freezes_merges,
                        opened_at_ms,
                        opened_by,
                        tasks,
                    }
                    .into()
                },
            )
            .boxed(),
    }
}

/// A permitted (envelope, stream) pair: a rule of the shipped table, one of its types, a
/// concrete stream, and arbitrary content.
fn permitted() -> impl Strategy<Value = (Envelope, String)> {
    let rules: Vec<(Role, Role, String, MessageType)> = permissions()
        .rules()
        .iter()
        .flat_map(|r| {
            let stream = r.stream.as_redis_pattern().replace('*', "inst-1");
            r.types.iter().map(move |t| (r.from, r.to, stream.clone(), *t))
        })
        .collect();
    proptest::sample::select(rules).prop_flat_map(|(from, to, stream, ty)| {
        (
            payload(ty),
            "[A-Za-z0-9._-]{1,64}",
            0u64..=120_000,
            proptest::option::of(uuid()),
            proptest::option::of(uuid()),
            proptest::option::of(text()),
            proptest::option::of(text()),
            0u64..5,
            uuid(),
        )
            .prop_map(
                move |(payload, instance, ttl_ms, task_id, causation_id, traceparent, lease, kill_epoch, id)| {
                    let env = Envelope {
                        id,
                        from: Sender { role: from, instance: Instance::parse(&instance).expect("regex matches") },
                        to,
                        task_id,
                        causation_id,
                        issued_at_ms: NOW_MS,
                        ttl_ms,
                        kill_epoch,
                        traceparent,
                        lease,
                        payload,
                    };
                    (env, stream.clone())
                },
            )
    })
}

fn operator_verifier() -> Verifier {
    Verifier::new(ring(Process::Operator), permissions(), VerifierConfig::default())
}

fn ctx(kill_epoch: u64) -> VerifyContext {
    VerifyContext { now_ms: NOW_MS, kill_epoch }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn seal_then_verify_round_trips((env, stream) in permitted()) {
        let ring = ring(Process::Operator);
        let wire = ring.seal(&env).expect("operator keyring covers every edge");
        prop_assert_eq!(Envelope::from_body_bytes(&env.to_body_bytes()).expect("body decodes"), env.clone());
        let verified = operator_verifier()
            .verify(&stream, &wire, ctx(env.kill_epoch), &mut MemoryReplayGuard::new())
            .expect("a sealed, permitted envelope verifies");
        prop_assert_eq!(&*verified, &env);
    }

    #[test]
    fn any_single_bit_flip_is_rejected((env, stream) in permitted(), bit in any::<proptest::sample::Index>()) {
        let wire = ring(Process::Operator).seal(&env).expect("seal");
        let mut flipped = wire.clone();
        let i = bit.index(wire.len() * 8);
        flipped[i / 8] ^= 1 << (i % 8);
        let res = operator_verifier().check(&stream, &flipped, ctx(env.kill_epoch));
        prop_assert!(res.is_err(), "bit {} of {} flipped and still accepted", i, wire.len() * 8);
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_never_verify(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        prop_assert!(operator_verifier().check("fleet:results", &bytes, ctx(0)).is_err());
        let _ = Envelope::from_body_bytes(&bytes);
        let _ = envelope::wire::decode_frame(&bytes);
    }

    #[test]
    fn mutated_frames_never_panic((env, stream) in permitted(), edits in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 1..8), cut in any::<proptest::sample::Index>()) {
        let mut wire = ring(Process::Operator).seal(&env).expect("seal");
        for (at, byte) in edits {
            let i = at.index(wire.len());
            wire[i] = byte;
        }
        wire.truncate(cut.index(wire.len() + 1));
        let _ = operator_verifier().check(&stream, &wire, ctx(0));
    }
}
