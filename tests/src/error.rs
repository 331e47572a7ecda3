use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// Everything that can go wrong while starting or talking to a test service.
///
/// Every variant is fatal for the test that hit it: the harness never turns a missing
/// or broken service into a skipped test, because a suite that silently skips its
/// integration tests looks green while testing nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HarnessError {
    /// A program the harness needs is not installed (or not where it was told to look).
    #[error(
        "`{binary}` was not found (looked in {searched}). Install it with \
         `apt-get install {package}` (Debian), or run `deploy/test.sh`, which installs \
         redis-server and postgresql before running the tests."
    )]
    MissingBinary {
        /// The program's file name, e.g. `initdb`.
        binary: String,
        /// Where the harness looked, for the message.
        searched: String,
        /// The Debian package that provides it.
        package: &'static str,
    },

    /// PostgreSQL refuses to run as root, and there is no user to run it as instead.
    #[error(
        "Running as root, and PostgreSQL refuses to run as root, but /etc/passwd has no \
         `postgres` user to run it as. `apt-get install postgresql` creates that user."
    )]
    NoPostgresUser,

    /// A file-system or process operation failed.
    #[error("Failed to {action}: {source}")]
    Io {
        /// What the harness was doing, phrased to follow "Failed to".
        action: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// A helper program (`initdb`, `psql`, ...) ran but exited unsuccessfully.
    #[error("`{program}` failed ({status}):\n{output}")]
    CommandFailed {
        /// The command line, for the message.
        program: String,
        /// How it exited.
        status: ExitStatus,
        /// Its stdout and stderr.
        output: String,
    },

    /// `postgres --version` printed something the harness could not read a version from.
    #[error("Could not read a version number from `{binary} --version`, which printed {output:?}")]
    UnknownVersion {
        /// The `postgres` program that was asked.
        binary: PathBuf,
        /// What it printed.
        output: String,
    },

    /// The server process exited before it became ready.
    #[error("{service} exited during startup ({status}).\n--- last lines of {log} ---\n{tail}")]
    Exited {
        /// `redis-server` or `postgres`.
        service: &'static str,
        /// How it exited.
        status: ExitStatus,
        /// The server's log file, which has the whole story.
        log: PathBuf,
        /// The last lines this run logged.
        tail: String,
    },

    /// The server was still not ready when the startup timeout ran out; it has been killed.
    #[error("{service} was not ready within {timeout:?}.\n--- last lines of {log} ---\n{tail}")]
    NotReady {
        /// `redis-server` or `postgres`.
        service: &'static str,
        /// How long the harness waited.
        timeout: Duration,
        /// The server's log file, which has the whole story.
        log: PathBuf,
        /// The last lines this run logged.
        tail: String,
    },

    /// A Redis Cluster did not form, or did not fail over, in time.
    #[error("Redis Cluster not ready: {detail}")]
    ClusterNotReady {
        /// What was missing, with the nodes' view when there is one.
        detail: String,
    },

    /// Another process took the port between the harness choosing it and the server
    /// binding it, on every attempt (or on a restart, where the port cannot change).
    #[error(
        "{service} could not bind 127.0.0.1:{port}: address already in use \
         (after {attempts} attempt(s)).\n--- last lines of {log} ---\n{tail}"
    )]
    PortInUse {
        /// `redis-server` or `postgres`.
        service: &'static str,
        /// The last port tried.
        port: u16,
        /// How many ports were tried.
        attempts: u32,
        /// The server's log file, which has the whole story.
        log: PathBuf,
        /// The last lines the last attempt logged.
        tail: String,
    },
}

impl HarnessError {
    pub(crate) fn io(action: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let action = action.into();
        move |source| Self::Io { action, source }
    }
}
