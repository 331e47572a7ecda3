//! The task commands over the HTTP API: `submit`, `tasks`, `task`, `approve`, `questions`,
//! `answer`, `cancel`, `retry`, `kill`, `resume`. Each runs one request on a small runtime and prints the answer: a line or a
//! table for people, the server's JSON with `--json`.

use std::io::{self, Write};
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use orchestrator::state::TaskState;
use orchestrator::tasks::NewTask;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::client::{ApiArgs, Client};
use crate::exit::UsageError;
use crate::files;

const TASK_FILE_HINT: &str = "a task file is a JSON object with `title` and `instructions`, and optionally `repository`, \
     `test_command`, `risk` (LOW, MEDIUM, HIGH or CRITICAL; LOW by default) and `scope` (paths the task may change)";

/// Arguments of `submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The task, as JSON: {"title": …, "instructions": …, "repository": …, "test_command": …,
    /// "risk": "LOW", "scope": ["src/"]}; title and instructions are required.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,

    /// Print the created task as JSON instead of its id and state.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub api: ApiArgs,
}

/// Arguments of `tasks`.
#[derive(Debug, Args)]
pub struct TasksArgs {
    /// Only tasks in this state: submitted, dev, qa, review, refactor, approved, merged,
    /// failed, blocked, awaiting_approval, halted or cancelled.
    #[arg(long, value_name = "STATE", value_parser = parse_state)]
    pub state: Option<TaskState>,

    /// At most N tasks, newest first.
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: u32,

    /// Print the tasks as a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub api: ApiArgs,
}

/// Arguments of `task`.
#[derive(Debug, Args)]
pub struct TaskArgs {
    /// The task's id (a UUID).
    #[arg(value_name = "ID")]
    pub id: Uuid,

    /// Print the task as JSON.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub api: ApiArgs,
}

/// Arguments of `approve`.
#[derive(Debug, Args)]
pub struct ApproveArgs {
    /// The task's id (a UUID).
    #[arg(value_name = "ID")]
    pub id: Uuid,

    /// Why, for the audit trail.
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,

    #[command(flatten)]
    pub api: ApiArgs,
}

/// Arguments of `questions`.
#[derive(Debug, Args)]
pub struct QuestionsArgs {
    /// At most N questions, oldest first.
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: u32,

    /// Print the questions as a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub api: ApiArgs,
}

/// Arguments of `answer`.
#[derive(Debug, Args)]
pub struct AnswerArgs {
    /// The task's id (a UUID).
    #[arg(value_name = "TASK")]
    pub id: Uuid,

    /// The answer (1 to 4000 characters); the worker reads it among its findings.
    #[arg(value_name = "TEXT")]
    pub text: String,

    /// Print the task as JSON instead of its id, state and attempt.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub api: ApiArgs,
}

/// Arguments of `cancel` and `retry`.
#[derive(Debug, Args)]
pub struct ReasonedArgs {
    /// The task's id (a UUID).
    #[arg(value_name = "TASK")]
    pub id: Uuid,

    /// Why, for the audit trail.
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,

    /// Print the task as JSON instead of its id and state.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub api: ApiArgs,
}

/// Arguments of `kill`.
#[derive(Debug, Args)]
pub struct KillArgs {
    /// Why the fleet is halted (recorded in the audit trail; required).
    #[arg(long, value_name = "TEXT")]
    pub reason: String,

    #[command(flatten)]
    pub api: ApiArgs,
}

/// Arguments of `resume`.
#[derive(Debug, Args)]
pub struct ResumeArgs {
    #[command(flatten)]
    pub api: ApiArgs,
}

fn parse_state(text: &str) -> Result<TaskState, String> {
    text.parse().map_err(|e: orchestrator::state::UnknownState| e.to_string())
}

/// One request on a current-thread runtime.
pub(crate) fn block_on<T>(future: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("Failed to start the async runtime")?
        .block_on(future)
}

