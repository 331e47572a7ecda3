//! The harness's own tests: the servers it starts are real, isolated, restartable, and
//! cleaned up, and a missing server program is a loud error.

use std::net::{Ipv4Addr, TcpStream};
use std::path::Path;

use fleet_testkit::{HarnessError, Postgres, RedisServer};
use redis::AsyncCommands;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Row};

async fn redis_connection(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("parse the Redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis")
}

async fn pg_pool(url: &str) -> PgPool {
    PgPoolOptions::new().max_connections(2).connect(url).await.expect("connect to Postgres")
}

fn port_is_closed(port: u16) -> bool {
    TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err()
}

#[tokio::test]
async fn redis_serves_strings_and_streams() {
    let redis = RedisServer::start().expect("start redis-server");
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{}", redis.port()));
    let mut con = redis_connection(&redis.url()).await;

    let () = con.set("greeting", "hello").await.expect("SET");
    let value: Option<String> = con.get("greeting").await.expect("GET");
    assert_eq!(value.as_deref(), Some("hello"));

    for n in 0..3 {
        let _: String = con.xadd("fleet:test", "*", &[("n", n)]).await.expect("XADD");
    }
    let len: usize = con.xlen("fleet:test").await.expect("XLEN");
    assert_eq!(len, 3);
}

#[tokio::test]
async fn redis_servers_are_isolated() {
    let first = RedisServer::start().expect("start the first redis-server");
    let second = RedisServer::start().expect("start the second redis-server");
    assert_ne!(first.port(), second.port());
    assert_ne!(first.dir(), second.dir());

    let mut a = redis_connection(&first.url()).await;
    let mut b = redis_connection(&second.url()).await;
    let () = a.set("owner", "first").await.expect("SET on the first server");
    let seen: Option<String> = b.get("owner").await.expect("GET on the second server");
    assert_eq!(seen, None);
}

#[tokio::test]
async fn redis_appendonly_data_survives_a_crash_and_a_clean_restart() {
    let mut redis = RedisServer::builder().appendonly(true).start().expect("start redis-server with appendonly");
    let port = redis.port();
    {
        let mut con = redis_connection(&redis.url()).await;
        let () = con.set("task:1", "queued").await.expect("SET");
        let _: String = con.xadd("fleet:tasks", "*", &[("task", "1")]).await.expect("XADD");
    }

    redis.kill();
    assert!(!redis.is_running());
    assert!(port_is_closed(port), "a killed server must not answer");
    redis.restart().expect("restart after a crash");
    assert_eq!(redis.port(), port, "a restart keeps the port");
    {
        let mut con = redis_connection(&redis.url()).await;
        let value: Option<String> = con.get("task:1").await.expect("GET after the crash");
        assert_eq!(value.as_deref(), Some("queued"));
        let len: usize = con.xlen("fleet:tasks").await.expect("XLEN after the crash");
        assert_eq!(len, 1);
        let () = con.set("task:2", "queued").await.expect("SET");
    }

    redis.restart().expect("clean restart");
    let mut con = redis_connection(&redis.url()).await;
    let value: Option<String> = con.get("task:2").await.expect("GET after the restart");
    assert_eq!(value.as_deref(), Some("queued"));
}

/// The counterpart of the test above: it proves that `restart` really replaces the
/// process, since by default (`save ""`, no AOF) nothing survives it.
#[tokio::test]
async fn redis_without_appendonly_forgets_everything_on_restart() {
    let mut redis = RedisServer::start().expect("start redis-server");
    let mut con = redis_connection(&redis.url()).await;
    let () = con.set("ephemeral", "yes").await.expect("SET");
    drop(con);

    redis.restart().expect("restart");
    let mut con = redis_connection(&redis.url()).await;
    let value: Option<String> = con.get("ephemeral").await.expect("GET after the restart");
    assert_eq!(value, None);
}

#[tokio::test]
async fn redis_loads_the_acl_file_and_extra_config() {
    let acl_dir = tempfile::tempdir().expect("create a temp dir");
    let acl_file = acl_dir.path().join("users.acl");
    std::fs::write(
        &acl_file,
        "user default on nopass ~* &* +@all\n\
         user relay on >relay-secret ~fleet:* +xadd +xlen +ping\n",
    )
    .expect("write the ACL file");
    let redis = RedisServer::builder()
        .acl_file(&acl_file)
        .config("maxmemory", "10mb")
        .start()
        .expect("start redis-server with an ACL file");

    let mut admin = redis_connection(&redis.url()).await;
    let maxmemory: Vec<String> =
        redis::cmd("CONFIG").arg("GET").arg("maxmemory").query_async(&mut admin).await.expect("CONFIG GET");
    assert_eq!(maxmemory, ["maxmemory", "10485760"]);

    let relay_url = format!("redis://relay:relay-secret@127.0.0.1:{}", redis.port());
    let mut relay = redis_connection(&relay_url).await;
    let _: String = relay.xadd("fleet:outbox", "*", &[("k", "v")]).await.expect("the relay user may XADD to fleet:*");
    let denied: redis::RedisResult<()> = relay.set("fleet:x", "v").await;
    let err = denied.expect_err("the relay user may not SET");
    assert_eq!(err.code(), Some("NOPERM"), "{err}");
}

