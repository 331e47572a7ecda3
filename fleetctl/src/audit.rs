//! `fleetctl audit …`: verifying the orchestrator's hash-chained audit trail, and making
//! the key its rows are authenticated with. Anchoring (`audit anchor`, `audit anchor-key`,
//! `verify --anchors`) is [`crate::anchor`].
//!
//! The walk itself is the orchestrator's [`orchestrator::audit::verify`]; this module loads
//! the key, connects (see [`crate::db::Database`]), and turns the report into a line an
//! operator can act on, or one JSON object. docs/operations.md, "Audit trail", describes
//! the construction and the procedures.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand};
use orchestrator::audit::{AuditKey, Break, BrokenRow, Report};
use serde_json::{Value, json};
use zeroize::Zeroizing;

use crate::db::{parse_secret, runtime};
use crate::exit::UsageError;
use crate::files::{self, Existing};
use crate::keys::warn_if_exposed;

/// Bytes of a new audit key.
const KEY_LEN: usize = 32;

const KEY_HINT: &str = "the orchestrator's audit key file holds at least 32 bytes as hex; create one with \
                        `fleetctl audit key new --out FILE`";

/// `fleetctl audit …`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Walk the whole audit trail and name the first row that was changed, removed or forged.
    ///
    /// Each row's hash covers its content and the previous row's hash, and its MAC is an
    /// HMAC of that hash with the audit key, so only the orchestrator (which holds the key)
    /// can write rows that verify. The walk goes through every row in seq order, across the
    /// monthly partitions, in one consistent snapshot (safe while the orchestrator appends),
    /// and stops at the first broken row, with one of these reasons:
    ///
    /// - content: row content changed since it was written.
    ///
    /// - gap, chain: chain broken: previous row missing or reordered.
    ///
    /// - mac: MAC invalid: hash recomputed without the audit key (or the wrong key file).
    ///
    /// - truncated: rows missing at the end: the head says there were more.
    ///
    /// - beyond_head: rows after the head's seq (added without moving it, or the head set
    ///   back).
    ///
    /// Intact: prints "intact: N rows", exit 0. Broken: prints the row (seq, time, action,
    /// task, actor) and the reason, exit 1. 64 for a usage error (missing, unreadable or
    /// invalid key file; invalid URL), 1 when Postgres can't be reached. The role needs
    /// SELECT on audit_trail and audit_head only.
    ///
    /// With --anchors SPEC --anchor-pubkey FILE it also checks every anchor in the sink
    /// (whole line, Ed25519 signature under the public key, numbered and chained after the
    /// previous one, seqs increasing) and compares the hash of every anchored row with the
    /// database: a superuser holding the audit key can recompute the chain so the walk
    /// passes, but not the anchors. It prints "anchors: N good, the last (anchor N) at seq
    /// S, TIME; K rows after it not yet anchored", then, when something is wrong, "anchor
    /// problem: …" (cut, malformed, forged, removed or reordered anchor) and "rewritten:
    /// first rewritten row is seq K: …"; exit 1 for either.
    Verify(VerifyArgs),

    /// Sign the trail's head with the anchor key and append it to a sink outside Postgres.
    ///
    /// Each anchor commits to the head (seq, hash), the hash of every row since the
    /// previous anchor, and the previous anchor; it is signed with Ed25519 by a key only
    /// this process holds. Before anchoring it checks that the database still holds the
    /// last anchored row with the anchored hash and that the new rows chain and hash
    /// correctly (no audit key needed). Once by default; with --every, at that interval
    /// until SIGINT or SIGTERM (exit 0), retrying database and sink faults with backoff.
    /// Exit 1 when the trail no longer matches the last anchor or is broken (an operator
    /// must look), 64 for a usage error. The role needs SELECT on audit_trail and
    /// audit_head only.
    Anchor(crate::anchor::AnchorArgs),

    /// Manage the audit key.
    #[command(subcommand)]
    Key(KeyCommand),

    /// Manage the anchor key (Ed25519).
    #[command(subcommand)]
    AnchorKey(AnchorKeyCommand),
}

