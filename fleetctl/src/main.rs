//! The `fleetctl` binary: parse the command line, run it, turn the result into an exit code.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = match fleetctl::Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return fleetctl::exit::clap_error(&err),
    };
    fleetctl::exit::report(fleetctl::run(cli))
}
