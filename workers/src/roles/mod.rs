//! The four roles and what they share: a task's context, the outcome a role returns, and
//! helpers to run a script in the sandbox, ask the model for a diff and apply it.
//!
//! A role never fails: whatever goes wrong becomes an [`Outcome`] with
//! [`Status::Error`] and a summary that says what (the orchestrator retries the step).

pub mod dev;
pub mod qa;
pub mod refactor;
pub mod review;

use envelope::{Role, Status, TaskAssign};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::agent::Run;
use crate::agent::policy::{AgentsFile, Judge};
use crate::patch::{extract_diff, scope_violation, touched_paths};
use crate::sandbox::{Network, RunOutput, RunSpec, Sandbox, SandboxLabels};
use crate::tools::{CallContext, ToolClient, ToolError};
use crate::workspace::Workspace;

/// Largest log sent back in a result.
pub const LOG_CAP: usize = 32 * 1024;

/// Everything a role needs for one assignment.
#[derive(Debug)]
pub struct TaskContext {
    /// The task.
    pub task_id: Uuid,
    /// The assignment.
    pub assign: TaskAssign,
    /// The task's prepared workspace.
    pub workspace: Workspace,
    /// Where code runs.
    pub sandbox: Sandbox,
    /// The tool proxy.
    pub tools: ToolClient,
    /// Task, assignment and lease, for tool calls.
    pub call: CallContext,
    /// Labels of this task's sandbox containers.
    pub labels: SandboxLabels,
    /// Cancelled on shutdown: sandbox runs stop at once.
    pub cancel: CancellationToken,
    /// What each role's model may do.
    pub agents: std::sync::Arc<AgentsFile>,
}

/// What a role produced; becomes the `task.result`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Success, Failure or Error.
    pub status: Status,
    /// One line for humans.
    pub summary: String,
    /// Problems found.
    pub findings: Vec<String>,
    /// The workspace's change against the base commit.
    pub diff: Option<Vec<u8>>,
    /// A capped log.
    pub log: Option<Vec<u8>>,
    /// Set when the assignment itself was unacceptable (its entry goes to the DLQ after
    /// the error result is sent).
    pub refused_assignment: Option<String>,
    /// A question for a human, sent as a `question` envelope before the result.
    pub question: Option<String>,
    /// The agent's tool calls, judged (audited by the orchestrator when refused).
    pub calls: Vec<envelope::ToolCallRecord>,
}

impl Outcome {
    fn new(status: Status, summary: impl Into<String>) -> Self {
        Self {
            status,
            summary: summary.into(),
            findings: Vec::new(),
            diff: None,
            log: None,
            refused_assignment: None,
            question: None,
            calls: Vec::new(),
        }
    }
    /// The step did its job.
    pub fn success(summary: impl Into<String>) -> Self {
        Self::new(Status::Success, summary)
    }
    /// The step ran and found a problem.
    pub fn failure(summary: impl Into<String>) -> Self {
        Self::new(Status::Failure, summary)
    }
    /// The step could not run.
    pub fn error(summary: impl Into<String>) -> Self {
        Self::new(Status::Error, summary)
    }
    fn with_diff(mut self, diff: Vec<u8>) -> Self {
        self.diff = (!diff.is_empty()).then_some(diff);
        self
    }
    fn with_log(mut self, log: &[u8]) -> Self {
        self.log = Some(cap_log(log, LOG_CAP));
        self
    }
    /// Adds the loop's transcript and findings.
    pub fn with_run(mut self, run: &mut Run) -> Self {
        self.calls.append(&mut run.calls);
        for f in run.findings.drain(..) {
            if !self.findings.contains(&f) {
                self.findings.push(f);
            }
        }
        self
    }
}

