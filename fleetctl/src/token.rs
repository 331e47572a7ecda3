//! `fleetctl token …`: the HTTP API's bearer tokens.
//!
//! `token secret new` writes an HS256 secret: by default the one the orchestrator verifies
//! API tokens with (its `jwt_secret_file`), with `--for lease` the one it signs workers'
//! capability leases with (`[tools] lease_secret_file`). `token issue` mints an API token
//! with the former. Whoever holds the API secret can mint an admin token: it is as
//! sensitive as the master file. The two must be different secrets.

use std::io::{self, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use orchestrator::api::auth::{ApiRole, MAX_TTL, TokenKeys, check_subject};
use secrecy::SecretString;
use zeroize::Zeroizing;

use crate::exit::UsageError;
use crate::files::{self, Existing};
use crate::keys;

const SECRET_HINT: &str = "create one with `fleetctl token secret new --out FILE` (the orchestrator's jwt_secret_file must hold the same secret)";

/// `fleetctl token …`
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print a bearer token for the HTTP API, signed with the API's secret.
    ///
    /// The token is a JWT (HS256) with `sub` (the operator's name, recorded as the actor of
    /// everything done with it), `role`, `iat`, `exp`, `iss = "agentfleet"` and
    /// `aud = "agentfleet-api"`. Roles: viewer reads tasks; operator also submits and
    /// approves; admin also halts (`kill`) and resumes the fleet. Hand it to its holder
    /// over a private channel; they pass it with FLEET_TOKEN. It stays valid until it
    /// expires: to revoke tokens early, change the secret (all tokens die).
    ///
    /// Exit 64 for an unknown role, a bad name or lifetime, or a missing, unreadable or
    /// too short secret file.
    Issue(IssueArgs),

    /// Make the secrets the orchestrator signs with: API tokens' and capability leases'.
    #[command(subcommand)]
    Secret(SecretCommand),
}

/// `fleetctl token secret …`
#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Write a fresh secret: 32 bytes from the OS random generator as 64 hex digits, in a
    /// file with mode 0600. An existing file is never overwritten.
    ///
    /// `--for api` (the default): the API token secret. Point the orchestrator's
    /// `jwt_secret_file` (FLEET_JWT_SECRET_FILE) at a copy and keep one with the operators,
    /// who mint tokens with `fleetctl token issue`. Whoever holds it can mint an admin token.
    ///
    /// `--for lease`: the capability-lease secret, for the orchestrator's
    /// `[tools] lease_secret_file` (FLEET_TOOLS__LEASE_SECRET_FILE) and nobody else. It signs
    /// the leases in workers' assignments; it mints no API token. Never reuse the API
    /// secret for it.
    New(SecretNewArgs),
}

/// Arguments of `token issue`.
#[derive(Debug, Args)]
pub struct IssueArgs {
    /// viewer, operator or admin.
    #[arg(long, value_name = "ROLE", value_parser = parse_role)]
    pub role: ApiRole,

    /// The operator's name: 1 to 64 ASCII letters, digits, '.', '_', '-' or '@'.
    #[arg(long, value_name = "NAME", value_parser = parse_sub)]
    pub sub: String,

    /// How long the token is valid: a number with s, m, h or d (30m, 1h, 7d); at most 30d.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_ttl)]
    pub ttl: Duration,

    /// The file with the API's secret (surrounding whitespace ignored; at least 32 bytes).
    #[arg(long, value_name = "FILE")]
    pub secret_file: PathBuf,
}

/// Arguments of `token secret new`.
#[derive(Debug, Args)]
pub struct SecretNewArgs {
    /// Where to write the secret; it must not exist yet.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,

    /// What the secret signs: `api` (operators' bearer tokens; the orchestrator's
    /// jwt_secret_file) or `lease` (workers' capability leases; its [tools]
    /// lease_secret_file). Make one of each.
    #[arg(long = "for", value_name = "USE", value_enum, default_value_t = SecretUse::Api)]
    pub purpose: SecretUse,
}

