//! Sealing and verifying: [`Keyring::seal`], [`Verifier`], [`Verified`] and the replay guard.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::ops::Deref;

use hmac::Mac;
use uuid::Uuid;

use crate::body::Envelope;
use crate::keys::{Edge, KeyEntry, KeyError, Keyring, Kid};
use crate::live::LiveKeyring;
use crate::names::{MessageType, Role};
use crate::permissions::PermissionTable;
use crate::wire::{self, ALG_HS256, SIG_LEN, WIRE_VERSION};

impl Keyring {
    /// Encodes `env`, signs it with the newest key of its edge (`from.role` > `to`) and
    /// returns the wire bytes (the value of a stream entry's `env` field).
    pub fn seal(&self, env: &Envelope) -> Result<Vec<u8>, KeyError> {
        if let Some(live) = &self.follows {
            return live.seal(env);
        }
        let key = self.signing_key(Edge { from: env.from.role, to: env.to })?;
        let kid = &*key.kid_text;
        Ok(wire::seal_frame(WIRE_VERSION, kid, ALG_HS256, env, |body| {
            let mut mac = key.mac.clone();
            wire::feed_signing_input(&mut mac, WIRE_VERSION, kid, ALG_HS256, body);
            mac.finalize().into_bytes().into()
        }))
    }
}

/// Why an entry was refused. Variants follow the order the checks run in; [`reason`] gives
/// the stable snake_case code written to `fleet:rejected` and used by the test vectors.
/// Messages quote at most a short, escaped piece of what the sender wrote.
///
/// [`reason`]: VerifyError::reason
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The frame exceeds the size limit; nothing else was looked at.
    #[error("frame is {size} bytes, over the {limit}-byte limit")]
    TooLarge {
        /// Received size.
        size: usize,
        /// Configured limit.
        limit: usize,
    },
    /// Not a well-formed frame or body.
    #[error("cannot decode: {0}")]
    Decode(String),
    /// A frame version this verifier does not speak.
    #[error("unsupported wire version {0} (this verifier speaks 1)")]
    UnsupportedVersion(u8),
    /// An algorithm other than HS256.
    #[error("unsupported algorithm {0} (only HS256)")]
    UnsupportedAlg(String),
    /// No key with this id (or a malformed id).
    #[error("unknown key id {0}")]
    UnknownKid(String),
    /// The key id was retired by a rotation.
    #[error("key {0} is retired")]
    RetiredKid(String),
    /// The HMAC does not match (constant-time comparison).
    #[error("bad signature")]
    BadSignature,
    /// The body's `from.role` / `to` differ from the edge of the key that signed it.
    #[error("body says {from} > {to} but the key {kid} is for another edge")]
    EdgeMismatch {
        /// Claimed sender.
        from: Role,
        /// Claimed addressee.
        to: Role,
        /// The signing key.
        kid: Kid,
    },
    /// The permission table grants no such publication.
    #[error("{from} may not publish {ty} to {to} on {stream}")]
    ForbiddenType {
        /// Sender.
        from: Role,
        /// Addressee.
        to: Role,
        /// Message type.
        ty: MessageType,
        /// Stream it was read from.
        stream: String,
    },
    /// `ttl_ms` larger than the verifier allows (it would defeat the replay window).
    #[error("ttl of {ttl_ms} ms exceeds the {max_ms} ms limit")]
    TtlTooLong {
        /// Claimed.
        ttl_ms: u64,
        /// Limit.
        max_ms: u64,
    },
    /// `issued_at_ms` further ahead of our clock than the allowed skew.
    #[error("issued {ahead_ms} ms in the future (allowed skew {skew_ms} ms)")]
    FutureDated {
        /// How far ahead.
        ahead_ms: u64,
        /// Allowed skew.
        skew_ms: u64,
    },
    /// Past `issued_at_ms + ttl_ms + skew`.
    #[error("expired {late_ms} ms ago")]
    Expired {
        /// How long ago.
        late_ms: u64,
    },
    /// Issued under an older kill epoch: a process that missed the kill switch.
    #[error("kill epoch {got} is older than the current epoch {current}")]
    StaleEpoch {
        /// Envelope's.
        got: u64,
        /// Ours.
        current: u64,
    },
    /// This envelope id was already accepted.
    #[error("envelope {0} was already seen (replay)")]
    Replay(Uuid),
}

