//! `fleetctl keys …`: the master file, per-process keysets, rotation and retirement.
//!
//! Key material only ever goes into the files written here (mode 0600) or, for `derive`
//! without `--out`, to stdout. Every message names files, kids and generations, never a
//! secret.

use std::collections::BTreeSet;
use std::io::{self, Write};
use std::path::Path;

use anyhow::Context;
use envelope::keys::KEY_LEN;
use envelope::{KeyError, Keyset, MasterFile, MasterSecret, PermissionTable, Process};
use zeroize::Zeroizing;

use crate::cli::{DeriveArgs, KeysCommand, ListArgs, MasterArgs, MasterCommand, MasterNewArgs, RetireArgs, RotateArgs};
use crate::exit::UsageError;
use crate::files::{self, Existing};

/// The processes that get a keyset, for messages that list them.
const PROCESSES: &str = "orchestrator, budget, dev, qa, review, refactor and operator";

const MASTER_HINT: &str = "create one with `fleetctl keys master new`";
const MASTER_FIX: &str = "restore it from your backup";
const KEYSET_HINT: &str = "derive one with `fleetctl keys derive --master FILE --process NAME --out FILE`";
const PERMISSIONS_HINT: &str =
    "pass --permissions with the path of the fleet's permissions.toml (config/permissions.toml in the repository)";

/// Runs one `keys` subcommand, writing its report to stdout.
pub fn run(cmd: KeysCommand) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    match cmd {
        KeysCommand::Master(MasterCommand::New(args)) => master_new(&args, &mut out),
        KeysCommand::Derive(args) => derive(&args, &mut out),
        KeysCommand::Rotate(args) => rotate_cycle(&args, &mut out),
        KeysCommand::Stage(args) => stage(&args, &mut out),
        KeysCommand::Promote(args) => promote(&args, &mut out),
        KeysCommand::Retire(args) => retire(&args, &mut out),
        KeysCommand::List(args) => list(&args, &mut out),
    }
}

fn master_new(args: &MasterNewArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let path = &args.out;
    if !args.force && path.symlink_metadata().is_ok() {
        return Err(UsageError::new(format!(
            "master file '{}' already exists; its secret would be lost and every keyset \
             derived from it would stop working: choose another --out, or pass --force if \
             nothing uses it",
            path.display()
        ))
        .into());
    }

    let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
    getrandom::fill(bytes.as_mut())
        .context("Failed to read 32 bytes from the operating system's random number generator")?;
    let master = MasterFile::new(MasterSecret::from_bytes(*bytes));
    let existing = if args.force { Existing::Replace } else { Existing::Refuse };
    files::write_secret(path, "master file", master.to_toml().as_bytes(), existing)?;

    let p = path.display();
    writeln!(
        out,
        "Wrote a new master file to '{p}' (mode 0600, key generation 1).\n\
         Whoever holds it can derive every key of the fleet: keep it offline and backed up,\n\
         never on a fleet host or in a repository.\n\
         \n\
         Next, derive each process's keyset and install it (mode 0600) only where that process runs:\n\
         \x20 fleetctl keys derive --master {p} --process NAME --out NAME.keyset.toml\n\
         for NAME in {PROCESSES} (`fleetctl keys derive --help` says who holds which)."
    )
    .context("Failed to write to stdout")
}

fn derive(args: &DeriveArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let master = load_master(&args.master)?;
    let permissions = load_permissions(&args.permissions)?;
    let process = args.process;
    let keyset = master.derive_keyset(process, &permissions);
    if keyset.entries.is_empty() {
        warn(&format!(
            "process {process} is on no edge of permission file '{}': its keyset is empty",
            args.permissions.display()
        ));
    }
    let text = keyset.to_toml();

    let Some(path) = &args.out else {
        return out
            .write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .context("Failed to write the keyset to stdout");
    };
    let existing = if args.force { Existing::Replace } else { Existing::Refuse };
    files::write_secret(path, "keyset file", text.as_bytes(), existing)?;
    let summary = Summary::of(&keyset);
    writeln!(
        out,
        "Wrote the keyset of {process} to '{}' (mode 0600): {summary}, signing generation {}.\n\
         Install it only on the hosts that run {process}.",
        path.display(),
        master.signing_generation,
    )
    .context("Failed to write to stdout")
}

