//! [`Passwords`]: the secrets file with one Redis password per [`User`].
//!
//! ```toml
//! [passwords]
//! orchestrator = "…"
//! budget = "…"
//! # … one line for every user
//! ```
//!
//! Nothing here ever prints a password: [`Password`]'s `Debug` is redacted, and parse
//! errors name users, lines and TOML problems, never values.

use std::fmt;

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use envelope::{Instance, Role};

use super::User;

/// Random bytes behind each generated password (64 hex digits).
const GENERATED_BYTES: usize = 32;

/// Shortest accepted password, in bytes. Redis compares SHA-256 hashes, which does nothing
/// to slow down guessing, so a password must be long enough to be unguessable by itself.
pub const MIN_PASSWORD_LEN: usize = 16;

/// One user's Redis password.
pub struct Password(Zeroizing<String>);

impl Password {
    /// The password itself, for building a connection (`AUTH user password`).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Lowercase hex SHA-256 of the password: what the ACL file holds after `#`.
    pub fn redis_hash(&self) -> String {
        hex::encode(Sha256::digest(self.0.as_bytes()))
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(**REDACTED**)")
    }
}

/// A password for every [`User`], no more, no less; and, optionally, one per worker
/// instance that connects as a user of its own (`[instances]`, `"dev/dev-2" = "…"`), so that
/// `fleetctl quarantine dev/dev-2` can cut off that instance and no other.
#[derive(Debug)]
pub struct Passwords {
    /// Indexed like [`User::ALL`]; complete by construction.
    by_user: Vec<Password>,
    /// Worker instances with a user of their own ([`instance_user`]), sorted.
    instances: Vec<(Role, Instance, Password)>,
}

/// The Redis user of a worker instance that has its own: `dev.dev-2`.
pub fn instance_user(role: Role, instance: &Instance) -> String {
    format!("{role}.{instance}")
}

/// Why [`Passwords::generate_with`] failed.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// An instance name that can't be a user of its own.
    #[error(transparent)]
    Instance(PasswordsError),
    /// The operating system's random number generator failed.
    #[error("random bytes: {0}")]
    Random(getrandom::Error),
}

/// A secrets file that can't be used. Messages name users and lines, never passwords.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PasswordsError {
    /// Not TOML at all.
    #[error("not valid TOML (line {line}): {message}")]
    Syntax { line: usize, message: String },
    /// A name under `[instances]` that is not `<worker role>/<instance>`.
    #[error(
        "bad name {name:?} under [instances]: write \"<role>/<instance>\" with a worker role (dev, qa, review, refactor) and an instance name of letters, digits, '.', '_' or '-'"
    )]
    BadInstance { name: String },
    /// An instance's password that is not a string or too short.
    #[error("the password of instance {name} must be a string of at least {MIN_PASSWORD_LEN} bytes")]
    BadInstancePassword { name: String },
    /// A top-level key other than `[passwords]`, or `passwords` that is not a table.
    #[error("{0}")]
    Layout(String),
    /// A name under `[passwords]` that is not a fleet user (a typo hides a missing user).
    #[error("unknown user {name:?} under [passwords]; the users are: {}", User::list())]
    UnknownUser { name: String },
    /// A value that is not a string.
    #[error("the password of user {0} is not a string; quote it")]
    NotAString(User),
    /// A string too short to be a password.
    #[error(
        "the password of user {user} has {len} bytes; use at least {MIN_PASSWORD_LEN} (`fleetctl acl secrets new` makes 64 hex digits)"
    )]
    TooShort { user: User, len: usize },
    /// Users without a password.
    #[error(
        "no password for user {}: add `{} = \"…\"` under [passwords], or write a complete file with `fleetctl acl secrets new`",
        .0.iter().map(|u| u.as_str()).collect::<Vec<_>>().join(", "),
        .0[0]
    )]
    Missing(Vec<User>),
}

impl Passwords {
    /// Parses a secrets file: `[passwords]` with exactly one string per [`User`].
    pub fn parse(text: &str) -> Result<Self, PasswordsError> {
        let mut table: toml::Table = text.parse().map_err(|err: toml::de::Error| PasswordsError::Syntax {
            line: err.span().map_or(1, |span| 1 + text[..span.start].matches('\n').count()),
            message: err.message().to_owned(),
        })?;
        if let Some(other) = table.keys().find(|key| *key != "passwords" && *key != "instances") {
            return Err(PasswordsError::Layout(format!(
                "unexpected key {other:?}: the file holds a [passwords] table and, optionally, [instances]"
            )));
        }
        let instances = match table.remove("instances") {
            None => Vec::new(),
            Some(toml::Value::Table(entries)) => parse_instances(entries)?,
            Some(_) => return Err(PasswordsError::Layout("`instances` must be a table".to_owned())),
        };
        let Some(toml::Value::Table(entries)) = table.remove("passwords") else {
            return Err(PasswordsError::Layout(
                "there is no [passwords] table; write one with `fleetctl acl secrets new`".to_owned(),
            ));
        };

        let mut found: Vec<Option<Password>> = User::ALL.iter().map(|_| None).collect();
        for (name, value) in entries {
            let user = User::parse(&name).ok_or(PasswordsError::UnknownUser { name })?;
            let toml::Value::String(password) = value else {
                return Err(PasswordsError::NotAString(user));
            };
            let password = Zeroizing::new(password);
            if password.len() < MIN_PASSWORD_LEN {
                return Err(PasswordsError::TooShort { user, len: password.len() });
            }
            found[index(user)] = Some(Password(password));
        }
        let missing: Vec<User> = User::ALL.into_iter().filter(|user| found[index(*user)].is_none()).collect();
        if !missing.is_empty() {
            return Err(PasswordsError::Missing(missing));
        }
        Ok(Self { by_user: found.into_iter().flatten().collect(), instances })
    }

