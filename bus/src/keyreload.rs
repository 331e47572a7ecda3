//! Picking up a changed keyset file without a restart.
//!
//! A [`KeysetReloader`] watches one process's keyset file and puts each valid new version
//! into the process's [`LiveKeyring`], which every verifier and publisher of the process
//! reads on each message. It reads the file every `interval` and compares its content (a
//! hash), rather than using inotify: polling sees every way a file is replaced — an editor's
//! rename-over, a Kubernetes Secret's symlink swap, a copy — and needs no platform code. It
//! also reloads at once on SIGHUP.
//!
//! A file that cannot be read, does not parse, belongs to another process, or holds no
//! active key is refused: the error is logged once per distinct content (naming the file and
//! what to do), counted, and the keyring in force stays. A process never panics on a bad
//! keyset and never drops to no keys.
//!
//! Series: `fleet_keyset_reloads_total{outcome="reloaded"|"refused"}`,
//! `fleet_keyset_signing_generation`, `fleet_keyset_newest_generation`,
//! `fleet_keyset_retired_through`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use envelope::{Generations, Keyset, LiveKeyring, Process};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

/// The default time between two reads of the keyset file.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);

/// What one check of the file found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// Same content as last time (or as last refused): nothing done.
    Unchanged,
    /// A new keyring is in force.
    Reloaded(Generations),
    /// The file was refused; the old keyring stays. The text says why and what to do.
    Refused(String),
}

/// The reloader's Prometheus series; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct KeysetMetrics {
    reloads: Family<Vec<(String, String)>, Counter>,
    signing: Gauge<i64, std::sync::atomic::AtomicI64>,
    newest: Gauge<i64, std::sync::atomic::AtomicI64>,
    retired: Gauge<i64, std::sync::atomic::AtomicI64>,
}

impl KeysetMetrics {
    /// Adds the series to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "fleet_keyset_reloads",
            "Keyset file changes seen, by outcome (reloaded, refused)",
            self.reloads.clone(),
        );
        registry.register(
            "fleet_keyset_signing_generation",
            "The key generation this process signs with",
            self.signing.clone(),
        );
        registry.register(
            "fleet_keyset_newest_generation",
            "The newest key generation this process verifies (staged included)",
            self.newest.clone(),
        );
        registry.register(
            "fleet_keyset_retired_through",
            "The newest key generation this process refuses as retired",
            self.retired.clone(),
        );
    }

    fn count(&self, outcome: &str) {
        self.reloads.get_or_create(&vec![("outcome".to_owned(), outcome.to_owned())]).inc();
    }

    fn set(&self, g: Generations) {
        self.signing.set(i64::from(g.signing));
        self.newest.set(i64::from(g.newest));
        self.retired.set(i64::from(g.retired_through));
    }
}

/// Watches one keyset file; see the module documentation.
#[derive(Debug)]
pub struct KeysetReloader {
    /// The file as configured (a symlink is followed on every read, so a swapped target is
    /// seen).
    path: PathBuf,
    /// Whose keyset the file must be: another process's is refused.
    process: Process,
    /// Where a valid new keyring goes.
    live: LiveKeyring,
    /// Time between reads.
    interval: Duration,
    /// The hash of the content last acted on (loaded or refused), so an unchanged file costs
    /// one read and a bad one is reported once, not every interval.
    last: Option<[u8; 32]>,
    /// The generations in force (the file's at start, then each reload's): for the gauges,
    /// and to refuse a file that goes back.
    in_force: Option<Generations>,
    metrics: KeysetMetrics,
    /// Successful reloads, for tests and the debug log.
    reloads: Arc<AtomicU64>,
}

