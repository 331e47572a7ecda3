//! What each role's model may do, and the judge that checks every call before it runs.
//!
//! The grants come from one file (`config/agents.toml`, the worker setting `agents`; a
//! built-in copy of it when unset). The file can only narrow what the code allows a role
//! ([`ceiling`]): Review never edits, QA never edits, Refactor never runs the tests. The
//! judge ([`Judge::check`]) decides from code alone, never from what the model says:
//! the tool must be offered to the role, the step's capability lease must grant the tool's
//! action to this task and role and still be valid, every path must stay inside the
//! workspace and off the secret-file list, and writes must stay inside the task's scope.

use std::collections::BTreeSet;
use std::path::Path;

use envelope::Role;
use serde::Deserialize;
use uuid::Uuid;

use super::tools::ToolName;

/// The agents file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentsFile {
    /// Dev's grant.
    pub dev: RolePolicy,
    /// QA's grant.
    pub qa: RolePolicy,
    /// Review's grant (the LLM reviewer).
    pub review: RolePolicy,
    /// Refactor's grant.
    pub refactor: RolePolicy,
}

/// One role's grant and limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolePolicy {
    /// The tools offered to the model; `finish` is always offered.
    pub tools: Vec<ToolName>,
    /// Model calls per step; reaching it ends the step with an Error result.
    pub max_turns: u32,
    /// `max_tokens` of each model call: the longest answer of one turn.
    pub max_output_tokens: u32,
    /// Tokens (input and output) the loop may use in one step; the lease's own limit
    /// applies too, whichever is lower.
    pub max_task_tokens: u64,
    /// The conversation sent each turn is kept under this many bytes: the oldest tool
    /// results are elided first.
    #[serde(default = "default_context")]
    pub max_context_bytes: usize,
    /// Largest tool result handed back to the model, in bytes (a longer one is cut).
    #[serde(default = "default_result")]
    pub max_result_bytes: usize,
    /// Review only: whether the LLM reviewer runs next to the rules (either one blocks).
    #[serde(default)]
    pub llm_review: Option<bool>,
}

fn default_context() -> usize {
    96 * 1024
}
fn default_result() -> usize {
    16 * 1024
}

/// The built-in agents file: `config/agents.toml` as shipped.
pub const BUILT_IN: &str = include_str!("../../../config/agents.toml");

/// The most a role may ever be granted, whatever the file says.
pub fn ceiling(role: Role) -> &'static [ToolName] {
    use ToolName::*;
    match role {
        Role::Dev => {
            &[ListFiles, ReadFile, Search, ShowDiff, ReadFindings, EditFile, WriteFile, RunTests, RunCheck, Finish]
        }
        Role::Qa => &[ListFiles, ReadFile, Search, ShowDiff, ReadFindings, RunTests, Finish],
        Role::Review => &[ListFiles, ReadFile, Search, ShowDiff, ReadFindings, Finish],
        Role::Refactor => &[ListFiles, ReadFile, Search, ShowDiff, ReadFindings, EditFile, WriteFile, RunCheck, Finish],
        _ => &[],
    }
}

impl AgentsFile {
    /// Parses and checks an agents file; errors name the setting.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: AgentsFile = toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())?;
        for role in [Role::Dev, Role::Qa, Role::Review, Role::Refactor] {
            let p = file.role(role);
            for t in &p.tools {
                if !ceiling(role).contains(t) {
                    return Err(format!(
                        "{role}.tools: {} is never granted to {role} (allowed: {})",
                        t.as_str(),
                        ceiling(role).iter().map(|t| t.as_str()).collect::<Vec<_>>().join(", ")
                    ));
                }
            }
            for (name, v) in [
                ("max_turns", u64::from(p.max_turns)),
                ("max_output_tokens", u64::from(p.max_output_tokens)),
                ("max_task_tokens", p.max_task_tokens),
                ("max_result_bytes", p.max_result_bytes as u64),
            ] {
                if v == 0 {
                    return Err(format!("{role}.{name} must be at least 1"));
                }
            }
            if p.max_context_bytes < 2 * p.max_result_bytes {
                return Err(format!("{role}.max_context_bytes must be at least twice max_result_bytes"));
            }
            if p.llm_review.is_some() && role != Role::Review {
                return Err(format!("{role}.llm_review: only review has an LLM reviewer"));
            }
        }
        Ok(file)
    }

    /// The policy of a worker role.
    pub fn role(&self, role: Role) -> &RolePolicy {
        match role {
            Role::Qa => &self.qa,
            Role::Review => &self.review,
            Role::Refactor => &self.refactor,
            _ => &self.dev,
        }
    }
}

