//! `fleetctl audit anchor`, `fleetctl audit anchor-key new`, and the `--anchors` half of
//! `fleetctl audit verify`.
//!
//! The anchoring itself is the orchestrator's [`orchestrator::anchor`]: this module loads
//! the Ed25519 key, opens the sink, connects (read-only use of `audit_trail` and
//! `audit_head`), and runs [`anchor_now`] once or at an interval until SIGINT or SIGTERM,
//! retrying database and sink faults with backoff. docs/operations.md, "Anchoring the
//! audit trail", describes the threat model and the procedures.

use sqlx::postgres::PgListener;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::Args;
use orchestrator::anchor::sink::{self, AnchorSink, SinkError};
use orchestrator::anchor::{self as lib, AnchorKey, AnchorPublicKey, AnchorReport, anchor_now};
use serde_json::{Value, json};
use tokio::signal::unix::{SignalKind, signal};
use zeroize::Zeroizing;

use crate::db::{parse_secret, runtime};
use crate::exit::UsageError;
use crate::files::{self, Existing};
use crate::keys::warn_if_exposed;

const KEY_HINT: &str = "the anchor key file holds the 32-byte Ed25519 seed, raw or as 64 hex digits; create one \
                        with `fleetctl audit anchor-key new --out FILE`";
const PUBKEY_HINT: &str = "the anchor public key file holds 64 hex digits, as `fleetctl audit anchor-key new` \
                           wrote it (FILE.pub)";
/// The first retry waits this long; each further one twice as long, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How long a step under way may finish after SIGINT or SIGTERM.
const GRACE: Duration = Duration::from_secs(10);

/// Arguments of `audit anchor`.
#[derive(Debug, Args)]
pub struct AnchorArgs {
    /// The database, `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE`; a role with SELECT
    /// on audit_trail and audit_head is enough. Never printed: messages name only
    /// host:port. Or FLEET_DATABASE_URL_FILE, a file holding it.
    #[arg(long, value_name = "URL", env = "FLEET_DATABASE_URL", hide_env_values = true, value_parser = parse_secret)]
    pub database_url: Option<secrecy::SecretString>,

    /// Where anchors go: `file:/path/anchors.jsonl` (append-only file) or `git:/path/repo`
    /// (one commit per anchor; created bare when missing).
    #[arg(long, value_name = "SPEC")]
    pub sink: String,

    /// The Ed25519 key file (the 32-byte seed, raw or 64 hex digits).
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,

    /// Anchor at this interval until SIGINT or SIGTERM (`60s`, `5m`, `1h`; at least 1s).
    #[arg(long, value_name = "DURATION", value_parser = parse_interval, conflicts_with = "once")]
    pub every: Option<Duration>,

    /// Anchor once and exit (the default without --every).
    #[arg(long)]
    pub once: bool,
}

/// Arguments of `audit anchor-key new`.
#[derive(Debug, Args)]
pub struct AnchorKeyNewArgs {
    /// Where to write the key (64 hex digits, mode 0600); it must not exist yet.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,

    /// Where to write the public key (64 hex digits); FILE.pub by default.
    #[arg(long, value_name = "FILE")]
    pub public_out: Option<PathBuf>,
}

/// `60s`, `5m`, `1h`, `1500ms`, or a number of seconds.
fn parse_interval(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("'{text}' is not a duration like 60s, 5m or 1h"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(format!("'{text}' is not a duration like 60s, 5m or 1h")),
    };
    if d < Duration::from_secs(1) {
        return Err(format!("'{text}' is shorter than 1s"));
    }
    Ok(d)
}

fn load_key(path: &Path) -> Result<AnchorKey, UsageError> {
    let bytes =
        Zeroizing::new(fs::read(path).map_err(|e| {
            UsageError::new(format!("cannot read anchor key file '{}': {e}; {KEY_HINT}", path.display()))
        })?);
    warn_if_exposed(path, "anchor key file");
    AnchorKey::from_file_bytes(&bytes)
        .map_err(|why| UsageError::new(format!("invalid anchor key file '{}': {why}; {KEY_HINT}", path.display())))
}

