//! What a change is, for agentfleet: one content-addressed artefact that QA and Review
//! judge and the orchestrator later pushes, read the way `git apply` will read it.
//!
//! A diff is only text to the worker that reviews it, but to `git apply` it also carries
//! file modes, gitlinks, symlinks, binary patches and renames. Whatever Review cannot read
//! (a binary patch, a `.gitattributes` that turns the next file into one, a submodule
//! pointer, a CI workflow) must be refused unless the task's scope grants that exact path,
//! and what git finally stages must be exactly what the diff said, nothing more.
//!
//! # Layout
//! - [`ChangeId`]: the SHA-256 of the change's bytes, the name QA, Review and the push
//!   agree on.
//! - [`parse`] and [`FileChange`]: the files of a git diff (paths after `git apply`'s
//!   `-p1`, old and new modes, binary or not), following hunk lengths so an added line can
//!   never pass for a header.
//! - [`hidden_findings`]: the kinds of change Review refuses as critical unless the scope
//!   grants the exact path.
//! - [`parse_raw`] and [`compare_staged`]: git's own account of what it staged
//!   (`git diff --cached --raw -z --no-renames`) against what the diff describes.

#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod checks;
pub mod patch;

use std::collections::BTreeMap;
use std::fmt;

use sha2::{Digest, Sha256};

/// The content address of a change: lowercase hex SHA-256 of its exact bytes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChangeId(String);

impl ChangeId {
    /// The address of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(hex::encode(Sha256::digest(bytes)))
    }

    /// Parses a hex address (64 hex digits, either case; kept lowercase).
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(Self(s.to_ascii_lowercase()))
        } else {
            Err(format!("{:?} is not a SHA-256 change id (64 hex digits)", s.chars().take(80).collect::<String>()))
        }
    }

    /// The hex text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ChangeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The `info/attributes` every git directory that applies or shows a change is given: each
/// attribute that changes how git shows, converts or applies a file is made unspecified for
/// every path, and `info/attributes` outranks every `.gitattributes` of the tree. Without it
/// `*.py -diff` or `binary` turns a change into a binary patch no text review reads, and
/// `filter`, `text`, `eol`, `ident` or `working-tree-encoding` make the bytes written differ
/// from the bytes reviewed.
pub const NEUTRAL_ATTRIBUTES: &str =
    "* !diff !merge !text !eol !crlf !filter !ident !working-tree-encoding !export-subst !export-ignore !whitespace\n";

/// Regular file.
pub const MODE_FILE: u32 = 0o100644;
/// Executable regular file.
pub const MODE_EXEC: u32 = 0o100755;
/// Symbolic link.
pub const MODE_SYMLINK: u32 = 0o120000;
/// Gitlink: a submodule's commit pointer.
pub const MODE_GITLINK: u32 = 0o160000;

/// One file of a diff, as `git apply` reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileChange {
    /// The path before the change (`None`: a new file).
    pub old_path: Option<String>,
    /// The path after the change (`None`: the file is deleted).
    pub new_path: Option<String>,
    /// The mode before, when the diff states it (`old mode`, `deleted file mode`, `index`).
    pub old_mode: Option<u32>,
    /// The mode after, when the diff states it (`new mode`, `new file mode`, `index`).
    pub new_mode: Option<u32>,
    /// A `GIT binary patch` or `Binary files … differ`: content no text scan can read.
    pub binary: bool,
    /// `copy from`/`copy to`: the old path stays.
    pub copy: bool,
}

impl FileChange {
    /// The paths this change reads or writes.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        let new = self.new_path.as_deref().filter(|n| Some(*n) != self.old_path.as_deref());
        self.old_path.as_deref().into_iter().chain(new)
    }
}

/// Why a diff cannot be read as a change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError(pub String);

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unreadable diff: {}", self.0)
    }
}

impl std::error::Error for ParseError {}

