//! `fleetctl keys …` through the real binary: files in a temporary directory, exit codes,
//! messages, and keysets checked with the envelope crate's own API.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use envelope::{
    Envelope, Heartbeat, Instance, Keyset, MasterFile, MemoryReplayGuard, PermissionTable, Role, Sender, Verifier,
    VerifierConfig, VerifyContext, VerifyError,
};
use tempfile::TempDir;

const EX_USAGE: i32 = 64;

struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs the binary in `dir` (never changing this process's environment).
fn fleetctl(dir: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_fleetctl")).args(args).current_dir(dir).output().unwrap();
    Output {
        code: out.status.code().unwrap(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// Runs and insists on success.
fn ok(dir: &Path, args: &[&str]) -> String {
    let out = fleetctl(dir, args);
    assert_eq!(out.code, 0, "{args:?} failed: {}", out.stderr);
    out.stdout
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn permissions_file() -> String {
    workspace_root().join("config/permissions.toml").to_str().unwrap().to_owned()
}

fn permissions() -> PermissionTable {
    PermissionTable::parse(&fs::read_to_string(permissions_file()).unwrap()).unwrap()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// A temporary directory with a fresh `m.toml`.
fn with_master() -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    ok(dir.path(), &["keys", "master", "new", "--out", "m.toml"]);
    dir
}

fn derive(dir: &Path, process: &str) -> Keyset {
    let text =
        ok(dir, &["keys", "derive", "--master", "m.toml", "--process", process, "--permissions", &permissions_file()]);
    Keyset::parse(&text).unwrap()
}

fn kids(keyset: &Keyset) -> BTreeSet<(String, bool)> {
    keyset.entries.iter().map(|e| (e.kid.to_string(), e.secret.is_some())).collect()
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis().try_into().unwrap()
}

fn dev_heartbeat() -> Envelope {
    Envelope::new(
        Sender { role: Role::Dev, instance: Instance::parse("dev-1").unwrap() },
        Role::Orchestrator,
        now_ms(),
        60_000,
        0,
        Heartbeat { seq: 1, busy: false }.into(),
    )
}

/// Verifies `wire` on the heartbeat stream with `keyset` as the orchestrator's keys.
fn verify_as_orchestrator(keyset: Keyset, wire: &[u8]) -> Result<String, VerifyError> {
    let verifier = Verifier::new(keyset.into_keyring(), permissions(), VerifierConfig::default());
    let ctx = VerifyContext { now_ms: now_ms(), kill_epoch: 0 };
    verifier.verify("fleet:heartbeats", wire, ctx, &mut MemoryReplayGuard::new()).map(|v| v.kid().to_string())
}

/// The values of the `secret = "…"` lines of a master or keyset file.
fn secret_values(text: &str) -> Vec<String> {
    text.lines().filter(|l| l.starts_with("secret")).map(|l| l.split('"').nth(1).unwrap().to_owned()).collect()
}

/// The master secret and every edge key of every generation so far.
fn all_secrets(dir: &Path) -> Vec<String> {
    let mut secrets = secret_values(&fs::read_to_string(dir.join("m.toml")).unwrap());
    secrets.extend(secret_values(&derive(dir, "operator").to_toml()));
    assert!(secrets.len() > 10);
    secrets
}

#[test]
fn master_new_writes_a_private_file_and_refuses_to_overwrite_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = fleetctl(dir.path(), &["keys", "master", "new"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let path = dir.path().join("agentfleet.master.toml");
    assert_eq!(mode(&path), 0o600);
    let first = fs::read_to_string(&path).unwrap();
    let master = MasterFile::parse(&first).unwrap();
    assert_eq!((master.current_generation, master.retired_through), (1, 0));
    assert!(
        out.stdout.contains("'agentfleet.master.toml'") && out.stdout.contains("fleetctl keys derive"),
        "{}",
        out.stdout
    );

    let again = fleetctl(dir.path(), &["keys", "master", "new"]);
    assert_eq!(again.code, EX_USAGE);
    assert!(again.stderr.contains("already exists") && again.stderr.contains("--force"), "{}", again.stderr);
    assert_eq!(fs::read_to_string(&path).unwrap(), first);

    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    ok(dir.path(), &["keys", "master", "new", "--force"]);
    assert_ne!(fs::read_to_string(&path).unwrap(), first);
    assert_eq!(mode(&path), 0o600);
}

#[test]
fn two_masters_differ() {
    let a = with_master();
    let b = with_master();
    assert_ne!(
        fs::read_to_string(a.path().join("m.toml")).unwrap(),
        fs::read_to_string(b.path().join("m.toml")).unwrap()
    );
}

#[test]
fn the_dev_keyset_holds_exactly_the_dev_edges_and_is_deterministic() {
    let dir = with_master();
    let keyset = derive(dir.path(), "dev");
    assert_eq!(keyset.process.to_string(), "dev");
    let expected: BTreeSet<_> = ["dev>orchestrator:1", "orchestrator>dev:1", "budget>dev:1"]
        .into_iter()
        .map(|k| (k.to_owned(), true))
        .collect();
    assert_eq!(kids(&keyset), expected);

    let again = derive(dir.path(), "dev");
    assert_eq!(keyset.to_toml(), again.to_toml());

    ok(
        dir.path(),
        &[
            "keys",
            "derive",
            "--master",
            "m.toml",
            "--process",
            "dev",
            "--permissions",
            &permissions_file(),
            "--out",
            "dev.toml",
        ],
    );
    let written = dir.path().join("dev.toml");
    assert_eq!(mode(&written), 0o600);
    assert_eq!(fs::read_to_string(&written).unwrap(), *keyset.to_toml());
}

#[test]
fn the_permission_file_defaults_to_config_permissions_toml() {
    let dir = with_master();
    let master = dir.path().join("m.toml");
    let text = ok(&workspace_root(), &["keys", "derive", "--master", master.to_str().unwrap(), "--process", "budget"]);
    assert_eq!(Keyset::parse(&text).unwrap().to_toml(), derive(dir.path(), "budget").to_toml());
}

#[test]
fn what_a_derived_dev_keyset_seals_the_derived_orchestrator_keyset_verifies() {
    let dir = with_master();
    let env = dev_heartbeat();
    let wire = derive(dir.path(), "dev").into_keyring().seal(&env).unwrap();
    let kid = verify_as_orchestrator(derive(dir.path(), "orchestrator"), &wire).unwrap();
    assert_eq!(kid, "dev>orchestrator:1");

    // The operator keyset verifies it too; another fleet's keys do not.
    assert!(verify_as_orchestrator(derive(dir.path(), "operator"), &wire).is_ok());
    let other = with_master();
    assert_eq!(verify_as_orchestrator(derive(other.path(), "orchestrator"), &wire), Err(VerifyError::BadSignature));
}

#[test]
fn rotate_adds_a_generation_and_retire_removes_the_old_secrets() {
    let dir = with_master();
    let old_dev = derive(dir.path(), "dev");
    let old_orchestrator = derive(dir.path(), "orchestrator");

    let out = ok(dir.path(), &["keys", "stage", "--master", "m.toml"]);
    assert!(
        out.contains("Staged generation 2")
            && out.contains("re-derive every keyset")
            && out.contains("fleetctl keys promote")
            && out.contains("--through 1"),
        "{out}"
    );
    assert_eq!(mode(&dir.path().join("m.toml")), 0o600);
    let rotated = derive(dir.path(), "dev");
    let both: BTreeSet<_> = [
        "dev>orchestrator:2",
        "dev>orchestrator:1",
        "orchestrator>dev:2",
        "orchestrator>dev:1",
        "budget>dev:2",
        "budget>dev:1",
    ]
    .into_iter()
    .map(|k| (k.to_owned(), true))
    .collect();
    assert_eq!(kids(&rotated), both);
    // Generation 1 keys are unchanged by the rotation.
    let old_text = old_dev.to_toml();
    assert!(
        rotated.to_toml().lines().filter(|l| l.starts_with("secret")).filter(|l| old_text.contains(*l)).count() == 3
    );

    // Staged: the rotated keyset still signs with :1, so receivers that have not been
    // updated yet keep accepting what it sends.
    let staged_wire = rotated.into_keyring().seal(&dev_heartbeat()).unwrap();
    assert_eq!(verify_as_orchestrator(old_orchestrator.clone(), &staged_wire).unwrap(), "dev>orchestrator:1");
    let staged_orchestrator = derive(dir.path(), "orchestrator");

    // Promoted: senders move to :2, which the staged receivers already hold; what the old
    // keyset signed still verifies until retired.
    let out = ok(dir.path(), &["keys", "promote", "--master", "m.toml"]);
    assert!(out.contains("Promoted generation 2"), "{out}");
    let again = ok(dir.path(), &["keys", "promote", "--master", "m.toml"]);
    assert!(again.contains("Nothing to do"), "{again}");
    let new_wire = derive(dir.path(), "dev").into_keyring().seal(&dev_heartbeat()).unwrap();
    assert_eq!(verify_as_orchestrator(staged_orchestrator, &new_wire).unwrap(), "dev>orchestrator:2");
    let old_wire = old_dev.into_keyring().seal(&dev_heartbeat()).unwrap();
    let orchestrator = derive(dir.path(), "orchestrator");
    assert_eq!(verify_as_orchestrator(orchestrator.clone(), &new_wire).unwrap(), "dev>orchestrator:2");
    assert_eq!(verify_as_orchestrator(orchestrator, &old_wire).unwrap(), "dev>orchestrator:1");

    let out = ok(dir.path(), &["keys", "retire", "--master", "m.toml", "--through", "1"]);
    assert!(out.contains("Retired generations 1..=1"), "{out}");
    assert_eq!(mode(&dir.path().join("m.toml")), 0o600);
    let retired = derive(dir.path(), "dev");
    let expected: BTreeSet<_> = both.iter().map(|(kid, _)| (kid.clone(), kid.ends_with(":2"))).collect();
    assert_eq!(kids(&retired), expected);
    assert!(
        retired.to_toml().lines().filter(|l| l.starts_with("secret")).all(|l| !old_text.contains(l)),
        "a retired secret is still in the keyset"
    );
    assert!(matches!(
        verify_as_orchestrator(derive(dir.path(), "orchestrator"), &old_wire),
        Err(VerifyError::RetiredKid(_))
    ));

    // Retiring again is a no-op, and the current generation can't be retired.
    let out = ok(dir.path(), &["keys", "retire", "--master", "m.toml", "--through", "1"]);
    assert!(out.contains("Nothing to do"), "{out}");
    let current = fleetctl(dir.path(), &["keys", "retire", "--master", "m.toml", "--through", "2"]);
    assert_eq!(current.code, EX_USAGE);
    assert!(
        current.stderr.contains("senders sign with generation 2") && current.stderr.contains("fleetctl keys stage"),
        "{}",
        current.stderr
    );
}

#[test]
fn list_shows_kids_and_their_state_without_secrets() {
    let dir = with_master();
    ok(dir.path(), &["keys", "stage", "--master", "m.toml"]);
    ok(dir.path(), &["keys", "promote", "--master", "m.toml"]);
    ok(dir.path(), &["keys", "retire", "--master", "m.toml", "--through", "1"]);
    ok(
        dir.path(),
        &[
            "keys",
            "derive",
            "--master",
            "m.toml",
            "--process",
            "qa",
            "--permissions",
            &permissions_file(),
            "--out",
            "qa.toml",
        ],
    );
    let out = ok(dir.path(), &["keys", "list", "--keyset", "qa.toml"]);
    assert!(out.contains("process qa"), "{out}");
    let states: BTreeSet<_> = out
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let kid = words.next()?;
            kid.contains('>').then(|| (kid.to_owned(), words.next().unwrap().to_owned()))
        })
        .collect();
    let expected: BTreeSet<_> = [
        ("qa>orchestrator:2", "active"),
        ("qa>orchestrator:1", "retired"),
        ("orchestrator>qa:2", "active"),
        ("orchestrator>qa:1", "retired"),
        ("budget>qa:2", "active"),
        ("budget>qa:1", "retired"),
    ]
    .into_iter()
    .map(|(k, s)| (k.to_owned(), s.to_owned()))
    .collect();
    assert_eq!(states, expected);
}

#[test]
fn no_message_contains_a_secret() {
    let dir = with_master();
    let rotate = fleetctl(dir.path(), &["keys", "stage", "--master", "m.toml"]);
    let secrets = all_secrets(dir.path());
    let perms = permissions_file();
    let runs = [
        rotate,
        fleetctl(dir.path(), &["keys", "master", "new", "--out", "other.toml"]),
        fleetctl(
            dir.path(),
            &["keys", "derive", "--master", "m.toml", "--process", "dev", "--permissions", &perms, "--out", "dev.toml"],
        ),
        fleetctl(
            dir.path(),
            &["keys", "derive", "--master", "m.toml", "--process", "dev", "--permissions", &perms, "--out", "dev.toml"],
        ),
        fleetctl(dir.path(), &["keys", "list", "--keyset", "dev.toml"]),
        fleetctl(dir.path(), &["keys", "list", "--keyset", "m.toml"]),
        fleetctl(dir.path(), &["keys", "retire", "--master", "m.toml", "--through", "5"]),
        fleetctl(dir.path(), &["keys", "retire", "--master", "m.toml", "--through", "1"]),
        fleetctl(dir.path(), &["keys", "master", "new", "--out", "m.toml"]),
        fleetctl(dir.path(), &["keys", "derive", "--master", "dev.toml", "--process", "dev"]),
    ];
    for run in runs {
        for secret in &secrets {
            assert!(
                !run.stdout.contains(secret.as_str()) && !run.stderr.contains(secret.as_str()),
                "a secret leaked:\n{}\n{}",
                run.stdout,
                run.stderr
            );
        }
    }
}

#[test]
fn an_unknown_process_is_a_usage_error_naming_the_valid_ones() {
    let dir = with_master();
    let out = fleetctl(dir.path(), &["keys", "derive", "--master", "m.toml", "--process", "planner"]);
    assert_eq!(out.code, EX_USAGE);
    for name in ["planner", "orchestrator", "budget", "dev", "qa", "review", "refactor", "operator"] {
        assert!(out.stderr.contains(name), "{name}: {}", out.stderr);
    }
}

#[test]
fn the_outbox_relay_holds_no_keys() {
    let dir = with_master();
    let out = fleetctl(dir.path(), &["keys", "derive", "--master", "m.toml", "--process", "outbox-relay"]);
    assert_eq!(out.code, EX_USAGE);
    assert!(out.stderr.contains("holds no keys"), "{}", out.stderr);
}

#[test]
fn a_missing_master_file_is_a_usage_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["keys", "derive", "--master", "absent.toml", "--process", "dev"][..],
        &["keys", "stage", "--master", "absent.toml"],
        &["keys", "retire", "--master", "absent.toml", "--through", "1"],
    ] {
        let out = fleetctl(dir.path(), args);
        assert_eq!(out.code, EX_USAGE, "{args:?}");
        assert!(
            out.stderr.contains("cannot read master file 'absent.toml'")
                && out.stderr.contains("fleetctl keys master new"),
            "{}",
            out.stderr
        );
    }
}

#[test]
fn invalid_input_files_are_usage_errors() {
    let dir = with_master();
    fs::write(dir.path().join("bad.toml"), "format = 1\nsecret = \"zz\"\n").unwrap();
    fs::write(dir.path().join("empty-rules.toml"), "rule = 3\n").unwrap();
    let perms = permissions_file();
    let cases: [(&[&str], &str); 5] = [
        (
            &["keys", "derive", "--master", "bad.toml", "--process", "dev", "--permissions", &perms],
            "invalid master file 'bad.toml'",
        ),
        (&["keys", "stage", "--master", "bad.toml"], "invalid master file 'bad.toml'"),
        (&["keys", "list", "--keyset", "m.toml"], "invalid keyset file 'm.toml'"),
        (&["keys", "list", "--keyset", "absent.toml"], "cannot read keyset file 'absent.toml'"),
        (
            &["keys", "derive", "--master", "m.toml", "--process", "dev", "--permissions", "empty-rules.toml"],
            "permission file 'empty-rules.toml'",
        ),
    ];
    for (args, message) in cases {
        let out = fleetctl(dir.path(), args);
        assert_eq!(out.code, EX_USAGE, "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains(message), "{args:?}: {}", out.stderr);
    }
    let out = fleetctl(dir.path(), &["keys", "derive", "--master", "m.toml", "--process", "dev"]);
    assert_eq!(out.code, EX_USAGE, "the default permission file is not here");
    assert!(out.stderr.contains("--permissions"), "{}", out.stderr);
}

#[test]
fn an_existing_keyset_file_needs_force() {
    let dir = with_master();
    let perms = permissions_file();
    let args =
        ["keys", "derive", "--master", "m.toml", "--process", "dev", "--permissions", &perms, "--out", "dev.toml"];
    ok(dir.path(), &args);
    let again = fleetctl(dir.path(), &args);
    assert_eq!(again.code, EX_USAGE);
    assert!(again.stderr.contains("--force"), "{}", again.stderr);
    ok(dir.path(), &[&args[..], &["--force"]].concat());
}

#[test]
fn a_write_failure_exits_1_with_its_cause() {
    let dir = with_master();
    let out = fleetctl(
        dir.path(),
        &[
            "keys",
            "derive",
            "--master",
            "m.toml",
            "--process",
            "dev",
            "--permissions",
            &permissions_file(),
            "--out",
            "no/such/dir/dev.toml",
        ],
    );
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("Failed to create keyset file 'no/such/dir/dev.toml'")
            && out.stderr.contains("No such file or directory"),
        "{}",
        out.stderr
    );
}

#[test]
fn bad_flags_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["keys", "master", "new", "--bogus"][..],
        &["keys", "derive", "--process", "dev"],
        &["keys", "retire", "--master", "m.toml", "--through", "0"],
        &["keys", "frobnicate"],
        &[],
    ] {
        let out = fleetctl(dir.path(), args);
        assert_eq!(out.code, EX_USAGE, "{args:?}");
        assert!(!out.stderr.is_empty(), "{args:?}");
    }
}

