//! Reading and writing the workspace's files for the agents' tools, never outside it.
//!
//! The workspace is also a sandbox's bind mount, and code in a sandbox can plant symbolic
//! links in it; the worker runs as root. A check of the path followed by an open by name
//! leaves a window in which a link can be swapped in, so every open here is one
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` relative to the workspace: the kernel
//! refuses any link on the way and any step out of the directory, at the moment of the open.
//! A file with more than one name (a hard link made inside the workspace, e.g. to a
//! credential file the policy hides) is refused too.

use std::io::{Read as _, Write as _};
use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};

/// Why a file could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The policy's refusal: a link on the way, a step outside, a second name.
    Refused(String),
    /// Anything else (missing, too large, not a regular file, an I/O error).
    Failed(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Refused(s) | Error::Failed(s) => f.write_str(s),
        }
    }
}

fn resolve() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS
}

fn root_fd(root: &Path) -> Result<OwnedFd, Error> {
    rustix::fs::open(root, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| Error::Failed(format!("cannot open the workspace: {e}")))
}

fn describe(rel: &str, e: rustix::io::Errno) -> Error {
    match e {
        rustix::io::Errno::LOOP | rustix::io::Errno::XDEV => {
            Error::Refused(format!("{rel} passes through a symbolic link or leaves the workspace"))
        }
        // A link where a folder is expected (opened without following it).
        rustix::io::Errno::NOTDIR => {
            Error::Refused(format!("{rel} passes through something that is not a folder (a symbolic link?)"))
        }
        rustix::io::Errno::NOENT => Error::Failed(format!("{rel}: no such file")),
        rustix::io::Errno::ISDIR => Error::Failed(format!("{rel} is a directory")),
        other => Error::Failed(format!("{rel}: {other}")),
    }
}

/// Reads a regular file of at most `max` bytes at `rel` under `root`.
pub fn read(root: &Path, rel: &str, max: u64) -> Result<Vec<u8>, Error> {
    let dir = root_fd(root)?;
    let fd =
        rustix::fs::openat2(&dir, rel, OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW, Mode::empty(), resolve())
            .map_err(|e| describe(rel, e))?;
    let st = rustix::fs::fstat(&fd).map_err(|e| describe(rel, e))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(Error::Failed(format!("{rel} is not a regular file")));
    }
    if st.st_nlink > 1 {
        return Err(Error::Refused(format!(
            "{rel} has other names (hard links); agents read only files with one name"
        )));
    }
    if st.st_size as u64 > max {
        return Err(Error::Failed(format!("{rel} is larger than {max} bytes")));
    }
    let mut out = Vec::new();
    std::fs::File::from(fd)
        .take(max + 1)
        .read_to_end(&mut out)
        .map_err(|e| Error::Failed(format!("cannot read {rel}: {e}")))?;
    if out.len() as u64 > max {
        return Err(Error::Failed(format!("{rel} is larger than {max} bytes")));
    }
    Ok(out)
}

/// Creates or replaces the regular file at `rel` under `root` with `bytes`, creating its
/// folders; mode 0666 so the sandbox user can change it too.
pub fn write(root: &Path, rel: &str, bytes: &[u8]) -> Result<(), Error> {
    let mut dir = root_fd(root)?;
    let parts: Vec<&str> = rel.split('/').collect();
    let (name, folders) = parts.split_last().ok_or_else(|| Error::Failed(format!("{rel:?} names no file")))?;
    for part in folders {
        match rustix::fs::mkdirat(&dir, *part, Mode::from_raw_mode(0o777)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(describe(rel, e)),
        }
        dir = rustix::fs::openat2(
            &dir,
            *part,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
            resolve(),
        )
        .map_err(|e| describe(rel, e))?;
    }
    let fd = rustix::fs::openat2(
        &dir,
        *name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::from_raw_mode(0o666),
        resolve(),
    )
    .map_err(|e| describe(rel, e))?;
    let st = rustix::fs::fstat(&fd).map_err(|e| describe(rel, e))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(Error::Failed(format!("{rel} exists and is not a regular file")));
    }
    if st.st_nlink > 1 {
        return Err(Error::Refused(format!("{rel} has other names (hard links); writing it would change them too")));
    }
    rustix::fs::ftruncate(&fd, 0).map_err(|e| describe(rel, e))?;
    let mut f = std::fs::File::from(fd);
    f.write_all(bytes).map_err(|e| Error::Failed(format!("cannot write {rel}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_and_escapes_are_refused_at_the_open() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("src")).unwrap();
        std::fs::write(root.join("src/a.txt"), "hello").unwrap();
        std::fs::write(root.join(".env"), "SECRET=1").unwrap();
        std::os::unix::fs::symlink("/etc", root.join("etc")).unwrap();
        std::os::unix::fs::symlink("a.txt", root.join("src/link.txt")).unwrap();
        std::fs::hard_link(root.join(".env"), root.join("src/copy.txt")).unwrap();

        assert_eq!(read(root, "src/a.txt", 100).unwrap(), b"hello");
        assert!(read(root, "etc/passwd", 1 << 20).unwrap_err().to_string().contains("symbolic link"));
        assert!(read(root, "src/link.txt", 100).unwrap_err().to_string().contains("symbolic link"));
        assert!(read(root, "../x", 100).unwrap_err().to_string().contains("leaves the workspace"));
        assert!(read(root, "src/copy.txt", 100).unwrap_err().to_string().contains("hard links"));
        assert!(read(root, "src/a.txt", 3).unwrap_err().to_string().contains("larger than 3"));
        assert!(read(root, "src", 100).is_err());

        write(root, "new/deep/file.txt", b"x").unwrap();
        assert_eq!(std::fs::read(root.join("new/deep/file.txt")).unwrap(), b"x");
        write(root, "src/a.txt", b"hi").unwrap();
        assert_eq!(std::fs::read(root.join("src/a.txt")).unwrap(), b"hi");
        assert!(write(root, "etc/cron.d/x", b"* * * * * root id").unwrap_err().to_string().contains("symbolic link"));
        assert!(!Path::new("/etc/cron.d/x").exists());
        assert!(write(root, "src/link.txt", b"x").unwrap_err().to_string().contains("symbolic link"));
        assert!(write(root, "src/copy.txt", b"x").unwrap_err().to_string().contains("hard links"));
        assert_eq!(std::fs::read(root.join(".env")).unwrap(), b"SECRET=1");
    }
}