/// The public key in `path`.
pub(crate) fn load_public_key(path: &Path) -> Result<AnchorPublicKey, UsageError> {
    let text = files::read_input(path, "anchor public key file", PUBKEY_HINT)?;
    AnchorPublicKey::from_hex(&text).map_err(|why| {
        UsageError::new(format!("invalid anchor public key file '{}': {why}; {PUBKEY_HINT}", path.display()))
    })
}

/// The sink a spec names; an invalid spec is a usage error.
pub(crate) fn open_sink(spec: &str) -> Result<Box<dyn AnchorSink>, UsageError> {
    sink::open(spec).map_err(|e| UsageError::new(e.to_string()))
}

/// `audit anchor-key new`.
pub fn key_new(args: &AnchorKeyNewArgs) -> anyhow::Result<()> {
    let public_path = args.public_out.clone().unwrap_or_else(|| {
        let mut name = args.out.clone().into_os_string();
        name.push(".pub");
        PathBuf::from(name)
    });
    for path in [&args.out, &public_path] {
        if path.symlink_metadata().is_ok() {
            return Err(UsageError::new(format!(
                "'{}' already exists; anchors signed with a key can only be checked with its public key: \
                 choose another --out",
                path.display()
            ))
            .into());
        }
    }
    let mut seed = Zeroizing::new([0u8; 32]);
    getrandom::fill(seed.as_mut())
        .context("Failed to read 32 bytes from the operating system's random number generator")?;
    let key = AnchorKey::from_seed(&seed);
    let mut text = key.seed_hex();
    text.push('\n');
    files::write_secret(&args.out, "anchor key file", text.as_bytes(), Existing::Refuse)?;
    let public = key.public().to_hex();
    files::write_secret(&public_path, "anchor public key file", format!("{public}\n").as_bytes(), Existing::Refuse)?;
    writeln!(
        io::stdout().lock(),
        "Wrote a new anchor key to '{}' (mode 0600, the Ed25519 seed as 64 hex digits) and its public key to '{}'.\n\
         public key: {public}\n\
         Only the anchoring process (`fleetctl audit anchor`) may hold the key: never the orchestrator, never the \
         database host. Give the public key to whoever verifies (`fleetctl audit verify --anchor-pubkey`) and keep \
         a copy with the operators.",
        args.out.display(),
        public_path.display()
    )
    .context("Failed to write to stdout")
}

/// `audit anchor`.
pub fn anchor(args: &AnchorArgs) -> anyhow::Result<()> {
    let key = load_key(&args.key)?;
    let sink = open_sink(&args.sink)?;
    let db = crate::db::from_args(args.database_url.clone())?;
    runtime()?.block_on(async {
        let Some(every) = args.every else {
            let pool = db.connect().await?;
            let result = anchor_now(&pool, &key, sink.as_ref()).await;
            pool.close().await;
            let appended = result.map_err(|e| anyhow!("{}", describe(&db, &e))).context("Failed to anchor")?;
            return report(&args.sink, &appended, true);
        };
        run_loop(&db, &key, sink.as_ref(), &args.sink, every).await
    })
}