/// Puts the workspace in exactly the state the step is about: the base commit plus the
/// change the assignment carries (QA, Review and Refactor get the newest Dev or Refactor
/// diff). Whatever an earlier step left behind, an aborted test run's files or another
/// host's copy, does not count; the step sees what will be pushed.
async fn adopt_change(ctx: &TaskContext) -> Result<(), Outcome> {
    let Some(change) = ctx.assign.change.as_deref() else { return Ok(()) };
    // The assignment names the change by its hash; bytes that are not those bytes (a bug,
    // or an assignment spliced together) are judged by nobody.
    if let Some(claimed) = ctx.assign.change_sha256.as_deref() {
        let actual = changeset::ChangeId::of(change);
        if changeset::ChangeId::parse(claimed).ok().as_ref() != Some(&actual) {
            return Err(Outcome::error(format!(
                "refused the assigned change: its bytes hash to {actual}, the assignment names {claimed:?}"
            )));
        }
    }
    ctx.workspace
        .reset()
        .await
        .map_err(|e| Outcome::error(format!("cannot reset the workspace to its base commit: {e}")))?;
    if change.is_empty() {
        return Ok(());
    }
    let refused: Vec<String> =
        touched_paths(&String::from_utf8_lossy(change)).iter().filter_map(|p| scope_violation(p, &[])).collect();
    if !refused.is_empty() {
        return Err(Outcome::error(format!("refused the assigned change: {}", refused.join("; "))));
    }
    ctx.workspace
        .apply(change)
        .await
        .map_err(|e| Outcome::error(format!("the assigned change does not apply to the base commit: {e}")))
}

/// Runs `role` on the assignment.
pub async fn run(role: Role, ctx: &TaskContext) -> Outcome {
    if let Err(o) = adopt_change(ctx).await {
        return o;
    }
    match role {
        Role::Dev => dev::run(ctx).await,
        Role::Qa => qa::run(ctx).await,
        Role::Review => review::run(ctx).await,
        Role::Refactor => refactor::run(ctx).await,
        other => Outcome::error(format!("{other} is not a worker role")),
    }
}

/// At most `cap` bytes of `log`: its beginning and its end, with a marker where the middle
/// was cut.
pub fn cap_log(log: &[u8], cap: usize) -> Vec<u8> {
    if log.len() <= cap {
        return log.to_vec();
    }
    let head = cap / 4;
    let marker = format!("\n[… {} bytes cut …]\n", log.len() - cap);
    let tail = cap.saturating_sub(head + marker.len());
    let mut out = Vec::with_capacity(cap);
    out.extend_from_slice(&log[..head]);
    out.extend_from_slice(marker.as_bytes());
    out.extend_from_slice(&log[log.len() - tail..]);
    out
}

/// The last `max` characters of `log`, as text, for a finding.
pub fn log_tail(log: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(log);
    let text = text.trim_end();
    let n = text.chars().count();
    if n <= max { text.to_owned() } else { format!("…{}", text.chars().skip(n - max).collect::<String>()) }
}

/// How a sandbox run ended, in words.
pub fn describe_run(out: &RunOutput) -> String {
    if out.timed_out {
        "killed at the time limit".into()
    } else if out.oom_killed {
        "killed for using too much memory".into()
    } else if out.disk_limit_exceeded {
        "killed for writing more than the workspace limit".into()
    } else if out.cancelled {
        "cancelled".into()
    } else {
        match out.exit_code {
            Some(0) => "exit 0".into(),
            Some(c) => format!("exit {c}"),
            None => "did not run".into(),
        }
    }
}

/// Moves every credential-named file or folder of the working tree
/// ([`crate::agent::policy::secret_file`]) into `stash`, so code in a sandbox cannot read
/// them (and print them into a test log that reaches the model or a finding). Returns what
/// was moved, to be put back by [`unstash_secrets`]. Links are moved as links, never
/// followed.
fn stash_secrets(root: &std::path::Path, stash: &std::path::Path) -> std::io::Result<Vec<String>> {
    fn walk(root: &std::path::Path, rel: &str, out: &mut Vec<String>) -> std::io::Result<()> {
        let dir = if rel.is_empty() { root.to_path_buf() } else { root.join(rel) };
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = if rel.is_empty() { name.clone() } else { format!("{rel}/{name}") };
            // Installed packages are no credentials (`botocore/credentials.py`, certifi's
            // `cacert.pem`), and the runs see them read-only anyway.
            if path == crate::sandbox::DEPS_DIR {
                continue;
            }
            if crate::agent::policy::secret_file(&path).is_some() {
                out.push(path);
            } else if entry.file_type()?.is_dir() {
                walk(root, &path, out)?;
            }
        }
        Ok(())
    }
    let mut found = Vec::new();
    walk(root, "", &mut found)?;
    if found.is_empty() {
        return Ok(found);
    }
    if stash.exists() {
        std::fs::remove_dir_all(stash)?;
    }
    std::fs::create_dir_all(stash)?;
    for (i, rel) in found.iter().enumerate() {
        std::fs::rename(root.join(rel), stash.join(i.to_string()))?;
    }
    Ok(found)
}