/// What a secret from `token secret new` signs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SecretUse {
    /// The HTTP API's bearer tokens (`jwt_secret_file`).
    Api,
    /// The capability leases in assignments (`[tools] lease_secret_file`).
    Lease,
}

fn parse_role(text: &str) -> Result<ApiRole, String> {
    text.parse().map_err(|e: orchestrator::api::auth::UnknownRole| e.to_string())
}

fn parse_sub(text: &str) -> Result<String, String> {
    check_subject(text).map(|()| text.to_owned())
}

/// `90s`, `30m`, `1h`, `7d` (a bare number is seconds), between 1 second and 30 days.
pub fn parse_ttl(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a lifetime: use a number with s, m, h or d, e.g. 30m, 1h, 7d (at most 30d)");
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        "d" => n.checked_mul(86_400),
        _ => None,
    }
    .ok_or_else(bad)?;
    let ttl = Duration::from_secs(secs);
    if ttl.is_zero() || ttl > MAX_TTL {
        return Err(bad());
    }
    Ok(ttl)
}

/// Runs `fleetctl token …`.
pub fn run(cmd: TokenCommand) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::Issue(args) => issue(&args),
        TokenCommand::Secret(SecretCommand::New(args)) => new_secret(&args),
    }
}

fn issue(args: &IssueArgs) -> anyhow::Result<()> {
    let text = files::read_input(&args.secret_file, "secret file", SECRET_HINT)?;
    keys::warn_if_exposed(&args.secret_file, "secret file");
    let secret = SecretString::from(text.as_str());
    let keys = TokenKeys::new(&secret).map_err(|e| {
        UsageError::new(format!("invalid secret file '{}': {e}; {SECRET_HINT}", args.secret_file.display()))
    })?;
    let token = keys.issue(&args.sub, args.role, args.ttl).map_err(|e| UsageError::new(e.to_string()))?;
    writeln!(io::stdout().lock(), "{token}").context("Failed to write to stdout")
}

fn new_secret(args: &SecretNewArgs) -> anyhow::Result<()> {
    let mut bytes = Zeroizing::new([0u8; 32]);
    getrandom::fill(bytes.as_mut())
        .context("Failed to read 32 bytes from the operating system's random number generator")?;
    let text = Zeroizing::new(format!("{}\n", hex::encode(bytes.as_slice())));
    files::write_secret(&args.out, "secret file", text.as_bytes(), Existing::Refuse)?;
    let p = args.out.display();
    let report = match args.purpose {
        SecretUse::Api => format!(
            "Wrote a new API token secret to '{p}' (mode 0600).\n\
             Whoever holds it can mint an admin token: keep it with the operators, and point the\n\
             orchestrator's jwt_secret_file (FLEET_JWT_SECRET_FILE) at a copy. Then:\n\
             \x20 fleetctl token issue --secret-file {p} --role ROLE --sub NAME"
        ),
        SecretUse::Lease => format!(
            "Wrote a new capability-lease secret to '{p}' (mode 0600).\n\
             Only the orchestrator holds it: point its [tools] lease_secret_file\n\
             (FLEET_TOOLS__LEASE_SECRET_FILE) at it. It signs the leases in workers' assignments and\n\
             mints no API token; keep it apart from the API token secret."
        ),
    };
    writeln!(io::stdout().lock(), "{report}").context("Failed to write to stdout")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn lifetimes_parse_with_units_and_bounds() {
        assert_eq!(parse_ttl("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_ttl("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_ttl("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_ttl("30d").unwrap(), MAX_TTL);
        for bad in ["", "0", "0h", "31d", "1w", "h", "-1h", "1.5h", "99999999999999999999d"] {
            assert!(parse_ttl(bad).is_err(), "{bad:?}");
        }
    }
}
