//! [`RedisCluster`]: a real Redis Cluster of three primaries and three replicas on loopback,
//! made of [`RedisServer`]s and joined with `redis-cli --cluster create`.
//!
//! Node timeout is one second, so a killed primary is replaced by its replica within a few
//! seconds. Every node keeps an append-only file with `appendfsync always`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{HarnessError, RedisServer, binary, process};

/// Primaries, each with one replica.
const PRIMARIES: usize = 3;
/// How long the cluster may take to agree on its slots and replicate after creation.
const FORM_TIMEOUT: Duration = Duration::from_secs(90);

/// Options for a [`RedisCluster`].
#[derive(Debug, Clone, Default)]
#[must_use = "a builder does nothing until `start` is called"]
pub struct RedisClusterBuilder {
    /// Loaded by every node; then `admin` must be a user of it with every permission.
    acl_file: Option<PathBuf>,
    /// The user `redis-cli` and the replicas authenticate as: (name, password).
    admin: Option<(String, String)>,
}

impl RedisClusterBuilder {
    /// Every node loads the users of `path`; `redis-cli` and the replicas' links to their
    /// primaries log in as `user` (which must hold every permission) with `password`.
    pub fn acl_file(mut self, path: impl Into<PathBuf>, user: &str, password: &str) -> Self {
        self.acl_file = Some(path.into());
        self.admin = Some((user.to_owned(), password.to_owned()));
        self
    }

    /// Starts six nodes, joins them into a cluster and waits until every slot is served
    /// and every replica is in sync.
    pub fn start(self) -> Result<RedisCluster, HarnessError> {
        let mut nodes = Vec::with_capacity(2 * PRIMARIES);
        for _ in 0..2 * PRIMARIES {
            let cluster_port = process::free_port()?.to_string();
            let mut b = RedisServer::builder().appendonly(true).args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "1000",
                "--cluster-port",
                cluster_port.as_str(),
            ]);
            if let Some(acl) = &self.acl_file {
                b = b.acl_file(acl);
            }
            nodes.push(b.start()?);
        }
        let cluster = RedisCluster { nodes, admin: self.admin };
        if let Some((user, password)) = &cluster.admin {
            // Replicas log in to their primaries as the admin: with the ACL file's
            // `default` user off, a replica without credentials is refused.
            for i in 0..cluster.nodes.len() {
                cluster.cli(i, &["CONFIG", "SET", "masteruser", user])?;
                cluster.cli(i, &["CONFIG", "SET", "masterauth", password])?;
            }
        }
        let mut create = vec!["--cluster".to_owned(), "create".to_owned()];
        create.extend(cluster.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port())));
        create.extend(["--cluster-replicas", "1", "--cluster-yes"].map(String::from));
        cluster.run_cli(None, &create.iter().map(String::as_str).collect::<Vec<_>>())?;
        cluster.wait_formed(FORM_TIMEOUT)?;
        Ok(cluster)
    }
}

/// Six `redis-server`s in cluster mode; dropping it kills them all.
#[derive(Debug)]
pub struct RedisCluster {
    /// The nodes, in the order given to `redis-cli --cluster create` (the first three
    /// start as primaries).
    nodes: Vec<RedisServer>,
    /// See [`RedisClusterBuilder::acl_file`].
    admin: Option<(String, String)>,
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
struct NodeLine {
    port: u16,
    primary: bool,
    failed: bool,
    connected: bool,
    slots: Vec<(u16, u16)>,
}

impl RedisCluster {
    /// Three primaries and three replicas, no ACL file.
    pub fn start() -> Result<Self, HarnessError> {
        Self::builder().start()
    }

    pub fn builder() -> RedisClusterBuilder {
        RedisClusterBuilder::default()
    }

    /// `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,…` with every node as a seed, without
    /// credentials.
    pub fn url(&self) -> String {
        self.url_as(None)
    }

