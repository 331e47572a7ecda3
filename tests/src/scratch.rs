//! Directories for the servers' data and logs, and the sweeping up of those whose test
//! process died without removing them.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use tempfile::TempDir;

use crate::HarnessError;

/// Every scratch directory's name starts with this; the sweep looks at nothing else.
const PREFIX: &str = "fleet-testkit-run-";

/// Present, and locked by the owning test process, in every scratch directory.
const OWNER_LOCK: &str = "owner.lock";

/// A tmpfs: a Postgres cluster is about a thousand files, and creating files on the
/// disk of a CI virtual machine costs about half a millisecond each, against a few
/// microseconds here.
const SHM: &str = "/dev/shm";

/// Docker gives containers a 64 MiB `/dev/shm` by default, less than a few clusters
/// need; with less than this free, the harness uses the temp dir instead.
const SHM_MIN_FREE: u64 = 1 << 30;

/// A directory removed on drop, marked as belonging to this process for as long as the
/// process lives.
#[derive(Debug)]
pub(crate) struct ScratchDir {
    /// Declared first so that it is removed before the lock below is released.
    dir: TempDir,
    /// Held locked until this value drops or the process dies (the kernel releases the
    /// lock then), so that a sweep can tell a live directory from an abandoned one.
    _owner: File,
}

impl ScratchDir {
    /// Sweeps up abandoned scratch directories, then makes a new one whose name
    /// contains `kind`.
    pub(crate) fn create(kind: &str) -> Result<Self, HarnessError> {
        let root = root();
        sweep(&root);
        let dir = tempfile::Builder::new()
            .prefix(&format!("{PREFIX}{kind}-"))
            .tempdir_in(&root)
            .map_err(HarnessError::io(format!("create a directory for {kind} in {}", root.display())))?;
        // Locked before it gets its final name, so a sweep never sees it unlocked.
        let staging = dir.path().join(format!("{OWNER_LOCK}.new"));
        let owner = File::create(&staging).map_err(HarnessError::io(format!("create {}", staging.display())))?;
        owner.lock().map_err(HarnessError::io(format!("lock {}", staging.display())))?;
        fs::rename(&staging, dir.path().join(OWNER_LOCK))
            .map_err(HarnessError::io(format!("rename {}", staging.display())))?;
        Ok(Self { dir, _owner: owner })
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }
}

fn root() -> PathBuf {
    match rustix::fs::statvfs(SHM) {
        Ok(stat) if stat.f_bavail.saturating_mul(stat.f_frsize) >= SHM_MIN_FREE => SHM.into(),
        _ => std::env::temp_dir(),
    }
}

/// Removes the scratch directories under `root` whose owner lock nobody holds: their
/// test process was killed (a nextest timeout, say) before it could remove them.
///
/// Their servers died with the test's process group, or, for a Postgres server that
/// outlived it, shut themselves down once their `postmaster.pid` is gone.
fn sweep(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(PREFIX) {
            continue;
        }
        // No lock file: either being created right now, or someone else's to open.
        let Ok(lock) = File::open(entry.path().join(OWNER_LOCK)) else {
            continue;
        };
        if lock.try_lock().is_ok() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_directory_survives_a_sweep_and_an_abandoned_one_does_not() {
        let live = ScratchDir::create("unit").expect("create a scratch dir");
        let abandoned = ScratchDir::create("unit").expect("create a scratch dir");
        let abandoned_path = abandoned.path().to_path_buf();
        // What a killed process leaves behind: the directory, with nobody holding the lock.
        let ScratchDir { dir, _owner } = abandoned;
        let _kept: PathBuf = dir.keep();
        drop(_owner);

        sweep(live.path().parent().expect("a scratch dir has a parent"));
        assert!(live.path().join(OWNER_LOCK).is_file());
        assert!(!abandoned_path.exists(), "{} must be swept", abandoned_path.display());
    }
}
