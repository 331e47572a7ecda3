//! What a sandbox costs: `Sandbox::run(["true"])` against `docker run --rm <image> true`
//! (the same image, network none), in the same run, medians of 10 after one warm-up each.
//!
//! ```sh
//! cargo run --release -p workers --example sandbox_overhead      # -- RUNS (10)
//! ```
//! Needs the Docker engine and the image (deploy/sandbox-image.sh).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use workers::sandbox::{RunSpec, Sandbox, SandboxConfig, SandboxLabels};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let runs: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(10);
    let sandbox = Sandbox::connect(SandboxConfig::default())
        .await
        .unwrap_or_else(|e| panic!("{e} (build the image with deploy/sandbox-image.sh)"));
    let ws = tempfile::tempdir().unwrap();
    let labels = SandboxLabels { task: "bench".into(), role: "qa".into(), instance: "bench-overhead".into() };
    let cancel = CancellationToken::new();
    let mut ours = Vec::new();
    for i in 0..=runs {
        let spec = RunSpec::new(vec!["true".into()], ws.path(), labels.clone());
        let t = Instant::now();
        assert!(sandbox.run(spec, &cancel).await.unwrap().success());
        if i > 0 {
            ours.push(t.elapsed());
        }
    }
    let image = &sandbox.config().image;
    let mut cli = Vec::new();
    for i in 0..=runs {
        let t = Instant::now();
        let ok = std::process::Command::new("docker")
            .args(["run", "--rm", "--network", "none", image, "true"])
            .status()
            .unwrap()
            .success();
        assert!(ok, "docker run failed");
        if i > 0 {
            cli.push(t.elapsed());
        }
    }
    let (a, b) = (median(ours), median(cli));
    println!("Sandbox::run(true)            median {:>8.1} ms over {runs}", a.as_secs_f64() * 1e3);
    println!("docker run --rm IMAGE true    median {:>8.1} ms over {runs}", b.as_secs_f64() * 1e3);
    println!("ratio                         {:.2}x", a.as_secs_f64() / b.as_secs_f64());
}
