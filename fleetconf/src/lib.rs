//! The one configuration mechanism of every agentfleet binary.
//!
//! A binary's settings are one typed struct (`serde`, `deny_unknown_fields`), filled from
//! three layers, each overriding the one before:
//!
//! 1. the TOML file given with `--config` (optional: a container can be configured by its
//!    environment alone);
//! 2. `FLEET_<KEY>` environment variables, one for every setting; nested keys are joined
//!    with `__` (`FLEET_SANDBOX__MEMORY_BYTES` is `memory_bytes` in `[sandbox]`). Values
//!    are strings, read as numbers or booleans where the setting is one; a value starting
//!    with `[` or `{` is a TOML array or inline table (`FLEET_REPOSITORIES__ALLOWED_HOSTS=["github.com"]`);
//! 3. `FLEET_<KEY>_FILE` for every secret the binary declares: the file's contents (one
//!    trailing newline dropped) are the value, the Docker and Kubernetes secrets
//!    convention (`FLEET_REDIS_URL_FILE=/run/secrets/redis-url`).
//!
//! Unknown keys are refused in the file and in the environment alike (a misspelt
//! `FLEET_SANDBOX__MEMROY_BYTES` would otherwise be silently ignored). A few `FLEET_`
//! variables belong to other tools and are skipped ([`NOT_SETTINGS`]).
//!
//! Every error names the setting and where it came from, never a value: the message of a
//! wrong type says what was expected and what kind of value was found.
//!
//! The environment is passed in as an [`Env`] (taken once from the process in `main`), so
//! tests never touch the process environment.
//!
//! # Layout
//! - [`Env`]: a snapshot of environment variables.
//! - [`Layers`]: the file, the environment and the secrets list; [`Layers::extract`].
//! - [`ConfigError`]: what is wrong, and with which setting.
//! - [`settings`]: the settings a binary's loader accepts, and the check that
//!   `docs/deployment.md` lists each of them (for the binaries' tests).
#![forbid(unsafe_code)]

pub mod settings;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::de::DeserializeOwned;

/// Prefix of every setting's environment variable.
pub const PREFIX: &str = "FLEET_";

/// `FLEET_` variables that are not settings of a service binary: `fleetctl`'s own and the
/// path of the configuration file itself.
pub const NOT_SETTINGS: &[&str] = &["FLEET_CONFIG", "FLEET_TOKEN", "FLEET_API_URL", "FLEET_MASTER_SECRET_FILE"];

/// A snapshot of environment variables.
#[derive(Debug, Clone, Default)]
pub struct Env(BTreeMap<String, String>);

impl Env {
    /// The process's environment (variables that are not valid UTF-8 are skipped: no
    /// setting has such a name).
    pub fn process() -> Self {
        Self(std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))).collect())
    }

    /// An environment made of `pairs` (for tests).
    pub fn from_pairs<K: Into<String>, V: Into<String>>(pairs: impl IntoIterator<Item = (K, V)>) -> Self {
        Self(pairs.into_iter().map(|(k, v)| (k.into(), v.into())).collect())
    }

    /// The variable `name`, if set and not empty.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str).filter(|v| !v.is_empty())
    }

    /// The environment variable of the setting at dotted `key` (`sandbox.image` →
    /// `FLEET_SANDBOX__IMAGE`).
    pub fn variable_of(key: &str) -> String {
        format!("{PREFIX}{}", key.replace('.', "__").to_uppercase())
    }
}

/// A configuration problem. The message names the setting and what to do; it never holds
/// a setting's value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String, Option<String>);

impl ConfigError {
    fn new(message: String) -> Self {
        Self(message, None)
    }

    /// The dotted key of the (first) setting that is wrong, when one is.
    pub fn setting(&self) -> Option<&str> {
        self.1.as_deref()
    }
}

/// Where one binary's settings come from.
#[derive(Debug, Clone)]
pub struct Layers<'a> {
    file: Option<PathBuf>,
    env: &'a Env,
    secrets: &'a [&'a str],
}

