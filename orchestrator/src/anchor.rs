//! Anchoring the audit trail outside Postgres.
//!
//! The hash chain and its HMAC ([`crate::audit`]) stop anyone who lacks the audit key. A
//! database superuser who also holds that key can rewrite an old row and recompute every
//! later `hash` and `mac`, and plain verification passes. Anchoring closes that gap: a
//! separate process, holding an Ed25519 key that neither the orchestrator nor the database
//! has, reads the trail (read-only) and appends *anchors* to a write-once sink outside
//! Postgres ([`sink`]). An anchor commits to the chain's head (`seq`, `hash`) and to the
//! hash of every row since the previous anchor, so [`verify_anchors`] names the first
//! rewritten row exactly, not just the anchor interval it falls in.
//!
//! # An anchor
//!
//! One JSON line: `{"body":{…},"sig":"<128 hex>"}`. `sig` is Ed25519 over
//! `"agentfleet/audit-anchor/v1\n" ‖ body`, the body's bytes exactly as they stand in the
//! line (never a re-serialization). The body's fields, in this order:
//!
//! - `v`: 1.
//! - `n`: the anchor's number, 1, 2, 3, … in the sink.
//! - `seq`, `hash`: the head anchored, the row's seq and its hash (hex).
//! - `first_seq`: the first row this anchor covers, the previous anchor's `seq` + 1 (1 for
//!   the first anchor).
//! - `rows`: the hashes (hex) of rows `first_seq..=seq`, in order; the last is `hash`. At
//!   most [`MAX_ROWS_PER_ANCHOR`]: a longer stretch is covered by several anchors.
//! - `prev`: SHA-256 (hex) of the previous anchor's body bytes; 64 zeros for `n` = 1. The
//!   anchors are a chain of their own: one removed, inserted or reordered is seen.
//! - `at`: when the anchor was made (RFC 3339, UTC), by the anchoring process's clock.
//! - `key`: the public key (hex) that signed it.
//!
//! # Layout
//! - [`AnchorKey`], [`AnchorPublicKey`]: the signing key (seed file) and its public half.
//! - [`SignedAnchor`]: parsing, signing and checking one anchor line.
//! - [`anchor_now`]: read the head and the rows since the last anchor, check them, append.
//! - [`verify_anchors`]: check every anchor in a sink and compare it with the database.
//! - [`sink`]: the [`sink::AnchorSink`] trait, the append-only file and the git repository.

pub mod sink;

use std::fmt;

use chrono::{DateTime, SecondsFormat, Utc};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row};
use zeroize::Zeroizing;

use crate::audit::{AuditRow, GENESIS};
use sink::{AnchorSink, SinkError, StoredAnchor};

/// Domain tag of anchor signatures.
const SIGN_DOMAIN: &[u8] = b"agentfleet/audit-anchor/v1\n";
/// The anchor format's version (`v`).
pub const VERSION: u32 = 1;
/// Row hashes one anchor carries at most: a line stays under ~300 KB however far behind
/// the anchoring process is.
pub const MAX_ROWS_PER_ANCHOR: usize = 4096;

/// The anchoring process's Ed25519 signing key. `Debug` never shows it.
pub struct AnchorKey(SigningKey);

impl fmt::Debug for AnchorKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AnchorKey(**REDACTED**)")
    }
}

impl AnchorKey {
    /// From a 32-byte seed.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self(SigningKey::from_bytes(seed))
    }

    /// From a key file's bytes: the 32-byte seed itself, or as 64 hex digits (surrounding
    /// whitespace ignored).
    pub fn from_file_bytes(bytes: &[u8]) -> Result<Self, String> {
        if let Ok(seed) = <[u8; 32]>::try_from(bytes)
            && !bytes.iter().all(|b| b.is_ascii_hexdigit() || b.is_ascii_whitespace())
        {
            return Ok(Self::from_seed(&seed));
        }
        let text = std::str::from_utf8(bytes)
            .map_err(|_| "the anchor key is neither 32 raw bytes nor 64 hex digits".to_owned())?;
        let decoded = Zeroizing::new(
            hex::decode(text.trim())
                .map_err(|_| "the anchor key is neither 32 raw bytes nor 64 hex digits".to_owned())?,
        );
        let seed: Zeroizing<[u8; 32]> = Zeroizing::new(
            decoded
                .as_slice()
                .try_into()
                .map_err(|_| format!("the anchor key must be 32 bytes (64 hex digits), got {}", decoded.len()))?,
        );
        Ok(Self::from_seed(&seed))
    }

    /// The seed as 64 hex digits, for a new key file.
    pub fn seed_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(self.0.to_bytes()))
    }

    /// The public half.
    pub fn public(&self) -> AnchorPublicKey {
        AnchorPublicKey(self.0.verifying_key())
    }
}

