//! Fixtures shared by the envelope integration tests.
#![allow(dead_code, unreachable_pub)]

pub mod vectors;

use envelope::{
    Envelope, Instance, Keyring, MasterFile, MasterSecret, Payload, PermissionTable, Process, Role, Sender, Status,
    TaskResult,
};

pub const PERMISSIONS: &str = include_str!("../../../config/permissions.toml");
pub const NOW_MS: u64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

pub fn permissions() -> PermissionTable {
    PermissionTable::parse(PERMISSIONS).expect("shipped permissions load")
}

pub fn master() -> MasterFile {
    MasterFile::new(MasterSecret::from_bytes(std::array::from_fn(|i| i as u8)))
}

pub fn ring(process: Process) -> Keyring {
    Keyring::derive(&master(), process, &permissions()).expect("derive")
}

pub fn dev_result(summary_len: usize) -> Envelope {
    let mut env = Envelope::new(
        Sender { role: Role::Dev, instance: Instance::parse("dev-1").unwrap() },
        Role::Orchestrator,
        NOW_MS,
        60_000,
        0,
        Payload::TaskResult(TaskResult {
            attempt: 1,
            status: Status::Success,
            summary: "x".repeat(summary_len),
            findings: vec![],
            diff: None,
            log: None,
            change_sha256: None,
            calls: Vec::new(),
            containment: Vec::new(),
        }),
    );
    env.task_id = Some(uuid::Uuid::now_v7());
    env
}
