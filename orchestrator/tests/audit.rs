//! The audit trail on a real Postgres: concurrent appends form one contiguous chain, the
//! chain runs across monthly partitions, the database refuses changes (to the application
//! role by privileges, to everyone by triggers), and `verify` names the first row that a
//! superuser altered, removed or re-hashed.
//!
//! Tampering is done the way an attacker with the database but without the audit key
//! would: as the harness's `postgres` superuser, through `psql`, with the triggers
//! disabled. Re-hashing uses [`documented_hash`], written from docs/operations.md rather
//! than by calling the crate, so these tests also hold the documentation to the code.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use chrono::{DateTime, Datelike, Months, TimeZone, Utc};
use fleet_testkit::Postgres;
use orchestrator::audit::{self, AuditEntry, AuditKey, Break, Report};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row};
use uuid::Uuid;

/// The grant script operators run for the application role.
const APP_ROLE_SQL: &str = include_str!("../sql/app_role.sql");
/// Trust authentication in the harness ignores it; it is here because operators set one.
const APP_PASSWORD: &str = "app-password-not-checked-by-trust-auth";

fn key() -> AuditKey {
    AuditKey::new(vec![0x5a; 32]).unwrap()
}

/// A Postgres server with one migrated database, reached as the superuser.
struct Db {
    pg: Postgres,
    /// The database's name, for `psql`.
    name: String,
    /// Connected as the `postgres` superuser (who also owns the schema).
    pool: PgPool,
}

impl Db {
    async fn new() -> Self {
        let pg = Postgres::start().expect("postgres must be installed; tests never skip");
        let url = pg.create_database().unwrap();
        let name = url.rsplit('/').next().unwrap().to_owned();
        let pool = PgPool::connect(&url).await.unwrap();
        orchestrator::db::migrate(&pool).await.unwrap();
        Self { pg, name, pool }
    }