    /// The cluster URL with `user:password@` when given.
    pub fn url_as(&self, credentials: Option<(&str, &str)>) -> String {
        let seeds: Vec<String> = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port())).collect();
        let creds = credentials.map(|(u, p)| format!("{u}:{p}@")).unwrap_or_default();
        format!("redis+cluster://{creds}{}", seeds.join(","))
    }

    /// `redis://127.0.0.1:PORT` of node `i`.
    pub fn node_url(&self, i: usize) -> String {
        self.nodes[i].url()
    }

    /// How many nodes there are.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Never: a cluster has six nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The node that serves `key` as primary now.
    pub fn primary_for(&self, key: &str) -> Result<usize, HarnessError> {
        let slot: u16 = self.cli_any(&["CLUSTER", "KEYSLOT", key])?.trim().parse().map_err(|_| not_ready("KEYSLOT"))?;
        let lines = self.nodes_view()?;
        let port = lines
            .iter()
            .find(|l| l.primary && !l.failed && l.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
            .map(|l| l.port)
            .ok_or_else(|| not_ready(&format!("no live primary serves slot {slot}")))?;
        self.index_of(port)
    }

    /// Kills node `i` with SIGKILL, as a crash would.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Moves the hash slot of `key` to primary `to` the way `redis-cli --cluster reshard`
    /// does, one key at a time with `pause` between keys, so clients meet `ASK` while it
    /// moves and `MOVED` after: `IMPORTING` on the target, `MIGRATING` on the source,
    /// `MIGRATE` of every key, then the new owner announced to every node.
    pub fn migrate_slot_of(&self, key: &str, to: usize, pause: Duration) -> Result<(), HarnessError> {
        let slot = self.cli_any(&["CLUSTER", "KEYSLOT", key])?.trim().to_owned();
        let from = self.primary_for(key)?;
        if from == to {
            return Err(not_ready(&format!("slot {slot} is already on node {to}")));
        }
        let id = |i: usize| self.cli(i, &["CLUSTER", "MYID"]).map(|t| t.trim().to_owned());
        let (from_id, to_id) = (id(from)?, id(to)?);
        self.cli(to, &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id])?;
        self.cli(from, &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id])?;
        let to_port = self.nodes[to].port().to_string();
        loop {
            let keys = self.cli(from, &["CLUSTER", "GETKEYSINSLOT", &slot, "10"])?;
            let keys: Vec<&str> = keys.lines().map(str::trim).filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            for k in keys {
                let mut args = vec!["MIGRATE", "127.0.0.1", to_port.as_str(), k, "0", "5000"];
                if let Some((user, password)) = &self.admin {
                    args.extend(["AUTH2", user.as_str(), password.as_str()]);
                }
                let out = self.cli(from, &args)?;
                if !out.contains("OK") && !out.contains("NOKEY") {
                    return Err(not_ready(&format!("MIGRATE {k}: {out}")));
                }
                std::thread::sleep(pause);
            }
        }
        for i in 0..self.nodes.len() {
            // A node that is down learns the owner from the others' gossip.
            let _ = self.cli(i, &["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]);
        }
        Ok(())
    }

    /// Starts node `i` again on its port with its data and `nodes.conf`: it rejoins the
    /// cluster (as a replica, if it was failed over).
    pub fn restart(&mut self, i: usize) -> Result<(), HarnessError> {
        self.nodes[i].restart()
    }

    /// Waits until some other live node serves `key` as primary, the killed one having been
    /// marked failed, and every slot is served again. Returns the new primary.
    pub fn wait_failover(&self, key: &str, old: usize, within: Duration) -> Result<usize, HarnessError> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(now) = self.primary_for(key)
                && now != old
                && self.cluster_ok_everywhere(Some(old))
            {
                return Ok(now);
            }
            if Instant::now() >= deadline {
                return Err(not_ready(&format!("no failover of node {old} within {within:?}")));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `redis-cli` against node `i` and returns what it printed.
    pub fn cli(&self, i: usize, args: &[&str]) -> Result<String, HarnessError> {
        self.run_cli(Some(self.nodes[i].port()), args)
    }

    fn cli_any(&self, args: &[&str]) -> Result<String, HarnessError> {
        let mut last = None;
        for i in 0..self.nodes.len() {
            match self.cli(i, args) {
                Ok(out) if !out.starts_with("ERR") && !out.contains("Connection refused") => return Ok(out),
                Ok(out) => last = Some(not_ready(&out)),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| not_ready("no node")))
    }

    fn run_cli(&self, port: Option<u16>, args: &[&str]) -> Result<String, HarnessError> {
        let program = binary::resolve(std::path::Path::new("redis-cli"), "redis-server")?;
        let mut cmd = Command::new(&program);
        if let Some(port) = port {
            cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()]);
        }
        if let Some((user, password)) = &self.admin {
            // The password goes in the environment, where `redis-cli` looks for it, not in
            // its arguments.
            cmd.args(["--user", user]).env("REDISCLI_AUTH", password);
        }
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(HarnessError::io(format!("run {}", program.display())))?;
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if !out.status.success() {
            return Err(HarnessError::CommandFailed {
                program: format!("redis-cli {}", args.first().copied().unwrap_or_default()),
                status: out.status,
                output: text,
            });
        }
        Ok(text)
    }

    fn index_of(&self, port: u16) -> Result<usize, HarnessError> {
        self.nodes.iter().position(|n| n.port() == port).ok_or_else(|| not_ready(&format!("unknown port {port}")))
    }

    fn nodes_view(&self) -> Result<Vec<NodeLine>, HarnessError> {
        let text = self.cli_any(&["CLUSTER", "NODES"])?;
        Ok(text.lines().filter_map(parse_node_line).collect())
    }

    fn cluster_ok_everywhere(&self, except: Option<usize>) -> bool {
        (0..self.nodes.len())
            .filter(|i| Some(*i) != except)
            .all(|i| self.cli(i, &["CLUSTER", "INFO"]).is_ok_and(|t| t.contains("cluster_state:ok")))
    }

    fn wait_formed(&self, within: Duration) -> Result<(), HarnessError> {
        let deadline = Instant::now() + within;
        loop {
            let formed = self.cluster_ok_everywhere(None)
                && self.nodes_view().is_ok_and(|lines| {
                    lines.len() == self.nodes.len()
                        && lines.iter().filter(|l| l.primary && !l.slots.is_empty()).count() == PRIMARIES
                        && lines.iter().all(|l| l.connected && !l.failed)
                })
                && (0..self.nodes.len()).all(|i| {
                    self.cli(i, &["INFO", "replication"])
                        .is_ok_and(|t| t.contains("role:master") || t.contains("master_link_status:up"))
                });
            if formed {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let view = self.cli_any(&["CLUSTER", "NODES"]).unwrap_or_default();
                return Err(not_ready(&format!("the cluster did not form within {within:?}:\n{view}")));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn parse_node_line(line: &str) -> Option<NodeLine> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() < 8 {
        return None;
    }
    let port = f[1].split('@').next()?.rsplit(':').next()?.parse().ok()?;
    let flags = f[2];
    let slots = f[8..]
        .iter()
        .filter(|s| !s.starts_with('['))
        .filter_map(|s| match s.split_once('-') {
            Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
            None => s.parse().ok().map(|n| (n, n)),
        })
        .collect();
    Some(NodeLine {
        port,
        primary: flags.contains("master"),
        failed: flags.contains("fail") && !flags.contains("fail?"),
        connected: f[7] == "connected",
        slots,
    })
}

fn not_ready(detail: &str) -> HarnessError {
    HarnessError::ClusterNotReady { detail: detail.to_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_nodes_lines_parse() {
        let line = "07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004 slave \
                    e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected";
        let l = parse_node_line(line).unwrap();
        assert_eq!((l.port, l.primary, l.failed, l.connected), (30004, false, false, true));
        let line = "e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001 myself,master - 0 0 1 \
                    connected 0-5460 7000 [5461->-abc]";
        let l = parse_node_line(line).unwrap();
        assert_eq!(l.slots, vec![(0, 5460), (7000, 7000)]);
        assert!(l.primary);
        let failed = "x 127.0.0.1:1@2 master,fail - 0 0 1 disconnected";
        assert!(parse_node_line(failed).unwrap().failed);
    }
}