impl<'a> Layers<'a> {
    /// The file (if any), then `env`; `secrets` are the dotted keys that may also come from
    /// `FLEET_<KEY>_FILE` (and that are never parsed as anything but a string).
    pub fn new(file: Option<&Path>, env: &'a Env, secrets: &'a [&'a str]) -> Self {
        Self { file: file.map(Path::to_path_buf), env, secrets }
    }

    /// The merged settings as `T`.
    pub fn extract<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        let mut figment = Figment::new();
        if let Some(path) = &self.file {
            // figment reads a missing file as an empty one; an operator who named a file
            // meant it to exist.
            std::fs::File::open(path).map_err(|e| {
                ConfigError::new(format!(
                    "cannot read the configuration file '{}': {e}; pass --config with an existing TOML file, or leave it out and configure with FLEET_… variables",
                    path.display()
                ))
            })?;
            figment = figment.merge(Toml::file_exact(path));
        }
        let env = EnvLayer::new(self.env, self.secrets)?;
        figment.merge(env).extract_lossy().map_err(|e| describe(e, self.secrets))
    }
}

/// The `FLEET_…` variables as one figment provider.
struct EnvLayer {
    /// Dotted key → value, already read (secret files included).
    values: Vec<(String, Value)>,
}

impl EnvLayer {
    fn new(env: &Env, secrets: &[&str]) -> Result<Self, ConfigError> {
        let mut values = Vec::new();
        for (name, raw) in &env.0 {
            let Some(rest) = name.strip_prefix(PREFIX) else { continue };
            if rest.is_empty() || NOT_SETTINGS.contains(&name.as_str()) || raw.is_empty() {
                continue;
            }
            let key = rest.to_lowercase().replace("__", ".");
            if key.split('.').any(str::is_empty) {
                return Err(ConfigError::new(format!(
                    "environment variable {name}: not a setting's name (nested keys are joined with one `__`)"
                )));
            }
            if let Some(secret) = key.strip_suffix("_file").filter(|k| secrets.contains(k)) {
                let plain = Env::variable_of(secret);
                if env.get(&plain).is_some() {
                    return Err(ConfigError::new(format!("both {plain} and {name} are set: set only one of them")));
                }
                values.push((secret.to_owned(), Value::from(read_secret(name, Path::new(raw))?)));
            } else if secrets.contains(&key.as_str()) {
                values.push((key, Value::from(raw.clone())));
            } else {
                values.push((key, parse_value(name, raw)?));
            }
        }
        Ok(Self { values })
    }
}

/// A `…_FILE` secret: the file's text without one trailing newline (what `echo` and
/// editors add). The error names the variable and the path, never the contents.
fn read_secret(variable: &str, path: &Path) -> Result<String, ConfigError> {
    let mut text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new(format!(
            "environment variable {variable}: cannot read the secret file '{}': {e}; mount the secret there or unset the variable",
            path.display()
        ))
    })?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    if text.is_empty() {
        return Err(ConfigError::new(format!(
            "environment variable {variable}: the secret file '{}' is empty",
            path.display()
        )));
    }
    Ok(text)
}

/// A plain value: a string (read as a number or boolean where the setting is one), or a
/// TOML array or inline table when it looks like one.
fn parse_value(variable: &str, raw: &str) -> Result<Value, ConfigError> {
    let trimmed = raw.trim_start();
    if !(trimmed.starts_with('[') || trimmed.starts_with('{')) {
        return Ok(Value::from(raw.to_owned()));
    }
    let table: toml::Table = toml::from_str(&format!("v = {raw}")).map_err(|_| {
        ConfigError::new(format!(
            "environment variable {variable}: a value starting with `[` or `{{` must be a TOML array or inline table, e.g. [\"a\", \"b\"] or {{ key = 1 }}"
        ))
    })?;
    let inner = table.get("v").cloned().unwrap_or(toml::Value::Boolean(false));
    Value::serialize(inner).map_err(|e| ConfigError::new(format!("environment variable {variable}: {}", e.kind)))
}

impl Provider for EnvLayer {
    fn metadata(&self) -> Metadata {
        Metadata::named("the environment")
            .interpolater(|_: &Profile, keys: &[&str]| format!("{PREFIX}{}", keys.join("__").to_uppercase()))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut root = Dict::new();
        for (key, value) in &self.values {
            insert(&mut root, key, value.clone());
        }
        Ok(Profile::Default.collect(root))
    }
}