impl RolePolicy {
    /// The tools offered, `finish` included, without duplicates, in the file's order.
    pub fn offered(&self) -> Vec<ToolName> {
        let mut seen = BTreeSet::new();
        self.tools.iter().copied().chain([ToolName::Finish]).filter(|t| seen.insert(*t)).collect()
    }
}

/// The capability lease's claims the worker checks (it cannot check the signature, having
/// no lease key; the lease came in a verified `task.assign` from the orchestrator, and the
/// worker only ever uses it to refuse more).
#[derive(Debug, Clone, Deserialize)]
pub struct LeaseView {
    /// The task.
    pub task: Uuid,
    /// The role the step was assigned to.
    pub role: Role,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Actions granted, with their level.
    #[serde(default)]
    pub actions: Vec<LeaseGrant>,
    /// Tokens the task may use in all.
    #[serde(default)]
    pub max_tokens: Option<u64>,
}

/// One granted action of a lease.
#[derive(Debug, Clone, Deserialize)]
pub struct LeaseGrant {
    /// The risk matrix's action name.
    pub action: String,
}

impl LeaseView {
    /// Reads the claims of a JWT without checking its signature.
    pub fn read(lease: &str) -> Option<Self> {
        use base64::Engine as _;
        let payload = lease.split('.').nth(1)?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

/// Decides every call of one step.
#[derive(Debug, Clone)]
pub struct Judge {
    /// The role whose grant applies.
    pub role: Role,
    /// The task of the step.
    pub task: Uuid,
    /// Tools offered to this role.
    pub offered: Vec<ToolName>,
    /// The step's lease, read; `None` refuses every tool that has an action.
    pub lease: Option<LeaseView>,
    /// The task's scope (empty: the whole repository).
    pub scope: Vec<String>,
    /// The role's `max_result_bytes`, for tools that page their output.
    pub result_bytes: usize,
}

impl Judge {
    /// Whether `tool` may run now: offered to the role, and granted by a valid lease of
    /// this task and role. `Err` is the refusal, in words for the model and the audit.
    pub fn check(&self, tool: ToolName, now_secs: u64) -> Result<(), String> {
        if !self.offered.contains(&tool) {
            return Err(format!("the {} role has no {} tool", self.role, tool.as_str()));
        }
        let Some(action) = tool.action() else { return Ok(()) };
        let Some(lease) = &self.lease else {
            return Err("the step has no readable capability lease".into());
        };
        if lease.task != self.task || lease.role != self.role {
            return Err("the capability lease is for another task or role".into());
        }
        if lease.exp <= now_secs {
            return Err("the capability lease has expired".into());
        }
        if !lease.actions.iter().any(|g| g.action == action) {
            return Err(format!("the capability lease does not grant {action}"));
        }
        Ok(())
    }

    /// A path the model may read: see [`check_path`].
    pub fn readable(&self, root: &Path, path: &str) -> Result<String, String> {
        check_path(root, path)
    }

    /// A path the model may write: readable, inside the scope, and not a file that Review
    /// refuses unless the scope names it exactly (CI, `.gitattributes`, `.agentfleet/`).
    pub fn writable(&self, root: &Path, path: &str) -> Result<String, String> {
        let path = check_path(root, path)?;
        let deps = crate::sandbox::DEPS_DIR;
        if path == deps || path.starts_with(&format!("{deps}/")) {
            return Err(format!(
                "{path} is where the sandbox installs the locked dependencies; change the lockfile instead"
            ));
        }
        if let Some(v) = crate::patch::scope_violation(&path, &self.scope) {
            return Err(v);
        }
        if let Some(what) = changeset::protected(&path)
            && !changeset::granted_exactly(&path, &self.scope)
        {
            return Err(format!("{path} is {what}; only a scope that names this exact path allows writing it"));
        }
        Ok(path)
    }
}

/// The secret-file rule: names that hold credentials are never read, listed, searched or
/// written, whatever the task says. `Some(why)` when `path` is one.
pub fn secret_file(path: &str) -> Option<&'static str> {
    let lower = path.to_ascii_lowercase();
    let parts: Vec<&str> = lower.split('/').collect();
    let name = parts.last().copied().unwrap_or("");
    // Folders whose every file is a credential, wherever they are.
    for p in &parts {
        if *p == ".ssh" || *p == ".gnupg" {
            return Some("an SSH or GnuPG directory");
        }
        if *p == ".aws" || *p == ".kube" || *p == ".docker" || *p == ".azure" || *p == "gcloud" {
            return Some("cloud or cluster credentials");
        }
        if p.starts_with(".env") {
            return Some("an environment file (.env*)");
        }
        if *p == "secrets" || *p == ".secrets" {
            return Some("a secrets folder");
        }
    }
    if name.ends_with(".pem") || name.ends_with(".key") || name.ends_with(".p12") || name.ends_with(".pfx") {
        return Some("a key or certificate file");
    }
    if ["id_rsa", "id_ed25519", "id_ecdsa", "id_dsa"].iter().any(|k| name.starts_with(k)) {
        return Some("an SSH private key");
    }
    if [".npmrc", ".pypirc", ".netrc", ".git-credentials", ".dockercfg", ".htpasswd"].contains(&name) {
        return Some("a package-registry or login credentials file");
    }
    if name.starts_with("credentials.") || name == "credentials" || name.starts_with("secrets.") {
        return Some("a credentials or secrets file");
    }
    if name.ends_with(".tfvars") || name.ends_with(".tfstate") || name.ends_with(".keystore") || name.ends_with(".jks")
    {
        return Some("an infrastructure state, variables or keystore file");
    }
    None
}

/// Checks a path the model named and returns it normalized (relative, `/`-separated, no
/// `./`): refused when it is absolute or starts with `~`, leaves the workspace (`..`),
/// enters `.git`, is a secret file ([`secret_file`]), or passes through a symbolic link
/// on disk (which can resolve anywhere).
pub fn check_path(root: &Path, path: &str) -> Result<String, String> {
    let trimmed = path.trim();
    if trimmed.is_empty() {
        return Err("the path is empty".into());
    }
    if trimmed.contains('\0') || trimmed.contains('\\') {
        return Err(format!("{trimmed:?} is not a plain relative path"));
    }
    if trimmed.starts_with('/') || trimmed.starts_with('~') {
        return Err(format!("{trimmed} is outside the workspace"));
    }
    let parts: Vec<&str> = trimmed.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
    if parts.is_empty() {
        return Err(format!("{trimmed:?} names the workspace itself, not a file"));
    }
    if parts.contains(&"..") {
        return Err(format!("{trimmed} leaves the workspace (..)"));
    }
    if parts.iter().any(|p| p.eq_ignore_ascii_case(".git") || p.eq_ignore_ascii_case(crate::workspace::GIT_STORE)) {
        return Err(format!("{trimmed} is inside git's own files"));
    }
    let norm = parts.join("/");
    if let Some(why) = secret_file(&norm) {
        return Err(format!("{norm} is {why}; agents never read or write those"));
    }
    let mut at = root.to_path_buf();
    for p in &parts {
        at.push(p);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!("{norm} passes through a symbolic link, which may resolve outside the workspace"));
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_file_parses_and_respects_the_ceilings() {
        let f = AgentsFile::parse(BUILT_IN).unwrap();
        assert!(!f.review.tools.contains(&ToolName::EditFile));
        assert_eq!(f.review.llm_review, Some(true));
        assert!(f.dev.offered().contains(&ToolName::Finish));
    }

    #[test]
    fn a_file_cannot_widen_a_role() {
        let widened = BUILT_IN.replace(
            "tools = [\"show_diff\", \"read_findings\", \"list_files\", \"read_file\", \"search\"]\nllm_review",
            "tools = [\"write_file\"]\nllm_review",
        );
        assert_ne!(widened, BUILT_IN, "the test must edit the review table");
        let err = AgentsFile::parse(&widened).unwrap_err();
        assert!(err.contains("review.tools: write_file is never granted to review"), "{err}");
        let unknown = BUILT_IN
            .replace("tools = [\"list_files\", \"read_file\", \"search\", \"run_tests\"]", "tools = [\"shell\"]");
        assert!(AgentsFile::parse(&unknown).unwrap_err().contains("shell"));
    }

    #[test]
    fn secret_files_and_escapes_are_refused() {
        let root = Path::new("/nonexistent-root");
        for bad in [
            ".env",
            "app/.env.production",
            "deploy/server.pem",
            "tls/site.key",
            "home/.ssh/config",
            "id_rsa",
            "keys/id_ed25519.pub",
            ".aws/credentials",
            ".npmrc",
            "pkg/.pypirc",
            "credentials.json",
            "config/secrets.yaml",
            ".env/prod",
            "deploy/secrets/db.json",
            ".kube/config",
            ".docker/config.json",
            "prod.tfvars",
            "/etc/passwd",
            "~/.ssh/id_rsa",
            "../outside",
            "src/../../outside",
            ".git/config",
            "a\\b",
            "",
        ] {
            assert!(check_path(root, bad).is_err(), "{bad:?} must be refused");
        }
        assert_eq!(check_path(root, "./src//lib.rs").unwrap(), "src/lib.rs");
        assert_eq!(check_path(root, "environment.md").unwrap(), "environment.md");
    }

    #[test]
    fn a_symlink_on_the_way_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("real")).unwrap();
        std::os::unix::fs::symlink("/etc", dir.path().join("link")).unwrap();
        assert!(check_path(dir.path(), "real/x.txt").is_ok());
        let err = check_path(dir.path(), "link/passwd").unwrap_err();
        assert!(err.contains("symbolic link"), "{err}");
    }

    fn lease(task: Uuid, role: &str, exp: u64, actions: &[&str]) -> LeaseView {
        let acts: Vec<_> = actions.iter().map(|a| serde_json::json!({"action": a, "risk": "low"})).collect();
        serde_json::from_value(serde_json::json!({"task": task, "role": role, "exp": exp, "actions": acts})).unwrap()
    }

    #[test]
    fn the_judge_checks_grant_lease_and_scope() {
        let task = Uuid::now_v7();
        let f = AgentsFile::parse(BUILT_IN).unwrap();
        let j = Judge {
            role: Role::Review,
            task,
            offered: f.review.offered(),
            lease: Some(lease(task, "review", 2000, &["read_files"])),
            scope: vec!["src/".into()],
            result_bytes: 16_384,
        };
        assert!(j.check(ToolName::ReadFile, 1000).is_ok());
        assert_eq!(j.check(ToolName::EditFile, 1000).unwrap_err(), "the review role has no edit_file tool");
        assert_eq!(j.check(ToolName::ReadFile, 2000).unwrap_err(), "the capability lease has expired");
        let mut other = j.clone();
        other.lease = Some(lease(Uuid::now_v7(), "review", 2000, &["read_files"]));
        assert!(other.check(ToolName::Search, 1000).unwrap_err().contains("another task"));
        let mut dev = j.clone();
        dev.role = Role::Dev;
        dev.offered = f.dev.offered();
        dev.lease = Some(lease(task, "dev", 2000, &["read_files"]));
        assert_eq!(
            dev.check(ToolName::WriteFile, 1000).unwrap_err(),
            "the capability lease does not grant write_to_task_branch"
        );
        let root = Path::new("/nonexistent-root");
        assert!(dev.writable(root, "src/lib.rs").is_ok());
        assert!(dev.writable(root, "README.md").unwrap_err().contains("outside the task's scope"));
        dev.scope = vec![];
        assert!(dev.writable(root, ".github/workflows/ci.yml").unwrap_err().contains("CI/CD"));
        dev.scope = vec![".github/workflows/ci.yml".into()];
        assert!(dev.writable(root, ".github/workflows/ci.yml").is_ok());
        let mut none = j;
        none.lease = None;
        assert!(none.check(ToolName::ReadFile, 1000).unwrap_err().contains("no readable capability lease"));
        assert!(none.check(ToolName::Finish, 1000).is_ok());
    }
}