    /// Runs `sql` as the superuser with `psql`, and returns what it printed.
    fn su(&self, sql: &str) -> String {
        self.pg.psql(&self.name, sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// What a superuser does to change audit rows: switch the guard off around `sql`, in
    /// one transaction.
    fn tamper(&self, sql: &str) {
        self.su(&format!(
            "BEGIN; ALTER TABLE audit_trail DISABLE TRIGGER audit_no_update; {sql}; \
             ALTER TABLE audit_trail ENABLE TRIGGER audit_no_update; COMMIT;"
        ));
    }

    /// A pool connected as `user`.
    async fn pool_as(&self, user: &str) -> PgPool {
        let url = format!("postgres://{user}:{APP_PASSWORD}@127.0.0.1:{}/{}", self.pg.port(), self.name);
        PgPool::connect(&url).await.unwrap()
    }

    async fn verify(&self) -> Report {
        audit::verify(&self.pool, &key()).await.unwrap()
    }

    async fn seqs(&self) -> Vec<i64> {
        sqlx::query_scalar("SELECT seq FROM audit_trail ORDER BY seq").fetch_all(&self.pool).await.unwrap()
    }

    async fn row(&self, seq: i64) -> Stored {
        let r = sqlx::query(
            "SELECT seq, at, actor_role, actor_instance, action, task_id, prompt_version, details, hash \
             FROM audit_trail WHERE seq = $1",
        )
        .bind(seq)
        .fetch_one(&self.pool)
        .await
        .unwrap();
        Stored {
            seq: r.get("seq"),
            at: r.get("at"),
            actor_role: r.get("actor_role"),
            actor_instance: r.get("actor_instance"),
            action: r.get("action"),
            task_id: r.get("task_id"),
            prompt_version: r.get("prompt_version"),
            details: r.get("details"),
            hash: r.get("hash"),
        }
    }

    /// The partition a row is stored in.
    async fn partition_of(&self, seq: i64) -> String {
        sqlx::query_scalar("SELECT tableoid::regclass::text FROM audit_trail WHERE seq = $1")
            .bind(seq)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    async fn partitions(&self) -> BTreeSet<String> {
        sqlx::query_scalar(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = 'audit_trail'::regclass",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
    }
}

/// An audit row as stored, with what a re-hash needs.
#[derive(Debug, Clone)]
struct Stored {
    seq: i64,
    at: DateTime<Utc>,
    actor_role: String,
    actor_instance: String,
    action: String,
    task_id: Option<Uuid>,
    prompt_version: Option<String>,
    details: Value,
    hash: Vec<u8>,
}

/// The row hash exactly as docs/operations.md ("Audit trail", "The hash chain") defines
/// it, written from that text: SHA-256 over the domain tag, the previous hash, the
/// encoding's length as 8 bytes big-endian, and the encoding.
fn documented_hash(prev: &[u8], row: &Stored) -> Vec<u8> {
    let header = json!([
        row.seq,
        row.at.timestamp_micros(),
        row.actor_role,
        row.actor_instance,
        row.action,
        row.task_id.map(|t| t.hyphenated().to_string()),
        row.prompt_version,
    ]);
    let encoding = format!("{}\n{}", canonical(&header), canonical(&row.details));
    let mut h = Sha256::new();
    h.update(b"agentfleet/audit/v1");
    h.update(prev);
    h.update((encoding.len() as u64).to_be_bytes());
    h.update(encoding.as_bytes());
    h.finalize().to_vec()
}

/// Canonical JSON as documented: no whitespace, object keys sorted by their UTF-8 bytes at
/// every level, strings escaped as JSON requires and no more, integers in decimal, other
/// numbers as the shortest digits that read back as the same f64, in `{:e}` form.
fn canonical(v: &Value) -> String {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            let fields: Vec<String> =
                keys.into_iter().map(|k| format!("{}:{}", Value::from(k.as_str()), canonical(&map[k]))).collect();
            format!("{{{}}}", fields.join(","))
        }
        Value::Array(items) => format!("[{}]", items.iter().map(canonical).collect::<Vec<_>>().join(",")),
        Value::Number(n) if n.as_i64().is_some() || n.as_u64().is_some() => n.to_string(),
        Value::Number(n) => format!("{:e}", n.as_f64().unwrap()),
        scalar => scalar.to_string(),
    }
}

fn hex_literal(bytes: &[u8]) -> String {
    format!("'\\x{}'::bytea", hex::encode(bytes))
}

fn entry(i: usize, task: Uuid) -> AuditEntry<'static> {
    AuditEntry {
        actor_role: "orchestrator",
        actor_instance: "orchestrator-0",
        action: if i.is_multiple_of(3) { "task.submit" } else { "task.transition" },
        task_id: (!i.is_multiple_of(4)).then_some(task),
        prompt_version: i.is_multiple_of(2).then_some("dev-v3"),
        details: json!({"i": i, "to": "qa", "from": "dev", "nested": {"z": [1, 2.5, null, true], "a": "é\"\n"}}),
    }
}

/// Appends `n` rows, one transaction each; returns their seqs.
async fn append_rows(pool: &PgPool, n: usize) -> Vec<i64> {
    let task = Uuid::now_v7();
    let mut seqs = Vec::new();
    for i in 0..n {
        let mut tx = pool.begin().await.unwrap();
        seqs.push(audit::append(&mut tx, &key(), entry(i, task)).await.unwrap());
        tx.commit().await.unwrap();
    }
    seqs
}

fn intact(rows: u64) -> Report {
    Report { rows, first_broken: None, broken_row: None }
}

/// `audit_trail_YYYY_MM` of the UTC month holding `at`.
fn partition_name(at: DateTime<Utc>) -> String {
    format!("audit_trail_{:04}_{:02}", at.year(), at.month())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_form_one_contiguous_chain() {
    let db = Db::new().await;
    let pool = db.pool.clone();
    let writers = 6;
    let txs_per_writer = 8;
    let mut handles = Vec::new();
    for w in 0..writers {
        let pool = pool.clone();
        handles.push(tokio::spawn(async move {
            let task = Uuid::now_v7();
            let mut committed = 0;
            for t in 0..txs_per_writer {
                let mut tx = pool.begin().await.unwrap();
                // One to three rows per transaction, as a transition with side effects writes.
                let rows = 1 + (w + t) % 3;
                for r in 0..rows {
                    audit::append(&mut tx, &key(), entry(w * 100 + t * 10 + r, task)).await.unwrap();
                }
                // Every fifth transaction rolls back: its seqs must be reused, not skipped.
                if (w + t) % 5 == 4 {
                    tx.rollback().await.unwrap();
                } else {
                    tx.commit().await.unwrap();
                    committed += rows;
                }
            }
            committed
        }));
    }
    // Verifying while the writers run sees a consistent prefix of the chain every time.
    let verifier = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut checks = 0;
            while checks < 20 {
                let report = audit::verify(&pool, &key()).await.unwrap();
                assert_eq!(report.first_broken, None, "a verify during appends saw {report:?}");
                checks += 1;
            }
        })
    };
    let mut n = 0;
    for h in handles {
        n += h.await.unwrap();
    }
    verifier.await.unwrap();

    assert_eq!(db.seqs().await, (1..=n as i64).collect::<Vec<_>>());
    assert_eq!(db.verify().await, intact(n as u64));
    let head: i64 = sqlx::query_scalar("SELECT seq FROM audit_head").fetch_one(&db.pool).await.unwrap();
    assert_eq!(head, n as i64);
}

