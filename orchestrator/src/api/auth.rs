//! Operator tokens: HS256 JWTs signed with the secret of the orchestrator's
//! configuration (the secret in its `jwt_secret_file`), issued by `fleetctl token issue`.
//!
//! Claims: `sub` (the operator's name, recorded as the actor of everything they do),
//! `role` (`viewer`, `operator` or `admin`), `iat`, `exp`, `iss = "agentfleet"`,
//! `aud = "agentfleet-api"`. A viewer may read; an operator may also submit and approve;
//! an admin may also pull the kill switch and resume.

use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::ApiState;
use super::error::ApiError;

/// `iss` of every token.
pub const ISSUER: &str = "agentfleet";
/// `aud` of every token.
pub const AUDIENCE: &str = "agentfleet-api";
/// Shortest secret accepted: HS256 keys shorter than its 32-byte output are guessable sooner.
pub const MIN_SECRET_BYTES: usize = 32;
/// Longest lifetime `issue` grants.
pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Clock skew tolerated on `exp`, in seconds.
const LEEWAY_SECS: u64 = 30;

/// What a token lets its holder do; each role includes the ones before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApiRole {
    /// Reads tasks.
    Viewer,
    /// Also submits and approves tasks.
    Operator,
    /// Also halts and resumes the fleet.
    Admin,
}

impl ApiRole {
    /// The claim's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ApiRole::Viewer => "viewer",
            ApiRole::Operator => "operator",
            ApiRole::Admin => "admin",
        }
    }
}

impl fmt::Display for ApiRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that does not exist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?}: expected viewer, operator or admin")]
pub struct UnknownRole(pub String);

impl FromStr for ApiRole {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [ApiRole::Viewer, ApiRole::Operator, ApiRole::Admin]
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownRole(s.to_owned()))
    }
}

/// A token's claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The operator's name.
    pub sub: String,
    /// What they may do.
    pub role: ApiRole,
    /// Issued at (Unix seconds).
    pub iat: u64,
    /// Expires at (Unix seconds).
    pub exp: u64,
    /// Always [`ISSUER`].
    pub iss: String,
    /// Always [`AUDIENCE`].
    pub aud: String,
}

/// Why a token could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// The secret is too short.
    #[error(
        "the secret must be at least {MIN_SECRET_BYTES} bytes (not counting surrounding whitespace), e.g. 64 hex digits from `openssl rand -hex 32`"
    )]
    WeakSecret,
    /// The subject is unusable.
    #[error("{0}")]
    Subject(String),
    /// The lifetime is zero or too long.
    #[error("the lifetime must be between 1 second and 30 days")]
    Ttl,
    /// Signing failed.
    #[error("cannot sign the token: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

/// Checks an operator name: 1 to 64 ASCII letters, digits, `.`, `_`, `-` or `@`. It
/// names the actor in the audit trail and the client's rate-limit bucket.
pub fn check_subject(sub: &str) -> Result<(), String> {
    let fine = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@');
    if sub.is_empty() || sub.len() > 64 || !sub.chars().all(fine) {
        return Err(format!("the subject {sub:?} must be 1 to 64 ASCII letters, digits, '.', '_', '-' or '@'"));
    }
    Ok(())
}

/// Why a presented token was refused; the message says which check failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRejection {
    /// Not three base64url parts of JSON.
    #[error("the bearer token is malformed (not a JWT)")]
    Malformed,
    /// Signed with another secret, or altered.
    #[error("the bearer token's signature is invalid: it was not issued with this API's secret")]
    BadSignature,
    /// Past `exp`.
    #[error("the bearer token has expired; ask an admin for a new one (`fleetctl token issue`)")]
    Expired,
    /// `iss` is not `agentfleet`.
    #[error("the bearer token's issuer (iss) is wrong: expected \"agentfleet\"")]
    WrongIssuer,
    /// `aud` is not `agentfleet-api`.
    #[error("the bearer token's audience (aud) is wrong: expected \"agentfleet-api\"")]
    WrongAudience,
    /// Not HS256.
    #[error("the bearer token's algorithm is not accepted: expected HS256")]
    WrongAlgorithm,
    /// A claim is missing or of the wrong shape.
    #[error("the bearer token's claims are invalid: {0}")]
    Claims(String),
}

