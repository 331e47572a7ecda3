//! `review-worker`: the Review role of agentfleet (see `docs/workers.md`).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    workers::cli::main(envelope::Role::Review).await
}
