//! Where anchors go: one trait, [`AnchorSink`], and the sinks behind it.
//!
//! A sink is named by a spec ([`open`]):
//!
//! - `file:/path/anchors.jsonl`: [`FileSink`], one JSON line per anchor, opened with
//!   `O_APPEND`, each line written in one `write` and `fsync`ed.
//! - `git:/path/repo`: [`GitSink`], each anchor one commit on `refs/heads/anchors` of a
//!   git repository (bare or not; created bare when missing), through the `git` CLI; the
//!   commit's tree holds that anchor only, so a commit costs the same after a year.
//!
//! Every sink refuses an anchor that does not extend its last one
//! ([`SignedAnchor::extension_error`]), so nothing already anchored is ever replaced.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::SignedAnchor;

/// The branch a [`GitSink`] commits to.
pub const GIT_REF: &str = "refs/heads/anchors";
/// The one file in each of its commits' trees: that commit's anchor line (and a newline).
pub const GIT_FILE: &str = "anchor.json";

/// One stored anchor line, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAnchor {
    /// Where it is, for messages: `line 3`.
    pub place: String,
    /// The line, without its newline.
    pub text: String,
    /// False for a last line without its newline: cut short.
    pub complete: bool,
}

/// Why a sink failed.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The spec is not `file:PATH` or `git:PATH`.
    #[error("invalid anchor sink '{0}': expected file:/path/anchors.jsonl or git:/path/repo")]
    Spec(String),
    /// Reading or writing failed; worth retrying.
    #[error("anchor sink {sink}: {what}: {source}")]
    Io {
        /// The sink's spec.
        sink: String,
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A `git` command failed.
    #[error("anchor sink {sink}: `git {command}` failed: {stderr}")]
    Git {
        /// The sink's spec.
        sink: String,
        /// The subcommand.
        command: String,
        /// Its standard error, cut.
        stderr: String,
    },
    /// The sink refuses the anchor: it would not extend the last one, or the sink's
    /// contents are not whole. Nothing was written.
    #[error("anchor sink {sink} refuses the anchor: {why}")]
    Refused {
        /// The sink's spec.
        sink: String,
        /// Why.
        why: String,
    },
}

impl SinkError {
    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Io { .. } | Self::Git { .. })
    }
}

/// A write-once, append-only place for anchors outside Postgres.
pub trait AnchorSink: std::fmt::Debug + Send + Sync {
    /// Appends `anchor`, durably, after checking that it extends the last stored anchor;
    /// refuses ([`SinkError::Refused`]) otherwise, writing nothing.
    fn append(&self, anchor: &SignedAnchor) -> Result<(), SinkError>;

    /// Every stored anchor line, oldest first (an empty or missing sink: none).
    fn read_all(&self) -> Result<Vec<StoredAnchor>, SinkError>;

    /// The last stored anchor line: what the next anchor must extend. Sinks override it
    /// to avoid reading everything.
    fn last(&self) -> Result<Option<StoredAnchor>, SinkError> {
        Ok(self.read_all()?.pop())
    }
}

/// Opens the sink `spec` names.
pub fn open(spec: &str) -> Result<Box<dyn AnchorSink>, SinkError> {
    match spec.split_once(':') {
        Some(("file", path)) if !path.is_empty() => Ok(Box::new(FileSink::new(path))),
        Some(("git", path)) if !path.is_empty() => Ok(Box::new(GitSink::new(path))),
        _ => Err(SinkError::Spec(spec.to_owned())),
    }
}

/// Splits a sink's text into lines; a last line without a newline is incomplete.
fn split_lines(text: &str) -> Vec<StoredAnchor> {
    let mut out = Vec::new();
    let mut rest = text;
    let mut number = 0;
    while !rest.is_empty() {
        number += 1;
        let (line, complete, next) = match rest.split_once('\n') {
            Some((line, next)) => (line, true, next),
            None => (rest, false, ""),
        };
        out.push(StoredAnchor { place: format!("line {number}"), text: line.to_owned(), complete });
        rest = next;
    }
    out
}

/// The anchor in the last of `lines`, which must be whole and readable.
fn last_of(sink: &str, last: Option<&StoredAnchor>) -> Result<Option<SignedAnchor>, SinkError> {
    let Some(last) = last else { return Ok(None) };
    let refused = |why: String| SinkError::Refused { sink: sink.to_owned(), why };
    if !last.complete {
        return Err(refused(format!("its {} is incomplete; an operator must look at it", last.place)));
    }
    SignedAnchor::parse(&last.text)
        .map(Some)
        .map_err(|why| refused(format!("its {} is not an anchor ({why}); an operator must look at it", last.place)))
}

