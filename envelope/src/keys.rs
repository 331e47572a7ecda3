//! Edge keys: key ids, the master secret, HKDF derivation, keysets and the [`Keyring`].
//!
//! There is one key per directed edge (`orchestrator>dev` differs from `dev>orchestrator`),
//! so a process holds only the keys of the edges it is on and can forge nothing on any
//! other edge. Keys are derived from one master secret that only operators hold.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use hkdf::Hkdf;
use hmac::{Hmac, KeyInit};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

use crate::names::Role;
use crate::permissions::PermissionTable;

/// HKDF salt for edge keys; changing it changes every key of the fleet.
pub const EDGE_KEY_SALT: &[u8] = b"agentfleet/edge-key/v1";
/// Length of the master secret and of each edge key.
pub const KEY_LEN: usize = 32;

/// A directed edge: `from` signs, `to` verifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Edge {
    /// The signing role.
    pub from: Role,
    /// The verifying role.
    pub to: Role,
}

impl fmt::Display for Edge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}>{}", self.from, self.to)
    }
}

/// A key id: an edge and a generation, written `<from>><to>:<generation>` (`dev>orchestrator:2`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Kid {
    /// The edge the key signs for.
    pub edge: Edge,
    /// Starts at 1; a rotation adds the next one.
    pub generation: u32,
}

/// A key id that is not `<role>><role>:<generation ≥ 1>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid key id {0:?}: expected <from-role>><to-role>:<generation>, e.g. \"dev>orchestrator:1\"")]
pub struct InvalidKid(String);

impl FromStr for Kid {
    type Err = InvalidKid;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidKid(s.to_owned());
        let (edge, generation) = s.rsplit_once(':').ok_or_else(bad)?;
        let (from, to) = edge.split_once('>').ok_or_else(bad)?;
        // Only canonical decimal: "01" or "+1" would give one key two names.
        if generation.is_empty() || generation.starts_with('0') || !generation.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        Ok(Kid {
            edge: Edge { from: from.parse().map_err(|_| bad())?, to: to.parse().map_err(|_| bad())? },
            generation: generation.parse().map_err(|_| bad())?,
        })
    }
}

impl fmt::Display for Kid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.edge, self.generation)
    }
}

/// Errors loading or deriving keys. None of them ever contains key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The master or keyset file is not valid TOML of the expected shape.
    #[error("invalid {what} file: {reason}")]
    Format {
        /// "master" or "keyset".
        what: &'static str,
        /// What is wrong (never the secret itself).
        reason: String,
    },
    /// A process name that has no keyset.
    #[error("unknown process {0:?}: expected one of orchestrator, budget, dev, qa, review, refactor, operator")]
    UnknownProcess(String),
    /// The relay forwards bytes signed by the orchestrator and must not hold keys.
    #[error("process \"outbox-relay\" holds no keys: it forwards bytes the orchestrator already signed")]
    RelayHoldsNoKeys,
    /// Retiring the generation senders sign with would leave the fleet unable to talk.
    #[error(
        "cannot retire through generation {through}: senders sign with generation {signing}; rotate and promote first"
    )]
    RetireCurrent {
        /// Requested.
        through: u32,
        /// The signing generation.
        signing: u32,
    },
    /// Generation numbers are exhausted (after 4 billion rotations).
    #[error("no generation after {0}: create a new master")]
    GenerationOverflow(u32),
    /// No active key on the edge a message must be signed for.
    #[error("no active key for edge {0}: this process's keyset does not cover it")]
    NoKeyForEdge(Edge),
}

fn format_err(what: &'static str, reason: impl fmt::Display) -> KeyError {
    KeyError::Format { what, reason: reason.to_string() }
}

/// 32 random bytes, the root of every edge key. Zeroized on drop, never printed.
#[derive(Clone, Zeroize)]
#[zeroize(drop)]
pub struct MasterSecret([u8; KEY_LEN]);

impl fmt::Debug for MasterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterSecret(**REDACTED**)")
    }
}

impl MasterSecret {
    /// Wraps raw bytes (from a CSPRNG, or a test vector).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// HKDF-SHA256(salt = [`EDGE_KEY_SALT`], ikm = master, info = kid text), 32 bytes.
    pub fn derive(&self, kid: &Kid) -> Zeroizing<[u8; KEY_LEN]> {
        let hk = Hkdf::<Sha256>::new(Some(EDGE_KEY_SALT), &self.0);
        let mut okm = Zeroizing::new([0u8; KEY_LEN]);
        hk.expand(kid.to_string().as_bytes(), okm.as_mut()).expect("32 bytes is a valid HKDF-SHA256 output length");
        okm
    }
}

