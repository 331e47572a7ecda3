//! Entries that fail verification: each lands in `fleet:rejected` with its reason, is
//! acknowledged and counted, and never reaches the handler.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use bus::KillEpoch;
use bus::names::{ENV_FIELD, SIDE_COPY_MAX, fields};
use common::*;
use envelope::wire::SignedEnvelope;
use envelope::{ControlPause, Envelope, Instance, Role, Sender, StreamName, streams};

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Flips one bit of the frame at the first occurrence of `needle`.
fn flip_bit_in(wire: &[u8], needle: &[u8]) -> Vec<u8> {
    let at = wire.windows(needle.len()).position(|w| w == needle).expect("needle in the frame");
    let mut out = wire.to_vec();
    out[at + needle.len() - 1] ^= 0x01;
    out
}

/// Re-encodes a sealed frame with `change` applied to its parts (the signature stays the
/// one over the original parts).
fn reframe(wire: &[u8], change: impl FnOnce(&mut SignedEnvelope)) -> Vec<u8> {
    let f = envelope::wire::decode_frame(wire).expect("frame");
    let mut owned =
        SignedEnvelope { v: f.v, kid: f.kid.into(), alg: f.alg.into(), body: f.body.to_vec(), sig: f.sig.to_vec() };
    change(&mut owned);
    owned.to_wire()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_entries_are_rejected_with_their_reason_and_never_handled() {
    let server = redis();
    let mut c = connect(&server).await;
    let results = streams::RESULTS;
    let hour = 3_600_000;

    let valid_1 = seal_dev(&result(1));
    let valid_2 = seal_dev(&result(2));
    // "result 7" becomes "result 6": a bit flipped inside the signed body.
    let tampered = flip_bit_in(&seal_dev(&result(7)), b"result 7");
    let expired = seal_dev(&result_at(3, bus::now_ms() - hour, 0));
    let future = seal_dev(&result_at(4, bus::now_ms() + hour, 0));
    let mut long_lived = result(5);
    long_lived.ttl_ms = 48 * hour;
    let long_lived = seal_dev(&long_lived);
    // Signed by a key the orchestrator does not hold: budget's key for budget > dev.
    let pause = Envelope::new(
        Sender { role: Role::Budget, instance: Instance::parse("budget-1").unwrap() },
        Role::Dev,
        bus::now_ms(),
        60_000,
        0,
        ControlPause { epoch: 1, reason: "test".into(), by: None }.into(),
    );
    let foreign = keyring(Role::Budget).seal(&pause).unwrap();
    // Dev may send heartbeats to the orchestrator, but not on fleet:results.
    let wrong_type = seal_dev(&heartbeat(1));
    let version_2 = reframe(&seal_dev(&result(8)), |f| f.v = 2);
    let other_alg = reframe(&seal_dev(&result(9)), |f| f.alg = "HS512".into());
    let mut big = result(10);
    if let envelope::Payload::TaskResult(r) = &mut big.payload {
        r.diff = Some(vec![b'+'; (1 << 20) + 1]);
    }
    let oversized = seal_dev(&big);
    let garbage = b"\x93not a frame at all".to_vec();

    let mut want_rejects: Vec<(String, &'static str, Vec<u8>)> = Vec::new();
    let v1_entry = xadd_env(&mut c, results, &valid_1).await;
    for (wire, reason) in [
        (&tampered, "bad_signature"),
        (&valid_1, "replay"),
        (&expired, "expired"),
        (&future, "future_dated"),
        (&long_lived, "ttl_too_long"),
        (&foreign, "unknown_kid"),
        (&wrong_type, "forbidden_type"),
        (&version_2, "unsupported_version"),
        (&other_alg, "unsupported_alg"),
        (&oversized, "too_large"),
        (&garbage, "decode"),
    ] {
        want_rejects.push((xadd_env(&mut c, results, wire).await, reason, wire.clone()));
    }
    let no_env = xadd_raw(&mut c, results, &[("payload", b"where is env")]).await;
    want_rejects.push((no_env, "decode", Vec::new()));
    let v2_entry = xadd_env(&mut c, results, &valid_2).await;

    let (rec, mut rx) = recorder();
    let consumer = spawn(&server, config(GROUP, "orch-1"), rec.clone());
    let got = take(&mut rx, 2, Duration::from_secs(10)).await;
    eventually(Duration::from_secs(10), "every invalid entry is in fleet:rejected", || {
        let mut c = c.clone();
        let n = want_rejects.len() as u64;
        async move { xlen(&mut c, streams::REJECTED).await == n }
    })
    .await;
    wait_all_acked(&mut c, results, GROUP, Duration::from_secs(10)).await;
    let stats = consumer.stats.clone();
    consumer.shutdown().await;

    // The handler saw the two valid entries and nothing else.
    let handled: Vec<(String, String)> = got.iter().map(|g| (g.summary.clone(), g.entry.clone())).collect();
    assert_eq!(handled, vec![("result 1".to_owned(), v1_entry.clone()), ("result 2".to_owned(), v2_entry)]);
    assert_eq!(rec.calls(), got, "the handler was never called for a rejected entry");
    assert_eq!(load(&stats.handled), 2);

    let rejected = read_stream(&mut c, streams::REJECTED).await;
    assert_eq!(rejected.len(), want_rejects.len());
    for (entry, reason, wire) in &want_rejects {
        let row = rejected
            .iter()
            .find(|r| r.text(fields::ENTRY) == *entry)
            .unwrap_or_else(|| panic!("no fleet:rejected entry for {entry} ({reason})"));
        assert_eq!(row.text(fields::REASON), *reason, "entry {entry}: {}", row.text(fields::DETAIL));
        assert_eq!(row.text(fields::STREAM), results);
        assert_eq!(row.text(fields::GROUP), GROUP);
        assert_eq!(row.text(fields::CONSUMER), "orch-1");
        assert!(!row.text(fields::DETAIL).is_empty());
        // Its raw bytes, or past SIDE_COPY_MAX their prefix; always their length and hash.
        let kept = &wire[..wire.len().min(SIDE_COPY_MAX)];
        assert_eq!(row.bytes(ENV_FIELD), Some(kept), "entry {entry} ({reason}) keeps its raw bytes");
        assert_eq!(row.text(fields::ENV_LEN), wire.len().to_string(), "entry {entry} ({reason})");
        assert_eq!(row.text(fields::ENV_SHA256), sha256_hex(wire), "entry {entry} ({reason})");
    }
    let replay = rejected.iter().find(|r| r.text(fields::REASON) == "replay").unwrap();
    assert!(replay.text(fields::DETAIL).contains(&v1_entry), "names the entry that carried it first");

    let mut want_counts: BTreeMap<&'static str, u64> = BTreeMap::new();
    for (_, reason, _) in &want_rejects {
        *want_counts.entry(*reason).or_default() += 1;
    }
    assert_eq!(stats.rejected_by_reason(), want_counts);
    assert_eq!(load(&stats.rejected), want_rejects.len() as u64);
    assert_eq!(xlen(&mut c, streams::DLQ).await, 0);
}

/// A dev-signed `task.result` put on a stream where dev may only send heartbeats is
/// refused as `forbidden_type`; the heartbeat next to it is handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_on_the_wrong_stream_is_forbidden() {
    let server = redis();
    let mut c = connect(&server).await;
    let heartbeats = StreamName::parse(streams::HEARTBEATS).unwrap();
    let wrong = xadd_env(&mut c, streams::HEARTBEATS, &seal_dev(&result(1))).await;
    let right = xadd_env(&mut c, streams::HEARTBEATS, &seal_dev(&heartbeat(7))).await;

    let (rec, mut rx) = recorder();
    let consumer = spawn(&server, config_for(heartbeats, GROUP, "orch-1"), rec.clone());
    let got = take(&mut rx, 1, Duration::from_secs(10)).await;
    assert_eq!(got[0].entry, right);
    eventually(Duration::from_secs(10), "the result is in fleet:rejected", || {
        let mut c = c.clone();
        async move { xlen(&mut c, streams::REJECTED).await == 1 }
    })
    .await;
    wait_all_acked(&mut c, streams::HEARTBEATS, GROUP, Duration::from_secs(10)).await;
    let stats = consumer.stats.clone();
    consumer.shutdown().await;

    let rejected = read_stream(&mut c, streams::REJECTED).await;
    assert_eq!(rejected[0].text(fields::ENTRY), wrong);
    assert_eq!(rejected[0].text(fields::REASON), "forbidden_type");
    assert_eq!(rejected[0].text(fields::STREAM), streams::HEARTBEATS);
    assert_eq!(stats.rejected_by_reason(), BTreeMap::from([("forbidden_type", 1)]));
    assert_eq!(rec.call_count(), 1);
}

/// Once the kill epoch is raised to 1, envelopes issued under epoch 0 are refused as
/// `stale_epoch`; those issued under epoch 1 still pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_of_a_stale_kill_epoch_are_rejected() {
    let server = redis();
    let publisher = dev_publisher(&server);
    let stream = results_stream();
    let mut c = connect(&server).await;
    let (rec, mut rx) = recorder();
    let consumer = spawn_with(&server, config(GROUP, "orch-1"), rec.clone(), KillEpoch::new(0));

    publisher.publish(&stream, &result_at(0, bus::now_ms(), 0)).await.unwrap();
    assert_eq!(take(&mut rx, 1, Duration::from_secs(10)).await[0].summary, "result 0");

    consumer.epoch.raise(1);
    let stale = publisher.publish(&stream, &result_at(1, bus::now_ms(), 0)).await.unwrap();
    publisher.publish(&stream, &result_at(2, bus::now_ms(), 1)).await.unwrap();
    assert_eq!(take(&mut rx, 1, Duration::from_secs(10)).await[0].summary, "result 2");
    eventually(Duration::from_secs(10), "the stale envelope is in fleet:rejected", || {
        let mut c = c.clone();
        async move { xlen(&mut c, streams::REJECTED).await == 1 }
    })
    .await;
    wait_all_acked(&mut c, streams::RESULTS, GROUP, Duration::from_secs(10)).await;
    let stats = consumer.stats.clone();
    consumer.shutdown().await;

    let rejected = read_stream(&mut c, streams::REJECTED).await;
    assert_eq!(rejected[0].text(fields::ENTRY), stale);
    assert_eq!(rejected[0].text(fields::REASON), "stale_epoch");
    assert_eq!(stats.rejected_by_reason(), BTreeMap::from([("stale_epoch", 1)]));
    assert_eq!(rec.calls().iter().map(|g| g.summary.as_str()).collect::<Vec<_>>(), ["result 0", "result 2"]);
    assert!(drain(&mut rx).is_empty());
}

