//! [`orchestrator::anchor`] on a real Postgres, called as a library (as an incident
//! procedure would): `anchor_now` with a role that may only SELECT the trail, and anchor
//! lines checked the way docs/operations.md ("Anchoring the audit trail") describes them,
//! with ed25519-dalek directly, so these tests also hold the documentation to the code.

#![allow(clippy::unwrap_used)]

use ed25519_dalek::{Signature, VerifyingKey};
use fleet_testkit::Postgres;
use orchestrator::anchor::sink::{AnchorSink, FileSink};
use orchestrator::anchor::{self, AnchorKey, AnchorReport, Appended};
use orchestrator::audit::{self, AuditEntry, AuditKey};
use serde_json::{Value, json};
use sqlx::PgPool;

async fn append(pool: &PgPool, key: &AuditKey, n: usize) {
    for i in 0..n {
        let mut tx = pool.begin().await.unwrap();
        let entry = AuditEntry {
            actor_role: "orchestrator",
            actor_instance: "orchestrator-0",
            action: "task.transition",
            task_id: None,
            prompt_version: None,
            details: json!({"i": i}),
        };
        audit::append(&mut tx, key, entry).await.unwrap();
        tx.commit().await.unwrap();
    }
}

/// Checks one line as the documentation specifies it, without the crate's parser;
/// returns the body.
fn documented_check(line: &str, public_hex: &str) -> Value {
    let rest = line.strip_prefix(r#"{"body":"#).unwrap();
    let (body, sig) = rest.rsplit_once(r#","sig":""#).unwrap();
    let sig = sig.strip_suffix(r#""}"#).unwrap();
    let public: [u8; 32] = hex::decode(public_hex).unwrap().try_into().unwrap();
    let sig: [u8; 64] = hex::decode(sig).unwrap().try_into().unwrap();
    let message = [b"agentfleet/audit-anchor/v1\n".as_slice(), body.as_bytes()].concat();
    VerifyingKey::from_bytes(&public).unwrap().verify_strict(&message, &Signature::from_bytes(&sig)).unwrap();
    serde_json::from_str(body).unwrap()
}

#[tokio::test]
async fn anchor_now_needs_only_select_and_its_lines_are_as_documented() {
    let pg = Postgres::start().expect("postgres must be installed; tests never skip");
    let url = pg.create_database().unwrap();
    let name = url.rsplit('/').next().unwrap().to_owned();
    let pool = PgPool::connect(&url).await.unwrap();
    orchestrator::db::migrate(&pool).await.unwrap();
    let audit_key = AuditKey::new(vec![0x5a; 32]).unwrap();
    append(&pool, &audit_key, 3).await;

    // The anchoring process's role: SELECT on the trail and the head, nothing else.
    pg.psql(&name, "CREATE ROLE anchorer LOGIN; GRANT SELECT ON audit_trail, audit_head TO anchorer").unwrap();
    let reader = PgPool::connect(&format!("postgres://anchorer@127.0.0.1:{}/{name}", pg.port())).await.unwrap();
    let refused = sqlx::query("UPDATE audit_head SET seq = seq").execute(&reader).await.unwrap_err();
    assert!(refused.to_string().contains("permission denied"), "{refused}");

    let dir = tempfile::tempdir().unwrap();
    let sink = FileSink::new(dir.path().join("anchors.jsonl"));
    let key = AnchorKey::from_seed(&[0x11; 32]);
    let public = key.public().to_hex();

    let appended = anchor::anchor_now(&reader, &key, &sink).await.unwrap();
    assert_eq!(appended, [Appended { n: 1, first_seq: 1, seq: 3 }]);
    assert_eq!(anchor::anchor_now(&reader, &key, &sink).await.unwrap(), []);
    append(&pool, &audit_key, 2).await;
    assert_eq!(anchor::anchor_now(&reader, &key, &sink).await.unwrap(), [Appended { n: 2, first_seq: 4, seq: 5 }]);

    let hashes: Vec<String> = sqlx::query_scalar::<_, Vec<u8>>("SELECT hash FROM audit_trail ORDER BY seq")
        .fetch_all(&pool)
        .await
        .unwrap()
        .iter()
        .map(hex::encode)
        .collect();
    let text = std::fs::read_to_string(dir.path().join("anchors.jsonl")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2);
    assert!(text.ends_with('\n'));

    let first = documented_check(lines[0], &public);
    let keys: Vec<&str> = first.as_object().unwrap().keys().map(String::as_str).collect();
    let mut sorted = ["v", "n", "seq", "hash", "first_seq", "rows", "prev", "at", "key"];
    sorted.sort_unstable();
    assert_eq!(keys, sorted);
    assert_eq!((first["v"].as_u64(), first["n"].as_u64(), first["seq"].as_i64()), (Some(1), Some(1), Some(3)));
    assert_eq!(first["first_seq"], 1);
    assert_eq!(first["rows"], json!(hashes[0..3]));
    assert_eq!(first["hash"], hashes[2]);
    assert_eq!(first["prev"], "0".repeat(64));
    assert_eq!(first["key"], public);
    assert!(first["at"].as_str().unwrap().ends_with('Z'));

    let second = documented_check(lines[1], &public);
    assert_eq!(second["first_seq"], 4);
    assert_eq!(second["rows"], json!(hashes[3..5]));
    // `prev` is SHA-256 of the first anchor's body bytes as they stand in its line.
    let first_body = lines[0].strip_prefix(r#"{"body":"#).unwrap().rsplit_once(r#","sig":""#).unwrap().0;
    use sha2::Digest;
    assert_eq!(second["prev"], hex::encode(sha2::Sha256::digest(first_body.as_bytes())));

    let stored = sink.read_all().unwrap();
    let report = anchor::verify_anchors(&reader, &stored, &key.public()).await.unwrap();
    let at = anchor::SignedAnchor::parse(lines[1]).unwrap().body().at;
    assert_eq!(
        report,
        AnchorReport { anchors: 2, last: Some((2, 5, at)), head_seq: 5, problem: None, rewritten: None }
    );
    append(&pool, &audit_key, 1).await;
    let report = anchor::verify_anchors(&reader, &stored, &key.public()).await.unwrap();
    assert_eq!((report.ok(), report.unanchored()), (true, 1));
}
