//! `fleetctl tail` through the real binary against a real redis-server: keys made with the
//! `keys` commands, envelopes published with `bus::Publisher`, broken ones added raw with
//! `XADD`, and `fleet:rejected` / `fleet:dlq` entries with the fields the bus writes.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bus::names::{ENV_FIELD, fields};
use bus::{Publisher, PublisherConfig};
use envelope::wire::SignedEnvelope;
use envelope::{
    Envelope, Heartbeat, Instance, Keyring, MasterFile, PermissionTable, Process, Role, Sender, Status, StreamName,
    TaskResult, streams,
};
use fleet_testkit::RedisServer;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};

const EX_USAGE: i32 = 64;
/// Longest a test waits for the binary to do what it should.
const PATIENCE: Duration = Duration::from_secs(30);

fn permissions_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("config/permissions.toml")
}

/// A master and an operator keyset written by the `keys` commands, a redis-server, and
/// publishers whose keys come from the same master.
struct Fleet {
    dir: TempDir,
    server: RedisServer,
    master: MasterFile,
}

impl Fleet {
    fn start() -> Self {
        Self::with(RedisServer::builder())
    }

    fn with(builder: fleet_testkit::RedisServerBuilder) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let keys = |args: &[&str]| {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleetctl"))
                .args(args)
                .current_dir(dir.path())
                .output()
                .unwrap();
            assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        keys(&["keys", "master", "new", "--out", "m.toml"]);
        let perms = permissions_file();
        let perms = perms.to_str().unwrap();
        keys(&[
            "keys",
            "derive",
            "--master",
            "m.toml",
            "--process",
            "operator",
            "--permissions",
            perms,
            "--out",
            "op.toml",
        ]);
        let master = MasterFile::parse(&fs::read_to_string(dir.path().join("m.toml")).unwrap()).unwrap();
        let server = builder.start().expect("redis-server must be installed (apt-get install redis-server)");
        Self { dir, server, master }
    }

    fn ring(&self, role: Role) -> Arc<Keyring> {
        let table = PermissionTable::parse(&fs::read_to_string(permissions_file()).unwrap()).unwrap();
        Arc::new(Keyring::derive(&self.master, Process::Role(role), &table).unwrap())
    }

    fn publisher(&self, role: Role) -> Publisher {
        let pool = bus::pool(secrecy::SecretString::from(self.server.url()), 2, Duration::from_secs(2)).unwrap();
        Publisher::new(pool, self.ring(role), PublisherConfig::default())
    }