fn stage(args: &MasterArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let path = &args.master;
    let mut master = load_master(path)?;
    let signing = master.signing_generation;
    let new = master
        .rotate()
        .map_err(|err| UsageError::new(format!("cannot rotate master file '{}': {err}", path.display())))?;
    files::write_secret(path, "master file", master.to_toml().as_bytes(), Existing::Replace)?;
    let p = path.display();
    writeln!(
        out,
        "Staged generation {new} in '{p}' (verify-only); senders still sign with generation {signing}.\n\
         (`fleetctl keys rotate --keysets DIR` runs all three steps with their waits.)\n\
         \n\
         Roll it out in three steps, so no message is refused on the way:\n\
         \x20 1. Now: re-derive every keyset and deploy it to every host, for NAME in {PROCESSES}:\n\
         \x20      fleetctl keys derive --master {p} --process NAME --out NAME.keyset.toml --force\n\
         \x20 2. Once every process runs with those keysets: make generation {new} the signing one,\n\
         \x20    then re-derive and deploy again:\n\
         \x20      fleetctl keys promote --master {p}\n\
         \x20 3. Once nothing signs with generation {signing} any more (every process restarted after\n\
         \x20    step 2, and older messages past their ttl), retire it, re-derive and deploy:\n\
         \x20      fleetctl keys retire --master {p} --through {signing}"
    )
    .context("Failed to write to stdout")
}

fn promote(args: &MasterArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let path = &args.master;
    let mut master = load_master(path)?;
    let old = master.signing_generation;
    if !master.promote() {
        return writeln!(
            out,
            "Nothing to do: generation {old} of '{}' already signs; run `fleetctl keys stage` first.",
            path.display()
        )
        .context("Failed to write to stdout");
    }
    files::write_secret(path, "master file", master.to_toml().as_bytes(), Existing::Replace)?;
    let p = path.display();
    writeln!(
        out,
        "Promoted generation {new} of '{p}': senders sign with it once they load re-derived keysets;\n\
         generation {old} still verifies. Re-derive and deploy every keyset (for NAME in {PROCESSES}):\n\
         \x20 fleetctl keys derive --master {p} --process NAME --out NAME.keyset.toml --force\n\
         Then, once nothing signs with generation {old}: fleetctl keys retire --master {p} --through {old}",
        new = master.signing_generation
    )
    .context("Failed to write to stdout")
}

fn retire(args: &RetireArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let path = &args.master;
    let mut master = load_master(path)?;
    let through = args.through;
    let changed = master.retire_through(through).map_err(|err| match err {
        KeyError::RetireCurrent { through, signing } => UsageError::new(format!(
            "cannot retire through generation {through} in master file '{}': senders sign with \
             generation {signing}, which must stay valid; run `fleetctl keys stage`, roll the new \
             generation out, `fleetctl keys promote`, then retire the old ones",
            path.display()
        )),
        other => UsageError::new(format!("master file '{}': {other}", path.display())),
    })?;
    if !changed {
        return writeln!(
            out,
            "Nothing to do: generations 1..={} of '{}' are already retired.",
            master.retired_through,
            path.display()
        )
        .context("Failed to write to stdout");
    }
    files::write_secret(path, "master file", master.to_toml().as_bytes(), Existing::Replace)?;
    let p = path.display();
    writeln!(
        out,
        "Retired generations 1..={through} in '{p}'; generation {} signs.\n\
         Re-derive and reinstall every keyset (for NAME in {PROCESSES}):\n\
         \x20 fleetctl keys derive --master {p} --process NAME --out NAME.keyset.toml --force\n\
         The new keysets list the retired kids without secrets, so verifiers refuse them (retired_kid).",
        master.signing_generation
    )
    .context("Failed to write to stdout")
}