/// The public key anchors are checked with.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct AnchorPublicKey(VerifyingKey);

impl fmt::Debug for AnchorPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AnchorPublicKey({})", self.to_hex())
    }
}

impl AnchorPublicKey {
    /// From 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Result<Self, String> {
        let bytes = hex::decode(text.trim()).map_err(|_| "the anchor public key is not hex".to_owned())?;
        let bytes: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| format!("the anchor public key must be 32 bytes (64 hex digits), got {}", bytes.len()))?;
        VerifyingKey::from_bytes(&bytes)
            .map(Self)
            .map_err(|_| "the anchor public key is not a valid Ed25519 point".to_owned())
    }

    /// 64 hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0.to_bytes())
    }
}

/// A SHA-256 value, hex in JSON.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Hash32(pub [u8; 32]);

impl fmt::Debug for Hash32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Display for Hash32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl Hash32 {
    fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }
}

impl Serialize for Hash32 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(self.0))
    }
}

impl<'de> Deserialize<'de> for Hash32 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let bytes = hex::decode(text.as_bytes()).map_err(|_| serde::de::Error::custom("a hash is not hex"))?;
        Hash32::from_slice(&bytes).ok_or_else(|| serde::de::Error::custom("a hash is not 32 bytes"))
    }
}

/// What an anchor says. The field order is the order in the line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnchorBody {
    /// Format version, [`VERSION`].
    pub v: u32,
    /// 1, 2, 3, … in the sink: a removed anchor leaves a gap.
    pub n: u64,
    /// The head anchored.
    pub seq: i64,
    /// The hash of row `seq`.
    pub hash: Hash32,
    /// The first row covered: the previous anchor's `seq` + 1.
    pub first_seq: i64,
    /// Hashes of rows `first_seq..=seq`: what lets verification name the first rewritten
    /// row, not only the anchor after it.
    pub rows: Vec<Hash32>,
    /// SHA-256 of the previous anchor's body bytes; zeros for the first.
    pub prev: Hash32,
    /// When it was made.
    pub at: DateTime<Utc>,
    /// The signer's public key (hex), so a line signed by another key is named as such.
    pub key: String,
}

/// One anchor as it stands in a sink: its body, the body's exact bytes and the signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedAnchor {
    /// The parsed body.
    body: AnchorBody,
    /// The body's bytes as signed.
    body_json: String,
    /// The signature over [`SIGN_DOMAIN`] ‖ `body_json`.
    sig: [u8; 64],
}

#[derive(Serialize)]
struct WireOut<'a> {
    body: &'a RawValue,
    sig: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireIn<'a> {
    #[serde(borrow)]
    body: &'a RawValue,
    sig: String,
}

impl SignedAnchor {
    /// Signs `body` with `key`.
    pub fn sign(body: AnchorBody, key: &AnchorKey) -> Self {
        // Serializing a struct of strings, integers and a timestamp cannot fail.
        let body_json = serde_json::to_string(&body).unwrap_or_default();
        let sig = key.0.sign(&signed_bytes(&body_json)).to_bytes();
        Self { body, body_json, sig }
    }

    /// Reads one line (without its newline). Checks the form only; the signature is
    /// [`Self::signature_ok`].
    pub fn parse(line: &str) -> Result<Self, String> {
        let wire: WireIn<'_> = serde_json::from_str(line).map_err(|e| format!("not an anchor line: {e}"))?;
        let body: AnchorBody = serde_json::from_str(wire.body.get()).map_err(|e| format!("not an anchor body: {e}"))?;
        if body.v != VERSION {
            return Err(format!("anchor format version {} is not {VERSION}", body.v));
        }
        let sig = hex::decode(&wire.sig).ok().and_then(|s| <[u8; 64]>::try_from(s.as_slice()).ok());
        let sig = sig.ok_or_else(|| "the signature is not 64 bytes of hex".to_owned())?;
        Ok(Self { body, body_json: wire.body.get().to_owned(), sig })
    }

