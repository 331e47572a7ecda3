//! Finding the server programs, so that a missing one fails with a message naming it.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::HarnessError;

/// Used when `PATH` is unset, which happens under some minimal CI runners.
const FALLBACK_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Resolves `program` the way a shell would: a value containing `/` is a path and must
/// exist; a bare name is looked up in `PATH`.
pub(crate) fn resolve(program: &Path, package: &'static str) -> Result<PathBuf, HarnessError> {
    if program.as_os_str().as_encoded_bytes().contains(&b'/') {
        return if is_executable(program) {
            Ok(program.to_path_buf())
        } else {
            Err(HarnessError::MissingBinary {
                binary: program.display().to_string(),
                searched: "that exact path".to_owned(),
                package,
            })
        };
    }
    let dirs = path_dirs();
    find_in(program, &dirs).ok_or_else(|| missing(program, format!("PATH={}", join(&dirs)), package))
}

/// The first of `dirs` holding an executable `name`.
pub(crate) fn find_in(name: &Path, dirs: &[PathBuf]) -> Option<PathBuf> {
    dirs.iter().map(|dir| dir.join(name)).find(|candidate| is_executable(candidate))
}

pub(crate) fn missing(name: &Path, searched: String, package: &'static str) -> HarnessError {
    HarnessError::MissingBinary { binary: name.display().to_string(), searched, package }
}

/// `dirs` as a `PATH`-style list, for messages.
pub(crate) fn join(dirs: &[PathBuf]) -> String {
    dirs.iter().map(|dir| dir.display().to_string()).collect::<Vec<_>>().join(":")
}

/// The directories of `PATH`, in order.
pub(crate) fn path_dirs() -> Vec<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from(FALLBACK_PATH));
    std::env::split_paths(&path).filter(|dir| !dir.as_os_str().is_empty()).collect()
}

fn is_executable(path: &Path) -> bool {
    path.metadata().is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_name_is_searched_in_path() {
        let found = resolve(Path::new("sh"), "dash").expect("every Debian machine has sh");
        assert!(found.is_absolute(), "{found:?}");
    }

    #[test]
    fn missing_name_reports_the_name_and_the_package() {
        let err = resolve(Path::new("fleet-testkit-no-such-program"), "redis-server")
            .expect_err("the program does not exist");
        let message = err.to_string();
        assert!(message.contains("`fleet-testkit-no-such-program` was not found"), "{message}");
        assert!(message.contains("apt-get install redis-server"), "{message}");
        assert!(message.contains("deploy/test.sh"), "{message}");
    }

    #[test]
    fn a_path_must_exist_and_is_not_searched() {
        let err = resolve(Path::new("/nonexistent/sh"), "dash").expect_err("no such file");
        assert!(matches!(err, HarnessError::MissingBinary { .. }), "{err}");
    }

    #[test]
    fn a_directory_is_not_an_executable() {
        assert!(!is_executable(Path::new("/tmp")));
    }
}
