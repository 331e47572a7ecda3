//! Errors of the bus and of handlers.

/// A bus operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Talking to Redis failed (connection lost, timeout, server error). Loops retry these
    /// with backoff; one-shot calls return them.
    #[error("Redis: {0}")]
    Redis(String),
    /// No connection could be obtained from the pool.
    #[error("Redis connection pool: {0}")]
    Pool(String),
    /// Redis answered something this code does not understand.
    #[error("unexpected Redis reply to {command}: {detail}")]
    Reply {
        /// The command.
        command: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The envelope could not be sealed (no key for its edge).
    #[error("cannot seal: {0}")]
    Seal(#[from] envelope::KeyError),
    /// The stream's unacknowledged backlog is close to its length cap: publishing more could
    /// make approximate trimming drop unacknowledged entries, so the publish is refused.
    #[error("stream {stream} has {backlog} unacknowledged entries, over 90% of its cap {cap}; retry later")]
    Backpressure {
        /// The stream.
        stream: String,
        /// Its largest per-group backlog.
        backlog: u64,
        /// Its cap.
        cap: u64,
    },
    /// Invalid configuration.
    #[error("invalid bus configuration: {0}")]
    Config(String),
}

impl From<redis::RedisError> for BusError {
    fn from(e: redis::RedisError) -> Self {
        BusError::Redis(crate::redact_redis_error(&e))
    }
}

impl From<deadpool_redis::PoolError> for BusError {
    fn from(e: deadpool_redis::PoolError) -> Self {
        BusError::Pool(e.to_string().chars().take(300).collect())
    }
}

/// A handler's failure.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Worth retrying (a dependency is down): the entry stays pending and is retried with
    /// backoff until Redis's delivery counter reaches the limit, then dead-lettered.
    #[error("{0}")]
    Transient(String),
    /// Retrying can't help (the content can't be acted on): dead-lettered at once.
    #[error("{0}")]
    Permanent(String),
}
