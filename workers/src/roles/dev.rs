//! Dev: asks the model for a change, applies it in the workspace, checks that it builds in
//! the sandbox, returns the diff.
//!
//! Every assignment starts from the base commit (a retry after QA or Review sent the task
//! back must not stack a second change on the first). The prompt carries the instructions,
//! the findings of earlier steps, the scope, and the repository's files. The build check is
//! the repository's `.agentfleet/build` script, run with `sh` in the sandbox, when it has one.

use super::{
    ModelDiff, Outcome, TaskContext, ask_and_apply, current_diff, describe_run, log_tail, repo_script, repo_snapshot,
    restore, sandbox_sh, scope_text,
};

/// The system prompt.
pub const SYSTEM: &str = "You are the Dev agent of agentfleet, an automated software team. \
You change a repository to complete a task. Answer with a unified diff only (git diff format, \
paths prefixed a/ and b/, relative to the repository root), with no explanation. If the task cannot \
be done without a decision only a human can make, answer instead with one line starting QUESTION: \
and the question.";

/// The user prompt for an assignment.
pub async fn prompt(ctx: &TaskContext) -> String {
    let a = &ctx.assign;
    let mut p = format!("Task:\n{}\n\n", a.instructions.trim());
    if !a.findings.is_empty() {
        p.push_str("Findings from earlier steps that your change must address:\n");
        for f in &a.findings {
            p.push_str(&format!("- {f}\n"));
        }
        p.push('\n');
    }
    p.push_str(&scope_text(&a.scope));
    p.push_str("\n\n");
    p.push_str(&repo_snapshot(ctx).await);
    p.push_str("\nAnswer with a unified diff only.\n");
    p
}

/// Runs the Dev step.
pub async fn run(ctx: &TaskContext) -> Outcome {
    if let Err(e) = ctx.workspace.reset().await {
        return Outcome::error(format!("cannot reset the workspace to its base commit: {e}"));
    }
    let prompt = prompt(ctx).await;
    match ask_and_apply(ctx, SYSTEM, prompt).await {
        Ok(ModelDiff::Applied) => {}
        Ok(ModelDiff::NoDiff(excerpt)) => {
            return Outcome::error(format!("the model's answer contains no unified diff: {excerpt:?}"));
        }
        Ok(ModelDiff::Question(q)) => {
            let mut o = Outcome::error(format!("the agent needs a human before it can change anything: {q}"));
            o.question = Some(q);
            return o;
        }
        Err(o) => return o,
    }
    let diff = match current_diff(ctx).await {
        Ok(d) => d,
        Err(o) => return o,
    };
    if diff.is_empty() {
        return Outcome::error("the model's diff changed nothing");
    }
    let files = crate::patch::touched_paths(&String::from_utf8_lossy(&diff)).len();
    let Some(build) = repo_script(ctx, "build").await else {
        return Outcome::success(format!("change applied ({files} file(s)); the repository has no build check"))
            .with_diff(diff);
    };
    let out = match sandbox_sh(ctx, &build).await {
        Ok(out) => out,
        Err(e) => return Outcome::error(e).with_diff(diff),
    };
    if let Err(o) = restore(ctx, &diff).await {
        return o;
    }
    if out.success() {
        Outcome::success(format!("change applied ({files} file(s)); build check passed"))
            .with_diff(diff)
            .with_log(&out.output)
    } else {
        let how = describe_run(&out);
        let mut o = Outcome::failure(format!("build check failed ({how})")).with_diff(diff).with_log(&out.output);
        o.findings.push(format!("build failed ({how}): {}", log_tail(&out.output, 1500)));
        o
    }
}