/// `fleetctl submit FILE`: prints `<id> <state>`.
pub fn submit(args: SubmitArgs) -> anyhow::Result<()> {
    let text = files::read_input(&args.file, "task file", TASK_FILE_HINT)?;
    let invalid =
        |why: String| UsageError::new(format!("invalid task file '{}': {why}; {TASK_FILE_HINT}", args.file.display()));
    let task: NewTask = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    task.validate().map_err(|e| invalid(e.to_string()))?;
    let client = Client::new(&args.api)?;
    let created = block_on(client.post("v1/tasks", Some(&task)))?;
    let mut out = io::stdout().lock();
    if args.json {
        print_json(&mut out, &created)
    } else {
        writeln!(out, "{} {}", text_of(&created, "id"), text_of(&created, "state")).context("Failed to write to stdout")
    }
}

/// `fleetctl tasks`: a table, newest first.
pub fn tasks(args: TasksArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.api)?;
    let mut query = vec![("limit", args.limit.to_string())];
    if let Some(state) = args.state {
        query.push(("state", state.as_str().to_owned()));
    }
    let answer = block_on(client.get("v1/tasks", &query))?;
    let tasks = answer.get("tasks").and_then(Value::as_array).context("the API's task list has no `tasks` array")?;
    let mut out = io::stdout().lock();
    if args.json {
        print_json(&mut out, &Value::Array(tasks.clone()))
    } else {
        render_table(&mut out, tasks).context("Failed to write to stdout")
    }
}

/// `fleetctl task ID`: one task, one field a line.
pub fn task(args: TaskArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.api)?;
    let task = block_on(client.get(&format!("v1/tasks/{}", args.id), &[]))?;
    let mut out = io::stdout().lock();
    if args.json {
        print_json(&mut out, &task)
    } else {
        render_task(&mut out, &task).context("Failed to write to stdout")
    }
}

/// `fleetctl approve ID`: prints `<id> <state>`.
pub fn approve(args: ApproveArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.api)?;
    let body = args.reason.as_ref().map(|r| json!({"reason": r}));
    let task = block_on(client.post(&format!("v1/tasks/{}/approve", args.id), body.as_ref()))?;
    writeln!(io::stdout().lock(), "{} {}", text_of(&task, "id"), text_of(&task, "state"))
        .context("Failed to write to stdout")
}

/// `fleetctl questions`: a table, oldest first.
pub fn questions(args: QuestionsArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.api)?;
    let answer = block_on(client.get("v1/questions", &[("limit", args.limit.to_string())]))?;
    let questions =
        answer.get("questions").and_then(Value::as_array).context("the API's answer has no `questions` array")?;
    let mut out = io::stdout().lock();
    if args.json {
        print_json(&mut out, &Value::Array(questions.clone()))
    } else {
        render_questions(&mut out, questions).context("Failed to write to stdout")
    }
}

/// `fleetctl answer TASK TEXT`: prints `<id> <state> attempt <n>`.
pub fn answer(args: AnswerArgs) -> anyhow::Result<()> {
    if args.text.trim().is_empty() {
        return Err(UsageError::new("the answer is empty; pass the text to send to the worker").into());
    }
    let client = Client::new(&args.api)?;
    let task = block_on(client.post(&format!("v1/tasks/{}/answer", args.id), Some(&json!({"text": args.text}))))?;
    let mut out = io::stdout().lock();
    if args.json {
        return print_json(&mut out, &task);
    }
    writeln!(out, "{} {} attempt {}", text_of(&task, "id"), text_of(&task, "state"), text_of(&task, "attempt"))
        .context("Failed to write to stdout")
}

/// `fleetctl cancel TASK`: prints `<id> <state>`.
pub fn cancel(args: ReasonedArgs) -> anyhow::Result<()> {
    reasoned("cancel", &args)
}

/// `fleetctl retry TASK`: prints `<id> <state>`.
pub fn retry(args: ReasonedArgs) -> anyhow::Result<()> {
    reasoned("retry", &args)
}