/// Puts `value` at dotted `key` in `dict`, creating the tables on the way (a later scalar
/// replaces an earlier table of the same name, as a later layer would).
fn insert(dict: &mut Dict, key: &str, value: Value) {
    match key.split_once('.') {
        None => {
            dict.insert(key.to_owned(), value);
        }
        Some((head, tail)) => {
            let entry = dict.entry(head.to_owned()).or_insert_with(|| Value::from(Dict::new()));
            if entry.as_dict().is_none() {
                *entry = Value::from(Dict::new());
            }
            if let Value::Dict(_, inner) = entry {
                insert(inner, tail, value);
            }
        }
    }
}

/// One message for all of figment's errors: each names its setting and source.
fn describe(error: figment::Error, secrets: &[&str]) -> ConfigError {
    let all: Vec<(String, String)> = error.into_iter().map(|e| describe_one(&e, secrets)).collect();
    let setting = all.first().map(|(k, _)| k.clone());
    ConfigError(all.into_iter().map(|(_, m)| m).collect::<Vec<_>>().join("; "), setting)
}

/// The setting's dotted key and the message.
fn describe_one(e: &figment::Error, secrets: &[&str]) -> (String, String) {
    use figment::error::Kind;
    let parent = e.path.join(".");
    let key = |field: &str| if parent.is_empty() { field.to_owned() } else { format!("{parent}.{field}") };
    let source = e.metadata.as_ref().map(|m| match &m.source {
        Some(s) => format!("{s}"),
        None => {
            let var = m.interpolate(&Profile::Default, &e.path);
            if secrets.contains(&parent.as_str()) { format!("{var} (or {var}_FILE)") } else { var }
        }
    });
    let from = source.map(|s| format!(" (from {s})")).unwrap_or_default();
    match &e.kind {
        Kind::MissingField(field) => {
            let k = key(field);
            let hint = if secrets.contains(&k.as_str()) {
                format!("{} or {}_FILE", Env::variable_of(&k), Env::variable_of(&k))
            } else {
                Env::variable_of(&k)
            };
            let message = format!("setting `{k}` is missing: set it in the configuration file or with {hint}");
            (k, message)
        }
        Kind::UnknownField(_, expected) => {
            // figment's path of an unknown field already ends with the field.
            let table = e.path[..e.path.len().saturating_sub(1)].join(".");
            let place = if table.is_empty() { String::new() } else { format!(" in `{table}`") };
            let known = if expected.is_empty() { "none".to_owned() } else { expected.join(", ") };
            let message =
                format!("unknown setting `{parent}`{from}: remove it or fix its name (known{place}: {known})");
            (parent, message)
        }
        Kind::InvalidType(actual, expected) | Kind::InvalidValue(actual, expected) => {
            let message = format!("setting `{parent}`{from}: expected {expected}, found {}", kind_of(actual));
            (parent, message)
        }
        Kind::UnknownVariant(variant, expected) => {
            let shown: String = variant.chars().take(40).collect();
            let message =
                format!("setting `{parent}`{from}: unknown variant {shown:?}, expected one of {}", expected.join(", "));
            (parent, message)
        }
        other => {
            let message = format!("setting `{parent}`{from}: {}", message_of(other));
            (parent, message)
        }
    }
}

/// The kind of a value, never the value (it may be a secret put in the wrong place).
fn kind_of(actual: &figment::error::Actual) -> &'static str {
    use figment::error::Actual;
    match actual {
        Actual::Bool(_) => "a boolean",
        Actual::Unsigned(_) | Actual::Signed(_) => "an integer",
        Actual::Float(_) => "a number",
        Actual::Char(_) | Actual::Str(_) => "a string",
        Actual::Bytes(_) => "bytes",
        Actual::Seq => "an array",
        Actual::Map => "a table",
        _ => "another kind of value",
    }
}

/// A custom message (from a field's own `Deserialize`) cut short: such messages may quote
/// the value.
fn message_of(kind: &figment::error::Kind) -> String {
    let text = kind.to_string();
    let first = text.split(':').next().unwrap_or_default();
    first.chars().take(120).collect()
}

#[cfg(test)]
mod tests;
