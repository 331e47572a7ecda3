//! Redis losing its data (FLUSHALL stands in for a crash without a persisted AOF, a lost
//! volume or a fresh replica): the orchestrator notices through its sentinel and issues
//! every open step again at once, and restores the kill record through the budget
//! manager, instead of waiting for the step deadline. A Redis holding another value is not
//! this fleet's, and nothing is re-issued into it.
#![allow(clippy::unwrap_used)]

mod support;

use axum::http::{Method, StatusCode};
use envelope::{Payload, Role};
use orchestrator::api::auth::ApiRole;
use orchestrator::sentinel::{Check, KEY, check};
use orchestrator::tasks::Actor;
use serde_json::json;

async fn flushall(app: &support::App) {
    let mut c = app.redis.get().await.unwrap();
    let () = redis::cmd("FLUSHALL").query_async(&mut c).await.unwrap();
}

async fn dev_assignments(app: &support::App) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox WHERE stream = 'fleet:tasks:dev'")
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_redis_that_lost_its_data_gets_every_open_step_again_at_once() {
    let app = support::app(|_| {}).await;
    let token = app.token(ApiRole::Operator, "olga");
    let body = json!({"title": "Fix it", "instructions": "Fix calc.py", "risk": "LOW"});
    let created = app.call(Method::POST, "/v1/tasks", &token, Some(&body)).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    app.engine.tick().await.unwrap();
    let first = app.last_assignment(Role::Dev).await;
    assert_eq!(dev_assignments(&app).await, 1);

    assert_eq!(check(&app.engine, &app.redis).await.unwrap(), Check::Initialised);
    assert_eq!(check(&app.engine, &app.redis).await.unwrap(), Check::Intact);
    assert_eq!(app.engine.tick().await.unwrap(), 0, "nothing to re-issue while Redis is intact");

    flushall(&app).await;
    assert_eq!(check(&app.engine, &app.redis).await.unwrap(), Check::Recovered(1));
    assert_eq!(app.engine.tick().await.unwrap(), 1, "the next tick issues the step again");
    let second = app.last_assignment(Role::Dev).await;
    assert_ne!(first.id, second.id, "a new assignment, under the current epoch");
    assert_eq!(dev_assignments(&app).await, 2);
    assert_eq!(check(&app.engine, &app.redis).await.unwrap(), Check::Intact, "the sentinel is back");
    let audited: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_trail WHERE action = 'fleet.redis_lost'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(audited, 1);
    // The epoch is 0 (never engaged): there is no kill record to restore.
    let controls: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE stream = 'fleet:control:budget'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(controls, 0);
}

#[tokio::test]
async fn the_kill_record_is_restored_through_the_budget_manager() {
    let app = support::app(|_| {}).await;
    assert_eq!(check(&app.engine, &app.redis).await.unwrap(), Check::Initialised);
    let epoch = app.engine.kill(&Actor::operator("olga"), "drill").await.unwrap();
    assert_eq!(epoch, 1);
    let before: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE stream = 'fleet:control:budget'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    flushall(&app).await;
    assert_eq!(check(&app.engine, &app.redis).await.unwrap(), Check::Recovered(0));
    let frames: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT frame FROM outbox WHERE stream = 'fleet:control:budget' ORDER BY id")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(frames.len() as i64, before + 1, "one pause: the fleet is halted, so no resume follows");
    let env = support::verify_as(Role::Budget, "fleet:control:budget", frames.last().unwrap());
    match &env.payload {
        Payload::ControlPause(p) => assert_eq!(p.epoch, 1, "the same epoch, not a new engagement"),
        other => panic!("expected a pause, got {other:?}"),
    }
}

#[tokio::test]
async fn another_fleets_redis_is_left_alone() {
    let app = support::app(|_| {}).await;
    assert_eq!(check(&app.engine, &app.redis).await.unwrap(), Check::Initialised);
    let mut c = app.redis.get().await.unwrap();
    let () = redis::cmd("SET").arg(KEY).arg("someone-else").query_async(&mut c).await.unwrap();
    assert_eq!(check(&app.engine, &app.redis).await.unwrap(), Check::Foreign);
    let audited: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_trail WHERE action = 'fleet.redis_lost'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(audited, 0);
}
