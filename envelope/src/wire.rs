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
    for item in [SIGNING_DOMAIN, &[v][..], kid.as_bytes(), alg.as_bytes(), body] {
        // Frames are capped far below 4 GiB (the verifier's size limit), so this never truncates.
        mac.update(&(item.len() as u32).to_be_bytes());
        mac.update(item);
    }
}

/// The signing input as bytes; for documentation, vectors and other-language ports.
pub fn signing_input(v: u8, kid: &str, alg: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 64);
    for item in [SIGNING_DOMAIN, &[v][..], kid.as_bytes(), alg.as_bytes(), body] {
        out.extend_from_slice(&(item.len() as u32).to_be_bytes());
        out.extend_from_slice(item);
    }
    out
}

/// Decodes one MessagePack value from `bytes` and refuses trailing bytes, so a body has
/// no smuggled suffix.
///
/// Strings and byte strings are borrowed from `bytes` while decoding (rmp-serde's
/// `Deserializer::new` over a `&[u8]` would copy each one into a scratch buffer first, which
/// was half the cost of decoding a body). That reader doesn't say how much it consumed, so
/// the end is checked by reading one more marker: only an empty remainder fails that read.
pub(crate) fn from_slice_exact<'de, T: Deserialize<'de>>(bytes: &'de [u8]) -> Result<T, rmp_serde::decode::Error> {
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    let value = T::deserialize(&mut de)?;
    match NoValue::deserialize(&mut de) {
        Err(rmp_serde::decode::Error::InvalidMarkerRead(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Ok(value)
        }
        _ => Err(serde::de::Error::custom("trailing bytes after the body")),
    }
}

/// Accepts no value at all: its visitor keeps serde's defaults, which refuse every type
/// without reading past the value's header. [`from_slice_exact`] uses it to probe for a
/// marker after the body, so nothing nested in trailing bytes is read, let alone a second
/// marker that could run out of input.
struct NoValue;

impl<'de> Deserialize<'de> for NoValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = NoValue;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("the end of the body")
            }
        }
        d.deserialize_any(V)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_suffix_after_one_value_is_refused() {
        // {"a": "xy"}
        let value = [0x81, 0xa1, b'a', 0xa2, b'x', b'y'];
        let ok: std::collections::BTreeMap<String, String> = from_slice_exact(&value).unwrap();
        assert_eq!(ok["a"], "xy");
        // A whole value, a container whose items are missing, a truncated header, a
        // reserved marker, invalid UTF-8: each is a suffix, none may pass as the end.
        for suffix in [&[0xc0][..], &[0x91], &[0x81], &[0xdc, 0x00], &[0xd9], &[0xc1], &[0xa1, 0xff], &[0xd4, 0x01]] {
            let bytes = [&value[..], suffix].concat();
            let err = from_slice_exact::<std::collections::BTreeMap<String, String>>(&bytes).unwrap_err();
            assert!(err.to_string().contains("trailing bytes"), "suffix {suffix:02x?}: {err}");
        }
        // A value cut short is still a plain decode error.
        assert!(from_slice_exact::<std::collections::BTreeMap<String, String>>(&value[..5]).is_err());
    }
}
