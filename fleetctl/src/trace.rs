//! `fleetctl trace TASK`: one task's steps with their timings, from its history and its
//! audit trail in Postgres (read-only).
//!
//! Each step is a stay in one state, from the transition into it to the transition out
//! (`task_events`), with the role that worked it, the model calls it paid for
//! (`tool.llm.complete` audit rows: model, tokens, prompt version), the agent's tool calls
//! the worker's policy refused (`tool.call.refused`) and the tool-proxy refusals
//! (`tool.refused`). Below the steps, every event in time order.

use std::io::Write as _;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::Args;
use secrecy::SecretString;
use serde_json::{Value, json};
use sqlx::Row as _;
use uuid::Uuid;

use crate::exit::UsageError;

/// Arguments of `trace`.
#[derive(Debug, Args)]
pub struct TraceArgs {
    /// The task's id.
    pub task: Uuid,

    /// The database, `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE` (a read-only role is
    /// enough), or FLEET_DATABASE_URL_FILE, a file holding it. Never printed.
    #[arg(long, value_name = "URL", env = "FLEET_DATABASE_URL", hide_env_values = true,
          value_parser = |v: &str| Ok::<_, std::convert::Infallible>(SecretString::from(v)))]
    pub database_url: Option<SecretString>,

    /// One JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// One row of the task's history or audit trail.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// When.
    pub at: DateTime<Utc>,
    /// `transition`, or the audit action.
    pub kind: String,
    /// Who (role/instance), for audit rows.
    pub actor: String,
    /// Transition: from state.
    pub from: Option<String>,
    /// Transition: to state.
    pub to: Option<String>,
    /// The row's details.
    pub detail: Value,
    /// Model calls: the prompt version.
    pub prompt_version: Option<String>,
}

/// One stay in a state.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// The state (`dev`, `qa`, …).
    pub state: String,
    /// When it was entered.
    pub start: DateTime<Utc>,
    /// When it was left (`None`: the task is still there).
    pub end: Option<DateTime<Utc>>,
    /// The state it went to, and why (`result`, `retry`, …).
    pub next: Option<(String, String)>,
    /// Model calls paid for in it.
    pub model_calls: u64,
    /// Their tokens, input plus output.
    pub tokens: u64,
    /// Agent tool calls refused by the worker's policy.
    pub refused_calls: u64,
    /// Requests refused by the tool proxy.
    pub proxy_refusals: u64,
}

/// The steps of a task from its events (in time order).
pub fn steps(events: &[Event]) -> Vec<Step> {
    let mut out: Vec<Step> = Vec::new();
    for e in events {
        if e.kind == "transition" {
            if let Some(last) = out.last_mut()
                && last.end.is_none()
            {
                last.end = Some(e.at);
                let cause = e.detail.get("cause").and_then(Value::as_str).unwrap_or("").to_owned();
                last.next = Some((e.to.clone().unwrap_or_default(), cause));
            }
            out.push(Step {
                state: e.to.clone().unwrap_or_default(),
                start: e.at,
                end: None,
                next: None,
                model_calls: 0,
                tokens: 0,
                refused_calls: 0,
                proxy_refusals: 0,
            });
            continue;
        }
        let Some(step) = out.last_mut() else { continue };
        match e.kind.as_str() {
            "tool.llm.complete" => {
                step.model_calls += 1;
                let n = |k: &str| e.detail.get(k).and_then(Value::as_u64).unwrap_or(0);
                step.tokens += n("input_tokens") + n("output_tokens");
            }
            "tool.call.refused" => step.refused_calls += 1,
            "tool.refused" => step.proxy_refusals += 1,
            _ => {}
        }
    }
    out
}

fn secs(d: chrono::TimeDelta) -> String {
    format!("{:.3}s", d.num_milliseconds() as f64 / 1000.0)
}