/// Puts back what [`stash_secrets`] moved, replacing whatever a sandbox left at those
/// paths; a folder on the way that is now a link is replaced by a real folder.
fn unstash_secrets(root: &std::path::Path, stash: &std::path::Path, moved: &[String]) -> std::io::Result<()> {
    for (i, rel) in moved.iter().enumerate() {
        let mut at = root.to_path_buf();
        let parts: Vec<&str> = rel.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            at.push(part);
            match std::fs::symlink_metadata(&at) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    std::fs::remove_file(&at)?;
                    std::fs::create_dir(&at)?;
                }
                Err(_) => std::fs::create_dir(&at)?,
            }
        }
        let target = root.join(rel);
        match std::fs::symlink_metadata(&target) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&target)?,
            Ok(_) => std::fs::remove_file(&target)?,
            Err(_) => {}
        }
        std::fs::rename(stash.join(i.to_string()), &target)?;
    }
    if stash.exists() {
        std::fs::remove_dir_all(stash)?;
    }
    Ok(())
}

/// Runs `sh -c <command>` in a sandbox on the workspace, with the workspace's
/// credential-named files moved out of its reach for the run.
///
/// The command is wrapped in `timeout -s KILL` (a few seconds past the sandbox's own
/// limit): should this worker die mid-run, its orphaned container still stops by itself.
pub async fn sandbox_sh(ctx: &TaskContext, command: &str) -> Result<RunOutput, String> {
    let span = tracing::info_span!(
        "sandbox.run",
        task_id = %ctx.task_id,
        role = %ctx.labels.role,
        instance = %ctx.labels.instance,
        exit_code = tracing::field::Empty,
        duration_ms = tracing::field::Empty,
    );
    let out = tracing::Instrument::instrument(sandbox_sh_stashed(ctx, command), span.clone()).await;
    if let Ok(o) = &out {
        span.record("duration_ms", o.duration.as_millis() as u64);
        if let Some(code) = o.exit_code {
            span.record("exit_code", code);
        }
    }
    out
}

async fn sandbox_sh_stashed(ctx: &TaskContext, command: &str) -> Result<RunOutput, String> {
    let (root, stash) = (ctx.workspace.dir.clone(), ctx.workspace.stash_dir());
    let moved = {
        let (root, stash) = (root.clone(), stash.clone());
        tokio::task::spawn_blocking(move || stash_secrets(&root, &stash))
            .await
            .map_err(|e| format!("cannot set credential files aside: {e}"))?
            .map_err(|e| format!("cannot set credential files aside: {e}"))?
    };
    let out = match dependencies(ctx).await {
        Ok(Dependencies::Ready(env)) => sandbox_sh_bare(ctx, command, env).await,
        // The install's own output says why (a hash mismatch, a package missing from the
        // index, the proxy's refusal): the run reads as failed, with pip's or npm's words.
        Ok(Dependencies::InstallFailed(out)) => Ok(out),
        Err(e) => Err(e),
    };
    // Only once no container of this task can run: a live one could swap links into the
    // paths the files go back to.
    if let Err(e) = ctx.sandbox.quiesce_task(&ctx.labels.task).await {
        return Err(format!("cannot stop this task's sandbox containers ({e}); the credential files stay set aside"));
    }
    let back = tokio::task::spawn_blocking(move || unstash_secrets(&root, &stash, &moved)).await;
    match back {
        Ok(Ok(())) => out,
        Ok(Err(e)) => Err(format!("cannot put credential files back after the sandbox run: {e}")),
        Err(e) => Err(format!("cannot put credential files back after the sandbox run: {e}")),
    }
}

