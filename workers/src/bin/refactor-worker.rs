//! `refactor-worker`: the Refactor role of agentfleet (see `docs/workers.md`).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    workers::cli::main(envelope::Role::Refactor).await
}
