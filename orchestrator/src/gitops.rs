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

/// What the pushed commit is made of besides the diff: everything in it is derived from
/// the task and its approval, so the same approved change on the same base is the same
/// commit, and a push repeated after a crash is a no-op.
#[derive(Debug, Clone, Copy)]
pub struct CommitSpec<'a> {
    /// The task.
    pub task: Uuid,
    /// Its title (the commit's subject).
    pub title: &'a str,
    /// When it was approved (author and committer date).
    pub at: chrono::DateTime<chrono::Utc>,
}

/// Prefix of the scratch directories pushes clone into.
const SCRATCH_PREFIX: &str = "agentfleet-push-";
/// Held (locked) inside a scratch directory while its push runs.
const SCRATCH_LOCK: &str = ".in-use";

/// Applies `diff` to a fresh clone of `repo` and pushes it as `agentfleet/task-<task>`.
/// Returns the pushed commit.
///
/// Refuses (as [`PushError::Refused`]) what Review must never have passed unread (binary
/// patches, attributes, submodules, gitlinks, symlinks, new executables, CI files, the
/// repository's `.agentfleet/` scripts; unless the scope names the exact path), a diff
/// this orchestrator cannot describe, and any difference between what git staged and what
/// the diff describes (a gitignored path, a submodule pointer, a mode change).
pub async fn push_branch(
    cfg: &GitConfig,
    repo: &str,
    commit: &CommitSpec<'_>,
    diff: &[u8],
    scope: &[String],
) -> Result<String, PushError> {
    check_repository(repo)?;
    let task = commit.task;
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
    let files = changeset::parse(diff).map_err(|e| PushError::Refused(format!("the approved change: {e}")))?;
    let hidden = changeset::hidden_findings(&files, scope);
    if !hidden.is_empty() {
        return Err(PushError::Refused(hidden.join("; ")));
    }
    let scratch = Scratch::new(cfg)?;
    let dir = scratch.dir.path().join("repo");
    let timeout = Duration::from_secs(cfg.timeout_secs);
    let dir_s = dir.to_string_lossy().into_owned();
    git(scratch.dir.path(), &["clone", "--quiet", "--no-checkout", "--", repo, &dir_s], None, timeout).await?;
    // Before the checkout: the repository's own attributes (eol conversion, filters, ident)
    // must not make the files differ from the bytes that were reviewed.
    let info = dir.join(".git/info");
    std::fs::create_dir_all(&info)
        .and_then(|()| std::fs::write(info.join("attributes"), changeset::NEUTRAL_ATTRIBUTES))
        .map_err(|e| PushError::Failed(format!("cannot write the clone's info/attributes: {e}")))?;
    git(&dir, &["reset", "--quiet", "--hard", "HEAD"], None, timeout).await?;
    git(&dir, &["apply", "--index", "--whitespace=nowarn", "-"], Some(diff), timeout)
        .await
        .map_err(|e| PushError::Refused(format!("the diff does not apply to {repo}: {e}")))?;
    // What counts is what git staged, path by path and mode by mode.
    let raw = git_bytes(
        &dir,
        &["diff", "--cached", "--raw", "-z", "--no-renames", "--ignore-submodules=none", "HEAD"],
        timeout,
    )
    .await?;
    let staged =
        changeset::parse_raw(&raw).map_err(|e| PushError::Failed(format!("reading git's staged files: {e}")))?;
    if staged.is_empty() {
        return Err(PushError::Refused("the approved diff changes nothing in the repository".into()));
    }
    if let Some(bad) = staged.iter().find(|s| !in_scope(&s.path, scope)) {
        let path = &bad.path;
        return Err(PushError::Refused(format!("the diff writes {path:?}, outside the task's scope {scope:?}")));
    }
    changeset::compare_staged(&files, &staged)
        .map_err(|why| PushError::Refused(format!("git staged other than the approved diff describes: {why}")))?;
    let message = format!(
        "agentfleet: {}\n\nTask {task}, pushed by the orchestrator after approval.\nChange: sha256:{}\n",
        commit.title.trim(),
        changeset::ChangeId::of(diff)
    );
    let date = format!("{} +0000", commit.at.timestamp());
    let ident = [
        ("GIT_AUTHOR_NAME", cfg.author_name.as_str()),
        ("GIT_AUTHOR_EMAIL", cfg.author_email.as_str()),
        ("GIT_COMMITTER_NAME", cfg.author_name.as_str()),
        ("GIT_COMMITTER_EMAIL", cfg.author_email.as_str()),
        ("GIT_AUTHOR_DATE", date.as_str()),
        ("GIT_COMMITTER_DATE", date.as_str()),
    ];
    run(
        &dir,
        &["-c", "commit.gpgSign=false", "commit", "--quiet", "--no-verify", "-m", &message],
        None,
        &ident,
        timeout,
    )
    .await?;
    let pushed = git(&dir, &["rev-parse", "HEAD"], None, timeout).await?.trim().to_owned();
    // Already there (a push whose record was lost in a crash): nothing to do.
    let remote = git(&dir, &["ls-remote", "origin", &format!("refs/heads/{branch}")], None, timeout).await?;
    if remote.split_whitespace().next() == Some(pushed.as_str()) {
        return Ok(pushed);
    }
    // Forced: the branch is the task's own, and a change approved anew replaces the old.
    let refspec = format!("+HEAD:refs/heads/{branch}");
    git(&dir, &["push", "--quiet", "--no-verify", "origin", &refspec], None, timeout).await?;
    Ok(pushed)
}