    /// The line to store (no newline).
    pub fn line(&self) -> String {
        let raw = RawValue::from_string(self.body_json.clone());
        match raw {
            Ok(body) => serde_json::to_string(&WireOut { body: &body, sig: hex::encode(self.sig) }).unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// What it says.
    pub fn body(&self) -> &AnchorBody {
        &self.body
    }

    /// Whether `key` made the signature (strict Ed25519 verification).
    pub fn signature_ok(&self, key: &AnchorPublicKey) -> bool {
        key.0.verify_strict(&signed_bytes(&self.body_json), &Signature::from_bytes(&self.sig)).is_ok()
    }

    /// What the next anchor's `prev` must be.
    pub fn digest(&self) -> Hash32 {
        Hash32(Sha256::digest(self.body_json.as_bytes()).into())
    }

    /// Why `next` cannot follow `self` (or the start of a sink, when `self` is `None`), or
    /// `None` when it can. Sinks refuse such an append; verification reports it.
    pub fn extension_error(prev: Option<&Self>, next: &Self) -> Option<String> {
        let b = &next.body;
        let (n, seq, digest) = prev.map_or((0, 0, Hash32(GENESIS)), |p| (p.body.n, p.body.seq, p.digest()));
        // Saturating: `prev` may be an unchecked line from a sink, with any numbers in it.
        if b.n != n.saturating_add(1) {
            return Some(format!("anchor number {} does not follow {n}", b.n));
        }
        if b.prev != digest {
            return Some(format!("anchor {} does not name the previous anchor's digest", b.n));
        }
        if b.seq <= seq {
            return Some(format!("anchor {} anchors seq {}, not after the previous anchor's {seq}", b.n, b.seq));
        }
        if b.first_seq != seq.saturating_add(1) {
            return Some(format!("anchor {} starts at seq {}, not at {}", b.n, b.first_seq, seq.saturating_add(1)));
        }
        let span = b.seq.checked_sub(b.first_seq).and_then(|d| usize::try_from(d).ok()).map_or(0, |d| d + 1);
        if b.rows.len() != span || b.rows.last() != Some(&b.hash) {
            return Some(format!("anchor {} does not list the hash of each of its rows", b.n));
        }
        None
    }
}

fn signed_bytes(body_json: &str) -> Vec<u8> {
    [SIGN_DOMAIN, body_json.as_bytes()].concat()
}

/// Why [`anchor_now`] did not anchor.
#[derive(Debug, thiserror::Error)]
pub enum AnchorError {
    /// Reading the trail failed; worth retrying.
    #[error("cannot read the audit trail: {0}")]
    Db(#[from] sqlx::Error),
    /// The sink failed or refused.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// The sink's last anchor can't be used to continue (unreadable, or not ours).
    #[error("the sink's last anchor ({place}) cannot be continued: {why}")]
    LastAnchor {
        /// Where it is in the sink.
        place: String,
        /// What is wrong.
        why: String,
    },
    /// The database no longer holds what an anchor committed to: the trail was rewritten
    /// or cut back. Nothing more is anchored until an operator looks.
    #[error("the audit trail no longer matches the last anchor: {0}")]
    Diverged(String),
    /// The rows since the last anchor do not form a chain (content, link or seq); the
    /// anchoring process will not vouch for them.
    #[error("the audit trail is broken at seq {seq}: {why}; not anchoring it")]
    Broken {
        /// The first bad row.
        seq: i64,
        /// What is wrong.
        why: &'static str,
    },
}

impl AnchorError {
    /// Whether trying again later may succeed (a database or sink I/O fault), as opposed
    /// to a finding an operator must look at.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Db(_) => true,
            Self::Sink(e) => e.is_transient(),
            _ => false,
        }
    }
}

/// One anchor appended by [`anchor_now`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// Its number.
    pub n: u64,
    /// The rows it covers.
    pub first_seq: i64,
    /// The head it anchors.
    pub seq: i64,
}

