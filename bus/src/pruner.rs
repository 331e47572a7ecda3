//! Deleting a consumer group's idle consumers.
//!
//! Consumers that restart under new names would otherwise grow a group forever. A
//! [`crate::Consumer`] prunes its own group (`remove_idle_consumers_after`), but
//! `XGROUP DELCONSUMER` also drops the deleted consumer's pending entries, so it is not
//! granted to workers: one compromised worker could delete a peer's consumer and with it the
//! task that peer is working on. Their groups (`fleet:tasks:<role>`) are pruned by the
//! orchestrator with [`run`] instead.

use std::time::Duration;

use redis::aio::ConnectionLike;
use tokio_util::sync::CancellationToken;

use crate::{BusError, reply};

/// Deletes the consumers of `group` on `stream` that have nothing pending and have been
/// idle longer than `idle`, except `keep` (the caller's own). Returns how many it deleted.
pub async fn prune_idle_consumers<C: ConnectionLike + Send>(
    c: &mut C,
    stream: &str,
    group: &str,
    keep: Option<&str>,
    idle: Duration,
) -> Result<usize, BusError> {
    let v: redis::Value = redis::cmd("XINFO").arg("CONSUMERS").arg(stream).arg(group).query_async(c).await?;
    let mut removed = 0;
    for info in reply::info_maps("XINFO CONSUMERS", &v)? {
        let name = reply::info_get(&info, "name").and_then(reply::text).unwrap_or_default();
        let pending = reply::info_get(&info, "pending").and_then(reply::int).unwrap_or(1);
        let idle_ms = reply::info_get(&info, "idle").and_then(reply::int).unwrap_or(0).max(0) as u64;
        if Some(name.as_str()) == keep || pending != 0 || Duration::from_millis(idle_ms) <= idle {
            continue;
        }
        // DELCONSUMER drops the consumer's pending entries too. It had none a moment ago;
        // its answer says how many it dropped, should it have read in between.
        let dropped: i64 =
            redis::cmd("XGROUP").arg("DELCONSUMER").arg(stream).arg(group).arg(&name).query_async(c).await?;
        removed += 1;
        if dropped > 0 {
            tracing::error!(stream, group, consumer = %name, dropped, "Removing an idle consumer dropped entries it had just read; they will not be redelivered, an operator must look at them.");
        } else {
            tracing::info!(stream, group, consumer = %name, "Removed an idle consumer with nothing pending.");
        }
    }
    Ok(removed)
}

/// Every `every` until `shutdown`, prunes each `(stream, group)` of `groups` of consumers
/// idle longer than `idle` with nothing pending. A group that does not exist yet is skipped;
/// other errors are logged and retried next round.
pub async fn run(
    pool: crate::RedisPool,
    groups: Vec<(String, String)>,
    idle: Duration,
    every: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
        let mut c = match pool.get().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot reach Redis to prune idle consumers; retrying.");
                continue;
            }
        };
        for (stream, group) in &groups {
            match prune_idle_consumers(&mut c, stream, group, None, idle).await {
                Ok(_) => {}
                Err(BusError::Redis(m)) if m.contains("NOGROUP") || m.contains("no such key") => {}
                Err(e) => {
                    tracing::warn!(stream = %stream, group = %group, error = %e, "Cannot prune idle consumers; retrying.")
                }
            }
        }
    }
}