#[tokio::test]
async fn an_empty_trail_is_intact() {
    let db = Db::new().await;
    assert_eq!(db.verify().await, intact(0));
}

#[tokio::test]
async fn migrate_creates_this_and_next_months_partitions_with_their_guards() {
    let db = Db::new().await;
    let now = Utc::now();
    let expected: BTreeSet<String> =
        [partition_name(now), partition_name(now.checked_add_months(Months::new(1)).unwrap())].into();
    assert_eq!(db.partitions().await, expected);
    // Running it again (every start does) changes nothing.
    orchestrator::db::migrate(&db.pool).await.unwrap();
    assert_eq!(db.partitions().await, expected);
    // The row guard is cloned onto each partition by Postgres; the TRUNCATE guard is added
    // by audit_ensure_partition.
    for part in &expected {
        let triggers: Vec<String> =
            sqlx::query_scalar("SELECT tgname::text FROM pg_trigger WHERE tgrelid = $1::regclass ORDER BY tgname")
                .bind(part)
                .fetch_all(&db.pool)
                .await
                .unwrap();
        assert_eq!(triggers, ["audit_no_truncate", "audit_no_update"], "{part}");
    }
}

#[tokio::test]
async fn the_chain_runs_across_partitions_in_seq_order() {
    let db = Db::new().await;
    db.su("SELECT audit_ensure_partition('2024-01-15')");
    let january = Utc.with_ymd_and_hms(2024, 1, 10, 8, 30, 0).unwrap();
    let task = Uuid::now_v7();
    let append = async |i: usize, at: Option<DateTime<Utc>>| {
        let mut tx = db.pool.begin().await.unwrap();
        let seq = match at {
            Some(at) => audit::append_at(&mut tx, &key(), entry(i, task), at).await.unwrap(),
            None => audit::append(&mut tx, &key(), entry(i, task)).await.unwrap(),
        };
        tx.commit().await.unwrap();
        seq
    };
    // Now, then January 2024 (an import), then now again: seq order is not time order.
    assert_eq!(append(0, None).await, 1);
    assert_eq!(append(1, None).await, 2);
    assert_eq!(append(2, Some(january)).await, 3);
    assert_eq!(append(3, Some(january + chrono::Duration::days(20))).await, 4);
    assert_eq!(append(4, None).await, 5);

    let current = partition_name(Utc::now());
    assert_eq!(db.partition_of(1).await, current);
    assert_eq!(db.partition_of(3).await, "audit_trail_2024_01");
    assert_eq!(db.partition_of(4).await, "audit_trail_2024_01");
    assert_eq!(db.partition_of(5).await, current);
    assert_eq!(db.verify().await, intact(5));

    // A change in the old month is found there, at its seq.
    db.tamper("UPDATE audit_trail SET details = details || '{\"to\": \"merged\"}' WHERE seq = 4");
    let report = db.verify().await;
    assert_eq!(report.first_broken, Some((4, Break::Content)), "{report:?}");
    assert_eq!(report.broken_row.unwrap().at, january + chrono::Duration::days(20));
}

