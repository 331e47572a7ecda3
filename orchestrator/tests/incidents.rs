//! Incidents (issue 14, item 1) through the HTTP API on a real Postgres: who may open,
//! see and resolve them, what a fix task is, and the incidents the engine opens by itself
//! (a burst of refused envelopes from one sender, a budget kill). The freeze they put on
//! pushes is checked with the real push loop in tests/proxy.rs.
#![allow(clippy::unwrap_used)]

mod support;

use axum::http::{Method, StatusCode};
use envelope::{Envelope, Instance, Role, Sender, streams};
use orchestrator::api::auth::ApiRole;
use orchestrator::tasks::Actor;
use serde_json::{Value, json};

const REPO: &str = "https://git.example/app.git";

async fn audit_actions(app: &support::App, like: &str) -> Vec<(String, String, Value)> {
    sqlx::query_as("SELECT action, actor_instance, details FROM audit_trail WHERE action LIKE $1 ORDER BY seq")
        .bind(like)
        .fetch_all(&app.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_open_incidents_viewers_read_them_and_only_an_admin_resolves_them() {
    let app = support::app(|cfg| cfg.repositories.allowed_hosts = vec!["git.example".into()]).await;
    let viewer = app.token(ApiRole::Viewer, "vera");
    let olga = app.token(ApiRole::Operator, "olga");
    let root = app.token(ApiRole::Admin, "root");
    let task = app
        .call(Method::POST, "/v1/tasks", &olga, Some(&json!({"title": "t", "instructions": "i", "repository": REPO})))
        .await
        .json()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let body = json!({
        "severity": "critical",
        "title": "Deploy key leaked in task output password=hunter2hunter2",
        "repository": REPO,
        "tasks": [task],
        "details": {"found_by": "olga", "note": "password=hunter2hunter2"},
        "fix": {"instructions": "Remove the deploy key from config/ and rotate it", "scope": ["config/"]},
    });
    assert_eq!(app.call(Method::POST, "/v1/incidents", &viewer, Some(&body)).await.status, StatusCode::FORBIDDEN);
    let opened = app.call(Method::POST, "/v1/incidents", &olga, Some(&body)).await;
    assert_eq!(opened.status, StatusCode::CREATED, "{}", opened.text);
    let inc = opened.json();
    let id = inc["id"].as_str().unwrap().to_owned();
    assert_eq!((inc["severity"].as_str(), inc["state"].as_str()), (Some("critical"), Some("open")));
    assert_eq!((inc["trigger"].as_str(), inc["opened_by"].as_str()), (Some("operator"), Some("olga")));
    assert_eq!(inc["freezes_merges"], true);
    assert!(!opened.text.contains("hunter2"), "secrets redacted: {}", opened.text);
    let links = inc["tasks"].as_array().unwrap();
    assert_eq!(links.len(), 2, "{links:?}");
    assert_eq!(links[0], json!({"task_id": task, "link": "cause"}));
    assert_eq!(links[1]["link"], "fix");

    // The fix task starts at Refactor, CRITICAL (a second person approves it), first in line.
    let fix_id = links[1]["task_id"].as_str().unwrap();
    let fix = app.call(Method::GET, &format!("/v1/tasks/{fix_id}"), &viewer, None).await.json();
    assert_eq!((fix["state"].as_str(), fix["risk"].as_str()), (Some("refactor"), Some("CRITICAL")));
    assert_eq!(fix["spec"]["repository"], REPO);
    let priority: i16 = sqlx::query_scalar("SELECT priority FROM tasks WHERE id = $1::uuid")
        .bind(fix_id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(priority, 1);
    let assign = app.last_assignment(Role::Refactor).await;
    assert_eq!(assign.task_id.map(|t| t.to_string()).as_deref(), Some(fix_id));

    // Viewers list and show; the list holds open ones unless asked for all.
    let list = app.call(Method::GET, "/v1/incidents", &viewer, None).await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.text);
    assert_eq!(list.json()["incidents"].as_array().unwrap().len(), 1);
    let shown = app.call(Method::GET, &format!("/v1/incidents/{id}"), &viewer, None).await;
    assert_eq!(shown.json()["id"], id.as_str());

    // Resolving takes an admin and a resolution, once.
    let uri = format!("/v1/incidents/{id}/resolve");
    let by_operator = app.call(Method::POST, &uri, &olga, Some(&json!({"resolution": "done"}))).await;
    assert_eq!(by_operator.status, StatusCode::FORBIDDEN, "{}", by_operator.text);
    let empty = app.call(Method::POST, &uri, &root, Some(&json!({"resolution": "  "}))).await;
    assert_eq!(empty.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", empty.text);
    assert!(empty.json()["error"].as_str().unwrap().contains("`resolution` must be 1 to 2000 characters"));
    let done = app.call(Method::POST, &uri, &root, Some(&json!({"resolution": "key rotated, history purged"}))).await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.text);
    let done = done.json();
    assert_eq!((done["state"].as_str(), done["resolved_by"].as_str()), (Some("resolved"), Some("root")));
    let again = app.call(Method::POST, &uri, &root, Some(&json!({"resolution": "again"}))).await;
    assert_eq!(again.status, StatusCode::CONFLICT, "{}", again.text);
    assert!(
        app.call(Method::GET, "/v1/incidents", &viewer, None).await.json()["incidents"].as_array().unwrap().is_empty()
    );
    assert_eq!(
        app.call(Method::GET, "/v1/incidents?all=true", &viewer, None).await.json()["incidents"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // The budget manager is told, through the outbox, signed for it: it pages people.
    let frames: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT frame FROM outbox WHERE stream = 'fleet:control:budget' ORDER BY id")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(frames.len(), 1);
    let told = support::verify_as(Role::Budget, "fleet:control:budget", &frames[0]);
    let envelope::Payload::IncidentOpened(told) = &told.payload else { panic!("{:?}", told.payload) };
    assert_eq!((told.incident.to_string(), told.severity.as_str()), (id.clone(), "critical"));
    assert_eq!((told.opened_by.as_str(), told.repository.as_deref()), ("olga", Some(REPO)));
    assert_eq!(told.tasks.len(), 2);
    assert!(!told.title.contains("hunter2"), "{}", told.title);
    // A low incident is recorded, not paged.
    let low = json!({"severity": "low", "title": "a flaky test looked odd"});
    assert_eq!(app.call(Method::POST, "/v1/incidents", &olga, Some(&low)).await.status, StatusCode::CREATED);
    let told: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE stream = 'fleet:control:budget'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(told, 1);

    // The audit trail's incident category: opened, each link, resolved by whom.
    let rows = audit_actions(&app, "incident.%").await;
    let actions: Vec<&str> = rows.iter().map(|(a, _, _)| a.as_str()).collect();
    assert_eq!(
        actions,
        ["incident.opened", "incident.linked", "incident.linked", "incident.resolved", "incident.opened"]
    );
    assert_eq!(rows[3].1, "root");
    assert_eq!(rows[3].2["resolution"], "key rotated, history purged");
    assert!(!rows[0].2.to_string().contains("hunter2"), "audit details redacted: {}", rows[0].2);
    // A long title in a script of several bytes a character still makes a valid fix task.
    let wide = json!({"severity": "low", "title": "é".repeat(200), "repository": REPO, "fix": {"instructions": "fix"}});
    let wide = app.call(Method::POST, "/v1/incidents", &olga, Some(&wide)).await;
    assert_eq!(wide.status, StatusCode::CREATED, "{}", wide.text);
    let wide_fix = wide.json()["tasks"][0]["task_id"].as_str().unwrap().to_owned();
    let title = app.call(Method::GET, &format!("/v1/tasks/{wide_fix}"), &viewer, None).await.json()["title"].clone();
    assert!(title.as_str().unwrap().len() <= 200 && title.as_str().unwrap().starts_with("Incident fix: é"), "{title}");
    app.call(
        Method::POST,
        &format!("/v1/incidents/{}/resolve", wide.json()["id"].as_str().unwrap()),
        &root,
        Some(&json!({"resolution": "test"})),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_incident_requests_say_what_is_wrong() {
    let app = support::app(|_| {}).await;
    let olga = app.token(ApiRole::Operator, "olga");
    let cases = [
        (json!({"severity": "urgent", "title": "x"}), StatusCode::UNPROCESSABLE_ENTITY, "severity"),
        (json!({"severity": "high", "title": " "}), StatusCode::UNPROCESSABLE_ENTITY, "`title` must be 1 to 200"),
        (
            json!({"severity": "high", "title": "x", "trigger": "budget_kill"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "cannot be reported through the API; use one of operator, audit_verify, quarantine",
        ),
        (
            json!({"severity": "high", "title": "x", "fix": {"instructions": "fix"}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "a `fix` task needs the incident's `repository`",
        ),
        (
            json!({"severity": "high", "title": "x", "repository": "https://evil.example/x.git", "fix": {"instructions": "fix"}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "repositories.allowed_hosts",
        ),
        (
            json!({"severity": "low", "title": "x", "tasks": ["0190a5e2-7c1d-7b3e-9f00-1a2b3c4d5e6f"]}),
            StatusCode::NOT_FOUND,
            "task 0190a5e2-7c1d-7b3e-9f00-1a2b3c4d5e6f not found",
        ),
        (json!({"severity": "low", "title": "x", "details": [1]}), StatusCode::UNPROCESSABLE_ENTITY, "JSON object"),
    ];
    for (body, status, says) in cases {
        let a = app.call(Method::POST, "/v1/incidents", &olga, Some(&body)).await;
        assert_eq!(a.status, status, "{body}: {}", a.text);
        assert!(a.text.contains(says), "{body}: {}", a.text);
    }
    let missing = app.call(Method::GET, "/v1/incidents/0190a5e2-7c1d-7b3e-9f00-1a2b3c4d5e6f", &olga, None).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert!(missing.text.contains("fleetctl incident list --all"), "{}", missing.text);
    let bad = app.call(Method::GET, "/v1/incidents/nope", &olga, None).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(bad.text.contains("is not an incident id"), "{}", bad.text);
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM incidents").fetch_one(&app.pool).await.unwrap();
    assert_eq!(count, 0, "nothing stored from a refused request");
}

/// A compromised worker with its own keys sends junk past the audited burst: one high
/// incident names it, however long the burst lasts; a budget kill opens a medium one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_refusals_from_one_sender_and_a_budget_kill_open_incidents_once() {
    let app = support::app(|_| {}).await;
    let olga = app.token(ApiRole::Operator, "olga");
    let created = app.call(Method::POST, "/v1/tasks", &olga, Some(&json!({"title": "t", "instructions": "i"}))).await;
    let task: uuid::Uuid = created.json()["id"].as_str().unwrap().parse().unwrap();
    let assign = app.last_assignment(Role::Dev).await;
    // Heartbeats from a peer that does not hold the assignment are refused (and audited
    // up to the burst); the first one from dev-1 binds it.
    let beat = |instance: &str| {
        let mut env = Envelope::new(
            Sender { role: Role::Dev, instance: Instance::parse(instance).unwrap() },
            Role::Orchestrator,
            bus::now_ms(),
            60_000,
            0,
            envelope::Heartbeat { seq: 1, busy: true }.into(),
        );
        env.task_id = Some(task);
        env.causation_id = Some(assign.id);
        support::deliver(&env, streams::HEARTBEATS)
    };
    app.engine.heartbeat(&beat("dev-1")).await.unwrap();
    for round in 0..2 {
        for _ in 0..40 {
            app.engine.heartbeat(&beat("dev-evil")).await.unwrap();
        }
        app.engine.flush_refusal_summaries(true).await.unwrap();
        let open = app.engine.incidents(false, 10).await.unwrap();
        assert_eq!(open.len(), 1, "round {round}: one incident per sender, {open:?}");
        let i = &open[0];
        assert_eq!((i.trigger.as_str(), i.severity.as_str()), ("rejection_burst", "high"));
        assert_eq!(i.details["sender"], json!({"role": "dev", "instance": "dev-evil"}));
        assert_eq!(i.details["next"], "fleetctl quarantine dev/dev-evil");
        assert!(i.freezes_merges && i.repository.is_none(), "a possibly compromised worker freezes every repository");
    }

    let budget = Actor { role: "budget".into(), instance: "budget-0".into() };
    let epoch = app.engine.kill_at(&budget, 1, "daily budget spent: $50.00 of $50.00").await.unwrap();
    assert_eq!(epoch, 1);
    app.engine.kill_at(&budget, 1, "daily budget spent: $50.00 of $50.00").await.unwrap();
    let all = app.engine.incidents(false, 10).await.unwrap();
    let kills: Vec<_> = all.iter().filter(|i| i.trigger == "budget_kill").collect();
    assert_eq!(kills.len(), 1, "{all:?}");
    assert_eq!(kills[0].severity.as_str(), "medium");
    assert!(!kills[0].freezes_merges);
    assert_eq!(kills[0].details["epoch"], 1);
    assert_eq!(kills[0].opened_by, "orchestrator/orchestrator-0");
    // An operator's kill is the operator's act, not an incident.
    app.engine.resume(&Actor::operator("root")).await.unwrap();
    app.engine.kill(&Actor::operator("root"), "maintenance").await.unwrap();
    assert_eq!(app.engine.incidents(false, 10).await.unwrap().len(), 2);
}

/// A step whose sandbox hit containment limits (reported in `task.result`'s `containment`)
/// opens one high incident per task that freezes its repository; what a compromised worker
/// writes there never reaches the title as text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_that_hit_its_cage_opens_a_high_incident_for_the_repository() {
    let app = support::app(|cfg| cfg.repositories.allowed_hosts = vec!["git.example".into()]).await;
    let olga = app.token(ApiRole::Operator, "olga");
    let created = app
        .call(Method::POST, "/v1/tasks", &olga, Some(&json!({"title": "t", "instructions": "i", "repository": REPO})))
        .await;
    let task: uuid::Uuid = created.json()["id"].as_str().unwrap().parse().unwrap();
    for kinds in [vec!["network", "rm -rf / <b>"], vec!["oom_killed"]] {
        let assign = app.last_assignment(Role::Dev).await;
        let mut env = Envelope::new(
            Sender { role: Role::Dev, instance: Instance::parse("dev-1").unwrap() },
            Role::Orchestrator,
            bus::now_ms(),
            60_000,
            0,
            envelope::TaskResult {
                attempt: 1,
                status: envelope::Status::Error,
                summary: "tests could not run".into(),
                findings: vec![],
                diff: None,
                log: None,
                change_sha256: None,
                calls: Vec::new(),
                containment: kinds.iter().map(|k| (*k).to_owned()).collect(),
            }
            .into(),
        );
        env.task_id = Some(task);
        env.causation_id = Some(assign.id);
        app.engine.apply_result(&support::deliver(&env, streams::RESULTS)).await.unwrap();
    }
    let open = app.engine.incidents(false, 10).await.unwrap();
    assert_eq!(open.len(), 1, "one incident per task: {open:?}");
    let i = &open[0];
    assert_eq!((i.trigger.as_str(), i.severity.as_str()), ("sandbox_containment", "high"));
    assert_eq!((i.repository.as_deref(), i.freezes_merges), (Some(REPO), true));
    assert_eq!(i.details["kinds"], json!(["network", "other"]));
    assert_eq!(i.details["worker"], "dev/dev-1");
    assert!(!i.title.contains("rm -rf") && !i.title.contains('<'), "{}", i.title);
    assert_eq!(i.tasks.len(), 1);
    assert_eq!(i.tasks[0].task_id, task);
}