/// Anchors the trail's current head: reads the sink's last anchor, checks that the
/// database still holds the row it anchored with the same hash, reads every row since (in
/// one read-only snapshot), checks their links and content hashes (no key needed), and
/// appends one anchor per [`MAX_ROWS_PER_ANCHOR`] rows, the last at the head. Nothing new
/// since the last anchor: appends nothing and returns an empty list.
///
/// The sink is written synchronously (a local file or repository: milliseconds).
pub async fn anchor_now(pool: &PgPool, key: &AnchorKey, sink: &dyn AnchorSink) -> Result<Vec<Appended>, AnchorError> {
    use futures_util::TryStreamExt;

    let public = key.public();
    let mut last = last_anchor(sink, &public)?;
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *tx).await?;
    let head = sqlx::query("SELECT seq, hash FROM audit_head").fetch_one(&mut *tx).await?;
    let head_seq: i64 = head.try_get("seq")?;
    let head_hash: Vec<u8> = head.try_get("hash")?;
    let (last_seq, last_hash) = last.as_ref().map_or((0, Hash32(GENESIS)), |a| (a.body.seq, a.body.hash));
    if head_seq < last_seq {
        return Err(AnchorError::Diverged(format!("the head is at seq {head_seq}, below the anchored seq {last_seq}")));
    }
    if head_seq == last_seq {
        if head_hash != last_hash.0 {
            return Err(AnchorError::Diverged(format!(
                "row {last_seq} was anchored with hash {last_hash}, the head now says {}",
                hex::encode(&head_hash)
            )));
        }
        tx.rollback().await?;
        return Ok(Vec::new());
    }

    // From the anchored row itself (when there is one), to check the link to it.
    let mut rows = sqlx::query(
        "SELECT seq, at, actor_role, actor_instance, action, task_id, prompt_version, details, prev_hash, hash, mac \
         FROM audit_trail WHERE seq >= $1 AND seq <= $2 ORDER BY seq, at",
    )
    .bind(last_seq.max(1))
    .bind(head_seq)
    .fetch(&mut *tx);
    let mut prev = last_hash;
    let mut expected = last_seq.saturating_add(1);
    // The anchored row comes first, and must still be there with the anchored hash.
    let mut linked = last_seq == 0;
    let gone = || AnchorError::Diverged(format!("row {last_seq}, anchored with hash {last_hash}, is gone"));
    let mut pending: Vec<Hash32> = Vec::new();
    let mut appended = Vec::new();
    while let Some(r) = rows.try_next().await? {
        let row = AuditRow::from_pg(&r)?;
        if !linked {
            if row.seq != last_seq {
                return Err(gone());
            }
            if row.hash != last_hash.0 {
                return Err(AnchorError::Diverged(format!(
                    "row {last_seq} was anchored with hash {last_hash}, the database now has {}",
                    hex::encode(&row.hash)
                )));
            }
            linked = true;
            continue;
        }
        if row.seq != expected {
            return Err(AnchorError::Broken { seq: expected, why: "the row is missing or duplicated" });
        }
        if row.prev_hash != prev.0 {
            return Err(AnchorError::Broken { seq: row.seq, why: "its prev_hash is not the previous row's hash" });
        }
        let hash = Hash32::from_slice(&row.hash)
            .filter(|h| row.computed_hash() == h.0)
            .ok_or(AnchorError::Broken { seq: row.seq, why: "its content does not hash to its hash" })?;
        if row.seq == head_seq && hash.0.as_slice() != head_hash.as_slice() {
            return Err(AnchorError::Broken { seq: head_seq, why: "its hash is not the head's hash" });
        }
        pending.push(hash);
        prev = hash;
        expected = expected.saturating_add(1);
        if pending.len() == MAX_ROWS_PER_ANCHOR || row.seq == head_seq {
            let anchor = make_anchor(last.as_ref(), std::mem::take(&mut pending), row.seq, key, &public);
            sink.append(&anchor)?;
            appended.push(Appended { n: anchor.body.n, first_seq: anchor.body.first_seq, seq: anchor.body.seq });
            last = Some(anchor);
        }
    }
    drop(rows);
    if !linked {
        return Err(gone());
    }
    if expected != head_seq.saturating_add(1) {
        return Err(AnchorError::Broken { seq: expected, why: "the row is missing (the head says there are more)" });
    }
    tx.rollback().await?;
    Ok(appended)
}

