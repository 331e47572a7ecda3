//! `fleetctl keys rotate`: the whole rotation cycle, stage → promote → retire, with the
//! waits between the steps, resumable after a crash, once or every `--every`.
//!
//! The cycle's position is the master file's own three figures (`current_generation`,
//! `signing_generation`, `retired_through`), rewritten atomically after each step:
//!
//! | master | phase | next |
//! | --- | --- | --- |
//! | `current > signing` | staged | write keysets, wait `--wait`, promote |
//! | `current = signing`, `retired_through < signing − 1` | promoted | write keysets, wait `--wait` + `--max-ttl`, retire `signing − 1` |
//! | otherwise | idle | stage `current + 1` (or, if the keyset files lag the master, write them and stop) |
//!
//! Every phase writes the keysets *before* its wait and changes the master only *after* it,
//! so a crash anywhere leaves the master at a step whose wait has not been served yet, and a
//! new run serves that wait again in full before moving on: no receiver is ever asked to
//! verify a generation its keyset file has not held for at least the wait.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use envelope::{MasterFile, PermissionTable, Process};
use tokio_util::sync::CancellationToken;

use crate::exit::UsageError;
use crate::files::{self, Existing};

/// The processes `rotate` writes a keyset for, as `<name>.keyset.toml` (the names
/// `deploy/compose/setup.sh` and `fleetctl keys master new` use).
pub const PROCESSES: [&str; 7] = ["orchestrator", "budget", "dev", "qa", "review", "refactor", "operator"];

/// Default `--wait`: well above the processes' default `keyset_reload_secs` (5 s) and a
/// Kubernetes Secret volume's refresh (kubelet sync, about a minute).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(120);

/// Default `--max-ttl`: the orchestrator's task assignments (`assign_ttl`, 1 h), the
/// longest-lived envelopes the fleet sends.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(3600);

/// The verifiers' allowed clock skew (`VerifierConfig::default().skew_ms`): an envelope
/// is accepted this long past its ttl.
pub const SKEW: Duration = Duration::from_secs(30);

/// Where a cycle stands, read from the master file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Nothing under way: the next step stages a new generation.
    Idle,
    /// `new` is staged (verify-only); senders sign with `old`.
    Staged {
        /// The signing generation.
        old: u32,
        /// The staged one.
        new: u32,
    },
    /// Senders sign with `old + 1`; `old` still verifies and is retired next.
    Promoted {
        /// The generation to retire.
        old: u32,
    },
}

impl Phase {
    /// The phase `master` is in.
    pub fn of(master: &MasterFile) -> Self {
        if master.current_generation > master.signing_generation {
            Phase::Staged { old: master.signing_generation, new: master.current_generation }
        } else if master.retired_through + 1 < master.signing_generation {
            Phase::Promoted { old: master.signing_generation - 1 }
        } else {
            Phase::Idle
        }
    }
}

/// What a cycle does and where.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The master file, rewritten after each step.
    pub master: PathBuf,
    /// The permission table the keysets are derived with.
    pub permissions: PathBuf,
    /// Where `<process>.keyset.toml` files are (re)written.
    pub keysets: PathBuf,
    /// The processes to write a keyset for (default: [`PROCESSES`]).
    pub processes: Vec<Process>,
    /// Between writing keysets and the next step: every process must have re-read its file.
    pub wait: Duration,
    /// The longest `ttl_ms` of envelopes in flight: added (with the verifiers' skew) to the
    /// wait before retiring, so nothing signed with the old generation is still valid.
    pub max_ttl: Duration,
    /// The verifiers' clock skew ([`SKEW`]), also added before retiring.
    pub skew: Duration,
    /// Run after each write of the keysets, with `FLEET_KEYSETS_DIR` set (`sh -c`): deploys
    /// them where the processes read them (a Kubernetes Secret, hosts). Failure stops the
    /// cycle; a new run resumes it.
    pub hook: Option<String>,
}

impl Plan {
    /// The wait before retiring.
    pub fn retire_wait(&self) -> Duration {
        self.wait + self.max_ttl + self.skew
    }
}

/// How a cycle ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Generation `signing` signs and everything older is retired.
    Rotated {
        /// The new signing generation.
        signing: u32,
    },
    /// The keyset files lagged the master (a cycle stopped after its last master write):
    /// they were rewritten; nothing was staged.
    Finished {
        /// The signing generation.
        signing: u32,
    },
    /// SIGINT/SIGTERM (or the caller's token) during a wait; the master file says where a
    /// new run continues.
    Interrupted(Phase),
}