impl TokenRejection {
    /// The RFC 6750 `error_description`, without quotes or backslashes.
    fn short(&self) -> &'static str {
        match self {
            TokenRejection::Malformed => "malformed token",
            TokenRejection::BadSignature => "invalid signature",
            TokenRejection::Expired => "token expired",
            TokenRejection::WrongIssuer => "wrong issuer",
            TokenRejection::WrongAudience => "wrong audience",
            TokenRejection::WrongAlgorithm => "wrong algorithm",
            TokenRejection::Claims(_) => "invalid claims",
        }
    }
}

/// The signing and verifying keys, from the configured secret.
pub struct TokenKeys {
    /// Signs (for `fleetctl token issue` and tests).
    encoding: EncodingKey,
    /// Verifies.
    decoding: DecodingKey,
    /// HS256 only, issuer, audience, `exp` with a little leeway.
    validation: Validation,
}

impl fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenKeys(**REDACTED**)")
    }
}

impl TokenKeys {
    /// Keys for `secret`, without its surrounding whitespace (so a file's final newline
    /// does not matter). At least [`MIN_SECRET_BYTES`].
    pub fn new(secret: &SecretString) -> Result<Self, IssueError> {
        let bytes = secret.expose_secret().trim().as_bytes();
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(IssueError::WeakSecret);
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = LEEWAY_SECS;
        Ok(Self { encoding: EncodingKey::from_secret(bytes), decoding: DecodingKey::from_secret(bytes), validation })
    }

    /// A token for `sub` with `role`, valid from now for `ttl` (at most [`MAX_TTL`]).
    pub fn issue(&self, sub: &str, role: ApiRole, ttl: Duration) -> Result<String, IssueError> {
        if ttl.is_zero() || ttl > MAX_TTL {
            return Err(IssueError::Ttl);
        }
        let now = unix_now();
        self.issue_claims(&Claims {
            sub: sub.to_owned(),
            role,
            iat: now,
            exp: now + ttl.as_secs().max(1),
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
        })
    }

    /// Signs `claims` as they are (tests use it for expired and foreign tokens).
    pub fn issue_claims(&self, claims: &Claims) -> Result<String, IssueError> {
        check_subject(&claims.sub).map_err(IssueError::Subject)?;
        Ok(jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)?)
    }

    /// The claims of `token` if it is genuine, current, and meant for this API.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenRejection> {
        let data =
            jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).map_err(|e| match e.kind() {
                ErrorKind::InvalidSignature => TokenRejection::BadSignature,
                ErrorKind::ExpiredSignature => TokenRejection::Expired,
                ErrorKind::InvalidIssuer => TokenRejection::WrongIssuer,
                ErrorKind::InvalidAudience => TokenRejection::WrongAudience,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName | ErrorKind::UnsupportedAlgorithm => {
                    TokenRejection::WrongAlgorithm
                }
                ErrorKind::MissingRequiredClaim(c) => TokenRejection::Claims(format!("`{c}` is missing")),
                ErrorKind::InvalidClaimFormat(c) => TokenRejection::Claims(format!("`{c}` has the wrong format")),
                ErrorKind::Json(e) => TokenRejection::Claims(e.to_string()),
                _ => TokenRejection::Malformed,
            })?;
        check_subject(&data.claims.sub).map_err(TokenRejection::Claims)?;
        Ok(data.claims)
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Who is calling, from a verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's `sub`.
    pub sub: String,
    /// The token's role.
    pub role: ApiRole,
}

/// The least role a route needs (a marker type for [`Authorized`]).
pub trait MinRole {
    /// The role.
    const ROLE: ApiRole;
}

/// Reading: viewer, operator or admin.
#[derive(Debug)]
pub struct AtLeastViewer;
/// Submitting and approving: operator or admin.
#[derive(Debug)]
pub struct AtLeastOperator;
/// Halting and resuming: admin.
#[derive(Debug)]
pub struct AtLeastAdmin;

impl MinRole for AtLeastViewer {
    const ROLE: ApiRole = ApiRole::Viewer;
}
impl MinRole for AtLeastOperator {
    const ROLE: ApiRole = ApiRole::Operator;
}
impl MinRole for AtLeastAdmin {
    const ROLE: ApiRole = ApiRole::Admin;
}

