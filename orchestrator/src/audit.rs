//! The append-only, hash-chained audit trail.
//!
//! Each row's `hash` is SHA-256 over a domain tag, the previous row's hash and the row's
//! canonical encoding; `mac` is HMAC-SHA256 of `hash` with the audit key. Postgres refuses
//! UPDATE, DELETE and TRUNCATE (triggers), so tampering needs a superuser, and then
//! [`verify`] names the first row whose chain, content or MAC no longer holds. Appends lock
//! the single `audit_head` row, so the chain has one order across partitions.

use std::fmt;

use chrono::{DateTime, TimeZone, Utc};
use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;
use zeroize::Zeroizing;

/// Domain tag of row hashes.
const HASH_DOMAIN: &[u8] = b"agentfleet/audit/v1";
/// `prev_hash` of the first row.
pub const GENESIS: [u8; 32] = [0; 32];

/// The HMAC key of the trail. `Debug` never shows it.
#[derive(Clone)]
pub struct AuditKey(Zeroizing<Vec<u8>>);

impl fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuditKey(**REDACTED**)")
    }
}

impl AuditKey {
    /// At least 32 bytes.
    pub fn new(bytes: Vec<u8>) -> Result<Self, String> {
        if bytes.len() < 32 {
            return Err(format!("the audit key must be at least 32 bytes, got {}", bytes.len()));
        }
        Ok(Self(Zeroizing::new(bytes)))
    }

    /// From hex text (a secrets file).
    pub fn from_hex(text: &str) -> Result<Self, String> {
        let bytes = hex::decode(text.trim()).map_err(|_| "the audit key is not hex".to_owned())?;
        Self::new(bytes)
    }

    /// HMAC-SHA256 of a row's `hash`: the row's `mac`. Whoever holds the key can make rows
    /// that verify; that is why the chain's head is also anchored outside Postgres
    /// ([`crate::anchor`]).
    pub fn mac(&self, hash: &[u8]) -> Vec<u8> {
        let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0).expect("HMAC accepts any key length");
        m.update(hash);
        m.finalize().into_bytes().to_vec()
    }
}

/// What to record.
#[derive(Debug, Clone)]
pub struct AuditEntry<'a> {
    /// Who acted: role (`orchestrator`, `operator`, …).
    pub actor_role: &'a str,
    /// Which process or operator.
    pub actor_instance: &'a str,
    /// What happened (`task.transition`, `task.submit`, `fleet.kill`, …).
    pub action: &'a str,
    /// The task concerned.
    pub task_id: Option<Uuid>,
    /// Version of the prompt in use, when a model was involved.
    pub prompt_version: Option<&'a str>,
    /// Structured details; values under secret-looking keys, and secrets inside any string
    /// (the fleet's one set, [`telemetry::redact_json`]), are redacted before hashing.
    pub details: Value,
}

/// Replaces U+0000 in strings and keys with U+FFFD: jsonb refuses it, and one such
/// character in, say, a worker's question would otherwise fail the caller's whole
/// transaction, every time it is retried.
fn replace_nul(v: &mut Value) {
    match v {
        Value::String(s) if s.contains('\0') => *s = s.replace('\0', "\u{FFFD}"),
        Value::Array(items) => items.iter_mut().for_each(replace_nul),
        Value::Object(map) => {
            if map.keys().any(|k| k.contains('\0')) {
                let old = std::mem::take(map);
                *map = old.into_iter().map(|(k, val)| (k.replace('\0', "\u{FFFD}"), val)).collect();
            }
            map.values_mut().for_each(replace_nul);
        }
        _ => {}
    }
}

/// JSON with object keys sorted at every level: the same value always gives the same bytes,
/// whatever order jsonb hands keys back in. Integers are decimal; other numbers are written
/// as Rust's `{:e}` (`2.5e0`, `1e-7`). docs/operations.md, "Audit trail", is the spec.
fn canonical_json(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                canonical_json(&map[k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(item, out);
            }
            out.push(']');
        }
        Value::Number(n) => match n.as_f64() {
            // Not serde_json's float format, which changed within 1.x (1.5e300 became
            // 1.5e+300): Rust's `{:e}`, the shortest digits that read back as the same f64.
            Some(f) if !n.is_i64() && !n.is_u64() => out.push_str(&format!("{f:e}")),
            _ => out.push_str(&n.to_string()),
        },
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// One stored row.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRow {
    /// Position in the chain, from 1.
    pub seq: i64,
    /// When, microsecond precision.
    pub at: DateTime<Utc>,
    /// Actor role.
    pub actor_role: String,
    /// Actor instance.
    pub actor_instance: String,
    /// Action.
    pub action: String,
    /// Task.
    pub task_id: Option<Uuid>,
    /// Prompt version.
    pub prompt_version: Option<String>,
    /// Details.
    pub details: Value,
    /// Previous row's hash.
    pub prev_hash: Vec<u8>,
    /// This row's hash.
    pub hash: Vec<u8>,
    /// HMAC of `hash`.
    pub mac: Vec<u8>,
}

