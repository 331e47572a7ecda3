//! Spawning a server with its output in a log file, waiting until it is ready, and
//! stopping it.

use std::fs::{self, OpenOptions};
use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;
use std::process::{Child, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};

use crate::HarnessError;

/// How often a starting server is checked. Short, because a Postgres start is a few
/// hundred milliseconds and every test pays for the polling slack.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// How many lines of a server's log an error carries.
const TAIL_LINES: usize = 40;

/// How a server start ended.
#[derive(Debug)]
pub(crate) enum Startup {
    Ready,
    /// Another process owns the port; the caller may retry on a different one.
    PortInUse,
    Exited(ExitStatus),
    /// The child has been killed and reaped.
    TimedOut,
}

/// Opens `path` for appending and returns the server's stdout and stderr handles, plus
/// the offset at which this run's output will start, so that readiness checks and error
/// tails after a restart are not fooled by the previous run's lines.
pub(crate) fn log_stdio(path: &Path) -> Result<(Stdio, Stdio, u64), HarnessError> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(HarnessError::io(format!("open the log file {}", path.display())))?;
    let offset = file.metadata().map_err(HarnessError::io(format!("stat the log file {}", path.display())))?.len();
    let stderr = file.try_clone().map_err(HarnessError::io("duplicate the log file handle"))?;
    Ok((Stdio::from(file), Stdio::from(stderr), offset))
}

/// What the server has logged since `offset`. Lossy, because a log is for reading, and
/// a stray invalid byte must not hide the rest.
pub(crate) fn log_since(path: &Path, offset: u64) -> String {
    let bytes = fs::read(path).unwrap_or_default();
    let start = usize::try_from(offset).unwrap_or(usize::MAX).min(bytes.len());
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// The last lines of what the server logged since `offset`, for error messages.
/// What a start attempt ends in for the caller: `Ok(true)` ready, `Ok(false)` a lost port
/// race worth another attempt, or the error that names the service and quotes its log.
pub(crate) fn settle_startup(
    service: &'static str,
    startup: Startup,
    port: u16,
    attempt: u32,
    attempts: u32,
    timeout: std::time::Duration,
    log: &Path,
    offset: u64,
) -> Result<bool, HarnessError> {
    let tail = || log_tail(log, offset);
    match startup {
        Startup::Ready => Ok(true),
        Startup::PortInUse if attempt < attempts => Ok(false),
        Startup::PortInUse => {
            Err(HarnessError::PortInUse { service, port, attempts, tail: tail(), log: log.to_path_buf() })
        }
        Startup::Exited(status) => Err(HarnessError::Exited { service, status, tail: tail(), log: log.to_path_buf() }),
        Startup::TimedOut => Err(HarnessError::NotReady { service, timeout, tail: tail(), log: log.to_path_buf() }),
    }
}

pub(crate) fn log_tail(path: &Path, offset: u64) -> String {
    let text = log_since(path, offset);
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n");
    if tail.is_empty() { "(the log is empty)".to_owned() } else { tail }
}

/// A port that was free a moment ago. The server binds it later, so another process can
/// take it in between; callers detect that from the server's log and retry.
pub(crate) fn free_port() -> Result<u16, HarnessError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(HarnessError::io("bind 127.0.0.1:0 to find a free port"))?;
    let port = listener.local_addr().map_err(HarnessError::io("read the address of a bound socket"))?.port();
    Ok(port)
}

/// Waits until the server's log since `offset` contains `ready_line` and `probe` then
/// succeeds.
///
/// The log line is the identity check: it comes from *our* child, so if `probe` (which
/// talks to the port) answers after it, the answer cannot come from some other process
/// that happened to own the port. The probe is the liveness check the callers' clients
/// will rely on.
pub(crate) fn wait_until_ready(
    child: &mut Child,
    log: &Path,
    offset: u64,
    ready_line: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> bool,
) -> Result<Startup, HarnessError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().map_err(HarnessError::io("poll a starting server"))? {
            let output = log_since(log, offset);
            return Ok(if output.contains("Address already in use") {
                Startup::PortInUse
            } else {
                Startup::Exited(status)
            });
        }
        if log_since(log, offset).contains(ready_line) && probe() {
            return Ok(Startup::Ready);
        }
        if Instant::now() >= deadline {
            // Never leave a half-started server behind a failed test.
            kill(child);
            return Ok(Startup::TimedOut);
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Sends `signal`, waits up to `grace` for the process to exit, then kills it outright.
/// Returns at once if the process has already exited.
pub(crate) fn stop(child: &mut Child, signal: Signal, grace: Duration) {
    if !matches!(child.try_wait(), Ok(None)) {
        return;
    }
    // The child has not been reaped, so its pid cannot have been reused.
    let _ = kill_process(Pid::from_child(child), signal);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(None) => thread::sleep(POLL_INTERVAL),
            Ok(Some(_)) | Err(_) => break,
        }
    }
    kill(child);
}

/// SIGKILL and reap: what a crash looks like to the server's data files. A no-op for a
/// process that has already been reaped.
pub(crate) fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_tail_keeps_only_the_last_lines_after_the_offset() {
        let dir = tempfile::tempdir().expect("create a temp dir");
        let path = dir.path().join("server.log");
        fs::write(&path, "old run\n").expect("write the log");
        let offset = fs::metadata(&path).expect("stat the log").len();
        let lines: String = (0..100).map(|i| format!("line {i}\n")).collect();
        fs::write(&path, format!("old run\n{lines}")).expect("write the log");

        let tail = log_tail(&path, offset);
        assert!(!tail.contains("old run"), "{tail}");
        assert!(tail.starts_with("line 60\n"), "{tail}");
        assert!(tail.ends_with("line 99"), "{tail}");
    }

    #[test]
    fn an_empty_log_says_so() {
        let dir = tempfile::tempdir().expect("create a temp dir");
        assert_eq!(log_tail(&dir.path().join("missing.log"), 0), "(the log is empty)");
    }

    #[test]
    fn free_ports_are_nonzero() {
        assert_ne!(free_port().expect("bind a loopback port"), 0);
    }
}