/// The operator's master file: the secret plus the generation bookkeeping that rotation,
/// promotion and retirement change.
///
/// Generations move through three states so a rotation never drops a message:
/// *staged* (`signing_generation < g ≤ current_generation`: verifiers accept it, nobody signs
/// with it yet), *signing* (`g = signing_generation`), and *retired* (`g ≤ retired_through`:
/// refused). Between retired and signing, older generations are still accepted.
#[derive(Debug, Clone)]
pub struct MasterFile {
    /// The secret.
    pub secret: MasterSecret,
    /// Newest generation that exists. Starts at 1.
    pub current_generation: u32,
    /// Generation senders sign with; ≤ `current_generation`.
    pub signing_generation: u32,
    /// Generations `1..=retired_through` are refused by verifiers; 0 means none retired.
    pub retired_through: u32,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MasterToml {
    format: u32,
    secret: Zeroizing<String>,
    current_generation: u32,
    signing_generation: u32,
    retired_through: u32,
}

impl MasterFile {
    /// A new master with generation 1 and nothing retired.
    pub fn new(secret: MasterSecret) -> Self {
        Self { secret, current_generation: 1, signing_generation: 1, retired_through: 0 }
    }

    /// Parses the TOML master file.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let t: MasterToml = toml::from_str(text).map_err(|e| format_err("master", e.message()))?;
        if t.format != 1 {
            return Err(format_err("master", format_args!("format {} is not supported (expected 1)", t.format)));
        }
        let bytes =
            Zeroizing::new(hex::decode(t.secret.as_str()).map_err(|_| format_err("master", "`secret` is not hex"))?);
        let secret: [u8; KEY_LEN] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| format_err("master", "`secret` must be 32 bytes (64 hex digits)"))?;
        if !(t.retired_through < t.signing_generation && t.signing_generation <= t.current_generation) {
            return Err(format_err(
                "master",
                "need retired_through < signing_generation <= current_generation (signing_generation >= 1)",
            ));
        }
        Ok(Self {
            secret: MasterSecret(secret),
            current_generation: t.current_generation,
            signing_generation: t.signing_generation,
            retired_through: t.retired_through,
        })
    }

    /// Renders the TOML master file (contains the secret: write it with mode 0600).
    pub fn to_toml(&self) -> Zeroizing<String> {
        let t = MasterToml {
            format: 1,
            secret: Zeroizing::new(hex::encode(self.secret.0)),
            current_generation: self.current_generation,
            signing_generation: self.signing_generation,
            retired_through: self.retired_through,
        };
        let body = Zeroizing::new(toml::to_string(&t).expect("the master file is plain TOML"));
        Zeroizing::new(format!(
            "# agentfleet master secret: whoever holds this file can derive every key of the fleet.\n\
             # Keep it offline, mode 0600. `fleetctl keys derive` makes per-process keysets from it.\n{}",
            body.as_str()
        ))
    }

    /// Adds a *staged* generation: keysets derived now let verifiers accept it while senders
    /// keep signing with the signing generation, so the new keys can reach every process
    /// before anyone uses them.
    pub fn rotate(&mut self) -> Result<u32, KeyError> {
        self.current_generation =
            self.current_generation.checked_add(1).ok_or(KeyError::GenerationOverflow(self.current_generation))?;
        Ok(self.current_generation)
    }

    /// Makes the newest generation the signing one (after every process holds it).
    /// Returns false when it already was.
    pub fn promote(&mut self) -> bool {
        let changed = self.signing_generation != self.current_generation;
        self.signing_generation = self.current_generation;
        changed
    }

    /// Retires generations `1..=through`; the signing generation can't be retired.
    /// Returns false when they already were.
    pub fn retire_through(&mut self, through: u32) -> Result<bool, KeyError> {
        if through >= self.signing_generation {
            return Err(KeyError::RetireCurrent { through, signing: self.signing_generation });
        }
        let changed = through > self.retired_through;
        self.retired_through = self.retired_through.max(through);
        Ok(changed)
    }

    /// The keyset of one process: every edge it signs or verifies on, every generation up
    /// to the current one (retired ones listed without key material).
    pub fn derive_keyset(&self, process: Process, permissions: &PermissionTable) -> Keyset {
        let mut entries = Vec::new();
        for edge in permissions.edges() {
            if !process.is_on(edge) {
                continue;
            }
            for generation in (1..=self.current_generation).rev() {
                let kid = Kid { edge, generation };
                let secret = (generation > self.retired_through).then(|| self.secret.derive(&kid));
                entries.push(KeysetEntry { kid, secret, staged: generation > self.signing_generation });
            }
        }
        Keyset { process, entries }
    }
}

