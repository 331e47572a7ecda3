//! Where the machine's CPU went during a run, by process name, from `/proc`; and an
//! optional `perf record` of one fleet process.
//!
//! Every process on the machine is read at the start and at the end of the measured batch
//! (`utime + stime` of `/proc/<pid>/stat`, in the kernel's USER_HZ = 100 ticks a second).
//! Short-lived processes (the workers' `git`, the sandboxes' container processes) have
//! exited by the end; their CPU reaches their parent's `cutime + cstime` when reaped and is
//! shown as `<parent> children`. Other work on the machine (another session's `rustc`, say)
//! shows under its own name: read the table with that in mind.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// `/proc`'s tick rate: USER_HZ, 100 on every Linux architecture this runs on.
const TICKS_PER_SECOND: f64 = 100.0;

#[derive(Debug, Clone)]
struct Proc {
    comm: String,
    ppid: u32,
    own: u64,
    children: u64,
}

/// Every process's CPU ticks at one moment.
#[derive(Debug, Clone, Default)]
pub(crate) struct Snapshot(HashMap<u32, Proc>);

/// Reads `/proc/*/stat`; processes that vanish while it reads are skipped.
pub(crate) fn snapshot() -> Snapshot {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return Snapshot(out) };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // `pid (comm) state ppid …`: comm may hold spaces and parentheses, so split at the last ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let comm = stat[open + 1..close].to_owned();
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // After comm: state(0) ppid(1) … utime(11) stime(12) cutime(13) cstime(14).
        let num = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
        let ppid = fields.get(1).and_then(|f| f.parse().ok()).unwrap_or(0);
        out.insert(pid, Proc { comm, ppid, own: num(11) + num(12), children: num(13) + num(14) });
    }
    Snapshot(out)
}

/// CPU seconds by process name between `before` and `after`, most first.
pub(crate) fn used(before: &Snapshot, after: &Snapshot) -> Vec<(String, f64)> {
    let mut by_name: HashMap<String, u64> = HashMap::new();
    for (pid, p) in &after.0 {
        // A pid reused by another program counts from zero.
        let old = before.0.get(pid).filter(|o| o.comm == p.comm && o.ppid == p.ppid);
        let own = p.own - old.map_or(0, |o| o.own.min(p.own));
        let children = p.children - old.map_or(0, |o| o.children.min(p.children));
        *by_name.entry(p.comm.clone()).or_default() += own;
        if children > 0 {
            *by_name.entry(format!("{} children", p.comm)).or_default() += children;
        }
    }
    let mut v: Vec<(String, f64)> =
        by_name.into_iter().filter(|(_, t)| *t > 0).map(|(n, t)| (n, t as f64 / TICKS_PER_SECOND)).collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}

/// What the inclusive view keeps: the fleet's crates, its Redis, Postgres and tracing
/// clients, signing, and `clone3` (spawning `git`).
const OWN_CODE: &[&str] = &[
    "orchestrator::",
    "bus::",
    "envelope::",
    "telemetry::",
    "sqlx_postgres::connection::executor",
    "redis::aio",
    "tracing_core::dispatcher",
    "opentelemetry",
    "clone3",
    "hmac",
    "serde_json::",
    "rmp_serde::",
];

/// A running `perf record` of one process, with call graphs.
pub(crate) struct Perf {
    child: Child,
    data: PathBuf,
}

impl Perf {
    /// Starts `perf record -g -F 499 -p <pid> -o <data>`. Fails with how to install perf
    /// when it is missing.
    pub(crate) fn start(pid: u32, data: &Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let child = Command::new("perf")
            // DWARF unwinding: Rust omits frame pointers, so `-g` alone gives broken stacks.
            .args(["record", "-q", "--call-graph", "dwarf,16384", "-F", "199", "-p", &pid.to_string(), "-o"])
            .arg(data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("Failed to run perf: install it (`apt-get install linux-perf` on Debian) or leave out --perf")?;
        Ok(Self { child, data: data.to_path_buf() })
    }

    /// Stops recording (SIGINT, as Ctrl-C would) and returns the top of two reports: self
    /// time by object (`--no-children --sort dso`) and inclusive time by function
    /// (`--children --sort sym`, the first `lines` of the fleet's own code and clients).
    pub(crate) fn finish(self, lines: usize) -> anyhow::Result<String> {
        use anyhow::Context as _;
        let pid = i32::try_from(self.child.id()).context("perf's pid")?;
        if let Some(pid) = rustix::process::Pid::from_raw(pid) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
        }
        let out = self.child.wait_with_output().context("Failed to wait for perf record")?;
        if !out.status.success() && !self.data.is_file() {
            anyhow::bail!("perf record failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
        }
        // Two views: which code the samples are in (the binary, libc, the kernel), and the
        // functions with the most time inclusive of what they call.
        let view = |args: &[&str], filter: &[&str], lines: usize| -> anyhow::Result<String> {
            let report = Command::new("perf")
                .args(["report", "--stdio", "-g", "none", "--percent-limit", "2", "-i"])
                .arg(&self.data)
                .args(args)
                .output()
                .context("Failed to run perf report")?;
            let text = String::from_utf8_lossy(&report.stdout).into_owned();
            let top: Vec<&str> = text
                .lines()
                .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                .filter(|l| filter.is_empty() || filter.iter().any(|f| l.contains(f)))
                .take(lines)
                .collect();
            Ok(top.join("\n"))
        };
        let by_dso = view(&["--no-children", "--sort", "dso"], &[], 8)?;
        // The runtime's own frames (poll, thread start) top any inclusive list and say
        // nothing; the fleet's code, its clients and process spawning do.
        let inclusive = view(&["--children", "--sort", "sym"], OWN_CODE, lines)?;
        let top = [
            format!("self time by object:\n{by_dso}"),
            format!("inclusive time by function (children, self):\n{inclusive}"),
        ];
        Ok(top.join("\n"))
    }
}