impl AuditRow {
    /// The hash this row's content gives after its `prev_hash`: equal to `hash` unless the
    /// row was altered. Needs no key, so the anchoring process checks rows with it.
    pub fn computed_hash(&self) -> Vec<u8> {
        let entry = AuditEntry {
            actor_role: &self.actor_role,
            actor_instance: &self.actor_instance,
            action: &self.action,
            task_id: self.task_id,
            prompt_version: self.prompt_version.as_deref(),
            details: self.details.clone(),
        };
        row_hash(&self.prev_hash, self.seq, &self.at, &entry)
    }

    /// Reads one row of `SELECT seq, at, actor_role, actor_instance, action, task_id,
    /// prompt_version, details, prev_hash, hash, mac FROM audit_trail`.
    pub fn from_pg(r: &sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            seq: r.try_get("seq")?,
            at: r.try_get("at")?,
            actor_role: r.try_get("actor_role")?,
            actor_instance: r.try_get("actor_instance")?,
            action: r.try_get("action")?,
            task_id: r.try_get("task_id")?,
            prompt_version: r.try_get("prompt_version")?,
            details: r.try_get("details")?,
            prev_hash: r.try_get("prev_hash")?,
            hash: r.try_get("hash")?,
            mac: r.try_get("mac")?,
        })
    }
}

fn row_hash(prev: &[u8], seq: i64, at: &DateTime<Utc>, e: &AuditEntry<'_>) -> Vec<u8> {
    let mut canon = String::new();
    let fields = Value::Array(vec![
        Value::from(seq),
        Value::from(at.timestamp_micros()),
        Value::from(e.actor_role),
        Value::from(e.actor_instance),
        Value::from(e.action),
        e.task_id.map_or(Value::Null, |t| Value::from(t.to_string())),
        e.prompt_version.map_or(Value::Null, Value::from),
    ]);
    canonical_json(&fields, &mut canon);
    canon.push('\n');
    canonical_json(&e.details, &mut canon);
    let mut h = Sha256::new();
    h.update(HASH_DOMAIN);
    h.update(prev);
    h.update((canon.len() as u64).to_be_bytes());
    h.update(canon.as_bytes());
    h.finalize().to_vec()
}

/// Appends `entry` in the caller's transaction, stamped with the current time; returns its
/// `seq`. The head row stays locked until that transaction ends, so appends are serialized.
///
/// Call it in a READ COMMITTED transaction (the default): under REPEATABLE READ a
/// concurrent append makes the head lock fail with a serialization error.
pub async fn append(conn: &mut PgConnection, key: &AuditKey, entry: AuditEntry<'_>) -> Result<i64, sqlx::Error> {
    append_at(conn, key, entry, Utc::now()).await
}

