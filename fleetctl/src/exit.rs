//! Exit codes: 64 (EX_USAGE) for what the operator can fix, 1 for everything else.

use std::io::{self, Write};
use std::process::ExitCode;

/// sysexits.h `EX_USAGE`: the command was used incorrectly.
pub const EX_USAGE: u8 = 64;

/// A mistake the operator can fix: a bad argument, a missing, unreadable or invalid input
/// file, an output file that already exists. The message says what is wrong and what to
/// do, and never contains key material. Anywhere in an error's chain, it makes the exit
/// code 64.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(String);

impl UsageError {
    /// A usage error with a complete message ("cannot read …: …; create one with …").
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// Prints a clap error and picks its exit code: `--help` and `--version` are not errors
/// (stdout, 0); every other parse failure is a usage error (stderr, 64).
pub fn clap_error(err: &clap::Error) -> ExitCode {
    // Nothing better to do if the terminal is gone; the exit code still tells.
    let _ = err.print();
    if err.use_stderr() { ExitCode::from(EX_USAGE) } else { ExitCode::SUCCESS }
}

/// The exit code of a run: 0, 64 when a [`UsageError`] is in the chain, 1 otherwise. The
/// error is printed on stderr with its whole cause chain.
pub fn report(result: anyhow::Result<()>) -> ExitCode {
    let Err(err) = result else {
        return ExitCode::SUCCESS;
    };
    let _ = writeln!(io::stderr().lock(), "error: {err:#}");
    ExitCode::from(code_of(&err))
}

fn code_of(err: &anyhow::Error) -> u8 {
    if err.chain().any(|cause| cause.is::<UsageError>()) { EX_USAGE } else { 1 }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use anyhow::Context;

    use super::*;

    #[test]
    fn a_usage_error_anywhere_in_the_chain_exits_64() {
        let usage = anyhow::Error::new(UsageError::new("no such thing"));
        assert_eq!(code_of(&usage), EX_USAGE);
        let wrapped: anyhow::Result<()> = Err(UsageError::new("no such thing")).context("Failed");
        assert_eq!(code_of(&wrapped.unwrap_err()), EX_USAGE);
        let io: anyhow::Result<()> = Err(io::Error::other("disk full")).context("Failed to write");
        assert_eq!(code_of(&io.unwrap_err()), 1);
    }
}