impl VerifyError {
    /// Stable machine-readable code.
    pub fn reason(&self) -> &'static str {
        match self {
            VerifyError::TooLarge { .. } => "too_large",
            VerifyError::Decode(_) => "decode",
            VerifyError::UnsupportedVersion(_) => "unsupported_version",
            VerifyError::UnsupportedAlg(_) => "unsupported_alg",
            VerifyError::UnknownKid(_) => "unknown_kid",
            VerifyError::RetiredKid(_) => "retired_kid",
            VerifyError::BadSignature => "bad_signature",
            VerifyError::EdgeMismatch { .. } => "edge_mismatch",
            VerifyError::ForbiddenType { .. } => "forbidden_type",
            VerifyError::TtlTooLong { .. } => "ttl_too_long",
            VerifyError::FutureDated { .. } => "future_dated",
            VerifyError::Expired { .. } => "expired",
            VerifyError::StaleEpoch { .. } => "stale_epoch",
            VerifyError::Replay(_) => "replay",
        }
    }
}

/// Quotes attacker-controlled text safely: escaped, and cut to a short length.
fn quote(s: &str) -> String {
    const MAX: usize = 64;
    let cut: String = s.chars().take(MAX).collect();
    let ellipsis = if s.chars().count() > MAX { "…" } else { "" };
    format!("\"{}\"{ellipsis}", cut.escape_debug())
}

/// Limits of the verifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifierConfig {
    /// Largest accepted frame, bytes. Default 1 MiB.
    pub max_size: usize,
    /// Allowed clock difference between sender and receiver. Default 30 s.
    pub skew_ms: u64,
    /// Largest accepted `ttl_ms`; bounds how long the replay guard must remember. Default 24 h.
    pub max_ttl_ms: u64,
}

impl Default for VerifierConfig {
    fn default() -> Self {
        Self { max_size: 1 << 20, skew_ms: 30_000, max_ttl_ms: 24 * 3600 * 1000 }
    }
}

/// What the verifier needs to know about now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyContext {
    /// Receiver's clock, Unix milliseconds.
    pub now_ms: u64,
    /// The current kill epoch; envelopes issued under an older one are refused.
    pub kill_epoch: u64,
}

/// A verified value. Only this crate can make one, so a handler that takes
/// `Verified<Envelope>` can't be handed unchecked input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified<T = Envelope> {
    inner: T,
    kid: Kid,
}

impl<T> Verified<T> {
    /// The key that signed it.
    pub fn kid(&self) -> Kid {
        self.kid
    }

    /// Gives up the proof of verification.
    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T> Deref for Verified<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner
    }
}

/// Passed every check except replay. Obtain a [`Verified`] with [`Checked::accept`] (a
/// synchronous guard) or, for guards that check a whole batch at once such as Redis,
/// [`Checked::after_replay_check`].
#[derive(Debug)]
pub struct Checked {
    env: Envelope,
    kid: Kid,
    remember_until_ms: u64,
}

impl Checked {
    /// The envelope id the replay guard keys on.
    pub fn id(&self) -> Uuid {
        self.env.id
    }

    /// Until when the id must be remembered: afterwards the clock check refuses it anyway.
    pub fn remember_until_ms(&self) -> u64 {
        self.remember_until_ms
    }

    /// The envelope, for inspection before the replay decision (tail, metrics).
    pub fn envelope(&self) -> &Envelope {
        &self.env
    }

    /// Runs the replay check against `guard`.
    pub fn accept(self, guard: &mut dyn ReplayGuard, now_ms: u64) -> Result<Verified, VerifyError> {
        let first = guard.first_sighting(self.env.id, self.remember_until_ms, now_ms);
        self.after_replay_check(first)
    }

    /// Completes verification with the answer of an external guard that recorded
    /// [`Checked::id`] until [`Checked::remember_until_ms`]. `first_sighting` must be that
    /// guard's answer, never a constant.
    pub fn after_replay_check(self, first_sighting: bool) -> Result<Verified, VerifyError> {
        if !first_sighting {
            return Err(VerifyError::Replay(self.env.id));
        }
        Ok(Verified { inner: self.env, kid: self.kid })
    }
}

/// Remembers envelope ids so each is accepted once.
pub trait ReplayGuard {
    /// Records `id` until `until_ms`; returns false when it was already recorded.
    fn first_sighting(&mut self, id: Uuid, until_ms: u64, now_ms: u64) -> bool;
}

/// A process-local [`ReplayGuard`]. Memory is bounded by the message rate times the
/// longest window (`max_ttl_ms + skew`), since expired ids are dropped as time passes.
#[derive(Debug, Default)]
pub struct MemoryReplayGuard {
    seen: HashMap<Uuid, u64>,
    by_expiry: BinaryHeap<Reverse<(u64, Uuid)>>,
}

impl MemoryReplayGuard {
    /// An empty guard.
    pub fn new() -> Self {
        Self::default()
    }