/// What a run needs before it starts.
enum Dependencies {
    /// Installed (or none needed): the variables that let the run find them.
    Ready(Vec<(String, String)>),
    /// The install run failed; its output.
    InstallFailed(RunOutput),
}

/// Installs the workspace's locked dependencies ([`crate::deps`]) unless there are none or
/// the installed ones came from the same lockfiles: asks the tool proxy for `pkg_install`
/// (the risk matrix decides), then runs the install in the sandbox's egress mode. An
/// unusable lockfile or a refusal is an error that says what to do.
async fn dependencies(ctx: &TaskContext) -> Result<Dependencies, String> {
    use crate::deps;
    let ws = &ctx.workspace;
    let dir = ws.dir.clone();
    // The same reading a runner does before it allows the install run.
    let files = tokio::task::spawn_blocking(move || deps::read_lockfiles(&dir))
        .await
        .map_err(|e| format!("cannot read the lockfiles: {e}"))??;
    if ws.tracks(deps::DEPS_DIR).await {
        return Err(format!(
            "the repository tracks {}/, where this fleet installs dependencies (read-only in every run); \
             remove it from the repository",
            deps::DEPS_DIR
        ));
    }
    let Some(plan) = deps::plan(&files)? else {
        return Ok(Dependencies::Ready(Vec::new()));
    };
    // The worker's own record of what it installed, next to the git directory where no
    // sandbox reaches; a marker inside the workspace could have been planted by a run.
    let installed = ws.stash_dir().with_extension("deps");
    let recorded = tokio::fs::read_to_string(&installed).await.unwrap_or_default();
    let in_place = ws.read_file(&format!("{}/{}", deps::DEPS_DIR, deps::MARKER), 256).await;
    if recorded.trim() == plan.digest
        && in_place.as_deref().map(|m| String::from_utf8_lossy(m).trim().to_owned()).as_deref() == Some(&plan.digest)
    {
        return Ok(Dependencies::Ready(deps::run_env(&plan)));
    }
    let lockfiles: Vec<&str> = plan.lockfiles.iter().map(|(_, name, _)| *name).collect();
    let input = serde_json::json!({"lockfiles": lockfiles, "digest": plan.digest});
    ctx.tools.call(&ctx.call, "pkg_install", &input).await.map_err(|e| match e {
        ToolError::Refused { code, message, .. } => {
            format!("installing the dependencies ({}) was refused: {code}: {message}", lockfiles.join(", "))
        }
        other => format!("cannot get permission to install the dependencies: {other}"),
    })?;
    tracing::info!(task = %ctx.task_id, lockfiles = ?lockfiles, digest = %plan.digest, "Installing the task's dependencies through the egress proxy.");
    let _ = tokio::fs::remove_file(&installed).await;
    // Exactly the install command: a runner recomputes it from the workspace's lockfiles and
    // refuses an egress run of anything else.
    let mut spec = RunSpec::new(deps::install_command(&plan), ctx.workspace.dir.clone(), ctx.labels.clone());
    spec.risk = ctx.call.lease.as_deref().and_then(crate::tools::lease_risk);
    spec.network = Network::Egress;
    let out = run_then_quiesce(ctx, spec, "the install run").await?;
    tracing::info!(task = %ctx.task_id, result = %describe_run(&out), duration_ms = out.duration.as_millis() as u64, "Install run finished.");
    if !out.success() {
        return Ok(Dependencies::InstallFailed(out));
    }
    tokio::fs::write(&installed, &plan.digest)
        .await
        .map_err(|e| format!("cannot record the installed dependencies in {}: {e}", installed.display()))?;
    Ok(Dependencies::Ready(deps::run_env(&plan)))
}

/// Runs `spec`; then, whatever happened, no container of this task may outlive the run:
/// host-side git touches the workspace next (a removal that timed out would leave one
/// writing).
async fn run_then_quiesce(ctx: &TaskContext, spec: RunSpec, what: &str) -> Result<RunOutput, String> {
    let out = ctx.sandbox.run(spec, &ctx.cancel).await.map_err(|e| format!("{what} failed: {e}"));
    ctx.sandbox
        .quiesce_task(&ctx.labels.task)
        .await
        .map_err(|e| format!("cannot stop this task's sandbox containers: {e}"))?;
    out
}

