//! Refactor: runs the repository's formatter (`.agentfleet/format`) in the sandbox, or, when
//! it has none, asks the model for a cleanup diff; returns the whole change against the base
//! commit, which goes back through QA.

use super::{
    ModelDiff, Outcome, TaskContext, ask_and_apply, current_diff, describe_run, log_tail, repo_script, repo_snapshot,
    sandbox_sh, scope_text,
};

/// The system prompt when the model does the cleanup.
pub const SYSTEM: &str = "You are the Refactor agent of agentfleet, an automated software team. \
You clean up a change that review approved: fix the review's findings and obvious style problems \
without changing behaviour. Answer with a unified diff against the current files only (git diff \
format, paths prefixed a/ and b/), or with the words NO CHANGES if nothing needs cleaning.";

/// Runs the Refactor step.
pub async fn run(ctx: &TaskContext) -> Outcome {
    let how = if let Some(format) = repo_script(ctx, "format").await {
        let out = match sandbox_sh(ctx, &format).await {
            Ok(out) => out,
            Err(e) => return Outcome::error(e),
        };
        if !out.success() {
            let how = describe_run(&out);
            let mut o = Outcome::error(format!("the formatter failed ({how})")).with_log(&out.output);
            o.findings.push(format!("formatter failed ({how}): {}", log_tail(&out.output, 1500)));
            return o;
        }
        if let Err(e) = ctx.workspace.open_to_sandbox().await {
            return Outcome::error(format!("cannot restore workspace permissions: {e}"));
        }
        "formatter ran".to_owned()
    } else {
        let current = match current_diff(ctx).await {
            Ok(d) => d,
            Err(o) => return o,
        };
        let a = &ctx.assign;
        let mut p = format!("The task was:\n{}\n\n", a.instructions.trim());
        if !a.findings.is_empty() {
            p.push_str("Review findings to clean up:\n");
            for f in &a.findings {
                p.push_str(&format!("- {f}\n"));
            }
            p.push('\n');
        }
        p.push_str(&format!("The change so far:\n```diff\n{}```\n\n", String::from_utf8_lossy(&current)));
        p.push_str(&scope_text(&a.scope));
        p.push_str("\n\n");
        p.push_str(&repo_snapshot(ctx).await);
        p.push_str("\nAnswer with a unified diff against the current files only, or NO CHANGES.\n");
        match ask_and_apply(ctx, SYSTEM, p).await {
            Ok(ModelDiff::Applied) => "model cleanup applied".to_owned(),
            // A cleanup is optional: a question for a human is noted and the change kept as is.
            Ok(ModelDiff::NoDiff(_) | ModelDiff::Question(_)) => "nothing to clean up".to_owned(),
            Err(o) => return o,
        }
    };
    match current_diff(ctx).await {
        Ok(diff) if diff.is_empty() => Outcome::error(format!("{how}, but the workspace has no change left")),
        Ok(diff) => Outcome::success(how).with_diff(diff),
        Err(o) => o,
    }
}