/// `POST /v1/tasks/{id}/<action>` with the optional reason; prints the task's line.
fn reasoned(action: &str, args: &ReasonedArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.api)?;
    let body = args.reason.as_ref().map(|r| json!({"reason": r}));
    let task = block_on(client.post(&format!("v1/tasks/{}/{action}", args.id), body.as_ref()))?;
    print_task_line(&task, args.json)
}

/// `<id> <state>`, or the task as JSON.
fn print_task_line(task: &Value, json: bool) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    if json {
        return print_json(&mut out, task);
    }
    writeln!(out, "{} {}", text_of(task, "id"), text_of(task, "state")).context("Failed to write to stdout")
}

/// `fleetctl kill --reason …`.
pub fn kill(args: KillArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.api)?;
    let answer = block_on(client.post("v1/kill", Some(&json!({"reason": args.reason}))))?;
    writeln!(io::stdout().lock(), "fleet halted (kill epoch {})", text_of(&answer, "kill_epoch"))
        .context("Failed to write to stdout")
}

/// `fleetctl resume`.
pub fn resume(args: ResumeArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.api)?;
    let answer = block_on(client.post::<Value>("v1/resume", None))?;
    writeln!(io::stdout().lock(), "fleet resumed (kill epoch {})", text_of(&answer, "kill_epoch"))
        .context("Failed to write to stdout")
}

pub(crate) fn print_json(out: &mut impl Write, value: &Value) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value).context("Failed to format JSON")?;
    writeln!(out, "{text}").context("Failed to write to stdout")
}

/// A field as text: strings as they are (cleaned), numbers as numbers, `-` for null or missing.
pub(crate) fn text_of(value: &Value, key: &str) -> String {
    match value.get(key) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => clean(s, 200),
        Some(other) => clean(&other.to_string(), 200),
    }
}