fn check_extends(sink: &str, last: Option<&SignedAnchor>, anchor: &SignedAnchor) -> Result<(), SinkError> {
    match SignedAnchor::extension_error(last, anchor) {
        None => Ok(()),
        Some(why) => {
            Err(SinkError::Refused { sink: sink.to_owned(), why: format!("{why}; anchors are never rewritten") })
        }
    }
}

/// The last line of `file`, read backwards from its end in 64 KiB steps; `None` when the
/// file is empty. A last line without its newline is incomplete.
fn last_line(file: &mut File) -> std::io::Result<Option<StoredAnchor>> {
    const STEP: u64 = 64 * 1024;
    let len = file.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok(None);
    }
    let mut tail: Vec<u8> = Vec::new();
    let mut pos = len;
    loop {
        let start = pos.saturating_sub(STEP);
        let mut chunk = vec![0; usize::try_from(pos - start).unwrap_or(0)];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&tail);
        tail = chunk;
        pos = start;
        // A newline before the last byte ends the line before the last one.
        let body = tail.get(..tail.len() - 1).unwrap_or_default();
        if let Some(i) = body.iter().rposition(|b| *b == b'\n') {
            tail.drain(..=i);
            break;
        }
        if pos == 0 {
            break;
        }
    }
    let complete = tail.last() == Some(&b'\n');
    if complete {
        tail.pop();
    }
    let text = String::from_utf8_lossy(&tail).into_owned();
    Ok(Some(StoredAnchor { place: "the last line".to_owned(), text, complete }))
}

/// An append-only file of anchor lines.
///
/// Each append opens the file with `O_APPEND` (created 0644 when missing), reads it to
/// check that the new anchor extends the last line and that the file ends with a newline,
/// writes the line and its newline in one `write`, and `fsync`s. Nothing ever truncates or
/// seeks to write. For a file the operating system itself keeps append-only, see
/// docs/operations.md ("Anchoring").
#[derive(Debug, Clone)]
pub struct FileSink {
    /// The file.
    path: PathBuf,
    /// `file:PATH`, for messages.
    spec: String,
}

impl FileSink {
    /// The sink at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let spec = format!("file:{}", path.display());
        Self { path, spec }
    }

    fn io(&self, what: &str) -> impl FnOnce(std::io::Error) -> SinkError + '_ {
        let what = what.to_owned();
        move |source| SinkError::Io { sink: self.spec.clone(), what, source }
    }
}

impl AnchorSink for FileSink {
    fn append(&self, anchor: &SignedAnchor) -> Result<(), SinkError> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o644)
            .open(&self.path)
            .map_err(self.io("open"))?;
        let stored = last_line(&mut file).map_err(self.io("read"))?;
        let last = last_of(&self.spec, stored.as_ref())?;
        check_extends(&self.spec, last.as_ref(), anchor)?;
        let mut line = anchor.line();
        line.push('\n');
        // O_APPEND: the write lands at the end whatever the file position.
        file.write_all(line.as_bytes()).map_err(self.io("append"))?;
        file.sync_all().map_err(self.io("fsync"))?;
        if stored.is_none()
            && let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty())
        {
            // A new file: make its directory entry durable too.
            File::open(dir).and_then(|d| d.sync_all()).map_err(self.io("fsync the directory"))?;
        }
        Ok(())
    }

    fn last(&self) -> Result<Option<StoredAnchor>, SinkError> {
        match File::open(&self.path) {
            Ok(mut file) => last_line(&mut file).map_err(self.io("read")),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io("open")(e)),
        }
    }

    fn read_all(&self) -> Result<Vec<StoredAnchor>, SinkError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => Ok(split_lines(&String::from_utf8_lossy(&bytes))),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(self.io("read")(e)),
        }
    }
}

/// A git repository outside the workspace: each anchor is one commit on [`GIT_REF`]
/// whose tree holds [`GIT_FILE`], that anchor's line; the commits, oldest first along
/// first parents, are the anchors in order. Written with plumbing
/// (`hash-object`, `mktree`, `commit-tree`, `update-ref` with the old value), so a
/// non-bare repository's work tree and index are never touched and a concurrent writer
/// makes the update fail instead of losing a commit. A missing repository is created bare
/// with `receive.denyNonFastForwards` and `receive.denyDeletes`, for when it is pushed to.
/// No secret is ever passed as an argument.
#[derive(Debug, Clone)]
pub struct GitSink {
    /// The repository.
    repo: PathBuf,
    /// `git:PATH`, for messages.
    spec: String,
}

