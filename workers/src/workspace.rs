//! A task's workspace: a checkout of the task's repository that every step of the task (Dev,
//! QA, Review, Refactor) works in, one after the other.
//!
//! The git directory is kept **outside** the workspace, in `<workspace_root>/.agentfleet-git/
//! <name>`, and every git command names it with `--git-dir`/`--work-tree`. Only the
//! workspace is mounted into sandboxes, so code running there cannot plant hooks or a
//! `core.fsmonitor` command in the repository's configuration for the worker's own git to
//! run on the host. Git is also run with hooks disabled, without prompts, with a timeout,
//! and with only the local, `file`, `http(s)` and `git` transports allowed (never `ext::`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

/// The directory under the workspace root holding the git directories.
pub const GIT_STORE: &str = ".agentfleet-git";
/// Default cap of one git command's stdout (see [`Workspace::with_output_cap`]).
pub const DEFAULT_GIT_OUTPUT_CAP: usize = 8 * 1024 * 1024;

/// Why a workspace could not be prepared or a git command failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    /// The assignment names a workspace this worker must not touch.
    #[error("the workspace {path:?} is refused: {reason}")]
    Refused { path: String, reason: String },
    /// The repository string is not an allowed source.
    #[error("the repository {0:?} is refused: only local paths, file://, https://, http:// and git:// are allowed")]
    BadRepository(String),
    /// No repository and nothing cloned yet.
    #[error("the workspace has no checkout and the assignment names no repository to clone")]
    NoRepository,
    /// A git command failed.
    #[error("git {command} failed: {detail}")]
    Git { command: String, detail: String },
    /// A git command wrote more than the output cap; it was killed and its output dropped.
    #[error("git {command} wrote more than {cap} bytes and was killed; the workspace is too large to handle")]
    OutputTooLarge { command: String, cap: usize },
    /// A git command ran past its timeout and was killed.
    #[error("git {command} did not finish within {secs} s and was killed")]
    Timeout { command: String, secs: u64 },
    /// A file-system operation failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> WorkspaceError {
    let what = what.into();
    move |source| WorkspaceError::Io { what, source }
}

/// Checks that `workspace` is an absolute path strictly inside `root`, without `..` or `.`
/// components, and not inside the git store. Returns the path relative to `root`.
pub fn check_workspace_path(root: &Path, workspace: &str) -> Result<PathBuf, WorkspaceError> {
    let refuse = |reason: &str| WorkspaceError::Refused { path: workspace.to_owned(), reason: reason.to_owned() };
    let path = Path::new(workspace);
    if !path.is_absolute() {
        return Err(refuse("not an absolute path"));
    }
    if workspace.split('/').any(|p| p == "." || p == "..")
        || path.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(refuse("contains '..' or '.'"));
    }
    let rel = path
        .strip_prefix(root)
        .map_err(|_| refuse(&format!("outside the worker's workspace_root {}", root.display())))?;
    if rel.as_os_str().is_empty() {
        return Err(refuse("is the workspace_root itself"));
    }
    if rel.components().next().is_some_and(|c| c.as_os_str() == GIT_STORE) {
        return Err(refuse("inside the worker's git store"));
    }
    Ok(rel.to_path_buf())
}

/// Checks a repository source: a local path, or a `file`, `https`, `http` or `git` URL.
pub fn check_repository(repo: &str) -> Result<(), WorkspaceError> {
    let bad = || WorkspaceError::BadRepository(repo.to_owned());
    if repo.is_empty() || repo.starts_with('-') || repo.contains("::") || repo.chars().any(char::is_control) {
        return Err(bad());
    }
    if let Some((scheme, _)) = repo.split_once("://") {
        return if matches!(scheme.to_ascii_lowercase().as_str(), "file" | "https" | "http" | "git") {
            Ok(())
        } else {
            Err(bad())
        };
    }
    // scp-like `host:path` (ssh) — a ':' before the first '/'.
    let first_colon = repo.find(':');
    let first_slash = repo.find('/');
    if let Some(c) = first_colon
        && first_slash.is_none_or(|s| c < s)
    {
        return Err(bad());
    }
    Ok(())
}

/// A prepared workspace: the working tree and its git directory.
#[derive(Debug, Clone)]
pub struct Workspace {
    /// The working tree (mounted into sandboxes at `/workspace`).
    pub dir: PathBuf,
    /// The git directory, outside the working tree.
    git_dir: PathBuf,
    timeout: Duration,
    /// Most bytes one git command may write to stdout before it is killed: what a sandbox
    /// can make git print (a huge diff, a huge file) is never held whole in memory.
    output_cap: usize,
}