#[tokio::test]
async fn a_month_without_a_partition_is_refused() {
    let db = Db::new().await;
    let mut tx = db.pool.begin().await.unwrap();
    let at = Utc.with_ymd_and_hms(2023, 6, 1, 0, 0, 0).unwrap();
    let err = audit::append_at(&mut tx, &key(), entry(1, Uuid::now_v7()), at).await.unwrap_err();
    assert!(err.to_string().contains("no partition of relation \"audit_trail\""), "{err}");
}

#[tokio::test]
async fn months_are_utc_months_whatever_the_session_time_zone() {
    let db = Db::new().await;
    // A session in another zone makes the partition: its bounds are still UTC midnights.
    db.su("SET TimeZone = 'America/Los_Angeles'; SELECT audit_ensure_partition('2027-03-01')");
    db.su("SET TimeZone = 'Asia/Tokyo'; SELECT audit_ensure_partition('2027-04-01')");
    let task = Uuid::now_v7();
    for (i, at) in [
        Utc.with_ymd_and_hms(2027, 3, 1, 0, 30, 0).unwrap(),
        Utc.with_ymd_and_hms(2027, 3, 31, 23, 30, 0).unwrap(),
        Utc.with_ymd_and_hms(2027, 4, 1, 0, 0, 0).unwrap(),
    ]
    .into_iter()
    .enumerate()
    {
        let mut tx = db.pool.begin().await.unwrap();
        let seq = audit::append_at(&mut tx, &key(), entry(i, task), at).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(db.partition_of(seq).await, partition_name(at), "{at}");
    }
    assert_eq!(db.verify().await, intact(3));
}

#[tokio::test]
async fn details_are_hashed_as_postgres_stores_them() {
    let db = Db::new().await;
    // jsonb rewrites these numbers (1e16 comes back as 10000000000000000, -0.0 as 0.0);
    // the row must still verify.
    let details = json!({
        "big_float": 1e16,
        "negative_zero": -0.0,
        "tiny": 1e-7,
        "sum": 0.1 + 0.2,
        "huge": 1.5e300,
        "u64_max": u64::MAX,
        "i64_min": i64::MIN,
        "text": "emoji \u{1F600}, quote \", backslash \\, tab \t, del \u{7f}",
        "Zebra": {"b": 1, "a": [{"y": 2, "x": 1}]},
        "token": "a secret that must not be stored",
        // jsonb refuses U+0000; it must not fail the caller's transaction.
        "nul": "a\u{0}b",
        "k\u{0}": 1,
    });
    let mut tx = db.pool.begin().await.unwrap();
    let e = AuditEntry {
        actor_role: "operator",
        actor_instance: "alice",
        action: "fleet.kill",
        task_id: None,
        prompt_version: None,
        details: details.clone(),
    };
    audit::append(&mut tx, &key(), e).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(db.verify().await, intact(1));
    let stored = db.row(1).await;
    assert_eq!(stored.details["token"], "**REDACTED**");
    assert_eq!(stored.details["big_float"], json!(10_000_000_000_000_000u64));
    assert_eq!(stored.details["nul"], "a\u{FFFD}b");
    assert_eq!(stored.details["k\u{FFFD}"], 1);
    // And the documented construction gives the stored hash.
    assert_eq!(documented_hash(&audit::GENESIS, &stored), stored.hash);
}

// ---- The database refuses changes ------------------------------------------------------