#[test]
fn redis_with_a_missing_binary_is_a_loud_error() {
    let err = RedisServer::builder()
        .binary("fleet-testkit-no-such-redis-server")
        .start()
        .expect_err("there is no such program");
    match &err {
        HarnessError::MissingBinary { binary, .. } => {
            assert_eq!(binary, "fleet-testkit-no-such-redis-server");
        }
        other => panic!("expected MissingBinary, got {other:?}"),
    }
    let message = err.to_string();
    assert!(message.contains("apt-get install redis-server"), "{message}");
    assert!(message.contains("deploy/test.sh"), "{message}");

    let err = RedisServer::builder().binary("/nonexistent/redis-server").start().expect_err("there is no such file");
    assert!(matches!(err, HarnessError::MissingBinary { .. }), "{err}");
}

#[test]
fn redis_that_cannot_start_reports_its_log() {
    let err = RedisServer::builder()
        .config("no-such-directive", "1")
        .start()
        .expect_err("redis-server rejects unknown directives");
    match &err {
        HarnessError::Exited { tail, .. } => {
            assert!(tail.contains("no-such-directive"), "{tail}");
        }
        other => panic!("expected Exited, got {other:?}"),
    }
}

#[test]
fn dropping_redis_stops_it_and_removes_its_directory() {
    let redis = RedisServer::start().expect("start redis-server");
    let (port, dir) = (redis.port(), redis.dir().to_path_buf());
    assert!(dir.join("redis.log").is_file());
    drop(redis);
    assert!(port_is_closed(port), "the server must be gone");
    assert!(!dir.exists(), "{} must be removed", dir.display());
}

#[tokio::test]
async fn postgres_databases_are_isolated() {
    let postgres = Postgres::start().expect("start postgres");
    let first = postgres.create_database().expect("create the first database");
    let second = postgres.create_database().expect("create the second database");
    assert_ne!(first, second);
    let prefix = format!("postgres://postgres@127.0.0.1:{}/test_", postgres.port());
    assert!(first.starts_with(&prefix), "{first}");

    let pool = pg_pool(&first).await;
    let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&pool).await.expect("SELECT 1");
    assert_eq!(one, 1);
    sqlx::query("CREATE TABLE tasks (id BIGINT PRIMARY KEY, state TEXT NOT NULL)")
        .execute(&pool)
        .await
        .expect("CREATE TABLE");
    sqlx::query("INSERT INTO tasks (id, state) VALUES ($1, $2), ($3, $4)")
        .bind(1_i64)
        .bind("queued")
        .bind(2_i64)
        .bind("done")
        .execute(&pool)
        .await
        .expect("INSERT");
    let rows =
        sqlx::query("SELECT id, state FROM tasks ORDER BY id").fetch_all(&pool).await.expect("SELECT the rows back");
    let rows: Vec<(i64, String)> = rows.iter().map(|row| (row.get("id"), row.get("state"))).collect();
    assert_eq!(rows, [(1, "queued".to_owned()), (2, "done".to_owned())]);

    let other = pg_pool(&second).await;
    let table: Option<String> = sqlx::query_scalar("SELECT to_regclass('tasks')::text")
        .fetch_one(&other)
        .await
        .expect("look the table up in the second database");
    assert_eq!(table, None, "the second database must not see the first one's table");
}

#[tokio::test]
async fn two_postgres_servers_run_at_once() {
    let first = Postgres::start().expect("start the first postgres");
    let second = Postgres::start().expect("start the second postgres");
    assert_ne!(first.port(), second.port());
    assert_ne!(first.data_dir(), second.data_dir());

    first.psql("postgres", "CREATE TABLE only_in_first (id INT)").expect("create a table with psql");
    for (server, expected) in [(&first, Some("only_in_first")), (&second, None)] {
        let pool = pg_pool(&server.admin_url()).await;
        let table: Option<String> = sqlx::query_scalar("SELECT to_regclass('only_in_first')::text")
            .fetch_one(&pool)
            .await
            .expect("look the table up");
        assert_eq!(table.as_deref(), expected);
    }
}

#[test]
fn postgres_psql_returns_rows() {
    let postgres = Postgres::start().expect("start postgres");
    let out = postgres.psql("postgres", "SELECT 1, 'a' UNION ALL SELECT 2, 'b'").expect("run a query with psql");
    assert_eq!(out, "1|a\n2|b\n");
    let err = postgres.psql("postgres", "SELECT * FROM no_such_table").expect_err("psql stops on errors");
    assert!(err.to_string().contains("no_such_table"), "{err}");
}

#[test]
fn postgres_with_a_missing_binary_is_a_loud_error() {
    let empty = tempfile::tempdir().expect("create a temp dir");
    let err = Postgres::builder()
        .bin_dir(empty.path())
        .start()
        .expect_err("there are no PostgreSQL programs in an empty directory");
    match &err {
        HarnessError::MissingBinary { binary, package, .. } => {
            assert_eq!(binary, "initdb");
            assert_eq!(*package, "postgresql");
        }
        other => panic!("expected MissingBinary, got {other:?}"),
    }
    let message = err.to_string();
    assert!(message.contains("`initdb` was not found"), "{message}");
    assert!(message.contains(&empty.path().display().to_string()), "{message}");
    assert!(message.contains("apt-get install postgresql"), "{message}");
}

#[test]
fn dropping_postgres_stops_it_and_removes_its_directory() {
    let postgres = Postgres::start().expect("start postgres");
    let port = postgres.port();
    let data_dir = postgres.data_dir();
    let dir = data_dir.parent().map(Path::to_path_buf).expect("the data dir has a parent");
    assert!(data_dir.join("PG_VERSION").is_file());
    drop(postgres);
    assert!(port_is_closed(port), "the server must be gone");
    assert!(!dir.exists(), "{} must be removed", dir.display());
}