impl Workspace {
    /// Makes sure `dir` (already checked with [`check_workspace_path`]) holds a checkout:
    /// if its git directory has no commit yet, clones `repository` (bare, into the git
    /// store) and checks it out. An existing checkout is left as it is (later steps work on
    /// what earlier steps changed).
    pub async fn prepare(
        root: &Path,
        rel: &Path,
        repository: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, WorkspaceError> {
        let dir = root.join(rel);
        let store_name = rel.to_string_lossy().replace('/', "__");
        let store = root.join(GIT_STORE);
        let git_dir = store.join(&store_name);
        tokio::fs::create_dir_all(&dir).await.map_err(io(format!("cannot create the workspace {}", dir.display())))?;
        tokio::fs::create_dir_all(&store)
            .await
            .map_err(io(format!("cannot create the git store {}", store.display())))?;
        let ws = Self { dir, git_dir, timeout, output_cap: DEFAULT_GIT_OUTPUT_CAP };
        if ws.git_dir.exists() && ws.git(&["rev-parse", "--verify", "-q", "HEAD"]).await.is_ok() {
            ws.neutralize_attributes().await?;
            return Ok(ws);
        }
        let repo = repository.ok_or(WorkspaceError::NoRepository)?;
        check_repository(repo)?;
        // A clone cut short (worker killed) leaves a partial directory: start over.
        let partial = store.join(format!("{store_name}.partial"));
        for d in [&partial, &ws.git_dir] {
            if d.exists() {
                tokio::fs::remove_dir_all(d).await.map_err(io(format!("cannot remove {}", d.display())))?;
            }
        }
        let partial_s = partial.to_string_lossy().into_owned();
        run_git(None, &["clone", "--quiet", "--bare", "--", repo, &partial_s], None, &store, timeout, ws.output_cap)
            .await?;
        tokio::fs::rename(&partial, &ws.git_dir).await.map_err(io("cannot move the fresh clone into place"))?;
        ws.git(&["config", "core.bare", "false"]).await?;
        ws.neutralize_attributes().await?;
        ws.git(&["rev-parse", "--verify", "-q", "HEAD"]).await.map_err(|_| WorkspaceError::Git {
            command: "clone".into(),
            detail: "the repository has no commit".into(),
        })?;
        ws.reset().await?;
        Ok(ws)
    }

    /// The same workspace with another cap on git's stdout (default
    /// [`DEFAULT_GIT_OUTPUT_CAP`]); a command that writes more fails with
    /// [`WorkspaceError::OutputTooLarge`].
    pub fn with_output_cap(mut self, cap: usize) -> Self {
        self.output_cap = cap;
        self
    }

    /// Puts the working tree back to the base commit: tracked files restored, everything
    /// else (untracked and ignored) removed but the installed dependencies
    /// ([`crate::sandbox::DEPS_DIR`]).
    pub async fn reset(&self) -> Result<(), WorkspaceError> {
        self.purge_nested_repositories().await?;
        self.git(&["reset", "--quiet", "--hard", "HEAD"]).await?;
        // -ff: nested repositories too, which a single -f leaves behind. The installed
        // dependencies stay (their marker says which lockfiles they came from).
        self.git(&["clean", "-ffdxq", "-e", &format!("/{}/", crate::sandbox::DEPS_DIR)]).await?;
        self.open_to_sandbox().await
    }

    /// The change of the working tree against the base commit, new files included, binary
    /// safe. Attributes are neutralized ([`changeset::NEUTRAL_ATTRIBUTES`]), and neither textconv nor an
    /// external diff runs: a file is shown as a binary patch only if its bytes are binary,
    /// never because a `.gitattributes` says so.
    pub async fn diff(&self) -> Result<Vec<u8>, WorkspaceError> {
        self.purge_nested_repositories().await?;
        self.git(&["add", "--all", "--intent-to-add", "."]).await?;
        self.git(&["diff", "--binary", "--no-textconv", "--no-ext-diff", "--ignore-submodules=all", "HEAD"]).await
    }

    /// Writes [`changeset::NEUTRAL_ATTRIBUTES`] to the git directory's `info/attributes`, which outranks every
    /// `.gitattributes` of the tree. The git directory is outside the workspace, so nothing
    /// a sandbox writes can undo it.
    async fn neutralize_attributes(&self) -> Result<(), WorkspaceError> {
        let info = self.git_dir.join("info");
        tokio::fs::create_dir_all(&info).await.map_err(io(format!("cannot create {}", info.display())))?;
        let path = info.join("attributes");
        tokio::fs::write(&path, changeset::NEUTRAL_ATTRIBUTES)
            .await
            .map_err(io(format!("cannot write {}", path.display())))?;
        // The installed dependencies (crate::deps) are never part of a change.
        let path = info.join("exclude");
        tokio::fs::write(&path, format!("/{}/\n", crate::sandbox::DEPS_DIR))
            .await
            .map_err(io(format!("cannot write {}", path.display())))
    }

    /// A regular file of the base commit (not a symlink, not a gitlink), as committed:
    /// what the repository defined before any change of this task.
    pub async fn base_file(&self, rel: &str) -> Option<Vec<u8>> {
        if rel.starts_with('-') || rel.split('/').any(|p| p == ".." || p.is_empty()) {
            return None;
        }
        let entry = self.git(&["ls-tree", "-z", "HEAD", "--", rel]).await.ok()?;
        let meta = entry.split(|b| *b == b'\t').next()?;
        if !(meta.starts_with(b"100644 blob ") || meta.starts_with(b"100755 blob ")) {
            return None;
        }
        self.git(&["cat-file", "blob", &format!("HEAD:{rel}")]).await.ok()
    }

    /// Removes every `.git` entry (directory, file or link) inside the working tree.
    ///
    /// Code in the sandbox can write the workspace, and a nested repository it plants there
    /// carries its own configuration (filters, textconv, fsmonitor commands) that the
    /// worker's host-side git would load and run when it scans the tree as root. The
    /// worker's own repository lives outside the workspace (`--git-dir`), so no `.git`
    /// inside it is legitimate. Links are removed, never followed.
    pub async fn purge_nested_repositories(&self) -> Result<(), WorkspaceError> {
        let root = self.dir.clone();
        tokio::task::spawn_blocking(move || purge_git_entries(&root)).await.map_err(|e| WorkspaceError::Io {
            what: "scanning the workspace".into(),
            source: std::io::Error::other(e),
        })?
    }

    /// Checks and then applies a patch to the working tree.
    pub async fn apply(&self, patch: &[u8]) -> Result<(), WorkspaceError> {
        self.git_stdin(&["apply", "--check", "--whitespace=nowarn", "-"], patch).await?;
        self.git_stdin(&["apply", "--whitespace=nowarn", "-"], patch).await?;
        self.open_to_sandbox().await
    }

    /// The tracked files of the base commit.
    pub async fn files(&self) -> Result<Vec<String>, WorkspaceError> {
        let out = self.git(&["ls-tree", "-r", "--name-only", "-z", "HEAD"]).await?;
        Ok(out.split(|b| *b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect())
    }

    /// The files of the working tree as it is now: tracked, plus untracked ones not ignored.
    pub async fn current_files(&self) -> Result<Vec<String>, WorkspaceError> {
        let out = self.git(&["ls-files", "--cached", "--others", "--exclude-standard", "-z"]).await?;
        let mut files: Vec<String> =
            out.split(|b| *b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect();
        files.sort();
        files.dedup();
        Ok(files)
    }

    /// Reads a regular file of the working tree (never through a symlink a sandbox could
    /// have planted); `None` if it is missing, not a regular file, or larger than `max`.
    pub async fn read_file(&self, rel: &str, max: u64) -> Option<Vec<u8>> {
        if rel.split('/').any(|p| p == ".." || p.is_empty()) {
            return None;
        }
        let mut path = self.dir.clone();
        for part in rel.split('/') {
            path.push(part);
            let meta = tokio::fs::symlink_metadata(&path).await.ok()?;
            if meta.file_type().is_symlink() {
                return None;
            }
        }
        let meta = tokio::fs::symlink_metadata(&path).await.ok()?;
        if !meta.is_file() || meta.len() > max {
            return None;
        }
        tokio::fs::read(&path).await.ok()
    }

    /// Where credential-named files wait outside the working tree while a sandbox runs
    /// (next to the git directory, so a rename moves them).
    pub fn stash_dir(&self) -> PathBuf {
        self.git_dir.with_extension("stash")
    }

    /// True if the base commit has anything at or under `rel`.
    pub async fn tracks(&self, rel: &str) -> bool {
        self.git(&["ls-tree", "--name-only", "HEAD", "--", rel]).await.is_ok_and(|out| !out.is_empty())
    }

    /// True if the working tree has a regular file at `rel`.
    pub async fn has_file(&self, rel: &str) -> bool {
        self.read_file(rel, u64::MAX >> 1).await.is_some()
    }

    /// Lets the sandbox user (uid 10001) write the working tree: directories and files get
    /// `a+rw` (and `a+x` where someone may already execute). Symlinks are not followed.
    pub async fn open_to_sandbox(&self) -> Result<(), WorkspaceError> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || open_tree(&dir))
            .await
            .map_err(|e| WorkspaceError::Io { what: "permission walk".into(), source: std::io::Error::other(e) })?
            .map_err(io("cannot make the workspace writable for the sandbox user"))
    }

    async fn git(&self, args: &[&str]) -> Result<Vec<u8>, WorkspaceError> {
        run_git(Some(self), args, None, &self.dir, self.timeout, self.output_cap).await
    }

    async fn git_stdin(&self, args: &[&str], input: &[u8]) -> Result<Vec<u8>, WorkspaceError> {
        run_git(Some(self), args, Some(input), &self.dir, self.timeout, self.output_cap).await
    }
}

fn open_tree(dir: &Path) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(dir)?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    let mode = meta.permissions().mode();
    if meta.is_dir() {
        if mode & 0o777 != 0o777 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o777))?;
        }
        for entry in std::fs::read_dir(dir)? {
            open_tree(&entry?.path())?;
        }
    } else if meta.is_file() {
        let exec = if mode & 0o111 != 0 { 0o111 } else { 0 };
        let want = mode | 0o666 | exec;
        if want != mode {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(want))?;
        }
    }
    Ok(())
}

