//! `fleetctl db migrate`, and [`Database`]: the fleet's Postgres as `db` and `audit` reach
//! it, named in messages by `host:port` only.
//!
//! The database URL may carry a password (`postgres://owner:PASSWORD@db:5432/fleet`), so it
//! is a [`SecretString`] exposed only here, to build the connection options; messages say
//! `host:port`, and every database error text goes through [`Database::describe`], which
//! cuts it and redacts the password should it ever appear.

use std::fmt;
use std::io::{self, Write};
use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::{Args, Subcommand};
use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

use crate::exit::UsageError;

/// How long connecting may take before fleetctl gives up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `fleetctl db …`
#[derive(Debug, Subcommand)]
pub enum DbCommand {
    /// Apply the orchestrator's pending schema migrations and create the audit trail's
    /// partitions for this month and the next (UTC).
    ///
    /// Run it as the database owner (the role that owns the fleet's tables), before the
    /// first start of the orchestrator and after each upgrade; then run
    /// orchestrator/sql/app_role.sql so the application role gets its grants on new
    /// tables. It prints the migrations it applied, or "schema up to date". Exit 64 for an
    /// invalid URL, 1 when Postgres can't be reached or a migration fails (a migration that
    /// fails is rolled back).
    Migrate(MigrateArgs),
}

/// Arguments of `db migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The database, `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE`, as its owner. Never
    /// printed: messages name only host:port.
    /// Or FLEET_DATABASE_URL_FILE, a file holding it.
    #[arg(long, value_name = "URL", env = "FLEET_DATABASE_URL", hide_env_values = true, value_parser = parse_secret)]
    pub database_url: Option<SecretString>,
}

/// Takes a secret as it is: a parse error here would make clap quote the value.
pub(crate) fn parse_secret(value: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(value.into())
}

/// Runs one `db` subcommand.
pub fn run(cmd: DbCommand) -> anyhow::Result<()> {
    match cmd {
        DbCommand::Migrate(args) => migrate(&args),
    }
}

/// The database a command names: `--database-url`, FLEET_DATABASE_URL or
/// FLEET_DATABASE_URL_FILE; none is a usage error.
pub fn from_args(url: Option<SecretString>) -> anyhow::Result<Database> {
    let url = crate::files::secret_or_file(url, "FLEET_DATABASE_URL")?.ok_or_else(|| {
        UsageError::new("no database URL: pass --database-url, or set FLEET_DATABASE_URL or FLEET_DATABASE_URL_FILE")
    })?;
    Ok(Database::parse(&url)?)
}

fn migrate(args: &MigrateArgs) -> anyhow::Result<()> {
    let db = from_args(args.database_url.clone())?;
    let report = runtime()?.block_on(async {
        let pool = db.connect().await?;
        let before = applied(&db, &pool).await?;
        orchestrator::db::migrate(&pool)
            .await
            .map_err(|e| anyhow!("{}", db.describe(&e)))
            .with_context(|| format!("Failed to migrate the database at {}", db.address()))?;
        let after = applied(&db, &pool).await?;
        pool.close().await;
        Ok::<_, anyhow::Error>(render_migrations(&before, &after))
    })?;
    io::stdout().lock().write_all(report.as_bytes()).context("Failed to write to stdout")
}

/// The successfully applied migrations, `(version, description)`, oldest first; none
/// before the first migration (no `_sqlx_migrations` table yet).
async fn applied(db: &Database, pool: &PgPool) -> anyhow::Result<Vec<(i64, String)>> {
    let read = async {
        let exists: bool =
            sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL").fetch_one(pool).await?;
        if !exists {
            return Ok(Vec::new());
        }
        sqlx::query_as("SELECT version, description FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(pool)
            .await
    };
    read.await
        .map_err(|e| anyhow!("{}", db.describe(&e)))
        .with_context(|| format!("Failed to list the applied migrations at {}", db.address()))
}

fn render_migrations(before: &[(i64, String)], after: &[(i64, String)]) -> String {
    let new: Vec<&(i64, String)> = after.iter().filter(|m| !before.contains(m)).collect();
    let mut out = String::new();
    if new.is_empty() {
        let n = after.len();
        out.push_str(&format!("schema up to date ({n} migration{} applied earlier)\n", if n == 1 { "" } else { "s" }));
    } else {
        for (version, description) in new {
            out.push_str(&format!("applied migration {version}: {description}\n"));
        }
    }
    out.push_str("audit trail partitions exist for this month and the next (UTC)\n");
    out
}

/// A single-threaded runtime: fleetctl runs one command at a time.
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("Failed to start the async runtime")
}

/// A Postgres database to connect to.
pub struct Database {
    /// Parsed from the URL; holds the credentials.
    options: PgConnectOptions,
    /// `host:port` (or `unix:DIR:port`): the only way messages name the server.
    address: String,
    /// The URL's password, raw and percent-decoded, so that an error text quoting it can be
    /// redacted.
    passwords: Vec<SecretString>,
}

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Database").field("address", &self.address).finish_non_exhaustive()
    }
}

