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

/// A received frame, borrowing from the wire bytes; made by [`decode_frame`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedEnvelopeRef<'a> {
    /// Wire version; only [`WIRE_VERSION`] is accepted.
    pub v: u8,
    /// Key id, `<from>><to>:<generation>`.
    pub kid: &'a str,
    /// Algorithm; only [`ALG_HS256`] is accepted.
    pub alg: &'a str,
    /// The exact signed body bytes.
    pub body: &'a [u8],
    /// The tag over [`signing_input`].
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

/// The frame of `env`, signed by `sign` (given the body), as [`encode_frame`] writes it, but
/// with the body encoded straight into the frame: one buffer per envelope, no copy of the
/// body. The body's `bin` header is written as `bin16` before the body is known, which is
/// its shortest form for bodies of 256 to 65,535 bytes; any other size is re-framed by
/// [`encode_frame`], so the bytes never depend on which path made them.
pub(crate) fn seal_frame(
    v: u8,
    kid: &str,
    alg: &str,
    env: &crate::body::Envelope,
    sign: impl FnOnce(&[u8]) -> [u8; SIG_LEN],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + env.payload.size_hint() + kid.len() + alg.len() + 48);
    // Writing into a Vec cannot fail.
    let header = |out: &mut Vec<u8>| -> Result<(), rmp::encode::ValueWriteError> {
        rmp::encode::write_array_len(out, 5)?;
        rmp::encode::write_uint(out, u64::from(v))?;
        rmp::encode::write_str(out, kid)?;
        rmp::encode::write_str(out, alg)?;
        Ok(())
    };
    header(&mut out).expect("encoding a frame header into memory cannot fail");
    out.extend_from_slice(&[0xc5, 0, 0]);
    let body_at = out.len();
    env.serialize(&mut rmp_serde::Serializer::new(&mut out).with_struct_map())
        .expect("encoding an envelope body into memory cannot fail");
    let body_len = out.len() - body_at;
    let Ok(len16 @ 256..) = u16::try_from(body_len) else {
        let sig = sign(&out[body_at..]);
        return encode_frame(v, kid, alg, &out[body_at..], &sig);
    };
    out[body_at - 2..body_at].copy_from_slice(&len16.to_be_bytes());
    let sig = sign(&out[body_at..]);
    rmp::encode::write_bin(&mut out, &sig).expect("encoding a signature into memory cannot fail");
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
/// no smuggled suffix. Each value must have the MessagePack type its Rust type asks for
/// ([`crate::strict`]), and every `str` must be UTF-8.
///
/// Strings and byte strings are borrowed from `bytes` while decoding (rmp-serde's
/// `Deserializer::new` over a `&[u8]` would copy each one into a scratch buffer first, which
/// was half the cost of decoding a body). That reader doesn't say how much it consumed, so
/// the end is checked by reading one more marker: only an empty remainder fails that read.
pub(crate) fn from_slice_exact<'de, T: Deserialize<'de>>(bytes: &'de [u8]) -> Result<T, rmp_serde::decode::Error> {
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    let value = T::deserialize(crate::strict::Strict(&mut de))?;
    match NoValue::deserialize(&mut de) {
        Err(rmp_serde::decode::Error::InvalidMarkerRead(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        _ => return Err(serde::de::Error::custom("trailing bytes after the body")),
    }
    crate::strict::check_utf8(bytes).map_err(<rmp_serde::decode::Error as serde::de::Error>::custom)?;
    Ok(value)
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

/// Decodes the outer frame (not the body). The frame is read byte by byte against its one
/// allowed form: `95`, then `v` as a positive fixint (or a uint8 from 128), `kid` and `alg`
/// as UTF-8 `str`, `body` and `sig` as `bin`, each header the shortest for its length, and
/// nothing after `sig`. Each frame then has exactly one byte form, and no other MessagePack
/// type stands in for the one named (a `str` of 32 bytes has a header as long as a `bin`'s).
pub fn decode_frame(wire: &[u8]) -> Result<SignedEnvelopeRef<'_>, rmp_serde::decode::Error> {
    let mut rd = FrameReader(wire);
    if rd.byte("the frame")? != 0x95 {
        return Err(frame_err("a frame is a MessagePack fixarray of 5 elements (first byte 0x95)"));
    }
    let v = match rd.byte("v")? {
        v @ 0x00..=0x7f => v,
        0xcc => match rd.byte("v")? {
            v @ 0x80.. => v,
            _ => return Err(frame_err("v is written as a uint8 but fits a positive fixint")),
        },
        _ => return Err(frame_err("v is not an integer 0..=255 in its shortest form")),
    };
    let kid = rd.str("kid")?;
    let alg = rd.str("alg")?;
    let body = rd.bin("body")?;
    let sig = rd.bin("sig")?;
    if !rd.0.is_empty() {
        return Err(frame_err(format_args!("{} trailing bytes after the frame", rd.0.len())));
    }
    Ok(SignedEnvelopeRef { v, kid, alg, body, sig })
}

fn frame_err(msg: impl std::fmt::Display) -> rmp_serde::decode::Error {
    serde::de::Error::custom(msg)
}

/// The unread rest of a frame.
struct FrameReader<'a>(&'a [u8]);

impl<'a> FrameReader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], rmp_serde::decode::Error> {
        let (head, rest) =
            self.0.split_at_checked(n).ok_or_else(|| frame_err(format_args!("the frame ends in {what}")))?;
        self.0 = rest;
        Ok(head)
    }

    fn byte(&mut self, what: &str) -> Result<u8, rmp_serde::decode::Error> {
        Ok(self.take(1, what)?[0])
    }

    /// A big-endian length of `width` bytes that must be at least `min`, the first length
    /// that needs this width (else a shorter header would do).
    fn len(&mut self, width: usize, min: usize, what: &str) -> Result<usize, rmp_serde::decode::Error> {
        let n = self.take(width, what)?.iter().fold(0usize, |acc, b| acc << 8 | usize::from(*b));
        if n < min {
            return Err(frame_err(format_args!(
                "{what} has a {width}-byte length for {n} bytes: not the shortest header"
            )));
        }
        Ok(n)
    }

    fn str(&mut self, what: &str) -> Result<&'a str, rmp_serde::decode::Error> {
        let n = match self.byte(what)? {
            m @ 0xa0..=0xbf => usize::from(m & 0x1f),
            0xd9 => self.len(1, 32, what)?,
            0xda => self.len(2, 256, what)?,
            0xdb => self.len(4, 65536, what)?,
            m => return Err(frame_err(format_args!("{what} is not a str (marker 0x{m:02x})"))),
        };
        std::str::from_utf8(self.take(n, what)?).map_err(|e| frame_err(format_args!("{what} is not UTF-8: {e}")))
    }

    fn bin(&mut self, what: &str) -> Result<&'a [u8], rmp_serde::decode::Error> {
        let n = match self.byte(what)? {
            0xc4 => self.len(1, 0, what)?,
            0xc5 => self.len(2, 256, what)?,
            0xc6 => self.len(4, 65536, what)?,
            m => return Err(frame_err(format_args!("{what} is not a bin (marker 0x{m:02x})"))),
        };
        self.take(n, what)
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

    /// `seal_frame` writes exactly what `encode_frame` does for the same body and signature,
    /// whichever `bin` form the body needs: bin8, bin16 (the one written in place) or bin32.
    #[test]
    fn a_frame_sealed_in_place_is_byte_for_byte_the_reference_frame() {
        use crate::body::{Envelope, Question, Sender};
        use crate::names::{Instance, Role};
        // Every text length whose body is near a `bin` form's limit (255/256 and 65,535/65,536
        // bytes), and beyond.
        let mut seen_sizes = std::collections::BTreeSet::new();
        for text in (0usize..400).chain(65_200..65_600).chain([70_000]) {
            let from = Sender { role: Role::Dev, instance: Instance::parse("dev-1").expect("a valid instance") };
            let payload = Question { text: "q".repeat(text) }.into();
            let env = Envelope::new(from, Role::Orchestrator, 1_700_000_000_000, 60_000, 0, payload);
            let mut signed = Vec::new();
            let frame = seal_frame(1, "dev>orchestrator:1", ALG_HS256, &env, |body| {
                signed = body.to_vec();
                [9; SIG_LEN]
            });
            let body = env.to_body_bytes();
            seen_sizes.insert(body.len());
            assert_eq!(signed, body, "text {text}: the signature covers the body");
            assert_eq!(frame, encode_frame(1, "dev>orchestrator:1", ALG_HS256, &body, &[9; SIG_LEN]), "text {text}");
            assert!(decode_frame(&frame).is_ok());
        }
        for size in [255, 256, 65_535, 65_536] {
            assert!(seen_sizes.contains(&size), "no body of {size} bytes was tried");
        }
    }

    #[test]
    fn a_frame_has_one_byte_form() {
        let body = vec![0x80; 40];
        let good = encode_frame(1, "dev>orchestrator:3", ALG_HS256, &body, &[7; SIG_LEN]);
        let f = decode_frame(&good).expect("the reference frame decodes");
        assert_eq!((f.v, f.kid, f.alg, f.body, f.sig), (1, "dev>orchestrator:3", "HS256", &body[..], &[7; 32][..]));
        let sig_at = good.len() - 34;
        let body_at = sig_at - 42;
        // Each of these decodes to the same five values with rmp-serde; each must be refused.
        let mut variants: Vec<(&str, Vec<u8>)> = Vec::new();
        let splice = |at: usize, cut: usize, with: &[u8]| [&good[..at], with, &good[at + cut..]].concat();
        variants.push(("v as uint8", splice(1, 1, &[0xcc, 0x01])));
        variants.push(("v as int8", splice(1, 1, &[0xd0, 0x01])));
        variants.push(("kid as str8", splice(2, 1, &[0xd9, 18])));
        variants.push(("sig as str8", splice(sig_at, 1, &[0xd9])));
        variants.push(("body as str8", splice(body_at, 1, &[0xd9])));
        variants.push(("body as bin16", splice(body_at, 2, &[0xc5, 0x00, 40])));
        variants.push(("array16 frame", splice(0, 1, &[0xdc, 0x00, 0x05])));
        variants.push(("trailing byte", [&good[..], &[0xc0]].concat()));
        for (what, bytes) in variants {
            assert!(decode_frame(&bytes).is_err(), "{what} must be refused");
        }
    }
}