/// Runs git with the fleet's safety settings; stdout on success, stderr in the error.
/// Depth-first removal of every entry named `.git` (any case) below `root`; symlinks are
/// never followed.
fn purge_git_entries(root: &Path) -> Result<(), WorkspaceError> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(WorkspaceError::Io { what: format!("cannot list {}", dir.display()), source: e }),
        };
        for entry in entries {
            let entry =
                entry.map_err(|e| WorkspaceError::Io { what: format!("cannot list {}", dir.display()), source: e })?;
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path)
                .map_err(|e| WorkspaceError::Io { what: format!("cannot stat {}", path.display()), source: e })?;
            if entry.file_name().to_string_lossy().eq_ignore_ascii_case(".git") {
                tracing::warn!(path = %path.display(), "Removed a nested .git from the workspace.");
                let removed = if meta.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
                removed
                    .map_err(|e| WorkspaceError::Io { what: format!("cannot remove {}", path.display()), source: e })?;
            } else if meta.is_dir() {
                stack.push(path);
            }
        }
    }
    Ok(())
}

async fn run_git(
    ws: Option<&Workspace>,
    args: &[&str],
    input: Option<&[u8]>,
    cwd: &Path,
    timeout: Duration,
    output_cap: usize,
) -> Result<Vec<u8>, WorkspaceError> {
    let mut cmd = tokio::process::Command::new("git");
    for setting in [
        "protocol.allow=never",
        "protocol.file.allow=always",
        "protocol.https.allow=always",
        "protocol.http.allow=always",
        "protocol.git.allow=always",
        "protocol.ext.allow=never",
        "core.hooksPath=/dev/null",
        "core.fsmonitor=false",
        // Never descend into (or run anything of) a nested repository the sandbox planted.
        "diff.ignoreSubmodules=all",
        "status.submoduleSummary=false",
        "submodule.recurse=false",
        "core.attributesFile=/dev/null",
        "user.name=agentfleet",
        "user.email=agentfleet@localhost",
    ] {
        cmd.arg("-c").arg(setting);
    }
    if let Some(ws) = ws {
        // The workspace is written by uid 10001 in the sandbox; trust exactly this
        // repository and work tree, nothing else.
        cmd.arg("-c").arg(format!("safe.directory={}", ws.git_dir.display()));
        cmd.arg("-c").arg(format!("safe.directory={}", ws.dir.display()));
        cmd.arg("--git-dir").arg(&ws.git_dir).arg("--work-tree").arg(&ws.dir);
    }
    cmd.args(args)
        .current_dir(cwd)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_ASKPASS", "/bin/false")
        .env("SSH_ASKPASS", "/bin/false")
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let command = args.first().copied().unwrap_or("").to_owned();
    let mut child = cmd.spawn().map_err(io("cannot run git (is it installed?)"))?;
    if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
        let data = data.to_vec();
        tokio::spawn(async move {
            let _ = stdin.write_all(&data).await;
        });
    }
    let out = match tokio::time::timeout(timeout, childio::capped_output(&mut child, output_cap)).await {
        Ok(out) => out.map_err(io(format!("git {command}")))?,
        Err(_) => return Err(WorkspaceError::Timeout { command, secs: timeout.as_secs() }),
    };
    let Some(stdout) = out.stdout else {
        tracing::warn!(command = %command, cap = output_cap, "Git wrote more than the output cap; killed.");
        return Err(WorkspaceError::OutputTooLarge { command, cap: output_cap });
    };
    if out.status.success() {
        Ok(stdout)
    } else {
        let detail = String::from_utf8_lossy(&out.stderr);
        let detail: String = detail.trim().chars().take(2000).collect();
        Err(WorkspaceError::Git { command, detail: if detail.is_empty() { out.status.to_string() } else { detail } })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_paths() {
        let root = Path::new("/workspace");
        assert_eq!(check_workspace_path(root, "/workspace/task-1").unwrap(), PathBuf::from("task-1"));
        for bad in ["/workspace", "/workspace/../etc", "/tmp/x", "workspace/task", "/workspace/./x", "/workspacex/a"] {
            assert!(check_workspace_path(root, bad).is_err(), "{bad}");
        }
        assert!(check_workspace_path(root, "/workspace/.agentfleet-git/x").is_err());
    }

    #[test]
    fn repository_sources() {
        for ok in ["/srv/repo.git", "./repo", "file:///srv/r.git", "https://example.invalid/r.git", "git://h/r"] {
            assert!(check_repository(ok).is_ok(), "{ok}");
        }
        for bad in ["ext::sh -c id", "fd::3", "ssh://h/r", "git@github.com:a/b", "-uploadpack=x", "", "host:repo"] {
            assert!(check_repository(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn clone_change_diff_reset() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("a.txt"), "a\n").unwrap();
        let git = |args: &[&str]| {
            let ok = std::process::Command::new("git")
                .args(["-c", "user.name=t", "-c", "user.email=t@t"])
                .args(args)
                .current_dir(&src)
                .output()
                .unwrap()
                .status
                .success();
            assert!(ok, "{args:?}");
        };
        git(&["init", "-q"]);
        git(&["add", "."]);
        git(&["commit", "-qm", "init"]);
        let root = tmp.path().join("ws");
        std::fs::create_dir(&root).unwrap();
        let rel = check_workspace_path(&root, &root.join("task-1").to_string_lossy()).unwrap();
        let repo = src.to_string_lossy().into_owned();
        let ws = Workspace::prepare(&root, &rel, Some(&repo), Duration::from_secs(30)).await.unwrap();
        assert!(!ws.dir.join(".git").exists(), "the git dir stays outside the workspace");
        assert_eq!(std::fs::read_to_string(ws.dir.join("a.txt")).unwrap(), "a\n");
        std::fs::write(ws.dir.join("b.txt"), "b\n").unwrap();
        let patch = "--- a/a.txt\n+++ b/a.txt\n@@ -1 +1 @@\n-a\n+A\n";
        ws.apply(patch.as_bytes()).await.unwrap();
        let diff = String::from_utf8(ws.diff().await.unwrap()).unwrap();
        assert!(diff.contains("+A") && diff.contains("b/b.txt"), "{diff}");
        // A second prepare keeps the change.
        let again = Workspace::prepare(&root, &rel, None, Duration::from_secs(30)).await.unwrap();
        assert!(String::from_utf8(again.diff().await.unwrap()).unwrap().contains("+A"));
        again.reset().await.unwrap();
        assert!(again.diff().await.unwrap().is_empty());
        assert!(!ws.dir.join("b.txt").exists());
        assert!(ws.apply(b"--- a/zzz\n+++ b/zzz\n@@ -1 +1 @@\n-q\n+r\n").await.is_err());
        assert_eq!(ws.files().await.unwrap(), vec!["a.txt"]);
    }

    /// Peak resident memory of this process (nextest runs each test in its own process).
    fn peak_rss_bytes() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    }

    /// Code in the sandbox writes a 96 MiB text file; the diff of it would be about as
    /// large. With a 1 MiB cap git is killed, the step gets `OutputTooLarge`, and the
    /// worker never held the output (its peak memory grows by far less than 96 MiB).
    #[tokio::test]
    async fn a_huge_diff_fails_cleanly_without_being_held() {
        use std::io::Write as _;
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("a.txt"), "a\n").unwrap();
        for args in [&["init", "-q"][..], &["add", "."], &["commit", "-qm", "init"]] {
            let out = std::process::Command::new("git")
                .args(["-c", "user.name=t", "-c", "user.email=t@t"])
                .args(args)
                .current_dir(&src)
                .output()
                .unwrap();
            assert!(out.status.success(), "{args:?}");
        }
        let root = tmp.path().join("ws");
        std::fs::create_dir(&root).unwrap();
        let rel = check_workspace_path(&root, &root.join("task-1").to_string_lossy()).unwrap();
        let ws = Workspace::prepare(&root, &rel, Some(&src.to_string_lossy()), Duration::from_secs(60))
            .await
            .unwrap()
            .with_output_cap(1024 * 1024);
        let mut big = std::io::BufWriter::new(std::fs::File::create(ws.dir.join("big.txt")).unwrap());
        let line = [b'x'; 1023];
        for _ in 0..96 * 1024 {
            big.write_all(&line).unwrap();
            big.write_all(b"\n").unwrap();
        }
        big.into_inner().unwrap().sync_all().unwrap();
        let before = peak_rss_bytes();
        let started = std::time::Instant::now();
        let err = ws.diff().await.unwrap_err();
        assert!(
            matches!(&err, WorkspaceError::OutputTooLarge { command, cap } if command == "diff" && *cap == 1024 * 1024),
            "{err}"
        );
        let grown = peak_rss_bytes().saturating_sub(before);
        assert!(grown < 16 * 1024 * 1024, "the worker's peak memory grew by {grown} bytes");
        assert!(started.elapsed() < Duration::from_secs(30));
        // A reset (which prints nothing) still works, and then the diff is empty again.
        ws.reset().await.unwrap();
        assert!(ws.diff().await.unwrap().is_empty());
    }

    /// A nested repository planted by sandboxed code must not make the host-side git run
    /// its configured filter (reviewer's reproduction with git 2.47).
    #[tokio::test]
    async fn a_planted_nested_repository_runs_nothing_on_the_host() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("a.txt"), "a\n").unwrap();
        let run = |dir: &Path, args: &[&str]| {
            let out = std::process::Command::new("git")
                .args(["-c", "user.name=t", "-c", "user.email=t@t"])
                .args(args)
                .current_dir(dir)
                .output()
                .unwrap();
            assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        run(&src, &["init", "-q"]);
        run(&src, &["add", "."]);
        run(&src, &["commit", "-qm", "init"]);
        let root = tmp.path().join("ws");
        std::fs::create_dir(&root).unwrap();
        let rel = check_workspace_path(&root, &root.join("task-1").to_string_lossy()).unwrap();
        let ws = Workspace::prepare(&root, &rel, Some(&src.to_string_lossy()), Duration::from_secs(30)).await.unwrap();
        // What code in the sandbox could leave behind: a repository whose filter runs a command.
        let marker = tmp.path().join("pwned");
        let evil = ws.dir.join("evil");
        std::fs::create_dir(&evil).unwrap();
        run(&evil, &["init", "-q"]);
        std::fs::write(evil.join("x.txt"), "x\n").unwrap();
        std::fs::write(evil.join(".gitattributes"), "* filter=pwn\n").unwrap();
        run(&evil, &["add", "."]);
        run(&evil, &["commit", "-qm", "x"]);
        run(&evil, &["config", "filter.pwn.clean", &format!("sh -c 'touch {}; cat'", marker.display())]);
        std::fs::write(evil.join("x.txt"), "changed\n").unwrap();
        let diff = String::from_utf8(ws.diff().await.unwrap()).unwrap();
        assert!(!marker.exists(), "the planted filter ran on the host");
        assert!(!evil.join(".git").exists(), "the nested repository is removed before git looks");
        assert!(diff.contains("evil/x.txt"), "its files are an ordinary change now: {diff}");
        ws.reset().await.unwrap();
        assert!(!evil.exists());
        assert!(!marker.exists());
    }
}
