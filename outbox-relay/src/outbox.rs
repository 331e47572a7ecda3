//! The SQL the relay runs against the `outbox` table (schema: `orchestrator/migrations`).
//!
//! Each function takes a connection, so a caller (the relay, a test, the benchmark) decides
//! what a transaction spans. The relay's cycle is: `BEGIN` → [`claim`] → `XADD` the ready
//! rows → [`mark_dispatched`] → `COMMIT`.
//!
//! # Which rows are claimed, and why that keeps order
//!
//! A row is claimed when it is undispatched, **its transaction is older than every
//! transaction still in flight** (`txid < pg_snapshot_xmin(pg_current_snapshot())`), its
//! stream is not paused for backpressure, and no other relay holds its lock
//! (`FOR UPDATE SKIP LOCKED`); rows are taken in `(txid, id)` order, up to the batch size.
//! This is the visibility rule of watermill-sql's PostgreSQL adapter
//! (ThreeDotsLabs/watermill-sql, `pkg/sql/schema_adapter_postgresql.go`, `SelectQuery`:
//! `transaction_id < pg_snapshot_xmin(pg_current_snapshot())` with `ORDER BY
//! transaction_id, "offset"`, after <https://event-driven.io/en/ordering_in_postgres_outbox/>).
//!
//! **No row is skipped, none is published twice by two live relays.** watermill keeps a
//! per-group cursor, and there `txid < xmin` is what stops a lower `id` that commits late
//! from falling behind the cursor. The relay keeps no cursor: a row stays a candidate until
//! the transaction that published it sets `dispatched_at` and commits, so nothing can be
//! skipped whatever the order of commits. Two relays never publish the same row because a
//! row is claimed only under its row lock (`FOR UPDATE`), `SKIP LOCKED` passes over rows
//! another relay holds, and a relay that gets a row's lock after another relay committed
//! re-checks `dispatched_at IS NULL` on the newest version of the row (READ COMMITTED
//! re-evaluates the predicate on a locked row that was updated), so it drops it. The one
//! exception is a relay that dies (or loses Postgres) after its `XADD` and before its
//! `COMMIT`: its rows are released undispatched and published again; consumers drop the
//! copy by envelope id.
//!
//! **Per-task order.** Consumers must see one task's envelopes in the order the orchestrator
//! wrote them, which is `id` order: a task's transitions are serialized on the task's row
//! lock, so a later transition inserts its rows after the earlier one committed, and
//! `bigserial` gives them higher ids. Claiming in `(txid, id)` order needs more: a
//! transaction that writes rows for a task must take the task's row lock before it writes or
//! locks anything else (the orchestrator's `lock_task` comes first; `submit` creates the task
//! row itself). A transaction is given its xid at its first write or row lock, and the lock
//! holder already has one, so the transaction that waited for the lock gets a higher xid
//! than the one that held it. Per task, txid order is then commit order is id order
//! (**assumption A**). With
//! it, if a later row R2 of a task is claimable (`R2.txid < xmin`), the earlier row R1 has
//! `R1.txid < R2.txid < xmin` and committed before R2's transaction started writing, so it
//! is visible and claimable too, and it comes first in `(txid, id)` order: one relay never
//! takes R2 without R1, and publishes a batch in `id` order.
//!
//! With several relays that is not enough: relay B may hold R1 (claimed, `XADD` not yet
//! sent) while relay A, skipping B's locked rows, claims R2 and publishes it first. So the
//! claim statement also looks for **earlier rows of the same task that are undispatched but
//! not in this batch** (held by another relay, or waiting on a paused stream) and marks the
//! later rows of that task *blocked*: they are locked with the batch but neither published
//! nor marked, and come back once the earlier rows are dispatched. Under assumption A those
//! earlier rows come before the batch's last row in `(txid, id)` order, so the look-up scans
//! only the index up to that row (the rows other relays hold, not the whole backlog). The
//! look-up uses the statement's snapshot: a row that B marked after that snapshot still looks
//! undispatched, which only blocks more than necessary, never less; and a B that rolled back
//! without publishing leaves R1 undispatched, so R2 stays blocked until R1 is published.
//!
//! If assumption A is broken (a transaction takes an xid — writes, or locks some other row —
//! before it waits for the task's lock, and then writes rows for that task), its rows can sort
//! before an earlier transaction's rows of the same task and be published first. The relay
//! cannot see that from the table; it is the writer's rule to keep.
//!
//! **What the horizon costs.** `pg_snapshot_xmin` covers every transaction with an xid in the
//! whole cluster, so a long-running write transaction anywhere (another database included)
//! holds every newer outbox row back until it ends. The relay notices rows that are committed
//! but above the horizon ([`waiting_beyond_horizon`]) and re-checks every few milliseconds
//! instead of waiting for the next `NOTIFY`, which a transaction without outbox rows never
//! sends.

use std::time::Duration;

use sqlx::{PgConnection, Row};

/// The channel the outbox trigger notifies after every insert statement.
pub const NOTIFY_CHANNEL: &str = "fleet_outbox";