#[test]
fn help_and_version_exit_0() {
    let dir = tempfile::tempdir().unwrap();
    let out = ok(dir.path(), &["--help"]);
    assert!(out.contains("keys"), "{out}");
    let out = ok(dir.path(), &["keys", "--help"]);
    assert!(out.contains("master file") && out.contains("keyset file"), "{out}");
    let out = ok(dir.path(), &["keys", "derive", "--help"]);
    assert!(out.contains("outbox-relay holds no keys"), "{out}");
    let out = ok(dir.path(), &["--version"]);
    assert!(out.starts_with("fleetctl "), "{out}");
}

#[test]
fn derived_keys_match_the_published_derivation_vectors() {
    // docs/wire-format.md §4 and envelope/tests/vectors/keys.json: master = bytes 00..1f,
    // current generation 3, generation 1 retired.
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("m.toml"),
        "format = 1\n\
         secret = \"000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\"\n\
         current_generation = 3\n\
         signing_generation = 3\n\
         retired_through = 1\n",
    )
    .unwrap();
    let keyset = derive(dir.path(), "orchestrator");
    let key = |kid: &str| {
        let entry = keyset.entries.iter().find(|e| e.kid.to_string() == kid).unwrap();
        entry.secret.as_ref().map(|s| s.iter().map(|b| format!("{b:02x}")).collect::<String>())
    };
    assert_eq!(key("dev>orchestrator:1"), None);
    assert_eq!(key("dev>orchestrator:2").unwrap(), "0821b9f54a60db0efa19e584ec4ba7ff0dac1e73ff89825fd151ecefbf8efd8b");
    assert_eq!(key("dev>orchestrator:3").unwrap(), "8e4096861f3c1eba1c3ddb81b59c97e35ea4f6ece7749ce7e62c1ccde0b10009");
    assert_eq!(key("orchestrator>dev:3").unwrap(), "60c64c09a8d3894fda0f8d9035986c426a8a7b241f62f62988a6dab9e4ed5a17");
}
