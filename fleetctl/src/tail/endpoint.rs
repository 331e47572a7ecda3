//! [`RedisEndpoint`]: where `tail` reads from, named in messages by `host:port` only.
//!
//! The Redis URL may carry a password (`redis://operator:PASSWORD@host:6379`), so it is a
//! [`SecretString`] exposed only here, to build the client; messages say `host:port`, and
//! every Redis error text is passed through [`RedisEndpoint::describe`], which cuts it and
//! redacts the password should it ever appear.

use std::fmt;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ConnectionAddr, RetryMethod};
use secrecy::{ExposeSecret, SecretString};

use crate::exit::UsageError;

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Added to the `XREAD BLOCK` time for the response timeout, so a blocking read is never
/// cut short, while a server that vanished without closing the socket is still noticed.
const RESPONSE_MARGIN: Duration = Duration::from_secs(5);

/// A Redis server to read from.
pub struct RedisEndpoint {
    /// Built from the URL; holds the credentials.
    client: redis::Client,
    /// `host:port` (or `unix:PATH`): the only way messages name the server.
    address: String,
    /// The URL's password, if any, so that an error text quoting it can be redacted.
    password: Option<SecretString>,
    /// Timeouts suited to blocking reads of up to the configured block time.
    config: AsyncConnectionConfig,
}

impl fmt::Debug for RedisEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisEndpoint").field("address", &self.address).finish_non_exhaustive()
    }
}

impl RedisEndpoint {
    /// Parses `url`; `block` is the longest `XREAD BLOCK` that will be sent. An invalid URL
    /// is a [`UsageError`] that does not quote it.
    pub fn parse(url: &SecretString, ca: Option<&std::path::Path>, block: Duration) -> Result<Self, UsageError> {
        let invalid = |why: String| {
            UsageError::new(format!(
                "invalid Redis URL in --redis or FLEET_REDIS_URL (not shown: it may hold a password): {why}; \
                 expected redis://[USER:PASSWORD@]HOST[:PORT]"
            ))
        };
        let client =
            bus::RedisEndpoint::new(url.clone(), ca).and_then(|e| e.client()).map_err(|e| invalid(e.to_string()))?;
        let info = client.get_connection_info();
        let address = match info.addr() {
            ConnectionAddr::Tcp(host, port) => format!("{host}:{port}"),
            ConnectionAddr::Unix(path) => format!("unix:{}", path.display()),
            other if !other.is_supported() => return Err(invalid("this build of fleetctl has no TLS support".into())),
            ConnectionAddr::TcpTls { host, port, .. } => format!("{host}:{port} (TLS)"),
            _ => return Err(invalid("unsupported kind of address".into())),
        };
        let password = info.redis_settings().password().filter(|p| !p.is_empty()).map(SecretString::from);
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(block + RESPONSE_MARGIN));
        Ok(Self { client, address, password, config })
    }

    /// `host:port`, for messages.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// A new connection (authenticated, when the URL has credentials).
    pub async fn connect(&self) -> Result<MultiplexedConnection, redis::RedisError> {
        self.client.get_multiplexed_async_connection_with_config(&self.config).await
    }

    /// A Redis error's text, cut to a sane length, with the URL's password redacted in case
    /// some layer ever quotes it.
    pub fn describe(&self, err: &redis::RedisError) -> String {
        let mut text: String = err.to_string().chars().take(300).collect();
        if let Some(p) = &self.password {
            text = text.replace(p.expose_secret(), "**REDACTED**");
        }
        text
    }
}

/// Whether trying again later can help: a lost connection, a timeout, a server that is
/// still loading its data. Refused credentials and permissions can't.
pub(crate) fn retryable(err: &redis::RedisError) -> bool {
    if err.kind() == redis::ErrorKind::AuthenticationFailed || err.code() == Some("NOPERM") {
        return false;
    }
    !matches!(err.retry_method(), RetryMethod::NoRetry)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn messages_name_host_and_port_only() {
        let url = SecretString::from("redis://operator:hunter2-secret@10.0.0.7:6380/0");
        let e = RedisEndpoint::parse(&url, None, Duration::from_secs(1)).unwrap();
        assert_eq!(e.address(), "10.0.0.7:6380");
        assert!(!format!("{e:?}").contains("hunter2"));
        let err = redis::RedisError::from((redis::ErrorKind::Io, "boom", "hunter2-secret".to_owned()));
        let text = e.describe(&err);
        assert!(!text.contains("hunter2") && text.contains("**REDACTED**"), "{text}");
    }

    #[test]
    fn an_invalid_url_is_not_echoed() {
        let url = SecretString::from("http://operator:hunter2@somewhere");
        let err = RedisEndpoint::parse(&url, None, Duration::from_secs(1)).unwrap_err().to_string();
        assert!(err.starts_with("invalid Redis URL") && !err.contains("hunter2"), "{err}");
    }
}