/// `fleetctl audit anchor-key …`
#[derive(Debug, Subcommand)]
pub enum AnchorKeyCommand {
    /// Write a new Ed25519 anchor key (its 32-byte seed from the OS random generator, as 64
    /// hex digits, mode 0600) and its public key (FILE.pub, or --public-out), and print the
    /// public key. Never overwrites an existing file.
    New(crate::anchor::AnchorKeyNewArgs),
}

/// `fleetctl audit key …`
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Write a new audit key: 32 bytes from the OS random generator, as 64 hex digits.
    ///
    /// The orchestrator authenticates every audit row with it (`audit_key_file` in its
    /// configuration), and `fleetctl audit verify` needs it. The file is written with mode
    /// 0600 and never overwrites an existing one: rows written with a key can only be
    /// verified with that key, so keep a copy with the operators.
    New(KeyNewArgs),
}

/// Arguments of `audit verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The database, `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE`. Never printed:
    /// messages name only host:port.
    /// Or FLEET_DATABASE_URL_FILE, a file holding it.
    #[arg(long, value_name = "URL", env = "FLEET_DATABASE_URL", hide_env_values = true, value_parser = parse_secret)]
    pub database_url: Option<secrecy::SecretString>,

    /// The audit key file (hex, at least 32 bytes), as given to the orchestrator.
    #[arg(long, value_name = "FILE")]
    pub audit_key_file: PathBuf,

    /// Print one JSON object: intact, rows, and broken (null, or seq, reason, message, at,
    /// action, task_id, actor_role, actor_instance, expected_seq, head_seq); with
    /// --anchors also anchors (ok, count, last_n, last_seq, last_at, head_seq, unanchored,
    /// problem, rewritten), and intact is then true only when the anchors check out too.
    #[arg(long)]
    pub json: bool,

    /// Also check the anchors in this sink (`file:/path/anchors.jsonl`, `git:/path/repo`).
    #[arg(long, value_name = "SPEC", requires = "anchor_pubkey")]
    pub anchors: Option<String>,

    /// The anchor public key file (64 hex digits), as `audit anchor-key new` wrote it.
    #[arg(long, value_name = "FILE", requires = "anchors")]
    pub anchor_pubkey: Option<PathBuf>,

    /// When the check fails, open a critical incident through the API (trigger
    /// `audit_verify`; it freezes every merge and alerts). Needs an operator token
    /// (FLEET_TOKEN) and the API (FLEET_API_URL). For a scheduled verify.
    #[arg(long)]
    pub open_incident: bool,

    #[command(flatten)]
    pub api: crate::client::ApiArgs,
}

