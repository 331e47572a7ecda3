//! `fleetctl audit anchor-key new`, `fleetctl audit anchor` and `fleetctl audit verify
//! --anchors` through the real binary against a real Postgres; the attacker is the
//! database superuser holding the audit key, rewriting rows with this test's own SQL.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fleet_testkit::Postgres;
use orchestrator::anchor::SignedAnchor;
use orchestrator::anchor::sink::{self, SinkError};
use orchestrator::audit::{self, AuditEntry, AuditKey, AuditRow};
use serde_json::{Value, json};
use sqlx::PgPool;
use tempfile::TempDir;

const EX_USAGE: i32 = 64;
/// In every URL given to the binary; no output may contain it.
const PASSWORD: &str = "s3cret-db-pw";

#[derive(Debug)]
struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Output {
    fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(self.code, code, "stdout: {}\nstderr: {}", self.stdout, self.stderr);
        assert!(!self.stdout.contains(PASSWORD) && !self.stderr.contains(PASSWORD), "the password leaked");
        self
    }
}

fn fleetctl(dir: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_fleetctl"))
        .args(args)
        .current_dir(dir)
        .env_remove("FLEET_DATABASE_URL")
        .env_remove("FLEET_DATABASE_URL_FILE")
        .output()
        .unwrap();
    Output {
        code: out.status.code().unwrap(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// A migrated database, an audit key, and an anchor key made by `audit anchor-key new`.
struct Fleet {
    _pg: Postgres,
    dir: TempDir,
    url: String,
    key: AuditKey,
    pool: PgPool,
    public_key: String,
}

impl Fleet {
    async fn start() -> Self {
        let pg = Postgres::start().expect("postgres must be installed; tests never skip");
        let plain = pg.create_database().unwrap();
        let name = plain.rsplit('/').next().unwrap().to_owned();
        let url = format!("postgres://postgres:{PASSWORD}@127.0.0.1:{}/{name}", pg.port());
        let dir = tempfile::tempdir().unwrap();
        fleetctl(dir.path(), &["db", "migrate", "--database-url", &url]).assert_code(0);
        fleetctl(dir.path(), &["audit", "key", "new", "--out", "audit.key"]).assert_code(0);
        let key = AuditKey::from_hex(&fs::read_to_string(dir.path().join("audit.key")).unwrap()).unwrap();

        let made = fleetctl(dir.path(), &["audit", "anchor-key", "new", "--out", "anchor.key"]);
        made.assert_code(0);
        for file in ["anchor.key", "anchor.key.pub"] {
            let mode = fs::metadata(dir.path().join(file)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{file}");
        }
        let seed = fs::read_to_string(dir.path().join("anchor.key")).unwrap();
        assert!(seed.len() == 65 && hex::decode(seed.trim()).is_ok(), "{seed:?}");
        let public_key = fs::read_to_string(dir.path().join("anchor.key.pub")).unwrap().trim().to_owned();
        assert_eq!(public_key.len(), 64);
        assert!(made.stdout.contains(&format!("public key: {public_key}\n")), "{}", made.stdout);
        assert_ne!(seed.trim(), public_key);
        // Never overwritten.
        let again = fleetctl(dir.path(), &["audit", "anchor-key", "new", "--out", "anchor.key"]);
        again.assert_code(EX_USAGE);
        assert!(again.stderr.contains("'anchor.key' already exists"), "{}", again.stderr);
        assert_eq!(fs::read_to_string(dir.path().join("anchor.key")).unwrap(), seed);

        let pool = PgPool::connect(&plain).await.unwrap();
        Self { _pg: pg, dir, url, key, pool, public_key }
    }

    async fn append(&self, n: usize) {
        for i in 0..n {
            let mut tx = self.pool.begin().await.unwrap();
            let entry = AuditEntry {
                actor_role: "orchestrator",
                actor_instance: "orchestrator-0",
                action: "task.transition",
                task_id: None,
                prompt_version: None,
                details: json!({"step": i}),
            };
            audit::append(&mut tx, &self.key, entry).await.unwrap();
            tx.commit().await.unwrap();
        }
    }

    /// `audit anchor --every EVERY` into `file:anchors.jsonl`, running.
    fn anchor_loop(&self, every: &str) -> std::process::Child {
        Command::new(env!("CARGO_BIN_EXE_fleetctl"))
            .args(["audit", "anchor", "--every", every, "--database-url", &self.url])
            .args(["--sink", "file:anchors.jsonl", "--key", "anchor.key"])
            .current_dir(self.dir.path())
            .env_remove("FLEET_DATABASE_URL")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Waits until `anchors.jsonl` holds `n` anchors (30 s at most).
    fn wait_for_anchors(&self, n: usize) {
        let path = self.path("anchors.jsonl");
        let deadline = Instant::now() + Duration::from_secs(30);
        while fs::read_to_string(&path).map_or(0, |t| t.lines().count()) < n {
            assert!(Instant::now() < deadline, "no anchor {n} within 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn anchor(&self, sink: &str) -> Output {
        fleetctl(
            self.dir.path(),
            &["audit", "anchor", "--once", "--database-url", &self.url, "--sink", sink, "--key", "anchor.key"],
        )
    }

    fn verify(&self, anchors: Option<&str>, extra: &[&str]) -> Output {
        let mut args = vec!["audit", "verify", "--database-url", &self.url, "--audit-key-file", "audit.key"];
        if let Some(spec) = anchors {
            args.extend(["--anchors", spec, "--anchor-pubkey", "anchor.key.pub"]);
        }
        args.extend(extra);
        fleetctl(self.dir.path(), &args)
    }

    /// The attack: the superuser, holding the audit key, changes row `seq`'s details and
    /// recomputes the hash and MAC of it and every later row, and the head.
    async fn rewrite_from(&self, seq: i64) {
        let mut tx = self.pool.begin().await.unwrap();
        sqlx::query("ALTER TABLE audit_trail DISABLE TRIGGER audit_no_update").execute(&mut *tx).await.unwrap();
        let rows = sqlx::query(
            "SELECT seq, at, actor_role, actor_instance, action, task_id, prompt_version, details, prev_hash, hash, \
             mac FROM audit_trail ORDER BY seq",
        )
        .fetch_all(&mut *tx)
        .await
        .unwrap();
        let mut prev: Option<Vec<u8>> = None;
        for r in &rows {
            let mut row = AuditRow::from_pg(r).unwrap();
            if row.seq < seq {
                prev = Some(row.hash);
                continue;
            }
            if row.seq == seq {
                row.details = json!({"step": "nothing to see here"});
            }
            row.prev_hash = prev.clone().unwrap();
            row.hash = row.computed_hash();
            row.mac = self.key.mac(&row.hash);
            sqlx::query("UPDATE audit_trail SET details = $1, prev_hash = $2, hash = $3, mac = $4 WHERE seq = $5")
                .bind(&row.details)
                .bind(&row.prev_hash)
                .bind(&row.hash)
                .bind(&row.mac)
                .bind(row.seq)
                .execute(&mut *tx)
                .await
                .unwrap();
            prev = Some(row.hash);
        }
        sqlx::query("UPDATE audit_head SET hash = $1").bind(prev.unwrap()).execute(&mut *tx).await.unwrap();
        sqlx::query("ALTER TABLE audit_trail ENABLE TRIGGER audit_no_update").execute(&mut *tx).await.unwrap();
        tx.commit().await.unwrap();
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path).unwrap().lines().map(str::to_owned).collect()
}

#[tokio::test]
async fn a_superuser_with_the_audit_key_rewrites_history_and_the_anchors_name_the_first_rewritten_row() {
    let f = Fleet::start().await;
    let spec = "file:anchors.jsonl";

    // Nothing to anchor yet: no row, no anchor, no file.
    let out = f.anchor(spec);
    out.assert_code(0);
    assert_eq!(out.stdout, "nothing new to anchor since the last anchor\n");
    assert!(!f.path("anchors.jsonl").exists());

    f.append(5).await;
    let out = f.anchor(spec);
    out.assert_code(0);
    assert_eq!(out.stdout, "anchored seq 5 as anchor 1 (rows 1..=5) in file:anchors.jsonl\n");
    assert_eq!(f.anchor(spec).stdout, "nothing new to anchor since the last anchor\n");
    f.append(3).await;
    let out = f.anchor(spec);
    out.assert_code(0);
    assert_eq!(out.stdout, "anchored seq 8 as anchor 2 (rows 6..=8) in file:anchors.jsonl\n");
    f.append(1).await;

    let anchors = lines(&f.path("anchors.jsonl"));
    assert_eq!(anchors.len(), 2);
    let second = SignedAnchor::parse(&anchors[1]).unwrap();
    assert_eq!((second.body().n, second.body().first_seq, second.body().seq), (2, 6, 8));
    assert_eq!(second.body().rows.len(), 3);
    assert_eq!(second.body().key, f.public_key);

    let ok = f.verify(Some(spec), &[]);
    ok.assert_code(0);
    let expected_head = "intact: 9 rows\nanchors: 2 good, the last (anchor 2) at seq 8, ";
    assert!(ok.stdout.starts_with(expected_head), "{}", ok.stdout);
    assert!(ok.stdout.ends_with("Z; 1 rows after it not yet anchored\n"), "{}", ok.stdout);
    assert_eq!(ok.stdout.lines().count(), 2, "{}", ok.stdout);

    f.rewrite_from(3).await;

    // The chain and every MAC were recomputed: the walk alone sees nothing.
    let plain = f.verify(None, &[]);
    plain.assert_code(0);
    assert_eq!(plain.stdout, "intact: 9 rows\n");

    let caught = f.verify(Some(spec), &[]);
    caught.assert_code(1);
    let mut out = caught.stdout.lines();
    assert_eq!(out.next(), Some("intact: 9 rows"));
    assert!(out.next().unwrap().starts_with("anchors: 2 good, the last (anchor 2) at seq 8, "));
    assert_eq!(
        out.next(),
        Some(
            "rewritten: first rewritten row is seq 3: its hash differs from what anchor 1 (line 1) committed to; \
             every later row's hash was recomputed"
        )
    );
    let first = SignedAnchor::parse(&anchors[0]).unwrap();
    let anchored = first.body().rows[2].to_string();
    let now: Vec<u8> =
        sqlx::query_scalar("SELECT hash FROM audit_trail WHERE seq = 3").fetch_one(&f.pool).await.unwrap();
    assert_eq!(out.next(), Some(format!("  anchored hash {anchored}  database hash {}", hex::encode(now)).as_str()));
    assert_eq!(out.next(), None);
    assert_eq!(caught.stderr, "error: the audit trail was rewritten: the first rewritten row is seq 3\n");

    let json_out = f.verify(Some(spec), &["--json"]);
    json_out.assert_code(1);
    let v: Value = serde_json::from_str(&json_out.stdout).unwrap();
    assert_eq!(v["intact"], false);
    assert_eq!(v["broken"], Value::Null);
    assert_eq!(v["anchors"]["ok"], false);
    assert_eq!(v["anchors"]["count"], 2);
    assert_eq!(v["anchors"]["unanchored"], 1);
    assert_eq!(v["anchors"]["problem"], Value::Null);
    assert_eq!(v["anchors"]["rewritten"]["seq"], 3);
    assert_eq!(v["anchors"]["rewritten"]["anchor"], 1);
    assert_eq!(v["anchors"]["rewritten"]["place"], "line 1");
    assert_eq!(v["anchors"]["rewritten"]["anchored"], anchored);

    // The anchoring process sees it too, and anchors nothing more.
    let refused = f.anchor(spec);
    refused.assert_code(1);
    assert!(
        refused.stderr.contains("the audit trail no longer matches the last anchor: row 8 was anchored with hash"),
        "{}",
        refused.stderr
    );
    assert_eq!(lines(&f.path("anchors.jsonl")), anchors);
}

#[tokio::test]
async fn forged_removed_and_cut_anchors_are_reported() {
    let f = Fleet::start().await;
    let spec = "file:anchors.jsonl";
    for _ in 0..3 {
        f.append(2).await;
        f.anchor(spec).assert_code(0);
    }
    let all = lines(&f.path("anchors.jsonl"));
    assert_eq!(all.len(), 3);
    let check = |content: String, problem: &str, good: &str| {
        fs::write(f.path("tampered.jsonl"), content).unwrap();
        let out = f.verify(Some("file:tampered.jsonl"), &[]);
        out.assert_code(1);
        let mut text = out.stdout.lines();
        assert_eq!(text.next(), Some("intact: 6 rows"));
        assert!(text.next().unwrap().starts_with(good), "{}", out.stdout);
        assert_eq!(text.next(), Some(format!("anchor problem: {problem}").as_str()));
        assert_eq!(text.next(), None);
        assert_eq!(out.stderr, format!("error: the anchors do not check out: {problem}\n"));
    };

    // Forged: one character of the second anchor's first row hash changed.
    let body_at = all[1].find(r#""rows":[""#).unwrap() + r#""rows":[""#.len();
    let mut forged = all[1].clone();
    let c = if &forged[body_at..=body_at] == "0" { "1" } else { "0" };
    forged.replace_range(body_at..=body_at, c);
    check(
        format!("{}\n{forged}\n{}\n", all[0], all[2]),
        "line 2 (anchor 2): signature invalid under the anchor public key: forged or altered",
        "anchors: 1 good, the last (anchor 1) at seq 2, ",
    );

    // Signed by another key.
    fleetctl(f.dir.path(), &["audit", "anchor-key", "new", "--out", "other.key"]).assert_code(0);
    let other = fleetctl(
        f.dir.path(),
        &["audit", "anchor", "--database-url", &f.url, "--sink", "file:other.jsonl", "--key", "other.key"],
    );
    other.assert_code(0);
    check(
        fs::read_to_string(f.path("other.jsonl")).unwrap(),
        "line 1 (anchor 1): signature invalid under the anchor public key: forged or altered",
        "anchors: none good; 6 rows not yet anchored",
    );

    // Removed from the middle.
    check(
        format!("{}\n{}\n", all[0], all[2]),
        "line 2 (anchor 3): anchor number 3 does not follow 1: an anchor was removed, inserted or reordered",
        "anchors: 1 good, the last (anchor 1) at seq 2, ",
    );

    // Cut in the middle of the last line.
    let cut = format!("{}\n{}\n{}", all[0], all[1], &all[2][..all[2].len() / 2]);
    check(
        cut.clone(),
        "line 3 is incomplete: the anchor file was cut or a write interrupted",
        "anchors: 2 good, the last (anchor 2) at seq 4, ",
    );
    // Not a line at all.
    check(
        format!("{}\nhello\n", all[0]),
        "line 2 is not a valid anchor: not an anchor line: expected value at line 1 column 1",
        "anchors: 1 good, the last (anchor 1) at seq 2, ",
    );

    // The anchoring process will not continue a cut file.
    fs::write(f.path("cut.jsonl"), &cut).unwrap();
    f.append(1).await;
    let out = f.anchor("file:cut.jsonl");
    out.assert_code(1);
    assert!(
        out.stderr.contains("the sink's last anchor (the last line) cannot be continued: it is an incomplete line"),
        "{}",
        out.stderr
    );
    assert_eq!(fs::read_to_string(f.path("cut.jsonl")).unwrap(), cut);

    // Usage errors.
    let bad = f.verify(Some("s3:bucket/anchors"), &[]);
    bad.assert_code(EX_USAGE);
    assert!(bad.stderr.contains("invalid anchor sink 's3:bucket/anchors'"), "{}", bad.stderr);
    let no_key = fleetctl(
        f.dir.path(),
        &["audit", "verify", "--database-url", &f.url, "--audit-key-file", "audit.key", "--anchors", spec],
    );
    no_key.assert_code(EX_USAGE);
    assert!(no_key.stderr.contains("--anchor-pubkey"), "{}", no_key.stderr);
    fs::write(f.path("bad.pub"), "zz").unwrap();
    let bad_pub = fleetctl(
        f.dir.path(),
        &[
            "audit",
            "verify",
            "--database-url",
            &f.url,
            "--audit-key-file",
            "audit.key",
            "--anchors",
            spec,
            "--anchor-pubkey",
            "bad.pub",
        ],
    );
    bad_pub.assert_code(EX_USAGE);
    assert!(bad_pub.stderr.contains("the anchor public key is not hex"), "{}", bad_pub.stderr);
    let no_anchor_key =
        fleetctl(f.dir.path(), &["audit", "anchor", "--database-url", &f.url, "--sink", spec, "--key", "missing.key"]);
    no_anchor_key.assert_code(EX_USAGE);
    assert!(no_anchor_key.stderr.contains("cannot read anchor key file 'missing.key'"), "{}", no_anchor_key.stderr);
}

#[tokio::test]
async fn the_sinks_refuse_to_rewrite_and_the_git_sink_round_trips() {
    let f = Fleet::start().await;
    let repo = f.path("anchors.git");
    let spec = format!("git:{}", repo.display());
    f.append(3).await;
    f.anchor(&spec).assert_code(0);
    f.append(2).await;
    let out = f.anchor(&spec);
    out.assert_code(0);
    assert_eq!(out.stdout, format!("anchored seq 5 as anchor 2 (rows 4..=5) in {spec}\n"));

    let git = |args: &[&str]| {
        let out = Command::new("git").arg("-C").arg(&repo).args(args).stdin(Stdio::null()).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    assert_eq!(git(&["rev-parse", "--is-bare-repository"]), "true");
    assert_eq!(git(&["config", "receive.denyNonFastForwards"]), "true");
    assert_eq!(git(&["rev-list", "--count", "refs/heads/anchors"]), "2");
    assert_eq!(
        git(&["log", "--format=%s", "refs/heads/anchors"]),
        "anchor 2: seq 5 (rows 4..=5)\nanchor 1: seq 3 (rows 1..=3)"
    );
    let sink = sink::open(&spec).unwrap();
    let stored = sink.read_all().unwrap();
    assert_eq!(stored.len(), 2);
    assert!(stored.iter().all(|s| s.complete));
    assert_eq!(git(&["show", "refs/heads/anchors~1:anchor.json"]), stored[0].text);
    assert_eq!(git(&["ls-tree", "--name-only", "refs/heads/anchors"]), "anchor.json");
    let tip = git(&["rev-parse", "refs/heads/anchors"]);
    assert_eq!(stored[1].place, format!("commit {}", &tip[..12]));

    let ok = f.verify(Some(&spec), &[]);
    ok.assert_code(0);
    assert!(ok.stdout.starts_with("intact: 5 rows\nanchors: 2 good, the last (anchor 2) at seq 5, "), "{}", ok.stdout);

    // An anchor already there, appended again: refused, nothing written.
    let first = SignedAnchor::parse(&stored[0].text).unwrap();
    let err = sink.append(&first).unwrap_err();
    assert!(matches!(err, SinkError::Refused { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        format!(
            "anchor sink {spec} refuses the anchor: anchor number 1 does not follow 2; anchors are never rewritten"
        )
    );
    assert_eq!(git(&["rev-list", "--count", "refs/heads/anchors"]), "2");

    // Someone with write access to the repository but not the key commits an altered
    // anchor 3: verify names its commit.
    let mut forged = stored[1].text.replace(r#""n":2"#, r#""n":3"#);
    forged.push('\n');
    let git_in = |args: &[&str], input: &str| {
        let mut child = Command::new("git")
            .arg("-C")
            .arg(&repo)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), input.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let blob = git_in(&["hash-object", "-w", "--stdin"], &forged);
    let tree = git_in(&["mktree"], &format!("100644 blob {blob}\tanchor.json\n"));
    let commit = Command::new("git")
        .arg("-C")
        .arg(&repo)
        .args(["-c", "user.name=x", "-c", "user.email=x@x", "commit-tree", &tree, "-p", &tip, "-m", "anchor 3"])
        .output()
        .unwrap();
    let commit = String::from_utf8(commit.stdout).unwrap().trim().to_owned();
    git(&["update-ref", "refs/heads/anchors", &commit]);
    let out = f.verify(Some(&spec), &[]);
    out.assert_code(1);
    assert!(
        out.stdout.ends_with(&format!(
            "anchor problem: commit {} (anchor 3): signature invalid under the anchor public key: forged or altered\n",
            &commit[..12]
        )),
        "{}",
        out.stdout
    );

    // The same with the file sink: the bytes stay as they were.
    f.anchor("file:anchors.jsonl").assert_code(0);
    let before = fs::read(f.path("anchors.jsonl")).unwrap();
    let file_sink = sink::open(&format!("file:{}", f.path("anchors.jsonl").display())).unwrap();
    let mine = SignedAnchor::parse(&file_sink.read_all().unwrap()[0].text).unwrap();
    let err = file_sink.append(&mine).unwrap_err();
    assert!(err.to_string().ends_with("anchor number 1 does not follow 1; anchors are never rewritten"), "{err}");
    // Another key's anchor 1 for an empty file is fine as a first line, but not after ours.
    let err = file_sink.append(&first).unwrap_err();
    assert!(matches!(err, SinkError::Refused { .. }), "{err}");
    assert_eq!(fs::read(f.path("anchors.jsonl")).unwrap(), before);

    // A non-bare repository: the anchors live on their own branch; the work tree and index
    // are untouched.
    let work = f.path("work");
    let init = Command::new("git").args(["init", "--quiet"]).arg(&work).output().unwrap();
    assert!(init.status.success());
    let work_spec = format!("git:{}", work.display());
    f.anchor(&work_spec).assert_code(0);
    let status = Command::new("git").arg("-C").arg(&work).args(["status", "--porcelain"]).output().unwrap();
    assert_eq!(String::from_utf8(status.stdout).unwrap(), "");
    assert!(!work.join("anchors.jsonl").exists());
    f.verify(Some(&work_spec), &[]).assert_code(0);
}

#[tokio::test]
async fn the_loop_anchors_at_its_interval_and_stops_on_sigterm() {
    let f = Fleet::start().await;
    f.append(2).await;
    let child = f.anchor_loop("1s");
    let wait_for = |n: usize| f.wait_for_anchors(n);
    wait_for(1);
    f.append(1).await;
    wait_for(2);
    let kill = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        stdout,
        "anchored seq 2 as anchor 1 (rows 1..=2) in file:anchors.jsonl\n\
         anchored seq 3 as anchor 2 (rows 3..=3) in file:anchors.jsonl\nstopped\n"
    );
    assert_eq!(lines(&f.path("anchors.jsonl")).len(), 2);
}

/// Issue 14: the head is anchored at every incident, not only at the interval: a loop
/// set to anchor hourly anchors within seconds of an incident being opened.
#[tokio::test]
async fn an_incident_is_anchored_at_once_by_a_loop_on_a_long_interval() {
    let f = Fleet::start().await;
    f.append(2).await;
    let child = f.anchor_loop("1h");
    let wait_for = |n: usize| f.wait_for_anchors(n);
    wait_for(1);
    // The listener is made after the first anchor; give it a moment, as an orchestrator
    // would take to notice anything.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // What the orchestrator does when it opens one: a row in the trail, then the incident.
    f.append(1).await;
    sqlx::query(
        "INSERT INTO incidents (id, severity, trigger, title, freezes_merges, opened_by) \
         VALUES ('0190a5e2-7c1d-7b3e-9f00-1a2b3c4d5e6f', 'high', 'operator', 'drill', true, 'olga')",
    )
    .execute(&f.pool)
    .await
    .unwrap();
    wait_for(2);
    let kill = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        stdout,
        "anchored seq 2 as anchor 1 (rows 1..=2) in file:anchors.jsonl\n\
         incident 0190a5e2-7c1d-7b3e-9f00-1a2b3c4d5e6f opened: anchoring now\n\
         anchored seq 3 as anchor 2 (rows 3..=3) in file:anchors.jsonl\nstopped\n"
    );
}

#[tokio::test]
async fn a_broken_trail_is_never_anchored_and_an_empty_sink_is_no_proof() {
    let f = Fleet::start().await;
    f.append(3).await;
    // Nothing anchored yet: --anchors refuses to call that verified.
    fs::write(f.path("empty.jsonl"), "").unwrap();
    let out = f.verify(Some("file:empty.jsonl"), &[]);
    out.assert_code(1);
    assert_eq!(
        out.stdout,
        "intact: 3 rows\nanchors: none good; 3 rows not yet anchored\nanchor problem: the sink holds no anchor: a \
         wrong --anchors, or nothing was ever anchored\n"
    );

    // Row 2 altered without recomputing anything: the anchoring process will not vouch
    // for it, and writes nothing.
    let mut tx = f.pool.begin().await.unwrap();
    sqlx::query("ALTER TABLE audit_trail DISABLE TRIGGER audit_no_update").execute(&mut *tx).await.unwrap();
    sqlx::query("UPDATE audit_trail SET details = '{\"step\": 42}' WHERE seq = 2").execute(&mut *tx).await.unwrap();
    sqlx::query("ALTER TABLE audit_trail ENABLE TRIGGER audit_no_update").execute(&mut *tx).await.unwrap();
    tx.commit().await.unwrap();
    let out = f.anchor("file:anchors.jsonl");
    out.assert_code(1);
    assert_eq!(
        out.stderr,
        "error: Failed to anchor: the audit trail is broken at seq 2: its content does not hash to its hash; not \
         anchoring it\n"
    );
    assert!(!f.path("anchors.jsonl").exists());
}

#[tokio::test]
async fn a_long_stretch_is_split_into_anchors_of_at_most_4096_rows() {
    let f = Fleet::start().await;
    let mut tx = f.pool.begin().await.unwrap();
    for i in 0..4100 {
        let entry = AuditEntry {
            actor_role: "orchestrator",
            actor_instance: "orchestrator-0",
            action: "task.transition",
            task_id: None,
            prompt_version: None,
            details: json!({"step": i}),
        };
        audit::append(&mut tx, &f.key, entry).await.unwrap();
    }
    tx.commit().await.unwrap();
    let out = f.anchor("file:anchors.jsonl");
    out.assert_code(0);
    assert_eq!(
        out.stdout,
        "anchored seq 4096 as anchor 1 (rows 1..=4096) in file:anchors.jsonl\n\
         anchored seq 4100 as anchor 2 (rows 4097..=4100) in file:anchors.jsonl\n"
    );
    let ok = f.verify(Some("file:anchors.jsonl"), &[]);
    ok.assert_code(0);
    assert!(ok.stdout.starts_with("intact: 4100 rows\nanchors: 2 good, the last (anchor 2) at seq 4100, "));
}

#[tokio::test]
async fn the_loop_retries_an_unreachable_database_until_stopped() {
    let f = Fleet::start().await;
    // A port nobody listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("postgres://postgres:{PASSWORD}@127.0.0.1:{port}/fleet");
    let log = f.path("stderr.log");
    let child = Command::new(env!("CARGO_BIN_EXE_fleetctl"))
        .args(["audit", "anchor", "--every", "1s", "--database-url", &url])
        .args(["--sink", "file:anchors.jsonl", "--key", "anchor.key"])
        .current_dir(f.dir.path())
        .env_remove("FLEET_DATABASE_URL")
        .stdout(Stdio::piped())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Two failed attempts: the first at once, the second after the 1 s backoff.
    let deadline = Instant::now() + Duration::from_secs(30);
    while fs::read_to_string(&log).unwrap().matches("warning: ").count() < 2 {
        assert!(Instant::now() < deadline, "no retry within 30 s: {}", fs::read_to_string(&log).unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
    let kill = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let stderr = fs::read_to_string(&log).unwrap();
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "stopped\n");
    let mut warnings = stderr.lines();
    let refused = format!("cannot connect to Postgres at 127.0.0.1:{port}");
    assert!(
        warnings.next().unwrap().starts_with(&format!("warning: anchoring failed, retrying in 1s: {refused}")),
        "{stderr}"
    );
    assert!(
        warnings.next().unwrap().starts_with(&format!("warning: anchoring failed, retrying in 2s: {refused}")),
        "{stderr}"
    );
    assert!(!stderr.contains(PASSWORD), "{stderr}");
    assert!(!f.path("anchors.jsonl").exists());
}

#[tokio::test]
async fn rows_deleted_at_the_end_with_the_head_set_back_are_named() {
    let f = Fleet::start().await;
    f.append(6).await;
    f.anchor("file:anchors.jsonl").assert_code(0);
    // The attack plain verify cannot see: the last two rows deleted, the head set back.
    let mut tx = f.pool.begin().await.unwrap();
    sqlx::query("ALTER TABLE audit_trail DISABLE TRIGGER audit_no_update").execute(&mut *tx).await.unwrap();
    sqlx::query("DELETE FROM audit_trail WHERE seq > 4").execute(&mut *tx).await.unwrap();
    sqlx::query("UPDATE audit_head SET seq = 4, hash = (SELECT hash FROM audit_trail WHERE seq = 4)")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("ALTER TABLE audit_trail ENABLE TRIGGER audit_no_update").execute(&mut *tx).await.unwrap();
    tx.commit().await.unwrap();

    let plain = f.verify(None, &[]);
    plain.assert_code(0);
    assert_eq!(plain.stdout, "intact: 4 rows\n");
    let caught = f.verify(Some("file:anchors.jsonl"), &["--json"]);
    caught.assert_code(1);
    let v: Value = serde_json::from_str(&caught.stdout).unwrap();
    assert_eq!(v["anchors"]["rewritten"]["seq"], 5);
    assert_eq!(v["anchors"]["rewritten"]["found"], Value::Null);
    assert_eq!(v["anchors"]["unanchored"], 0);
    assert_eq!(
        v["anchors"]["rewritten"]["message"],
        "first rewritten row is seq 5: the row is gone, though anchor 1 (line 1) committed to it"
    );
    assert_eq!(caught.stderr, "error: the audit trail was rewritten: the first rewritten row is seq 5\n");
    let refused = f.anchor("file:anchors.jsonl");
    refused.assert_code(1);
    assert!(refused.stderr.contains("the head is at seq 4, below the anchored seq 6"), "{}", refused.stderr);
}

#[tokio::test]
async fn a_head_that_disagrees_with_its_row_is_never_anchored() {
    let f = Fleet::start().await;
    f.append(2).await;
    sqlx::query("UPDATE audit_head SET hash = $1").bind(vec![7u8; 32]).execute(&f.pool).await.unwrap();
    let out = f.anchor("file:anchors.jsonl");
    out.assert_code(1);
    assert_eq!(
        out.stderr,
        "error: Failed to anchor: the audit trail is broken at seq 2: its hash is not the head's hash; not anchoring \
         it\n"
    );
    assert!(!f.path("anchors.jsonl").exists());
}
