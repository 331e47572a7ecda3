//! Fixtures shared by the `decode_verify` fuzz target and the `seed` program: one master
//! secret, the shipped permission table, a fixed clock, and the frames the corpus starts from.
//!
//! Everything is deterministic (fixed secret, fixed `NOW_MS`, fixed ids), so a crash found
//! today reproduces from its input file tomorrow.

#![forbid(unsafe_code)]

use envelope::{
    Envelope, Instance, Keyring, MasterFile, MasterSecret, Payload, PermissionTable, Process, Question, Role, Sender,
    Status, TaskResult, Verifier, VerifierConfig, VerifyContext,
};

/// The stream every input is checked as having been read from.
pub const STREAM: &str = envelope::streams::RESULTS;

/// The verifier's clock: 2026-01-01T00:00:00Z, as in the envelope tests.
pub const NOW_MS: u64 = 1_767_225_600_000;

/// The shipped permission table.
pub fn permissions() -> PermissionTable {
    PermissionTable::parse(include_str!("../../../config/permissions.toml")).expect("the shipped permissions load")
}

/// A fixed master secret (bytes 0..32), the same as the envelope tests'.
pub fn master() -> MasterFile {
    MasterFile::new(MasterSecret::from_bytes(std::array::from_fn(|i| i as u8)))
}

/// What the target needs, built once per fuzzing process.
#[derive(Debug)]
pub struct Fixture {
    /// The orchestrator's verifier: the process that reads `fleet:results`.
    pub verifier: Verifier,
    /// Every edge's key, to seal decoded bodies and to re-seal verified ones.
    pub operator: Keyring,
}

impl Fixture {
    /// Derives the keyrings from [`master`] and [`permissions`].
    pub fn new() -> Self {
        let permissions = permissions();
        let orchestrator = Keyring::derive(&master(), Process::Role(Role::Orchestrator), &permissions)
            .expect("orchestrator keyring derives");
        let operator = Keyring::derive(&master(), Process::Operator, &permissions).expect("operator keyring derives");
        Self { verifier: Verifier::new(orchestrator, permissions, VerifierConfig::default()), operator }
    }
}

impl Default for Fixture {
    fn default() -> Self {
        Self::new()
    }
}

/// The verifier's view of now.
pub fn ctx() -> VerifyContext {
    VerifyContext { now_ms: NOW_MS, kill_epoch: 0 }
}

/// Envelopes the corpus starts from: results of every worker role (with and without the
/// optional fields and byte payloads), plus one that is signed correctly but not permitted on
/// `fleet:results`, so the checks after the signature are reachable from the first run.
pub fn seed_envelopes() -> Vec<(&'static str, Envelope)> {
    let id = |n: u128| uuid::Uuid::from_u128(0x019b_76da_a800_7000_8000_0000_0000_0000 | n);
    let result = |role: Role, instance: &str, summary: &str| {
        let mut env = Envelope::new(
            Sender { role, instance: Instance::parse(instance).expect("instance name") },
            Role::Orchestrator,
            NOW_MS,
            60_000,
            0,
            Payload::TaskResult(TaskResult {
                attempt: 1,
                status: Status::Success,
                summary: summary.to_owned(),
                findings: vec![],
                diff: None,
                log: None,
                change_sha256: None,
                calls: Vec::new(),
                containment: Vec::new(),
            }),
        );
        env.id = id(1);
        env
    };

    let minimal = result(Role::Dev, "dev-1", "ok");

    let mut full = result(Role::Qa, "qa-2", "2 tests failed");
    full.id = id(2);
    full.task_id = Some(id(100));
    full.causation_id = Some(id(101));
    full.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
    if let Payload::TaskResult(r) = &mut full.payload {
        r.attempt = 2;
        r.status = Status::Failure;
        r.findings = vec!["test_a failed".into(), "test_b failed".into()];
        r.diff = Some(b"--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n".to_vec());
        r.log = Some(vec![0, 1, 2, 0xff, b'\n']);
    }

    let mut big = result(Role::Dev, "dev-1", &"x".repeat(512));
    big.id = id(3);
    big.task_id = Some(id(100));

    let mut review = result(Role::Review, "review-1", "looks good");
    review.id = id(4);

    let mut refactor = result(Role::Refactor, "refactor-1", "renamed");
    refactor.id = id(5);
    refactor.issued_at_ms = NOW_MS - 30_000;

    let mut question = Envelope::new(
        Sender { role: Role::Dev, instance: Instance::parse("dev-1").expect("instance name") },
        Role::Orchestrator,
        NOW_MS,
        60_000,
        0,
        Payload::Question(Question { text: "which branch?".into() }),
    );
    question.id = id(6);

    vec![
        ("result_minimal", minimal),
        ("result_full", full),
        ("result_512", big),
        ("result_review", review),
        ("result_refactor", refactor),
        ("question_wrong_stream", question),
    ]
}