async fn sandbox_sh_bare(ctx: &TaskContext, command: &str, env: Vec<(String, String)>) -> Result<RunOutput, String> {
    let limit = ctx.sandbox.config().timeout_secs.saturating_add(5).to_string();
    let command_line = ["timeout", "-s", "KILL", &limit, "sh", "-c", command].map(str::to_owned).to_vec();
    let mut spec = RunSpec::new(command_line, ctx.workspace.dir.clone(), ctx.labels.clone());
    spec.risk = ctx.call.lease.as_deref().and_then(crate::tools::lease_risk);
    spec.env = env;
    tracing::info!(task = %ctx.task_id, command, "Running in the sandbox.");
    let out = run_then_quiesce(ctx, spec, "the sandbox").await?;
    tracing::info!(task = %ctx.task_id, command, result = %describe_run(&out), duration_ms = out.duration.as_millis() as u64, "Sandbox run finished.");
    if out.disk_limit_exceeded {
        // The run filled the workspace: drop all it wrote (and the change with it) before
        // anything reads the tree; the step fails.
        let limit = ctx.sandbox.config().workspace_max_bytes;
        ctx.workspace
            .reset()
            .await
            .map_err(|e| format!("the sandbox run wrote past the workspace limit and the reset failed: {e}"))?;
        return Err(format!(
            "the sandbox run wrote more than the workspace limit of {limit} bytes; it was killed and the workspace reset"
        ));
    }
    Ok(out)
}

/// A script of the repository's `.agentfleet/` directory (`build`, `test`, `format`), as
/// the base commit defines it: the shell text to run with `sh -c`. Never the working tree's
/// copy, which the change under test (or code an earlier sandbox run left) may have
/// rewritten into `exit 0`.
pub async fn repo_script(ctx: &TaskContext, name: &str) -> Option<String> {
    let bytes = ctx.workspace.base_file(&format!(".agentfleet/{name}")).await?;
    String::from_utf8(bytes).ok().filter(|s| !s.contains('\0'))
}

/// The current change of the workspace against its base commit.
pub async fn current_diff(ctx: &TaskContext) -> Result<Vec<u8>, Outcome> {
    ctx.workspace.diff().await.map_err(|e| Outcome::error(format!("cannot compute the diff: {e}")))
}

/// Puts the workspace back to the change `before` if a sandbox run (tests, build check)
/// left files behind, so a check never alters what the next step reviews.
pub async fn restore(ctx: &TaskContext, before: &[u8]) -> Result<(), Outcome> {
    let after = current_diff(ctx).await?;
    if after == before {
        return Ok(());
    }
    tracing::info!(task = %ctx.task_id, "The sandbox run changed the workspace; restoring it.");
    let undo = async {
        ctx.workspace.reset().await?;
        if !before.is_empty() {
            ctx.workspace.apply(before).await?;
        }
        Ok::<(), crate::workspace::WorkspaceError>(())
    };
    undo.await.map_err(|e| Outcome::error(format!("cannot restore the workspace after the sandbox run: {e}")))
}

/// The scope in words, for prompts.
pub fn scope_text(scope: &[String]) -> String {
    if scope.is_empty() {
        "You may change any file of the repository (never .git, CI configuration or .agentfleet/).".into()
    } else {
        format!("You may change only paths under: {}.", scope.join(", "))
    }
}

/// Maps a tool failure to an error outcome.
pub fn tool_failure(e: ToolError) -> Outcome {
    match e {
        // The policy wants a person: say so where operators look, not only in the result.
        ToolError::Refused { action, code, message } if code == "needs_approval" || code == "outside_work_hours" => {
            let mut o = Outcome::error(format!("{action} refused by the tool proxy: {code}: {message}"));
            o.question = Some(format!("{action} needs a human ({code}): {message}. Approve the task or retry later."));
            o
        }
        ToolError::Refused { action, code, message } => {
            Outcome::error(format!("{action} refused by the tool proxy: {code}: {message}"))
        }
        other => Outcome::error(format!("model call failed: {other}")),
    }
}

