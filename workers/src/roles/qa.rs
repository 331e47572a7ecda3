//! QA: runs the task's test command in the sandbox and the static checks of
//! [`crate::checks`] over the change; passes only if the tests pass and no critical finding
//! is in a line the change adds.

use std::collections::BTreeMap;

use super::{Outcome, TaskContext, current_diff, describe_run, log_tail, repo_script, restore, sandbox_sh};
use crate::checks::{Severity, scan_added, scan_file};
use crate::patch::{added_lines, touched_paths};

/// Largest changed file scanned whole.
const SCAN_FILE_MAX: u64 = 1024 * 1024;

/// Runs the QA step.
pub async fn run(ctx: &TaskContext) -> Outcome {
    let (command, label) = match ctx.assign.test_command.as_deref().map(str::trim).filter(|c| !c.is_empty()) {
        Some(c) => (c.to_owned(), c.to_owned()),
        None => match repo_script(ctx, "test").await {
            Some(c) => (c, ".agentfleet/test as at the base commit".to_owned()),
            None => {
                return Outcome::error(
                    "no test command: the task has none and the base commit has no .agentfleet/test",
                );
            }
        },
    };
    let diff = match current_diff(ctx).await {
        Ok(d) => d,
        Err(o) => return o,
    };
    let out = match sandbox_sh(ctx, &command).await {
        Ok(out) => out,
        Err(e) => return Outcome::error(e),
    };
    if out.cancelled {
        return Outcome::error("the test run was cancelled");
    }
    if let Err(o) = restore(ctx, &diff).await {
        return o;
    }
    let diff_text = String::from_utf8_lossy(&diff).into_owned();
    let mut findings: Vec<crate::checks::Finding> = scan_added(&diff_text, &[]);
    // The whole of each changed file, for what was already there (reported, not blocking).
    let mut added: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for a in added_lines(&diff_text) {
        added.entry(a.file).or_default().push(a.line);
    }
    for file in touched_paths(&diff_text) {
        if let Some(bytes) = ctx.workspace.read_file(&file, SCAN_FILE_MAX).await
            && let Ok(text) = String::from_utf8(bytes)
        {
            findings.extend(scan_file(&file, &text, added.get(&file).map_or(&[][..], Vec::as_slice)));
        }
    }
    let critical = findings.iter().filter(|f| f.severity == Severity::Critical).count();
    let passed = out.success();
    let how = describe_run(&out);
    let mut texts = Vec::new();
    if !passed {
        texts.push(format!("tests failed ({how}): {}", log_tail(&out.output, 1500)));
    }
    texts.extend(findings.iter().map(ToString::to_string));
    let summary = match (passed, critical) {
        (true, 0) => format!("tests passed ({label}); no critical finding"),
        (true, n) => format!("tests passed but {n} critical finding(s)"),
        (false, 0) => format!("tests failed ({how})"),
        (false, n) => format!("tests failed ({how}) and {n} critical finding(s)"),
    };
    let mut o = if passed && critical == 0 { Outcome::success(summary) } else { Outcome::failure(summary) };
    o.findings = texts;
    o.with_log(&out.output)
}
