//! Dev: the model works on the task through its tools (look around, edit, run the tests and
//! the build check in the sandbox), then the step checks that the change builds and returns
//! the diff.
//!
//! Every assignment starts from the base commit (a retry after QA or Review sent the task
//! back must not stack a second change on the first). The first message carries only the
//! operator's instructions and the scope; the repository and earlier findings reach the
//! model through its tools, as data. The final build check is the repository's
//! `.agentfleet/build` script, run with `sh` in the sandbox, when it has one.

use envelope::Role;

use super::{
    Outcome, TaskContext, TextAnswer, apply_text_answer, current_diff, describe_run, final_text, log_tail,
    loop_failure, repo_script, restore, sandbox_sh, scope_text,
};
use crate::agent::{Agent, End};

/// Dev's job, the first part of its system prompt.
pub const JOB: &str = "You are the Dev agent of agentfleet, an automated software team. You change a repository \
to complete a task, working through your tools: find your way with list_files, search and read_file, change files \
with edit_file (exact text replacement) or write_file, check your work with run_tests and run_check, and end with \
finish and a one-line summary. Change only what the task needs. If the task cannot be done without a decision only \
a human can make, answer with one line starting QUESTION: and the question instead of calling a tool.";

/// The first message: the instructions, the scope, and what the tools can show.
pub fn task_message(ctx: &TaskContext) -> String {
    let a = &ctx.assign;
    let mut p = format!("Task:\n{}\n\n{}\n", a.instructions.trim(), scope_text(&a.scope));
    if !a.findings.is_empty() {
        p.push_str(&format!(
            "\nEarlier steps left {} finding(s) that your change must address: read them with read_findings.\n",
            a.findings.len()
        ));
    }
    p.push_str("\nThe repository is checked out in your workspace; use your tools to look at it.\n");
    p
}

/// Runs the Dev step.
pub async fn run(ctx: &TaskContext) -> Outcome {
    if let Err(e) = ctx.workspace.reset().await {
        return Outcome::error(format!("cannot reset the workspace to its base commit: {e}"));
    }
    let policy = ctx.agents.role(Role::Dev);
    let agent = Agent::new(ctx, Role::Dev, policy, JOB);
    let mut run = agent.run(task_message(ctx), final_text).await;
    let said = match &run.end {
        Ok(End::Finished(f)) => f.summary.trim().chars().take(200).collect::<String>(),
        Ok(End::Text(text)) => {
            let text = text.clone();
            match apply_text_answer(ctx, &agent.judge, &mut run, &text).await {
                Ok(TextAnswer::Applied) => String::new(),
                Ok(TextAnswer::Nothing) => {
                    let excerpt: String = text.chars().take(300).collect();
                    return Outcome::error(format!("the model's answer contains no change: {excerpt:?}"))
                        .with_run(&mut run);
                }
                Ok(TextAnswer::Question(q)) => {
                    let mut o = Outcome::error(format!("the agent needs a human before it can change anything: {q}"));
                    o.question = Some(q);
                    return o.with_run(&mut run);
                }
                Err(o) => return o,
            }
        }
        Err(_) => return loop_failure(&mut run),
    };
    let diff = match current_diff(ctx).await {
        Ok(d) => d,
        Err(o) => return o.with_run(&mut run),
    };
    if diff.is_empty() {
        return Outcome::error("the agent finished without changing anything").with_run(&mut run);
    }
    let files = crate::patch::touched_paths(&String::from_utf8_lossy(&diff)).len();
    let turns = run.turns;
    let head = if said.is_empty() {
        format!("change made ({files} file(s), {turns} turn(s))")
    } else {
        format!("{said} ({files} file(s), {turns} turn(s))")
    };
    let Some(build) = repo_script(ctx, "build").await else {
        return Outcome::success(format!("{head}; the repository has no build check"))
            .with_diff(diff)
            .with_run(&mut run);
    };
    let out = match sandbox_sh(ctx, &build).await {
        Ok(out) => out,
        Err(e) => return Outcome::error(e).with_diff(diff).with_run(&mut run),
    };
    if let Err(o) = restore(ctx, &diff).await {
        return o.with_run(&mut run);
    }
    if out.success() {
        Outcome::success(format!("{head}; build check passed")).with_diff(diff).with_log(&out.output).with_run(&mut run)
    } else {
        let how = describe_run(&out);
        let mut o = Outcome::failure(format!("build check failed ({how})")).with_diff(diff).with_log(&out.output);
        o.findings.push(format!("build failed ({how}): {}", log_tail(&out.output, 1500)));
        o.with_run(&mut run)
    }
}
