//! `git.push_branch`: applies an approved task's diff to a fresh clone of its repository and
//! pushes `agentfleet/task-<id>`. The orchestrator runs git with its own credentials (from
//! its environment or git's credential helpers); workers never see them.
//!
//! Refuses: a protected branch name (`main`, `master`, or one configured), a repository URL
//! with a dangerous transport (`ext::`, `fd::`) or embedded credentials, a diff touching a
//! path outside the task's scope (absolute paths, `..`, `.git/` are always outside), an
//! empty diff.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use uuid::Uuid;

/// Push settings (`[git]` in the orchestrator's configuration).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitConfig {
    /// Push each approved task's branch and mark the task merged (on by default).
    #[serde(default = "yes")]
    pub push_on_approve: bool,
    /// Branches never pushed to, besides `main` and `master`.
    #[serde(default)]
    pub protected_branches: Vec<String>,
    /// Author of the commits.
    #[serde(default = "author_name")]
    pub author_name: String,
    /// Author e-mail.
    #[serde(default = "author_email")]
    pub author_email: String,
    /// Longest a clone or push may take.
    #[serde(default = "timeout_secs")]
    pub timeout_secs: u64,
    /// Where clones are made (a fresh temporary directory under it per push).
    #[serde(default)]
    pub scratch_dir: Option<PathBuf>,
}

fn yes() -> bool {
    true
}
fn author_name() -> String {
    "agentfleet".into()
}
fn author_email() -> String {
    "agentfleet@localhost".into()
}
fn timeout_secs() -> u64 {
    120
}

impl Default for GitConfig {
    fn default() -> Self {
        Self {
            push_on_approve: true,
            protected_branches: vec![],
            author_name: author_name(),
            author_email: author_email(),
            timeout_secs: timeout_secs(),
            scratch_dir: None,
        }
    }
}

/// Why a push did not happen.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// Policy said no; retrying will not help. The message says why.
    #[error("refused: {0}")]
    Refused(String),
    /// Git or the disk failed; worth retrying.
    #[error("git failed: {0}")]
    Failed(String),
}

/// The branch a task is pushed to.
pub fn branch_of(task: Uuid) -> String {
    format!("agentfleet/task-{task}")
}

/// Checks a repository location: a local path, `file://`, `https://`, `http://`, `ssh://`
/// or `git://` URL, without credentials in it.
pub fn check_repository(repo: &str) -> Result<(), PushError> {
    let lower = repo.to_ascii_lowercase();
    if repo.is_empty() || repo.starts_with('-') || repo.contains(['\n', '\0']) {
        return Err(PushError::Refused(format!("repository {repo:?} is not a usable location")));
    }
    if let Some((scheme, rest)) = lower.split_once("://") {
        if !["file", "https", "http", "ssh", "git"].contains(&scheme) {
            return Err(PushError::Refused(format!("repository transport {scheme}:// is not allowed")));
        }
        let authority = rest.split('/').next().unwrap_or("");
        if authority.contains('@') && scheme != "ssh" {
            return Err(PushError::Refused(
                "repository URL embeds credentials; give the orchestrator a credential helper instead".into(),
            ));
        }
    } else if lower.contains("::") {
        return Err(PushError::Refused(format!("repository {repo:?} uses a remote helper, which is not allowed")));
    }
    Ok(())
}

/// The repository paths a unified diff touches (both sides of renames).
pub fn diff_paths(diff: &str) -> Vec<String> {
    let mut paths = Vec::new();
    for line in diff.lines() {
        let p = if let Some(rest) = line.strip_prefix("+++ ").or_else(|| line.strip_prefix("--- ")) {
            rest.split('\t').next().unwrap_or(rest)
        } else if let Some(rest) = line
            .strip_prefix("rename from ")
            .or_else(|| line.strip_prefix("rename to "))
            .or_else(|| line.strip_prefix("copy to "))
        {
            rest
        } else if let Some(rest) = line.strip_prefix("diff --git ") {
            for part in rest.split(' ') {
                paths.push(part.trim_start_matches("a/").trim_start_matches("b/").trim_matches('"').to_owned());
            }
            continue;
        } else {
            continue;
        };
        if p == "/dev/null" {
            continue;
        }
        let p = p.trim_matches('"');
        let p = p.strip_prefix("a/").or_else(|| p.strip_prefix("b/")).unwrap_or(p);
        paths.push(p.to_owned());
    }
    paths.sort();
    paths.dedup();
    paths
}

/// Whether `path` is inside `scope` (prefixes; empty scope: the whole repository). Never
/// absolute, never `..`, never under `.git`.
pub fn in_scope(path: &str, scope: &[String]) -> bool {
    if path.is_empty() || path.starts_with('/') || path.contains('\\') {
        return false;
    }
    if path.split('/').any(|c| c == ".." || c == ".git") {
        return false;
    }
    scope.is_empty()
        || scope.iter().any(|s| {
            if s.ends_with('/') {
                path.starts_with(s.as_str())
            } else {
                path == s || path.starts_with(&format!("{s}/"))
            }
        })
}