/// Who a keyset is for: a role's processes, or an operator (every edge, to verify tails).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Process {
    /// All processes of one role share its keyset.
    Role(Role),
    /// `fleetctl`: verifies every edge. HMAC keys can also sign, so this keyset is as
    /// sensitive as the master for the streams it covers.
    Operator,
}

impl Process {
    /// Parses a process name; `outbox-relay` gets its own error because it must hold no key.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        match s {
            "operator" => Ok(Process::Operator),
            "outbox-relay" => Err(KeyError::RelayHoldsNoKeys),
            _ => s.parse().map(Process::Role).map_err(|_| KeyError::UnknownProcess(s.to_owned())),
        }
    }

    fn is_on(self, edge: Edge) -> bool {
        match self {
            Process::Operator => true,
            Process::Role(r) => edge.from == r || edge.to == r,
        }
    }
}

impl fmt::Display for Process {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Process::Role(r) => r.fmt(f),
            Process::Operator => f.write_str("operator"),
        }
    }
}

/// One key of a keyset; `secret` is `None` for a retired kid.
#[derive(Clone)]
pub struct KeysetEntry {
    /// The key id.
    pub kid: Kid,
    /// Key material, absent once retired.
    pub secret: Option<Zeroizing<[u8; KEY_LEN]>>,
    /// Verify-only: a rotated-in generation not yet promoted to signing.
    pub staged: bool,
}

impl fmt::Debug for KeysetEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeysetEntry")
            .field("kid", &self.kid.to_string())
            .field("secret", &self.secret.as_ref().map(|_| "**REDACTED**"))
            .field("staged", &self.staged)
            .finish()
    }
}

/// The keys one process holds, as written to and read from a keyset file.
#[derive(Clone, Debug)]
pub struct Keyset {
    /// Whose keyset this is.
    pub process: Process,
    /// Its keys.
    pub entries: Vec<KeysetEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysetToml {
    format: u32,
    process: String,
    #[serde(default, rename = "key")]
    keys: Vec<KeyToml>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyToml {
    kid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    secret: Option<Zeroizing<String>>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    retired: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    staged: bool,
}

impl Keyset {
    /// Parses a keyset file (the format `fleetctl keys derive` prints).
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let t: KeysetToml = toml::from_str(text).map_err(|e| format_err("keyset", e.message()))?;
        if t.format != 1 {
            return Err(format_err("keyset", format_args!("format {} is not supported (expected 1)", t.format)));
        }
        let process = Process::parse(&t.process)?;
        let mut entries = Vec::with_capacity(t.keys.len());
        for k in t.keys {
            let kid: Kid = k.kid.parse().map_err(|e| format_err("keyset", e))?;
            let secret = match (k.secret, k.retired) {
                (Some(hex_text), false) => {
                    let raw = Zeroizing::new(
                        hex::decode(hex_text.as_str())
                            .map_err(|_| format_err("keyset", format_args!("secret of {kid} is not hex")))?,
                    );
                    let arr: [u8; KEY_LEN] = raw
                        .as_slice()
                        .try_into()
                        .map_err(|_| format_err("keyset", format_args!("secret of {kid} must be 32 bytes")))?;
                    Some(Zeroizing::new(arr))
                }
                (None, true) => None,
                (Some(_), true) => {
                    return Err(format_err("keyset", format_args!("{kid} is retired but still carries a secret")));
                }
                (None, false) => {
                    return Err(format_err("keyset", format_args!("{kid} has no secret and is not marked retired")));
                }
            };
            if k.staged && secret.is_none() {
                return Err(format_err("keyset", format_args!("{kid} cannot be both retired and staged")));
            }
            entries.push(KeysetEntry { kid, secret, staged: k.staged });
        }
        Ok(Self { process, entries })
    }

    /// Renders the keyset file (contains secrets: write it with mode 0600).
    pub fn to_toml(&self) -> Zeroizing<String> {
        let t = KeysetToml {
            format: 1,
            process: self.process.to_string(),
            keys: self
                .entries
                .iter()
                .map(|e| KeyToml {
                    kid: e.kid.to_string(),
                    secret: e.secret.as_ref().map(|s| Zeroizing::new(hex::encode(s.as_ref()))),
                    retired: e.secret.is_none(),
                    staged: e.staged,
                })
                .collect(),
        };
        let body = Zeroizing::new(toml::to_string(&t).expect("a keyset is plain TOML"));
        Zeroizing::new(format!(
            "# agentfleet keyset for process \"{}\": secret, keep it mode 0600.\n{}",
            self.process,
            body.as_str()
        ))
    }

    /// The generations this keyset holds, for logs and metrics (no key material).
    pub fn generations(&self) -> Generations {
        let mut g = Generations::default();
        for e in &self.entries {
            let n = e.kid.generation;
            g.newest = g.newest.max(n);
            match (&e.secret, e.staged) {
                (None, _) => g.retired_through = g.retired_through.max(n),
                (Some(_), false) => g.signing = g.signing.max(n),
                (Some(_), true) => {}
            }
        }
        g
    }

    /// Builds the in-memory keyring.
    pub fn into_keyring(self) -> Keyring {
        Keyring::from_entries(self.entries)
    }
}

/// The generations of a keyset, highest over all its edges (0: none). A keyset derived from
/// one master has the same three figures on every edge.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Generations {
    /// The newest generation listed (staged or not).
    pub newest: u32,
    /// The newest active, non-staged generation: the one this process signs with.
    pub signing: u32,
    /// The newest retired generation.
    pub retired_through: u32,
}