/// [`append`] with the row's time given: for tests and imports of records made elsewhere.
/// `at` is cut to microseconds (what Postgres keeps) and must fall in a month whose
/// partition exists (`audit_ensure_partition`). The chain is ordered by `seq`, not by `at`.
pub async fn append_at(
    conn: &mut PgConnection,
    key: &AuditKey,
    entry: AuditEntry<'_>,
    at: DateTime<Utc>,
) -> Result<i64, sqlx::Error> {
    let mut entry = entry;
    // Before the hash: what the trail never held cannot leak from it or from a backup.
    telemetry::redact_json(&mut entry.details);
    replace_nul(&mut entry.details);
    // The details are hashed as Postgres will hand them back: jsonb rewrites some numbers
    // (`1e16` comes back as `10000000000000000`, `-0.0` as `0.0`), and hashing the caller's
    // form would make `verify` report such a row as altered. The conversion rides on the
    // head lock's query, so it costs no extra round trip.
    let head = sqlx::query("SELECT seq, hash, $1::jsonb AS details FROM audit_head FOR UPDATE")
        .bind(&entry.details)
        .fetch_one(&mut *conn)
        .await?;
    let seq: i64 = head.try_get::<i64, _>("seq")? + 1;
    let prev: Vec<u8> = head.try_get("hash")?;
    entry.details = head.try_get("details")?;
    // Postgres keeps microseconds; hashing the same truncated instant keeps verify exact.
    let at = Utc.timestamp_micros(at.timestamp_micros()).single().unwrap_or(at);
    let hash = row_hash(&prev, seq, &at, &entry);
    let mac = key.mac(&hash);
    sqlx::query(
        "INSERT INTO audit_trail (seq, at, actor_role, actor_instance, action, task_id, prompt_version, details, prev_hash, hash, mac) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(seq)
    .bind(at)
    .bind(entry.actor_role)
    .bind(entry.actor_instance)
    .bind(entry.action)
    .bind(entry.task_id)
    .bind(entry.prompt_version)
    .bind(&entry.details)
    .bind(&prev)
    .bind(&hash)
    .bind(&mac)
    .execute(&mut *conn)
    .await?;
    sqlx::query("UPDATE audit_head SET seq = $1, hash = $2").bind(seq).bind(&hash).execute(&mut *conn).await?;
    Ok(seq)
}

/// Why the chain is broken at a row.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Break {
    /// A row is missing before this one (seq jumps).
    Gap {
        /// The seq that should have come.
        expected: i64,
    },
    /// `prev_hash` is not the previous row's hash (a row was removed or reordered).
    Chain,
    /// The row's content no longer hashes to `hash` (it was altered).
    Content,
    /// `mac` is wrong (the hash was recomputed by someone without the audit key).
    Mac,
    /// The trail ends before the head says it should (rows removed at the end).
    Truncated {
        /// The head's seq.
        head_seq: i64,
    },
    /// The row comes after the head's seq: rows were added without moving the head, or
    /// the head was set back.
    BeyondHead {
        /// The head's seq.
        head_seq: i64,
    },
}

/// The first broken row, as an operator would look it up.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BrokenRow {
    /// When it says it was written.
    pub at: DateTime<Utc>,
    /// Actor role.
    pub actor_role: String,
    /// Actor instance.
    pub actor_instance: String,
    /// Action.
    pub action: String,
    /// Task.
    pub task_id: Option<Uuid>,
}

/// Result of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    /// Rows checked (up to and including the first broken one).
    pub rows: u64,
    /// The first broken row's seq and why, or `None` when intact.
    pub first_broken: Option<(i64, Break)>,
    /// What that row says about itself; `None` when intact, and for [`Break::Truncated`],
    /// where the row is gone.
    pub broken_row: Option<BrokenRow>,
}

/// Walks the whole chain in `seq` order and reports the first broken row.
///
/// The walk and the head are read in one REPEATABLE READ snapshot, so verifying a trail
/// that is being appended to is exact: rows committed meanwhile are simply not seen.
pub async fn verify(pool: &PgPool, key: &AuditKey) -> Result<Report, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *tx).await?;
    let head_seq: i64 = sqlx::query_scalar("SELECT seq FROM audit_head").fetch_one(&mut *tx).await?;
    let report = walk(&mut tx, key, head_seq).await?;
    tx.rollback().await?;
    Ok(report)
}

async fn walk(conn: &mut PgConnection, key: &AuditKey, head_seq: i64) -> Result<Report, sqlx::Error> {
    use futures_util::TryStreamExt;
    // `(seq, at)` is the key: a duplicated seq (another month) still walks in one order.
    let mut rows = sqlx::query(
        "SELECT seq, at, actor_role, actor_instance, action, task_id, prompt_version, details, prev_hash, hash, mac \
         FROM audit_trail ORDER BY seq, at",
    )
    .fetch(&mut *conn);
    let mut prev = GENESIS.to_vec();
    let mut expected = 1i64;
    let mut count = 0u64;
    while let Some(r) = rows.try_next().await? {
        count += 1;
        let row = AuditRow::from_pg(&r)?;
        let broken = check_row(&row, expected, &prev, key)
            .or_else(|| (row.seq > head_seq).then_some(Break::BeyondHead { head_seq }));
        if let Some(b) = broken {
            let broken_row = BrokenRow {
                at: row.at,
                actor_role: row.actor_role,
                actor_instance: row.actor_instance,
                action: row.action,
                task_id: row.task_id,
            };
            return Ok(Report { rows: count, first_broken: Some((row.seq, b)), broken_row: Some(broken_row) });
        }
        prev = row.hash;
        expected = row.seq + 1;
    }
    if head_seq != expected - 1 {
        return Ok(Report {
            rows: count,
            first_broken: Some((expected, Break::Truncated { head_seq })),
            broken_row: None,
        });
    }
    Ok(Report { rows: count, first_broken: None, broken_row: None })
}