/// The statements no one may run against the audit trail.
fn changes(partition: &str) -> Vec<String> {
    vec![
        "UPDATE audit_trail SET details = '{}' WHERE seq = 1".into(),
        "DELETE FROM audit_trail WHERE seq = 1".into(),
        "TRUNCATE audit_trail".into(),
        format!("UPDATE {partition} SET action = 'x'"),
        format!("DELETE FROM {partition}"),
        format!("TRUNCATE {partition}"),
    ]
}

#[tokio::test]
async fn even_the_owner_is_refused_by_the_triggers() {
    let db = Db::new().await;
    append_rows(&db.pool, 2).await;
    for sql in changes(&partition_name(Utc::now())) {
        let err = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.as_str())).execute(&db.pool).await.unwrap_err();
        let db_err = err.as_database_error().unwrap_or_else(|| panic!("{sql}: {err}"));
        assert!(db_err.message().contains("audit_trail is append-only"), "{sql}: {err}");
        assert_eq!(db_err.code().as_deref(), Some("42501"), "{sql}: {err}");
    }
    assert_eq!(db.verify().await, intact(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_application_role_appends_but_cannot_change_the_trail() {
    let db = Db::new().await;
    append_rows(&db.pool, 2).await;
    db.su(&format!("CREATE ROLE fleet_app LOGIN PASSWORD '{APP_PASSWORD}'"));
    db.su(APP_ROLE_SQL);
    // Idempotent: operators run it again after each migration.
    db.su(APP_ROLE_SQL);
    let app = db.pool_as("fleet_app").await;

    // What the orchestrator does works.
    let mut tx = app.begin().await.unwrap();
    assert_eq!(audit::append(&mut tx, &key(), entry(7, Uuid::now_v7())).await.unwrap(), 3);
    tx.commit().await.unwrap();
    assert_eq!(audit::verify(&app, &key()).await.unwrap(), intact(3));
    orchestrator::db::ensure_audit_partitions(&app).await.unwrap();
    sqlx::raw_sql(
        "INSERT INTO tasks (id, state, title, spec, submitted_by) VALUES ('0190aaaa-0000-7000-8000-000000000001', 'submitted', 't', '{}', 'alice'); \
         INSERT INTO task_events (task_id, to_state, cause) VALUES ('0190aaaa-0000-7000-8000-000000000001', 'submitted', 'submitted'); \
         INSERT INTO outbox (stream, envelope_id, frame) VALUES ('fleet:tasks:dev', '0190aaaa-0000-7000-8000-000000000002', '\\x00'); \
         UPDATE fleet_state SET halted = false; DELETE FROM outbox",
    )
    .execute(&app)
    .await
    .unwrap();

    // It may create a month's partition (SECURITY DEFINER), which the owner then owns, and
    // append into it.
    sqlx::query("SELECT audit_ensure_partition('2031-03-01')").execute(&app).await.unwrap();
    let owner: String = sqlx::query_scalar(
        "SELECT pg_get_userbyid(relowner)::text FROM pg_class WHERE relname = 'audit_trail_2031_03'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(owner, "postgres");
    let mut tx = app.begin().await.unwrap();
    let at = Utc.with_ymd_and_hms(2031, 3, 5, 12, 0, 0).unwrap();
    assert_eq!(audit::append_at(&mut tx, &key(), entry(8, Uuid::now_v7()), at).await.unwrap(), 4);
    tx.commit().await.unwrap();

    // What would rewrite history is refused: no privilege, not the owner.
    let current = partition_name(Utc::now());
    let mut refused = changes(&current);
    refused.extend([
        "DROP TABLE audit_trail".to_owned(),
        format!("DROP TABLE {current}"),
        format!("ALTER TABLE audit_trail DETACH PARTITION {current}"),
        "DROP TRIGGER audit_no_update ON audit_trail".to_owned(),
        "ALTER TABLE audit_trail DISABLE TRIGGER audit_no_update".to_owned(),
        "ALTER TABLE audit_trail DISABLE TRIGGER ALL".to_owned(),
        format!("ALTER TABLE {current} DISABLE TRIGGER audit_no_truncate"),
        "CREATE OR REPLACE FUNCTION audit_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$"
            .to_owned(),
        "SET session_replication_role = replica".to_owned(),
        "CREATE TABLE audit_trail_2040_01 PARTITION OF audit_trail FOR VALUES FROM ('2040-01-01') TO ('2040-02-01')"
            .to_owned(),
        "DELETE FROM audit_head".to_owned(),
        "INSERT INTO audit_head (singleton, seq, hash) VALUES (false, 0, '\\x00')".to_owned(),
    ]);
    for sql in refused {
        let err = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.as_str())).execute(&app).await.unwrap_err();
        let db_err = err.as_database_error().unwrap_or_else(|| panic!("{sql}: {err}"));
        let message = db_err.message();
        assert!(message.starts_with("permission denied") || message.starts_with("must be owner"), "{sql}: {message}");
        assert_eq!(db_err.code().as_deref(), Some("42501"), "{sql}: {err}");
    }
    assert_eq!(db.verify().await, intact(4));

    // It can insert a row of its own choosing, but without the audit key its MAC is wrong.
    let last = db.row(4).await;
    let mut forged = Stored {
        seq: 5,
        at: Utc.timestamp_micros(Utc::now().timestamp_micros()).unwrap(),
        action: "task.approve".into(),
        details: json!({"by": "mallory"}),
        ..last.clone()
    };
    forged.hash = documented_hash(&last.hash, &forged);
    sqlx::query(
        "INSERT INTO audit_trail (seq, at, actor_role, actor_instance, action, task_id, prompt_version, details, prev_hash, hash, mac) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(forged.seq)
    .bind(forged.at)
    .bind(&forged.actor_role)
    .bind(&forged.actor_instance)
    .bind(&forged.action)
    .bind(forged.task_id)
    .bind(&forged.prompt_version)
    .bind(&forged.details)
    .bind(&last.hash)
    .bind(&forged.hash)
    .bind(vec![0u8; 32])
    .execute(&app)
    .await
    .unwrap();
    sqlx::query("UPDATE audit_head SET seq = 5, hash = $1").bind(&forged.hash).execute(&app).await.unwrap();
    let report = db.verify().await;
    assert_eq!(report.first_broken, Some((5, Break::Mac)), "{report:?}");
    assert_eq!(report.broken_row.unwrap().action, "task.approve");
}

#[tokio::test]
async fn the_grant_script_takes_another_role_name_and_refuses_a_superuser() {
    let db = Db::new().await;
    let err = db.pg.psql(&db.name, APP_ROLE_SQL).unwrap_err().to_string();
    assert!(err.contains("role \"fleet_app\" does not exist"), "{err}");
    db.su("CREATE ROLE orch_prod LOGIN");
    db.su(&format!("SET fleet.app_role = 'orch_prod'; {APP_ROLE_SQL}"));
    let granted = db.su("SELECT has_table_privilege('orch_prod', 'audit_trail', 'INSERT'), \
                has_table_privilege('orch_prod', 'audit_trail', 'UPDATE'), \
                has_table_privilege('orch_prod', 'tasks', 'UPDATE')");
    assert_eq!(granted.trim(), "t|f|t");
    db.su("CREATE ROLE root_app LOGIN SUPERUSER");
    let err =
        db.pg.psql(&db.name, &format!("SET fleet.app_role = 'root_app'; {APP_ROLE_SQL}")).unwrap_err().to_string();
    assert!(err.contains("is a superuser"), "{err}");
}

// ---- verify names what a superuser changed ---------------------------------------------

/// A migrated database with five rows.
async fn five_rows() -> Db {
    let db = Db::new().await;
    assert_eq!(append_rows(&db.pool, 5).await, [1, 2, 3, 4, 5]);
    assert_eq!(db.verify().await, intact(5));
    db
}

#[tokio::test]
async fn an_altered_row_is_named_with_content() {
    let db = five_rows().await;
    let before = db.row(3).await;
    db.tamper("UPDATE audit_trail SET details = jsonb_set(details, '{to}', '\"merged\"') WHERE seq = 3");
    let report = db.verify().await;
    assert_eq!(report.rows, 3);
    assert_eq!(report.first_broken, Some((3, Break::Content)));
    let row = report.broken_row.unwrap();
    assert_eq!((row.at, row.action, row.task_id), (before.at, before.action, before.task_id));

    // Any column counts, not only the details.
    let db = five_rows().await;
    db.tamper("UPDATE audit_trail SET actor_instance = 'orchestrator-1' WHERE seq = 2");
    assert_eq!(db.verify().await.first_broken, Some((2, Break::Content)));
}

#[tokio::test]
async fn a_row_deleted_in_the_middle_is_a_gap_at_the_next_seq() {
    let db = five_rows().await;
    db.tamper("DELETE FROM audit_trail WHERE seq = 3");
    let report = db.verify().await;
    assert_eq!(report.first_broken, Some((4, Break::Gap { expected: 3 })));
    assert_eq!(report.rows, 3);
}

#[tokio::test]
async fn a_row_deleted_and_the_rest_renumbered_breaks_the_chain() {
    let db = five_rows().await;
    db.tamper(
        "DELETE FROM audit_trail WHERE seq = 3; UPDATE audit_trail SET seq = seq - 1 WHERE seq > 3; \
         UPDATE audit_head SET seq = 4",
    );
    assert_eq!(db.verify().await.first_broken, Some((3, Break::Chain)));
}

#[tokio::test]
async fn rows_deleted_at_the_end_are_truncation() {
    let db = five_rows().await;
    db.tamper("DELETE FROM audit_trail WHERE seq >= 4");
    let report = db.verify().await;
    assert_eq!(report, Report { rows: 3, first_broken: Some((4, Break::Truncated { head_seq: 5 })), broken_row: None });
}

#[tokio::test]
async fn a_head_set_back_leaves_rows_beyond_it() {
    let db = five_rows().await;
    let fourth = db.row(4).await;
    db.su(&format!("UPDATE audit_head SET seq = 4, hash = {}", hex_literal(&fourth.hash)));
    let report = db.verify().await;
    assert_eq!(report.first_broken, Some((5, Break::BeyondHead { head_seq: 4 })));
}

#[tokio::test]
async fn a_row_rehashed_without_the_key_is_named_with_mac() {
    let db = five_rows().await;
    let second = db.row(2).await;
    let mut third = db.row(3).await;
    third.details["to"] = json!("merged");
    third.hash = documented_hash(&second.hash, &third);
    // The attacker recomputes the hash of the row they changed and relinks the next row;
    // the MAC they cannot recompute.
    db.tamper(&format!(
        "UPDATE audit_trail SET details = '{}'::jsonb, hash = {} WHERE seq = 3; \
         UPDATE audit_trail SET prev_hash = {} WHERE seq = 4",
        third.details.to_string().replace('\'', "''"),
        hex_literal(&third.hash),
        hex_literal(&third.hash),
    ));
    let report = db.verify().await;
    assert_eq!(report.first_broken, Some((3, Break::Mac)), "{report:?}");
    assert_eq!(report.rows, 3);
}

#[tokio::test]
async fn the_wrong_key_fails_at_the_first_row() {
    let db = five_rows().await;
    let other = AuditKey::new(vec![0x5b; 32]).unwrap();
    let report = audit::verify(&db.pool, &other).await.unwrap();
    assert_eq!(report.first_broken, Some((1, Break::Mac)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_streams_a_long_chain() {
    let db = Db::new().await;
    // Bulk: one transaction, many rows, so the walk spans many fetches.
    let mut tx = db.pool.begin().await.unwrap();
    let task = Uuid::now_v7();
    for i in 0..2000 {
        audit::append(&mut tx, &key(), entry(i, task)).await.unwrap();
    }
    tx.commit().await.unwrap();
    assert_eq!(db.verify().await, intact(2000));
    db.tamper("UPDATE audit_trail SET action = 'task.approve' WHERE seq = 1999");
    assert_eq!(db.verify().await.first_broken, Some((1999, Break::Content)));
}