impl fmt::Display for Generations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "signing {}, newest {}, retired through {}", self.signing, self.newest, self.retired_through)
    }
}

/// An active key, pre-keyed so each message costs only the hashing of its own bytes.
#[derive(Clone)]
pub(crate) struct EdgeKey {
    pub(crate) kid: Kid,
    /// `kid` as written in frames, formatted once rather than on every seal.
    pub(crate) kid_text: Arc<str>,
    /// The `Hmac` state after absorbing the key (zeroized on drop: hmac's `zeroize` feature).
    pub(crate) mac: Hmac<Sha256>,
}

#[derive(Clone)]
pub(crate) enum KeyEntry {
    Active(EdgeKey),
    Retired,
}

/// The keys a process can use, looked up by kid text. `Debug` prints kids, never keys.
#[derive(Clone, Default)]
pub struct Keyring {
    keys: HashMap<Box<str>, KeyEntry>,
    /// Per edge, the newest active key: the one [`Keyring::seal`] signs with.
    newest: HashMap<Edge, EdgeKey>,
    /// Set by [`Keyring::following`]: this keyring holds no keys of its own and uses the
    /// live keyring's current ones. It lets code that takes a plain `Keyring` (the
    /// orchestrator's task engine) sign with reloaded keys.
    pub(crate) follows: Option<crate::live::LiveKeyring>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(live) = &self.follows {
            return f.debug_tuple("Keyring::following").field(live).finish();
        }
        let mut kids: Vec<_> = self
            .keys
            .iter()
            .map(|(k, e)| format!("{k}{}", if matches!(e, KeyEntry::Retired) { " (retired)" } else { "" }))
            .collect();
        kids.sort();
        f.debug_struct("Keyring").field("kids", &kids).field("secrets", &"**REDACTED**").finish()
    }
}

impl Keyring {
    /// A keyring that always uses `live`'s current keys: [`Keyring::seal`] and
    /// [`Keyring::signing_kid`] read it on each call, and a [`crate::Verifier`] or
    /// [`crate::LiveKeyring`] made from it shares `live`'s slot. For code that takes a
    /// `Keyring` and should still follow reloads.
    pub fn following(live: &crate::live::LiveKeyring) -> Self {
        Self { follows: Some(live.clone()), ..Self::default() }
    }

    /// Builds a keyring from keyset entries.
    pub fn from_entries(entries: impl IntoIterator<Item = KeysetEntry>) -> Self {
        let mut ring = Keyring::default();
        for e in entries {
            ring.insert(e);
        }
        ring
    }

