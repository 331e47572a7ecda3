//! The command line. The doc comments here are the `--help` texts: keep them accurate.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use envelope::Process;

/// The agentfleet operator's command line.
///
/// Every message on the fleet's Redis Streams is signed with the key of its directed edge
/// (`dev>orchestrator` and `orchestrator>dev` are two keys). All edge keys are derived from
/// one master secret that only operators hold; each process gets a keyset file with the keys
/// of the edges it is on, and nothing else. See docs/keys.md.
///
/// Exit codes: 0 success, 64 usage error (bad arguments, missing or invalid input file,
/// output file exists), 1 other failure.
#[derive(Debug, Parser)]
#[command(name = "fleetctl", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the master secret, derive per-process keysets, rotate and retire keys.
    ///
    /// Files (TOML, all secret, all written with mode 0600):
    ///
    /// - The master file (`keys master new`) holds the 32-byte master secret (`secret`, 64 hex
    ///   digits), the newest generation (`current_generation`), the one senders sign with
    ///   (`signing_generation`; newer ones are staged, verify-only) and the last retired
    ///   generation (`retired_through`). Whoever holds it can forge any message: operators
    ///   only, kept offline, never on a fleet host.
    ///
    /// - A keyset file (`keys derive`) holds one process's keys: `process` and one `[[key]]`
    ///   per kid, `kid = "<from>><to>:<generation>"` with `secret` (64 hex digits), or with
    ///   `retired = true` and no secret; `staged = true` marks a verify-only key. Each role's processes hold their role's keyset;
    ///   outbox-relay holds none.
    #[command(subcommand)]
    Keys(KeysCommand),
}

/// `fleetctl keys …`
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Manage the master file.
    #[command(subcommand)]
    Master(MasterCommand),

    /// Print (or write) the keyset of one process, derived from the master file.
    ///
    /// The keyset holds a key for every edge of the permission file the process is on
    /// (as sender or receiver), for every generation up to the current one; retired
    /// generations are listed without a secret so verifiers refuse them by name.
    ///
    /// Who holds which keyset: orchestrator, budget, dev, qa, review and refactor each go to
    /// the hosts running that role (all processes of a role share it). operator verifies
    /// every edge; HMAC keys can also sign, so it is as sensitive as the master file for the
    /// streams it covers: keep it with the operators. outbox-relay holds no keys: it forwards
    /// bytes the orchestrator already signed.
    ///
    /// Without --out the keyset goes to stdout: redirect it into a file only you can read.
    Derive(DeriveArgs),

    /// Add a staged key generation: verifiers accept it, nobody signs with it yet.
    ///
    /// Rewrites the master file atomically (same secret, `current_generation` + 1). A rotation
    /// has three steps so no message is refused on the way: (1) `rotate`, re-derive and deploy
    /// every keyset (the new generation is verify-only); (2) `promote`, re-derive and deploy
    /// again (senders now sign with it; the old generation still verifies); (3) once nothing
    /// signs with the old generation, `retire --through OLD`, re-derive and deploy.
    Rotate(RotateArgs),

    /// Make the newest (staged) generation the one senders sign with.
    ///
    /// Run it only after every process has loaded keysets derived after `rotate`: until
    /// then a receiver may not hold the new generation yet.
    Promote(RotateArgs),

    /// Retire generations 1..=N: verifiers then refuse messages signed with them.
    ///
    /// Rewrites the master file atomically. The signing generation cannot be retired (rotate
    /// and promote first). Re-derive and redeploy every keyset afterwards: the retired keys disappear
    /// from the keysets, and verifiers refuse their kids as retired.
    Retire(RetireArgs),

    /// List the kids of a keyset file and whether each is active or retired (no secrets).
    ///
    /// Use it to check what a host holds: which process the keyset is for, which edges and
    /// generations it covers, and whether it matches the master's current generation.
    List(ListArgs),
}

/// `fleetctl keys master …`
#[derive(Debug, Subcommand)]
pub enum MasterCommand {
    /// Create a master file with a fresh 32-byte secret from the OS random generator.
    ///
    /// The file is TOML, mode 0600: `format = 1`, `secret` (64 hex digits),
    /// `current_generation = 1`, `signing_generation = 1`, `retired_through = 0`. Keep it offline and backed up: every
    /// key of the fleet is derived from it, and losing it means re-keying every process.
    /// The secret is never printed.
    New(MasterNewArgs),
}

/// Arguments of `keys master new`.
#[derive(Debug, Args)]
pub struct MasterNewArgs {
    /// Where to write the master file.
    #[arg(long, value_name = "FILE", default_value = "agentfleet.master.toml")]
    pub out: PathBuf,

    /// Replace an existing file. Its secret is lost, and every keyset derived from it stops
    /// working.
    #[arg(long)]
    pub force: bool,
}

/// Arguments of `keys derive`.
#[derive(Debug, Args)]
pub struct DeriveArgs {
    /// The master file (from `keys master new`).
    #[arg(long, value_name = "FILE")]
    pub master: PathBuf,

    /// Whose keyset: orchestrator, budget, dev, qa, review, refactor or operator.
    #[arg(long, value_name = "NAME", value_parser = parse_process)]
    pub process: Process,

    /// The permission table: its rules' `from`/`to` pairs are the edges that get keys.
    #[arg(long, value_name = "FILE", default_value = "config/permissions.toml")]
    pub permissions: PathBuf,

    /// Write the keyset to FILE (mode 0600) instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,

    /// With --out: replace an existing file (atomically), as when re-deriving after a
    /// rotation.
    #[arg(long, requires = "out")]
    pub force: bool,
}

/// Arguments of `keys rotate`.
#[derive(Debug, Args)]
pub struct RotateArgs {
    /// The master file to rotate (rewritten in place).
    #[arg(long, value_name = "FILE")]
    pub master: PathBuf,
}

/// Arguments of `keys retire`.
#[derive(Debug, Args)]
pub struct RetireArgs {
    /// The master file (rewritten in place).
    #[arg(long, value_name = "FILE")]
    pub master: PathBuf,

    /// Retire generations 1 through N; N must be below the signing generation.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub through: u32,
}

/// Arguments of `keys list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// The keyset file to inspect (from `keys derive`).
    #[arg(long, value_name = "FILE")]
    pub keyset: PathBuf,
}

/// Parses a process name with envelope's rules, so `outbox-relay` gets its own message.
fn parse_process(name: &str) -> Result<Process, envelope::KeyError> {
    Process::parse(name)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
