//! Tunables of publishers and consumers.

use std::collections::BTreeMap;
use std::time::Duration;

use envelope::StreamName;

/// How a consumer reads, retries and reclaims.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// The stream to consume.
    pub stream: StreamName,
    /// Consumer group; every group sees every entry once.
    pub group: String,
    /// This consumer's name in the group: stable per process instance, so after a restart
    /// the process finds its own pending entries again.
    pub consumer: String,
    /// Entries per `XREADGROUP`.
    pub batch: usize,
    /// How long one `XREADGROUP` blocks; also bounds how late maintenance runs.
    pub block: Duration,
    /// Entries of another consumer idle this long are taken over (that consumer is presumed
    /// dead). Must exceed the slowest handler by a margin: the entries of a batch waiting for
    /// their turn are claimed afresh between handlers every quarter of this, so one handler
    /// may take up to about three quarters of it.
    pub claim_idle: Duration,
    /// Redis delivery count at which an entry whose handler keeps failing goes to `fleet:dlq`.
    pub max_deliveries: u64,
    /// First retry delay of a failed entry; doubles per delivery up to `retry_max`.
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// How often pending entries are scanned for retries and reclaim.
    pub maintenance_every: Duration,
    /// Other consumers with nothing pending and idle this long are deleted from the group;
    /// `None`: this consumer never deletes any (its Redis user may not run
    /// `XGROUP DELCONSUMER`; workers' groups are pruned by the orchestrator).
    pub remove_idle_consumers_after: Option<Duration>,
    /// How often idle consumers are looked for (`XINFO CONSUMERS`).
    pub prune_every: Duration,
    /// On shutdown, how long a running handler may take to finish.
    pub grace: Duration,
}

impl ConsumerConfig {
    /// Defaults for `stream` read by `group` as `consumer`.
    pub fn new(stream: StreamName, group: impl Into<String>, consumer: impl Into<String>) -> Self {
        Self {
            stream,
            group: group.into(),
            consumer: consumer.into(),
            batch: 128,
            block: Duration::from_millis(1000),
            claim_idle: Duration::from_secs(60),
            max_deliveries: 5,
            retry_base: Duration::from_millis(200),
            retry_max: Duration::from_secs(30),
            maintenance_every: Duration::from_millis(500),
            remove_idle_consumers_after: Some(Duration::from_secs(3600)),
            prune_every: Duration::from_secs(60),
            grace: Duration::from_secs(10),
        }
    }

    /// Retry delay before delivery number `deliveries + 1`.
    pub fn retry_delay(&self, deliveries: u64) -> Duration {
        let doublings = deliveries.saturating_sub(1).min(20) as u32;
        self.retry_base.saturating_mul(1 << doublings).min(self.retry_max)
    }

    pub(crate) fn validate(&self) -> Result<(), crate::BusError> {
        let bad = |m: &str| Err(crate::BusError::Config(m.to_owned()));
        if self.group.is_empty() || self.consumer.is_empty() {
            return bad("group and consumer names must not be empty");
        }
        if self.batch == 0 || self.max_deliveries == 0 {
            return bad("batch and max_deliveries must be at least 1");
        }
        if self.claim_idle <= self.retry_max {
            return bad("claim_idle must exceed retry_max, or live consumers' retries would be stolen");
        }
        Ok(())
    }
}

/// How a publisher caps streams.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    /// Approximate `MAXLEN` per stream; streams not listed use `default_cap`.
    pub caps: BTreeMap<String, u64>,
    /// Cap of streams not in `caps`.
    pub default_cap: u64,
    /// How often a stream's backlog is re-read to decide backpressure.
    pub backlog_check_every: Duration,
    /// Replicas that must hold an entry before a publish counts as done (`WAIT`, sent to
    /// the node that took the write). 0, the default, trusts the primary alone: Redis
    /// replicates asynchronously, so a primary that dies right after answering can take
    /// the entry with it when its replica is promoted. With 1 or more, a publish whose
    /// replicas do not confirm within [`PublisherConfig::wait_timeout`] fails and is
    /// retried (a duplicate that did land carries the same envelope id and is dropped by
    /// consumers).
    pub wait_replicas: u32,
    /// How long a publish waits for [`PublisherConfig::wait_replicas`].
    pub wait_timeout: Duration,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        Self {
            caps: BTreeMap::new(),
            default_cap: 1_000_000,
            backlog_check_every: Duration::from_secs(1),
            wait_replicas: 0,
            wait_timeout: Duration::from_secs(1),
        }
    }
}

impl PublisherConfig {
    /// The cap of `stream`.
    pub fn cap(&self, stream: &str) -> u64 {
        self.caps.get(stream).copied().unwrap_or(self.default_cap)
    }
}
