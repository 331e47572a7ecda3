//! [`Postgres`]: a real PostgreSQL server on a free loopback port, with a data directory
//! of its own, copied from a cluster that `initdb` made once per machine.

use std::fs::{self, DirBuilder, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, lchown, symlink};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rustix::process::{Signal, geteuid};
use uuid::Uuid;

use crate::HarnessError;
use crate::binary;
use crate::process;
use crate::scratch::ScratchDir;

const SERVICE: &str = "postgres";
const PACKAGE: &str = "postgresql";

/// Debian installs each major version's server programs under `<root>/<version>/bin`,
/// outside `PATH`.
const DEBIAN_ROOT: &str = "/usr/lib/postgresql";

/// The postmaster logs this once it accepts connections. Messages are in English
/// because the template cluster is made with `--locale=C`.
const READY_LINE: &str = "database system is ready to accept connections";

/// Part of the template's directory name: bump it whenever the `initdb` arguments
/// change, so that no machine keeps using a template made the old way.
const TEMPLATE_FORMAT: u32 = 1;

/// See the Redis harness: five lost port races in a row means something else is wrong.
const PORT_ATTEMPTS: u32 = 5;

const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// An immediate shutdown (SIGQUIT) takes milliseconds; past this the postmaster is
/// wedged and gets SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

const LOG_FILE: &str = "postgres.log";

/// Options for a [`Postgres`]; [`Postgres::start`] uses the defaults.
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `start` is called"]
pub struct PostgresBuilder {
    /// Where the PostgreSQL programs are. `None` means the highest version under
    /// `/usr/lib/postgresql`, then `PATH`. Settable so the harness's own tests can show
    /// what a missing binary looks like without touching the process environment.
    bin_dir: Option<PathBuf>,
    /// Passed as `-c name=value` after the harness's own settings, so they override them.
    settings: Vec<(String, String)>,
    /// Generous, because on 2 cores many test processes start servers at once.
    startup_timeout: Duration,
    /// `ssl = on` with this certificate (TCP clients may then ask for TLS).
    tls: Option<crate::tls::ServerCert>,
}

impl Default for PostgresBuilder {
    fn default() -> Self {
        Self { bin_dir: None, settings: Vec::new(), startup_timeout: DEFAULT_STARTUP_TIMEOUT, tls: None }
    }
}

impl PostgresBuilder {
    /// Looks for `initdb`, `postgres`, `psql` and `pg_isready` in this directory only.
    pub fn bin_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.bin_dir = Some(dir.into());
        self
    }

    /// A server setting, e.g. `.setting("max_connections", "200")`.
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((name.into(), value.into()));
        self
    }

    /// How long a start may take before it fails. Defaults to 60 seconds.
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    /// Serves TLS with `cert` (`ssl = on`), so clients can use `sslmode=verify-full`.
    pub fn tls(mut self, cert: crate::tls::ServerCert) -> Self {
        self.tls = Some(cert);
        self
    }

    /// Starts the server and waits until it accepts connections.
    ///
    /// Blocks for as long as that takes: a few hundred milliseconds, plus a few seconds
    /// for `initdb` the first time on a machine.
    pub fn start(self) -> Result<Postgres, HarnessError> {
        let binaries = Binaries::find(self.bin_dir.as_deref())?;
        let owner = server_owner()?;
        let template = template(&binaries, owner)?;

        let dir = ScratchDir::create("postgres")?;
        let data_dir = dir.path().join("data");
        copy_tree(&template, &data_dir).map_err(HarnessError::io(format!(
            "copy the template cluster {} to {}",
            template.display(),
            data_dir.display()
        )))?;
        // The Unix socket goes here rather than /var/run/postgresql, which may not exist
        // and is shared by every server on the machine.
        let socket_dir = dir.path().join("sockets");
        fs::create_dir(&socket_dir).map_err(HarnessError::io(format!("create {}", socket_dir.display())))?;
        let mut builder = self;
        if let Some(cert) = builder.tls.take() {
            use std::os::unix::fs::PermissionsExt;
            for (name, pem) in [("server.crt", &cert.cert_pem), ("server.key", &cert.key_pem)] {
                let path = dir.path().join(name);
                fs::write(&path, pem).map_err(HarnessError::io(format!("write {}", path.display())))?;
                // The server refuses a key others can read.
                fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
                    .map_err(HarnessError::io(format!("chmod {}", path.display())))?;
            }
            builder = builder
                .setting("ssl", "on")
                .setting("ssl_cert_file", dir.path().join("server.crt").display().to_string())
                .setting("ssl_key_file", dir.path().join("server.key").display().to_string());
        }
        if let Some(owner) = owner {
            chown_tree(dir.path(), owner)
                .map_err(HarnessError::io(format!("hand {} to the postgres user", dir.path().display())))?;
        }

        let (child, port) = launch(&builder, &binaries, owner, dir.path())?;
        Ok(Postgres { binaries, port, dir, child })
    }
}

