//! `fleetctl acl generate` and `fleetctl acl secrets new`: files in, files out; the
//! policy is [`super::render`]'s.

use std::io::{self, Write};
use std::path::Path;

use anyhow::Context;

use super::{Passwords, User, grants, render};
use crate::cli::{AclCommand, GenerateArgs, SecretsCommand, SecretsNewArgs};
use crate::exit::UsageError;
use crate::files::{self, Existing};
use crate::keys;

const SECRETS_HINT: &str = "create one with `fleetctl acl secrets new --out FILE`";

/// Runs one `acl` subcommand, writing its report (or the ACL file) to stdout.
pub fn run(cmd: AclCommand) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    match cmd {
        AclCommand::Generate(args) => generate(&args, &mut out),
        AclCommand::Secrets(SecretsCommand::New(args)) => secrets_new(&args, &mut out),
    }
}

fn generate(args: &GenerateArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let table = keys::load_permissions(&args.permissions)?;
    let passwords = load_passwords(&args.secrets)?;
    // The monitor's and the administrator's grants do not come from the table.
    for user in User::ALL.into_iter().filter(|u| u.role().is_some() || *u == User::OutboxRelay) {
        if grants(&table, user).is_empty() {
            keys::warn(&format!(
                "user {user} is on no rule of permission file '{}': it can connect and do nothing else",
                args.permissions.display()
            ));
        }
    }
    let text = render(&table, &passwords);

    let Some(path) = &args.out else {
        return out
            .write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .context("Failed to write the ACL file to stdout");
    };
    let existing = if args.force { Existing::Replace } else { Existing::Refuse };
    files::write_secret(path, "ACL file", text.as_bytes(), existing)?;
    let p = path.display();
    writeln!(
        out,
        "Wrote the Redis ACL file '{p}' (mode 0600): user default off; users {} with password hashes.\n\
         Install it where redis-server can read it and nobody else can, then start Redis with it:\n\
         \x20 redis-server --aclfile {p}      (or `aclfile {p}` in redis.conf, with no `user` lines there)\n\
         A running Redis re-reads it on restart, or on `ACL LOAD` run as the admin user (no fleet\n\
         process has its password). Each process connects as its role's user (outbox-relay as itself),\n\
         operators' fleetctl as operator, monitoring probes as monitor, each with its password from the\n\
         secrets file. See docs/operations.md, \"Broker ACLs\", and docs/deployment.md.",
        User::list()
    )
    .context("Failed to write to stdout")
}

fn secrets_new(args: &SecretsNewArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let path = &args.out;
    if path.symlink_metadata().is_ok() {
        return Err(UsageError::new(format!(
            "secrets file '{}' already exists; Redis and the fleet's processes may be using its \
             passwords: choose another --out, or delete the file first if nothing uses it",
            path.display()
        ))
        .into());
    }
    let passwords = Passwords::generate_with(&args.instances).map_err(|e| match e {
        super::passwords::GenerateError::Instance(e) => {
            anyhow::Error::from(UsageError::new(format!("--instance: {e}")))
        }
        super::passwords::GenerateError::Random(e) => anyhow::Error::new(e)
            .context("Failed to read random bytes from the operating system's random number generator"),
    })?;
    files::write_secret(path, "secrets file", passwords.to_toml().as_bytes(), Existing::Refuse)?;
    let p = path.display();
    writeln!(
        out,
        "Wrote fresh Redis passwords for users {} to '{p}' (mode 0600).\n\
         Keep it with the operators; give each process only its own user's password.\n\
         Next, hash them into the ACL file Redis loads:\n\
         \x20 fleetctl acl generate --secrets {p} --out users.acl",
        User::list()
    )
    .context("Failed to write to stdout")
}

fn load_passwords(path: &Path) -> Result<Passwords, UsageError> {
    let text = files::read_input(path, "secrets file", SECRETS_HINT)?;
    keys::warn_if_exposed(path, "secrets file");
    Passwords::parse(&text).map_err(|err| UsageError::new(format!("invalid secrets file '{}': {err}", path.display())))
}