/// The outcome of a loop that did not end well, with what it did on the way.
pub fn loop_failure(run: &mut Run) -> Outcome {
    let o = match run.tool_error.take() {
        Some(e) => tool_failure(e),
        None => Outcome::error(match &run.end {
            Err(e) => e.clone(),
            Ok(_) => "the agent ended".into(),
        }),
    };
    o.with_run(run)
}

/// What a model's plain-text final answer asked for.
#[derive(Debug)]
pub enum TextAnswer {
    /// A unified diff, judged path by path like `write_file` and applied.
    Applied,
    /// No change.
    Nothing,
    /// The model needs a human first (the answer began `QUESTION:`).
    Question(String),
}

/// Whether a plain-text answer ends a Dev or Refactor step: a diff, a question, or (for
/// Refactor) `NO CHANGES`. A model without tool support answers this way.
pub fn final_text(text: &str) -> bool {
    let t = text.trim_start();
    t.starts_with("QUESTION:") || t.starts_with("NO CHANGES") || extract_diff(text).is_some()
}

/// Acts on a plain-text final answer: every path the diff touches is judged as a write
/// (workspace, secret files, scope, protected files); one refusal refuses the whole diff,
/// and each refusal is recorded in the transcript.
pub async fn apply_text_answer(
    ctx: &TaskContext,
    judge: &Judge,
    run: &mut Run,
    text: &str,
) -> Result<TextAnswer, Outcome> {
    if let Some(question) = text.trim_start().strip_prefix("QUESTION:") {
        return Ok(TextAnswer::Question(question.trim().chars().take(4000).collect()));
    }
    let Some(diff) = extract_diff(text) else { return Ok(TextAnswer::Nothing) };
    // The paths and modes as `git apply` will read them (any first component stripped,
    // quoted names, modes), not as the diff's text seems to say.
    let files = match changeset::parse(diff.as_bytes()) {
        Ok(f) => f,
        Err(e) => {
            return Err(
                Outcome::error(format!("refused the model's diff: git would read it otherwise: {e}")).with_run(run)
            );
        }
    };
    let mut refused = Vec::new();
    let mut refuse = |run: &mut Run, p: &str, why: String| {
        tracing::warn!(task = %ctx.task_id, path = %p, reason = %why, "Refused a path of the model's diff.");
        run.calls.push(envelope::ToolCallRecord {
            tool: "diff".into(),
            args: format!("path={:?}", p.chars().take(120).collect::<String>()),
            verdict: envelope::CallVerdict::Refused,
            reason: Some(why.chars().take(300).collect()),
            ms: 0,
        });
        refused.push(why);
    };
    for f in &files {
        for p in f.paths() {
            if let Err(why) = judge.writable(&ctx.workspace.dir, p) {
                refuse(run, p, why);
            }
        }
    }
    // What a text review cannot read (binary patches, links, gitlinks, new executables):
    // the tools never make them, so a diff may not either.
    for why in changeset::hidden_findings(&files, &judge.scope) {
        refuse(run, "(mode)", why.trim_start_matches("critical: ").to_owned());
    }
    if !refused.is_empty() {
        let o = Outcome::error(format!("refused the model's diff: {}", refused.join("; ")));
        return Err(o.with_run(run));
    }
    ctx.workspace
        .apply(diff.as_bytes())
        .await
        .map_err(|e| Outcome::error(format!("the model's diff does not apply: {e}")).with_run(run))?;
    Ok(TextAnswer::Applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_are_capped_head_and_tail() {
        let log: Vec<u8> = (0..10_000u32).flat_map(|i| format!("{i}\n").into_bytes()).collect();
        let capped = cap_log(&log, 1000);
        assert!(capped.len() <= 1000);
        let text = String::from_utf8(capped).unwrap();
        assert!(text.starts_with("0\n1\n"));
        assert!(text.ends_with("9999\n"));
        assert!(text.contains("bytes cut"));
        assert_eq!(cap_log(b"short", 1000), b"short");
        assert_eq!(log_tail(b"abcdef\n", 3), "…def");
    }
}
