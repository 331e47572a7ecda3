//! The egress proxy with the real engine (issue 15): squid in the image
//! `deploy/egress-proxy-image.sh` builds, configured by `workers::egress`, the only way out
//! of an internal Docker network. A package index on the proxy's own network is reachable
//! through it; a host off the allowlist, the metadata address, an allowlisted name that
//! resolves to a private address, an IP literal and a direct connection past the proxy are
//! not; every request is in the proxy's log. An install run (`workers::deps`) gets a
//! hash-pinned wheel through it; a source package whose build would run code is never
//! built; the test run that follows has no network and cannot change what was installed.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use workers::deps::{self, Lockfiles};
use workers::egress::EgressPolicy;
use workers::sandbox::{DEPS_DIR, EgressConfig, Network, RunOutput, RunSpec, Sandbox, SandboxConfig, SandboxLabels};

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

/// The networks, the package index and the proxy of one test; removed on drop.
struct Net {
    internal: String,
    index_ip: String,
    proxy: String,
    sandbox: String,
    cleanup: Cleanup,
}

/// An internal network whose only way out is the proxy; on an outside network, a static
/// package index serving `index_dir` as `pkgindex:8000`. The index's network is private, so
/// it is listed as an in-house mirror; `rebind.test` is allowlisted but resolves to
/// 10.11.12.13.
fn net(index_dir: &Path) -> Net {
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
    open_tree(index_dir);
    let mount = format!("{}:/srv:ro", index_dir.display());
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
    let policy = EgressPolicy {
        registries: vec!["pkgindex".into(), "rebind.test".into()],
        private_mirrors: vec![subnet],
        extra_ports: vec![8000],
        listen_port: 3128,
    };
    let conf_dir = tempfile::tempdir().unwrap().keep();
    let conf = conf_dir.join("squid.conf");
    std::fs::write(&conf, policy.squid_conf().unwrap()).unwrap();
    open_tree(&conf_dir);
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
    Net { internal, index_ip, proxy, sandbox, cleanup }
}

/// Lets the containers' users read `dir` (directories 0755, files 0644).
fn open_tree(dir: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::symlink_metadata(dir).unwrap();
    let mode = if meta.is_dir() { 0o755 } else { 0o644 };
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).unwrap();
    if meta.is_dir() {
        for entry in std::fs::read_dir(dir).unwrap() {
            open_tree(&entry.unwrap().path());
        }
    }
}

#[test]
fn only_allowlisted_registries_are_reachable_and_never_a_private_address_behind_a_name() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("simple/demo")).unwrap();
    std::fs::write(dir.path().join("simple/demo/index.html"), "demo-1.0.tar.gz\n").unwrap();
    let net = net(dir.path());
    let (internal, index_ip, proxy, sandbox) = (&net.internal, &net.index_ip, &net.proxy, &net.sandbox);

    // A sandbox on the internal network, its only way out the proxy.
    let urls = [
        "http://pkgindex:8000/simple/demo/".to_owned(),
        "http://example.org/".to_owned(),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://rebind.test:8000/".to_owned(),
        format!("http://{index_ip}:8000/simple/demo/"),
    ];
    let mut args = vec!["run", "--rm", "--network", internal, sandbox, "python3", "-c", CLIENT, index_ip];
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
    let log = logs(proxy);
    assert!(log.contains("TCP_MISS/200") && log.contains("GET http://pkgindex:8000/simple/demo/"), "{log}");
    for refused in ["GET http://example.org/", "GET http://169.254.169.254/", "GET http://rebind.test:8000/"] {
        assert!(log.lines().any(|l| l.contains("TCP_DENIED/403") && l.contains(refused)), "{refused}: {log}");
    }
    drop(net.cleanup);
}

