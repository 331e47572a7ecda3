//! Unified diffs as text: pulling one out of a model's answer, the paths it touches, the
//! lines it adds, and whether a path is inside a task's scope.

/// A line a diff adds, with its place in the new file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddedLine {
    /// The repository path (`b/` side).
    pub file: String,
    /// 1-based line number in the new file.
    pub line: usize,
    /// The line without its `+`.
    pub text: String,
}

/// The unified diff in a model's answer: a fenced ```` ```diff ```` (or ```` ```patch ````)
/// block, else any fenced block that looks like a diff, else the text from the first
/// `diff --git` or `--- ` line on. `None` when there is none. The result ends in a newline.
pub fn extract_diff(answer: &str) -> Option<String> {
    let looks_like_diff = |s: &str| s.lines().any(|l| l.starts_with("+++ ")) && s.lines().any(|l| l.starts_with("@@"));
    let mut blocks = Vec::new();
    let mut rest = answer;
    while let Some(start) = rest.find("```") {
        let after = &rest[start + 3..];
        let (info, body) = after.split_once('\n').unwrap_or((after, ""));
        let Some(end) = find_fence_end(body) else { break };
        blocks.push((info.trim().to_ascii_lowercase(), &body[..end]));
        rest = &body[end..];
        rest = rest.get(3..).unwrap_or("");
    }
    let chosen = blocks
        .iter()
        .find(|(info, body)| (info == "diff" || info == "patch") && looks_like_diff(body))
        .or_else(|| blocks.iter().find(|(_, body)| looks_like_diff(body)))
        .map(|(_, body)| (*body).to_owned())
        .or_else(|| {
            let mut offset = 0;
            for line in answer.split_inclusive('\n') {
                if line.starts_with("diff --git ") || line.starts_with("--- ") {
                    return Some(answer[offset..].to_owned());
                }
                offset += line.len();
            }
            None
        })?;
    if !looks_like_diff(&chosen) {
        return None;
    }
    let mut diff = chosen;
    if !diff.ends_with('\n') {
        diff.push('\n');
    }
    Some(diff)
}

/// Index of the closing fence (a line starting with ```` ``` ````) in `body`.
fn find_fence_end(body: &str) -> Option<usize> {
    let mut offset = 0;
    for line in body.split_inclusive('\n') {
        if line.trim_start().starts_with("```") {
            return Some(offset);
        }
        offset += line.len();
    }
    None
}

/// Strips git's `a/` or `b/` prefix and surrounding quotes; `None` for `/dev/null`.
fn diff_path(raw: &str) -> Option<String> {
    let raw = raw.split('\t').next().unwrap_or(raw).trim_end();
    let raw = raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')).unwrap_or(raw);
    if raw == "/dev/null" {
        return None;
    }
    let path = raw.strip_prefix("a/").or_else(|| raw.strip_prefix("b/")).unwrap_or(raw);
    Some(path.to_owned())
}

/// Every path a diff reads or writes (old and new names, renames and copies).
pub fn touched_paths(diff: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut push = |p: Option<String>| {
        if let Some(p) = p
            && !out.contains(&p)
        {
            out.push(p);
        }
    };
    for line in diff.lines() {
        if let Some(rest) = line.strip_prefix("diff --git ") {
            // `a/x b/y`; paths with spaces are quoted by git, unquoted ones split on " b/".
            if let Some((a, b)) = rest.split_once(" b/") {
                push(diff_path(a));
                push(diff_path(&format!("b/{b}")));
            }
        } else if let Some(p) = line.strip_prefix("--- ").or_else(|| line.strip_prefix("+++ ")) {
            push(diff_path(p));
        } else if let Some(p) =
            ["rename from ", "rename to ", "copy from ", "copy to "].iter().find_map(|prefix| line.strip_prefix(prefix))
        {
            push(Some(p.to_owned()));
        }
    }
    out
}