impl KeysetReloader {
    /// A reloader of `path` (the keyset of `process`) into `live`. `live` must hold what
    /// the file held when the process read it: the first check of an unchanged file does
    /// nothing.
    pub fn new(path: impl Into<PathBuf>, process: Process, live: LiveKeyring, interval: Duration) -> Self {
        let path = path.into();
        let bytes = std::fs::read(&path).ok();
        let last = bytes.as_deref().map(digest);
        let initial = bytes
            .as_deref()
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(|text| Keyset::parse(text).ok())
            .map(|k| k.generations());
        Self {
            path,
            process,
            live,
            interval: interval.max(Duration::from_millis(10)),
            last,
            in_force: initial,
            metrics: KeysetMetrics::default(),
            reloads: Arc::default(),
        }
    }

    /// Reports to `metrics` (register them once in the process's registry).
    pub fn with_metrics(mut self, metrics: KeysetMetrics) -> Self {
        if let Some(g) = self.in_force {
            metrics.set(g);
        }
        self.metrics = metrics;
        self
    }

    /// How many times a new keyring was put in force.
    pub fn reloads(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.reloads)
    }

    /// Reads the file and, when its content changed, parses it and puts it in force.
    /// `force` acts even on unchanged content (SIGHUP: the operator asked).
    pub fn check(&mut self, force: bool) -> ReloadOutcome {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) => {
                // Remember the failure as "content" so it is reported once per episode.
                let marker = digest(format!("unreadable: {:?}", e.kind()).as_bytes());
                return self.refuse(
                    marker,
                    force,
                    format!("cannot read it: {e}; restore the file (mode 0600, readable by this process)"),
                );
            }
        };
        let hash = digest(&bytes);
        if !force && self.last == Some(hash) {
            return ReloadOutcome::Unchanged;
        }
        let keyset = match std::str::from_utf8(&bytes)
            .map_err(|e| e.to_string())
            .and_then(|text| Keyset::parse(text).map_err(|e| e.to_string()))
        {
            Ok(k) => k,
            Err(e) => {
                return self.refuse(
                    hash,
                    force,
                    format!(
                        "it is not a valid keyset: {e}; re-derive it with `fleetctl keys derive --process {} --force`",
                        self.process
                    ),
                );
            }
        };
        if keyset.process != self.process {
            return self.refuse(
                hash,
                force,
                format!(
                    "it is the keyset of {}, not of {}; install this process's own keyset \
                     (`fleetctl keys derive --process {}`)",
                    keyset.process, self.process, self.process
                ),
            );
        }
        if keyset.entries.iter().all(|e| e.secret.is_none()) {
            return self.refuse(
                hash,
                force,
                format!(
                    "it holds no active key, so this process could neither sign nor verify; re-derive it \
                     with `fleetctl keys derive --process {}`",
                    self.process
                ),
            );
        }
        let generations = keyset.generations();
        if let Some(now) = self.in_force
            && (generations.retired_through < now.retired_through || generations.newest < now.newest)
        {
            // A stale copy (an old backup, a replayed Secret version) would bring back
            // retired keys or drop a staged one that peers already sign with.
            return self.refuse(
                hash,
                force,
                format!(
                    "it is older than the keyset in force (file: {generations}; in force: {now}) and would bring \
                     back retired keys; install the current keyset (`fleetctl keys derive --process {}`), or, after \
                     re-keying with a new master, restart the process",
                    self.process
                ),
            );
        }
        let kids = keyset.entries.len();
        self.live.replace(keyset.into_keyring());
        self.last = Some(hash);
        self.in_force = Some(generations);
        self.reloads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.metrics.count("reloaded");
        self.metrics.set(generations);
        tracing::info!(
            file = %self.path.display(),
            process = %self.process,
            kids,
            signing_generation = generations.signing,
            newest_generation = generations.newest,
            retired_through = generations.retired_through,
            "Reloaded the keyset; it applies from the next message on."
        );
        ReloadOutcome::Reloaded(generations)
    }

    fn refuse(&mut self, hash: [u8; 32], force: bool, why: String) -> ReloadOutcome {
        let repeated = self.last == Some(hash);
        self.last = Some(hash);
        if !repeated || force {
            self.metrics.count("refused");
            tracing::error!(
                file = %self.path.display(),
                process = %self.process,
                "Refused the changed keyset file '{}': {why}. The keys loaded before stay in force.",
                self.path.display()
            );
        }
        ReloadOutcome::Refused(why)
    }

    /// The file this reloader watches.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks every interval and at once on SIGHUP, until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "Cannot listen for SIGHUP; the keyset file is still read every interval.");
                None
            }
        };
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            let force = tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticker.tick() => false,
                Some(()) = async {
                    match hangup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                } => true,
            };
            if force {
                tracing::info!(file = %self.path.display(), "SIGHUP: reading the keyset file.");
            }
            // A small file read; blocking the runtime for it is cheaper than a thread hop.
            self.check(force);
        }
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use envelope::{Edge, Keyring, MasterFile, MasterSecret, PermissionTable, Role};

    use super::*;

    const PERMISSIONS: &str = include_str!("../../config/permissions.toml");
    const DEV_TO_ORCH: Edge = Edge { from: Role::Dev, to: Role::Orchestrator };

    fn master(rotations: u32) -> MasterFile {
        let mut m = MasterFile::new(MasterSecret::from_bytes([5; 32]));
        for _ in 0..rotations {
            m.rotate().unwrap();
            m.promote();
        }
        m
    }

    fn keyset_text(m: &MasterFile, process: Process) -> String {
        m.derive_keyset(process, &PermissionTable::parse(PERMISSIONS).unwrap()).to_toml().to_string()
    }

    const DEV: Process = Process::Role(Role::Dev);

    /// A dev keyset file of generation 1, its live keyring and a reloader.
    fn start(dir: &Path) -> (PathBuf, LiveKeyring, KeysetReloader) {
        let path = dir.join("dev.keyset.toml");
        let text = keyset_text(&master(0), DEV);
        std::fs::write(&path, &text).unwrap();
        let live = LiveKeyring::new(Keyset::parse(&text).unwrap().into_keyring());
        let reloader = KeysetReloader::new(&path, DEV, live.clone(), Duration::from_millis(10));
        (path, live, reloader)
    }

    fn generation(live: &LiveKeyring) -> u32 {
        live.signing_kid(DEV_TO_ORCH).unwrap().generation
    }

    #[test]
    fn an_unchanged_file_is_not_reloaded_and_a_changed_one_is() {
        let dir = tempfile::tempdir().unwrap();
        let (path, live, mut reloader) = start(dir.path());
        assert_eq!(reloader.check(false), ReloadOutcome::Unchanged);
        std::fs::write(&path, keyset_text(&master(1), DEV)).unwrap();
        assert!(
            matches!(reloader.check(false), ReloadOutcome::Reloaded(g) if g.signing == 2 && g.retired_through == 0)
        );
        assert_eq!(generation(&live), 2);
        assert_eq!(reloader.check(false), ReloadOutcome::Unchanged);
        // SIGHUP reloads even the same content.
        assert!(matches!(reloader.check(true), ReloadOutcome::Reloaded(_)));
    }

    #[test]
    fn a_bad_file_keeps_the_old_keys() {
        let dir = tempfile::tempdir().unwrap();
        let (path, live, mut reloader) = start(dir.path());
        let before = format!("{live:?}");
        for (bad, why) in [
            ("format = 1\nprocess = \"dev\"\n[[key]]\nkid = \"dev>orchestrator:1\"\n", "not a valid keyset"),
            ("this is not toml", "not a valid keyset"),
            ("format = 1\nprocess = \"dev\"\n", "holds no active key"),
        ] {
            std::fs::write(&path, bad).unwrap();
            match reloader.check(false) {
                ReloadOutcome::Refused(text) => assert!(text.contains(why), "{text}"),
                other => panic!("{bad:?} was not refused: {other:?}"),
            }
            assert_eq!(format!("{live:?}"), before);
            assert_eq!(generation(&live), 1);
        }
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(reloader.check(false), ReloadOutcome::Refused(t) if t.contains("cannot read it")));
        assert_eq!(generation(&live), 1);
        // Still missing: refused again (the old keys stay), but logged and counted only once.
        assert!(matches!(reloader.check(false), ReloadOutcome::Refused(_)));
        // Once the file is good again, it is picked up.
        std::fs::write(&path, keyset_text(&master(1), DEV)).unwrap();
        assert!(matches!(reloader.check(false), ReloadOutcome::Reloaded(_)));
        assert_eq!(generation(&live), 2);
    }

    #[test]
    fn an_older_keyset_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (path, live, mut reloader) = start(dir.path());
        let mut m = master(1);
        m.retire_through(1).unwrap();
        std::fs::write(&path, keyset_text(&m, DEV)).unwrap();
        assert!(matches!(reloader.check(false), ReloadOutcome::Reloaded(g) if g.retired_through == 1));
        // The generation-1 file again: it would make dev>orchestrator:1 valid again.
        std::fs::write(&path, keyset_text(&master(0), DEV)).unwrap();
        match reloader.check(false) {
            ReloadOutcome::Refused(text) => assert!(text.contains("older than the keyset in force"), "{text}"),
            other => panic!("not refused: {other:?}"),
        }
        assert_eq!(generation(&live), 2);
        assert!(format!("{live:?}").contains("dev>orchestrator:1 (retired)"), "{live:?}");
    }

    #[test]
    fn another_process_keyset_swapped_in_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (path, live, mut reloader) = start(dir.path());
        // The attack: a newer keyset, but the orchestrator's (it signs orchestrator>dev).
        std::fs::write(&path, keyset_text(&master(1), Process::Role(Role::Orchestrator))).unwrap();
        match reloader.check(false) {
            ReloadOutcome::Refused(text) => {
                assert!(text.contains("keyset of orchestrator, not of dev"), "{text}");
                assert!(!text.contains("secret ="), "{text}");
            }
            other => panic!("not refused: {other:?}"),
        }
        assert_eq!(generation(&live), 1);
        let ring: &Keyring = &live.current();
        // None of the orchestrator's other edges came in.
        assert!(ring.signing_kid(Edge { from: Role::Orchestrator, to: Role::Budget }).is_none());
    }

    #[test]
    fn metrics_follow_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _live, reloader) = start(dir.path());
        let metrics = KeysetMetrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut reloader = reloader.with_metrics(metrics);
        let encode = |r: &Registry| {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, r).unwrap();
            text
        };
        assert!(encode(&registry).contains("fleet_keyset_signing_generation 1\n"), "{}", encode(&registry));
        std::fs::write(&path, keyset_text(&master(1), DEV)).unwrap();
        reloader.check(false);
        std::fs::write(&path, keyset_text(&master(1), Process::Operator)).unwrap();
        reloader.check(false);
        let text = encode(&registry);
        for line in [
            "fleet_keyset_signing_generation 2\n",
            "fleet_keyset_newest_generation 2\n",
            "fleet_keyset_retired_through 0\n",
            "fleet_keyset_reloads_total{outcome=\"reloaded\"} 1\n",
            "fleet_keyset_reloads_total{outcome=\"refused\"} 1\n",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }

    #[tokio::test]
    async fn the_task_polls_and_stops_on_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let (path, live, reloader) = start(dir.path());
        let reloads = reloader.reloads();
        let stop = CancellationToken::new();
        let task = tokio::spawn(reloader.run(stop.clone()));
        // Replaced the way editors and Kubernetes do it: a new file renamed over the old.
        let tmp = dir.path().join("dev.keyset.toml.new");
        std::fs::write(&tmp, keyset_text(&master(1), DEV)).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while generation(&live) != 2 {
            assert!(tokio::time::Instant::now() < deadline, "not reloaded within 5 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(reloads.load(std::sync::atomic::Ordering::Relaxed), 1);
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(2), task).await.unwrap().unwrap();
    }
}
