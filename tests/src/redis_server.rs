//! [`RedisServer`]: a real `redis-server` on a free loopback port, in its own directory.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::HarnessError;
use crate::binary;
use crate::process;
use crate::scratch::ScratchDir;
use rustix::process::Signal;

const SERVICE: &str = "redis-server";
const PACKAGE: &str = "redis-server";

/// Redis logs this (at the default `notice` level) once it has loaded its data and
/// listens on every configured socket.
const READY_LINE: &str = "Ready to accept connections";

/// A port race needs another process to grab the port in the few milliseconds between
/// the harness freeing it and Redis binding it; five losses in a row means something
/// else is wrong.
const PORT_ATTEMPTS: u32 = 5;

const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Long enough for Redis to flush its AOF on SIGTERM, short enough not to stall a test.
const STOP_GRACE: Duration = Duration::from_secs(10);

const LOG_FILE: &str = "redis.log";

/// Options for a [`RedisServer`]; [`RedisServer::start`] uses the defaults.
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `start` is called"]
pub struct RedisServerBuilder {
    /// Name (looked up in `PATH`) or path of the server program. Settable so the
    /// harness's own tests can show what a missing binary looks like without touching
    /// the process environment.
    binary: PathBuf,
    /// Crash tests need `appendonly yes`, or a restarted server has nothing to recover.
    appendonly: bool,
    /// Tests of the per-role Redis users load those users from an ACL file.
    acl_file: Option<PathBuf>,
    /// Passed after the harness's own arguments, so they can override them.
    extra_args: Vec<OsString>,
    /// TLS on a second port (the plaintext one stays, for the readiness probe), with this
    /// certificate; the port is chosen on the first start and kept across restarts.
    tls: Option<(crate::tls::ServerCert, Option<u16>)>,
    /// Generous, because on 2 cores many test processes start servers at once.
    startup_timeout: Duration,
}

impl Default for RedisServerBuilder {
    fn default() -> Self {
        Self {
            binary: PathBuf::from("redis-server"),
            appendonly: false,
            acl_file: None,
            extra_args: Vec::new(),
            tls: None,
            startup_timeout: DEFAULT_STARTUP_TIMEOUT,
        }
    }
}

impl RedisServerBuilder {
    /// The server program: a bare name is looked up in `PATH`, anything with a `/` is a
    /// path. Defaults to `redis-server`.
    pub fn binary(mut self, program: impl Into<PathBuf>) -> Self {
        self.binary = program.into();
        self
    }

    /// `appendonly yes`: every acknowledged write survives [`RedisServer::kill`] followed
    /// by [`RedisServer::restart`]. Off by default, like `save`, so that a plain test
    /// server never touches the disk.
    pub fn appendonly(mut self, enabled: bool) -> Self {
        self.appendonly = enabled;
        self
    }

    /// Loads users from an ACL file (`aclfile`). A relative path is taken relative to the
    /// current directory, not to the server's data directory.
    pub fn acl_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.acl_file = Some(path.into());
        self
    }

    /// Sets one configuration directive, e.g. `.config("maxmemory", "10mb")`. The value
    /// is passed as a single argument.
    pub fn config(mut self, name: &str, value: impl Into<OsString>) -> Self {
        self.extra_args.push(format!("--{name}").into());
        self.extra_args.push(value.into());
        self
    }

    /// Appends raw command-line arguments, after the harness's own.
    ///
    /// Leave `loglevel` at `notice` or more verbose: the harness waits for a line that
    /// Redis logs at that level.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.extra_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// How long a start may take before it fails. Defaults to 60 seconds.
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    /// Also serves TLS with `cert` on a port of its own ([`RedisServer::tls_url`]).
    pub fn tls(mut self, cert: crate::tls::ServerCert) -> Self {
        self.tls = Some((cert, None));
        self
    }

    /// Starts the server and waits until it answers `PING`.
    ///
    /// Blocks for as long as that takes (tens of milliseconds, usually).
    pub fn start(mut self) -> Result<RedisServer, HarnessError> {
        self.binary = binary::resolve(&self.binary, PACKAGE)?;
        if let Some(acl_file) = &self.acl_file {
            // Redis reads the ACL file after it has changed into its data directory.
            self.acl_file = Some(
                std::path::absolute(acl_file)
                    .map_err(HarnessError::io(format!("make the ACL file path {} absolute", acl_file.display())))?,
            );
        }
        let dir = ScratchDir::create("redis")?;
        if let Some((cert, port)) = &mut self.tls {
            for (name, pem) in [("tls.crt", &cert.cert_pem), ("tls.key", &cert.key_pem)] {
                let path = dir.path().join(name);
                std::fs::write(&path, pem).map_err(HarnessError::io(format!("write {}", path.display())))?;
            }
            *port = Some(process::free_port()?);
        }
        let (child, port) = launch(&self, dir.path(), None)?;
        Ok(RedisServer { builder: self, port, dir, child: Some(child) })
    }
}