/// Checks one row against the chain so far.
pub fn check_row(row: &AuditRow, expected_seq: i64, prev: &[u8], key: &AuditKey) -> Option<Break> {
    if row.seq != expected_seq {
        return Some(Break::Gap { expected: expected_seq });
    }
    if row.prev_hash != prev {
        return Some(Break::Chain);
    }
    let entry = AuditEntry {
        actor_role: &row.actor_role,
        actor_instance: &row.actor_instance,
        action: &row.action,
        task_id: row.task_id,
        prompt_version: row.prompt_version.as_deref(),
        details: row.details.clone(),
    };
    if row_hash(prev, row.seq, &row.at, &entry) != row.hash {
        return Some(Break::Content);
    }
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(&key.0).expect("HMAC accepts any key length");
    m.update(&row.hash);
    if m.verify_slice(&row.mac).is_err() {
        return Some(Break::Mac);
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let v: Value = serde_json::from_str(r#"{"b":1,"a":{"d":[{"z":1,"y":2}],"c":"x"}}"#).unwrap();
        let mut s = String::new();
        canonical_json(&v, &mut s);
        assert_eq!(s, r#"{"a":{"c":"x","d":[{"y":2,"z":1}]},"b":1}"#);
    }

    #[test]
    fn numbers_have_one_encoding() {
        let v: Value = serde_json::from_str(
            "[0, -7, 18446744073709551615, 2.5, 0.1, 1e-7, 1.5e300, 10000000000000000000000, 2.0]",
        )
        .unwrap();
        let mut s = String::new();
        canonical_json(&v, &mut s);
        assert_eq!(s, "[0,-7,18446744073709551615,2.5e0,1e-1,1e-7,1.5e300,1e22,2e0]");
    }

    #[test]
    fn secrets_never_enter_the_trail() {
        let mut v = serde_json::json!({"lease": "eyJ...", "nested": {"api_key": "sk-1", "model_api_key": "x", "reason": "ok"}, "list": [{"token": "t"}]});
        telemetry::redact_json(&mut v);
        let text = v.to_string();
        assert!(
            !text.contains("eyJ") && !text.contains("sk-1") && !text.contains("\"t\"") && !text.contains("\"x\""),
            "{text}"
        );
        assert!(text.contains("\"reason\":\"ok\""));
    }

    #[test]
    fn a_changed_field_breaks_the_row() {
        let key = AuditKey::new(vec![7; 32]).unwrap();
        let at = Utc.timestamp_micros(1_700_000_000_123_456).unwrap();
        let e = AuditEntry {
            actor_role: "orchestrator",
            actor_instance: "o-1",
            action: "task.submit",
            task_id: None,
            prompt_version: None,
            details: serde_json::json!({"x": 1}),
        };
        let hash = row_hash(&GENESIS, 1, &at, &e);
        let row = AuditRow {
            seq: 1,
            at,
            actor_role: "orchestrator".into(),
            actor_instance: "o-1".into(),
            action: "task.submit".into(),
            task_id: None,
            prompt_version: None,
            details: serde_json::json!({"x": 1}),
            prev_hash: GENESIS.to_vec(),
            mac: key.mac(&hash),
            hash,
        };
        assert_eq!(check_row(&row, 1, &GENESIS, &key), None);
        let mut altered = row.clone();
        altered.details = serde_json::json!({"x": 2});
        assert_eq!(check_row(&altered, 1, &GENESIS, &key), Some(Break::Content));
        let other = AuditKey::new(vec![8; 32]).unwrap();
        assert_eq!(check_row(&row, 1, &GENESIS, &other), Some(Break::Mac));
        assert_eq!(check_row(&row, 2, &GENESIS, &key), Some(Break::Gap { expected: 2 }));
        assert_eq!(check_row(&row, 1, &[1; 32], &key), Some(Break::Chain));
    }
}