/// A PostgreSQL server listening on `127.0.0.1` on a port of its own, with trust
/// authentication for the `postgres` superuser and durability switched off for speed.
///
/// Each test should use a database of its own from [`Postgres::create_database`].
/// Dropping it shuts the server down (immediately, without a checkpoint) and removes
/// its directory.
///
/// ```no_run
/// # fn main() -> Result<(), fleet_testkit::HarnessError> {
/// let postgres = fleet_testkit::Postgres::start()?;
/// let url = postgres.create_database()?; // postgres://postgres@127.0.0.1:PORT/test_…
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Postgres {
    /// `psql` and `pg_isready` are needed after startup, by `create_database`.
    binaries: Binaries,
    /// Chosen at start; the server listens only on 127.0.0.1.
    port: u16,
    /// Holds the data directory, the socket directory and the log; removed on drop.
    dir: ScratchDir,
    /// The postmaster.
    child: Child,
}

impl Postgres {
    /// Starts a server with the default options.
    pub fn start() -> Result<Self, HarnessError> {
        Self::builder().start()
    }

    pub fn builder() -> PostgresBuilder {
        PostgresBuilder::default()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`: the superuser on the maintenance
    /// database. Tests should work in a database of their own instead.
    pub fn admin_url(&self) -> String {
        self.database_url("postgres")
    }

    /// The URL of database `name` on this server, as the `postgres` superuser.
    pub fn database_url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates an empty database with a unique name and returns its URL.
    pub fn create_database(&self) -> Result<String, HarnessError> {
        let name = format!("test_{}", Uuid::now_v7().simple());
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""))?;
        Ok(self.database_url(&name))
    }

    /// Runs `sql` with `psql` in `database` as the superuser and returns what it
    /// printed: unaligned, tuples only, one row a line with `|` between columns. For
    /// set-up a test does not want a client library for (roles, grants).
    pub fn psql(&self, database: &str, sql: &str) -> Result<String, HarnessError> {
        let mut command = Command::new(&self.binaries.psql);
        command
            .args(["--no-psqlrc", "--quiet", "--no-align", "--tuples-only"])
            .args(["--set", "ON_ERROR_STOP=1", "--host", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .args(["--username", "postgres", "--dbname", database, "--command", sql]);
        run(command)
    }

    /// The data directory (`PGDATA`).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The file the server's stdout and stderr go to.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join(LOG_FILE)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Immediate shutdown: the data is thrown away, so a checkpoint would be wasted.
        process::stop(&mut self.child, Signal::QUIT, STOP_GRACE);
    }
}

/// Where the PostgreSQL programs are, all found before anything starts, so that a
/// missing one is reported before any work is done.
#[derive(Debug, Clone)]
struct Binaries {
    /// Makes the template cluster.
    initdb: PathBuf,
    /// The server.
    postgres: PathBuf,
    /// Creates databases, and runs [`Postgres::psql`].
    psql: PathBuf,
    /// The readiness probe.
    pg_isready: PathBuf,
}

impl Binaries {
    fn find(bin_dir: Option<&Path>) -> Result<Self, HarnessError> {
        let (dirs, searched) = match bin_dir {
            Some(dir) => (vec![dir.to_path_buf()], dir.display().to_string()),
            None => {
                let mut dirs: Vec<PathBuf> = debian_bin_dir().into_iter().collect();
                dirs.extend(binary::path_dirs());
                let searched = format!("{DEBIAN_ROOT}/<version>/bin and {}", binary::join(&dirs));
                (dirs, searched)
            }
        };
        let find = |name: &str| {
            binary::find_in(Path::new(name), &dirs)
                .ok_or_else(|| binary::missing(Path::new(name), searched.clone(), PACKAGE))
        };
        Ok(Self {
            initdb: find("initdb")?,
            postgres: find("postgres")?,
            psql: find("psql")?,
            pg_isready: find("pg_isready")?,
        })
    }
}

/// The `bin` directory of the highest PostgreSQL version Debian has installed.
fn debian_bin_dir() -> Option<PathBuf> {
    fs::read_dir(DEBIAN_ROOT)
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = parse_version(entry.file_name().to_str()?)?;
            let bin = entry.path().join("bin");
            bin.join("postgres").is_file().then_some((version, bin))
        })
        .max_by(|(a, _), (b, _)| a.cmp(b))
        .map(|(_, bin)| bin)
}

/// `"15"` → `[15]`, `"9.6"` → `[9, 6]`, so that 10 sorts above 9.6.
fn parse_version(text: &str) -> Option<Vec<u32>> {
    text.split('.').map(|part| part.parse().ok()).collect()
}

/// The user the server runs as when it cannot be us: the ids that its processes get
/// and that its files are handed to.
#[derive(Debug, Clone, Copy)]
struct Owner {
    uid: u32,
    gid: u32,
}

/// `initdb` and `postgres` refuse to run as root; as root, they run as the `postgres`
/// system user that Debian's package creates.
fn server_owner() -> Result<Option<Owner>, HarnessError> {
    if !geteuid().is_root() {
        return Ok(None);
    }
    let passwd = fs::read_to_string("/etc/passwd").map_err(HarnessError::io("read /etc/passwd"))?;
    passwd
        .lines()
        .find_map(|line| {
            let mut fields = line.split(':');
            if fields.next()? != "postgres" {
                return None;
            }
            let uid = fields.nth(1)?.parse().ok()?;
            let gid = fields.next()?.parse().ok()?;
            Some(Owner { uid, gid })
        })
        .map(Some)
        .ok_or(HarnessError::NoPostgresUser)
}

fn run_as(command: &mut Command, owner: Option<Owner>) {
    if let Some(owner) = owner {
        command.uid(owner.uid).gid(owner.gid);
    }
}

/// The template cluster for this PostgreSQL version and server user, made on first use.
///
/// `initdb` takes seconds; copying its result takes milliseconds, so it runs once per
/// machine. Test processes run in parallel, so the first ones to get here would all run
/// it: a file lock lets one do the work while the others wait, and the result appears
/// under its final name only once it is complete.
fn template(binaries: &Binaries, owner: Option<Owner>) -> Result<PathBuf, HarnessError> {
    let version = server_version(&binaries.postgres)?;
    let uid = owner.map_or_else(|| geteuid().as_raw(), |owner| owner.uid);
    let name = format!("fleet-testkit-template-pg{version}-uid{uid}-v{TEMPLATE_FORMAT}");
    let tmp = std::env::temp_dir();
    let template = tmp.join(&name);
    if is_cluster(&template) {
        return Ok(template);
    }

    let lock_path = tmp.join(format!("{name}.lock"));
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(HarnessError::io(format!("open {}", lock_path.display())))?;
    lock.lock().map_err(HarnessError::io(format!("lock {}", lock_path.display())))?;
    // Whoever held the lock before us may have made it.
    if is_cluster(&template) {
        return Ok(template);
    }
    if template.exists() {
        // Not ours to explain; a cluster missing PG_VERSION is unusable either way.
        fs::remove_dir_all(&template)
            .map_err(HarnessError::io(format!("remove the broken template {}", template.display())))?;
    }

    let staging = tmp.join(format!("{name}.partial-{}", Uuid::now_v7().simple()));
    DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(HarnessError::io(format!("create {}", staging.display())))?;
    let result = init_cluster(binaries, owner, &staging).and_then(|()| {
        fs::rename(&staging, &template).map_err(HarnessError::io(format!(
            "rename {} to {}",
            staging.display(),
            template.display()
        )))
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    result.map(|()| template)
}

fn init_cluster(binaries: &Binaries, owner: Option<Owner>, dir: &Path) -> Result<(), HarnessError> {
    if let Some(owner) = owner {
        chown_tree(dir, owner).map_err(HarnessError::io(format!("hand {} to the postgres user", dir.display())))?;
    }
    let mut command = Command::new(&binaries.initdb);
    command
        .arg("--pgdata")
        .arg(dir)
        .args(["--auth=trust", "--username=postgres", "--encoding=UTF8", "--locale=C"])
        // The template is copied, never used in place; fsyncing it is wasted time.
        .arg("--no-sync")
        // Otherwise initdb searches /usr/share/zoneinfo for the system's zone.
        .env("TZ", "UTC")
        // The server user may not be allowed into our working directory.
        .current_dir(std::env::temp_dir());
    run_as(&mut command, owner);
    run(command).map(drop)
}

fn is_cluster(dir: &Path) -> bool {
    dir.join("PG_VERSION").is_file()
}

/// `15.18` from `postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)`.
fn server_version(postgres: &Path) -> Result<String, HarnessError> {
    let mut command = Command::new(postgres);
    command.arg("--version");
    let output = run(command)?;
    output
        .split_whitespace()
        .find(|word| word.starts_with(|c: char| c.is_ascii_digit()))
        .map(|word| word.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect())
        .ok_or_else(|| HarnessError::UnknownVersion { binary: postgres.to_path_buf(), output })
}

fn launch(
    builder: &PostgresBuilder,
    binaries: &Binaries,
    owner: Option<Owner>,
    dir: &Path,
) -> Result<(Child, u16), HarnessError> {
    let log = dir.join(LOG_FILE);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let port = process::free_port()?;
        let (stdout, stderr, offset) = process::log_stdio(&log)?;
        let mut command = Command::new(&binaries.postgres);
        command
            .arg("-D")
            .arg(dir.join("data"))
            .arg("-p")
            .arg(port.to_string())
            .arg("-k")
            .arg(dir.join("sockets"))
            .args(["-c", "listen_addresses=127.0.0.1"])
            // Test data is thrown away; durability only costs time.
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]);
        for (name, value) in &builder.settings {
            command.arg("-c").arg(format!("{name}={value}"));
        }
        command.current_dir(dir).stdin(Stdio::null()).stdout(stdout).stderr(stderr);
        run_as(&mut command, owner);
        let mut child = command.spawn().map_err(HarnessError::io(format!("start {}", binaries.postgres.display())))?;

        let startup = process::wait_until_ready(&mut child, &log, offset, READY_LINE, builder.startup_timeout, || {
            accepts_connections(&binaries.pg_isready, port)
        })?;
        if process::settle_startup(
            SERVICE,
            startup,
            port,
            attempt,
            PORT_ATTEMPTS,
            builder.startup_timeout,
            &log,
            offset,
        )? {
            return Ok((child, port));
        }
    }
}

fn accepts_connections(pg_isready: &Path, port: u16) -> bool {
    Command::new(pg_isready)
        .args(["--quiet", "--host", "127.0.0.1", "--port"])
        .arg(port.to_string())
        .args(["--username", "postgres", "--dbname", "postgres", "--timeout", "2"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Runs a helper program to completion and returns its stdout, or an error carrying
/// everything it printed.
fn run(mut command: Command) -> Result<String, HarnessError> {
    let program = format!("{command:?}");
    let output = command.stdin(Stdio::null()).output().map_err(HarnessError::io(format!("run {program}")))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(HarnessError::CommandFailed {
            program,
            status: output.status,
            output: format!("{stdout}{}", String::from_utf8_lossy(&output.stderr)),
        })
    }
}

/// Copies a directory tree, keeping permissions: PostgreSQL insists that its data
/// directory is not readable by others.
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    fs::create_dir(to)?;
    fs::set_permissions(to, fs::symlink_metadata(from)?.permissions())?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else if kind.is_symlink() {
            symlink(fs::read_link(entry.path())?, &target)?;
        } else {
            fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// `chown -R`, without following symlinks.
fn chown_tree(path: &Path, owner: Owner) -> std::io::Result<()> {
    lchown(path, Some(owner.uid), Some(owner.gid))?;
    if fs::symlink_metadata(path)?.is_dir() {
        for entry in fs::read_dir(path)? {
            chown_tree(&entry?.path(), owner)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_numerically() {
        assert!(parse_version("10") > parse_version("9.6"));
        assert!(parse_version("15") > parse_version("9"));
        assert_eq!(parse_version("main"), None);
    }

    #[test]
    fn copy_tree_keeps_modes_and_contents() {
        use std::os::unix::fs::PermissionsExt;

        let scratch = tempfile::tempdir().expect("create a temp dir");
        let from = scratch.path().join("from");
        DirBuilder::new().mode(0o700).recursive(true).create(from.join("base/1")).expect("create the source tree");
        fs::write(from.join("base/1/table"), b"rows").expect("write a file");
        fs::set_permissions(from.join("base/1/table"), fs::Permissions::from_mode(0o600)).expect("chmod the file");

        let to = scratch.path().join("to");
        copy_tree(&from, &to).expect("copy the tree");

        let mode = |path: PathBuf| fs::metadata(path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(to.clone()), 0o700);
        assert_eq!(mode(to.join("base/1/table")), 0o600);
        assert_eq!(fs::read(to.join("base/1/table")).expect("read the copy"), b"rows");
    }
}
