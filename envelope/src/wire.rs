//! The outer frame: [`SignedEnvelope`] and the signing input.
//!
//! Wire bytes are the MessagePack array `[v, kid, alg, body, sig]`. The signature is
//! computed over [`signing_input`] of the *received* body bytes, so a verifier never
//! re-serializes anything before checking it.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// The only wire version so far.
pub const WIRE_VERSION: u8 = 1;
/// The only algorithm so far: HMAC-SHA256.
pub const ALG_HS256: &str = "HS256";
/// Domain-separation tag, first item of the signing input, so these MACs can never be
/// confused with MACs of the same key over anything else.
pub const SIGNING_DOMAIN: &[u8] = b"agentfleet/envelope/sig";
/// Length of an HMAC-SHA256 tag.
pub const SIG_LEN: usize = 32;

/// A received frame, borrowing from the wire bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct SignedEnvelopeRef<'a> {
    /// Wire version; only [`WIRE_VERSION`] is accepted.
    pub v: u8,
    /// Key id, `<from>><to>:<generation>`.
    #[serde(borrow)]
    pub kid: &'a str,
    /// Algorithm; only [`ALG_HS256`] is accepted.
    #[serde(borrow)]
    pub alg: &'a str,
    /// The exact signed body bytes.
    #[serde(borrow, with = "serde_bytes")]
    pub body: &'a [u8],
    /// The tag over [`signing_input`].
    #[serde(borrow, with = "serde_bytes")]
    pub sig: &'a [u8],
}

/// An owned frame, for building wire bytes and for test vectors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SignedEnvelope {
    /// Wire version.
    pub v: u8,
    /// Key id.
    pub kid: String,
    /// Algorithm.
    pub alg: String,
    /// Signed body bytes.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// Signature.
    #[serde(with = "serde_bytes")]
    pub sig: Vec<u8>,
}

impl SignedEnvelope {
    /// The wire bytes: a 5-element MessagePack array.
    pub fn to_wire(&self) -> Vec<u8> {
        encode_frame(self.v, &self.kid, &self.alg, &self.body, &self.sig)
    }
}

/// Writes the frame `[v, kid, alg, body, sig]` with rmp-serde's compact (array) encoding.
pub(crate) fn encode_frame(v: u8, kid: &str, alg: &str, body: &[u8], sig: &[u8]) -> Vec<u8> {
    #[derive(Serialize)]
    struct Frame<'a>(
        u8,
        &'a str,
        &'a str,
        #[serde(with = "serde_bytes")] &'a [u8],
        #[serde(with = "serde_bytes")] &'a [u8],
    );
    let mut out = Vec::with_capacity(body.len() + kid.len() + alg.len() + 48);
    Frame(v, kid, alg, body, sig)
        .serialize(&mut rmp_serde::Serializer::new(&mut out))
        .expect("encoding a frame into memory cannot fail");
    out
}

/// Feeds the signing input into `mac`:
/// `LP(SIGNING_DOMAIN) ‖ LP([v]) ‖ LP(kid) ‖ LP(alg) ‖ LP(body)` where
/// `LP(x) = u32_be(len(x)) ‖ x`. Length prefixes make the split between items unambiguous.
pub fn feed_signing_input(mac: &mut Hmac<Sha256>, v: u8, kid: &str, alg: &str, body: &[u8]) {
    for item in [
        SIGNING_DOMAIN,
        &[v][..],
        kid.as_bytes(),
        alg.as_bytes(),
        body,
    ] {
        // Frames are capped far below 4 GiB (the verifier's size limit), so this never truncates.
        mac.update(&(item.len() as u32).to_be_bytes());
        mac.update(item);
    }
}

/// The signing input as bytes; for documentation, vectors and other-language ports.
pub fn signing_input(v: u8, kid: &str, alg: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 64);
    for item in [
        SIGNING_DOMAIN,
        &[v][..],
        kid.as_bytes(),
        alg.as_bytes(),
        body,
    ] {
        out.extend_from_slice(&(item.len() as u32).to_be_bytes());
        out.extend_from_slice(item);
    }
    out
}

/// Decodes one MessagePack value from `bytes` and refuses trailing bytes, so a body has
/// no smuggled suffix.
pub(crate) fn from_slice_exact<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
) -> Result<T, rmp_serde::decode::Error> {
    let mut rest = bytes;
    let value = T::deserialize(&mut rmp_serde::Deserializer::new(&mut rest))?;
    if !rest.is_empty() {
        return Err(serde::de::Error::custom(format_args!(
            "{} trailing bytes after the body",
            rest.len()
        )));
    }
    Ok(value)
}

/// Decodes the outer frame (not the body). The frame must use MessagePack's shortest
/// encodings and nothing may follow it: each frame then has exactly one byte form.
pub fn decode_frame(wire: &[u8]) -> Result<SignedEnvelopeRef<'_>, rmp_serde::decode::Error> {
    let frame: SignedEnvelopeRef<'_> = rmp_serde::from_slice(wire)?;
    let canonical = 1
        + uint_len(frame.v)
        + str_len(frame.kid.len())
        + str_len(frame.alg.len())
        + bin_len(frame.body.len())
        + bin_len(frame.sig.len());
    if wire.len() != canonical {
        return Err(serde::de::Error::custom(format_args!(
            "frame is {} bytes but its shortest encoding is {canonical}: trailing bytes or a non-canonical header",
            wire.len()
        )));
    }
    Ok(frame)
}

fn uint_len(v: u8) -> usize {
    if v < 0x80 { 1 } else { 2 }
}

fn str_len(n: usize) -> usize {
    n + match n {
        0..32 => 1,
        32..256 => 2,
        256..65536 => 3,
        _ => 5,
    }
}

fn bin_len(n: usize) -> usize {
    n + match n {
        0..256 => 2,
        256..65536 => 3,
        _ => 5,
    }
}