    /// The worker instances with a user of their own, with their passwords.
    pub fn instances(&self) -> &[(Role, Instance, Password)] {
        &self.instances
    }

    /// Fresh passwords from the operating system's random number generator: 32 bytes each,
    /// as 64 hex digits (safe in a `redis://user:password@host` URL as they are).
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut by_user = Vec::with_capacity(User::ALL.len());
        for _ in User::ALL {
            let mut bytes = Zeroizing::new([0u8; GENERATED_BYTES]);
            getrandom::fill(bytes.as_mut())?;
            by_user.push(Password(Zeroizing::new(hex::encode(bytes.as_ref()))));
        }
        Ok(Self { by_user, instances: Vec::new() })
    }

    /// Like [`Passwords::generate`], plus a user of its own for each `role/instance` in
    /// `instances`.
    pub fn generate_with(instances: &[String]) -> Result<Self, GenerateError> {
        let mut out = Self::generate().map_err(GenerateError::Random)?;
        let mut table = toml::Table::new();
        for name in instances {
            let mut bytes = Zeroizing::new([0u8; GENERATED_BYTES]);
            getrandom::fill(bytes.as_mut()).map_err(GenerateError::Random)?;
            table.insert(name.clone(), toml::Value::String(hex::encode(bytes.as_ref())));
        }
        out.instances = parse_instances(table).map_err(GenerateError::Instance)?;
        Ok(out)
    }

    /// The password of `user`.
    pub fn get(&self, user: User) -> &Password {
        &self.by_user[index(user)]
    }

    /// The secrets file text, which [`Passwords::parse`] reads back.
    pub fn to_toml(&self) -> Zeroizing<String> {
        let mut text = Zeroizing::new(String::from(
            "# agentfleet Redis passwords, one per ACL user (`fleetctl acl secrets new`).\n\
             # Secret: keep it mode 0600 with the operators. Each process gets only its own\n\
             # user's password; `monitor` goes to monitoring, `admin` stays with the operators.\n\
             # `fleetctl acl generate --secrets FILE` hashes them into the ACL file.\n\
             [passwords]\n",
        ));
        for user in User::ALL {
            // Generated passwords are hex; a hand-written one goes through TOML's escaping.
            let value = toml::Value::String(self.get(user).expose().to_owned());
            text.push_str(&format!("{user} = {value}\n"));
        }
        if !self.instances.is_empty() {
            text.push_str("\n# Worker instances with a Redis user of their own (`<role>.<instance>`).\n[instances]\n");
            for (role, instance, password) in &self.instances {
                let value = toml::Value::String(password.expose().to_owned());
                text.push_str(&format!("\"{role}/{instance}\" = {value}\n"));
            }
        }
        text
    }
}

fn parse_instances(entries: toml::Table) -> Result<Vec<(Role, Instance, Password)>, PasswordsError> {
    let mut out = Vec::with_capacity(entries.len());
    for (name, value) in entries {
        let bad = || PasswordsError::BadInstance { name: name.chars().take(80).collect() };
        let (role, instance) = name.split_once('/').ok_or_else(bad)?;
        let role: Role = role.parse().map_err(|_| bad())?;
        if !role.is_worker() {
            return Err(bad());
        }
        let instance = Instance::parse(instance).map_err(|_| bad())?;
        let toml::Value::String(password) = value else {
            return Err(PasswordsError::BadInstancePassword { name: name.clone() });
        };
        if password.len() < MIN_PASSWORD_LEN {
            return Err(PasswordsError::BadInstancePassword { name: name.clone() });
        }
        out.push((role, instance, Password(Zeroizing::new(password))));
    }
    out.sort_by(|a, b| (a.0.as_str(), a.1.as_str()).cmp(&(b.0.as_str(), b.1.as_str())));
    Ok(out)
}