/// An oversized entry (a 4 MiB frame, past the verifier's 1 MiB limit) is rejected as
/// `too_large`, and `fleet:rejected` keeps exactly its first 4096 bytes plus its length and
/// SHA-256 — not the 4 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_entry_is_kept_in_fleet_rejected_as_a_prefix_and_its_hash() {
    let server = redis();
    let mut c = connect(&server).await;
    let mut big = result(1);
    if let envelope::Payload::TaskResult(r) = &mut big.payload {
        r.diff = Some(vec![b'+'; 4 << 20]);
    }
    let wire = seal_dev(&big);
    assert!(wire.len() > 4 << 20);
    let entry = xadd_env(&mut c, streams::RESULTS, &wire).await;

    let (rec, _rx) = recorder();
    let consumer = spawn(&server, config(GROUP, "orch-1"), rec.clone());
    eventually(Duration::from_secs(10), "the oversized entry is in fleet:rejected", || {
        let mut c = c.clone();
        async move { xlen(&mut c, streams::REJECTED).await == 1 }
    })
    .await;
    wait_all_acked(&mut c, streams::RESULTS, GROUP, Duration::from_secs(10)).await;
    consumer.shutdown().await;

    let rejected = read_stream(&mut c, streams::REJECTED).await;
    let [row] = &rejected[..] else { panic!("one rejected entry: {}", rejected.len()) };
    assert_eq!(row.text(fields::ENTRY), entry);
    assert_eq!(row.text(fields::REASON), "too_large");
    assert_eq!(SIDE_COPY_MAX, 4096);
    assert_eq!(row.bytes(ENV_FIELD).unwrap().len(), 4096, "exactly the prefix");
    assert_eq!(row.bytes(ENV_FIELD).unwrap(), &wire[..4096]);
    assert_eq!(row.text(fields::ENV_LEN), wire.len().to_string());
    assert_eq!(row.text(fields::ENV_SHA256), sha256_hex(&wire));
    // Everything the side stream holds for it, fields included, stays a few KiB.
    let mut c2 = c.clone();
    let used: i64 = redis::cmd("MEMORY").arg("USAGE").arg(streams::REJECTED).query_async(&mut c2).await.unwrap();
    assert!(used < 64 * 1024, "fleet:rejected uses {used} bytes for one oversized entry");
    assert_eq!(rec.call_count(), 0);
}
