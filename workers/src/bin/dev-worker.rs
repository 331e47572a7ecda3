//! `dev-worker`: the Dev role of agentfleet (see `docs/workers.md`).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    workers::cli::main(envelope::Role::Dev).await
}
