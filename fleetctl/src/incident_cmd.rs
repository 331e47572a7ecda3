//! `fleetctl incident open|list|show|resolve` over the HTTP API (docs/incident-response.md).

use std::io::{self, Write};
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::client::{ApiArgs, Client};
use crate::exit::UsageError;
use crate::files;
use crate::tasks_cmd::{block_on, clean, print_json, short_time, text_of, write_table};

/// `fleetctl incident …`
#[derive(Debug, Subcommand)]
pub enum IncidentCommand {
    /// Open an incident. A critical or high one freezes automatic merges (of --repository,
    /// or of every repository) until an admin resolves it, and alerts.
    ///
    /// Needs an operator or admin token. Prints `<id> <severity> <state>`.
    Open(OpenArgs),
    /// List incidents, newest first (open ones unless --all). Needs a viewer token.
    List(ListArgs),
    /// Show one incident with its tasks. Needs a viewer token.
    Show(ShowArgs),
    /// Resolve an incident: its freeze lifts; the audit trail records who and why.
    ///
    /// Needs an admin token.
    Resolve(ResolveArgs),
}

/// How bad.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Severity {
    /// Freezes merges, alerts; the fleet may be compromised.
    Critical,
    /// Freezes merges, alerts.
    High,
    /// Alerts.
    Medium,
    /// Recorded only.
    Low,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Critical => "critical",
            Severity::High => "high",
            Severity::Medium => "medium",
            Severity::Low => "low",
        }
    }
}

/// Arguments of `incident open`.
#[derive(Debug, Args)]
pub struct OpenArgs {
    /// How bad it is.
    #[arg(long, value_enum)]
    pub severity: Severity,
    /// One line saying what happened (at most 200 characters).
    #[arg(long, value_name = "TEXT")]
    pub title: String,
    /// The repository whose merges it freezes (as tasks name it); none: every repository.
    #[arg(long, value_name = "URL")]
    pub repository: Option<String>,
    /// A task it concerns (repeatable).
    #[arg(long = "task", value_name = "ID")]
    pub tasks: Vec<Uuid>,
    /// Send a fix task to Refactor with these instructions (critical priority, CRITICAL
    /// risk; needs --repository).
    #[arg(long, value_name = "TEXT")]
    pub fix: Option<String>,
    /// The fix task's scope: a path it may change (repeatable).
    #[arg(long = "fix-scope", value_name = "PATH", requires = "fix")]
    pub fix_scope: Vec<String>,
    /// The fix task's test command.
    #[arg(long = "fix-test-command", value_name = "CMD", requires = "fix")]
    pub fix_test_command: Option<String>,
    /// Figures to keep with it: a JSON object in a file (`-` for stdin).
    #[arg(long, value_name = "FILE")]
    pub details: Option<PathBuf>,
    /// Print the incident as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// Arguments of `incident list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Resolved incidents too.
    #[arg(long)]
    pub all: bool,
    /// At most N incidents.
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: u32,
    /// Print the incidents as a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// Arguments of `incident show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The incident's id (a UUID).
    #[arg(value_name = "ID")]
    pub id: Uuid,
    /// Print the incident as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// Arguments of `incident resolve`.
#[derive(Debug, Args)]
pub struct ResolveArgs {
    /// The incident's id (a UUID).
    #[arg(value_name = "ID")]
    pub id: Uuid,
    /// What was found and done (required; at most 2000 characters).
    #[arg(long, value_name = "TEXT")]
    pub resolution: String,
    /// Print the incident as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// Runs one `incident` command.
pub fn run(cmd: IncidentCommand) -> anyhow::Result<()> {
    match cmd {
        IncidentCommand::Open(a) => open(a),
        IncidentCommand::List(a) => list(a),
        IncidentCommand::Show(a) => show(a),
        IncidentCommand::Resolve(a) => resolve(a),
    }
}

fn open(args: OpenArgs) -> anyhow::Result<()> {
    if args.title.trim().is_empty() {
        return Err(UsageError::new("--title is empty; say in one line what happened").into());
    }
    if args.fix.is_some() && args.repository.is_none() {
        return Err(UsageError::new("--fix needs --repository: say which repository Refactor should fix").into());
    }
    let details = match &args.details {
        Some(path) => {
            let hint = "a JSON object such as {\"sender\": \"dev/dev-2\", \"count\": 40}";
            let text = files::read_input(path, "details file", hint)?;
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| UsageError::new(format!("details file '{}' is not JSON: {e}; {hint}", path.display())))?;
            if !v.is_object() {
                return Err(UsageError::new(format!(
                    "details file '{}' must hold a JSON object; {hint}",
                    path.display()
                ))
                .into());
            }
            Some(v)
        }
        None => None,
    };
    let fix = args
        .fix
        .as_ref()
        .map(|text| json!({"instructions": text, "scope": args.fix_scope, "test_command": args.fix_test_command}));
    let body = json!({
        "severity": args.severity.as_str(),
        "title": args.title,
        "repository": args.repository,
        "tasks": args.tasks,
        "details": details,
        "fix": fix,
    });
    let client = Client::new(&args.api)?;
    let incident = block_on(client.post("v1/incidents", Some(&body)))?;
    line(&incident, args.json)
}

fn list(args: ListArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.api)?;
    let mut query = vec![("limit", args.limit.to_string())];
    if args.all {
        query.push(("all", "true".to_owned()));
    }
    let answer = block_on(client.get("v1/incidents", &query))?;
    let incidents =
        answer.get("incidents").and_then(Value::as_array).context("the API's answer has no `incidents` array")?;
    let mut out = io::stdout().lock();
    if args.json {
        return print_json(&mut out, &Value::Array(incidents.clone()));
    }
    if incidents.is_empty() {
        let none = if args.all { "no incidents" } else { "no open incidents" };
        return writeln!(out, "{none}").context("Failed to write to stdout");
    }
    let rows: Vec<[String; 7]> = incidents
        .iter()
        .map(|i| {
            [
                text_of(i, "id"),
                text_of(i, "severity"),
                text_of(i, "state"),
                frozen(i),
                text_of(i, "trigger"),
                short_time(i, "opened_at"),
                clean(&text_of(i, "title"), 80),
            ]
        })
        .collect();
    write_table(&mut out, ["ID", "SEVERITY", "STATE", "FREEZES", "TRIGGER", "OPENED", "TITLE"], &rows)
        .context("Failed to write to stdout")
}