/// Author and committer of anchor commits (no user configuration needed).
const GIT_IDENTITY: [(&str, &str); 4] = [
    ("GIT_AUTHOR_NAME", "agentfleet anchor"),
    ("GIT_AUTHOR_EMAIL", "anchor@agentfleet.invalid"),
    ("GIT_COMMITTER_NAME", "agentfleet anchor"),
    ("GIT_COMMITTER_EMAIL", "anchor@agentfleet.invalid"),
];

impl GitSink {
    /// The sink in the repository at `repo`.
    pub fn new(repo: impl Into<PathBuf>) -> Self {
        let repo = repo.into();
        let spec = format!("git:{}", repo.display());
        Self { repo, spec }
    }

    /// Runs `git -C REPO args…` with `stdin`; its stdout, trimmed (an object id, a config).
    fn git(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<String, SinkError> {
        run_git(&self.spec, Some(&self.repo), args, stdin).map(|s| s.trim().to_owned())
    }

    /// The tip of [`GIT_REF`], `None` before the first anchor.
    fn tip(&self) -> Result<Option<String>, SinkError> {
        let out = self.git(&["for-each-ref", "--format=%(objectname)", GIT_REF], None)?;
        Ok(Some(out).filter(|o| !o.is_empty()))
    }

    fn ensure_repo(&self) -> Result<(), SinkError> {
        if self.repo.exists() {
            return Ok(());
        }
        let path = self.repo.to_string_lossy();
        run_git(&self.spec, None, &["init", "--quiet", "--bare", "--", &path], None)?;
        self.git(&["config", "receive.denyNonFastForwards", "true"], None)?;
        self.git(&["config", "receive.denyDeletes", "true"], None)?;
        Ok(())
    }

    /// The anchor line of commit `tip` alone.
    fn tip_line(&self, tip: &str) -> Result<Option<StoredAnchor>, SinkError> {
        let content = run_git(&self.spec, Some(&self.repo), &["cat-file", "blob", &format!("{tip}:{GIT_FILE}")], None)?;
        let (text, complete) = match content.strip_suffix('\n') {
            Some(text) => (text, !text.contains('\n')),
            None => (content.as_str(), false),
        };
        let place = format!("commit {}", tip.get(..12).unwrap_or(tip));
        Ok(Some(StoredAnchor { place, text: text.to_owned(), complete }))
    }

    /// The anchor lines of the first-parent history ending at `tip`, oldest first, named
    /// by their commits. Two processes whatever the length: `rev-list`, then one
    /// `cat-file --batch` for every commit's [`GIT_FILE`].
    fn lines(&self, tip: &str) -> Result<Vec<StoredAnchor>, SinkError> {
        let commits = self.git(&["rev-list", "--reverse", "--first-parent", tip], None)?;
        let commits: Vec<&str> = commits.lines().collect();
        let mut request = String::new();
        for c in &commits {
            request.push_str(&format!("{c}:{GIT_FILE}\n"));
        }
        let out = run_git(&self.spec, Some(&self.repo), &["cat-file", "--batch"], Some(request.as_bytes()))?;
        let mut rest = out.as_str();
        let mut lines = Vec::with_capacity(commits.len());
        for c in commits {
            let place = format!("commit {}", c.get(..12).unwrap_or(c));
            let broken = |why: &str| SinkError::Refused { sink: self.spec.clone(), why: format!("{place}: {why}") };
            // "<oid> blob <size>\n<content>\n", or "<name> missing\n".
            let (header, after) = rest.split_once('\n').ok_or_else(|| broken("no answer from git cat-file"))?;
            let size: usize = match header.rsplit_once(' ') {
                Some((kind, size)) if kind.ends_with(" blob") => {
                    size.parse().map_err(|_| broken("unreadable git cat-file answer"))?
                }
                _ => return Err(broken(&format!("its tree has no {GIT_FILE}"))),
            };
            let content = after.get(..size).ok_or_else(|| broken("short git cat-file answer"))?;
            rest = after.get(size + 1..).unwrap_or("");
            let (text, complete) = match content.strip_suffix('\n') {
                Some(text) => (text, !text.contains('\n')),
                None => (content, false),
            };
            lines.push(StoredAnchor { place, text: text.to_owned(), complete });
        }
        Ok(lines)
    }
}

fn run_git(sink: &str, repo: Option<&Path>, args: &[&str], stdin: Option<&[u8]>) -> Result<String, SinkError> {
    let mut cmd = Command::new("git");
    if let Some(repo) = repo {
        cmd.arg("-C").arg(repo);
    }
    cmd.args(args)
        .envs(GIT_IDENTITY)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env_remove("GIT_INDEX_FILE")
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let command = args.first().copied().unwrap_or_default().to_owned();
    let io = |source| SinkError::Io { sink: sink.to_owned(), what: format!("run `git {command}`"), source };
    let mut child = cmd.spawn().map_err(io)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input).map_err(io)?;
    }
    let out = child.wait_with_output().map_err(io)?;
    if !out.status.success() {
        let stderr: String = String::from_utf8_lossy(&out.stderr).trim().chars().take(500).collect();
        return Err(SinkError::Git { sink: sink.to_owned(), command, stderr });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl AnchorSink for GitSink {
    fn append(&self, anchor: &SignedAnchor) -> Result<(), SinkError> {
        self.ensure_repo()?;
        let tip = self.tip()?;
        let stored = match &tip {
            Some(tip) => self.tip_line(tip)?,
            None => None,
        };
        let last = last_of(&self.spec, stored.as_ref())?;
        check_extends(&self.spec, last.as_ref(), anchor)?;
        let mut line = anchor.line();
        line.push('\n');
        let blob = self.git(&["hash-object", "-w", "--stdin"], Some(line.as_bytes()))?;
        let tree = self.git(&["mktree"], Some(format!("100644 blob {blob}\t{GIT_FILE}\n").as_bytes()))?;
        let b = anchor.body();
        let message = format!("anchor {}: seq {} (rows {}..={})\n", b.n, b.seq, b.first_seq, b.seq);
        let mut args = vec!["commit-tree", tree.as_str(), "-F", "-"];
        if let Some(tip) = &tip {
            args.extend(["-p", tip.as_str()]);
        }
        let commit = self.git(&args, Some(message.as_bytes()))?;
        // The old value makes this a compare-and-swap: a branch moved meanwhile fails.
        let old = tip.unwrap_or_else(|| "0".repeat(40));
        self.git(&["update-ref", "-m", message.trim_end(), GIT_REF, &commit, &old], None)?;
        Ok(())
    }

    fn read_all(&self) -> Result<Vec<StoredAnchor>, SinkError> {
        if !self.repo.exists() {
            return Ok(Vec::new());
        }
        match self.tip()? {
            Some(tip) => self.lines(&tip),
            None => Ok(Vec::new()),
        }
    }

    fn last(&self) -> Result<Option<StoredAnchor>, SinkError> {
        if !self.repo.exists() {
            return Ok(None);
        }
        match self.tip()? {
            Some(tip) => self.tip_line(&tip),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn specs_name_the_sink() {
        assert!(open("file:/tmp/a.jsonl").is_ok());
        assert!(open("git:/tmp/repo").is_ok());
        for bad in ["s3://bucket/x", "file:", "/tmp/a.jsonl", ""] {
            let err = open(bad).unwrap_err();
            assert!(matches!(err, SinkError::Spec(_)), "{bad}: {err}");
        }
    }

    #[test]
    fn the_last_line_is_read_from_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let long = "x".repeat(150_000);
        for (content, text, complete) in [
            ("", None, true),
            ("one\n", Some("one"), true),
            ("one\ntwo\n", Some("two"), true),
            ("one\ntw", Some("tw"), false),
            ("\n", Some(""), true),
        ] {
            std::fs::write(&path, content).unwrap();
            let last = last_line(&mut File::open(&path).unwrap()).unwrap();
            assert_eq!(last.as_ref().map(|l| l.text.as_str()), text, "{content:?}");
            assert!(last.is_none_or(|l| l.complete == complete), "{content:?}");
        }
        // Longer than one step, on both sides of the last newline.
        std::fs::write(&path, format!("{long}\n{long}y\n")).unwrap();
        let last = last_line(&mut File::open(&path).unwrap()).unwrap().unwrap();
        assert_eq!((last.text.len(), last.complete), (150_001, true));
        std::fs::write(&path, &long).unwrap();
        let last = last_line(&mut File::open(&path).unwrap()).unwrap().unwrap();
        assert_eq!((last.text.len(), last.complete), (150_000, false));
    }

    #[test]
    fn a_last_line_without_newline_is_incomplete() {
        let lines = split_lines("a\nb\nc");
        assert_eq!(lines.len(), 3);
        assert_eq!((lines[2].place.as_str(), lines[2].complete), ("line 3", false));
        assert!(lines[1].complete);
        assert!(split_lines("").is_empty());
        assert_eq!(split_lines("\n")[0].text, "");
    }
}