/// The text `trace` prints.
pub fn render(task: Uuid, title: &str, state: &str, events: &[Event]) -> String {
    let mut out = String::new();
    let t0 = events.first().map(|e| e.at);
    let total = match (events.first(), events.last()) {
        (Some(a), Some(b)) => secs(b.at - a.at),
        _ => "-".into(),
    };
    out.push_str(&format!("task {task} {title:?}: {state} (first to last event {total})\n\n"));
    out.push_str(&format!(
        "{:<10} {:>10} {:>10} {:>6} {:>8} {:>8} {:>8}  NEXT\n",
        "STEP", "START", "DURATION", "CALLS", "TOKENS", "REFUSED", "PROXY"
    ));
    for s in steps(events) {
        let start = t0.map_or_else(|| "-".into(), |t| format!("+{}", secs(s.start - t)));
        let dur = s.end.map_or_else(|| "(now)".into(), |e| secs(e - s.start));
        let next = s.next.as_ref().map_or_else(String::new, |(to, cause)| format!("→ {to} ({cause})"));
        let line = format!(
            "{:<10} {:>10} {:>10} {:>6} {:>8} {:>8} {:>8}  {next}",
            s.state, start, dur, s.model_calls, s.tokens, s.refused_calls, s.proxy_refusals
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out.push_str("\nEVENTS\n");
    for e in events {
        let at = t0.map_or_else(|| "-".into(), |t| format!("+{}", secs(e.at - t)));
        let what = if e.kind == "transition" {
            format!("{} → {}", e.from.as_deref().unwrap_or("-"), e.to.as_deref().unwrap_or("-"))
        } else {
            let d = &e.detail;
            let brief = match e.kind.as_str() {
                "tool.llm.complete" => format!(
                    "model {} {}+{} tokens{}",
                    d.get("model").and_then(Value::as_str).unwrap_or("?"),
                    d.get("input_tokens").and_then(Value::as_u64).unwrap_or(0),
                    d.get("output_tokens").and_then(Value::as_u64).unwrap_or(0),
                    e.prompt_version.as_deref().map(|v| format!(" prompt {v}")).unwrap_or_default()
                ),
                "tool.pkg_install" => format!(
                    "install permitted from {} (sha256 {})",
                    d.get("lockfiles")
                        .and_then(Value::as_array)
                        .map(|l| l.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", "))
                        .unwrap_or_default(),
                    d.get("digest")
                        .and_then(Value::as_str)
                        .map(|h| h.chars().take(12).collect::<String>())
                        .unwrap_or_default()
                ),
                "tool.call.refused" => format!(
                    "{} {} refused: {}",
                    d.get("tool").and_then(Value::as_str).unwrap_or("?"),
                    d.get("args").and_then(Value::as_str).unwrap_or(""),
                    d.get("reason").and_then(Value::as_str).unwrap_or("")
                ),
                _ => {
                    let text = d.to_string();
                    text.chars().take(120).collect()
                }
            };
            format!("{} by {}: {}", e.kind, e.actor, telemetry::redact(&brief))
        };
        out.push_str(&format!("{at:>10}  {what}\n"));
    }
    out
}

/// Reads the task and its events.
pub async fn read(pool: &sqlx::PgPool, task: Uuid) -> anyhow::Result<Option<(String, String, Vec<Event>)>> {
    let Some(row) = sqlx::query("SELECT title, state FROM tasks WHERE id = $1").bind(task).fetch_optional(pool).await?
    else {
        return Ok(None);
    };
    let (title, state): (String, String) = (row.try_get("title")?, row.try_get("state")?);
    let mut events: Vec<Event> =
        sqlx::query("SELECT at, from_state, to_state, cause, detail FROM task_events WHERE task_id = $1 ORDER BY seq")
            .bind(task)
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|r| {
                let mut detail: Value = r.try_get("detail")?;
                if let Value::Object(m) = &mut detail {
                    m.insert("cause".into(), Value::String(r.try_get("cause")?));
                }
                Ok(Event {
                    at: r.try_get("at")?,
                    kind: "transition".into(),
                    actor: String::new(),
                    from: r.try_get("from_state")?,
                    to: Some(r.try_get("to_state")?),
                    detail,
                    prompt_version: None,
                })
            })
            .collect::<Result<_, sqlx::Error>>()?;
    let audit = sqlx::query(
        "SELECT at, action, actor_role, actor_instance, details, prompt_version FROM audit_trail \
         WHERE task_id = $1 ORDER BY seq",
    )
    .bind(task)
    .fetch_all(pool)
    .await?;
    for r in audit {
        let role: String = r.try_get("actor_role")?;
        let instance: String = r.try_get("actor_instance")?;
        events.push(Event {
            at: r.try_get("at")?,
            kind: r.try_get("action")?,
            actor: format!("{role}/{instance}"),
            from: None,
            to: None,
            detail: r.try_get("details")?,
            prompt_version: r.try_get("prompt_version")?,
        });
    }
    // Stable: a transition and the audit row of the same transaction keep their order.
    events.sort_by_key(|e| e.at);
    Ok(Some((title, state, events)))
}

