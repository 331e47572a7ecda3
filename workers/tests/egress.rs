//! The egress proxy with the real engine (issue 15, first slice): squid in the image
//! `deploy/egress-proxy-image.sh` builds, configured by `workers::egress`, the only way out
//! of an internal Docker network. A package index on the proxy's own network is reachable
//! through it; a host off the allowlist, the metadata address, an allowlisted name that
//! resolves to a private address, an IP literal and a direct connection past the proxy are
//! not; every request is in the proxy's log.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use workers::egress::EgressPolicy;

/// Runs `docker ARGS`, panicking with its output when it fails.
fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().expect("the docker CLI must be installed; tests never skip");
    assert!(out.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A container's stdout and stderr (squid logs requests to the one, itself to the other).
fn logs(container: &str) -> String {
    let out = Command::new("docker").args(["logs", container]).output().unwrap();
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Builds (if missing) the image of `script` and returns its name.
fn image(script: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(script);
    let out = Command::new(&path).env("CI", "true").output().unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
    assert!(out.status.success(), "{script} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().last().unwrap().trim().to_owned()
}

/// Removes what the test made, whatever happens.
struct Cleanup {
    containers: Vec<String>,
    networks: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = Command::new("docker").args(["rm", "-f", c]).output();
        }
        for n in &self.networks {
            let _ = Command::new("docker").args(["network", "rm", n]).output();
        }
    }
}

const CLIENT: &str = r#"
import socket, sys, urllib.request, urllib.error
opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": "http://proxy:3128"}))
for url in sys.argv[2:]:
    try:
        with opener.open(url, timeout=10) as r:
            print(url, "OK", r.status, r.read().decode(errors="replace").strip())
    except urllib.error.HTTPError as e:
        print(url, "HTTP", e.code)
    except Exception as e:
        print(url, "ERR", e)
try:
    socket.create_connection((sys.argv[1], 8000), timeout=3).close()
    print("direct CONNECTED")
except OSError as e:
    print("direct BLOCKED", e)
"#;

#[test]
fn only_allowlisted_registries_are_reachable_and_never_a_private_address_behind_a_name() {
    let sandbox = image("sandbox-image.sh");
    let proxy_image = image("egress-proxy-image.sh");
    let id = uuid::Uuid::now_v7().simple().to_string()[20..].to_owned();
    let (internal, outside) = (format!("af-egress-in-{id}"), format!("af-egress-out-{id}"));
    let (index, proxy) = (format!("af-egress-index-{id}"), format!("af-egress-proxy-{id}"));
    let mut cleanup = Cleanup { containers: vec![], networks: vec![] };
    docker(&["network", "create", "--internal", &internal]);
    cleanup.networks.push(internal.clone());
    docker(&["network", "create", &outside]);
    cleanup.networks.push(outside.clone());
    let subnet = docker(&["network", "inspect", "-f", "{{(index .IPAM.Config 0).Subnet}}", &outside]);

    // The package index: a static simple index on the proxy's outside network.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("simple/demo")).unwrap();
    std::fs::write(dir.path().join("simple/demo/index.html"), "demo-1.0.tar.gz\n").unwrap();
    let readable = |p: &Path, mode: u32| {
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
    };
    for sub in ["", "simple", "simple/demo"] {
        readable(&dir.path().join(sub), 0o755);
    }
    readable(&dir.path().join("simple/demo/index.html"), 0o644);
    let mount = format!("{}:/srv:ro", dir.path().display());
    cleanup.containers.push(index.clone());
    docker(&[
        "run",
        "-d",
        "--name",
        &index,
        "--network",
        &outside,
        "--network-alias",
        "pkgindex",
        "-v",
        &mount,
        "-w",
        "/srv",
        &sandbox,
        "python3",
        "-m",
        "http.server",
        "8000",
    ]);
    let index_ip = docker(&[
        "inspect",
        "-f",
        &format!("{{{{(index .NetworkSettings.Networks \"{outside}\").IPAddress}}}}"),
        &index,
    ]);

    // The proxy: the index's network is private, so it is listed as an in-house mirror;
    // `rebind.test` is allowlisted but resolves to 10.11.12.13.
    let policy = EgressPolicy {
        registries: vec!["pkgindex".into(), "rebind.test".into()],
        private_mirrors: vec![subnet.clone()],
        extra_ports: vec![8000],
        listen_port: 3128,
    };
    let conf = dir.path().join("squid.conf");
    std::fs::write(&conf, policy.squid_conf().unwrap()).unwrap();
    readable(&conf, 0o644);
    let conf_mount = format!("{}:/etc/squid/agentfleet.conf:ro", conf.display());
    cleanup.containers.push(proxy.clone());
    docker(&[
        "run",
        "-d",
        "--name",
        &proxy,
        "--network",
        &outside,
        "--add-host",
        "rebind.test:10.11.12.13",
        "-v",
        &conf_mount,
        &proxy_image,
    ]);
    docker(&["network", "connect", "--alias", "proxy", &internal, &proxy]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !logs(&proxy).contains("Accepting HTTP Socket connections") {
        assert!(Instant::now() < deadline, "the proxy did not start: {}", logs(&proxy));
        std::thread::sleep(Duration::from_millis(200));
    }

    // A sandbox on the internal network, its only way out the proxy.
    let urls = [
        "http://pkgindex:8000/simple/demo/".to_owned(),
        "http://example.org/".to_owned(),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://rebind.test:8000/".to_owned(),
        format!("http://{index_ip}:8000/simple/demo/"),
    ];
    let mut args = vec!["run", "--rm", "--network", &internal, &sandbox, "python3", "-c", CLIENT, &index_ip];
    args.extend(urls.iter().map(String::as_str));
    let out = docker(&args);
    let line = |prefix: &str| out.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("{prefix}: {out}"));
    assert!(line("http://pkgindex:8000/simple/demo/").ends_with("OK 200 demo-1.0.tar.gz"), "{out}");
    assert!(line("http://example.org/").ends_with("HTTP 403"), "not on the allowlist: {out}");
    assert!(line("http://169.254.169.254/").ends_with("HTTP 403"), "the metadata address: {out}");
    assert!(line("http://rebind.test:8000/").ends_with("HTTP 403"), "a registry name on a private address: {out}");
    assert!(line(&format!("http://{index_ip}:8000/")).ends_with("HTTP 403"), "an IP literal: {out}");
    assert!(line("direct").starts_with("direct BLOCKED"), "no way past the proxy: {out}");

    // Every request is logged, allowed or refused.
    let log = logs(&proxy);
    assert!(log.contains("TCP_MISS/200") && log.contains("GET http://pkgindex:8000/simple/demo/"), "{log}");
    for refused in ["GET http://example.org/", "GET http://169.254.169.254/", "GET http://rebind.test:8000/"] {
        assert!(log.lines().any(|l| l.contains("TCP_DENIED/403") && l.contains(refused)), "{refused}: {log}");
    }
    drop(cleanup);
}