/// Anchors every `every` until SIGINT or SIGTERM (a step under way gets [`GRACE`] to
/// finish). Database and sink faults are retried
/// with backoff (each wait racing the signals); a finding (the trail no longer matches
/// an anchor, or is broken) stops with exit 1, since an operator must look.
async fn run_loop(
    db: &crate::db::Database,
    key: &AnchorKey,
    sink: &dyn AnchorSink,
    spec: &str,
    every: Duration,
) -> anyhow::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt()).context("Failed to install the SIGINT handler")?;
    let mut terminate = signal(SignalKind::terminate()).context("Failed to install the SIGTERM handler")?;
    let stop = async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    };
    tokio::pin!(stop);
    let mut pool = None;
    let mut incidents: Option<PgListener> = None;
    let mut backoff = FIRST_BACKOFF;
    loop {
        let (outcome, stopping) = {
            let step = async {
                let p = match &pool {
                    Some(p) => p,
                    None => pool.insert(db.connect().await.map_err(|e| (true, e))?),
                };

                anchor_now(p, key, sink).await.map_err(|e| (e.is_transient(), anyhow!("{}", describe(db, &e))))
            };
            tokio::pin!(step);
            // A signal during a step lets it finish, within the grace period, so an anchor
            // already in the sink is also reported.
            let mut stopping = false;
            let outcome = tokio::select! {
                outcome = &mut step => outcome,
                () = &mut stop => {
                    stopping = true;
                    match tokio::time::timeout(GRACE, &mut step).await {
                        Ok(outcome) => outcome,
                        Err(_) => break,
                    }
                }
            };
            (outcome, stopping)
        };
        let wait = match outcome {
            Ok(appended) => {
                backoff = FIRST_BACKOFF;
                report(spec, &appended, false)?;
                every
            }
            Err((true, e)) => {
                let wait = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                crate::keys::warn(&format!("anchoring failed, retrying in {}s: {e:#}", wait.as_secs()));
                wait
            }
            Err((false, e)) => return Err(e.context("Failed to anchor; stopped")),
        };
        if stopping {
            break;
        }
        // An incident is anchored at once, not at the next interval: whoever rewrites the
        // trail after it must also get past an anchor taken right then.
        if pool.is_some() && incidents.is_none() {
            incidents = listen_for_incidents(db).await;
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            opened = next_incident(&mut incidents) => {
                writeln!(io::stdout().lock(), "incident {opened} opened: anchoring now").context("Failed to write to stdout")?;
            }
            () = &mut stop => break,
        }
    }
    if let Some(p) = pool {
        p.close().await;
    }
    writeln!(io::stdout().lock(), "stopped").context("Failed to write to stdout")
}

/// A listener on the orchestrator's `fleet_incident` notifications (sent when an incident
/// is opened); `None` when it can't listen, and then anchoring keeps to its interval.
async fn listen_for_incidents(db: &crate::db::Database) -> Option<PgListener> {
    // A pool of its own: the listener keeps its connection for good, and anchoring needs
    // the other pool's connections.
    let listen = async {
        let pool = db.connect().await?;
        let mut l = PgListener::connect_with(&pool).await?;
        l.listen("fleet_incident").await?;
        Ok::<_, anyhow::Error>(l)
    };
    match listen.await {
        Ok(l) => Some(l),
        Err(e) => {
            crate::keys::warn(&format!("cannot listen for incidents ({e}); anchoring at the interval only"));
            None
        }
    }
}

/// The next incident id notified; never resolves without a listener. A lost connection
/// drops the listener (the next round makes a new one) and waits for the interval.
async fn next_incident(listener: &mut Option<PgListener>) -> String {
    let Some(l) = listener else { return std::future::pending().await };
    match l.try_recv().await {
        Ok(Some(n)) => n.payload().chars().take(64).collect(),
        Ok(None) | Err(_) => {
            *listener = None;
            std::future::pending().await
        }
    }
}

/// An anchoring error's text, database errors through [`crate::db::Database::describe`].
fn describe(db: &crate::db::Database, e: &lib::AnchorError) -> String {
    match e {
        lib::AnchorError::Db(inner) => {
            format!("cannot read the audit trail at {}: {}", db.address(), db.describe(inner))
        }
        other => other.to_string(),
    }
}