/// Arguments of `audit key new`.
#[derive(Debug, Args)]
pub struct KeyNewArgs {
    /// Where to write the key; it must not exist yet.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// Runs one `audit` subcommand.
pub fn run(cmd: AuditCommand) -> anyhow::Result<()> {
    match cmd {
        AuditCommand::Verify(args) => verify(&args),
        AuditCommand::Key(KeyCommand::New(args)) => key_new(&args),
        AuditCommand::Anchor(args) => crate::anchor::anchor(&args),
        AuditCommand::AnchorKey(AnchorKeyCommand::New(args)) => crate::anchor::key_new(&args),
    }
}

fn verify(args: &VerifyArgs) -> anyhow::Result<()> {
    let key = load_key(&args.audit_key_file)?;
    let anchors = match (&args.anchors, &args.anchor_pubkey) {
        (Some(spec), Some(pubkey)) => {
            let public = crate::anchor::load_public_key(pubkey)?;
            let sink = crate::anchor::open_sink(spec)?;
            Some((public, sink))
        }
        _ => None,
    };
    let db = crate::db::from_args(args.database_url.clone())?;
    let (report, anchored) = runtime()?.block_on(async {
        let stored = anchors.as_ref().map(|(_, sink)| crate::anchor::read_sink(sink.as_ref())).transpose()?;
        let pool = db.connect().await?;
        let report = orchestrator::audit::verify(&pool, &key)
            .await
            .map_err(|e| anyhow!("{}", db.describe(&e)))
            .with_context(|| format!("Failed to read the audit trail at {}", db.address()))?;
        let anchored = match (&anchors, &stored) {
            (Some((public, _)), Some(stored)) => Some(
                orchestrator::anchor::verify_anchors(&pool, stored, public)
                    .await
                    .map_err(|e| anyhow!("{}", db.describe(&e)))
                    .with_context(|| format!("Failed to compare the anchors with the trail at {}", db.address()))?,
            ),
            _ => None,
        };
        pool.close().await;
        Ok::<_, anyhow::Error>((report, anchored))
    })?;
    let text = if args.json {
        let mut v = to_json(&report);
        if let Some(a) = &anchored {
            v["intact"] = Value::from(report.first_broken.is_none() && a.ok());
            v["anchors"] = crate::anchor::to_json(a);
        }
        format!("{v}\n")
    } else {
        let mut text = to_text(&report);
        if let Some(a) = &anchored {
            text.push_str(&crate::anchor::to_text(a));
        }
        text
    };
    io::stdout().lock().write_all(text.as_bytes()).context("Failed to write to stdout")?;
    let mut failures = Vec::new();
    if let Some((seq, why)) = &report.first_broken {
        failures.push(format!("the audit trail is broken at seq {seq}: {}", message(why)));
    }
    failures.extend(anchored.as_ref().and_then(crate::anchor::failure));
    if failures.is_empty() {
        return Ok(());
    }
    let found = failures.join("; ");
    if args.open_incident {
        let mut details = to_json(&report);
        if let Some(a) = &anchored {
            details["anchors"] = crate::anchor::to_json(a);
        }
        details["database"] = Value::from(db.address());
        match open_incident(&args.api, &found, details) {
            Ok(id) => crate::keys::warn(&format!("opened incident {id}: `fleetctl incident show {id}`")),
            // The finding stands whatever the API says; the exit code carries it.
            Err(e) => crate::keys::warn(&format!("could not open an incident: {e:#}")),
        }
    }
    bail!("{found}")
}

/// Opens the critical `audit_verify` incident for `found`; its id.
fn open_incident(api: &crate::client::ApiArgs, found: &str, details: Value) -> anyhow::Result<String> {
    let client = crate::client::Client::new(api)?;
    let title: String = format!("audit verify failed: {found}").chars().take(200).collect();
    let body = serde_json::json!({
        "severity": "critical",
        "trigger": "audit_verify",
        "title": title,
        "details": details,
    });
    let incident = runtime()?.block_on(client.post("v1/incidents", Some(&body)))?;
    Ok(incident.get("id").and_then(Value::as_str).unwrap_or("-").to_owned())
}

fn load_key(path: &Path) -> Result<AuditKey, UsageError> {
    let text = files::read_input(path, "audit key file", KEY_HINT)?;
    warn_if_exposed(path, "audit key file");
    AuditKey::from_hex(&text)
        .map_err(|why| UsageError::new(format!("invalid audit key file '{}': {why}; {KEY_HINT}", path.display())))
}

fn key_new(args: &KeyNewArgs) -> anyhow::Result<()> {
    let path = &args.out;
    if path.symlink_metadata().is_ok() {
        return Err(UsageError::new(format!(
            "audit key file '{}' already exists; rows written with that key can only be verified with it: \
             choose another --out",
            path.display()
        ))
        .into());
    }
    let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
    getrandom::fill(bytes.as_mut())
        .context("Failed to read 32 bytes from the operating system's random number generator")?;
    let mut text = Zeroizing::new(hex::encode(bytes.as_ref()));
    text.push('\n');
    files::write_secret(path, "audit key file", text.as_bytes(), Existing::Refuse)?;
    writeln!(
        io::stdout().lock(),
        "Wrote a new audit key to '{}' (mode 0600, 32 bytes as 64 hex digits).\n\
         Give it to the orchestrator (`audit_key_file`) and keep a copy with the operators: the trail's \
         rows can be verified only with the key they were written with (`fleetctl audit verify`).",
        path.display()
    )
    .context("Failed to write to stdout")
}

/// What an operator reads for each kind of break.
fn message(why: &Break) -> String {
    match why {
        Break::Content => "row content changed since it was written".to_owned(),
        Break::Gap { expected } => {
            format!("chain broken: previous row missing or reordered (seq {expected} is missing)")
        }
        Break::Chain => {
            "chain broken: previous row missing or reordered (its prev_hash is not the previous row's hash)".to_owned()
        }
        Break::Mac => "MAC invalid: hash recomputed without the audit key (or this is not the trail's key)".to_owned(),
        Break::Truncated { head_seq } => format!("rows missing at the end: head says {head_seq}"),
        Break::BeyondHead { head_seq } => {
            format!("row beyond the head: head says {head_seq} (rows added without moving it, or the head set back)")
        }
    }
}

/// The machine-readable name of a break.
fn reason(why: &Break) -> &'static str {
    match why {
        Break::Content => "content",
        Break::Gap { .. } => "gap",
        Break::Chain => "chain",
        Break::Mac => "mac",
        Break::Truncated { .. } => "truncated",
        Break::BeyondHead { .. } => "beyond_head",
    }
}

