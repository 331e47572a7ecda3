//! `fleetctl tail` itself: load the keyset and the permission table, parse the Redis URL
//! (all usage errors, exit 64), then run [`super::run`] on stdout and stderr until
//! `--count` entries, SIGINT (Ctrl-C) or SIGTERM.

use std::io;
use std::path::Path;

use anyhow::Context;
use envelope::{KeyError, Keyset, Process, Verifier, VerifierConfig};
use tokio::signal::unix::{Signal, SignalKind, signal};

use super::{RedisEndpoint, TailOptions};
use crate::cli::TailArgs;
use crate::exit::UsageError;
use crate::{files, keys};

const KEYSET_HINT: &str = "derive the operator keyset with `fleetctl keys derive --master FILE --process operator --out operator.keyset.toml`";

/// Runs `fleetctl tail`: lines on stdout, warnings and notes on stderr.
pub fn command(args: TailArgs) -> anyhow::Result<()> {
    let verifier = load_verifier(&args.keyset, &args.permissions)?;
    let mut opts = TailOptions::new(args.stream, verifier);
    opts.from_start = args.from_start;
    opts.count = args.count;
    opts.json = args.json;
    let redis =
        RedisEndpoint::parse(&crate::files::redis_url(args.redis.clone())?, args.redis_ca.as_deref(), opts.block)?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("Failed to start the async runtime")?;
    runtime.block_on(async {
        let signals = Signals::install().context("Failed to install the SIGINT/SIGTERM handlers")?;
        let (mut out, mut notes) = (io::stdout().lock(), io::stderr());
        super::run(&redis, &opts, &mut out, &mut notes, signals.recv()).await?;
        Ok(())
    })
}

fn load_verifier(keyset_path: &Path, permissions: &Path) -> Result<Verifier, UsageError> {
    let text = files::read_input(keyset_path, "keyset file", KEYSET_HINT)?;
    keys::warn_if_exposed(keyset_path, "keyset file");
    let keyset = Keyset::parse(&text).map_err(|err| {
        let reason = match err {
            KeyError::Format { reason, .. } => reason,
            other => other.to_string(),
        };
        UsageError::new(format!("invalid keyset file '{}': {reason}; {KEYSET_HINT}", keyset_path.display()))
    })?;
    if keyset.process != Process::Operator {
        keys::warn(&format!(
            "keyset file '{}' is the {} keyset, not the operator's: entries on edges it does not cover show as \
             unknown_kid",
            keyset_path.display(),
            keyset.process
        ));
    }
    let table = keys::load_permissions(permissions)?;
    Ok(Verifier::new(keyset.into_keyring(), table, VerifierConfig::default()))
}

/// SIGINT and SIGTERM, registered at once so a signal that arrives before the first read
/// still stops the tail cleanly.
struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    fn install() -> io::Result<Self> {
        Ok(Self { interrupt: signal(SignalKind::interrupt())?, terminate: signal(SignalKind::terminate())? })
    }

    /// Completes on the first of either signal.
    async fn recv(mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}