/// The files of `diff`, in order. Paths lose their first component as `git apply`'s
/// default `-p1` does (whatever it is: `a/`, `b/` or `x/`), except in `rename`/`copy` lines,
/// which git reads whole. Fails on what git would read in a way this parser cannot follow
/// (a file section without any path, an unknown mode, bad quoting): a change nobody can
/// describe is never pushed.
pub fn parse(diff: &[u8]) -> Result<Vec<FileChange>, ParseError> {
    let mut files: Vec<FileChange> = Vec::new();
    let mut cur: Option<Section> = None;
    let (mut old_left, mut new_left) = (0usize, 0usize);
    for raw in diff.split(|b| *b == b'\n') {
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        if old_left > 0 || new_left > 0 {
            match line.first() {
                Some(b'+') => new_left = new_left.saturating_sub(1),
                Some(b'-') => old_left = old_left.saturating_sub(1),
                Some(b'\\') => {}
                _ => {
                    old_left = old_left.saturating_sub(1);
                    new_left = new_left.saturating_sub(1);
                }
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix(b"diff --git ") {
            if let Some(s) = cur.take() {
                files.push(s.finish()?);
            }
            let (a, b) = split_git_line(rest)?;
            cur = Some(Section { git: true, line_old: a, line_new: b, ..Section::default() });
            continue;
        }
        if let Some(rest) = line.strip_prefix(b"--- ") {
            // A traditional diff (no `diff --git`) starts a file at its `---` line.
            if cur.as_ref().is_none_or(|s| !s.git || s.minus.is_some() || s.hunks) {
                if let Some(s) = cur.take() {
                    files.push(s.finish()?);
                }
                cur = Some(Section::default());
            }
            let s = cur.as_mut().expect("set above");
            s.minus = Some(header_path(rest)?);
            continue;
        }
        let Some(s) = cur.as_mut() else { continue };
        if let Some(rest) = line.strip_prefix(b"+++ ") {
            s.plus = Some(header_path(rest)?);
        } else if let Some(h) = line.strip_prefix(b"@@ ") {
            let h = String::from_utf8_lossy(h);
            let range = |sign: char| -> usize {
                let t = h.split_whitespace().find_map(|t| t.strip_prefix(sign)).unwrap_or("1");
                let mut it = t.split(',');
                let _start = it.next();
                it.next().and_then(|n| n.parse().ok()).unwrap_or(1)
            };
            old_left = range('-');
            new_left = range('+');
            s.hunks = true;
        } else if let Some(m) = line.strip_prefix(b"new file mode ") {
            s.change.new_mode = Some(mode(m)?);
            s.created = true;
        } else if let Some(m) = line.strip_prefix(b"deleted file mode ") {
            s.change.old_mode = Some(mode(m)?);
            s.deleted = true;
        } else if let Some(m) = line.strip_prefix(b"old mode ") {
            s.change.old_mode = Some(mode(m)?);
        } else if let Some(m) = line.strip_prefix(b"new mode ") {
            s.change.new_mode = Some(mode(m)?);
        } else if let Some(rest) = line.strip_prefix(b"index ") {
            // `index abc..def 100644`: the mode, unchanged.
            if let Some(m) = rest.split(|b| *b == b' ').nth(1) {
                let m = mode(m)?;
                s.change.old_mode.get_or_insert(m);
                s.change.new_mode.get_or_insert(m);
            }
        } else if let Some(p) = line.strip_prefix(b"rename from ") {
            s.from = Some(unquote(p)?);
        } else if let Some(p) = line.strip_prefix(b"rename to ") {
            s.to = Some(unquote(p)?);
        } else if let Some(p) = line.strip_prefix(b"copy from ") {
            s.from = Some(unquote(p)?);
            s.change.copy = true;
        } else if let Some(p) = line.strip_prefix(b"copy to ") {
            s.to = Some(unquote(p)?);
            s.change.copy = true;
        } else if line == b"GIT binary patch" || (line.starts_with(b"Binary files ") && line.ends_with(b" differ")) {
            s.change.binary = true;
        }
    }
    if let Some(s) = cur.take() {
        files.push(s.finish()?);
    }
    Ok(files)
}

/// A file section being read.
#[derive(Default)]
struct Section {
    git: bool,
    line_old: Option<String>,
    line_new: Option<String>,
    /// `--- ` path; `Some(None)` is `/dev/null`.
    minus: Option<Option<String>>,
    plus: Option<Option<String>>,
    from: Option<String>,
    to: Option<String>,
    created: bool,
    deleted: bool,
    hunks: bool,
    change: FileChange,
}

impl Section {
    fn finish(self) -> Result<FileChange, ParseError> {
        let mut c = self.change;
        let old = self.from.or(self.minus.clone().flatten()).or(self.line_old);
        let new = self.to.or(self.plus.clone().flatten()).or(self.line_new);
        c.old_path = if self.created || self.minus == Some(None) { None } else { old };
        c.new_path = if self.deleted || self.plus == Some(None) { None } else { new };
        if c.old_path.is_none() && c.new_path.is_none() {
            return Err(ParseError("a file section names no path".into()));
        }
        if c.old_path.is_none() {
            c.old_mode = None;
        }
        if c.new_path.is_none() {
            c.new_mode = None;
        }
        Ok(c)
    }
}

/// `a/x b/y` of a `diff --git` line, each without its first component. Quoted names are
/// unquoted; unquoted ones are split where both halves are equal (git's own rule for
/// names with spaces), else at the first ` b/`.
fn split_git_line(rest: &[u8]) -> Result<(Option<String>, Option<String>), ParseError> {
    if rest.first() == Some(&b'"') {
        let (a, tail) = take_quoted(rest)?;
        let tail = tail.strip_prefix(b" ").unwrap_or(tail);
        let b = if tail.first() == Some(&b'"') { take_quoted(tail)?.0 } else { lossy(tail) };
        return Ok((strip_p1(&a), strip_p1(&b)));
    }
    if rest.len() % 2 == 1 {
        let half = rest.len() / 2;
        if rest[half] == b' ' {
            let (a, b) = (&rest[..half], &rest[half + 1..]);
            if strip_p1(&lossy(a)) == strip_p1(&lossy(b)) {
                return Ok((strip_p1(&lossy(a)), strip_p1(&lossy(b))));
            }
        }
    }
    let text = lossy(rest);
    match text.split_once(" b/") {
        Some((a, b)) => Ok((strip_p1(a), Some(b.to_owned()))),
        None => Ok((None, None)),
    }
}

/// The path of a `---`/`+++` line: `None` for `/dev/null`.
fn header_path(rest: &[u8]) -> Result<Option<String>, ParseError> {
    let p = if rest.first() == Some(&b'"') {
        take_quoted(rest)?.0
    } else {
        let end = rest.iter().position(|b| *b == b'\t').unwrap_or(rest.len());
        lossy(&rest[..end]).trim_end().to_owned()
    };
    if p == "/dev/null" { Ok(None) } else { Ok(strip_p1(&p)) }
}

/// `git apply -p1`: everything up to and including the first `/`.
fn strip_p1(p: &str) -> Option<String> {
    p.split_once('/').map(|(_, rest)| rest.to_owned()).filter(|r| !r.is_empty())
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn mode(m: &[u8]) -> Result<u32, ParseError> {
    let text = lossy(m);
    let t = text.trim();
    u32::from_str_radix(t, 8)
        .ok()
        .filter(|m| matches!(*m, MODE_FILE | MODE_EXEC | MODE_SYMLINK | MODE_GITLINK | 0o040000))
        .ok_or_else(|| ParseError(format!("unknown file mode {t:?}")))
}

fn unquote(p: &[u8]) -> Result<String, ParseError> {
    if p.first() == Some(&b'"') { Ok(take_quoted(p)?.0) } else { Ok(lossy(p)) }
}

/// A C-quoted name at the start of `s` (git's `quote_c_style`), and what follows it.
fn take_quoted(s: &[u8]) -> Result<(String, &[u8]), ParseError> {
    let bad = || ParseError(format!("bad quoted path {:?}", lossy(&s[..s.len().min(80)])));
    let mut out = Vec::new();
    let mut i = 1;
    while i < s.len() {
        match s[i] {
            b'"' => return Ok((String::from_utf8_lossy(&out).into_owned(), &s[i + 1..])),
            b'\\' => {
                let c = *s.get(i + 1).ok_or_else(bad)?;
                i += 2;
                match c {
                    b'n' => out.push(b'\n'),
                    b't' => out.push(b'\t'),
                    b'r' => out.push(b'\r'),
                    b'a' => out.push(7),
                    b'b' => out.push(8),
                    b'f' => out.push(12),
                    b'v' => out.push(11),
                    b'"' | b'\\' => out.push(c),
                    b'0'..=b'3' => {
                        let digits = s.get(i - 1..i + 2).ok_or_else(bad)?;
                        let v = u8::from_str_radix(std::str::from_utf8(digits).map_err(|_| bad())?, 8)
                            .map_err(|_| bad())?;
                        out.push(v);
                        i += 2;
                    }
                    _ => return Err(bad()),
                }
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Err(bad())
}

/// Whether the task's scope names `path` itself (not a folder above it): the only way to
/// let a change Review cannot read through.
pub fn granted_exactly(path: &str, scope: &[String]) -> bool {
    scope.iter().any(|s| s.trim().trim_start_matches("./") == path)
}

/// Files whose change runs code outside the task's tests or changes how the repository is
/// built and deployed: CI and workflow definitions (no CI/CD changes by agents).
fn is_ci_path(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    const DIRS: [&str; 7] =
        [".github/", ".gitlab/", ".circleci/", ".buildkite/", ".woodpecker/", ".azure-pipelines/", ".gitea/"];
    const FILES: [&str; 11] = [
        ".gitlab-ci.yml",
        ".travis.yml",
        "jenkinsfile",
        "azure-pipelines.yml",
        "bitbucket-pipelines.yml",
        ".drone.yml",
        ".woodpecker.yml",
        "appveyor.yml",
        ".appveyor.yml",
        "cloudbuild.yaml",
        ".pre-commit-config.yaml",
    ];
    DIRS.iter().any(|d| lower.starts_with(d)) || FILES.contains(&lower.as_str())
}

/// Whether writing `path` changes how git shows or applies files, how the repository is
/// built and deployed, or what the fleet itself runs; `Some(what)` names it. Review refuses
/// such a change and the agents' write tools refuse such a path, each unless the task's
/// scope names the exact path.
pub fn protected(path: &str) -> Option<&'static str> {
    let name = basename(path);
    if name.eq_ignore_ascii_case(".gitattributes") {
        return Some("git attributes file, which changes how git shows and applies files");
    }
    if name.eq_ignore_ascii_case(".gitmodules") {
        return Some("submodule definition");
    }
    if is_ci_path(path) {
        return Some("CI/CD configuration");
    }
    if path.to_ascii_lowercase().starts_with(".agentfleet/") {
        return Some("the repository's agentfleet scripts, which the fleet itself runs");
    }
    None
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// The critical findings for what a text review cannot judge, each unless the scope grants
/// the exact path: binary patches, `.gitattributes`, `.gitmodules`, gitlinks, symlinks, a
/// file made executable, CI and workflow files, and the repository's `.agentfleet/`
/// scripts (which QA and the build checks run).
pub fn hidden_findings(files: &[FileChange], scope: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut flag = |path: &str, what: &str| {
        if !granted_exactly(path, scope) {
            let f = format!("critical: {what}: {path} (only a scope that names this exact path allows it)");
            if !out.contains(&f) {
                out.push(f);
            }
        }
    };
    for f in files {
        let shown = f.new_path.as_deref().or(f.old_path.as_deref()).unwrap_or("");
        if f.binary {
            flag(shown, "binary patch, which no review can read");
        }
        for p in f.paths() {
            if let Some(what) = protected(p) {
                flag(p, what);
            }
        }
        if f.old_mode == Some(MODE_GITLINK) || f.new_mode == Some(MODE_GITLINK) {
            flag(shown, "gitlink (a submodule pointer)");
        }
        if f.new_mode == Some(MODE_SYMLINK) {
            flag(shown, "symbolic link");
        }
        if f.new_mode == Some(MODE_EXEC) && f.old_mode != Some(MODE_EXEC) {
            flag(shown, "file made executable");
        }
    }
    out
}

/// One entry of `git diff --cached --raw -z --no-renames`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Staged {
    /// The path.
    pub path: String,
    /// Mode in HEAD (0 for an added path).
    pub old_mode: u32,
    /// Mode in the index (0 for a deleted path).
    pub new_mode: u32,
    /// `A`, `D`, `M` or `T`.
    pub status: char,
}

/// Parses `git diff --cached --raw -z --no-renames` output.
pub fn parse_raw(out: &[u8]) -> Result<Vec<Staged>, ParseError> {
    let mut parts = out.split(|b| *b == 0).filter(|p| !p.is_empty());
    let mut staged = Vec::new();
    while let Some(meta) = parts.next() {
        let meta = lossy(meta);
        let fields: Vec<&str> = meta.trim_start_matches(':').split(' ').collect();
        let [old, new, _, _, status] = fields[..] else {
            return Err(ParseError(format!("unexpected raw diff entry {meta:?}")));
        };
        let path = parts.next().ok_or_else(|| ParseError(format!("raw diff entry {meta:?} has no path")))?;
        let octal = |m: &str| u32::from_str_radix(m, 8).map_err(|_| ParseError(format!("bad mode {m:?}")));
        staged.push(Staged {
            path: lossy(path),
            old_mode: octal(old)?,
            new_mode: octal(new)?,
            status: status.chars().next().unwrap_or('?'),
        });
    }
    Ok(staged)
}

/// What a path should look like after the change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Deleted,
    /// Present with this mode; `None`: whatever mode it had.
    Present(Option<u32>),
}

/// Checks that git staged exactly what `files` describe: the same paths, deletions where
/// the diff deletes, and the stated modes (an unstated mode must not change). Every
/// difference is named.
pub fn compare_staged(files: &[FileChange], staged: &[Staged]) -> Result<(), String> {
    let mut expect: BTreeMap<&str, Expect> = BTreeMap::new();
    for f in files {
        match (&f.old_path, &f.new_path) {
            (Some(old), None) => {
                expect.insert(old, Expect::Deleted);
            }
            (None, Some(new)) => {
                expect.insert(new, Expect::Present(Some(f.new_mode.unwrap_or(MODE_FILE))));
            }
            (Some(old), Some(new)) if old != new => {
                if !f.copy {
                    expect.insert(old, Expect::Deleted);
                }
                expect.insert(new, Expect::Present(f.new_mode.or(f.old_mode)));
            }
            (Some(path), Some(_)) => {
                let m = if f.old_mode != f.new_mode { f.new_mode } else { None };
                expect.insert(path, Expect::Present(m));
            }
            (None, None) => {}
        }
    }
    let mut problems = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for s in staged {
        seen.insert(s.path.as_str());
        match expect.get(s.path.as_str()) {
            None => problems.push(format!("git staged {} which the approved diff does not describe", s.path)),
            Some(Expect::Deleted) if s.status != 'D' => {
                problems.push(format!("the diff deletes {} but git staged {}", s.path, s.status))
            }
            Some(Expect::Present(_)) if s.status == 'D' => {
                problems.push(format!("git deleted {}, which the diff does not delete", s.path))
            }
            Some(Expect::Present(Some(m))) if s.new_mode != *m => {
                problems.push(format!("git staged {} with mode {:o}, the diff says {:o}", s.path, s.new_mode, m))
            }
            Some(Expect::Present(None)) if s.status != 'A' && s.new_mode != s.old_mode => problems.push(format!(
                "git changed the mode of {} from {:o} to {:o}, which the diff does not state",
                s.path, s.old_mode, s.new_mode
            )),
            Some(Expect::Present(None)) if s.status == 'A' && s.new_mode != MODE_FILE => {
                problems.push(format!("git added {} with mode {:o}, which the diff does not state", s.path, s.new_mode))
            }
            _ => {}
        }
    }
    for path in expect.keys() {
        if !seen.contains(path) {
            problems.push(format!("the diff describes {path} but git staged nothing there"));
        }
    }
    if problems.is_empty() { Ok(()) } else { Err(problems.join("; ")) }
}

#[cfg(test)]
mod tests;
