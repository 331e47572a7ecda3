//! `fleetctl db migrate`, `fleetctl audit key new` and `fleetctl audit verify` through the
//! real binary against a real Postgres: rows appended with `orchestrator::audit`, then
//! tampered with as the superuser through `psql`.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use fleet_testkit::Postgres;
use orchestrator::audit::{self, AuditEntry, AuditKey};
use serde_json::{Value, json};
use sqlx::PgPool;
use tempfile::TempDir;
use uuid::Uuid;

const EX_USAGE: i32 = 64;
/// In every URL given to the binary; trust authentication ignores it, and no output may
/// contain it.
const PASSWORD: &str = "s3cret-db-pw";

struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Output {
    fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(self.code, code, "stdout: {}\nstderr: {}", self.stdout, self.stderr);
        assert!(
            !self.stdout.contains(PASSWORD) && !self.stderr.contains(PASSWORD),
            "the password leaked: {}{}",
            self.stdout,
            self.stderr
        );
        self
    }
}

/// Runs the binary in `dir` with `env` added, and without any FLEET_DATABASE_URL this
/// process may have inherited (never changing this process's environment).
fn fleetctl_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_fleetctl"))
        .args(args)
        .current_dir(dir)
        .env_remove("FLEET_DATABASE_URL")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    Output {
        code: out.status.code().unwrap(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

fn fleetctl(dir: &Path, args: &[&str]) -> Output {
    fleetctl_env(dir, args, &[])
}

/// A server, a database, a key file made by `audit key new`, and the schema made by
/// `db migrate`.
struct Fleet {
    pg: Postgres,
    dir: TempDir,
    /// The database's name, for `psql`.
    name: String,
    /// As given to the binary, with a password.
    url: String,
    key: AuditKey,
    pool: PgPool,
}

impl Fleet {
    async fn start() -> Self {
        let pg = Postgres::start().expect("postgres must be installed; tests never skip");
        let plain = pg.create_database().unwrap();
        let name = plain.rsplit('/').next().unwrap().to_owned();
        let url = format!("postgres://postgres:{PASSWORD}@127.0.0.1:{}/{name}", pg.port());
        let dir = tempfile::tempdir().unwrap();

        let migrated = fleetctl(dir.path(), &["db", "migrate", "--database-url", &url]);
        migrated.assert_code(0);
        assert!(migrated.stdout.starts_with("applied migration 1: init\n"), "{}", migrated.stdout);
        let again = fleetctl(dir.path(), &["db", "migrate", "--database-url", &url]);
        again.assert_code(0);
        let migrations = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../orchestrator/migrations"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "sql"))
            .count();
        let earlier = if migrations == 1 { "1 migration".to_owned() } else { format!("{migrations} migrations") };
        assert!(
            again.stdout.starts_with(&format!("schema up to date ({earlier} applied earlier)\n")),
            "{}",
            again.stdout
        );

        let made = fleetctl(dir.path(), &["audit", "key", "new", "--out", "audit.key"]);
        made.assert_code(0);
        assert!(made.stdout.contains("mode 0600"), "{}", made.stdout);
        let path = dir.path().join("audit.key");
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.len() == 65 && text.ends_with('\n') && hex::decode(text.trim()).is_ok(), "{text:?}");
        let key = AuditKey::from_hex(&text).unwrap();

        let pool = PgPool::connect(&plain).await.unwrap();
        Self { pg, dir, name, url, key, pool }
    }

    /// Appends `n` rows for one task, one transaction each; returns the task.
    async fn append(&self, n: usize) -> Uuid {
        let task = Uuid::now_v7();
        for i in 0..n {
            let mut tx = self.pool.begin().await.unwrap();
            let entry = AuditEntry {
                actor_role: "orchestrator",
                actor_instance: "orchestrator-0",
                action: if i == 0 { "task.submit" } else { "task.transition" },
                task_id: Some(task),
                prompt_version: None,
                details: json!({"step": i}),
            };
            audit::append(&mut tx, &self.key, entry).await.unwrap();
            tx.commit().await.unwrap();
        }
        task
    }

    fn tamper(&self, sql: &str) {
        self.pg
            .psql(
                &self.name,
                &format!(
                    "BEGIN; ALTER TABLE audit_trail DISABLE TRIGGER audit_no_update; {sql}; \
                     ALTER TABLE audit_trail ENABLE TRIGGER audit_no_update; COMMIT;"
                ),
            )
            .unwrap();
    }

    fn verify(&self, extra: &[&str]) -> Output {
        let mut args = vec!["audit", "verify", "--database-url", &self.url, "--audit-key-file", "audit.key"];
        args.extend(extra);
        fleetctl(self.dir.path(), &args)
    }
}

#[tokio::test]
async fn an_intact_trail_verifies_and_a_tampered_one_names_the_row() {
    let f = Fleet::start().await;
    let task = f.append(4).await;

    let ok = f.verify(&[]);
    ok.assert_code(0);
    assert_eq!(ok.stdout, "intact: 4 rows\n");
    // The URL may come from the environment instead.
    let from_env = fleetctl_env(
        f.dir.path(),
        &["audit", "verify", "--audit-key-file", "audit.key"],
        &[("FLEET_DATABASE_URL", &f.url)],
    );
    from_env.assert_code(0);
    assert_eq!(from_env.stdout, "intact: 4 rows\n");
    // Or from a secrets file (Docker and Kubernetes secrets), with its trailing newline.
    std::fs::write(f.dir.path().join("database-url"), format!("{}\n", f.url)).unwrap();
    let from_file = fleetctl_env(
        f.dir.path(),
        &["audit", "verify", "--audit-key-file", "audit.key"],
        &[("FLEET_DATABASE_URL_FILE", "database-url")],
    );
    from_file.assert_code(0);
    assert_eq!(from_file.stdout, "intact: 4 rows\n");
    let both = fleetctl_env(
        f.dir.path(),
        &["audit", "verify", "--audit-key-file", "audit.key"],
        &[("FLEET_DATABASE_URL_FILE", "database-url"), ("FLEET_DATABASE_URL", &f.url)],
    );
    both.assert_code(EX_USAGE);
    assert!(both.stderr.contains("both FLEET_DATABASE_URL_FILE and the value itself"), "{}", both.stderr);
    let missing = fleetctl_env(
        f.dir.path(),
        &["audit", "verify", "--audit-key-file", "audit.key"],
        &[("FLEET_DATABASE_URL_FILE", "no-such-file")],
    );
    missing.assert_code(EX_USAGE);
    assert!(missing.stderr.contains("FLEET_DATABASE_URL_FILE"), "{}", missing.stderr);
    let json: Value = serde_json::from_str(&f.verify(&["--json"]).stdout).unwrap();
    assert_eq!(json, json!({"intact": true, "rows": 4, "broken": null}));

    f.tamper("UPDATE audit_trail SET details = '{\"step\": 99}' WHERE seq = 3");
    let broken = f.verify(&[]);
    broken.assert_code(1);
    assert!(
        broken.stdout.starts_with("broken at seq 3: row content changed since it was written\n"),
        "{}",
        broken.stdout
    );
    assert!(broken.stdout.contains(&format!("action task.transition  task {task}")), "{}", broken.stdout);
    assert!(broken.stdout.ends_with("3 rows checked\n"), "{}", broken.stdout);
    assert!(broken.stderr.contains("error: the audit trail is broken at seq 3"), "{}", broken.stderr);

    let out = f.verify(&["--json"]);
    out.assert_code(1);
    let json: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(json["intact"], false);
    assert_eq!(json["rows"], 3);
    assert_eq!(json["broken"]["seq"], 3);
    assert_eq!(json["broken"]["reason"], "content");
    assert_eq!(json["broken"]["action"], "task.transition");
    assert_eq!(json["broken"]["task_id"], task.to_string());
    assert!(json["broken"]["at"].as_str().unwrap().ends_with('Z'), "{json}");
}

#[tokio::test]
async fn each_kind_of_break_has_its_message() {
    let f = Fleet::start().await;
    f.append(5).await;
    f.tamper("DELETE FROM audit_trail WHERE seq = 5");
    let out = f.verify(&[]);
    out.assert_code(1);
    assert!(out.stdout.starts_with("broken at seq 5: rows missing at the end: head says 5\n"), "{}", out.stdout);

    f.tamper("DELETE FROM audit_trail WHERE seq = 2");
    let out = f.verify(&["--json"]);
    out.assert_code(1);
    let json: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!((json["broken"]["seq"].as_i64(), json["broken"]["reason"].as_str()), (Some(3), Some("gap")));
    assert!(json["broken"]["message"].as_str().unwrap().starts_with("chain broken: previous row missing or reordered"));

    // Another key: every row's MAC is wrong.
    fs::write(f.dir.path().join("other.key"), "ab".repeat(32)).unwrap();
    let out = fleetctl(f.dir.path(), &["audit", "verify", "--database-url", &f.url, "--audit-key-file", "other.key"]);
    out.assert_code(1);
    assert!(
        out.stdout.starts_with("broken at seq 1: MAC invalid: hash recomputed without the audit key"),
        "{}",
        out.stdout
    );
}

#[tokio::test]
async fn usage_errors_exit_64() {
    let f = Fleet::start().await;
    let dir = f.dir.path();
    let verify_with =
        |key_file: &str| fleetctl(dir, &["audit", "verify", "--database-url", &f.url, "--audit-key-file", key_file]);

    let out = verify_with("missing.key");
    out.assert_code(EX_USAGE);
    assert!(out.stderr.contains("cannot read audit key file 'missing.key'"), "{}", out.stderr);
    assert!(out.stderr.contains("fleetctl audit key new"), "{}", out.stderr);

    fs::write(dir.join("not-hex.key"), "this is not hex at all").unwrap();
    let out = verify_with("not-hex.key");
    out.assert_code(EX_USAGE);
    assert!(out.stderr.contains("the audit key is not hex"), "{}", out.stderr);

    fs::write(dir.join("short.key"), "ab".repeat(16)).unwrap();
    let out = verify_with("short.key");
    out.assert_code(EX_USAGE);
    assert!(out.stderr.contains("at least 32 bytes, got 16"), "{}", out.stderr);

    let out = fleetctl(dir, &["audit", "verify", "--audit-key-file", "audit.key"]);
    out.assert_code(EX_USAGE);
    assert!(out.stderr.contains("--database-url"), "{}", out.stderr);

    let out = fleetctl(
        dir,
        &[
            "audit",
            "verify",
            "--database-url",
            &format!("postgres://u:{PASSWORD}@h:port/d"),
            "--audit-key-file",
            "audit.key",
        ],
    );
    out.assert_code(EX_USAGE);
    assert!(out.stderr.contains("invalid database URL"), "{}", out.stderr);

    // An existing key is never overwritten.
    let before = fs::read(dir.join("audit.key")).unwrap();
    let out = fleetctl(dir, &["audit", "key", "new", "--out", "audit.key"]);
    out.assert_code(EX_USAGE);
    assert!(out.stderr.contains("already exists"), "{}", out.stderr);
    assert_eq!(fs::read(dir.join("audit.key")).unwrap(), before);
}

#[tokio::test]
async fn connection_failures_name_host_and_port_only() {
    let f = Fleet::start().await;
    // A port nobody listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("postgres://postgres:{PASSWORD}@127.0.0.1:{port}/fleet");
    let out = fleetctl(f.dir.path(), &["audit", "verify", "--database-url", &url, "--audit-key-file", "audit.key"]);
    out.assert_code(1);
    assert!(out.stderr.contains(&format!("cannot connect to Postgres at 127.0.0.1:{port}")), "{}", out.stderr);

    let url = format!("postgres://postgres:{PASSWORD}@127.0.0.1:{}/no_such_db", f.pg.port());
    let out = fleetctl(f.dir.path(), &["db", "migrate", "--database-url", &url]);
    out.assert_code(1);
    assert!(out.stderr.contains("database \"no_such_db\" does not exist"), "{}", out.stderr);
}