/// A `redis-server` process listening on `127.0.0.1` on a port of its own, with its data
/// and log in a directory of its own.
///
/// Dropping it kills the process and removes the directory.
///
/// ```no_run
/// # fn main() -> Result<(), fleet_testkit::HarnessError> {
/// let mut redis = fleet_testkit::RedisServer::builder().appendonly(true).start()?;
/// let url = redis.url(); // redis://127.0.0.1:PORT
/// // ... write through `url` ...
/// redis.kill(); // a crash
/// redis.restart()?; // same port, same data directory
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct RedisServer {
    /// Kept, with the binary resolved, so a restart runs the same server the same way.
    builder: RedisServerBuilder,
    /// Chosen on the first start and kept across restarts, because clients that
    /// reconnect after a crash expect the same address.
    port: u16,
    /// Holds the RDB/AOF files across restarts, and the log; removed on drop.
    dir: ScratchDir,
    /// `None` while stopped.
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server with the default options.
    pub fn start() -> Result<Self, HarnessError> {
        Self::builder().start()
    }

    pub fn builder() -> RedisServerBuilder {
        RedisServerBuilder::default()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`, with no credentials.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `rediss://127.0.0.1:TLS_PORT` when the server was built with [`RedisServerBuilder::tls`].
    pub fn tls_url(&self) -> Option<String> {
        self.builder.tls.as_ref().and_then(|(_, port)| *port).map(|port| format!("rediss://127.0.0.1:{port}"))
    }

    /// The server's working directory (`dir`): RDB and AOF files, and the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The file the server's stdout and stderr go to, across restarts.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join(LOG_FILE)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Shuts the server down cleanly (SIGTERM, which flushes the AOF), killing it if it
    /// takes longer than a few seconds. A no-op when it is not running.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            process::stop(&mut child, Signal::TERM, STOP_GRACE);
        }
    }

    /// Kills the server with SIGKILL, as a crash would. A no-op when it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            process::kill(&mut child);
        }
    }

    /// Stops the server if it is running, then starts it again on the same port with the
    /// same directory and options, and waits until it answers `PING`.
    pub fn restart(&mut self) -> Result<(), HarnessError> {
        self.stop();
        let (child, _) = launch(&self.builder, self.dir.path(), Some(self.port))?;
        self.child = Some(child);
        Ok(())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts the server on `fixed_port`, or on a free port with retries, and waits until
/// it is ready.
fn launch(builder: &RedisServerBuilder, dir: &Path, fixed_port: Option<u16>) -> Result<(Child, u16), HarnessError> {
    let log = dir.join(LOG_FILE);
    let attempts = if fixed_port.is_some() { 1 } else { PORT_ATTEMPTS };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let port = match fixed_port {
            Some(port) => port,
            None => process::free_port()?,
        };
        let (mut child, offset) = spawn(builder, dir, &log, port)?;
        let startup = process::wait_until_ready(&mut child, &log, offset, READY_LINE, builder.startup_timeout, || {
            answers_ping(port)
        })?;
        if process::settle_startup(SERVICE, startup, port, attempt, attempts, builder.startup_timeout, &log, offset)? {
            return Ok((child, port));
        }
    }
}

fn spawn(builder: &RedisServerBuilder, dir: &Path, log: &Path, port: u16) -> Result<(Child, u64), HarnessError> {
    let (stdout, stderr, offset) = process::log_stdio(log)?;
    let mut command = Command::new(&builder.binary);
    command
        .arg("--port")
        .arg(port.to_string())
        .args(["--bind", "127.0.0.1"])
        .arg("--dir")
        .arg(dir)
        // No RDB snapshots: tests that want durability ask for the AOF explicitly.
        .args(["--save", ""])
        .args(["--appendonly", if builder.appendonly { "yes" } else { "no" }])
        // `always`: under `everysec` a busy machine lets Redis postpone the AOF write while a
        // background fsync is slow, and a SIGKILL then loses writes it had acknowledged (seen
        // in CI); the crash tests promise that every acknowledged write survives.
        .args(["--appendfsync", "always"])
        .args(["--daemonize", "no"])
        // To stdout, which is the log file; `notice` is the level that prints READY_LINE.
        .args(["--logfile", "", "--loglevel", "notice"]);
    if let Some(acl_file) = &builder.acl_file {
        command.arg("--aclfile").arg(acl_file);
    }
    if let Some((_, Some(tls_port))) = &builder.tls {
        command
            .arg("--tls-port")
            .arg(tls_port.to_string())
            .arg("--tls-cert-file")
            .arg(dir.join("tls.crt"))
            .arg("--tls-key-file")
            .arg(dir.join("tls.key"))
            // Servers authenticate to clients; clients authenticate with ACL passwords.
            .args(["--tls-auth-clients", "no"]);
    }
    command.args(&builder.extra_args).current_dir(dir).stdin(Stdio::null()).stdout(stdout).stderr(stderr);
    let child = command.spawn().map_err(HarnessError::io(format!("start {}", builder.binary.display())))?;
    Ok((child, offset))
}

/// Whether something on `port` answers `PING` like a Redis server. An authentication
/// error counts: a server whose ACL file locks out the default user is up all the same.
fn answers_ping(port: u16) -> bool {
    const TIMEOUT: Duration = Duration::from_secs(1);
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&address, TIMEOUT) else {
        return false;
    };
    if stream.set_read_timeout(Some(TIMEOUT)).is_err() || stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = String::new();
    if BufReader::new(stream).read_line(&mut reply).is_err() {
        return false;
    }
    ["+PONG", "-NOAUTH", "-NOPERM"].iter().any(|ok| reply.starts_with(ok))
}