/// One row taken by [`claim`], ready to be published.
#[derive(Debug, Clone)]
pub struct ClaimedRow {
    /// `outbox.id`.
    pub id: i64,
    /// The stream to `XADD` to.
    pub stream: String,
    /// The signed frame, forwarded byte for byte.
    pub frame: Vec<u8>,
    /// The W3C trace context its envelope carries (a copy the orchestrator stored beside
    /// the frame), so the forwarding span joins the task's trace.
    pub traceparent: Option<String>,
}

/// What one [`claim`] locked.
#[derive(Debug, Default)]
pub struct Claim {
    /// Rows to publish now, in `id` order (so each task's rows are in order).
    pub ready: Vec<ClaimedRow>,
    /// Rows locked but held back because an earlier row of their task is undispatched
    /// outside this batch. Not to be published or marked in this transaction.
    pub blocked: usize,
}

impl Claim {
    /// How many rows the claim locked (ready and blocked).
    pub fn locked(&self) -> usize {
        self.ready.len() + self.blocked
    }
}

/// The claim statement; see the module docs for why each part is there.
///
/// `batch` takes the rows (the partial index `outbox_undispatched (txid, id) WHERE
/// dispatched_at IS NULL` serves both the horizon condition and the order). `earlier` finds,
/// per task of the batch, the first undispatched row that is not in the batch among rows up
/// to the batch's last txid. A batch row is blocked when such a row of its task has a lower
/// id.
pub const CLAIM_SQL: &str = r#"
WITH batch AS MATERIALIZED (
    SELECT id, txid, task_id, stream, frame, traceparent
    FROM outbox
    WHERE dispatched_at IS NULL
      AND txid < pg_snapshot_xmin(pg_current_snapshot())
      AND stream <> ALL($2::text[])
    ORDER BY txid, id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
),
earlier AS (
    SELECT o.task_id, min(o.id) AS first_id
    FROM outbox o
    WHERE o.dispatched_at IS NULL
      AND o.txid <= (SELECT b.txid FROM batch b ORDER BY b.txid DESC LIMIT 1)
      AND o.task_id IN (SELECT b.task_id FROM batch b WHERE b.task_id IS NOT NULL)
      AND o.id NOT IN (SELECT b.id FROM batch b)
    GROUP BY o.task_id
)
SELECT b.id, b.stream, b.frame, b.traceparent, COALESCE(e.first_id < b.id, false) AS blocked
FROM batch b
LEFT JOIN earlier e ON e.task_id = b.task_id
ORDER BY b.id
"#;

/// Locks up to `limit` claimable rows (streams in `paused` excluded) for the rest of the
/// caller's transaction, and says which of them may be published now.
pub async fn claim(conn: &mut PgConnection, limit: u32, paused: &[String]) -> Result<Claim, sqlx::Error> {
    let rows = sqlx::query(CLAIM_SQL).bind(i64::from(limit)).bind(paused).fetch_all(conn).await?;
    let mut claim = Claim { ready: Vec::with_capacity(rows.len()), blocked: 0 };
    for row in rows {
        if row.try_get::<bool, _>("blocked")? {
            claim.blocked += 1;
        } else {
            claim.ready.push(ClaimedRow {
                id: row.try_get("id")?,
                stream: row.try_get("stream")?,
                frame: row.try_get("frame")?,
                traceparent: row.try_get("traceparent")?,
            });
        }
    }
    Ok(claim)
}

/// Marks the rows published. Run in the claiming transaction, after the `XADD`s succeeded.
pub async fn mark_dispatched(conn: &mut PgConnection, ids: &[i64]) -> Result<u64, sqlx::Error> {
    let done =
        sqlx::query("UPDATE outbox SET dispatched_at = now() WHERE id = ANY($1)").bind(ids).execute(conn).await?;
    Ok(done.rows_affected())
}

/// Whether committed rows exist that the horizon still holds back (their transaction is
/// newer than some transaction still in flight). They become claimable as soon as those
/// transactions end, which may send no notification.
pub async fn waiting_beyond_horizon(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM outbox WHERE dispatched_at IS NULL AND txid >= pg_snapshot_xmin(pg_current_snapshot()))",
    )
    .fetch_one(conn)
    .await
}

/// Deletes at most `limit` rows dispatched more than `retention` ago, skipping rows another
/// pruner holds. Returns how many it deleted; call again while that equals `limit`.
pub async fn prune(conn: &mut PgConnection, retention: Duration, limit: u32) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM outbox WHERE id IN (
             SELECT id FROM outbox
             WHERE dispatched_at < now() - make_interval(secs => $1)
             ORDER BY dispatched_at
             LIMIT $2
             FOR UPDATE SKIP LOCKED)",
    )
    .bind(retention.as_secs_f64())
    .bind(i64::from(limit))
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// Undispatched rows, for status output and tests.
pub async fn backlog(conn: &mut PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM outbox WHERE dispatched_at IS NULL").fetch_one(conn).await
}
