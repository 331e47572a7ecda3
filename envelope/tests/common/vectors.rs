//! The JSON schema of `tests/vectors/*.json`, shared by the generator
//! (`examples/vectors.rs`) and the checker (`tests/vectors.rs`).
#![allow(dead_code, unreachable_pub)]

use envelope::keys::KeysetEntry;
use envelope::{Envelope, Keyring, PermissionTable, Verifier, VerifierConfig};
use serde::{Deserialize, Serialize};

/// `keys.json`: derivation vectors and the verifier's keyring used by the other files.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysFile {
    pub description: String,
    pub master_secret_hex: String,
    pub hkdf_salt: String,
    pub derivations: Vec<Derivation>,
    /// The keys the verifier of every vector holds (retired kids without a key).
    pub verifier_keyring: Vec<RingKey>,
    /// The permission file the verifier of every vector uses (path in the repository).
    pub permissions: String,
    pub verifier_config: Config,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Derivation {
    pub kid: String,
    pub key_hex: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RingKey {
    pub kid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_hex: Option<String>,
    #[serde(default)]
    pub retired: bool,
}

#[derive(Serialize, Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub max_size: usize,
    pub skew_ms: u64,
    pub max_ttl_ms: u64,
}

/// `positive.json` entries.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Positive {
    pub name: String,
    pub description: String,
    pub kid: String,
    pub key_hex: String,
    /// The body fields, in wire key order, as JSON (ids as UUID strings, bytes as arrays).
    pub fields: Envelope,
    pub body_hex: String,
    pub signing_input_hex: String,
    pub signature_hex: String,
    pub wire_hex: String,
    /// Verification context under which the vector must verify.
    pub stream: String,
    pub now_ms: u64,
    pub kill_epoch: u64,
}

/// `accepted.json` entries: frames a verifier must accept although the reference signer
/// would have written them differently (another key order, wider integers, longer headers)
/// or that sit exactly on a limit.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Accepted {
    pub name: String,
    pub description: String,
    /// The rule of `docs/wire-format.md` §11 that makes a verifier accept it.
    pub rule: String,
    pub kid: String,
    /// What the body means, in the notation of [`Positive::fields`].
    pub fields: Envelope,
    pub body_hex: String,
    pub wire_hex: String,
    pub stream: String,
    pub now_ms: u64,
    pub kill_epoch: u64,
}

/// `negative.json` entries.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Negative {
    pub name: String,
    pub description: String,
    /// The rule of `docs/wire-format.md` §11 the frame breaks (the first, in check order).
    pub rule: String,
    pub wire_hex: String,
    pub stream: String,
    pub now_ms: u64,
    pub kill_epoch: u64,
    /// Overrides `verifier_config.max_size` when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_size: Option<usize>,
    /// Envelope ids the replay guard has already seen.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seen_ids: Vec<uuid::Uuid>,
    /// The expected error code (`VerifyError::reason`).
    pub expected_error: String,
}

impl KeysFile {
    pub fn keyring(&self) -> Keyring {
        Keyring::from_entries(self.verifier_keyring.iter().map(|k| {
            KeysetEntry {
                kid: k.kid.parse().expect("vector kid"),
                secret: k
                    .key_hex
                    .as_ref()
                    .map(|h| zeroize::Zeroizing::new(hex::decode(h).expect("hex").try_into().expect("32 bytes"))),
                staged: false,
            }
        }))
    }

    pub fn verifier(&self, permissions: &PermissionTable, max_size: Option<usize>) -> Verifier {
        let c = self.verifier_config;
        Verifier::new(
            self.keyring(),
            permissions.clone(),
            VerifierConfig { max_size: max_size.unwrap_or(c.max_size), skew_ms: c.skew_ms, max_ttl_ms: c.max_ttl_ms },
        )
    }
}
