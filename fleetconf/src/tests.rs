use std::collections::BTreeMap;
use std::path::PathBuf;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::*;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    instance: String,
    redis_url: Option<SecretString>,
    keyset: PathBuf,
    #[serde(default)]
    heartbeat_secs: u64,
    #[serde(default)]
    flag: bool,
    #[serde(default)]
    sandbox: Sandbox,
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    caps: BTreeMap<String, u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Sandbox {
    image: String,
    memory_bytes: u64,
    token: Option<SecretString>,
}

const SECRETS: &[&str] = &["redis_url", "sandbox.token"];

fn file(text: &str) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(f.path(), text).expect("write");
    f
}

fn extract(text: Option<&str>, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    let f = text.map(file);
    let env = Env::from_pairs(env.iter().copied());
    Layers::new(f.as_ref().map(|f| f.path()), &env, SECRETS).extract()
}

#[test]
fn the_environment_overrides_the_file_at_every_depth() {
    let s = extract(
        Some("instance = \"a\"\nkeyset = \"k\"\nheartbeat_secs = 5\n[sandbox]\nimage = \"img\"\nmemory_bytes = 1\n"),
        &[
            ("FLEET_INSTANCE", "b"),
            ("FLEET_HEARTBEAT_SECS", "7"),
            ("FLEET_SANDBOX__MEMORY_BYTES", "2048"),
            ("FLEET_FLAG", "true"),
        ],
    )
    .expect("valid");
    assert_eq!(s.instance, "b");
    assert_eq!(s.keyset, PathBuf::from("k"));
    assert_eq!(s.heartbeat_secs, 7);
    assert_eq!(s.sandbox.image, "img", "a sibling key from the file stays");
    assert_eq!(s.sandbox.memory_bytes, 2048);
    assert!(s.flag);
}

#[test]
fn the_environment_alone_is_enough() {
    let s = extract(None, &[("FLEET_INSTANCE", "dev-1"), ("FLEET_KEYSET", "/run/secrets/keyset")]).expect("valid");
    assert_eq!(s.instance, "dev-1");
    assert!(s.redis_url.is_none());
}

#[test]
fn arrays_and_tables_come_as_toml() {
    let s = extract(
        None,
        &[
            ("FLEET_INSTANCE", "a"),
            ("FLEET_KEYSET", "k"),
            ("FLEET_HOSTS", "[\"github.com\", \"gitlab.com\"]"),
            ("FLEET_CAPS", "{ \"fleet:results\" = 1000 }"),
        ],
    )
    .expect("valid");
    assert_eq!(s.hosts, ["github.com", "gitlab.com"]);
    assert_eq!(s.caps.get("fleet:results"), Some(&1000));
    let e = extract(None, &[("FLEET_INSTANCE", "a"), ("FLEET_KEYSET", "k"), ("FLEET_HOSTS", "[oops")]).unwrap_err();
    assert!(e.0.starts_with("environment variable FLEET_HOSTS: a value starting with `[`"), "{e}");
}

#[test]
fn a_secret_comes_from_its_file_without_the_trailing_newline() {
    let secret = file("rediss://dev:pw@redis:6379\n");
    let token = file("t0ken");
    let path = secret.path().to_str().expect("utf-8");
    let s = extract(
        None,
        &[
            ("FLEET_INSTANCE", "a"),
            ("FLEET_KEYSET", "k"),
            ("FLEET_REDIS_URL_FILE", path),
            ("FLEET_SANDBOX__TOKEN_FILE", token.path().to_str().expect("utf-8")),
        ],
    )
    .expect("valid");
    assert_eq!(s.redis_url.expect("set").expose_secret(), "rediss://dev:pw@redis:6379");
    assert_eq!(s.sandbox.token.expect("set").expose_secret(), "t0ken");
}

#[test]
fn a_secret_that_looks_like_a_number_stays_a_string() {
    let s =
        extract(None, &[("FLEET_INSTANCE", "a"), ("FLEET_KEYSET", "k"), ("FLEET_REDIS_URL", "[1]")]).expect("valid");
    assert_eq!(s.redis_url.expect("set").expose_secret(), "[1]");
}