/// Runs one cycle (or the rest of one): see the module documentation.
pub async fn run_cycle(plan: &Plan, out: &mut dyn Write, stop: &CancellationToken) -> anyhow::Result<Ended> {
    let permissions = crate::keys::load_permissions(&plan.permissions)?;
    let mut in_cycle = false;
    loop {
        let mut master = load_master(&plan.master)?;
        match Phase::of(&master) {
            Phase::Idle if in_cycle => {
                write_keysets(plan, &master, &permissions, out)?;
                say(
                    out,
                    &format!(
                        "Rotation done: generation {} signs; 1..={} are retired.",
                        master.signing_generation, master.retired_through
                    ),
                )?;
                return Ok(Ended::Rotated { signing: master.signing_generation });
            }
            Phase::Idle => {
                if keysets_lag(plan, &master, &permissions)? {
                    write_keysets(plan, &master, &permissions, out)?;
                    say(
                        out,
                        &format!(
                            "The keyset files in '{}' lagged the master file (a rotation stopped before its last \
                             write, or they were derived from another permission file): rewrote them. Nothing was \
                             staged; run `fleetctl keys rotate` again to rotate.",
                            plan.keysets.display()
                        ),
                    )?;
                    return Ok(Ended::Finished { signing: master.signing_generation });
                }
                let new = master.rotate().map_err(|e| {
                    UsageError::new(format!("cannot rotate master file '{}': {e}", plan.master.display()))
                })?;
                write_master(&plan.master, &master)?;
                say(out, &format!("Staged generation {new} (verify-only) in '{}'.", plan.master.display()))?;
                in_cycle = true;
            }
            phase @ Phase::Staged { old, new } => {
                in_cycle = true;
                write_keysets(plan, &master, &permissions, out)?;
                say(
                    out,
                    &format!("Waiting {} for every process to load generation {new} before it signs.", show(plan.wait)),
                )?;
                if !wait(plan.wait, stop).await {
                    return interrupted(out, phase);
                }
                master.promote();
                write_master(&plan.master, &master)?;
                say(out, &format!("Promoted generation {new}: senders sign with it; {old} still verifies."))?;
            }
            phase @ Phase::Promoted { old } => {
                in_cycle = true;
                write_keysets(plan, &master, &permissions, out)?;
                let w = plan.retire_wait();
                say(
                    out,
                    &format!(
                        "Waiting {} (--wait {} + --max-ttl {} + {} skew) until nothing signed with generation {old} is valid.",
                        show(w),
                        show(plan.wait),
                        show(plan.max_ttl),
                        show(plan.skew)
                    ),
                )?;
                if !wait(w, stop).await {
                    return interrupted(out, phase);
                }
                master.retire_through(old).map_err(|e| {
                    UsageError::new(format!("cannot retire generation {old} in '{}': {e}", plan.master.display()))
                })?;
                write_master(&plan.master, &master)?;
                say(out, &format!("Retired generation {old}."))?;
            }
        }
    }
}

fn interrupted(out: &mut dyn Write, phase: Phase) -> anyhow::Result<Ended> {
    say(
        out,
        &format!(
            "Interrupted while {}; the master file records it: run `fleetctl keys rotate` again to continue \
             (it waits again in full before the next step).",
            match phase {
                Phase::Staged { new, .. } => format!("waiting to promote generation {new}"),
                Phase::Promoted { old } => format!("waiting to retire generation {old}"),
                Phase::Idle => "idle".to_owned(),
            }
        ),
    )?;
    Ok(Ended::Interrupted(phase))
}

/// Sleeps `d`; false when `stop` came first.
async fn wait(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => true,
        () = stop.cancelled() => false,
    }
}

fn keyset_path(dir: &Path, process: Process) -> PathBuf {
    dir.join(format!("{process}.keyset.toml"))
}

