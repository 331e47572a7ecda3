//! Connections to one Redis server or to a Redis Cluster, behind one type.
//!
//! Every process talks to Redis through a [`RedisPool`] and the [`Conn`]s it hands out. For a
//! single server (the default) that is a deadpool of multiplexed connections. For a cluster
//! (a `redis+cluster://` or `rediss+cluster://` URL, see [`crate::RedisEndpoint`]) it is the
//! `redis` crate's cluster client, which follows the slot map, `MOVED` and `ASK`, and finds
//! the new primary after a failover.
//!
//! A cluster refuses a pipeline whose keys live in more than one hash slot. The bus's
//! pipelines are not transactions (none is `MULTI`), so [`Conn`] splits such a pipeline into
//! runs of consecutive commands on one slot and sends the runs one after the other, in
//! order: a settle that copies an entry to `fleet:dlq` and then acknowledges it on its own
//! stream still acknowledges only after the copy exists. Keys that the hot path touches
//! together carry the stream's hash tag (see [`crate::names::seen_key`]), so a consumer's
//! batch stays one round trip.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::Slot;
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// Where connections come from: a pool for one server, or the cluster client; and how many
/// replicas a publish waits for (the URL's `wait_replicas`, see [`crate::RedisEndpoint`]).
#[derive(Clone)]
pub struct RedisPool {
    kind: PoolKind,
    wait: Option<crate::endpoint::Wait>,
}

#[derive(Clone)]
enum PoolKind {
    /// One Redis server.
    Single(deadpool_redis::Pool),
    /// A Redis Cluster.
    Cluster(Arc<ClusterPool>),
}

impl std::fmt::Debug for RedisPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            PoolKind::Single(_) => "single",
            PoolKind::Cluster(_) => "cluster",
        };
        f.debug_struct("RedisPool").field("kind", &kind).field("wait", &self.wait).finish()
    }
}

/// The cluster client and the connection shared by short commands.
pub struct ClusterPool {
    /// Builds connections; it holds the seed nodes and the credentials.
    client: ClusterClient,
    /// One multiplexed cluster connection for every short command of the process, made on
    /// first use; blocking reads get their own (see [`RedisPool::dedicated`]).
    shared: tokio::sync::Mutex<Option<ClusterConnection>>,
}

impl ClusterPool {
    pub(crate) fn new(client: ClusterClient) -> Self {
        Self { client, shared: tokio::sync::Mutex::new(None) }
    }
}

impl std::fmt::Debug for ClusterPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterPool")
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Pooled(_) => "Conn::Pooled",
            Self::Single(_) => "Conn::Single",
            Self::Cluster(_) => "Conn::Cluster",
        })
    }
}

/// The error of [`RedisPool::get`] and [`RedisPool::dedicated`].
pub type RedisPoolError = deadpool_redis::PoolError;

fn backend(e: redis::RedisError) -> deadpool_redis::PoolError {
    deadpool_redis::PoolError::Backend(e)
}

impl RedisPool {
    pub(crate) fn single(pool: deadpool_redis::Pool, wait: Option<crate::endpoint::Wait>) -> Self {
        Self { kind: PoolKind::Single(pool), wait }
    }

    pub(crate) fn cluster(pool: ClusterPool, wait: Option<crate::endpoint::Wait>) -> Self {
        Self { kind: PoolKind::Cluster(Arc::new(pool)), wait }
    }

    /// The replicas a publish through this pool waits for, and for how long, when the URL
    /// asked for it.
    pub fn wait(&self) -> Option<crate::endpoint::Wait> {
        self.wait
    }

    /// A connection for short commands. For one server it goes back to the pool when
    /// dropped; for a cluster it is the process's shared multiplexed connection.
    pub async fn get(&self) -> Result<Conn, deadpool_redis::PoolError> {
        match &self.kind {
            PoolKind::Single(p) => Ok(Conn::Pooled(p.get().await?)),
            PoolKind::Cluster(c) => {
                let mut shared = c.shared.lock().await;
                if let Some(conn) = shared.as_ref() {
                    return Ok(Conn::Cluster(conn.clone()));
                }
                let conn = c.client.get_async_connection().await.map_err(backend)?;
                *shared = Some(conn.clone());
                Ok(Conn::Cluster(conn))
            }
        }
    }

