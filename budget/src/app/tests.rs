//! The budget manager's settings as an operator meets them: `config/examples/budget.toml`
//! loads through [`Config::load`], its `[ledger]` is the orchestrator's ledger file
//! (`config/examples/ledger.toml`), and `docs/deployment.md` has a row for every setting the
//! loader accepts.

use super::*;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn probe(text: &str) -> Option<String> {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), text).expect("write");
    Config::load(Some(file.path()), &fleetconf::Env::default()).err().map(|e| e.0)
}

#[test]
fn every_setting_has_a_row_in_docs_deployment_md() {
    let settings = fleetconf::settings::discover(&probe);
    for key in ["deployment", "redis_ca_file", "ledger.prices", "killswitch.failure_threshold", "alerts.webhook.secret"]
    {
        assert!(settings.contains(key), "{key} was not discovered: {settings:?}");
    }
    let doc = std::fs::read_to_string(root().join("docs/deployment.md")).expect("docs/deployment.md");
    let problems = fleetconf::settings::undocumented(&doc, "budget", &settings, SECRETS);
    assert!(problems.is_empty(), "docs/deployment.md is out of date:\n{}", problems.join("\n"));
}

#[test]
fn the_example_configuration_and_the_ledger_file_load() {
    let dir = tempfile::tempdir().expect("temp dir");
    let perms_path = root().join("config/permissions.toml");
    let perms = PermissionTable::parse(&std::fs::read_to_string(&perms_path).expect("read")).expect("permission table");
    let master = envelope::MasterFile::new(envelope::MasterSecret::from_bytes([7; 32]));
    let keyset = dir.path().join("budget.keyset.toml");
    std::fs::write(&keyset, master.derive_keyset(envelope::Process::Role(Role::Budget), &perms).to_toml().as_bytes())
        .expect("write");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, fleet_testkit::tls::TestCa::new().cert_pem).expect("write");
    let secret = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, format!("{text}\n")).expect("write");
        path.display().to_string()
    };
    let env = fleetconf::Env::from_pairs([
        ("FLEET_KEYSET", keyset.display().to_string()),
        ("FLEET_DEPLOYMENT", "prod-eu".to_owned()),
        ("FLEET_PERMISSIONS", perms_path.display().to_string()),
        ("FLEET_REDIS_CA_FILE", ca.display().to_string()),
        ("FLEET_REDIS_URL_FILE", secret("redis-url", "rediss://budget:pw@127.0.0.1:6380")),
        ("FLEET_ALERTS__TELEGRAM__BOT_TOKEN_FILE", secret("bot-token", "123456:ABC-example")),
        ("FLEET_ALERTS__TELEGRAM__CHAT_ID_FILE", secret("chat-id", "-1001234567890")),
        ("FLEET_ALERTS__WEBHOOK__URL_FILE", secret("webhook-url", "https://hooks.example.com/agentfleet")),
        ("FLEET_ALERTS__WEBHOOK__SECRET_FILE", secret("webhook-secret", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")),
    ]);
    let cfg = Config::load(Some(&root().join("config/examples/budget.toml")), &env)
        .unwrap_or_else(|e| panic!("config/examples/budget.toml does not load: {e}"));
    assert_eq!(cfg.instance.as_str(), "budget-0");
    assert_eq!(cfg.deployment, "prod-eu", "FLEET_DEPLOYMENT wins over the file's");
    assert!(cfg.alerts.telegram.is_some() && cfg.alerts.webhook.is_some(), "channels from the environment alone");

    let ledger = std::fs::read_to_string(root().join("config/examples/ledger.toml")).expect("ledger.toml");
    let ledger = LedgerConfig::from_toml(&ledger).unwrap_or_else(|e| panic!("config/examples/ledger.toml: {e}"));
    assert_eq!(cfg.ledger, ledger, "the budget's [ledger] and the orchestrator's ledger file must agree");
}

#[test]
fn a_bad_deployment_name_is_refused_by_name() {
    for bad in ["", "   ", "a\\nb", &"x".repeat(65)] {
        let e = probe(&format!("keyset = \"k\"\ndeployment = \"{bad}\"\n")).expect("refused");
        assert!(e.starts_with("setting `deployment`"), "{bad:?}: {e}");
    }
}
