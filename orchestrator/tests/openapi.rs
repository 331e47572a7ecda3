//! The committed docs/openapi.json is the document the code generates, and the API serves
//! that document at `GET /v1/openapi.json` without a token.
//!
//! After changing a route or a type it shows, regenerate the file with
//! `UPDATE_OPENAPI=1 cargo nextest run -p orchestrator --test openapi`.
#![allow(clippy::unwrap_used)]

mod support;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use tower::ServiceExt;

const COMMITTED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");

#[test]
fn the_committed_document_is_the_generated_one() {
    let generated = orchestrator::api::openapi::json();
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(COMMITTED, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(COMMITTED).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/openapi.json differs from the document the code generates; regenerate it with \
         `UPDATE_OPENAPI=1 cargo nextest run -p orchestrator --test openapi` and commit it"
    );
    let doc: serde_json::Value = serde_json::from_str(&generated).unwrap();
    for path in ["/v1/questions", "/v1/tasks/{id}/answer", "/v1/tasks/{id}/cancel", "/v1/tasks/{id}/retry"] {
        assert!(doc["paths"].get(path).is_some(), "{path} is not documented");
    }
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
}

#[tokio::test]
async fn the_api_serves_it_without_a_token() {
    let app = support::app(|_| {}).await;
    let req = Request::get("/v1/openapi.json").body(Body::empty()).unwrap();
    let resp = app.router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 22).await.unwrap();
    assert_eq!(String::from_utf8(bytes.to_vec()).unwrap(), orchestrator::api::openapi::json());
}
