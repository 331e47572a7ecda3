//! Reading the operator's input files and writing files that hold secrets.
//!
//! Secret files are created with mode 0600 from the start (never written first and
//! `chmod`ed after). A file that replaces another is written beside it under a temporary
//! name, synced, and renamed over it, so a crash leaves the old file or the new one, never
//! half of either.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use zeroize::Zeroizing;

use crate::exit::UsageError;

/// Mode of every file `fleetctl` writes: they all hold secrets.
pub const SECRET_MODE: u32 = 0o600;

/// A secret given by flag or `var` (`value`, from clap), else read from the file named by
/// `<var>_FILE` (Docker and Kubernetes secrets), one trailing newline dropped. Both set is
/// refused: which one was meant is not ours to guess.
pub fn secret_or_file(
    value: Option<secrecy::SecretString>,
    var: &str,
) -> Result<Option<secrecy::SecretString>, UsageError> {
    let file_var = format!("{var}_FILE");
    let Some(path) = std::env::var_os(&file_var).filter(|p| !p.is_empty()) else { return Ok(value) };
    if value.is_some() {
        return Err(UsageError::new(format!(
            "both {file_var} and the value itself (its flag or {var}) are given: give one"
        )));
    }
    let text = read_input(
        Path::new(&path),
        &format!("the secret file in {file_var}"),
        "mount the secret there or unset the variable",
    )?;
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    if text.is_empty() {
        return Err(UsageError::new(format!("the secret file in {file_var} is empty")));
    }
    Ok(Some(secrecy::SecretString::from(text.to_owned())))
}

/// The Redis URL of `tail` and `status`: flag, `FLEET_REDIS_URL`, `FLEET_REDIS_URL_FILE`,
/// else a local server.
pub fn redis_url(value: Option<secrecy::SecretString>) -> Result<secrecy::SecretString, UsageError> {
    Ok(secret_or_file(value, "FLEET_REDIS_URL")?.unwrap_or_else(|| "redis://127.0.0.1:6379".into()))
}

/// Reads a text file the operator named. Any failure is a [`UsageError`] that names the
/// file, the cause and `hint` (what to do about it).
pub fn read_input(path: &Path, what: &str, hint: &str) -> Result<Zeroizing<String>, UsageError> {
    fs::read_to_string(path)
        .map(Zeroizing::new)
        .map_err(|err| UsageError::new(format!("cannot read {what} '{}': {err}; {hint}", path.display())))
}

/// The permission bits of `path` when group or others may access it (a secret file that
/// should be 0600), `None` when it is private or can't be inspected.
pub fn exposed_mode(path: &Path) -> Option<u32> {
    let mode = fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then_some(mode)
}

/// What to do when the output file already exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    /// Stop with a [`UsageError`] that suggests `--force`.
    Refuse,
    /// Replace it atomically (the target of a symlink is replaced, not the link).
    Replace,
}

/// Writes `contents` to `path` with mode 0600. `what` names the file in messages
/// ("master file", "keyset file").
pub fn write_secret(path: &Path, what: &str, contents: &[u8], existing: Existing) -> anyhow::Result<()> {
    match existing {
        Existing::Refuse => write_new(path, what, contents),
        Existing::Replace => replace(path, what, contents),
    }
}

fn write_new(path: &Path, what: &str, contents: &[u8]) -> anyhow::Result<()> {
    let mut file = match OpenOptions::new().write(true).create_new(true).mode(SECRET_MODE).open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == ErrorKind::AlreadyExists => {
            return Err(UsageError::new(format!(
                "{what} '{}' already exists; pass --force to replace it",
                path.display()
            ))
            .into());
        }
        Err(err) => {
            return Err(err).with_context(|| format!("Failed to create {what} '{}'", path.display()));
        }
    };
    let written =
        write_and_sync(&mut file, contents).with_context(|| format!("Failed to write {what} '{}'", path.display()));
    if written.is_err() {
        // Don't leave a truncated secret behind; the write error is the one to report.
        let _ = fs::remove_file(path);
    }
    written?;
    sync_dir(&parent_dir(path))
}

fn replace(path: &Path, what: &str, contents: &[u8]) -> anyhow::Result<()> {
    // Follow a symlink so the rename replaces the file it points to, not the link.
    let target = match fs::canonicalize(path) {
        Ok(real) => real,
        Err(err) if err.kind() == ErrorKind::NotFound => path.to_path_buf(),
        Err(err) => {
            return Err(err).with_context(|| format!("Failed to resolve {what} '{}'", path.display()));
        }
    };
    let name = target.file_name().ok_or_else(|| {
        UsageError::new(format!("{what} '{}' does not name a file; give a file path", path.display()))
    })?;
    let dir = parent_dir(&target);
    let tmp = dir.join(format!(".{}.{}.tmp", name.to_string_lossy(), unique_suffix()));

    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(SECRET_MODE)
            .open(&tmp)
            .with_context(|| format!("Failed to create temporary file '{}'", tmp.display()))?;
        write_and_sync(&mut file, contents)
            .with_context(|| format!("Failed to write temporary file '{}'", tmp.display()))?;
        fs::rename(&tmp, &target)
            .with_context(|| format!("Failed to rename '{}' to {what} '{}'", tmp.display(), target.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    sync_dir(&dir)
}

fn write_and_sync(file: &mut File, contents: &[u8]) -> std::io::Result<()> {
    file.write_all(contents)?;
    file.sync_all()
}

/// Makes a new or renamed directory entry durable.
fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("Failed to sync directory '{}'", dir.display()))
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Distinct per process and per call; `create_new` refuses a leftover with the same name.
fn unique_suffix() -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{}.{nanos}", std::process::id())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn dir_entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    #[test]
    fn a_new_file_is_0600_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.toml");
        write_secret(&path, "master file", b"one", Existing::Refuse).unwrap();
        assert_eq!(mode(&path), 0o600);
        let err = write_secret(&path, "master file", b"two", Existing::Refuse).unwrap_err();
        assert!(err.is::<UsageError>(), "{err:#}");
        assert!(err.to_string().contains("--force"), "{err:#}");
        assert_eq!(fs::read(&path).unwrap(), b"one");
    }

    #[test]
    fn replacing_leaves_a_0600_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.toml");
        fs::write(&path, "old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        write_secret(&path, "master file", b"new", Existing::Replace).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(dir_entries(dir.path()), ["m.toml"]);
    }

    #[test]
    fn replacing_through_a_symlink_replaces_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.toml");
        let link = dir.path().join("link.toml");
        fs::write(&real, "old").unwrap();
        std::os::unix::fs::symlink(&real, &link).unwrap();
        write_secret(&link, "master file", b"new", Existing::Replace).unwrap();
        assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(fs::read(&real).unwrap(), b"new");
    }

    #[test]
    fn a_missing_input_names_the_file_and_the_remedy() {
        let err = read_input(Path::new("/nonexistent/x.toml"), "master file", "make one").unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("cannot read master file '/nonexistent/x.toml': ") && text.ends_with("; make one"),
            "{text}"
        );
    }

    #[test]
    fn exposed_modes_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.toml");
        fs::write(&path, "x").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(exposed_mode(&path), Some(0o640));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(exposed_mode(&path), None);
    }
}