/// True when an existing keyset file differs from what the master derives now.
fn keysets_lag(plan: &Plan, master: &MasterFile, permissions: &PermissionTable) -> anyhow::Result<bool> {
    for &p in &plan.processes {
        let path = keyset_path(&plan.keysets, p);
        match std::fs::read(&path) {
            Ok(bytes) => {
                if bytes != master.derive_keyset(p, permissions).to_toml().as_bytes() {
                    return Ok(true);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("Failed to read keyset file '{}'", path.display())),
        }
    }
    Ok(false)
}

fn write_keysets(
    plan: &Plan,
    master: &MasterFile,
    permissions: &PermissionTable,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    for &p in &plan.processes {
        let path = keyset_path(&plan.keysets, p);
        files::write_secret(
            &path,
            "keyset file",
            master.derive_keyset(p, permissions).to_toml().as_bytes(),
            Existing::Replace,
        )?;
    }
    say(
        out,
        &format!(
            "Wrote {} keysets to '{}' (signing {}, newest {}, retired through {}).",
            plan.processes.len(),
            plan.keysets.display(),
            master.signing_generation,
            master.current_generation,
            master.retired_through
        ),
    )?;
    if let Some(hook) = &plan.hook {
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(hook)
            .env("FLEET_KEYSETS_DIR", &plan.keysets)
            .status()
            .with_context(|| "Failed to start the --deploy-hook command with sh -c")?;
        if !status.success() {
            anyhow::bail!(
                "the --deploy-hook command failed ({status}); the master file records the step: fix the hook and run \
                 `fleetctl keys rotate` again to continue"
            );
        }
    }
    Ok(())
}

fn load_master(path: &Path) -> Result<MasterFile, UsageError> {
    let text = files::read_input(path, "master file", "create one with `fleetctl keys master new`")?;
    crate::keys::warn_if_exposed(path, "master file");
    MasterFile::parse(&text).map_err(|e| {
        UsageError::new(format!("invalid master file '{}': {e}; restore it from your backup", path.display()))
    })
}

fn write_master(path: &Path, master: &MasterFile) -> anyhow::Result<()> {
    files::write_secret(path, "master file", master.to_toml().as_bytes(), Existing::Replace)
}

fn say(out: &mut dyn Write, line: &str) -> anyhow::Result<()> {
    writeln!(out, "{line}").and_then(|()| out.flush()).context("Failed to write to stdout")
}

fn show(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else if !ms.is_multiple_of(60_000) || ms == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{}m", ms / 60_000)
    }
}

/// `--every`: a cycle, then a pause of `every`, until `stop`. A cycle that fails is
/// reported and retried after the pause (the master file says where it resumes).
pub async fn run_every(
    plan: &Plan,
    every: Duration,
    out: &mut dyn Write,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    loop {
        match run_cycle(plan, out, stop).await {
            Ok(Ended::Interrupted(_)) => return Ok(()),
            Ok(_) => {}
            // A usage error (bad master, bad permissions) will not fix itself: stop.
            Err(e) if e.chain().any(|c| c.is::<UsageError>()) => return Err(e),
            Err(e) => crate::keys::warn(&format!("rotation failed: {e:#}; retrying in {}", show(every))),
        }
        say(out, &format!("Next rotation in {}.", show(every)))?;
        if !wait(every, stop).await {
            return Ok(());
        }
    }
}

/// Cancels `stop` on SIGINT or SIGTERM.
pub fn stop_on_signals(stop: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).context("Failed to install the SIGINT handler")?;
    let mut terminate = signal(SignalKind::terminate()).context("Failed to install the SIGTERM handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        stop.cancel();
    });
    Ok(())
}

/// `--wait 2m`: `1500ms`, `30s`, `5m`, `1h`, or seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("'{text}' is not a duration like 500ms, 30s, 5m or 1h"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        "h" => Ok(Duration::from_secs(n.saturating_mul(3600))),
        _ => Err(format!("'{text}' is not a duration like 500ms, 30s, 5m or 1h")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use envelope::MasterSecret;

    #[test]
    fn phases_follow_the_master() {
        let mut m = MasterFile::new(MasterSecret::from_bytes([1; 32]));
        assert_eq!(Phase::of(&m), Phase::Idle);
        m.rotate().unwrap();
        assert_eq!(Phase::of(&m), Phase::Staged { old: 1, new: 2 });
        m.promote();
        assert_eq!(Phase::of(&m), Phase::Promoted { old: 1 });
        m.retire_through(1).unwrap();
        assert_eq!(Phase::of(&m), Phase::Idle);
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("1500ms").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("2d").is_err());
        assert_eq!(show(Duration::from_secs(120)), "2m");
        assert_eq!(show(Duration::from_millis(300)), "300ms");
    }
}
