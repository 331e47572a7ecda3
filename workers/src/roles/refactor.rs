//! Refactor: runs the repository's formatter (`.agentfleet/format`) in the sandbox, or, when
//! it has none, asks the model for a cleanup diff; returns the whole change against the base
//! commit, which goes back through QA.

use envelope::Role;

use super::{
    Outcome, TaskContext, TextAnswer, apply_text_answer, current_diff, describe_run, final_text, log_tail,
    loop_failure, repo_script, sandbox_sh, scope_text,
};
use crate::agent::{Agent, End, Run};

/// Refactor's job when the model does the cleanup, the first part of its system prompt.
pub const JOB: &str = "You are the Refactor agent of agentfleet, an automated software team. You clean up a \
change that review approved: fix the review's findings (read_findings) and obvious style problems without changing \
behaviour. show_diff shows the change so far; edit with edit_file or write_file, check with run_check, and end with \
finish and a one-line summary (say so when nothing needed cleaning).";

fn task_message(ctx: &TaskContext) -> String {
    let a = &ctx.assign;
    format!(
        "Clean up the change made for this task.\n\nTask:\n{}\n\n{}\n\nReview left {} finding(s): read_findings shows them.\n",
        a.instructions.trim(),
        scope_text(&a.scope),
        a.findings.len()
    )
}

/// Runs the Refactor step.
pub async fn run(ctx: &TaskContext) -> Outcome {
    let mut transcript: Option<Run> = None;
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
        let policy = ctx.agents.role(Role::Refactor);
        let agent = Agent::new(ctx, Role::Refactor, policy, JOB);
        let mut run = agent.run(task_message(ctx), final_text).await;
        let how = match &run.end {
            Ok(End::Finished(f)) => {
                format!("model cleanup: {}", f.summary.trim().chars().take(200).collect::<String>())
            }
            Ok(End::Text(text)) => {
                let text = text.clone();
                match apply_text_answer(ctx, &agent.judge, &mut run, &text).await {
                    Ok(TextAnswer::Applied) => "model cleanup applied".to_owned(),
                    // A cleanup is optional: a question for a human is noted and the change kept as is.
                    Ok(TextAnswer::Nothing | TextAnswer::Question(_)) => "nothing to clean up".to_owned(),
                    Err(o) => return o,
                }
            }
            Err(_) => return loop_failure(&mut run),
        };
        transcript = Some(run);
        how
    };
    let o = match current_diff(ctx).await {
        Ok(diff) if diff.is_empty() => Outcome::error(format!("{how}, but the workspace has no change left")),
        Ok(diff) => Outcome::success(how).with_diff(diff),
        Err(o) => o,
    };
    match transcript {
        Some(mut run) => o.with_run(&mut run),
        None => o,
    }
}
