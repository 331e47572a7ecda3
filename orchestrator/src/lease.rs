//! Capability leases: the short-lived JWT the orchestrator mints for each assignment and
//! every `tool.request` presents.
//!
//! A lease names one task step (its assignment envelope id is the token's `jti`), the role,
//! the workspace and scope, the tool actions granted with their risk levels, and the token
//! and money the step may spend. It is signed with a secret only the orchestrator holds
//! (HS256), so a worker can read its lease but not widen it, and a lease is worth nothing
//! once its step is over: the proxy also requires `jti` to be the task's current assignment.

use std::time::Duration;

use envelope::Role;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::state::Risk;

/// The issuer every lease names.
pub const ISSUER: &str = "agentfleet-orchestrator";

/// One granted action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The action (`llm.complete`).
    pub action: String,
    /// Its level in the risk matrix.
    pub risk: Risk,
}

/// The lease's claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseClaims {
    /// [`ISSUER`].
    pub iss: String,
    /// `task:<id>`.
    pub sub: String,
    /// The assignment envelope's id: the step this lease is for.
    pub jti: Uuid,
    /// The task.
    pub task: Uuid,
    /// The role the step was assigned to.
    pub role: Role,
    /// The workspace the step may touch.
    pub workspace: String,
    /// Repository paths the task may change (empty: any).
    #[serde(default)]
    pub scope: Vec<String>,
    /// The task's risk level: workers pick the sandbox runtime by it (gVisor for the
    /// riskier levels where it is installed).
    pub risk: Risk,
    /// Actions granted.
    pub actions: Vec<Grant>,
    /// Tokens the task may use in all (its risk level's limit).
    pub max_tokens: u64,
    /// Money the task may spend in all, micro-dollars.
    pub max_cost_micro_usd: u64,
    /// Issued at, Unix seconds.
    pub iat: u64,
    /// Expires at, Unix seconds.
    pub exp: u64,
}

impl LeaseClaims {
    /// The grant for `action`, if any.
    pub fn grant(&self, action: &str) -> Option<&Grant> {
        self.actions.iter().find(|g| g.action == action)
    }
}

/// Why a presented lease is refused; `code()` goes back to the worker and into the audit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// No lease on the request.
    #[error("the request carries no capability lease")]
    Missing,
    /// Bad signature, malformed, wrong issuer or algorithm.
    #[error("the capability lease is invalid: {0}")]
    Invalid(String),
    /// Past `exp`.
    #[error("the capability lease has expired")]
    Expired,
}

impl LeaseError {
    /// Stable reason code.
    pub fn code(&self) -> &'static str {
        match self {
            LeaseError::Missing => "lease_missing",
            LeaseError::Invalid(_) => "lease_invalid",
            LeaseError::Expired => "lease_expired",
        }
    }
}

/// Mints and checks leases with the orchestrator's lease secret.
#[derive(Clone)]
pub struct LeaseKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl: Duration,
}

impl std::fmt::Debug for LeaseKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseKeys").field("ttl", &self.ttl).finish_non_exhaustive()
    }
}

/// The lease secret is unusable.
#[derive(Debug, thiserror::Error)]
#[error("lease secret: {0}")]
pub struct LeaseKeyError(String);

impl LeaseKeys {
    /// Keys from `secret` (at least 32 bytes); leases live `ttl`.
    pub fn new(secret: &SecretString, ttl: Duration) -> Result<Self, LeaseKeyError> {
        let bytes = secret.expose_secret().trim().as_bytes();
        if bytes.len() < 32 {
            return Err(LeaseKeyError(
                "must be at least 32 characters; write random bytes, e.g. `openssl rand -hex 32`".into(),
            ));
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "iss", "sub", "jti"]);
        validation.leeway = 5;
        Ok(Self {
            encoding: EncodingKey::from_secret(bytes),
            decoding: DecodingKey::from_secret(bytes),
            validation,
            ttl,
        })
    }

    /// How long a lease lives.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Signs `claims`.
    pub fn mint(&self, claims: &LeaseClaims) -> Result<String, jsonwebtoken::errors::Error> {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
    }

    /// Checks signature, issuer and expiry; returns the claims.
    pub fn check(&self, token: Option<&str>) -> Result<LeaseClaims, LeaseError> {
        let token = token.ok_or(LeaseError::Missing)?;
        jsonwebtoken::decode::<LeaseClaims>(token, &self.decoding, &self.validation).map(|d| d.claims).map_err(|e| {
            match e.kind() {
                ErrorKind::ExpiredSignature => LeaseError::Expired,
                // The error's text never contains the secret; it may name a claim.
                other => LeaseError::Invalid(format!("{other:?}").chars().take(120).collect()),
            }
        })
    }
}