/// What an incident freezes while open: `all`, the repository, or `-`.
fn frozen(i: &Value) -> String {
    if i.get("freezes_merges").and_then(Value::as_bool) != Some(true) || text_of(i, "state") != "open" {
        return "-".into();
    }
    match i.get("repository").and_then(Value::as_str) {
        Some(r) => clean(r, 60),
        None => "all".into(),
    }
}

fn show(args: ShowArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.api)?;
    let i = block_on(client.get(&format!("v1/incidents/{}", args.id), &[]))?;
    let mut out = io::stdout().lock();
    if args.json {
        return print_json(&mut out, &i);
    }
    let mut text = String::new();
    let mut field = |name: &str, value: String| text.push_str(&format!("{name:<12} {value}\n"));
    field("id", text_of(&i, "id"));
    field("severity", text_of(&i, "severity"));
    field("state", text_of(&i, "state"));
    field("title", text_of(&i, "title"));
    field("trigger", text_of(&i, "trigger"));
    field("freezes", frozen(&i));
    field("repository", text_of(&i, "repository"));
    field("opened", format!("{} by {}", short_time(&i, "opened_at"), text_of(&i, "opened_by")));
    if text_of(&i, "state") == "resolved" {
        field("resolved", format!("{} by {}", short_time(&i, "resolved_at"), text_of(&i, "resolved_by")));
        field("resolution", text_of(&i, "resolution"));
    }
    let details = i.get("details").map(Value::to_string).unwrap_or_default();
    field("details", clean(&details, 1000));
    for t in i.get("tasks").and_then(Value::as_array).into_iter().flatten() {
        field("task", format!("{} ({})", text_of(t, "task_id"), text_of(t, "link")));
    }
    if text_of(&i, "state") == "open" {
        text.push_str(&format!(
            "\nResolve it (admin): fleetctl incident resolve {} --resolution 'what was found and done'\n",
            text_of(&i, "id")
        ));
    }
    out.write_all(text.as_bytes()).context("Failed to write to stdout")
}

fn resolve(args: ResolveArgs) -> anyhow::Result<()> {
    if args.resolution.trim().is_empty() {
        return Err(UsageError::new("--resolution is empty; say what was found and done").into());
    }
    let client = Client::new(&args.api)?;
    let i = block_on(
        client.post(&format!("v1/incidents/{}/resolve", args.id), Some(&json!({"resolution": args.resolution}))),
    )?;
    line(&i, args.json)
}

/// `<id> <severity> <state>`, or the incident as JSON.
fn line(i: &Value, json: bool) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    if json {
        return print_json(&mut out, i);
    }
    writeln!(out, "{} {} {}", text_of(i, "id"), text_of(i, "severity"), text_of(i, "state"))
        .context("Failed to write to stdout")
}