fn make_anchor(
    last: Option<&SignedAnchor>,
    rows: Vec<Hash32>,
    seq: i64,
    key: &AnchorKey,
    public: &AnchorPublicKey,
) -> SignedAnchor {
    let (n, first_seq, prev) = last
        .map_or((1, 1, Hash32(GENESIS)), |a| (a.body.n.saturating_add(1), a.body.seq.saturating_add(1), a.digest()));
    let hash = rows.last().copied().unwrap_or_default();
    let body = AnchorBody { v: VERSION, n, seq, hash, first_seq, rows, prev, at: Utc::now(), key: public.to_hex() };
    SignedAnchor::sign(body, key)
}

/// The sink's last anchor, which must be whole, readable and signed by `public`.
fn last_anchor(sink: &dyn AnchorSink, public: &AnchorPublicKey) -> Result<Option<SignedAnchor>, AnchorError> {
    let Some(last) = sink.last()? else { return Ok(None) };
    let bad = |why: String| AnchorError::LastAnchor { place: last.place.clone(), why };
    if !last.complete {
        return Err(bad("it is an incomplete line".to_owned()));
    }
    let anchor = SignedAnchor::parse(&last.text).map_err(bad)?;
    if anchor.body.key != public.to_hex() || !anchor.signature_ok(public) {
        return Err(bad(
            "it is not signed by this key; a new anchor key starts a new sink (keep the old one with its public key)"
                .to_owned(),
        ));
    }
    Ok(Some(anchor))
}

/// What is wrong with the anchors themselves; later anchors are not trusted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AnchorProblem {
    /// The sink holds no anchor at all: a wrong spec, or nothing was ever anchored.
    Empty,
    /// The sink's last line was cut (no newline): the file was truncated or a write
    /// interrupted.
    Incomplete {
        /// Where.
        place: String,
    },
    /// Not an anchor.
    Malformed {
        /// Where.
        place: String,
        /// What the parser said.
        why: String,
    },
    /// Signed by another key, or the signature does not verify: forged or altered.
    BadSignature {
        /// Where.
        place: String,
        /// The number it claims.
        n: u64,
    },
    /// Does not follow the previous anchor: one was removed, inserted or reordered.
    OutOfSequence {
        /// Where.
        place: String,
        /// The number it claims.
        n: u64,
        /// How it does not follow.
        why: String,
    },
}

impl AnchorProblem {
    /// One line for an operator.
    pub fn message(&self) -> String {
        match self {
            Self::Empty => "the sink holds no anchor: a wrong --anchors, or nothing was ever anchored".to_owned(),
            Self::Incomplete { place } => {
                format!("{place} is incomplete: the anchor file was cut or a write interrupted")
            }
            Self::Malformed { place, why } => format!("{place} is not a valid anchor: {why}"),
            Self::BadSignature { place, n } => {
                format!("{place} (anchor {n}): signature invalid under the anchor public key: forged or altered")
            }
            Self::OutOfSequence { place, n, why } => {
                format!("{place} (anchor {n}): {why}: an anchor was removed, inserted or reordered")
            }
        }
    }
}

/// A row that differs from what an anchor committed to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rewritten {
    /// The lowest such seq: the first rewritten row.
    pub seq: i64,
    /// The anchor that covers it.
    pub anchor: u64,
    /// Where that anchor is.
    pub place: String,
    /// The hash it committed to.
    pub anchored: String,
    /// The hash the database has now; `None` when the row is gone.
    pub found: Option<String>,
}

/// Result of [`verify_anchors`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AnchorReport {
    /// Anchors that are whole, signed and in sequence (up to the first problem).
    pub anchors: u64,
    /// The last of those: its number, head seq and time.
    pub last: Option<(u64, i64, DateTime<Utc>)>,
    /// The database's head seq.
    pub head_seq: i64,
    /// The first problem with the anchors, if any.
    pub problem: Option<AnchorProblem>,
    /// The first row that differs from the (trusted) anchors, if any.
    pub rewritten: Option<Rewritten>,
}

impl AnchorReport {
    /// No problem and nothing rewritten.
    pub fn ok(&self) -> bool {
        self.problem.is_none() && self.rewritten.is_none()
    }

