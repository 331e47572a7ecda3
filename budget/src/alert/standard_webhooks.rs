//! Signing and verifying webhooks per the [Standard Webhooks] specification (v1).
//!
//! A delivery carries three headers: `webhook-id` (the message id, the same on every retry
//! so receivers can drop duplicates), `webhook-timestamp` (Unix seconds of this attempt)
//! and `webhook-signature`, a space-separated list of `v1,<base64 HMAC-SHA256>` entries.
//! The MAC is computed over `{id}.{timestamp}.{body}` with the raw body bytes, and its key
//! is the base64-decoded part of the endpoint's `whsec_…` secret.
//!
//! [`sign`] is what the dispatcher sends; [`verify`] is what a receiver (our tests, or an
//! operator's endpoint written in Rust) checks.
//!
//! [Standard Webhooks]: https://www.standardwebhooks.com/

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretSlice};
use sha2::Sha256;

/// Header carrying the message id.
pub const HEADER_ID: &str = "webhook-id";
/// Header carrying the attempt's Unix timestamp in seconds.
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
/// Header carrying the signatures.
pub const HEADER_SIGNATURE: &str = "webhook-signature";
/// Prefix of a serialised secret.
pub const SECRET_PREFIX: &str = "whsec_";
/// Version tag of the symmetric HMAC-SHA256 scheme.
pub const SIGNATURE_VERSION: &str = "v1";
/// How far a timestamp may be from the receiver's clock, either way (the spec's 5 minutes).
pub const TOLERANCE_SECS: i64 = 5 * 60;
/// The spec asks for keys of 24 to 64 bytes; shorter ones are refused.
pub const MIN_KEY_LEN: usize = 24;

/// An endpoint's signing key, parsed from its `whsec_<base64>` form. `Debug` never shows it.
#[derive(Clone)]
pub struct WebhookSecret {
    /// The decoded key bytes; zeroed on drop.
    key: SecretSlice<u8>,
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret(**REDACTED**)")
    }
}

/// Why a secret was refused. Never contains the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// The text does not start with `whsec_`.
    #[error("the webhook secret must start with `whsec_`")]
    MissingPrefix,
    /// What follows the prefix is not standard base64.
    #[error("the webhook secret is not base64 after `whsec_`")]
    NotBase64,
    /// The decoded key is shorter than [`MIN_KEY_LEN`].
    #[error("the webhook secret's key is {0} bytes; at least 24 are required")]
    TooShort(usize),
}

impl WebhookSecret {
    /// Parses `whsec_<base64>`; the key must decode to at least [`MIN_KEY_LEN`] bytes.
    pub fn parse(text: &str) -> Result<Self, SecretError> {
        let encoded = text.trim().strip_prefix(SECRET_PREFIX).ok_or(SecretError::MissingPrefix)?;
        let key = BASE64.decode(encoded).map_err(|_| SecretError::NotBase64)?;
        if key.len() < MIN_KEY_LEN {
            return Err(SecretError::TooShort(key.len()));
        }
        Ok(Self { key: SecretSlice::from(key) })
    }

    /// A secret from raw key bytes (at least [`MIN_KEY_LEN`]).
    pub fn from_key(key: Vec<u8>) -> Result<Self, SecretError> {
        if key.len() < MIN_KEY_LEN {
            return Err(SecretError::TooShort(key.len()));
        }
        Ok(Self { key: SecretSlice::from(key) })
    }

    /// The serialised form, `whsec_<base64>`: for handing to the receiver's operator.
    pub fn to_whsec(&self) -> secrecy::SecretString {
        format!("{SECRET_PREFIX}{}", BASE64.encode(self.key.expose_secret())).into()
    }