/// Mints the lease of each assignment: the keys, the risk matrix's grants and limits, and
/// the ledger's per-task limits (a lease never allows more than the ledger would).
#[derive(Debug, Clone)]
pub struct LeaseIssuer {
    /// Signing keys.
    pub keys: LeaseKeys,
    /// Grants per role, limits per risk level.
    pub matrix: std::sync::Arc<crate::risk::RiskMatrix>,
    /// The ledger's per-task token limit.
    pub per_task_tokens: u64,
    /// The ledger's per-task money limit, micro-dollars.
    pub per_task_micro_usd: u64,
}

impl LeaseIssuer {
    /// The lease for assignment `jti` of `task` (risk `risk`) to `role`.
    #[allow(clippy::too_many_arguments)]
    pub fn issue(
        &self,
        jti: Uuid,
        task: Uuid,
        role: Role,
        workspace: &str,
        scope: &[String],
        risk: Risk,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        let now = chrono::Utc::now().timestamp().max(0) as u64;
        let level = self.matrix.level(risk);
        let claims = LeaseClaims {
            iss: ISSUER.into(),
            sub: format!("task:{task}"),
            jti,
            task,
            role,
            workspace: workspace.to_owned(),
            scope: scope.to_vec(),
            risk,
            actions: self.matrix.grants(role).into_iter().map(|(action, risk)| Grant { action, risk }).collect(),
            max_tokens: level.token_limit.min(self.per_task_tokens),
            max_cost_micro_usd: level.cost_limit_micro_usd.min(self.per_task_micro_usd),
            iat: now,
            exp: now + self.keys.ttl().as_secs(),
        };
        self.keys.mint(&claims)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn keys(secret: &str) -> LeaseKeys {
        LeaseKeys::new(&SecretString::from(secret.to_owned()), Duration::from_secs(600)).expect("keys")
    }

    fn claims(exp_from_now: i64) -> LeaseClaims {
        let now = chrono::Utc::now().timestamp();
        let task = Uuid::now_v7();
        LeaseClaims {
            iss: ISSUER.into(),
            sub: format!("task:{task}"),
            jti: Uuid::now_v7(),
            task,
            role: Role::Dev,
            workspace: format!("/workspace/task-{task}"),
            scope: vec!["src/".into()],
            risk: Risk::Low,
            actions: vec![Grant { action: "llm.complete".into(), risk: Risk::Low }],
            max_tokens: 10_000,
            max_cost_micro_usd: 500_000,
            iat: now as u64,
            exp: (now + exp_from_now) as u64,
        }
    }

    #[test]
    fn a_minted_lease_checks_out() {
        let k = keys("0123456789abcdef0123456789abcdef");
        let c = claims(60);
        let token = k.mint(&c).expect("mint");
        assert_eq!(k.check(Some(&token)).expect("check"), c);
        assert!(c.grant("llm.complete").is_some());
        assert!(c.grant("git.push_branch").is_none());
    }

    #[test]
    fn forged_expired_and_missing_leases_are_refused() {
        let k = keys("0123456789abcdef0123456789abcdef");
        let other = keys("fedcba9876543210fedcba9876543210");
        let forged = other.mint(&claims(60)).expect("mint");
        assert_eq!(k.check(Some(&forged)).unwrap_err().code(), "lease_invalid");
        let old = k.mint(&claims(-60)).expect("mint");
        assert_eq!(k.check(Some(&old)).unwrap_err(), LeaseError::Expired);
        assert_eq!(k.check(None).unwrap_err(), LeaseError::Missing);
        assert_eq!(k.check(Some("not.a.jwt")).unwrap_err().code(), "lease_invalid");
        // A widened copy: the payload changed, the signature did not.
        let token = k.mint(&claims(60)).expect("mint");
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        let mut wide = claims(60);
        wide.actions.push(Grant { action: "git.push_branch".into(), risk: Risk::Low });
        use base64::Engine as _;
        parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(&wide).expect("json"));
        assert_eq!(k.check(Some(&parts.join("."))).unwrap_err().code(), "lease_invalid");
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(LeaseKeys::new(&SecretString::from("short".to_owned()), Duration::from_secs(1)).is_err());
    }
}
