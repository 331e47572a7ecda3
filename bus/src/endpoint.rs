//! Where Redis is: its URL (a secret: it may carry a password) and, for `rediss://`, the
//! certificate authority that signs the server's certificate.
//!
//! A Redis Cluster is named by the scheme `redis+cluster://` (or `rediss+cluster://` for
//! TLS) and one or more seed nodes separated by commas:
//! `redis+cluster://USER:PASSWORD@node-a:6379,node-b:6379`. The client learns the other
//! nodes from any seed that answers, so one seed is enough and more only help when a seed
//! is down at start.
//!
//! Two query parameters of the URL are the bus's own, and are removed before the URL goes
//! to the `redis` crate: `wait_replicas=N` makes every publish wait until N replicas hold
//! its entries (`WAIT`), and `wait_timeout_ms=M` bounds that wait (default 1000): with
//! them, a primary that dies right after a publish cannot take an acknowledged entry with
//! it (`redis+cluster://…?wait_replicas=1`).

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

/// How many replicas every publish waits for, and how long (the URL's `wait_replicas` and
/// `wait_timeout_ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    /// Replicas that must hold the entries.
    pub replicas: u32,
    /// How long a publish waits for them before it fails (and is retried).
    pub timeout: std::time::Duration,
}

const WAIT_REPLICAS: &str = "wait_replicas";
const WAIT_TIMEOUT_MS: &str = "wait_timeout_ms";
const DEFAULT_WAIT_TIMEOUT_MS: u64 = 1000;

/// `url` without the bus's own query parameters, and those parameters.
fn split_params(url: &str) -> (String, Vec<(&str, &str)>) {
    let Some((base, query)) = url.split_once('?') else { return (url.to_owned(), Vec::new()) };
    let (ours, theirs): (Vec<&str>, Vec<&str>) = query
        .split('&')
        .filter(|p| !p.is_empty())
        .partition(|p| p.split('=').next().is_some_and(|k| k == WAIT_REPLICAS || k == WAIT_TIMEOUT_MS));
    let ours = ours.into_iter().map(|p| p.split_once('=').unwrap_or((p, ""))).collect();
    let url = if theirs.is_empty() { base.to_owned() } else { format!("{base}?{}", theirs.join("&")) };
    (url, ours)
}

/// The `Wait` the parameters ask for, or what is wrong with them.
fn parse_wait(params: &[(&str, &str)]) -> Result<Option<Wait>, String> {
    let mut replicas = None;
    let mut timeout_ms = DEFAULT_WAIT_TIMEOUT_MS;
    for (k, v) in params {
        match *k {
            WAIT_REPLICAS => {
                replicas =
                    Some(v.parse::<u32>().map_err(|_| format!("{WAIT_REPLICAS}={v:?} is not a number of replicas"))?)
            }
            _ => {
                timeout_ms =
                    v.parse::<u64>().ok().filter(|ms| (1..=60_000).contains(ms)).ok_or_else(|| {
                        format!("{WAIT_TIMEOUT_MS}={v:?} is not a number of milliseconds from 1 to 60000")
                    })?
            }
        }
    }
    Ok(replicas
        .filter(|r| *r > 0)
        .map(|replicas| Wait { replicas, timeout: std::time::Duration::from_millis(timeout_ms) }))
}

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
        parse_wait(&split_params(endpoint.url.expose_secret()).1)
            .map_err(|why| BusError::Config(format!("invalid Redis URL option: {why}")))?;
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

    /// The replicas every publish waits for (the URL's `wait_replicas`), if any.
    pub fn wait(&self) -> Option<Wait> {
        parse_wait(&split_params(self.url.expose_secret()).1).ok().flatten()
    }

    /// The URL for the `redis` crate: without the bus's own parameters.
    fn redis_url(&self) -> SecretString {
        SecretString::from(split_params(self.url.expose_secret()).0)
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
        let url = self.redis_url();
        match &self.ca_pem {
            None => redis::Client::open(url.expose_secret()).map_err(invalid),
            Some(pem) => redis::Client::build_with_tls(
                url.expose_secret(),
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
        let url = self.redis_url();
        let (scheme, rest) =
            url.expose_secret().split_once(CLUSTER_SUFFIX).ok_or_else(|| bad("not a +cluster scheme"))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(url: &str) -> Result<RedisEndpoint, BusError> {
        RedisEndpoint::new(SecretString::from(url.to_owned()), None)
    }

    #[test]
    fn cluster_urls_name_their_seeds_with_the_credentials_of_the_url() {
        let e = endpoint("redis+cluster://fleet:s3cret@node-a:7000,node-b:7001/?wait_replicas=1").unwrap();
        assert!(e.is_cluster() && !e.is_tls());
        let seeds = e.cluster_seeds().unwrap();
        let addrs: Vec<String> = seeds.iter().map(|s| s.addr().to_string()).collect();
        assert_eq!(addrs, ["node-a:7000", "node-b:7001"]);
        assert!(seeds.iter().all(|s| s.redis_settings().password() == Some("s3cret")));
        assert_eq!(e.wait(), Some(Wait { replicas: 1, timeout: std::time::Duration::from_secs(1) }));
        assert!(endpoint("rediss+cluster://n:1").unwrap().is_tls());
        // One server: not a cluster, and its client never sees the bus's parameters.
        let one = endpoint("redis://h:6379/?wait_replicas=2&wait_timeout_ms=250").unwrap();
        assert!(!one.is_cluster());
        assert_eq!(one.wait(), Some(Wait { replicas: 2, timeout: std::time::Duration::from_millis(250) }));
        assert_eq!(one.connection_info().unwrap().addr().to_string(), "h:6379");
        assert_eq!(endpoint("redis://h:6379").unwrap().wait(), None);
    }

    #[test]
    fn bad_cluster_urls_and_options_say_what_is_wrong_without_the_password() {
        for (url, says) in [
            ("redis+cluster://u:hunter2@a:1,,b:2", "an empty node"),
            ("redis+cluster://u:hunter2@a:notaport", "is not HOST:PORT"),
            ("memcache+cluster://u:hunter2@a:1", "scheme"),
            ("redis://u:hunter2@h:1/?wait_replicas=many", "wait_replicas"),
            ("redis://u:hunter2@h:1/?wait_replicas=1&wait_timeout_ms=0", "wait_timeout_ms"),
        ] {
            let err = endpoint(url).expect_err(url).to_string();
            assert!(err.contains(says), "{url}: {err}");
            assert!(!err.contains("hunter2"), "{url}: the password leaked: {err}");
        }
        let err = endpoint("redis+cluster://a:1").unwrap().client().expect_err("one server only").to_string();
        assert!(err.contains("redis+cluster://"), "{err}");
    }
}