/// A push's scratch directory, locked while in use so that [`sweep_scratch`] (at start)
/// removes only what a crashed push left.
struct Scratch {
    dir: tempfile::TempDir,
    _lock: std::fs::File,
}

impl Scratch {
    fn new(cfg: &GitConfig) -> Result<Self, PushError> {
        let root = cfg.scratch_dir.clone().unwrap_or_else(std::env::temp_dir);
        let dir = tempfile::Builder::new()
            .prefix(SCRATCH_PREFIX)
            .tempdir_in(&root)
            .map_err(|e| PushError::Failed(format!("cannot make a scratch directory in {}: {e}", root.display())))?;
        let lock = std::fs::File::create(dir.path().join(SCRATCH_LOCK))
            .and_then(|f| f.try_lock().map_err(std::io::Error::other).map(|()| f))
            .map_err(|e| PushError::Failed(format!("cannot lock the scratch directory: {e}")))?;
        Ok(Self { dir, _lock: lock })
    }
}

/// Removes the scratch directories of pushes that are not running any more (a crashed
/// orchestrator's clones, which may hold a repository's whole history). A directory whose
/// lock is held belongs to a live push (of this or another orchestrator) and stays; one
/// without a lock file stays until it is ten minutes old (it may be a push starting now).
/// Returns how many were removed.
pub fn sweep_scratch(cfg: &GitConfig) -> usize {
    let root = cfg.scratch_dir.clone().unwrap_or_else(std::env::temp_dir);
    let Ok(entries) = std::fs::read_dir(&root) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let ours = entry.file_name().to_string_lossy().starts_with(SCRATCH_PREFIX);
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if !ours || !is_dir {
            continue;
        }
        let stale = match std::fs::File::open(path.join(SCRATCH_LOCK)) {
            Ok(f) => f.try_lock().is_ok(),
            Err(_) => entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > Duration::from_secs(600))),
        };
        if stale {
            match std::fs::remove_dir_all(&path) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "Removed a crashed push's scratch clone.");
                    removed += 1;
                }
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "Cannot remove a stale scratch clone."),
            }
        }
    }
    removed
}