/// `text` with control characters escaped, cut to `max` characters (with `…`), so that
/// nothing a submitter wrote can move the cursor or forge lines.
pub(crate) fn clean(text: &str, max: usize) -> String {
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == max {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// RFC 3339 to the second: `2025-06-01T12:00:00Z`.
pub(crate) fn short_time(value: &Value, key: &str) -> String {
    let t = text_of(value, key);
    match t.split_once('.') {
        Some((seconds, rest)) if rest.ends_with('Z') => format!("{seconds}Z"),
        _ => t,
    }
}

const COLUMNS: [&str; 7] = ["ID", "STATE", "RISK", "ATTEMPT", "RETRIES", "UPDATED", "TITLE"];

fn render_table(out: &mut impl Write, tasks: &[Value]) -> io::Result<()> {
    if tasks.is_empty() {
        return writeln!(out, "no tasks");
    }
    let rows: Vec<[String; 7]> = tasks
        .iter()
        .map(|t| {
            [
                text_of(t, "id"),
                text_of(t, "state"),
                text_of(t, "risk"),
                text_of(t, "attempt"),
                text_of(t, "retries"),
                short_time(t, "updated_at"),
                clean(&text_of(t, "title"), 60),
            ]
        })
        .collect();
    let mut widths = COLUMNS.map(|c| c.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |out: &mut dyn Write, cells: [&str; 7]| -> io::Result<()> {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        writeln!(out, "{}", text.trim_end())
    };
    line(out, COLUMNS)?;
    for row in &rows {
        line(out, row.each_ref().map(String::as_str))?;
    }
    Ok(())
}

const QUESTION_COLUMNS: [&str; 5] = ["TASK", "STATE", "ASKED_BY", "ASKED_AT", "QUESTION"];

fn render_questions(out: &mut impl Write, questions: &[Value]) -> io::Result<()> {
    if questions.is_empty() {
        return writeln!(out, "no open questions");
    }
    let rows: Vec<[String; 5]> = questions
        .iter()
        .map(|q| {
            [
                text_of(q, "task_id"),
                text_of(q, "task_state"),
                format!("{}/{}", text_of(q, "asked_by_role"), text_of(q, "asked_by_instance")),
                short_time(q, "asked_at"),
                clean(&text_of(q, "text"), 120),
            ]
        })
        .collect();
    write_table(out, QUESTION_COLUMNS, &rows)
}

/// Columns padded to their widest cell, the last one as it is.
pub(crate) fn write_table<const N: usize>(
    out: &mut impl Write,
    columns: [&str; N],
    rows: &[[String; N]],
) -> io::Result<()> {
    let mut widths = columns.map(|c| c.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |out: &mut dyn Write, cells: [&str; N]| -> io::Result<()> {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        writeln!(out, "{}", text.trim_end())
    };
    line(out, columns)?;
    for row in rows {
        line(out, row.each_ref().map(String::as_str))?;
    }
    Ok(())
}

fn render_task(out: &mut impl Write, task: &Value) -> io::Result<()> {
    for key in ["id", "state", "resume_state", "title", "risk", "attempt", "retries", "assigned_to", "submitted_by"] {
        writeln!(out, "{:<14}{}", format!("{key}:"), text_of(task, key))?;
    }
    for key in ["deadline_at", "created_at", "updated_at"] {
        writeln!(out, "{:<14}{}", format!("{key}:"), short_time(task, key))?;
    }
    let spec = task.get("spec").cloned().unwrap_or(Value::Null);
    for key in ["repository", "test_command"] {
        writeln!(out, "{:<14}{}", format!("{key}:"), text_of(&spec, key))?;
    }
    writeln!(out, "instructions:")?;
    let instructions = spec.get("instructions").and_then(Value::as_str).unwrap_or("");
    for line in instructions.lines() {
        writeln!(out, "  {}", clean(line, 500))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_table_aligns_and_escapes() {
        let tasks = vec![
            json!({"id": "a", "state": "dev", "risk": "LOW", "attempt": 1, "retries": 0,
                   "updated_at": "2025-06-01T12:00:00.123456Z", "title": "Fix\x1b[2Jlogin"}),
            json!({"id": "bbbb", "state": "awaiting_approval", "risk": "HIGH", "attempt": 2, "retries": 1,
                   "updated_at": "2025-06-01T12:00:01Z", "title": "Other"}),
        ];
        let mut out = Vec::new();
        render_table(&mut out, &tasks).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "ID    STATE              RISK  ATTEMPT  RETRIES  UPDATED               TITLE");
        assert_eq!(
            lines[1],
            "a     dev                LOW   1        0        2025-06-01T12:00:00Z  Fix\\u{1b}[2Jlogin"
        );
        assert!(lines[2].starts_with("bbbb  awaiting_approval  HIGH  2        1"));
        let mut empty = Vec::new();
        render_table(&mut empty, &[]).unwrap();
        assert_eq!(String::from_utf8(empty).unwrap(), "no tasks\n");
    }

    #[test]
    fn the_question_table_names_who_asked() {
        let questions = vec![json!({"task_id": "t1", "task_state": "dev", "asked_by_role": "dev",
            "asked_by_instance": "dev-1", "asked_at": "2025-06-01T12:00:00.5Z", "text": "bcrypt\nor argon2?"})];
        let mut out = Vec::new();
        render_questions(&mut out, &questions).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "TASK  STATE  ASKED_BY   ASKED_AT              QUESTION");
        assert_eq!(lines[1], "t1    dev    dev/dev-1  2025-06-01T12:00:00Z  bcrypt\\nor argon2?");
        let mut empty = Vec::new();
        render_questions(&mut empty, &[]).unwrap();
        assert_eq!(String::from_utf8(empty).unwrap(), "no open questions\n");
    }

    #[test]
    fn clean_cuts_long_text() {
        assert_eq!(clean("abcdef", 3), "abc…");
        assert_eq!(clean("a\nb", 10), "a\\nb");
    }
}
