//! The API's OpenAPI 3.1 document, derived from the handlers' `#[utoipa::path]`s and the
//! types they take and give. Served at `GET /v1/openapi.json` and committed as
//! `docs/openapi.json`; `orchestrator/tests/openapi.rs` fails when the two differ
//! (regenerate with `UPDATE_OPENAPI=1 cargo nextest run -p orchestrator --test openapi`).

use std::sync::LazyLock;

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::handlers;

/// The document's description of the API.
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "agentfleet orchestrator",
        description = "The operators' HTTP API: task intake, listing, approval, questions, cancellation, retry, \
                       incidents and the kill switch. Tokens are HS256 JWTs (`fleetctl token issue`) with a role: viewer reads, \
                       operator also submits and drives tasks, admin also pulls the kill switch. See \
                       docs/operations.md, \"HTTP API\".",
        license(name = "MIT OR Apache-2.0"),
    ),
    paths(
        handlers::submit,
        handlers::list,
        handlers::get_task,
        handlers::approve,
        handlers::answer,
        handlers::cancel,
        handlers::retry,
        handlers::questions,
        handlers::open_incident,
        handlers::incidents,
        handlers::get_incident,
        handlers::resolve_incident,
        handlers::kill,
        handlers::resume,
        handlers::healthz,
        handlers::readyz,
        handlers::metrics,
        handlers::openapi,
    ),
    modifiers(&Bearer),
    tags(
        (name = "tasks", description = "Tasks and their XP cycle"),
        (name = "questions", description = "Workers' questions for a person"),
        (name = "incidents", description = "Incidents: open (operator), list and show (viewer), resolve (admin)"),
        (name = "fleet", description = "The kill switch (admin)"),
        (name = "health", description = "Liveness, readiness, metrics and this document; no token"),
    )
)]
pub struct ApiDoc;

/// Adds the `bearer` security scheme the paths name.
struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some("An HS256 JWT from `fleetctl token issue --role viewer|operator|admin`"))
                    .build(),
            ),
        );
    }
}

/// The document as pretty JSON with a final newline (as committed in docs/openapi.json).
pub fn json() -> String {
    static DOC: LazyLock<String> = LazyLock::new(|| {
        let mut text = ApiDoc::openapi().to_pretty_json().unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
        text.push('\n');
        text
    });
    DOC.clone()
}