async fn git(dir: &Path, args: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> Result<String, PushError> {
    run(dir, args, stdin, &[], timeout).await.map(|out| String::from_utf8_lossy(&out).into_owned())
}

async fn git_bytes(dir: &Path, args: &[&str], timeout: Duration) -> Result<Vec<u8>, PushError> {
    run(dir, args, None, &[], timeout).await
}

/// Environment variables git may see from the orchestrator's own: what finding a program
/// and a credential (helpers in `$HOME`, an SSH agent) needs, nothing else. `GIT_DIR`,
/// `GIT_CONFIG_*`, `GIT_SSH_COMMAND` and the like from the environment would change what
/// git runs.
const GIT_ENV_KEPT: [&str; 4] = ["PATH", "HOME", "SSH_AUTH_SOCK", "XDG_CONFIG_HOME"];

/// Most bytes one git command of a push may print: every output a push reads (a commit id,
/// one remote ref, the staged paths of an approved change) is far smaller, so a repository
/// or remote that makes git print more fails the push instead of filling memory.
const GIT_OUTPUT_CAP: usize = 16 * 1024 * 1024;

/// Runs git with a clean environment and the fleet's hardening: no hooks, no fsmonitor,
/// no global attributes, only the local, `file`, `https`, `http`, `ssh` and `git`
/// transports, no prompts, no system configuration. Stdout is capped at
/// [`GIT_OUTPUT_CAP`].
async fn run(
    dir: &Path,
    args: &[&str],
    stdin: Option<&[u8]>,
    env: &[(&str, &str)],
    timeout: Duration,
) -> Result<Vec<u8>, PushError> {
    run_capped(dir, args, stdin, env, timeout, GIT_OUTPUT_CAP).await
}

/// [`run`] with stdout capped at `cap` bytes: past it git is killed and the push fails,
/// without the output ever being held whole.
async fn run_capped(
    dir: &Path,
    args: &[&str],
    stdin: Option<&[u8]>,
    env: &[(&str, &str)],
    timeout: Duration,
    cap: usize,
) -> Result<Vec<u8>, PushError> {
    let mut cmd = tokio::process::Command::new("git");
    cmd.env_clear();
    for key in GIT_ENV_KEPT {
        if let Some(v) = std::env::var_os(key) {
            cmd.env(key, v);
        }
    }
    for setting in [
        "protocol.allow=never",
        "protocol.file.allow=always",
        "protocol.https.allow=always",
        "protocol.http.allow=always",
        "protocol.ssh.allow=always",
        "protocol.git.allow=always",
        "core.hooksPath=/dev/null",
        "core.fsmonitor=false",
        "core.attributesFile=/dev/null",
        "submodule.recurse=false",
    ] {
        cmd.arg("-c").arg(setting);
    }
    cmd.args(args)
        .current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("LC_ALL", "C")
        .envs(env.iter().copied())
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| PushError::Failed(format!("cannot run git (is it installed?): {e}")))?;
    let pipe = child.stdin.take();
    // Feeding stdin and waiting share one deadline: a git that stops reading must not
    // hold the push loop forever.
    let exchange = async {
        let feed = async {
            if let (Some(input), Some(mut pipe)) = (stdin, pipe) {
                // A git that exits early (output cap) closes its stdin: not an error here.
                let _ = pipe.write_all(input).await;
            }
        };
        let (_, out) = tokio::join!(feed, childio::capped_output(&mut child, cap));
        out.map_err(|e| PushError::Failed(format!("git {}: {e}", args[0])))
    };
    let out = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| PushError::Failed(format!("git {} took longer than {}s", args[0], timeout.as_secs())))??;
    let Some(stdout) = out.stdout else {
        tracing::warn!(command = args[0], cap, "Git printed more than the output cap; killed.");
        return Err(PushError::Failed(format!("git {} printed more than {cap} bytes and was killed", args[0])));
    };
    if !out.status.success() {
        let err: String = String::from_utf8_lossy(&out.stderr).chars().take(400).collect();
        return Err(PushError::Failed(format!("git {} exited with {}: {}", args[0], out.status, err.trim())));
    }
    Ok(stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Item 5 of issue 10: a repository whose content makes git print 48 MiB (here `git
    /// show` of a large commit) fails cleanly at a 1 MiB cap: git is killed, the error says
    /// so, and the output was never held whole.
    #[tokio::test]
    async fn huge_git_output_fails_cleanly_at_the_cap() {
        use std::io::Write as _;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let sh = |args: &[&str]| {
            let out = std::process::Command::new("git")
                .args(["-c", "user.name=t", "-c", "user.email=t@t"])
                .args(args)
                .current_dir(dir)
                .output()
                .unwrap();
            assert!(out.status.success(), "{args:?}");
        };
        sh(&["init", "-q"]);
        let mut big = std::io::BufWriter::new(std::fs::File::create(dir.join("big.txt")).unwrap());
        for i in 0..48 * 1024 {
            writeln!(big, "{i:01023}").unwrap();
        }
        big.into_inner().unwrap().sync_all().unwrap();
        sh(&["add", "."]);
        sh(&["commit", "-qm", "big"]);
        let timeout = Duration::from_secs(60);
        let err = run_capped(dir, &["show", "HEAD"], None, &[], timeout, 1024 * 1024).await.unwrap_err();
        let PushError::Failed(text) = err else { panic!("{err:?}") };
        assert_eq!(text, "git show printed more than 1048576 bytes and was killed");
        // Under the cap the same runner returns the output whole.
        let head = run_capped(dir, &["rev-parse", "HEAD"], None, &[], timeout, 1024 * 1024).await.unwrap();
        assert_eq!(head.len(), 41);
    }

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