fn index(user: User) -> usize {
    User::ALL.iter().position(|u| *u == user).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn generated_passwords_round_trip_and_differ() {
        let generated = Passwords::generate().unwrap();
        let parsed = Passwords::parse(&generated.to_toml()).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for user in User::ALL {
            let password = generated.get(user).expose();
            assert_eq!(password.len(), 64);
            assert!(password.bytes().all(|b| b.is_ascii_hexdigit()));
            assert_eq!(parsed.get(user).expose(), password);
            assert!(seen.insert(password.to_owned()), "two users share a password");
        }
    }

    #[test]
    fn the_hash_is_the_sha256_redis_expects() {
        // sha256("0123456789abcdef") = 9f9f5111f7b27a781f1f1ddde5ebc2dd2b796bfc7365c9c28b548e564176929f
        let password = Password(Zeroizing::new("0123456789abcdef".to_owned()));
        assert_eq!(password.redis_hash(), "9f9f5111f7b27a781f1f1ddde5ebc2dd2b796bfc7365c9c28b548e564176929f");
    }

    fn file_without(user: &str) -> String {
        let full = Passwords::generate().unwrap().to_toml();
        full.lines().filter(|l| !l.starts_with(&format!("{user} = "))).collect::<Vec<_>>().join("\n")
    }

    #[test]
    fn a_missing_user_is_named_with_the_fix() {
        let err = Passwords::parse(&file_without("qa")).unwrap_err();
        assert_eq!(err, PasswordsError::Missing(vec![User::Qa]));
        let text = err.to_string();
        assert!(text.contains("no password for user qa") && text.contains("qa = \""), "{text}");

        let err = Passwords::parse("[passwords]\n").unwrap_err();
        assert_eq!(err, PasswordsError::Missing(User::ALL.to_vec()));
    }

    #[test]
    fn bad_files_are_refused_without_echoing_passwords() {
        let secret = "s3cret-s3cret-s3cret";
        for (text, expected) in [
            (format!("[passwords]\nqa = \"{secret}"), "not valid TOML (line 2)"),
            (format!("[passwords]\nqa = {secret}"), "not valid TOML (line 2)"),
            (format!("[passwords]\nqa = [\"{secret}\"]"), "the password of user qa is not a string"),
            (format!("[passwords]\nqaa = \"{secret}\""), "unknown user \"qaa\""),
            (format!("qa = \"{secret}\""), "unexpected key \"qa\""),
            ("passwords = 1".to_owned(), "there is no [passwords] table"),
            ("[passwords]\nqa = \"short\"".to_owned(), "has 5 bytes; use at least 16"),
        ] {
            let err = Passwords::parse(&text).unwrap_err().to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
            assert!(!err.contains("s3cret"), "{text:?}: the message echoes the password: {err}");
        }
    }

    #[test]
    fn instances_with_users_of_their_own_round_trip_and_bad_ones_are_named() {
        let mut text = Passwords::generate().unwrap().to_toml().to_string();
        text.push_str(
            "[instances]\n\"qa/qa-2\" = \"0123456789abcdef0123\"\n\"dev/dev-1\" = \"fedcba9876543210fedc\"\n",
        );
        let parsed = Passwords::parse(&text).unwrap();
        let names: Vec<String> = parsed.instances().iter().map(|(r, i, _)| instance_user(*r, i)).collect();
        assert_eq!(names, ["dev.dev-1", "qa.qa-2"]);
        let again = Passwords::parse(&parsed.to_toml()).unwrap();
        assert_eq!(again.instances()[1].2.expose(), "0123456789abcdef0123");
        let base = Passwords::generate().unwrap().to_toml().to_string();
        for (extra, expected) in [
            ("\"budget/budget-0\" = \"0123456789abcdef0123\"", "bad name \"budget/budget-0\""),
            ("\"dev\" = \"0123456789abcdef0123\"", "bad name \"dev\""),
            ("\"dev/a b\" = \"0123456789abcdef0123\"", "bad name \"dev/a b\""),
            ("\"dev/dev-1\" = \"s3cret\"", "the password of instance dev/dev-1 must be"),
        ] {
            let err = Passwords::parse(&format!("{base}[instances]\n{extra}\n")).unwrap_err().to_string();
            assert!(err.contains(expected), "{extra}: {err}");
            assert!(!err.contains("s3cret") && !err.contains("0123456789abcdef"), "{err}");
        }
    }

    #[test]
    fn debug_is_redacted() {
        let generated = Passwords::generate().unwrap();
        let debug = format!("{generated:?}");
        assert!(debug.contains("REDACTED"));
        assert!(!debug.contains(generated.get(User::Dev).expose()));
    }

    #[test]
    fn hand_written_passwords_with_quotes_survive_the_file() {
        let mut text = String::from("[passwords]\n");
        for user in User::ALL {
            text.push_str(&format!("\"{user}\" = 'pa\"ss\\word-{user}-long enough'\n"));
        }
        let parsed = Passwords::parse(&text).unwrap();
        let again = Passwords::parse(&parsed.to_toml()).unwrap();
        assert_eq!(again.get(User::OutboxRelay).expose(), "pa\"ss\\word-outbox-relay-long enough");
    }
}