    fn mac(&self, id: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
        let mut mac =
            <Hmac<Sha256> as KeyInit>::new_from_slice(self.key.expose_secret()).expect("HMAC accepts any key length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }
}

/// The `webhook-signature` value for one message: `v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`.
pub fn sign(secret: &WebhookSecret, id: &str, timestamp: i64, body: &[u8]) -> String {
    let tag = secret.mac(id, timestamp, body).finalize().into_bytes();
    format!("{SIGNATURE_VERSION},{}", BASE64.encode(tag))
}

/// Why a delivery failed verification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// `webhook-timestamp` is not an integer.
    #[error("webhook-timestamp is not a Unix timestamp in seconds")]
    BadTimestamp,
    /// The timestamp is more than [`TOLERANCE_SECS`] in the past.
    #[error("webhook-timestamp is too old")]
    TooOld,
    /// The timestamp is more than [`TOLERANCE_SECS`] in the future.
    #[error("webhook-timestamp is too far in the future")]
    TooNew,
    /// No `v1` entry of `webhook-signature` matches.
    #[error("no webhook-signature entry matches")]
    NoMatch,
}

/// Checks a delivery: the timestamp is within [`TOLERANCE_SECS`] of `now_secs`, and one of
/// the space-separated `v1,…` entries of `signatures` is the MAC of `{id}.{timestamp}.{body}`
/// (compared in constant time). Entries of other versions are ignored.
pub fn verify(
    secret: &WebhookSecret,
    id: &str,
    timestamp: &str,
    signatures: &str,
    body: &[u8],
    now_secs: i64,
) -> Result<(), VerifyError> {
    let ts: i64 = timestamp.trim().parse().map_err(|_| VerifyError::BadTimestamp)?;
    if now_secs.saturating_sub(ts) > TOLERANCE_SECS {
        return Err(VerifyError::TooOld);
    }
    if ts.saturating_sub(now_secs) > TOLERANCE_SECS {
        return Err(VerifyError::TooNew);
    }
    let mac = secret.mac(id, ts, body);
    let matched = signatures
        .split(' ')
        .filter_map(|entry| entry.split_once(','))
        .filter(|(version, _)| *version == SIGNATURE_VERSION)
        .filter_map(|(_, sig)| BASE64.decode(sig).ok())
        .any(|sig| mac.clone().verify_slice(&sig).is_ok());
    if matched { Ok(()) } else { Err(VerifyError::NoMatch) }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    // The test vector of the reference Rust library (standard-webhooks/libraries/rust).
    const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    const ID: &str = "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk";
    const TS: i64 = 1_649_367_553;
    const BODY: &[u8] = br#"{"email":"test@example.com","username":"test_user"}"#;
    const SIGNATURE: &str = "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=";

    fn secret() -> WebhookSecret {
        WebhookSecret::parse(SECRET).unwrap()
    }

    #[test]
    fn signs_the_published_vector() {
        assert_eq!(sign(&secret(), ID, TS, BODY), SIGNATURE);
    }

    #[test]
    fn verifies_the_published_vector() {
        assert_eq!(verify(&secret(), ID, &TS.to_string(), SIGNATURE, BODY, TS + 10), Ok(()));
    }

    #[test]
    fn refuses_a_tampered_body_id_or_timestamp() {
        let ts = TS.to_string();
        assert_eq!(verify(&secret(), ID, &ts, SIGNATURE, b"{}", TS), Err(VerifyError::NoMatch));
        assert_eq!(verify(&secret(), "msg_other", &ts, SIGNATURE, BODY, TS), Err(VerifyError::NoMatch));
        let later = (TS + 1).to_string();
        assert_eq!(verify(&secret(), ID, &later, SIGNATURE, BODY, TS), Err(VerifyError::NoMatch));
    }

    #[test]
    fn refuses_another_secret() {
        let other = WebhookSecret::from_key(vec![7; 32]).unwrap();
        assert_eq!(verify(&other, ID, &TS.to_string(), SIGNATURE, BODY, TS), Err(VerifyError::NoMatch));
    }

    #[test]
    fn refuses_timestamps_outside_the_tolerance() {
        let ts = TS.to_string();
        assert_eq!(verify(&secret(), ID, &ts, SIGNATURE, BODY, TS + TOLERANCE_SECS + 1), Err(VerifyError::TooOld));
        assert_eq!(verify(&secret(), ID, &ts, SIGNATURE, BODY, TS - TOLERANCE_SECS - 1), Err(VerifyError::TooNew));
        assert_eq!(verify(&secret(), ID, "soon", SIGNATURE, BODY, TS), Err(VerifyError::BadTimestamp));
    }

    #[test]
    fn accepts_one_match_among_several_signatures_and_ignores_other_versions() {
        let ts = TS.to_string();
        let sig = SIGNATURE.trim_start_matches("v1,");
        let many = format!("v1,Mm7xgUVICxZfQ3bgf0h0Dof65L/IFx+PnZvnDWPCX6Q= v1a,AAAA {SIGNATURE} v1,not-base64");
        assert_eq!(verify(&secret(), ID, &ts, &many, BODY, TS), Ok(()));
        assert_eq!(verify(&secret(), ID, &ts, &format!("v2,{sig}"), BODY, TS), Err(VerifyError::NoMatch));
        assert_eq!(verify(&secret(), ID, &ts, sig, BODY, TS), Err(VerifyError::NoMatch));
        assert_eq!(verify(&secret(), ID, &ts, "", BODY, TS), Err(VerifyError::NoMatch));
    }

    #[test]
    fn parses_secrets_strictly() {
        assert_eq!(WebhookSecret::parse("C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap_err(), SecretError::MissingPrefix);
        assert_eq!(WebhookSecret::parse("whsec_!!!").unwrap_err(), SecretError::NotBase64);
        assert_eq!(WebhookSecret::parse("whsec_c2hvcnQ=").unwrap_err(), SecretError::TooShort(5));
        assert_eq!(secret().to_whsec().expose_secret(), SECRET);
        assert_eq!(format!("{:?}", secret()), "WebhookSecret(**REDACTED**)");
    }
}