impl Database {
    /// Parses `url`. An invalid URL is a [`UsageError`] that does not quote it.
    pub fn parse(url: &SecretString) -> Result<Self, UsageError> {
        let passwords = url_passwords(url.expose_secret());
        let options: PgConnectOptions = url.expose_secret().parse().map_err(|e: sqlx::Error| {
            UsageError::new(format!(
                "invalid database URL in --database-url or FLEET_DATABASE_URL (not shown: it may hold a \
                 password): {}; expected postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE",
                redact(&e.to_string(), &passwords)
            ))
        })?;
        let host = options.get_host();
        let address = if host.starts_with('/') {
            format!("unix:{host}:{}", options.get_port())
        } else {
            format!("{host}:{}", options.get_port())
        };
        Ok(Self { options, address, passwords })
    }

    /// `host:port`, for messages.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// A small pool, after one connection attempt that reports why it failed (a pool only
    /// says that it timed out).
    pub async fn connect(&self) -> anyhow::Result<PgPool> {
        let failed = |why: String| {
            anyhow!(
                "cannot connect to Postgres at {}: {why}; check that it is running and reachable, and that \
                 --database-url (or FLEET_DATABASE_URL) has the right host, port, user, password and database",
                self.address
            )
        };
        let probe = tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&self.options))
            .await
            .map_err(|_| failed(format!("no answer within {} seconds", CONNECT_TIMEOUT.as_secs())))?
            .map_err(|e| failed(self.describe(&e)))?;
        // Closing politely is a courtesy; the pool below is what matters.
        let _ = probe.close().await;
        PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect_with(self.options.clone())
            .await
            .map_err(|e| failed(self.describe(&e)))
    }

    /// A database error's text, cut to a sane length, with the URL's password redacted in
    /// case some layer ever quotes it.
    pub fn describe(&self, err: &(dyn std::error::Error + 'static)) -> String {
        let text: String = err.to_string().chars().take(500).collect();
        redact(&text, &self.passwords)
    }
}

fn redact(text: &str, passwords: &[SecretString]) -> String {
    passwords.iter().fold(text.to_owned(), |t, p| t.replace(p.expose_secret(), "**REDACTED**"))
}

/// The password of `scheme://user:password@host…`, as written and percent-decoded; also
/// a `password=` query parameter's.
fn url_passwords(url: &str) -> Vec<SecretString> {
    let mut found = Vec::new();
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if let Some((userinfo, _)) = authority.rsplit_once('@')
        && let Some((_, password)) = userinfo.split_once(':')
    {
        found.push(password.to_owned());
    }
    if let Some((_, query)) = rest.split_once('?') {
        for pair in query.split('&') {
            if let Some(("password", value)) = pair.split_once('=') {
                found.push(value.to_owned());
            }
        }
    }
    let decoded: Vec<String> = found.iter().map(|p| percent_decode(p)).collect();
    found.extend(decoded);
    found.retain(|p| !p.is_empty());
    found.sort();
    found.dedup();
    found.into_iter().map(SecretString::from).collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn messages_name_host_and_port_only() {
        let url = SecretString::from("postgres://owner:hunter2%21x@10.0.0.7:6543/fleet");
        let db = Database::parse(&url).unwrap();
        assert_eq!(db.address(), "10.0.0.7:6543");
        assert!(!format!("{db:?}").contains("hunter2"));
        let err = std::io::Error::other("server said hunter2!x and hunter2%21x");
        let text = db.describe(&err);
        assert!(!text.contains("hunter2") && text.contains("**REDACTED**"), "{text}");
    }

    #[test]
    fn the_default_port_is_named() {
        let db = Database::parse(&SecretString::from("postgres://u@db.internal/fleet")).unwrap();
        assert_eq!(db.address(), "db.internal:5432");
    }

    #[test]
    fn an_invalid_url_is_not_echoed() {
        let url = SecretString::from("postgres://owner:hunter2@host:notaport/fleet");
        let err = Database::parse(&url).unwrap_err().to_string();
        assert!(err.starts_with("invalid database URL") && !err.contains("hunter2"), "{err}");
    }

    #[test]
    fn passwords_are_found_in_the_userinfo_and_the_query() {
        let found: Vec<String> =
            url_passwords("postgres://u:p%40ss@h/d?password=q").iter().map(|s| s.expose_secret().to_owned()).collect();
        assert_eq!(found, ["p%40ss", "p@ss", "q"]);
        assert!(url_passwords("postgres://u@h/d").is_empty());
    }

    #[test]
    fn the_migration_report_lists_what_was_applied() {
        let init = (1, "init".to_owned());
        assert_eq!(
            render_migrations(&[], std::slice::from_ref(&init)),
            "applied migration 1: init\naudit trail partitions exist for this month and the next (UTC)\n"
        );
        let both = [init.clone()];
        assert!(render_migrations(&both, &both).starts_with("schema up to date (1 migration applied earlier)"));
    }
}
