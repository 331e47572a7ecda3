//! Where Redis is: its URL (a secret: it may carry a password) and, for `rediss://`, the
//! certificate authority that signs the server's certificate.
//!
//! A Redis Cluster is named by the scheme `redis+cluster://` (or `rediss+cluster://` for
//! TLS) and one or more seed nodes separated by commas:
//! `redis+cluster://USER:PASSWORD@node-a:6379,node-b:6379`. The client learns the other
//! nodes from any seed that answers, so one seed is enough and more only help when a seed
//! is down at start.

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

/// The scheme suffix that marks a cluster URL.
const CLUSTER_SUFFIX: &str = "+cluster://";

impl std::fmt::Debug for RedisEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisEndpoint")
            .field("url", &"**REDACTED**")
            .field("cluster", &self.is_cluster())
            .field("ca", &self.ca_pem.is_some())
            .finish()
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
        let tls = url.expose_secret().starts_with("rediss://") || url.expose_secret().starts_with("rediss+cluster://");
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
        if endpoint.is_cluster() {
            endpoint.cluster_seeds()?;
        } else {
            endpoint.client()?;
        }
        Ok(endpoint)
    }

    /// Whether the connection is TLS (`rediss://`, `rediss+cluster://`).
    pub fn is_tls(&self) -> bool {
        let url = self.url.expose_secret();
        url.starts_with("rediss://") || url.starts_with("rediss+cluster://")
    }

    /// Whether this names a Redis Cluster (`redis+cluster://`, `rediss+cluster://`).
    pub fn is_cluster(&self) -> bool {
        self.url.expose_secret().split_once("://").is_some_and(|(scheme, _)| scheme.ends_with("+cluster"))
    }

    /// A client for this server (TLS with the configured CA for `rediss://`). A cluster URL
    /// has no single server: it is refused here (use [`crate::pool`]).
    pub fn client(&self) -> Result<redis::Client, BusError> {
        let invalid =
            |e: redis::RedisError| BusError::Config(format!("invalid Redis URL: {}", crate::redact_redis_error(&e)));
        if self.is_cluster() {
            return Err(BusError::Config(
                "this command talks to one Redis server and cannot use a redis+cluster:// URL: \
                 give it the URL of one node (redis:// or rediss://)"
                    .into(),
            ));
        }
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

    /// The seed nodes of a cluster URL, each with the URL's credentials and options.
    pub(crate) fn cluster_seeds(&self) -> Result<Vec<redis::ConnectionInfo>, BusError> {
        use redis::IntoConnectionInfo as _;
        let bad = |why: &str| {
            BusError::Config(format!(
                "invalid Redis Cluster URL ({why}); expected redis+cluster://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]"
            ))
        };
        let url = self.url.expose_secret();
        let (scheme, rest) = url.split_once(CLUSTER_SUFFIX).ok_or_else(|| bad("not a +cluster scheme"))?;
        if scheme != "redis" && scheme != "rediss" {
            return Err(bad("the scheme must be redis+cluster or rediss+cluster"));
        }
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let (creds, hosts) = match authority.rsplit_once('@') {
            Some((c, h)) => (format!("{c}@"), h),
            None => (String::new(), authority),
        };
        let mut seeds = Vec::new();
        for host in hosts.split(',') {
            if host.is_empty() {
                return Err(bad("an empty node in the list"));
            }
            let one = format!("{scheme}://{creds}{host}{tail}");
            // The text of a URL error could quote the password: say which node, not why.
            let info =
                one.as_str().into_connection_info().map_err(|_| bad(&format!("node '{host}' is not HOST:PORT")))?;
            seeds.push(info);
        }
        Ok(seeds)
    }

    /// The CA for a TLS cluster, in the form the cluster client takes.
    pub(crate) fn tls_certificates(&self) -> Option<redis::TlsCertificates> {
        self.ca_pem.as_ref().map(|pem| redis::TlsCertificates { client_tls: None, root_cert: Some(pem.clone()) })
    }
}
