//! TLS to Redis (`rediss://` with a CA file) and to Postgres (`sslmode=verify-full`),
//! against servers the harness starts with certificates of a throwaway CA: the fleet's
//! clients connect with the right CA and refuse a server whose certificate another CA
//! signed.

use std::path::PathBuf;
use std::time::Duration;

use fleet_testkit::tls::TestCa;
use fleet_testkit::{Postgres, RedisServer};
use secrecy::SecretString;
use sqlx::Connection;

struct Cas {
    _dir: tempfile::TempDir,
    ours: TestCa,
    ours_file: PathBuf,
    other_file: PathBuf,
}

fn cas() -> Cas {
    let dir = tempfile::tempdir().expect("temp dir");
    let ours = TestCa::new();
    let other = TestCa::new();
    let ours_file = dir.path().join("ca.pem");
    let other_file = dir.path().join("other-ca.pem");
    std::fs::write(&ours_file, &ours.cert_pem).expect("write");
    std::fs::write(&other_file, &other.cert_pem).expect("write");
    Cas { _dir: dir, ours, ours_file, other_file }
}

async fn ping(endpoint: bus::RedisEndpoint) -> Result<String, String> {
    let pool = bus::pool(endpoint, 1, Duration::from_secs(1)).map_err(|e| e.to_string())?;
    let mut conn = pool.get().await.map_err(|e| e.to_string())?;
    redis::cmd("PING").query_async::<String>(&mut conn).await.map_err(|e| e.to_string())
}

#[tokio::test]
async fn redis_over_tls_trusts_exactly_the_configured_ca() {
    let cas = cas();
    let redis = RedisServer::builder().tls(cas.ours.server()).start().expect("redis-server with TLS");
    let url = redis.tls_url().expect("a TLS port");
    assert!(url.starts_with("rediss://127.0.0.1:"), "{url}");

    let ours = bus::RedisEndpoint::new(SecretString::from(url.clone()), Some(&cas.ours_file)).expect("endpoint");
    assert!(ours.is_tls());
    assert_eq!(ping(ours).await.expect("TLS with our CA"), "PONG");

    let other = bus::RedisEndpoint::new(SecretString::from(url.clone()), Some(&cas.other_file)).expect("endpoint");
    let e = ping(other).await.expect_err("a server signed by another CA is refused");
    assert!(e.to_lowercase().contains("certificate") || e.contains("UnknownIssuer"), "{e}");

    // Without a CA file only the system's roots are trusted, and they never signed ours.
    let system = bus::RedisEndpoint::new(SecretString::from(url.clone()), None).expect("endpoint");
    assert!(ping(system).await.is_err(), "the system's roots do not include the test CA");

    // A CA with a plaintext URL is a mistake the operator hears about.
    let e = bus::RedisEndpoint::new(SecretString::from(redis.url()), Some(&cas.ours_file)).expect_err("plaintext");
    assert!(e.to_string().contains("not rediss://"), "{e}");
    // A CA file that holds no certificate.
    let e = bus::RedisEndpoint::new(SecretString::from(url), Some(std::path::Path::new("/etc/hostname")))
        .expect_err("not a PEM");
    assert!(e.to_string().contains("holds no PEM certificate"), "{e}");
}

#[tokio::test]
async fn postgres_verify_full_trusts_exactly_the_configured_ca() {
    let cas = cas();
    let postgres = Postgres::builder().tls(cas.ours.server()).start().expect("postgres with TLS");
    let base = postgres.database_url("postgres");
    let url = |ca: &PathBuf| format!("{base}?sslmode=verify-full&sslrootcert={}", ca.display());

    let mut conn = sqlx::PgConnection::connect(&url(&cas.ours_file)).await.expect("verify-full with our CA");
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&mut conn)
        .await
        .expect("pg_stat_ssl");
    assert!(ssl, "the session is encrypted");
    conn.close().await.expect("close");

    let e = sqlx::PgConnection::connect(&url(&cas.other_file)).await.expect_err("another CA's server is refused");
    let text = e.to_string().to_lowercase();
    assert!(text.contains("certificate") || text.contains("tls"), "{text}");

    // The orchestrator's and the relay's URL parsing keep the TLS settings.
    let options: sqlx::postgres::PgConnectOptions = url(&cas.ours_file).parse().expect("options");
    assert!(matches!(options.get_ssl_mode(), sqlx::postgres::PgSslMode::VerifyFull));
}
