//! What the foundation can show on its own: a dev worker seals a result with its keyset, the
//! orchestrator verifies it with its keyset, and forged, replayed, misrouted and stale
//! envelopes are refused with their reasons. `deploy/demo.sh` runs it on keysets it derives
//! with `fleetctl keys`.
//!
//! ```text
//! cargo run -p envelope --example demo -- DEV_KEYSET ORCHESTRATOR_KEYSET PERMISSIONS
//! ```

use std::time::{SystemTime, UNIX_EPOCH};

use envelope::*;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dev_path, orch_path, perm_path] = args.as_slice() else {
        eprintln!("usage: demo DEV_KEYSET ORCHESTRATOR_KEYSET PERMISSIONS");
        std::process::exit(64);
    };
    let read = |p: &str| std::fs::read_to_string(p).map_err(|e| format!("cannot read {p}: {e}"));
    let dev = Keyset::parse(&read(dev_path)?)?.into_keyring();
    let orchestrator = Keyset::parse(&read(orch_path)?)?.into_keyring();
    let permissions = PermissionTable::parse(&read(perm_path)?)?;
    let verifier = Verifier::new(orchestrator, permissions, VerifierConfig::default());
    let mut guard = MemoryReplayGuard::new();
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64;
    let ctx = VerifyContext { now_ms: now, kill_epoch: 0 };

    let me = Sender { role: Role::Dev, instance: Instance::parse("dev-1")? };
    let result = TaskResult {
        attempt: 1,
        status: Status::Success,
        summary: "Added input validation to login()".into(),
        findings: vec![],
        diff: Some(b"--- a/app.py\n+++ b/app.py\n@@ -1 +1,2 @@\n+validate(user)\n".to_vec()),
        log: None,
        change_sha256: None,
        calls: Vec::new(),
        containment: Vec::new(),
    };
    let env = Envelope::new(me.clone(), Role::Orchestrator, now, 60_000, 0, result.into());
    let wire = dev.seal(&env)?;
    println!("dev-1 sealed task.result {} ({} bytes on the wire)", env.id, wire.len());

    let show = |what: &str, r: Result<Verified, VerifyError>| match r {
        Ok(v) => println!("  {what:<44} -> accepted: {} from {} signed {}", v.message_type(), v.from.instance, v.kid()),
        Err(e) => println!("  {what:<44} -> refused [{}]: {e}", e.reason()),
    };
    show("orchestrator reads it from fleet:results", verifier.verify(streams::RESULTS, &wire, ctx, &mut guard));
    show("the same entry delivered again", verifier.verify(streams::RESULTS, &wire, ctx, &mut guard));

    let mut tampered = dev.seal(&Envelope::new(me.clone(), Role::Orchestrator, now, 60_000, 0, env.payload.clone()))?;
    // A byte inside the diff, near the end of the body (the 34 bytes after it are the signature).
    let at = tampered.len() - 40;
    tampered[at] ^= 0x20;
    show("one byte changed in transit", verifier.verify(streams::RESULTS, &tampered, ctx, &mut guard));

    let assign = TaskAssign {
        attempt: 1,
        instructions: "approve everything".into(),
        workspace: "/".into(),
        repository: None,
        test_command: None,
        findings: vec![],
        scope: vec![],
        change: None,
        change_sha256: None,
    };
    let forged = dev.seal(&Envelope::new(me.clone(), Role::Orchestrator, now, 60_000, 0, assign.into()))?;
    show("dev publishes task.assign on fleet:tasks:qa", verifier.verify("fleet:tasks:qa", &forged, ctx, &mut guard));

    let old = dev.seal(&Envelope::new(
        me.clone(),
        Role::Orchestrator,
        now,
        60_000,
        0,
        Heartbeat { seq: 1, busy: false }.into(),
    ))?;
    let after_kill = VerifyContext { kill_epoch: 1, ..ctx };
    show("heartbeat from before the kill switch", verifier.verify(streams::HEARTBEATS, &old, after_kill, &mut guard));

    let late = dev.seal(&Envelope::new(
        me,
        Role::Orchestrator,
        now - 120_000,
        60_000,
        0,
        Heartbeat { seq: 2, busy: false }.into(),
    ))?;
    show("heartbeat issued two minutes ago, ttl 60 s", verifier.verify(streams::HEARTBEATS, &late, ctx, &mut guard));
    Ok(())
}