/// Writes a package index into `/out` of a container (python3 is in the sandbox image; the
/// host needs none): the wheel `afdep-1.0` (`afdep.VALUE == 42`), and the source package
/// `evil-1.0` whose `setup.py` writes `/workspace/PWNED` when built. Prints the
/// SHA-256 of each as `name hex`.
const MAKE_INDEX: &str = r#"
import base64, hashlib, io, os, tarfile, zipfile
out = "/out"
def put(project, filename, data):
    os.makedirs(f"{out}/files", exist_ok=True)
    os.makedirs(f"{out}/simple/{project}", exist_ok=True)
    open(f"{out}/files/{filename}", "wb").write(data)
    digest = hashlib.sha256(data).hexdigest()
    open(f"{out}/simple/{project}/index.html", "w").write(
        f'<html><body><a href="/files/{filename}#sha256={digest}">{filename}</a></body></html>\n')
    print(project, digest)
records, buf = [], io.BytesIO()
with zipfile.ZipFile(buf, "w") as z:
    def add(path, text):
        data = text.encode()
        z.writestr(path, data)
        d = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        records.append(f"{path},sha256={d},{len(data)}")
    add("afdep/__init__.py", "VALUE = 42\n")
    add("afdep-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: afdep\nVersion: 1.0\n")
    add("afdep-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: agentfleet-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    records.append("afdep-1.0.dist-info/RECORD,,")
    z.writestr("afdep-1.0.dist-info/RECORD", "\n".join(records) + "\n")
put("afdep", "afdep-1.0-py3-none-any.whl", buf.getvalue())
setup = "open('/workspace/PWNED', 'w').write('install-time code ran')\nfrom setuptools import setup\nsetup(name='evil', version='1.0')\n"
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w:gz") as t:
    for name, text in [("evil-1.0/setup.py", setup), ("evil-1.0/PKG-INFO", "Metadata-Version: 2.1\nName: evil\nVersion: 1.0\n")]:
        info = tarfile.TarInfo(name); data = text.encode(); info.size = len(data)
        t.addfile(info, io.BytesIO(data))
put("evil", "evil-1.0.tar.gz", buf.getvalue())
"#;

/// What the test run tries: import the installed package, change it, reach anything.
const TEST_RUN: &str = r#"
import afdep, socket
print("VALUE", afdep.VALUE)
try:
    open("/workspace/.agentfleet-deps/python/afdep/__init__.py", "w").write("VALUE = 0\n")
    print("WRITE allowed")
except OSError as e:
    print("WRITE refused", e.errno)
for host, port in [("proxy", 3128), ("pkgindex", 8000), ("1.1.1.1", 80)]:
    try:
        socket.create_connection((host, port), timeout=3).close()
        print("NET", host, "CONNECTED")
    except OSError as e:
        print("NET", host, "BLOCKED")
"#;

fn workspace_with(requirements: &str) -> tempfile::TempDir {
    let ws = tempfile::tempdir().unwrap();
    std::fs::write(ws.path().join("requirements.txt"), requirements).unwrap();
    std::fs::set_permissions(ws.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    std::fs::set_permissions(ws.path().join("requirements.txt"), std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .unwrap();
    ws
}

/// A directory holding [`MAKE_INDEX`]'s package index, and the SHA-256 of a project's file.
fn package_index() -> (tempfile::TempDir, impl Fn(&str) -> String) {
    let dir = tempfile::tempdir().unwrap();
    let mount = format!("{}:/out", dir.path().display());
    let sandbox_image = image("sandbox-image.sh");
    let hashes = docker(&["run", "--rm", "--user", "0", "-v", &mount, &sandbox_image, "python3", "-c", MAKE_INDEX]);
    let hash = move |project: &str| {
        hashes
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{project} ")))
            .unwrap_or_else(|| panic!("{project}: {hashes}"))
            .to_owned()
    };
    (dir, hash)
}

fn requirements_of(file: &Path) -> Lockfiles {
    Lockfiles { requirements: Some(std::fs::read(file).unwrap()), ..Lockfiles::default() }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_install_run_gets_pinned_wheels_through_the_proxy_builds_nothing_and_the_test_run_has_no_network() {
    let (dir, hash) = package_index();
    let net = net(dir.path());
    let config = SandboxConfig {
        image: net.sandbox.clone(),
        egress: Some(EgressConfig {
            network: net.internal.clone(),
            proxy_url: "http://proxy:3128".into(),
            python_index_url: "http://pkgindex:8000/simple".into(),
            npm_registry: "https://registry.npmjs.org/".into(),
        }),
        ..SandboxConfig::default()
    };
    let sandbox = Sandbox::connect(config.clone()).await.unwrap();
    let instance = format!("egress-{}", uuid::Uuid::now_v7().simple());
    let labels = SandboxLabels { task: "task-egress".into(), role: "qa".into(), instance: instance.clone() };
    let cancel = CancellationToken::new();
    let run = |spec: RunSpec| {
        let (sandbox, cancel) = (sandbox.clone(), cancel.clone());
        async move { sandbox.run(spec, &cancel).await.unwrap() }
    };
    let text = |out: &RunOutput| String::from_utf8_lossy(&out.output).into_owned();
    let egress = |ws: &Path, plan: &deps::Plan| {
        let command = deps::install_command(plan);
        let mut spec = RunSpec::new(command, ws, labels.clone());
        spec.network = Network::Egress;
        spec
    };

    // The install run: a hash-pinned wheel, through the proxy, into the deps directory. The
    // repository ships its own `pip` package (and a `sitecustomize`): with Python run from
    // the workspace they would run instead of pip, with the network; they must not.
    let ws = workspace_with(&format!("afdep==1.0 --hash=sha256:{}\n", hash("afdep")));
    let shadow = "open('/workspace/PWNED-PIP', 'w').write('the repository ran in the install run')\n";
    std::fs::create_dir(ws.path().join("pip")).unwrap();
    for f in ["pip/__init__.py", "pip/__main__.py", "sitecustomize.py", "usercustomize.py"] {
        std::fs::write(ws.path().join(f), shadow).unwrap();
    }
    open_tree(ws.path());
    std::fs::set_permissions(ws.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let plan = deps::plan(&requirements_of(&ws.path().join("requirements.txt"))).unwrap().unwrap();
    let out = run(egress(ws.path(), &plan)).await;
    assert!(out.success(), "the install run failed: {}", text(&out));
    assert!(text(&out).contains("Successfully installed afdep-1.0"), "{}", text(&out));
    assert!(!ws.path().join("PWNED-PIP").exists(), "the repository's pip ran in the install run");
    let marker = std::fs::read_to_string(ws.path().join(DEPS_DIR).join(deps::MARKER)).unwrap();
    assert_eq!(marker.trim(), plan.digest);

    // The test run: the package imports; its files are read-only; no network at all.
    let mut spec = RunSpec::new(vec!["python3".into(), "-c".into(), TEST_RUN.into()], ws.path(), labels.clone());
    spec.env = deps::run_env(&plan);
    let out = run(spec).await;
    let t = text(&out);
    assert!(t.contains("VALUE 42"), "{t}");
    assert!(t.contains("WRITE refused 30"), "EROFS expected: {t}");
    for host in ["proxy", "pkgindex", "1.1.1.1"] {
        assert!(t.contains(&format!("NET {host} BLOCKED")), "{host}: {t}");
    }

    // The same install from an index the proxy does not allow: refused by the proxy.
    let elsewhere = Sandbox::connect(SandboxConfig {
        egress: config
            .egress
            .clone()
            .map(|e| EgressConfig { python_index_url: "http://example.org/simple".into(), ..e }),
        ..config.clone()
    })
    .await
    .unwrap();
    let ws_elsewhere = workspace_with(&format!("afdep==1.0 --hash=sha256:{}\n", hash("afdep")));
    let out = elsewhere.run(egress(ws_elsewhere.path(), &plan), &cancel).await.unwrap();
    assert!(!out.success(), "installed from a host off the allowlist: {}", text(&out));
    assert!(!ws_elsewhere.path().join(DEPS_DIR).join(deps::MARKER).exists());
    assert!(
        logs(&net.proxy)
            .lines()
            .any(|l| l.contains("TCP_DENIED/403") && l.contains("http://example.org/simple/afdep/")),
        "{}",
        logs(&net.proxy)
    );

    // A hash that does not match what the index serves: nothing is installed.
    let ws = workspace_with(&format!("afdep==1.0 --hash=sha256:{}\n", "0".repeat(64)));
    let plan = deps::plan(&requirements_of(&ws.path().join("requirements.txt"))).unwrap().unwrap();
    let out = run(egress(ws.path(), &plan)).await;
    assert!(!out.success() && text(&out).contains("DO NOT MATCH"), "{}", text(&out));
    assert!(!ws.path().join(DEPS_DIR).join(deps::MARKER).exists());

    // A source package whose build runs code: pip sees it (the index served its page) and
    // refuses to build it, so its setup.py never runs.
    let ws = workspace_with(&format!("evil==1.0 --hash=sha256:{}\n", hash("evil")));
    let plan = deps::plan(&requirements_of(&ws.path().join("requirements.txt"))).unwrap().unwrap();
    let out = run(egress(ws.path(), &plan)).await;
    assert!(!out.success(), "the source package was installed: {}", text(&out));
    assert!(!ws.path().join("PWNED").exists(), "install-time code ran: {}", text(&out));
    assert!(!ws.path().join(DEPS_DIR).join(deps::MARKER).exists());
    let log = logs(&net.proxy);
    assert!(log.contains("GET http://pkgindex:8000/simple/evil/"), "pip never asked for it: {log}");
    // The control: the same command allowed to build (and with setuptools from the image
    // rather than the index) runs the payload, so the refusal above is the flags' doing.
    let mut build = egress(ws.path(), &plan);
    build.command[2] = build.command[2].replace("--only-binary :all:", "--no-build-isolation");
    let out = run(build).await;
    assert!(ws.path().join("PWNED").exists(), "the control never ran setup.py: {}", text(&out));

    // A failed fetch in an install run is pip's error, not sandboxed code trying to get out:
    // it is no containment hit (no incident), while the same words from a test run are.
    sandbox.take_containment("task-egress");
    let say = vec!["sh".into(), "-c".into(), "echo 'Temporary failure in name resolution'; exit 1".into()];
    let mut install = egress(ws.path(), &plan);
    install.command = say.clone();
    run(install).await;
    assert!(sandbox.take_containment("task-egress").is_empty(), "an install run's fetch error counted as containment");
    run(RunSpec::new(say, ws.path(), labels.clone())).await;
    assert_eq!(sandbox.take_containment("task-egress"), ["network"]);

    // A sandbox without the egress mode refuses an install run rather than run it offline
    // or on another network.
    let offline = Sandbox::connect(SandboxConfig { egress: None, ..config }).await.unwrap();
    let err = offline.run(egress(ws.path(), &plan), &cancel).await.unwrap_err().to_string();
    assert!(err.contains("[sandbox.egress]"), "{err}");
    drop(net.cleanup);
}

/// The whole path in a worker: QA's step on a repository whose tests import a locked
/// dependency asks the tool proxy for `pkg_install`, installs through the egress proxy, and
/// its tests pass; when the proxy refuses (outside the work hours), the step ends with the
/// refusal and nothing is installed.
#[tokio::test(flavor = "multi_thread")]
async fn a_qa_step_installs_the_locked_dependency_only_when_the_proxy_grants_pkg_install() {
    use common::Fleet;
    use envelope::{Role, Status};
    let (dir, hash) = package_index();
    let hash = hash("afdep");
    let net = net(dir.path());

    let fleet = Fleet::new();
    let origin = fleet.origin("with-dependency", |src| {
        std::fs::write(src.join("requirements.txt"), format!("afdep==1.0 \\\n    --hash=sha256:{hash}\n")).unwrap();
        std::fs::remove_file(src.join("tests/test_calc.py")).unwrap();
        std::fs::write(
            src.join("tests/test_dependency.py"),
            "import unittest\n\nimport afdep\n\n\nclass T(unittest.TestCase):\n    def test_value(self):\n        \
             self.assertEqual(afdep.VALUE, 42)\n",
        )
        .unwrap();
    });
    let refused_task = uuid::Uuid::now_v7();
    let seen = fleet.proxy(std::sync::Arc::new(move |req| {
        if req.request.action != "pkg_install" {
            return (
                false,
                serde_json::json!({"error": "action_not_granted", "message": "not in this test"}).to_string(),
            );
        }
        if req.envelope.task_id == Some(refused_task) {
            let why = "pkg_install is Medium risk: it runs without approval only inside the work hours";
            return (false, serde_json::json!({"error": "outside_work_hours", "message": why}).to_string());
        }
        (true, serde_json::json!({"allowed": true}).to_string())
    }));
    let egress = format!(
        "egress = {{ network = \"{}\", proxy_url = \"http://proxy:3128\", python_index_url = \"http://pkgindex:8000/simple\" }}",
        net.internal
    );
    fleet.start_worker_with(Role::Qa, "qa-egress", &egress);

    let task = uuid::Uuid::now_v7();
    let id = fleet.assign(Role::Qa, task, fleet.assignment(task, &origin), 0).await;
    let (_, r) = fleet.result(id, std::time::Duration::from_secs(120)).await;
    assert_eq!(r.status, Status::Success, "{r:?}");
    {
        let seen = seen.lock().unwrap();
        let asks: Vec<_> = seen.iter().filter(|s| s.request.action == "pkg_install").collect();
        assert_eq!(asks.len(), 1, "one permission per install");
        let input: serde_json::Value = serde_json::from_str(&asks[0].request.input).unwrap();
        assert_eq!(input["lockfiles"], serde_json::json!(["requirements.txt"]));
        assert_eq!(input["digest"].as_str().unwrap().len(), 64);
    }
    assert!(logs(&net.proxy).contains("GET http://pkgindex:8000/simple/afdep/"), "{}", logs(&net.proxy));

    // A repository that ships its own "installed" dependencies (and the marker that would
    // make them look installed) is refused, not mounted and not trusted.
    let planted = fleet.origin("planted-dependencies", |src| {
        std::fs::write(src.join("requirements.txt"), format!("afdep==1.0 --hash=sha256:{hash}\n")).unwrap();
        std::fs::create_dir_all(src.join(".agentfleet-deps/python/afdep")).unwrap();
        std::fs::write(src.join(".agentfleet-deps/python/afdep/__init__.py"), "VALUE = 42\n").unwrap();
        std::fs::write(src.join(".agentfleet-deps/.installed"), "planted\n").unwrap();
    });
    let planted_task = uuid::Uuid::now_v7();
    let id = fleet.assign(Role::Qa, planted_task, fleet.assignment(planted_task, &planted), 0).await;
    let (_, r) = fleet.result(id, std::time::Duration::from_secs(120)).await;
    assert_ne!(r.status, Status::Success, "{r:?}");
    assert!(r.summary.contains("the repository tracks .agentfleet-deps/"), "{}", r.summary);

    let id = fleet.assign(Role::Qa, refused_task, fleet.assignment(refused_task, &origin), 0).await;
    let (_, r) = fleet.result(id, std::time::Duration::from_secs(120)).await;
    assert_ne!(r.status, Status::Success, "{r:?}");
    assert!(r.summary.contains("outside_work_hours"), "{}", r.summary);
    assert!(!fleet.workspace(refused_task).join(DEPS_DIR).exists(), "installed although refused");
    drop(net.cleanup);
}
