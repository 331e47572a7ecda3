//! `qa-worker`: the Qa role of agentfleet (see `docs/workers.md`).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    workers::cli::main(envelope::Role::Qa).await
}