fn report(spec: &str, appended: &[lib::Appended], once: bool) -> anyhow::Result<()> {
    let mut out = String::new();
    for a in appended {
        out.push_str(&format!(
            "anchored seq {} as anchor {} (rows {}..={}) in {spec}\n",
            a.seq, a.n, a.first_seq, a.seq
        ));
    }
    if appended.is_empty() && once {
        out.push_str("nothing new to anchor since the last anchor\n");
    }
    io::stdout().lock().write_all(out.as_bytes()).context("Failed to write to stdout")
}

/// Reads every anchor from `sink`; a sink that can't be read is an error (exit 1).
pub(crate) fn read_sink(sink: &dyn AnchorSink) -> anyhow::Result<Vec<sink::StoredAnchor>> {
    sink.read_all().map_err(|e: SinkError| anyhow!("{e}")).context("Failed to read the anchors")
}

/// The text lines of an anchor report.
pub(crate) fn to_text(r: &AnchorReport) -> String {
    let mut out = match r.last {
        Some((n, seq, at)) => format!(
            "anchors: {} good, the last (anchor {n}) at seq {seq}, {}; {} rows after it not yet anchored\n",
            r.anchors,
            lib::timestamp(&at),
            r.unanchored()
        ),
        None => format!("anchors: none good; {} rows not yet anchored\n", r.unanchored()),
    };
    if let Some(p) = &r.problem {
        out.push_str(&format!("anchor problem: {}\n", p.message()));
    }
    if let Some(w) = &r.rewritten {
        out.push_str(&format!("rewritten: {}\n", rewritten_message(w)));
        out.push_str(&format!(
            "  anchored hash {}  database hash {}\n",
            w.anchored,
            w.found.as_deref().unwrap_or("(row missing)")
        ));
    }
    out
}

fn rewritten_message(w: &lib::Rewritten) -> String {
    match w.found {
        Some(_) => format!(
            "first rewritten row is seq {}: its hash differs from what anchor {} ({}) committed to; every later \
             row's hash was recomputed",
            w.seq, w.anchor, w.place
        ),
        None => format!(
            "first rewritten row is seq {}: the row is gone, though anchor {} ({}) committed to it",
            w.seq, w.anchor, w.place
        ),
    }
}

/// The `anchors` member of `verify --json`.
pub(crate) fn to_json(r: &AnchorReport) -> Value {
    json!({
        "ok": r.ok(),
        "count": r.anchors,
        "last_n": r.last.map(|l| l.0),
        "last_seq": r.last.map(|l| l.1),
        "last_at": r.last.map(|l| lib::timestamp(&l.2)),
        "head_seq": r.head_seq,
        "unanchored": r.unanchored(),
        "problem": r.problem.as_ref().map(|p| {
            let mut v = serde_json::to_value(p).unwrap_or(Value::Null);
            v["message"] = Value::from(p.message());
            v
        }),
        "rewritten": r.rewritten.as_ref().map(|w| json!({
            "seq": w.seq,
            "anchor": w.anchor,
            "place": w.place,
            "anchored": w.anchored,
            "found": w.found,
            "message": rewritten_message(w),
        })),
    })
}

/// What `verify` puts on stderr when the anchors do not check out.
pub(crate) fn failure(r: &AnchorReport) -> Option<String> {
    if let Some(w) = &r.rewritten {
        return Some(format!("the audit trail was rewritten: the first rewritten row is seq {}", w.seq));
    }
    r.problem.as_ref().map(|p| format!("the anchors do not check out: {}", p.message()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn intervals_have_units() {
        assert_eq!(parse_interval("60s").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_interval("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_interval("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_interval("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_interval("1500ms").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_interval("500ms").unwrap_err(), "'500ms' is shorter than 1s");
        assert_eq!(parse_interval("soon").unwrap_err(), "'soon' is not a duration like 60s, 5m or 1h");
        assert!(parse_interval("10d").is_err() && parse_interval("").is_err() && parse_interval("-1s").is_err());
        assert!(parse_interval("99999999999999999999s").is_err());
    }
}
