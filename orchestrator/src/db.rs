//! Connecting to Postgres and keeping the schema current.

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// The schema, embedded at build time from `orchestrator/migrations`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Applies pending migrations and makes sure this month's and next month's audit
/// partitions exist (run at every start, so a long-running fleet never writes into a
/// month without a partition).
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::Error> {
    MIGRATOR.run(pool).await?;
    ensure_audit_partitions(pool).await
}

/// Creates the audit partitions of the current and the next month (UTC) if missing.
pub async fn ensure_audit_partitions(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query(
        "SELECT audit_ensure_partition((now() AT TIME ZONE 'UTC')::date), \
                audit_ensure_partition((now() AT TIME ZONE 'UTC' + interval '1 month')::date)",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// A pool for `url`.
pub async fn connect(url: &secrecy::SecretString, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    use secrecy::ExposeSecret;
    let options: PgConnectOptions = url.expose_secret().parse()?;
    PgPoolOptions::new().max_connections(max_connections).connect_with(options).await
}
