//! Review, the gatekeeper: reads the change (no sandbox needed) and rejects it when it
//! leaves the task's scope, carries a secret, or adds dangerous shell or eval-like code.
//! Dependency changes and style problems are reported without blocking; an approval with
//! findings makes the orchestrator send the task to Refactor once.

use envelope::Role;

use super::{Outcome, TaskContext, current_diff};
use crate::agent::{Agent, End};
use crate::checks::{Family, is_dependency_file, scan_added, style_findings};
use crate::patch::{scope_violation, touched_paths};

/// What Review decided, before it becomes an outcome (pure, for tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Blocking reasons (empty: approved).
    pub critical: Vec<String>,
    /// Non-blocking notes.
    pub notes: Vec<String>,
}

/// Reviews a change against a scope. `change` is the artefact exactly as the orchestrator
/// will push it (its headers say what `git apply` will do: modes, gitlinks, binary patches,
/// paths that `.gitignore` hides from the working tree's diff); `diff` is the workspace's
/// own diff after applying it, with attributes neutralized and every text byte shown. Both
/// are judged, and either can block.
pub fn review(change: Option<&[u8]>, diff: &str, scope: &[String]) -> Verdict {
    let mut critical = Vec::new();
    let mut notes = Vec::new();
    let change_text = change.map(String::from_utf8_lossy);
    let mut files = Vec::new();
    for (what, bytes) in [("the assigned change", change), ("the workspace's diff", Some(diff.as_bytes()))] {
        let Some(bytes) = bytes else { continue };
        match changeset::parse(bytes) {
            Ok(f) => files.extend(f),
            Err(e) => critical.push(format!("critical: {what} cannot be read as git will read it: {e}")),
        }
    }
    critical.extend(changeset::hidden_findings(&files, scope));
    let mut paths = touched_paths(diff);
    for p in change_text.as_deref().map(touched_paths).unwrap_or_default() {
        if !paths.contains(&p) {
            paths.push(p);
        }
    }
    for p in files.iter().flat_map(changeset::FileChange::paths) {
        if !paths.iter().any(|q| q == p) {
            paths.push(p.to_owned());
        }
    }
    for p in &paths {
        if let Some(v) = scope_violation(p, scope) {
            critical.push(format!("critical: out of scope: {v}"));
        }
    }
    let families = [Family::Secret, Family::DangerousShell, Family::CodeInjection];
    for text in [Some(diff), change_text.as_deref()].into_iter().flatten() {
        for f in scan_added(text, &families) {
            let f = f.to_string();
            if !critical.contains(&f) {
                critical.push(f);
            }
        }
    }
    for p in &paths {
        if is_dependency_file(p) {
            notes.push(format!("dependency change: {p}"));
        }
    }
    notes.extend(style_findings(diff));
    Verdict { critical, notes }
}

/// The LLM reviewer's job, the first part of its system prompt.
pub const JOB: &str = "You are the Review agent of agentfleet, an automated software team: the second reviewer of \
a change, next to rule-based checks. Read the change with show_diff, look at the code around it with read_file, \
search and list_files, and decide whether it does what the task asks, safely: reject a change that does something \
the task did not ask for, weakens tests or security, leaks or plants credentials, or cannot be understood. End \
with finish, giving verdict \"approve\" or \"reject\" and your reasons. You cannot change files.";

/// The LLM reviewer's first message.
fn task_message(ctx: &TaskContext) -> String {
    let a = &ctx.assign;
    let mut p = format!(
        "Review the change made for this task.\n\nTask:\n{}\n\n{}\n",
        a.instructions.trim(),
        super::scope_text(&a.scope)
    );
    if !a.findings.is_empty() {
        p.push_str("Earlier steps left findings; read_findings shows them.\n");
    }
    p.push_str("\nshow_diff shows the change; the workspace holds the repository with the change applied.\n");
    p
}

/// Runs the Review step: the rules first; when they approve and the LLM reviewer is on,
/// the LLM reviewer too. Either one rejecting rejects.
pub async fn run(ctx: &TaskContext) -> Outcome {
    let diff = match current_diff(ctx).await {
        Ok(d) => d,
        Err(o) => return o,
    };
    if diff.is_empty() && ctx.assign.change.as_deref().is_none_or(<[u8]>::is_empty) {
        let mut o = Outcome::failure("rejected: the change is empty");
        o.findings.push("critical: there is no change to review".into());
        return o;
    }
    let mut v = review(ctx.assign.change.as_deref(), &String::from_utf8_lossy(&diff), &ctx.assign.scope);
    let policy = ctx.agents.role(Role::Review);
    let mut llm_note = None;
    let mut transcript = None;
    if v.critical.is_empty() && policy.llm_review == Some(true) {
        let agent = Agent::new(ctx, Role::Review, policy, JOB);
        let mut run = agent.run(task_message(ctx), |_| false).await;
        match &run.end {
            Ok(End::Finished(f)) if f.verdict.as_deref() == Some("reject") => {
                let reasons: Vec<String> = f
                    .reasons
                    .iter()
                    .map(|r| r.trim().chars().take(500).collect())
                    .filter(|r: &String| !r.is_empty())
                    .collect();
                if reasons.is_empty() {
                    v.critical.push("critical: LLM review rejected the change (no reason given)".into());
                }
                v.critical.extend(reasons.into_iter().map(|r| format!("critical: LLM review: {r}")));
            }
            // An approval's reasons are not findings: findings send an approved change to
            // Refactor, and "looks right" needs no cleanup.
            Ok(End::Finished(_)) => llm_note = Some(format!("LLM review approved in {} turn(s)", run.turns)),
            Ok(End::Text(_)) | Err(_) => return super::loop_failure(&mut run),
        }
        transcript = Some(run);
    }
    let o = if v.critical.is_empty() {
        let mut o = Outcome::success(match llm_note {
            Some(n) => format!("approved (rules; {n})"),
            None => "approved".into(),
        });
        o.findings = v.notes;
        o.with_diff(diff)
    } else {
        let reasons: Vec<&str> = v.critical.iter().map(|c| c.strip_prefix("critical: ").unwrap_or(c)).take(5).collect();
        let mut o = Outcome::failure(format!("rejected: {}", reasons.join("; ")));
        o.findings = v.critical.into_iter().chain(v.notes).collect();
        o.with_diff(diff)
    };
    match transcript {
        Some(mut run) => o.with_run(&mut run),
        None => o,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        let ok = "diff --git a/calc.py b/calc.py\n--- a/calc.py\n+++ b/calc.py\n@@ -1,2 +1,2 @@\n def add(a, b):\n-    return a - b\n+    return a + b \n";
        let v = review(None, ok, &[]);
        assert!(v.critical.is_empty(), "{v:?}");
        assert_eq!(v.notes, vec!["style: calc.py: trailing whitespace (line 2)"]);
        let v = review(None, ok, &["src/".to_owned()]);
        assert!(v.critical[0].starts_with("critical: out of scope: calc.py"), "{v:?}");
        let secret = "--- a/s.py\n+++ b/s.py\n@@ -0,0 +1 @@\n+KEY = 'AKIAABCDEFGHIJKLMNOP'\n";
        assert!(review(None, secret, &[]).critical[0].contains("hard-coded credential"));
        let deps = "--- a/requirements.txt\n+++ b/requirements.txt\n@@ -1 +1,2 @@\n six\n+requests\n";
        let v = review(None, deps, &[]);
        assert!(v.critical.is_empty());
        assert_eq!(v.notes, vec!["dependency change: requirements.txt"]);
    }
}