/// Extracts the [`Caller`] of a request whose bearer token is valid and whose role is at
/// least `R::ROLE`; otherwise answers 401 (no, malformed or refused token) or 403 (role
/// too low). It runs before the body is read.
#[derive(Debug)]
pub struct Authorized<R>(pub Caller, pub PhantomData<R>);

impl<R: MinRole + Send + Sync> FromRequestParts<ApiState> for Authorized<R> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, Self::Rejection> {
        let caller = authenticate(parts, state)?;
        if caller.role < R::ROLE {
            let needed = match R::ROLE {
                ApiRole::Admin => "the admin role".to_owned(),
                role => format!("the {role} role or higher"),
            };
            return Err(ApiError::Forbidden(format!(
                "this needs {needed}; the token of {:?} has the {} role",
                caller.sub, caller.role
            )));
        }
        Ok(Authorized(caller, PhantomData))
    }
}

fn authenticate(parts: &Parts, state: &ApiState) -> Result<Caller, ApiError> {
    const HOW: &str = "send `Authorization: Bearer <token>`; an admin issues tokens with `fleetctl token issue`";
    let Some(value) = parts.headers.get(AUTHORIZATION) else {
        return Err(ApiError::Unauthenticated { message: format!("no bearer token: {HOW}"), rejection: None });
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .filter(|token| !token.is_empty());
    let Some(token) = token else {
        return Err(ApiError::Unauthenticated {
            message: format!("malformed Authorization header: {HOW}"),
            rejection: None,
        });
    };
    let claims = state.keys.verify(token).map_err(|rejection| ApiError::Unauthenticated {
        message: rejection.to_string(),
        rejection: Some(rejection.short()),
    })?;
    Ok(Caller { sub: claims.sub, role: claims.role })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn keys(secret: &str) -> TokenKeys {
        TokenKeys::new(&SecretString::from(secret)).unwrap()
    }

    #[test]
    fn a_token_round_trips_and_foreign_ones_are_refused_by_name() {
        let k = keys("0123456789abcdef0123456789abcdef\n");
        let t = k.issue("alice", ApiRole::Operator, Duration::from_secs(60)).unwrap();
        let c = k.verify(&t).unwrap();
        assert_eq!(
            (c.sub.as_str(), c.role, c.iss.as_str(), c.aud.as_str()),
            ("alice", ApiRole::Operator, ISSUER, AUDIENCE)
        );

        let other = keys("fedcba9876543210fedcba9876543210");
        assert_eq!(other.verify(&t), Err(TokenRejection::BadSignature));
        assert_eq!(k.verify("not.a.jwt"), Err(TokenRejection::Malformed));

        let now = unix_now();
        let base = Claims {
            sub: "bob".into(),
            role: ApiRole::Admin,
            iat: now,
            exp: now + 60,
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
        };
        let expired = Claims { iat: now - 7200, exp: now - 3600, ..base.clone() };
        assert_eq!(k.verify(&k.issue_claims(&expired).unwrap()), Err(TokenRejection::Expired));
        let iss = Claims { iss: "someone-else".into(), ..base.clone() };
        assert_eq!(k.verify(&k.issue_claims(&iss).unwrap()), Err(TokenRejection::WrongIssuer));
        let aud = Claims { aud: "another-api".into(), ..base.clone() };
        assert_eq!(k.verify(&k.issue_claims(&aud).unwrap()), Err(TokenRejection::WrongAudience));
    }

    #[test]
    fn weak_secrets_bad_subjects_and_lifetimes_are_refused() {
        assert!(matches!(TokenKeys::new(&SecretString::from("  short  ")), Err(IssueError::WeakSecret)));
        let k = keys("0123456789abcdef0123456789abcdef");
        assert!(matches!(k.issue("a b", ApiRole::Viewer, Duration::from_secs(60)), Err(IssueError::Subject(_))));
        assert!(matches!(k.issue("a", ApiRole::Viewer, Duration::ZERO), Err(IssueError::Ttl)));
        assert!(matches!(k.issue("a", ApiRole::Viewer, MAX_TTL + Duration::from_secs(1)), Err(IssueError::Ttl)));
        assert_eq!("admin".parse::<ApiRole>(), Ok(ApiRole::Admin));
        assert!("root".parse::<ApiRole>().is_err());
        assert!(ApiRole::Viewer < ApiRole::Operator && ApiRole::Operator < ApiRole::Admin);
    }
}