/// `fleetctl trace`.
pub fn command(args: TraceArgs) -> anyhow::Result<()> {
    let db = crate::db::from_args(args.database_url.clone())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("Failed to start the async runtime")?;
    let found = runtime.block_on(async {
        let pool = db.connect().await?;
        let found = read(&pool, args.task)
            .await
            .map_err(|e| anyhow::anyhow!("{}", db.describe(e.as_ref())))
            .with_context(|| format!("Failed to read the task's history at {}", db.address()))?;
        pool.close().await;
        Ok::<_, anyhow::Error>(found)
    })?;
    let Some((title, state, events)) = found else {
        return Err(UsageError::new(format!("no task {} in this database", args.task)).into());
    };
    let text = if args.json {
        let steps: Vec<Value> = steps(&events)
            .iter()
            .map(|s| {
                json!({
                    "state": s.state, "start": s.start.to_rfc3339(), "end": s.end.map(|e| e.to_rfc3339()),
                    "duration_ms": s.end.map(|e| (e - s.start).num_milliseconds()),
                    "next": s.next.as_ref().map(|(to, cause)| json!({"state": to, "cause": cause})),
                    "model_calls": s.model_calls, "tokens": s.tokens,
                    "refused_calls": s.refused_calls, "proxy_refusals": s.proxy_refusals,
                })
            })
            .collect();
        format!("{}\n", json!({"task": args.task, "title": telemetry::redact(&title), "state": state, "steps": steps}))
    } else {
        render(args.task, &telemetry::redact(&title), &state, &events)
    };
    std::io::stdout().lock().write_all(text.as_bytes()).context("Failed to write to stdout")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_800_000_000_000 + ms).unwrap()
    }

    fn transition(ms: i64, from: Option<&str>, to: &str, cause: &str) -> Event {
        Event {
            at: at(ms),
            kind: "transition".into(),
            actor: String::new(),
            from: from.map(str::to_owned),
            to: Some(to.into()),
            detail: json!({"cause": cause}),
            prompt_version: None,
        }
    }

    fn audit(ms: i64, kind: &str, detail: Value) -> Event {
        Event {
            at: at(ms),
            kind: kind.into(),
            actor: "dev/dev-1".into(),
            from: None,
            to: None,
            detail,
            prompt_version: None,
        }
    }

    #[test]
    fn steps_count_their_model_calls_and_refusals() {
        let events = vec![
            transition(0, None, "submitted", "submit"),
            transition(5, Some("submitted"), "dev", "assign"),
            audit(100, "tool.llm.complete", json!({"input_tokens": 600, "output_tokens": 20})),
            audit(200, "tool.llm.complete", json!({"input_tokens": 700, "output_tokens": 30})),
            audit(300, "tool.call.refused", json!({"tool": "read_file", "args": "path=\".env\"", "reason": "no"})),
            transition(1_500, Some("dev"), "qa", "result"),
        ];
        let s = steps(&events);
        assert_eq!(s.len(), 3);
        assert_eq!((s[1].state.as_str(), s[1].model_calls, s[1].tokens, s[1].refused_calls), ("dev", 2, 1350, 1));
        assert_eq!(s[1].end, Some(at(1_500)));
        assert_eq!(s[1].next, Some(("qa".into(), "result".into())));
        assert_eq!((s[2].state.as_str(), s[2].end), ("qa", None));
        let text = render(Uuid::nil(), "Fix add()", "qa", &events);
        assert!(
            text.contains("\ndev           +0.005s     1.495s      2     1350        1        0  → qa (result)\n"),
            "{text}"
        );
        assert!(text.contains("\nqa            +1.500s      (now)      0        0        0        0\n"), "{text}");
        assert!(text.contains("read_file path=\".env\" refused: no"), "{text}");
    }
}