/// Applies `diff` to a fresh clone of `repo` and pushes it as `agentfleet/task-<task>`.
/// Returns the pushed commit.
pub async fn push_branch(
    cfg: &GitConfig,
    repo: &str,
    task: Uuid,
    title: &str,
    diff: &[u8],
    scope: &[String],
) -> Result<String, PushError> {
    check_repository(repo)?;
    let branch = branch_of(task);
    let short = branch.rsplit('/').next().unwrap_or("");
    if ["main", "master"].contains(&short) || cfg.protected_branches.contains(&branch) {
        return Err(PushError::Refused(format!("branch {branch} is protected")));
    }
    let text = std::str::from_utf8(diff).map_err(|_| PushError::Refused("the diff is not UTF-8 text".into()))?;
    let paths = diff_paths(text);
    if paths.is_empty() {
        return Err(PushError::Refused("the approved change has no diff to push".into()));
    }
    if let Some(bad) = paths.iter().find(|p| !in_scope(p, scope)) {
        return Err(PushError::Refused(format!("the diff touches {bad:?}, outside the task's scope {scope:?}")));
    }
    let scratch = match &cfg.scratch_dir {
        Some(d) => tempfile::Builder::new().prefix("push-").tempdir_in(d),
        None => tempfile::Builder::new().prefix("agentfleet-push-").tempdir(),
    }
    .map_err(|e| PushError::Failed(format!("cannot make a scratch directory: {e}")))?;
    let dir = scratch.path().join("repo");
    let timeout = Duration::from_secs(cfg.timeout_secs);
    let dir_s = dir.to_string_lossy().into_owned();
    git(scratch.path(), &["clone", "--quiet", "--", repo, &dir_s], None, timeout).await?;
    git(&dir, &["apply", "--index", "--whitespace=nowarn", "-"], Some(diff), timeout)
        .await
        .map_err(|e| PushError::Refused(format!("the diff does not apply to {repo}: {e}")))?;
    // The text check above reads the diff; git may read its paths differently (it strips
    // the first component of any prefix, not only `a/`). What counts is what git staged.
    let staged = git(&dir, &["diff", "--cached", "--name-only", "-z", "--no-renames", "HEAD"], None, timeout).await?;
    let staged: Vec<&str> = staged.split('\0').filter(|p| !p.is_empty()).collect();
    if staged.is_empty() {
        return Err(PushError::Refused("the approved diff changes nothing in the repository".into()));
    }
    if let Some(bad) = staged.iter().find(|p| !in_scope(p, scope)) {
        return Err(PushError::Refused(format!("the diff writes {bad:?}, outside the task's scope {scope:?}")));
    }
    let message = format!("agentfleet: {}\n\nTask {task}, pushed by the orchestrator after approval.", title.trim());
    let author = format!("user.name={}", cfg.author_name);
    let email = format!("user.email={}", cfg.author_email);
    git(&dir, &["-c", &author, "-c", &email, "commit", "--quiet", "--no-verify", "-m", &message], None, timeout)
        .await?;
    let commit = git(&dir, &["rev-parse", "HEAD"], None, timeout).await?.trim().to_owned();
    // Forced: the branch is the task's own, and a retried push must replace an earlier one.
    let refspec = format!("+HEAD:refs/heads/{branch}");
    git(&dir, &["push", "--quiet", "origin", &refspec], None, timeout).await?;
    Ok(commit)
}

async fn git(dir: &Path, args: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> Result<String, PushError> {
    let mut cmd = tokio::process::Command::new("git");
    cmd.arg("-c")
        .arg("protocol.ext.allow=never")
        .arg("-c")
        .arg("protocol.fd.allow=never")
        .args(args)
        .current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| PushError::Failed(format!("cannot run git (is it installed?): {e}")))?;
    let pipe = child.stdin.take();
    // Feeding stdin and waiting share one deadline: a git that stops reading must not
    // hold the push loop forever.
    let exchange = async {
        if let (Some(input), Some(mut pipe)) = (stdin, pipe) {
            pipe.write_all(input).await.map_err(|e| PushError::Failed(format!("writing to git: {e}")))?;
            drop(pipe);
        }
        child.wait_with_output().await.map_err(|e| PushError::Failed(format!("git {}: {e}", args[0])))
    };
    let out = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| PushError::Failed(format!("git {} took longer than {}s", args[0], timeout.as_secs())))??;
    if !out.status.success() {
        let err: String = String::from_utf8_lossy(&out.stderr).chars().take(400).collect();
        return Err(PushError::Failed(format!("git {} exited with {}: {}", args[0], out.status, err.trim())));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_is_a_set_of_prefixes_and_never_escapes() {
        let scope = vec!["src/".to_owned(), "tests/test_calc.py".to_owned(), "docs".to_owned()];
        assert!(in_scope("src/calc.py", &scope));
        assert!(in_scope("tests/test_calc.py", &scope));
        assert!(in_scope("docs/a.md", &scope));
        assert!(!in_scope("docsx/a.md", &scope));
        assert!(!in_scope("setup.py", &scope));
        assert!(!in_scope("src/../setup.py", &scope));
        assert!(!in_scope("/etc/passwd", &[]));
        assert!(!in_scope(".git/config", &[]));
        assert!(in_scope("anything.txt", &[]));
    }

    #[test]
    fn paths_of_a_diff() {
        let diff = "diff --git a/calc.py b/calc.py\n--- a/calc.py\n+++ b/calc.py\n@@ -1 +1 @@\n-x\n+y\n\
                    diff --git a/new.txt b/new.txt\nnew file mode 100644\n--- /dev/null\n+++ b/new.txt\n@@ -0,0 +1 @@\n+z\n";
        assert_eq!(diff_paths(diff), vec!["calc.py", "new.txt"]);
    }

    #[test]
    fn dangerous_repositories_are_refused() {
        assert!(check_repository("/srv/repos/app.git").is_ok());
        assert!(check_repository("https://git.example/app.git").is_ok());
        assert!(check_repository("ext::sh -c touch% /tmp/pwned").is_err());
        assert!(check_repository("https://user:token@git.example/app.git").is_err());
        assert!(check_repository("--upload-pack=evil").is_err());
        assert!(check_repository("fd::3").is_err());
    }
}