    /// Rows after the last good anchor: not yet protected by any.
    pub fn unanchored(&self) -> i64 {
        (self.head_seq - self.last.map_or(0, |l| l.1)).max(0)
    }
}

/// Checks `stored` (a sink's [`AnchorSink::read_all`]) in order: each line whole and an
/// anchor, signed by `key`, and following the previous one; the first that is not is the
/// `problem` and ends the walk. Then every row the good anchors cover is compared with the
/// database (one read-only snapshot): the lowest seq whose hash differs, or that is gone,
/// is the first rewritten row. Rows after the last anchor are only counted.
pub async fn verify_anchors(
    pool: &PgPool,
    stored: &[StoredAnchor],
    key: &AnchorPublicKey,
) -> Result<AnchorReport, sqlx::Error> {
    let (good, problem) = check_anchors(stored, key);
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *tx).await?;
    let head_seq: i64 = sqlx::query_scalar("SELECT seq FROM audit_head").fetch_one(&mut *tx).await?;
    let rewritten = compare(&mut tx, &good).await?;
    tx.rollback().await?;
    let last = good.last().map(|(_, a)| (a.body.n, a.body.seq, a.body.at));
    Ok(AnchorReport { anchors: good.len() as u64, last, head_seq, problem, rewritten })
}

/// The anchors that check out, with their places, and the first problem.
pub fn check_anchors<'a>(
    stored: &'a [StoredAnchor],
    key: &AnchorPublicKey,
) -> (Vec<(&'a str, SignedAnchor)>, Option<AnchorProblem>) {
    let mut good: Vec<(&str, SignedAnchor)> = Vec::new();
    if stored.is_empty() {
        return (good, Some(AnchorProblem::Empty));
    }
    for s in stored {
        let place = s.place.clone();
        if !s.complete {
            return (good, Some(AnchorProblem::Incomplete { place }));
        }
        let anchor = match SignedAnchor::parse(&s.text) {
            Ok(a) => a,
            Err(why) => return (good, Some(AnchorProblem::Malformed { place, why })),
        };
        let n = anchor.body.n;
        if anchor.body.key != key.to_hex() || !anchor.signature_ok(key) {
            return (good, Some(AnchorProblem::BadSignature { place, n }));
        }
        if let Some(why) = SignedAnchor::extension_error(good.last().map(|(_, a)| a), &anchor) {
            return (good, Some(AnchorProblem::OutOfSequence { place, n, why }));
        }
        good.push((s.place.as_str(), anchor));
    }
    (good, None)
}

async fn compare(
    conn: &mut sqlx::PgConnection,
    good: &[(&str, SignedAnchor)],
) -> Result<Option<Rewritten>, sqlx::Error> {
    use futures_util::TryStreamExt;
    let Some((_, last)) = good.last() else { return Ok(None) };
    let mut db = sqlx::query("SELECT seq, hash FROM audit_trail WHERE seq <= $1 ORDER BY seq, at")
        .bind(last.body.seq)
        .fetch(&mut *conn);
    let mut current: Option<(i64, Vec<u8>)> = None;
    for (place, anchor) in good {
        for (i, anchored) in anchor.body.rows.iter().enumerate() {
            let seq = anchor.body.first_seq.saturating_add(i64::try_from(i).unwrap_or(i64::MAX));
            // The next database row at or after `seq` (duplicates of a seq: the first one
            // counts; plain verification reports the rest).
            while current.as_ref().is_none_or(|(s, _)| *s < seq) {
                match db.try_next().await? {
                    Some(r) => current = Some((r.try_get("seq")?, r.try_get("hash")?)),
                    None => {
                        current = None;
                        break;
                    }
                }
            }
            let found = current.as_ref().filter(|(s, _)| *s == seq).map(|(_, h)| h);
            if found.is_none_or(|h| h.as_slice() != anchored.0.as_slice()) {
                return Ok(Some(Rewritten {
                    seq,
                    anchor: anchor.body.n,
                    place: (*place).to_owned(),
                    anchored: anchored.to_string(),
                    found: found.map(hex::encode),
                }));
            }
        }
    }
    Ok(None)
}

/// RFC 3339 with seconds, for messages.
pub fn timestamp(at: &DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn anchor(key: &AnchorKey, prev: Option<&SignedAnchor>, rows: &[[u8; 32]]) -> SignedAnchor {
        let start = prev.map_or(0, |p| p.body.seq);
        let rows: Vec<Hash32> = rows.iter().copied().map(Hash32).collect();
        make_anchor(prev, rows, start + 2, key, &key.public())
    }

    fn stored(anchors: &[&SignedAnchor]) -> Vec<StoredAnchor> {
        anchors
            .iter()
            .enumerate()
            .map(|(i, a)| StoredAnchor { place: format!("line {}", i + 1), text: a.line(), complete: true })
            .collect()
    }

    #[test]
    fn a_line_round_trips_and_its_signature_covers_the_bytes() {
        let key = AnchorKey::from_seed(&[7; 32]);
        let a = anchor(&key, None, &[[1; 32], [2; 32]]);
        let line = a.line();
        assert!(line.starts_with(r#"{"body":{"v":1,"n":1,"seq":2,"hash":"0202"#), "{line}");
        let back = SignedAnchor::parse(&line).unwrap();
        assert_eq!(back, a);
        assert!(back.signature_ok(&key.public()));
        assert!(!back.signature_ok(&AnchorKey::from_seed(&[8; 32]).public()));
        // One byte of the body changed: the signature no longer holds.
        let forged = SignedAnchor::parse(&line.replace(r#""seq":2"#, r#""seq":3"#)).unwrap();
        assert!(!forged.signature_ok(&key.public()));
        assert!(SignedAnchor::parse(&format!("{line} ")).is_ok());
        assert!(SignedAnchor::parse(&line[..line.len() - 3]).is_err());
        assert!(SignedAnchor::parse("").is_err());
        assert!(SignedAnchor::parse(r#"{"body":1,"sig":"00"}"#).is_err());
    }

    #[test]
    fn key_files_are_hex_or_the_raw_seed() {
        let hexed = AnchorKey::from_file_bytes(format!("{}\n", "ab".repeat(32)).as_bytes()).unwrap();
        let raw = AnchorKey::from_file_bytes(&[0xab; 32]).unwrap();
        assert_eq!(hexed.public(), raw.public());
        assert_eq!(*hexed.seed_hex(), "ab".repeat(32));
        assert!(AnchorKey::from_file_bytes(b"abcd").unwrap_err().contains("got 2"));
        assert!(AnchorKey::from_file_bytes(b"not a key at all").is_err());
        assert!(!format!("{hexed:?}").contains("ab"));
        let public = hexed.public();
        assert_eq!(AnchorPublicKey::from_hex(&public.to_hex()).unwrap(), public);
        assert!(AnchorPublicKey::from_hex("00").is_err());
    }

    #[test]
    fn anchors_must_follow_each_other() {
        let key = AnchorKey::from_seed(&[7; 32]);
        let a1 = anchor(&key, None, &[[1; 32], [2; 32]]);
        let a2 = anchor(&key, Some(&a1), &[[3; 32], [4; 32]]);
        let a3 = anchor(&key, Some(&a2), &[[5; 32], [6; 32]]);
        let all = stored(&[&a1, &a2, &a3]);
        let (good, problem) = check_anchors(&all, &key.public());
        assert_eq!((good.len(), problem), (3, None));

        let gap = stored(&[&a1, &a3]);
        let (good, problem) = check_anchors(&gap, &key.public());
        assert_eq!(good.len(), 1);
        assert_eq!(
            problem,
            Some(AnchorProblem::OutOfSequence {
                place: "line 2".into(),
                n: 3,
                why: "anchor number 3 does not follow 1".into()
            })
        );
        let mut cut = stored(&[&a1, &a2]);
        cut[1].complete = false;
        assert_eq!(check_anchors(&cut, &key.public()).1, Some(AnchorProblem::Incomplete { place: "line 2".into() }));
        let other = AnchorKey::from_seed(&[9; 32]);
        let forged = anchor(&other, Some(&a1), &[[3; 32], [4; 32]]);
        assert_eq!(
            check_anchors(&stored(&[&a1, &forged]), &key.public()).1,
            Some(AnchorProblem::BadSignature { place: "line 2".into(), n: 2 })
        );
    }
}
