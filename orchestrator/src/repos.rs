//! Where a task's repository may come from (`[repositories]`), checked at intake.
//!
//! A task names the repository that workers clone and the orchestrator later pushes to. Left
//! open, that is a way to make the fleet fetch from anywhere (an attacker's server, a
//! plaintext mirror anyone on the path can rewrite), to carry a credential in a URL into
//! envelopes, logs and process arguments, or to clone another task's workspace from the
//! shared disk. Only configured hosts (over TLS unless plaintext is allowed) and local paths
//! under configured roots pass; nothing is allowed by default.

use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

/// `[repositories]` in the orchestrator's configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoPolicy {
    /// Hosts that `https://` repositories may name (`git.example.com`; `*.example.com`
    /// allows its subdomains). Empty: no remote repository.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Directories under which local repositories (absolute paths or `file://` URLs) may
    /// be named. Empty: no local repository.
    #[serde(default)]
    pub local_roots: Vec<PathBuf>,
    /// Also accept `http://` and `git://` from the allowed hosts (off: anyone on the path
    /// could change what the fleet fetches).
    #[serde(default)]
    pub allow_plaintext: bool,
}

impl RepoPolicy {
    /// A policy that allows local repositories under `root` only (tests, the demo).
    pub fn local(root: impl Into<PathBuf>) -> Self {
        Self { local_roots: vec![root.into()], ..Self::default() }
    }

    /// Checks `repo` for a task whose workspaces live under `workspace_root`; the error says
    /// what is wrong and which setting allows it.
    pub fn check(&self, repo: &str, workspace_root: &str) -> Result<(), String> {
        // Whatever precedes an '@' may be a credential: never echoed.
        let visible = repo.rsplit_once('@').map_or(repo.to_owned(), |(_, host)| format!("…@{host}"));
        let shown: String = visible.chars().take(200).collect();
        if repo.is_empty() || repo.starts_with('-') || repo.chars().any(char::is_control) {
            return Err(format!("`repository` {shown:?} is not a usable location"));
        }
        if repo.contains("::") {
            return Err(format!("`repository` {shown:?} names a git remote helper, which is never allowed"));
        }
        let Some((scheme, rest)) = repo.split_once("://") else {
            if looks_like_scp(repo) {
                return Err(format!(
                    "`repository` {shown:?} is an ssh location; workers clone over https or from local roots"
                ));
            }
            return self.check_local(Path::new(repo), &shown, workspace_root);
        };
        let scheme = scheme.to_ascii_lowercase();
        match scheme.as_str() {
            "file" => return self.check_local(Path::new(rest), &shown, workspace_root),
            "https" => {}
            "http" | "git" if self.allow_plaintext => {}
            "http" | "git" => {
                return Err(format!(
                    "`repository` {shown:?} uses plaintext {scheme}://; use https://, or set \
                     `repositories.allow_plaintext = true`"
                ));
            }
            other => {
                return Err(format!("`repository` transport {other}:// is not allowed; use https:// or a local path"));
            }
        }
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        if authority.contains('@') {
            return Err(
                "`repository` embeds credentials in its URL; give the orchestrator a git credential helper instead"
                    .into(),
            );
        }
        let host = host_of(authority).to_ascii_lowercase();
        if host.is_empty() || host.contains('%') {
            return Err(format!("`repository` {shown:?} has no usable host"));
        }
        if self.allowed_hosts.iter().any(|h| host_matches(&h.to_ascii_lowercase(), &host)) {
            Ok(())
        } else {
            Err(format!(
                "`repository` host {host:?} is not allowed; add it to `repositories.allowed_hosts` in the \
                 orchestrator's configuration"
            ))
        }
    }