    /// A connection of the caller's own, for blocking reads (`XREADGROUP BLOCK` holds up
    /// every later command on its connection) and for loops that keep one connection.
    pub async fn dedicated(&self) -> Result<Conn, deadpool_redis::PoolError> {
        match &self.kind {
            PoolKind::Single(p) => Ok(Conn::Single(deadpool_redis::Connection::take(p.get().await?))),
            PoolKind::Cluster(c) => Ok(Conn::Cluster(c.client.get_async_connection().await.map_err(backend)?)),
        }
    }

    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.kind, PoolKind::Cluster(_))
    }
}

/// A connection to one server or to a cluster; `redis` commands, pipelines and scripts run
/// on it as on any connection.
pub enum Conn {
    /// Borrowed from the pool; returned when dropped.
    Pooled(deadpool_redis::Connection),
    /// Owned: taken out of the pool for good.
    Single(MultiplexedConnection),
    /// A cluster connection (multiplexed to every node).
    Cluster(ClusterConnection),
}

impl Clone for Conn {
    /// A clone shares the multiplexed connection underneath; a pooled one is cloned into an
    /// owned handle on the same socket.
    fn clone(&self) -> Self {
        match self {
            Self::Pooled(c) => Self::Single(MultiplexedConnection::clone(c)),
            Self::Single(c) => Self::Single(c.clone()),
            Self::Cluster(c) => Self::Cluster(c.clone()),
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Pooled(c) => c.req_packed_command(cmd),
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Pooled(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => {
                let runs = slot_runs(pipeline);
                // One slot (or a transaction, whose offset/count say so): as it is. A
                // transaction over several slots is refused by the cluster, as it should be.
                if runs.len() <= 1 || offset != 0 || count != pipeline.len() {
                    return c.req_packed_commands(pipeline, offset, count);
                }
                Box::pin(async move {
                    let mut values = Vec::with_capacity(pipeline.len());
                    for run in runs {
                        let mut sub = redis::pipe();
                        for cmd in run {
                            sub.add_command(cmd.clone());
                        }
                        values.extend(c.req_packed_commands(&sub, 0, sub.len()).await?);
                    }
                    Ok(values)
                })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Pooled(c) => c.get_db(),
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// The pipeline's commands cut into runs of consecutive commands on one hash slot. A
/// command without a key (`WAIT`, `PING`) joins the run before it, so a `WAIT` after an
/// `XADD` goes to the node that took the write.
fn slot_runs(pipeline: &Pipeline) -> Vec<Vec<&Cmd>> {
    let mut runs: Vec<(Option<Slot>, Vec<&Cmd>)> = Vec::new();
    for cmd in pipeline.cmd_iter() {
        let slot = key_of(cmd).map(|k| slot_of(&k));
        match (runs.last_mut(), slot) {
            (Some((run_slot, run)), s) if s.is_none() || *run_slot == s || run_slot.is_none() => {
                if run_slot.is_none() {
                    *run_slot = s;
                }
                run.push(cmd);
            }
            _ => runs.push((slot, vec![cmd])),
        }
    }
    runs.into_iter().map(|(_, run)| run).collect()
}

/// The hash slot of `key` (its `{tag}`, when it has one).
pub fn slot_of(key: &[u8]) -> Slot {
    Slot::for_key(key)
}

/// The first key a command touches, for the commands the fleet pipelines; `None` for a
/// command without one.
fn key_of(cmd: &Cmd) -> Option<Vec<u8>> {
    let args: Vec<&[u8]> = cmd
        .args_iter()
        .filter_map(|a| match a {
            redis::Arg::Simple(b) => Some(b),
            _ => None,
        })
        .collect();
    let name = args.first()?.to_ascii_uppercase();
    match name.as_slice() {
        b"WAIT" | b"WAITAOF" | b"PING" | b"ECHO" | b"SCRIPT" | b"INFO" | b"CLIENT" | b"ACL" | b"CLUSTER" | b"TIME"
        | b"DBSIZE" | b"CONFIG" | b"MULTI" | b"EXEC" | b"DISCARD" | b"FUNCTION" | b"FLUSHALL" | b"FLUSHDB" => None,
        b"XINFO" | b"XGROUP" | b"OBJECT" | b"MEMORY" => args.get(2).map(|k| k.to_vec()),
        b"EVAL" | b"EVALSHA" | b"EVAL_RO" | b"EVALSHA_RO" | b"FCALL" | b"FCALL_RO" => {
            let n: usize = std::str::from_utf8(args.get(2)?).ok()?.parse().ok()?;
            if n == 0 { None } else { args.get(3).map(|k| k.to_vec()) }
        }
        b"XREAD" | b"XREADGROUP" => {
            let at = args.iter().position(|a| a.eq_ignore_ascii_case(b"STREAMS"))?;
            args.get(at + 1).map(|k| k.to_vec())
        }
        _ => args.get(1).map(|k| k.to_vec()),
    }
}

/// How long a cluster client waits for a node, and for a reply to a blocking read of up to
/// `longest_block`.
pub(crate) fn cluster_client(
    seeds: Vec<redis::ConnectionInfo>,
    longest_block: Duration,
    certs: Option<redis::TlsCertificates>,
) -> Result<ClusterClient, redis::RedisError> {
    let mut b = redis::cluster::ClusterClientBuilder::new(seeds)
        .connection_timeout(Duration::from_secs(2))
        .response_timeout(longest_block + Duration::from_secs(5));
    if let Some(certs) = certs {
        b = b.certs(certs);
    }
    b.build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipelines_split_into_ordered_runs_of_one_slot_with_keyless_commands_kept_in_place() {
        let mut p = redis::pipe();
        p.cmd("SET").arg("fleet:seen:{fleet:tasks:dev}:dev:1").arg("x");
        p.cmd("SET").arg("fleet:seen:{fleet:tasks:dev}:dev:2").arg("x");
        p.cmd("XADD").arg("fleet:dlq").arg("*").arg("a").arg("b");
        p.cmd("WAIT").arg(1).arg(100);
        p.cmd("XACK").arg("fleet:tasks:dev").arg("dev").arg("1-0");
        let runs = slot_runs(&p);
        let sizes: Vec<usize> = runs.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![2, 2, 1], "the tagged keys share the stream's slot; WAIT stays with its XADD");
        assert_eq!(slot_of(b"fleet:seen:{fleet:tasks:dev}:dev:1"), slot_of(b"fleet:tasks:dev"));
        // Known slots (Redis's CLUSTER KEYSLOT): "foo" is 12182, "{user1000}.following" 3443.
        assert_eq!(Some(slot_of(b"foo")), Slot::new(12182));
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
    }

    #[test]
    fn keys_are_found_where_each_command_puts_them() {
        let k = |c: &Cmd| key_of(c).map(|k| String::from_utf8(k).unwrap());
        assert_eq!(k(redis::cmd("XINFO").arg("GROUPS").arg("s")), Some("s".into()));
        assert_eq!(k(redis::cmd("EVALSHA").arg("abc").arg(2).arg("k1").arg("k2")), Some("k1".into()));
        assert_eq!(k(redis::cmd("EVALSHA").arg("abc").arg(0)), None);
        assert_eq!(
            k(redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg("g")
                .arg("c")
                .arg("COUNT")
                .arg(1)
                .arg("STREAMS")
                .arg("s")
                .arg(">")),
            Some("s".into())
        );
        assert_eq!(k(redis::cmd("WAIT").arg(1).arg(0)), None);
    }
}