/// `keys rotate`: one cycle, or one every `--every`, until SIGINT/SIGTERM.
fn rotate_cycle(args: &RotateArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    use crate::rotation::{Ended, PROCESSES, Plan};
    if args.wait < std::time::Duration::from_secs(1) {
        return Err(UsageError::new(format!(
            "--wait {:?} is too short: every process must re-read its keyset file (keyset_reload_secs) before \
             the next step; give at least 1s, well above keyset_reload_secs",
            args.wait
        ))
        .into());
    }
    if args.every.is_some_and(|e| e < std::time::Duration::from_secs(60)) {
        return Err(UsageError::new("--every must be at least 60s: a key rotation is not a heartbeat").into());
    }
    if !args.keysets.is_dir() {
        return Err(UsageError::new(format!(
            "--keysets '{}' is not a directory; create it (mode 0700) or pass the directory the keyset files live in",
            args.keysets.display()
        ))
        .into());
    }
    let plan = Plan {
        master: args.master.clone(),
        permissions: args.permissions.clone(),
        keysets: args.keysets.clone(),
        processes: PROCESSES.iter().map(|p| Process::parse(p).expect("fleet process names parse")).collect(),
        wait: args.wait,
        max_ttl: args.max_ttl,
        skew: crate::rotation::SKEW,
        hook: args.deploy_hook.clone(),
    };
    crate::db::runtime()?.block_on(async {
        let stop = tokio_util::sync::CancellationToken::new();
        crate::rotation::stop_on_signals(stop.clone())?;
        match args.every {
            Some(every) => crate::rotation::run_every(&plan, every, out, &stop).await,
            None => match crate::rotation::run_cycle(&plan, out, &stop).await? {
                Ended::Interrupted(_) => {
                    Err(anyhow::anyhow!("interrupted; run `fleetctl keys rotate` again to continue"))
                }
                Ended::Rotated { .. } | Ended::Finished { .. } => Ok(()),
            },
        }
    })
}

fn list(args: &ListArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let path = &args.keyset;
    let keyset = load_keyset(path)?;
    let mut report =
        format!("Keyset file '{}': process {}, {}.\n", path.display(), keyset.process, Summary::of(&keyset));
    for entry in &keyset.entries {
        let status = match (&entry.secret, entry.staged) {
            (None, _) => "retired",
            (Some(_), true) => "staged (verify-only)",
            (Some(_), false) => "active",
        };
        report.push_str(&format!("  {:<28} {status}\n", entry.kid.to_string()));
    }
    out.write_all(report.as_bytes()).context("Failed to write to stdout")
}

/// Counts for reports: how many edges and keys a keyset covers.
struct Summary {
    edges: usize,
    active: usize,
    retired: usize,
}

impl Summary {
    fn of(keyset: &Keyset) -> Self {
        let edges: BTreeSet<_> = keyset.entries.iter().map(|e| e.kid.edge).collect();
        let active = keyset.entries.iter().filter(|e| e.secret.is_some()).count();
        Self { edges: edges.len(), active, retired: keyset.entries.len() - active }
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} edges, {} active and {} retired kids", self.edges, self.active, self.retired)
    }
}

fn load_master(path: &Path) -> Result<MasterFile, UsageError> {
    let text = files::read_input(path, "master file", MASTER_HINT)?;
    warn_if_exposed(path, "master file");
    MasterFile::parse(&text).map_err(|err| invalid("master file", path, &err, MASTER_FIX))
}

fn load_keyset(path: &Path) -> Result<Keyset, UsageError> {
    let text = files::read_input(path, "keyset file", KEYSET_HINT)?;
    warn_if_exposed(path, "keyset file");
    Keyset::parse(&text).map_err(|err| invalid("keyset file", path, &err, KEYSET_HINT))
}

pub(crate) fn load_permissions(path: &Path) -> Result<PermissionTable, UsageError> {
    let text = files::read_input(path, "permission file", PERMISSIONS_HINT)?;
    PermissionTable::parse(&text)
        .map_err(|err| UsageError::new(format!("cannot load permission file '{}': {err}", path.display())))
}

/// "invalid master file 'm.toml': <what is wrong>; <hint>". The envelope crate's messages
/// never contain key material.
fn invalid(what: &str, path: &Path, err: &KeyError, hint: &str) -> UsageError {
    let reason = match err {
        KeyError::Format { reason, .. } => reason.clone(),
        other => other.to_string(),
    };
    UsageError::new(format!("invalid {what} '{}': {reason}; {hint}", path.display()))
}

pub(crate) fn warn_if_exposed(path: &Path, what: &str) {
    if let Some(mode) = files::exposed_mode(path) {
        warn(&format!(
            "{what} '{}' is accessible to group or others (mode {mode:04o}); it holds secrets: \
             `chmod 600` it",
            path.display()
        ));
    }
}

pub(crate) fn warn(message: &str) {
    // A warning that can't be shown must not fail the command.
    let _ = writeln!(io::stderr().lock(), "warning: {message}");
}