    fn check_local(&self, path: &Path, shown: &str, workspace_root: &str) -> Result<(), String> {
        if !path.is_absolute() {
            return Err(format!("`repository` {shown:?} must be an absolute path or an https:// URL"));
        }
        if path.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir)) {
            return Err(format!("`repository` {shown:?} contains '..' or '.'"));
        }
        if path.starts_with(workspace_root) {
            return Err(format!(
                "`repository` {shown:?} is inside the fleet's workspace root: a task may not clone another's workspace"
            ));
        }
        if self.local_roots.iter().any(|root| path.starts_with(root) && path != root.as_path()) {
            Ok(())
        } else {
            Err(format!(
                "`repository` {shown:?} is not under a configured local root; add its directory to \
                 `repositories.local_roots` in the orchestrator's configuration"
            ))
        }
    }
}

/// `host`, `host:port` or `[v6]:port` without the port.
fn host_of(authority: &str) -> &str {
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or("");
    }
    authority.split(':').next().unwrap_or("")
}

fn host_matches(allowed: &str, host: &str) -> bool {
    match allowed.strip_prefix("*.") {
        Some(domain) => host.strip_suffix(domain).is_some_and(|sub| sub.ends_with('.') && sub.len() > 1),
        None => allowed == host,
    }
}

/// `user@host:path` or `host:path` (git's scp-like ssh syntax): a ':' before any '/'.
fn looks_like_scp(repo: &str) -> bool {
    match (repo.find(':'), repo.find('/')) {
        (Some(c), Some(s)) => c < s,
        (Some(_), None) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RepoPolicy {
        RepoPolicy {
            allowed_hosts: vec!["git.example".into(), "*.corp.example".into()],
            local_roots: vec!["/srv/repos".into()],
            allow_plaintext: false,
        }
    }

    #[test]
    fn allowed_sources_pass() {
        let p = policy();
        for ok in [
            "https://git.example/app.git",
            "https://GIT.example:8443/app.git",
            "https://src.corp.example/team/app",
            "/srv/repos/app.git",
            "file:///srv/repos/team/app.git",
        ] {
            assert_eq!(p.check(ok, "/workspace"), Ok(()), "{ok}");
        }
    }

    #[test]
    fn everything_else_is_refused_with_the_setting_named() {
        let p = policy();
        let cases = [
            ("https://evil.example/app.git", "repositories.allowed_hosts"),
            ("https://corp.example/app.git", "repositories.allowed_hosts"),
            ("https://git.example.evil.example/app.git", "repositories.allowed_hosts"),
            ("http://git.example/app.git", "repositories.allow_plaintext"),
            ("git://git.example/app.git", "repositories.allow_plaintext"),
            ("HTTPS://user:ghp_secret@git.example/app.git", "credential helper"),
            ("https://token@git.example/app.git", "credential helper"),
            ("ssh://git@git.example/app.git", "not allowed"),
            ("git@git.example:app.git", "ssh location"),
            ("deploy:ghp_secret@git.example:app.git", "ssh location"),
            ("ext::sh -c touch% /tmp/pwned", "remote helper"),
            ("/srv/other/app.git", "repositories.local_roots"),
            ("/srv/repos", "repositories.local_roots"),
            ("/srv/repos/../other/app.git", "'..'"),
            ("file:///etc/app.git", "repositories.local_roots"),
            ("relative/app.git", "absolute path"),
            ("--upload-pack=evil", "not a usable location"),
            ("https://git.example/a\napp", "not a usable location"),
            ("https://%67it.example/app.git", "no usable host"),
        ];
        for (repo, says) in cases {
            let err = p.check(repo, "/workspace").unwrap_err();
            assert!(err.contains(says), "{repo}: {err}");
            assert!(!err.contains("ghp_secret"), "the refusal never echoes a credential: {err}");
        }
        let mut wide = policy();
        wide.local_roots.push("/".into());
        let err = wide.check("/workspace/task-1", "/workspace").unwrap_err();
        assert!(err.contains("another's workspace"), "{err}");
        wide.allow_plaintext = true;
        assert_eq!(wide.check("http://git.example/app.git", "/workspace"), Ok(()));
        assert!(RepoPolicy::default().check("https://git.example/app.git", "/workspace").is_err());
    }
}