fn timestamp(row: &BrokenRow) -> String {
    row.at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn to_text(report: &Report) -> String {
    let Some((seq, why)) = &report.first_broken else {
        return format!("intact: {} rows\n", report.rows);
    };
    let mut out = format!("broken at seq {seq}: {}\n", message(why));
    match &report.broken_row {
        Some(row) => {
            let task = row.task_id.map_or_else(|| "-".to_owned(), |t| t.to_string());
            out.push_str(&format!(
                "  at {}  action {}  task {task}  actor {}/{}\n",
                timestamp(row),
                row.action,
                row.actor_role,
                row.actor_instance
            ));
        }
        None => out.push_str(&format!("  the trail ends at seq {}\n", seq - 1)),
    }
    out.push_str(&format!("{} rows checked\n", report.rows));
    out
}

fn to_json(report: &Report) -> Value {
    let broken = report.first_broken.as_ref().map(|(seq, why)| {
        let row = report.broken_row.as_ref();
        json!({
            "seq": seq,
            "reason": reason(why),
            "message": message(why),
            "at": row.map(timestamp),
            "action": row.map(|r| &r.action),
            "task_id": row.and_then(|r| r.task_id),
            "actor_role": row.map(|r| &r.actor_role),
            "actor_instance": row.map(|r| &r.actor_instance),
            "expected_seq": match why { Break::Gap { expected } => Some(*expected), _ => None },
            "head_seq": match why {
                Break::Truncated { head_seq } | Break::BeyondHead { head_seq } => Some(*head_seq),
                _ => None,
            },
        })
    });
    json!({"intact": broken.is_none(), "rows": report.rows, "broken": broken})
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use chrono::TimeZone;

    use super::*;

    fn broken(why: Break, row: bool) -> Report {
        Report {
            rows: 3,
            first_broken: Some((3, why)),
            broken_row: row.then(|| BrokenRow {
                at: chrono::Utc.timestamp_micros(1_700_000_000_123_456).unwrap(),
                actor_role: "orchestrator".into(),
                actor_instance: "orchestrator-0".into(),
                action: "task.transition".into(),
                task_id: None,
            }),
        }
    }

    #[test]
    fn an_intact_trail_is_one_line() {
        let report = Report { rows: 5, first_broken: None, broken_row: None };
        assert_eq!(to_text(&report), "intact: 5 rows\n");
        assert_eq!(to_json(&report), json!({"intact": true, "rows": 5, "broken": null}));
    }

    #[test]
    fn a_broken_row_is_named() {
        let text = to_text(&broken(Break::Content, true));
        assert_eq!(
            text,
            "broken at seq 3: row content changed since it was written\n  at 2023-11-14T22:13:20.123456Z  \
             action task.transition  task -  actor orchestrator/orchestrator-0\n3 rows checked\n"
        );
        let v = to_json(&broken(Break::Gap { expected: 2 }, true));
        assert_eq!(v["broken"]["reason"], "gap");
        assert_eq!(v["broken"]["expected_seq"], 2);
        assert_eq!(v["broken"]["at"], "2023-11-14T22:13:20.123456Z");
        let v = to_json(&broken(Break::Truncated { head_seq: 5 }, false));
        assert_eq!((v["broken"]["head_seq"].as_i64(), v["broken"]["at"].is_null()), (Some(5), true));
        assert!(to_text(&broken(Break::Truncated { head_seq: 5 }, false)).contains("the trail ends at seq 2"));
    }
}