    /// Adds one key (or retired kid). The newest non-staged generation of an edge signs.
    /// A [`Keyring::following`] keyring stops following: it holds what is inserted.
    pub fn insert(&mut self, entry: KeysetEntry) {
        self.follows = None;
        let kid = entry.kid;
        let value = match &entry.secret {
            Some(secret) => {
                let mac =
                    <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_ref()).expect("HMAC accepts any key length");
                let key = EdgeKey { kid, kid_text: kid.to_string().into(), mac };
                if !entry.staged && self.newest.get(&kid.edge).is_none_or(|n| kid.generation >= n.kid.generation) {
                    self.newest.insert(kid.edge, key.clone());
                }
                KeyEntry::Active(key)
            }
            None => {
                if self.newest.get(&kid.edge).is_some_and(|n| n.kid == kid) {
                    self.newest.remove(&kid.edge);
                }
                KeyEntry::Retired
            }
        };
        self.keys.insert(kid.to_string().into_boxed_str(), value);
    }

    /// Derives a keyring straight from a master (tests, and the operator's own tools).
    pub fn derive(master: &MasterFile, process: Process, permissions: &PermissionTable) -> Result<Self, KeyError> {
        Ok(master.derive_keyset(process, permissions).into_keyring())
    }

    pub(crate) fn lookup(&self, kid: &str) -> Option<&KeyEntry> {
        self.keys.get(kid)
    }

    pub(crate) fn signing_key(&self, edge: Edge) -> Result<&EdgeKey, KeyError> {
        self.newest.get(&edge).ok_or(KeyError::NoKeyForEdge(edge))
    }

    /// The kid this keyring signs `edge` with.
    pub fn signing_kid(&self, edge: Edge) -> Option<Kid> {
        if let Some(live) = &self.follows {
            return live.signing_kid(edge);
        }
        self.newest.get(&edge).map(|k| k.kid)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn kids_parse_only_in_canonical_form() {
        let k: Kid = "dev>orchestrator:12".parse().unwrap();
        assert_eq!(k.edge, Edge { from: Role::Dev, to: Role::Orchestrator });
        assert_eq!(k.generation, 12);
        assert_eq!(k.to_string(), "dev>orchestrator:12");
        for bad in [
            "dev>orchestrator:0",
            "dev>orchestrator:01",
            "dev>orchestrator:",
            "dev:1",
            "dev>boss:1",
            "dev>orchestrator:+1",
            "dev>orchestrator:1:2",
        ] {
            assert!(bad.parse::<Kid>().is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let m = MasterFile::new(MasterSecret::from_bytes([0xab; 32]));
        let dbg = format!("{m:?}");
        assert!(!dbg.contains("abab") && !dbg.contains("171"), "{dbg}");
        let entry =
            KeysetEntry { kid: "dev>qa:1".parse().unwrap(), secret: Some(Zeroizing::new([0xcd; 32])), staged: false };
        let ring = Keyring::from_entries([entry.clone()]);
        for text in [format!("{entry:?}"), format!("{ring:?}")] {
            assert!(text.contains("REDACTED") && !text.contains("cdcd") && !text.contains("205"), "{text}");
        }
    }

    #[test]
    fn master_file_round_trips_and_rotates() {
        let mut m = MasterFile::new(MasterSecret::from_bytes([7; 32]));
        assert_eq!(m.rotate().unwrap(), 2);
        assert!(
            matches!(m.retire_through(1), Err(KeyError::RetireCurrent { signing: 1, .. })),
            "staged is not signing"
        );
        assert!(m.promote());
        assert!(m.retire_through(1).unwrap());
        assert!(!m.retire_through(1).unwrap());
        assert!(matches!(m.retire_through(2), Err(KeyError::RetireCurrent { .. })));
        let back = MasterFile::parse(&m.to_toml()).unwrap();
        assert_eq!((back.current_generation, back.signing_generation, back.retired_through), (2, 2, 1));
        assert_eq!(back.secret.0, [7; 32]);
        let err = MasterFile::parse(
            "format = 1\nsecret = \"zz\"\ncurrent_generation = 1\nsigning_generation = 1\nretired_through = 0\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("not hex"), "{err}");
    }

    #[test]
    fn derivation_is_per_edge_and_generation() {
        let m = MasterSecret::from_bytes([1; 32]);
        let a = m.derive(&"dev>orchestrator:1".parse().unwrap());
        let b = m.derive(&"orchestrator>dev:1".parse().unwrap());
        let c = m.derive(&"dev>orchestrator:2".parse().unwrap());
        assert_ne!(*a, *b);
        assert_ne!(*a, *c);
        assert_eq!(*a, *m.derive(&"dev>orchestrator:1".parse().unwrap()));
    }

    #[test]
    fn process_names_are_checked() {
        assert!(matches!(Process::parse("outbox-relay"), Err(KeyError::RelayHoldsNoKeys)));
        assert!(matches!(Process::parse("planner"), Err(KeyError::UnknownProcess(_))));
        assert_eq!(Process::parse("qa").unwrap(), Process::Role(Role::Qa));
    }
}