    /// Ids currently remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// True when nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

impl ReplayGuard for MemoryReplayGuard {
    fn first_sighting(&mut self, id: Uuid, until_ms: u64, now_ms: u64) -> bool {
        while let Some(Reverse((exp, old))) = self.by_expiry.peek().copied() {
            if exp >= now_ms {
                break;
            }
            self.by_expiry.pop();
            if self.seen.get(&old) == Some(&exp) {
                self.seen.remove(&old);
            }
        }
        if self.seen.contains_key(&id) {
            return false;
        }
        self.seen.insert(id, until_ms);
        self.by_expiry.push(Reverse((until_ms, id)));
        true
    }
}

/// Checks received frames against a keyring and the permission table.
#[derive(Clone)]
pub struct Verifier {
    /// Read once per check, so a replaced keyring applies from the next message on.
    keyring: LiveKeyring,
    permissions: PermissionTable,
    config: VerifierConfig,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier").field("keyring", &self.keyring).field("config", &self.config).finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier with the given keys, permissions and limits. Pass a [`LiveKeyring`] (or a
    /// reference to one) to verify with whatever keyring it holds at each check.
    pub fn new(keyring: impl Into<LiveKeyring>, permissions: PermissionTable, config: VerifierConfig) -> Self {
        Self { keyring: keyring.into(), permissions, config }
    }

    /// The keyring this verifier checks with.
    pub fn keyring(&self) -> &LiveKeyring {
        &self.keyring
    }

    /// Every check, replay included, against a synchronous guard.
    pub fn verify(
        &self,
        stream: &str,
        wire: &[u8],
        ctx: VerifyContext,
        guard: &mut dyn ReplayGuard,
    ) -> Result<Verified, VerifyError> {
        self.check(stream, wire, ctx)?.accept(guard, ctx.now_ms)
    }

    /// Every check except replay, in the order of `docs/wire-format.md` §Verification.
    pub fn check(&self, stream: &str, wire: &[u8], ctx: VerifyContext) -> Result<Checked, VerifyError> {
        let limit = self.config.max_size;
        if wire.len() > limit {
            return Err(VerifyError::TooLarge { size: wire.len(), limit });
        }

        let frame = wire::decode_frame(wire).map_err(decode_err)?;
        if frame.v != WIRE_VERSION {
            return Err(VerifyError::UnsupportedVersion(frame.v));
        }
        if frame.alg != ALG_HS256 {
            return Err(VerifyError::UnsupportedAlg(quote(frame.alg)));
        }
        if frame.sig.len() != SIG_LEN {
            return Err(VerifyError::Decode(format!("signature is {} bytes, expected {SIG_LEN}", frame.sig.len())));
        }
        let env = Envelope::from_body_bytes(frame.body).map_err(decode_err)?;

        let ring = self.keyring.current();
        let key = match ring.lookup(frame.kid) {
            Some(KeyEntry::Active(k)) => k,
            Some(KeyEntry::Retired) => return Err(VerifyError::RetiredKid(quote(frame.kid))),
            None => return Err(VerifyError::UnknownKid(quote(frame.kid))),
        };

        let mut mac = key.mac.clone();
        wire::feed_signing_input(&mut mac, frame.v, frame.kid, frame.alg, frame.body);
        mac.verify_slice(frame.sig).map_err(|_| VerifyError::BadSignature)?;

        let edge = key.kid.edge;
        if env.from.role != edge.from || env.to != edge.to {
            return Err(VerifyError::EdgeMismatch { from: env.from.role, to: env.to, kid: key.kid });
        }

        let ty = env.message_type();
        if !self.permissions.permits(env.from.role, env.to, stream, ty) {
            return Err(VerifyError::ForbiddenType { from: env.from.role, to: env.to, ty, stream: quote(stream) });
        }

        let VerifierConfig { skew_ms, max_ttl_ms, .. } = self.config;
        if env.ttl_ms > max_ttl_ms {
            return Err(VerifyError::TtlTooLong { ttl_ms: env.ttl_ms, max_ms: max_ttl_ms });
        }
        if env.issued_at_ms > ctx.now_ms.saturating_add(skew_ms) {
            return Err(VerifyError::FutureDated { ahead_ms: env.issued_at_ms - ctx.now_ms, skew_ms });
        }
        // issued_at ≤ now + skew and ttl ≤ max_ttl, so this sum stays far from overflow.
        let deadline = env.issued_at_ms.saturating_add(env.ttl_ms).saturating_add(skew_ms);
        if ctx.now_ms > deadline {
            return Err(VerifyError::Expired { late_ms: ctx.now_ms - deadline });
        }

        if env.kill_epoch < ctx.kill_epoch {
            return Err(VerifyError::StaleEpoch { got: env.kill_epoch, current: ctx.kill_epoch });
        }

        Ok(Checked { env, kid: key.kid, remember_until_ms: deadline })
    }
}

fn decode_err(e: rmp_serde::decode::Error) -> VerifyError {
    VerifyError::Decode(quote(&e.to_string()))
}
