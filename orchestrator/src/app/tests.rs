//! The orchestrator's settings as an operator meets them: `config/examples/orchestrator.toml`
//! loads through [`Config::load`], and `docs/deployment.md` has a row for every setting the
//! loader accepts (found by [`fleetconf::settings::discover`], so neither can drift).

use super::*;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Loads `text` as the orchestrator's file, with no environment; the error's message.
fn probe(text: &str) -> Option<String> {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), text).expect("write");
    Config::load(Some(file.path()), &fleetconf::Env::default()).err().map(|e| e.0)
}

#[test]
fn every_setting_has_a_row_in_docs_deployment_md() {
    let settings = fleetconf::settings::discover(&probe);
    for key in ["instance", "redis_ca_file", "tools.provider.kind", "tools.provider.fixture", "tools.git.scratch_dir"] {
        assert!(settings.contains(key), "{key} was not discovered: {settings:?}");
    }
    let doc = std::fs::read_to_string(root().join("docs/deployment.md")).expect("docs/deployment.md");
    let problems = fleetconf::settings::undocumented(&doc, "orchestrator", &settings, SECRETS);
    assert!(problems.is_empty(), "docs/deployment.md is out of date:\n{}", problems.join("\n"));
}

/// A directory with the files the example names, made the way an operator makes them.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let perms =
            PermissionTable::parse(&std::fs::read_to_string(root().join("config/permissions.toml")).expect("read"))
                .expect("the shipped permission table");
        let master = envelope::MasterFile::new(envelope::MasterSecret::from_bytes([7; 32]));
        let keyset = master.derive_keyset(envelope::Process::Role(Role::Orchestrator), &perms);
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).expect("write");
        write("orchestrator.keyset.toml", &keyset.to_toml());
        write("audit.key", &format!("{}\n", "5a".repeat(32)));
        write("api-jwt.secret", &format!("{}\n", "a1".repeat(32)));
        write("lease.secret", &format!("{}\n", "b2".repeat(32)));
        write("model-api-key", "sk-example-not-a-real-key\n");
        write(
            "database-url",
            "postgres://fleet_app:pw@127.0.0.1:5432/agentfleet?sslmode=verify-full&sslrootcert=/ca.pem\n",
        );
        write("ca.pem", &fleet_testkit::tls::TestCa::new().cert_pem);
        Self { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// The environment that points the example's paths at these files and supplies the secrets.
    fn env(&self, extra: &[(&str, String)]) -> fleetconf::Env {
        let root = root();
        let mut pairs = vec![
            ("FLEET_KEYSET", self.path("orchestrator.keyset.toml")),
            ("FLEET_PERMISSIONS", root.join("config/permissions.toml").display().to_string()),
            ("FLEET_AUDIT_KEY_FILE", self.path("audit.key")),
            ("FLEET_JWT_SECRET_FILE", self.path("api-jwt.secret")),
            ("FLEET_REDIS_CA_FILE", self.path("ca.pem")),
            ("FLEET_TOOLS__LEASE_SECRET_FILE", self.path("lease.secret")),
            ("FLEET_TOOLS__RISK_MATRIX", root.join("config/risk_matrix.toml").display().to_string()),
            ("FLEET_TOOLS__LEDGER", root.join("config/examples/ledger.toml").display().to_string()),
            ("FLEET_TOOLS__PROVIDER__API_KEY_FILE", self.path("model-api-key")),
            ("FLEET_DATABASE_URL_FILE", self.path("database-url")),
            ("FLEET_REDIS_URL", "rediss://orchestrator:pw@127.0.0.1:6380".to_owned()),
        ];
        pairs.extend(extra.iter().map(|(k, v)| (*k, v.clone())));
        fleetconf::Env::from_pairs(pairs)
    }
}

#[test]
fn the_example_configuration_loads() {
    let files = Files::new();
    let example = root().join("config/examples/orchestrator.toml");
    let cfg = Config::load(Some(&example), &files.env(&[]))
        .unwrap_or_else(|e| panic!("config/examples/orchestrator.toml does not load: {e}"));
    assert_eq!(cfg.instance.as_str(), "orchestrator-0");
    assert!(!cfg.migrate_on_start, "the example connects as the application role");
    assert!(cfg.redis.is_tls());
    assert_eq!(cfg.api.listen, SocketAddr::from(([127, 0, 0, 1], 8080)));
    assert!(cfg.tools.is_some(), "the example configures the tool proxy");

    // The lease secret must not be the API token secret.
    let same = files.env(&[("FLEET_TOOLS__LEASE_SECRET_FILE", files.path("api-jwt.secret"))]);
    let e = Config::load(Some(&example), &same).expect_err("the same secret twice").0;
    assert!(e.contains("tools.lease_secret_file") && e.contains("jwt_secret_file"), "{e}");
    // A model without a price in the ledger file is refused by name.
    let unpriced = files.env(&[("FLEET_TOOLS__MODELS__DEFAULT", "unpriced-model".to_owned())]);
    let e = Config::load(Some(&example), &unpriced).expect_err("a model without a price").0;
    assert!(e.contains("unpriced-model"), "{e}");
}
