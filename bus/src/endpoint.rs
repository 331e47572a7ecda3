//! Where Redis is: its URL (a secret: it may carry a password) and, for `rediss://`, the
//! certificate authority that signs the server's certificate.

use std::path::Path;

use secrecy::{ExposeSecret, SecretString};

use crate::BusError;

/// A Redis server to connect to. `Debug` never shows the URL.
#[derive(Clone)]
pub struct RedisEndpoint {
    url: SecretString,
    /// PEM of the CA that signs the server's certificate; `None` trusts the system's roots.
    ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for RedisEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisEndpoint").field("url", &"**REDACTED**").field("ca", &self.ca_pem.is_some()).finish()
    }
}

impl From<SecretString> for RedisEndpoint {
    fn from(url: SecretString) -> Self {
        Self { url, ca_pem: None }
    }
}

impl From<&SecretString> for RedisEndpoint {
    fn from(url: &SecretString) -> Self {
        Self { url: url.clone(), ca_pem: None }
    }
}

impl From<&RedisEndpoint> for RedisEndpoint {
    fn from(e: &RedisEndpoint) -> Self {
        e.clone()
    }
}

impl RedisEndpoint {
    /// `url` (`redis://` or `rediss://`), trusting the CA in the PEM file at `ca_file` when
    /// given. A CA with a plaintext URL is refused: the operator meant TLS.
    pub fn new(url: SecretString, ca_file: Option<&Path>) -> Result<Self, BusError> {
        let tls = url.expose_secret().starts_with("rediss://");
        let ca_pem = match ca_file {
            None => None,
            Some(_) if !tls => {
                return Err(BusError::Config(
                    "a Redis CA file is set but the URL is not rediss://: use rediss:// for TLS, or drop the CA".into(),
                ));
            }
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    BusError::Config(format!("cannot read the Redis CA file '{}': {e}", path.display()))
                })?;
                if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
                    return Err(BusError::Config(format!(
                        "the Redis CA file '{}' holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                        path.display()
                    )));
                }
                Some(pem)
            }
        };
        let endpoint = Self { url, ca_pem };
        endpoint.client()?;
        Ok(endpoint)
    }

    /// Whether the connection is TLS (`rediss://`).
    pub fn is_tls(&self) -> bool {
        self.url.expose_secret().starts_with("rediss://")
    }

    /// A client for this server (TLS with the configured CA for `rediss://`).
    pub fn client(&self) -> Result<redis::Client, BusError> {
        let invalid =
            |e: redis::RedisError| BusError::Config(format!("invalid Redis URL: {}", crate::redact_redis_error(&e)));
        match &self.ca_pem {
            None => redis::Client::open(self.url.expose_secret()).map_err(invalid),
            Some(pem) => redis::Client::build_with_tls(
                self.url.expose_secret(),
                redis::TlsCertificates { client_tls: None, root_cert: Some(pem.clone()) },
            )
            .map_err(invalid),
        }
    }

    /// The connection settings, TLS parameters included.
    pub fn connection_info(&self) -> Result<redis::ConnectionInfo, BusError> {
        Ok(self.client()?.get_connection_info().clone())
    }
}