#[test]
fn a_secret_file_problem_names_the_variable_and_path_never_the_contents() {
    let e =
        extract(None, &[("FLEET_INSTANCE", "a"), ("FLEET_KEYSET", "k"), ("FLEET_REDIS_URL_FILE", "/nonexistent/x")])
            .unwrap_err();
    assert!(
        e.0.starts_with("environment variable FLEET_REDIS_URL_FILE: cannot read the secret file '/nonexistent/x'"),
        "{e}"
    );
    let empty = file("\n");
    let e = extract(
        None,
        &[
            ("FLEET_INSTANCE", "a"),
            ("FLEET_KEYSET", "k"),
            ("FLEET_REDIS_URL_FILE", empty.path().to_str().expect("utf-8")),
        ],
    )
    .unwrap_err();
    assert!(e.0.ends_with("is empty"), "{e}");
    let secret = file("redis://u:hunter2@h");
    let e = extract(
        None,
        &[
            ("FLEET_INSTANCE", "a"),
            ("FLEET_KEYSET", "k"),
            ("FLEET_REDIS_URL", "redis://u:hunter2@h"),
            ("FLEET_REDIS_URL_FILE", secret.path().to_str().expect("utf-8")),
        ],
    )
    .unwrap_err();
    assert_eq!(e.0, "both FLEET_REDIS_URL and FLEET_REDIS_URL_FILE are set: set only one of them");
}

#[test]
fn file_suffix_on_a_setting_that_is_not_a_secret_is_an_unknown_setting() {
    let e =
        extract(None, &[("FLEET_INSTANCE", "a"), ("FLEET_KEYSET", "k"), ("FLEET_INSTANCE_FILE", "/x")]).unwrap_err();
    assert!(e.0.starts_with("unknown setting `instance_file` (from FLEET_INSTANCE_FILE)"), "{e}");
}

#[test]
fn unknown_settings_are_refused_from_either_layer() {
    let e = extract(Some("instance = \"a\"\nkeyset = \"k\"\nheartbeat = 3\n"), &[]).unwrap_err();
    assert!(e.0.starts_with("unknown setting `heartbeat` (from "), "{e}");
    assert!(e.0.contains("known: instance, redis_url, keyset"), "{e}");
    let e = extract(None, &[("FLEET_INSTANCE", "a"), ("FLEET_KEYSET", "k"), ("FLEET_SANDBOX__MEMROY_BYTES", "1")])
        .unwrap_err();
    assert!(
        e.0.starts_with("unknown setting `sandbox.memroy_bytes` (from FLEET_SANDBOX__MEMROY_BYTES): remove it or fix its name (known in `sandbox`: image, memory_bytes, token)"),
        "{e}"
    );
}

#[test]
fn other_tools_variables_are_not_settings() {
    let s = extract(
        None,
        &[
            ("FLEET_INSTANCE", "a"),
            ("FLEET_KEYSET", "k"),
            ("FLEET_TOKEN", "jwt"),
            ("FLEET_API_URL", "http://x"),
            ("PATH", "/bin"),
        ],
    )
    .expect("valid");
    assert_eq!(s.instance, "a");
}

#[test]
fn a_missing_setting_says_how_to_set_it() {
    let e = extract(None, &[("FLEET_INSTANCE", "a")]).unwrap_err();
    assert_eq!(e.0, "setting `keyset` is missing: set it in the configuration file or with FLEET_KEYSET");
}

#[test]
fn a_wrong_type_names_the_setting_and_source_but_not_the_value() {
    let e = extract(None, &[("FLEET_INSTANCE", "a"), ("FLEET_KEYSET", "k"), ("FLEET_HEARTBEAT_SECS", "s3cr3t")])
        .unwrap_err();
    assert_eq!(e.0, "setting `heartbeat_secs` (from FLEET_HEARTBEAT_SECS): expected u64, found a string");
    assert!(!e.0.contains("s3cr3t"));
    let f = file("instance = \"a\"\nkeyset = \"k\"\nheartbeat_secs = \"s3cr3t\"\n");
    let env = Env::default();
    let e = Layers::new(Some(f.path()), &env, SECRETS).extract::<Settings>().unwrap_err();
    assert!(e.0.starts_with("setting `heartbeat_secs` (from "), "{e}");
    assert!(e.0.contains(&f.path().display().to_string()), "names the file: {e}");
    assert!(!e.0.contains("s3cr3t"));
}

#[test]
fn a_named_file_that_does_not_exist_is_an_error() {
    let env = Env::default();
    let e = Layers::new(Some(Path::new("/nonexistent/fleet.toml")), &env, SECRETS).extract::<Settings>().unwrap_err();
    assert!(e.0.starts_with("cannot read the configuration file '/nonexistent/fleet.toml'"), "{e}");
}

#[test]
fn a_malformed_variable_name_is_refused() {
    let e =
        extract(None, &[("FLEET_INSTANCE", "a"), ("FLEET_KEYSET", "k"), ("FLEET_SANDBOX____IMAGE", "x")]).unwrap_err();
    assert!(e.0.starts_with("environment variable FLEET_SANDBOX____IMAGE: not a setting's name"), "{e}");
}

#[test]
fn variable_names_follow_the_keys() {
    assert_eq!(Env::variable_of("sandbox.memory_bytes"), "FLEET_SANDBOX__MEMORY_BYTES");
    assert_eq!(Env::variable_of("redis_url"), "FLEET_REDIS_URL");
}