    async fn xadd(&self, stream: &str, pairs: &[(&str, &[u8])]) -> String {
        let client = redis::Client::open(self.server.url()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let mut cmd = redis::cmd("XADD");
        cmd.arg(stream).arg("*");
        for (k, v) in pairs {
            cmd.arg(*k).arg(*v);
        }
        cmd.query_async(&mut c).await.unwrap()
    }

    /// `fleetctl tail STREAM --keyset … --permissions …` plus `args`; Redis from `--redis`.
    fn tail(&self, stream: &str, args: &[&str]) -> Command {
        let mut cmd = self.tail_without_redis(stream, args);
        cmd.arg("--redis").arg(self.server.url());
        cmd
    }

    fn tail_without_redis(&self, stream: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleetctl"));
        cmd.arg("tail").arg(stream).arg("--keyset").arg("op.toml").arg("--permissions").arg(permissions_file());
        cmd.args(args).current_dir(self.dir.path()).env_remove("FLEET_REDIS_URL").kill_on_drop(true);
        cmd
    }
}

/// Runs to completion, failing the test if that takes longer than [`PATIENCE`].
async fn finish(cmd: &mut Command) -> (i32, String, String) {
    let out: Output = tokio::time::timeout(PATIENCE, cmd.output()).await.expect("fleetctl did not exit").unwrap();
    (
        out.status.code().expect("exited, not killed"),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// A running tail with its output read line by line.
struct Running {
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr: Lines<BufReader<ChildStderr>>,
    /// Every stderr line seen so far.
    notes: Vec<String>,
}

impl Running {
    fn spawn(cmd: &mut Command) -> Self {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        Self { child, stdout, stderr, notes: Vec::new() }
    }

    /// Reads stderr until a line contains `text`; returns that line.
    async fn note_containing(&mut self, text: &str) -> String {
        let wait = async {
            while let Some(line) = self.stderr.next_line().await.unwrap() {
                self.notes.push(line.clone());
                if line.contains(text) {
                    return line;
                }
            }
            panic!("stderr ended without {text:?}: {:?}", self.notes);
        };
        tokio::time::timeout(PATIENCE, wait).await.unwrap_or_else(|_| panic!("no {text:?} on stderr"))
    }

    async fn line(&mut self) -> String {
        let next = tokio::time::timeout(PATIENCE, self.stdout.next_line()).await.expect("no line on stdout");
        next.unwrap().expect("stdout ended")
    }

    /// Waits for the exit; returns the code, the rest of stdout, and every stderr line.
    async fn exit(mut self) -> (i32, Vec<String>, Vec<String>) {
        let status = tokio::time::timeout(PATIENCE, self.child.wait()).await.expect("fleetctl did not exit").unwrap();
        let mut rest = Vec::new();
        while let Some(line) = self.stdout.next_line().await.unwrap() {
            rest.push(line);
        }
        while let Some(line) = self.stderr.next_line().await.unwrap() {
            self.notes.push(line);
        }
        (status.code().expect("exited, not killed"), rest, self.notes)
    }
}

fn sender(role: Role, instance: &str) -> Sender {
    Sender { role, instance: Instance::parse(instance).unwrap() }
}

fn result(role: Role, summary: &str, issued_at_ms: u64) -> Envelope {
    let payload = TaskResult {
        attempt: 1,
        status: Status::Success,
        summary: summary.to_owned(),
        findings: vec![],
        diff: None,
        log: None,
        change_sha256: None,
        calls: Vec::new(),
        containment: Vec::new(),
    };
    Envelope::new(sender(role, &format!("{role}-1")), Role::Orchestrator, issued_at_ms, 60_000, 0, payload.into())
}

fn results() -> StreamName {
    StreamName::parse(streams::RESULTS).unwrap()
}

/// The first six whitespace-separated columns and the summary of a text line.
fn columns(line: &str) -> (Vec<&str>, &str) {
    let mut cols = Vec::new();
    let mut rest = line;
    for _ in 0..6 {
        let (col, tail) = rest.trim_start().split_once(' ').unwrap_or((rest.trim_start(), ""));
        cols.push(col);
        rest = tail;
    }
    (cols, rest.trim_start())
}

fn is_rfc3339_ms(t: &str) -> bool {
    let b = t.as_bytes();
    b.len() == 24
        && t.ends_with('Z')
        && [4, 7].iter().all(|&i| b[i] == b'-')
        && b[10] == b'T'
        && [13, 16].iter().all(|&i| b[i] == b':')
        && b[19] == b'.'
}

/// Seven entries on fleet:results, one per verdict of interest; returns their ids and the
/// task id of the first.
async fn seven_entries(fleet: &Fleet) -> (Vec<String>, uuid::Uuid) {
    let dev = fleet.publisher(Role::Dev);
    let now = bus::now_ms();
    let mut ids = Vec::new();

    let task = uuid::Uuid::now_v7();
    let mut fine = result(Role::Dev, "all 12 tests pass", now);
    fine.task_id = Some(task);
    ids.push(dev.publish(&results(), &fine).await.unwrap());

    let qa = fleet.publisher(Role::Qa);
    ids.push(qa.publish(&results(), &result(Role::Qa, "old news", now - 2 * 3600 * 1000)).await.unwrap());

    let mut tampered = fleet.ring(Role::Dev).seal(&result(Role::Dev, "trust me", now)).unwrap();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x01;
    ids.push(fleet.xadd(streams::RESULTS, &[(ENV_FIELD, &tampered)]).await);

    ids.push(fleet.xadd(streams::RESULTS, &[(ENV_FIELD, b"\x93garbage\x1b[2J")]).await);
    ids.push(fleet.xadd(streams::RESULTS, &[("note", b"hello")]).await);

    let beat = Envelope::new(
        sender(Role::Dev, "dev-1"),
        Role::Orchestrator,
        now,
        60_000,
        0,
        Heartbeat { seq: 3, busy: true }.into(),
    );
    ids.push(dev.publish(&results(), &beat).await.unwrap());

    let unknown = SignedEnvelope {
        v: 1,
        kid: "dev>orchestrator:9".into(),
        alg: "HS256".into(),
        body: result(Role::Dev, "from the future key", now).to_body_bytes(),
        sig: vec![0; 32],
    };
    ids.push(fleet.xadd(streams::RESULTS, &[(ENV_FIELD, &unknown.to_wire())]).await);
    (ids, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_start_prints_one_line_per_entry_with_its_verdict() {
    let fleet = Fleet::start();
    let (ids, task) = seven_entries(&fleet).await;

    let (code, stdout, stderr) = finish(&mut fleet.tail("fleet:results", &["--from-start", "--count", "7"])).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("Reading fleet:results from its first entry"), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 7, "{stdout}");
    let simple = task.simple().to_string();
    let want: [(&str, &str, &str, &str, &str); 7] = [
        ("task.result", "dev/dev-1", &simple[24..], "ok", "status=success attempt=1 summary=\"all 12 tests pass\""),
        ("task.result", "qa/qa-1", "-", "expired", "expired "),
        ("task.result", "dev/dev-1", "-", "bad_signature", "bad signature; unverified: status=success attempt=1"),
        ("-", "-", "-", "decode", "cannot decode: "),
        ("-", "-", "-", "decode", "no env field"),
        ("heartbeat", "dev/dev-1", "-", "forbidden_type", "dev may not publish heartbeat to orchestrator on"),
        ("task.result", "dev/dev-1", "-", "unknown_kid", "unknown key id \"dev>orchestrator:9\"; unverified: "),
    ];
    for ((line, id), (ty, from, task, verdict, summary)) in lines.iter().zip(&ids).zip(want) {
        let (cols, rest) = columns(line);
        assert!(is_rfc3339_ms(cols[0]), "{line}");
        assert_eq!(cols[1..], [id.as_str(), ty, from, task, verdict], "{line}");
        assert!(rest.starts_with(summary), "{line}");
    }
    // The old result's signature was checked before its age: it is not "unverified".
    assert!(lines[1].contains("summary=\"old news\"") && !lines[1].contains("unverified"), "{}", lines[1]);
    assert!(lines[5].ends_with("; seq=3 busy=true"), "{}", lines[5]);
    // Garbage reaches the terminal escaped.
    assert!(!stdout.contains('\u{1b}'), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_parse_and_carry_the_same_fields_and_the_kid() {
    let fleet = Fleet::start();
    let (ids, task) = seven_entries(&fleet).await;

    let (code, stdout, stderr) =
        finish(&mut fleet.tail("fleet:results", &["--from-start", "--count", "7", "--json"])).await;
    assert_eq!(code, 0, "{stderr}");
    let objects: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(objects.len(), 7);
    for (o, id) in objects.iter().zip(&ids) {
        assert_eq!(o["entry"], id.as_str());
        assert_eq!(o["stream"], "fleet:results");
        assert!(is_rfc3339_ms(o["time"].as_str().unwrap()), "{o}");
        for key in ["type", "sender", "task_id", "envelope_id", "kid", "verdict", "authentic", "problem", "summary"] {
            assert!(o.get(key).is_some(), "{key} missing from {o}");
        }
    }
    let ok = &objects[0];
    assert_eq!(ok["verdict"], "ok");
    assert_eq!(ok["kid"], "dev>orchestrator:1");
    assert_eq!(ok["task_id"], task.to_string());
    assert_eq!(ok["type"], "task.result");
    assert_eq!(ok["sender"], "dev/dev-1");
    assert_eq!(ok["authentic"], true);
    assert!(ok["problem"].is_null());
    assert_eq!(objects[1]["kid"], "qa>orchestrator:1");
    assert_eq!(objects[1]["verdict"], "expired");
    assert_eq!(objects[1]["authentic"], true);
    assert_eq!(objects[2]["verdict"], "bad_signature");
    assert_eq!(objects[2]["authentic"], false);
    assert_eq!(objects[4]["problem"], "no env field");
    assert!(objects[4]["type"].is_null() && objects[4]["kid"].is_null());
    assert_eq!(objects[6]["kid"], "dev>orchestrator:9");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_and_dead_lettered_entries_say_why_they_are_there() {
    let fleet = Fleet::start();
    let now = bus::now_ms();
    let ring = fleet.ring(Role::Dev);
    let mut tampered = ring.seal(&result(Role::Dev, "rewritten in transit", now)).unwrap();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x80;
    let at = now.to_string();
    let rejected = [
        (fields::STREAM, &b"fleet:results"[..]),
        (fields::ENTRY, b"1700000000000-0"),
        (fields::GROUP, b"orchestrator"),
        (fields::CONSUMER, b"orch-1"),
        (fields::REASON, b"bad_signature"),
        (fields::DETAIL, b"bad signature"),
        (fields::AT_MS, at.as_bytes()),
        (ENV_FIELD, &tampered),
    ];
    fleet.xadd(streams::REJECTED, &rejected).await;
    // What the bus writes for an entry that had no `env` field at all.
    let mut empty = rejected;
    empty[1] = (fields::ENTRY, b"1700000000001-0");
    empty[4] = (fields::REASON, b"decode");
    empty[5] = (fields::DETAIL, b"no env field");
    empty[7] = (ENV_FIELD, b"");
    fleet.xadd(streams::REJECTED, &empty).await;

    let stuck = ring.seal(&result(Role::Dev, "handler keeps failing", now)).unwrap();
    let dlq = [
        (fields::STREAM, &b"fleet:results"[..]),
        (fields::ENTRY, b"1700000000002-0"),
        (fields::GROUP, b"orchestrator"),
        (fields::CONSUMER, b"orch-1"),
        (fields::DELIVERIES, b"5"),
        (fields::DETAIL, b"failed 5 deliveries; last error: ledger unavailable"),
        (fields::AT_MS, at.as_bytes()),
        (ENV_FIELD, &stuck),
    ];
    fleet.xadd(streams::DLQ, &dlq).await;

    let (code, stdout, stderr) = finish(&mut fleet.tail("fleet:rejected", &["--from-start", "--count", "2"])).await;
    assert_eq!(code, 0, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    let (cols, summary) = columns(lines[0]);
    assert_eq!(cols[2..], ["task.result", "dev/dev-1", "-", "bad_signature"], "{}", lines[0]);
    assert_eq!(
        summary,
        "rejected from fleet:results 1700000000000-0: bad_signature (bad signature); \
         unverified: status=success attempt=1 summary=\"rewritten in transit\""
    );
    let (cols, summary) = columns(lines[1]);
    assert_eq!(cols[2..], ["-", "-", "-", "decode"], "{}", lines[1]);
    assert_eq!(
        summary,
        "rejected from fleet:results 1700000000001-0: decode (no env field); the envelope bytes do not decode"
    );

    let (code, stdout, stderr) = finish(&mut fleet.tail("fleet:dlq", &["--from-start", "--count", "1"])).await;
    assert_eq!(code, 0, "{stderr}");
    let (cols, summary) = columns(stdout.trim_end());
    assert_eq!(cols[2..], ["task.result", "dev/dev-1", "-", "ok"], "{stdout}");
    assert_eq!(
        summary,
        "dead-lettered from fleet:results 1700000000002-0 after 5 deliveries: failed 5 deliveries; last error: \
         ledger unavailable; status=success attempt=1 summary=\"handler keeps failing\""
    );

    let (code, stdout, stderr) =
        finish(&mut fleet.tail("fleet:dlq", &["--from-start", "--count", "1", "--json"])).await;
    assert_eq!(code, 0, "{stderr}");
    let o: serde_json::Value = serde_json::from_str(stdout.trim_end()).unwrap();
    assert_eq!(o["origin"]["kind"], "dead_letter");
    assert_eq!(o["origin"]["deliveries"], 5);
    assert_eq!(o["origin"]["entry"], "1700000000002-0");
    assert_eq!(o["kid"], "dev>orchestrator:1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_only_new_entries_and_exits_after_count() {
    let fleet = Fleet::start();
    let dev = fleet.publisher(Role::Dev);
    let before = dev.publish(&results(), &result(Role::Dev, "before the tail", bus::now_ms())).await.unwrap();

    // The URL comes from the environment here, as an operator's shell would set it.
    let mut cmd = fleet.tail_without_redis("fleet:results", &["--count", "2"]);
    cmd.env("FLEET_REDIS_URL", fleet.server.url());
    let mut tail = Running::spawn(&mut cmd);
    let ready = tail.note_containing("Following fleet:results").await;
    assert!(ready.contains(&format!("after entry {before}")), "{ready}");

    let first = dev.publish(&results(), &result(Role::Dev, "new one", bus::now_ms())).await.unwrap();
    let second = dev.publish(&results(), &result(Role::Dev, "new two", bus::now_ms())).await.unwrap();
    let (code, lines, notes) = tail.exit().await;
    assert_eq!(code, 0, "{notes:?}");
    assert_eq!(lines.len(), 2, "{lines:?}");
    for (line, (id, summary)) in lines.iter().zip([(first, "new one"), (second, "new two")]) {
        let (cols, rest) = columns(line);
        assert_eq!((cols[1], cols[5]), (id.as_str(), "ok"), "{line}");
        assert!(rest.ends_with(&format!("summary=\"{summary}\"")), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_going_when_redis_restarts() {
    let mut fleet = Fleet::with(RedisServer::builder().appendonly(true));
    let mut tail = Running::spawn(&mut fleet.tail("fleet:results", &["--count", "2"]));
    tail.note_containing("Following fleet:results").await;

    let first = fleet.publisher(Role::Dev).publish(&results(), &result(Role::Dev, "before", bus::now_ms())).await;
    let first = first.unwrap();
    assert!(tail.line().await.contains(&first));

    fleet.server.restart().unwrap();
    let second = fleet.publisher(Role::Dev).publish(&results(), &result(Role::Dev, "after", bus::now_ms())).await;
    let second = second.unwrap();
    let (code, lines, notes) = tail.exit().await;
    assert_eq!(code, 0, "{notes:?}");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains(&second) && lines[0].contains("summary=\"after\""), "{lines:?}");
    let address = format!("127.0.0.1:{}", fleet.server.port());
    assert!(
        notes.iter().any(|n| n.starts_with(&format!("warning: lost the connection to Redis at {address}"))),
        "{notes:?}"
    );
    assert!(notes.iter().any(|n| n.starts_with(&format!("Reconnected to Redis at {address}"))), "{notes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_it_cleanly() {
    let fleet = Fleet::start();
    let mut tail = Running::spawn(&mut fleet.tail("fleet:heartbeats", &[]));
    tail.note_containing("Following fleet:heartbeats").await;
    let pid = tail.child.id().unwrap().to_string();
    let kill = std::process::Command::new("kill").args(["-INT", &pid]).status().unwrap();
    assert!(kill.success());
    let (code, lines, notes) = tail.exit().await;
    assert_eq!(code, 0, "{notes:?}");
    assert!(lines.is_empty(), "{lines:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_exit_64_and_never_echo_the_url() {
    let fleet = Fleet::start();
    let url = fleet.server.url();
    let mut no_keyset = Command::new(env!("CARGO_BIN_EXE_fleetctl"));
    no_keyset.args(["tail", "fleet:results", "--redis", &url]).current_dir(fleet.dir.path());
    let (code, _, stderr) = finish(&mut no_keyset).await;
    assert_eq!(code, EX_USAGE, "{stderr}");
    assert!(stderr.contains("--keyset"), "{stderr}");

    let perms = permissions_file();
    let perms = perms.to_str().unwrap();
    let args = |stream, keyset, permissions, redis| {
        vec!["tail", stream, "--keyset", keyset, "--permissions", permissions, "--redis", redis]
    };
    let mut count_zero = args("fleet:results", "op.toml", perms, &url);
    count_zero.extend(["--count", "0"]);
    let cases = [
        (args("results", "op.toml", perms, &url), "invalid stream name \"results\""),
        (args("fleet:results", "missing.toml", perms, &url), "cannot read keyset file 'missing.toml'"),
        (args("fleet:results", "op.toml", "/nonexistent/permissions.toml", &url), "cannot read permission file"),
        (args("fleet:results", "op.toml", perms, "http://operator:hunter2@somewhere:6379"), "invalid Redis URL"),
        (count_zero, "--count"),
    ];
    for (args, message) in cases {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleetctl"));
        cmd.args(&args).current_dir(fleet.dir.path());
        let (code, stdout, stderr) = finish(&mut cmd).await;
        assert_eq!(code, EX_USAGE, "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert!(stdout.is_empty() && !stderr.contains("hunter2"), "{stderr}");
    }

    let (code, stdout, stderr) = finish(Command::new(env!("CARGO_BIN_EXE_fleetctl")).args(["tail", "--help"])).await;
    assert_eq!(code, 0, "{stderr}");
    for needed in ["TIME", "ENTRY", "SENDER", "VERDICT", "bad_signature", "expired", "unverified", "lease=<present>"] {
        assert!(stdout.contains(needed), "--help lacks {needed:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_or_refusing_redis_exits_1_naming_only_host_and_port() {
    let fleet = Fleet::start();
    // A port nobody listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("redis://operator:hunter2@127.0.0.1:{port}");
    let (code, stdout, stderr) = finish(&mut fleet.tail_without_redis("fleet:results", &["--redis", &url])).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stdout.is_empty());
    assert!(
        stderr.contains(&format!("cannot read fleet:results from Redis at 127.0.0.1:{port} (4 attempt(s))")),
        "{stderr}"
    );
    assert!(stderr.contains("Check that Redis is running"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");

    // A live server that refuses the credentials: no point retrying.
    let url = format!("redis://operator:hunter2@127.0.0.1:{}", fleet.server.port());
    let (code, _, stderr) = finish(&mut fleet.tail_without_redis("fleet:results", &["--redis", &url])).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("(1 attempt(s))") && !stderr.contains("hunter2"), "{stderr}");
}