/// The lines a diff adds, with their file and line number in the new file. Hunks are
/// followed by their line counts, so an added line that itself starts with `++ ` is not
/// mistaken for a file header.
pub fn added_lines(diff: &str) -> Vec<AddedLine> {
    let mut out = Vec::new();
    let mut file: Option<String> = None;
    let mut new_line = 0usize;
    let (mut old_left, mut new_left) = (0usize, 0usize);
    for line in diff.lines() {
        if old_left > 0 || new_left > 0 {
            match line.as_bytes().first() {
                Some(b'+') => {
                    if let Some(f) = &file {
                        out.push(AddedLine { file: f.clone(), line: new_line, text: line[1..].to_owned() });
                    }
                    new_line += 1;
                    new_left = new_left.saturating_sub(1);
                }
                Some(b'-') => old_left = old_left.saturating_sub(1),
                Some(b'\\') => {}
                _ => {
                    // Context (a blank line is context whose space was lost).
                    new_line += 1;
                    old_left = old_left.saturating_sub(1);
                    new_left = new_left.saturating_sub(1);
                }
            }
        } else if let Some(p) = line.strip_prefix("+++ ") {
            file = diff_path(p);
        } else if line.starts_with("diff --git ") {
            file = None;
        } else if let Some(h) = line.strip_prefix("@@ ") {
            // @@ -a,b +c,d @@
            let range = |sign: char| -> (usize, usize) {
                let t = h.split_whitespace().find_map(|t| t.strip_prefix(sign)).unwrap_or("1");
                let mut it = t.split(',');
                let start = it.next().and_then(|n| n.parse().ok()).unwrap_or(1);
                let count = it.next().and_then(|n| n.parse().ok()).unwrap_or(1);
                (start, count)
            };
            let (_, old_count) = range('-');
            let (start, new_count) = range('+');
            new_line = start;
            old_left = old_count;
            new_left = new_count;
        }
    }
    out
}

/// Why `path` may not be changed under `scope` (repository path prefixes; empty: anything
/// inside the repository), or `None` if it may.
pub fn scope_violation(path: &str, scope: &[String]) -> Option<String> {
    if path.is_empty() || path.starts_with('/') || path.starts_with('\\') {
        return Some(format!("{path:?} is not a relative path"));
    }
    let parts: Vec<&str> = path.split('/').collect();
    if parts.contains(&"..") {
        return Some(format!("{path} leaves the repository (..)"));
    }
    if parts.iter().any(|p| p.eq_ignore_ascii_case(".git")) {
        return Some(format!("{path} is inside .git"));
    }
    if scope.is_empty() {
        return None;
    }
    let inside = scope.iter().any(|s| {
        let s = s.trim().trim_start_matches("./").trim_end_matches('/');
        s.is_empty() || path == s || path.strip_prefix(s).is_some_and(|r| r.starts_with('/'))
    });
    if inside { None } else { Some(format!("{path} is outside the task's scope ({})", scope.join(", "))) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIFF: &str = "diff --git a/calc.py b/calc.py\nindex 1..2 100644\n--- a/calc.py\n+++ b/calc.py\n@@ -1,3 +1,3 @@\n def add(a, b):\n-    return a - b\n+    return a + b \n \ndiff --git a/new.txt b/new.txt\nnew file mode 100644\n--- /dev/null\n+++ b/new.txt\n@@ -0,0 +1,2 @@\n+one\n+two\n";

    #[test]
    fn extracts_fenced_and_raw_diffs() {
        let fenced = format!("Here you go:\n```diff\n{DIFF}```\nDone.");
        assert_eq!(extract_diff(&fenced).as_deref(), Some(DIFF));
        let plain_fence = format!("```\n{DIFF}```");
        assert_eq!(extract_diff(&plain_fence).as_deref(), Some(DIFF));
        let raw = format!("Sure.\n{DIFF}");
        assert_eq!(extract_diff(&raw).as_deref(), Some(DIFF));
        assert_eq!(extract_diff("I cannot do that."), None);
        assert_eq!(extract_diff("```python\nprint(1)\n```"), None);
    }

    #[test]
    fn paths_and_added_lines() {
        assert_eq!(touched_paths(DIFF), vec!["calc.py", "new.txt"]);
        let added = added_lines(DIFF);
        assert_eq!(added.len(), 3);
        assert_eq!(added[0], AddedLine { file: "calc.py".into(), line: 2, text: "    return a + b ".into() });
        assert_eq!(added[2], AddedLine { file: "new.txt".into(), line: 2, text: "two".into() });
        let renamed = "diff --git a/x b/y\nsimilarity index 100%\nrename from x\nrename to ../y\n";
        assert!(touched_paths(renamed).contains(&"../y".to_owned()));
    }

    #[test]
    fn scope_rules() {
        let scope = vec!["src/".to_owned(), "tests".to_owned()];
        assert_eq!(scope_violation("src/a.py", &scope), None);
        assert_eq!(scope_violation("tests/t.py", &scope), None);
        assert!(scope_violation("testsuite/x", &scope).is_some());
        assert!(scope_violation("setup.py", &scope).is_some());
        assert!(scope_violation("/etc/passwd", &[]).is_some());
        assert!(scope_violation("src/../../x", &[]).is_some());
        assert!(scope_violation(".git/config", &[]).is_some());
        assert!(scope_violation("a/.GIT/hooks/pre-commit", &[]).is_some());
        assert_eq!(scope_violation("anything.txt", &[]), None);
    }
}
