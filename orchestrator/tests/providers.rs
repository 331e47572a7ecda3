//! The model providers against a local HTTP server that records and checks what they send
//! and answers with the bodies the providers document; and the scripted provider against
//! fixture files.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use orchestrator::providers::{
    AnyProvider, Completion, CompletionRequest, Message, Provider, ProviderConfig, ProviderError, TokenUsage, ToolCall,
    ToolSpec, build, build_with_env, input_token_bound,
};
use serde_json::{Value, json};
use uuid::Uuid;

const KEY: &str = "sk-test-5eCr3t-KEY-0123456789";

/// One request as the server received it.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    path: String,
    headers: HeaderMap,
    body: Value,
}

/// What the server answers to every request.
#[derive(Clone)]
struct Reply {
    status: u16,
    body: String,
    headers: Vec<(&'static str, &'static str)>,
    delay: Duration,
}

impl Reply {
    fn json(status: u16, body: Value) -> Self {
        Reply { status, body: body.to_string(), headers: Vec::new(), delay: Duration::ZERO }
    }
}

#[derive(Clone)]
struct Server {
    /// The answer to the n-th request; the last one answers every request after it.
    replies: Arc<Vec<Reply>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

async fn record(
    State(server): State<Server>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let reply = {
        let mut seen = server.seen.lock().expect("not poisoned");
        seen.push(Seen { method, path: uri.path().to_owned(), headers, body });
        server.replies[(seen.len() - 1).min(server.replies.len() - 1)].clone()
    };
    tokio::time::sleep(reply.delay).await;
    let mut headers = HeaderMap::new();
    headers.insert("content-type", "application/json".parse().expect("valid"));
    for (name, value) in &reply.headers {
        headers.insert(*name, value.parse().expect("valid"));
    }
    (StatusCode::from_u16(reply.status).expect("valid status"), headers, reply.body)
}

/// Starts a server on 127.0.0.1:0 answering `reply` on every path; returns its base URL
/// and the requests it received.
async fn serve(reply: Reply) -> (String, Arc<Mutex<Vec<Seen>>>) {
    serve_each(vec![reply]).await
}

/// [`serve`], answering the n-th request with `replies[n]` (and the last with the last).
async fn serve_each(replies: Vec<Reply>) -> (String, Arc<Mutex<Vec<Seen>>>) {
    assert!(!replies.is_empty());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let app = Router::new().fallback(record).with_state(Server { replies: Arc::new(replies), seen: seen.clone() });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), seen)
}

fn only_request(seen: &Arc<Mutex<Vec<Seen>>>) -> Seen {
    let seen = seen.lock().expect("not poisoned");
    assert_eq!(seen.len(), 1, "expected exactly one request, got {seen:?}");
    seen[0].clone()
}

fn header<'a>(seen: &'a Seen, name: &str) -> Option<&'a str> {
    seen.headers.get(name).map(|v| v.to_str().expect("ascii header"))
}

fn config(text: &str) -> ProviderConfig {
    toml::from_str(text).expect("valid provider config")
}

fn openai(base: &str, key: Option<&str>) -> AnyProvider {
    let key = key.map(|k| format!("api_key = \"{k}\"\n")).unwrap_or_default();
    build(&config(&format!("kind = \"openai\"\nbase_url = \"{base}/v1\"\ntimeout_secs = 5\n{key}"))).expect("builds")
}

fn anthropic(base: &str) -> AnyProvider {
    build(&config(&format!("kind = \"anthropic\"\nbase_url = \"{base}\"\napi_key = \"{KEY}\"\ntimeout_secs = 5\n")))
        .expect("builds")
}

fn conversation() -> CompletionRequest {
    CompletionRequest {
        model: "the-model".into(),
        system: Some("You are the Dev agent. Answer with a unified diff.".into()),
        messages: vec![
            Message::user("Fix the failing test in src/lib.rs."),
            Message::assistant("Which test fails?"),
            Message::user("tests::adds_two"),
        ],
        tools: Vec::new(),
        max_tokens: 512,
        temperature: Some(0.25),
        task_id: Some(Uuid::now_v7()),
        role: "dev".into(),
    }
}

fn simple(system: Option<&str>) -> CompletionRequest {
    CompletionRequest {
        system: system.map(str::to_owned),
        messages: vec![Message::user("hello")],
        temperature: None,
        ..conversation()
    }
}

/// Every request the server received, in order.
fn all_requests(seen: &Arc<Mutex<Vec<Seen>>>) -> Vec<Seen> {
    seen.lock().expect("not poisoned").clone()
}

/// The tools of the tool-loop tests.
fn tools() -> Vec<ToolSpec> {
    vec![
        ToolSpec {
            name: "search".into(),
            description: "Search the workspace for a pattern.".into(),
            parameters: json!({"type": "object", "properties": {"pattern": {"type": "string"}}, "required": ["pattern"]}),
        },
        ToolSpec {
            name: "edit".into(),
            description: "Replace text in a file.".into(),
            parameters: json!({"type": "object", "properties": {"path": {"type": "string"}}}),
        },
    ]
}

/// The first request of a tool loop: the task and the tools.
fn tool_loop() -> CompletionRequest {
    CompletionRequest {
        tools: tools(),
        messages: vec![Message::user("Fix the failing test in src/lib.rs.")],
        ..conversation()
    }
}

const FOUND: &str = "src/lib.rs:1: pub fn add(a: i32, b: i32) -> i32 { a - b }";
const NOT_JSON: &str = "{\"path\": \"src/lib.rs\", \"find\": ";

/// OpenAI's documented chat.completion object.
fn openai_answer() -> Value {
    json!({
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "object": "chat.completion",
        "created": 1741570283,
        "model": "gpt-4o-2024-08-06",
        "choices": [{
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "--- a/src/lib.rs\n+++ b/src/lib.rs\n",
                "refusal": null,
                "annotations": []
            },
            "logprobs": null,
            "finish_reason": "stop"
        }],
        "usage": {
            "prompt_tokens": 1117,
            "completion_tokens": 46,
            "total_tokens": 1163,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0
            }
        },
        "service_tier": "default",
        "system_fingerprint": "fp_fc9f1d7035"
    })
}

/// Anthropic's documented Messages answer, with a tool call between two text blocks.
fn anthropic_answer() -> Value {
    json!({
        "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5-20250929",
        "content": [
            {"type": "text", "text": "Here is the fix:\n"},
            {"type": "tool_use", "id": "toolu_01", "name": "noop", "input": {}},
            {"type": "text", "text": "--- a/src/lib.rs\n+++ b/src/lib.rs\n"}
        ],
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "usage": {
            "input_tokens": 2095,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 503,
            "service_tier": "standard"
        }
    })
}

// --- OpenAI-compatible ------------------------------------------------------------------

#[tokio::test]
async fn openai_sends_the_documented_request_and_reads_the_answer() {
    let (base, seen) = serve(Reply::json(200, openai_answer())).await;
    let completion = openai(&base, Some(KEY)).complete(&conversation()).await.expect("completes");

    assert_eq!(
        completion,
        Completion {
            text: "--- a/src/lib.rs\n+++ b/src/lib.rs\n".into(),
            tool_calls: Vec::new(),
            usage: TokenUsage { input_tokens: 1117, output_tokens: 46 },
            model: "gpt-4o-2024-08-06".into(),
            finish_reason: Some("stop".into()),
        }
    );
    let req = only_request(&seen);
    assert_eq!(req.method, Method::POST);
    assert_eq!(req.path, "/v1/chat/completions");
    assert_eq!(header(&req, "authorization"), Some(format!("Bearer {KEY}").as_str()));
    assert_eq!(header(&req, "content-type"), Some("application/json"));
    assert_eq!(req.body["model"], "the-model");
    assert_eq!(req.body["max_tokens"], 512);
    let temperature = req.body["temperature"].as_f64().expect("temperature sent");
    assert!((temperature - 0.25).abs() < 1e-6, "{temperature}");
    assert_eq!(
        req.body["messages"],
        json!([
            {"role": "system", "content": "You are the Dev agent. Answer with a unified diff."},
            {"role": "user", "content": "Fix the failing test in src/lib.rs."},
            {"role": "assistant", "content": "Which test fails?"},
            {"role": "user", "content": "tests::adds_two"}
        ])
    );
    assert!(req.body.get("system").is_none(), "OpenAI takes the system prompt as a message");
}

#[tokio::test]
async fn openai_without_key_sends_no_authorization_and_no_unset_fields() {
    let (base, seen) = serve(Reply::json(200, openai_answer())).await;
    // Ollama's OpenAI-compatible endpoint wants no key; a trailing slash is fine.
    let provider = build(&config(&format!("kind = \"openai\"\nbase_url = \"{base}/v1/\"\n"))).expect("builds");
    provider.complete(&simple(None)).await.expect("completes");

    let req = only_request(&seen);
    assert_eq!(req.path, "/v1/chat/completions");
    assert_eq!(header(&req, "authorization"), None);
    assert_eq!(req.body["messages"], json!([{"role": "user", "content": "hello"}]));
    assert!(req.body.get("temperature").is_none(), "{}", req.body);
    assert!(req.body.get("tools").is_none(), "no tools, no field: {}", req.body);
}

#[tokio::test]
async fn openai_extra_headers_are_sent() {
    let (base, seen) = serve(Reply::json(200, openai_answer())).await;
    let cfg = config(&format!(
        "kind = \"openai\"\nbase_url = \"{base}/v1\"\n[extra_headers]\nOpenAI-Project = \"proj_abc\"\n"
    ));
    build(&cfg).expect("builds").complete(&simple(None)).await.expect("completes");
    assert_eq!(header(&only_request(&seen), "openai-project"), Some("proj_abc"));
}

#[tokio::test]
async fn openai_null_content_is_empty_text() {
    let mut answer = openai_answer();
    answer["choices"][0]["message"]["content"] = Value::Null;
    answer["choices"][0]["finish_reason"] = json!("content_filter");
    let (base, _seen) = serve(Reply::json(200, answer)).await;
    let completion = openai(&base, Some(KEY)).complete(&simple(None)).await.expect("completes");
    assert_eq!(completion.text, "");
    assert_eq!(completion.finish_reason.as_deref(), Some("content_filter"));
}

/// `openai_answer()` with the message's content, tool calls and finish reason replaced.
fn openai_calls(content: Value, tool_calls: Value, finish_reason: &str) -> Value {
    let mut answer = openai_answer();
    answer["choices"][0]["message"]["content"] = content;
    answer["choices"][0]["message"]["tool_calls"] = tool_calls;
    answer["choices"][0]["finish_reason"] = json!(finish_reason);
    answer
}

#[tokio::test]
async fn openai_carries_tools_calls_and_results_through_a_tool_loop() {
    let turn1 = openai_calls(
        Value::Null,
        json!([{"id": "call_a", "type": "function", "function": {"name": "search", "arguments": "{\"pattern\":\"fn add\"}"}}]),
        "tool_calls",
    );
    let turn2 = openai_calls(
        json!("Editing."),
        json!([
            {"id": "call_b", "type": "function", "function": {"name": "edit", "arguments": NOT_JSON}},
            {"id": "call_c", "type": "function", "function": {"name": "search", "arguments": "{\"pattern\": \"a - b\"}"}}
        ]),
        "tool_calls",
    );
    let (base, seen) =
        serve_each(vec![Reply::json(200, turn1), Reply::json(200, turn2), Reply::json(200, openai_answer())]).await;
    let provider = openai(&base, Some(KEY));
    let mut req = tool_loop();

    // Turn 1: content null, one call.
    let first = provider.complete(&req).await.expect("turn 1");
    assert_eq!(first.text, "");
    assert_eq!(
        first.tool_calls,
        [ToolCall { id: "call_a".into(), name: "search".into(), arguments: json!({"pattern": "fn add"}) }]
    );
    assert_eq!(first.finish_reason.as_deref(), Some("tool_calls"));
    req.messages.push(Message::assistant_calls(first.text, first.tool_calls));
    req.messages.push(Message::tool_result("call_a", FOUND, false));

    // Turn 2: text and two calls, the first with arguments that are not JSON.
    let second = provider.complete(&req).await.expect("turn 2: arguments that are not JSON fail nothing");
    assert_eq!(second.text, "Editing.");
    assert_eq!(
        second.tool_calls,
        [
            ToolCall { id: "call_b".into(), name: "edit".into(), arguments: json!(NOT_JSON) },
            ToolCall { id: "call_c".into(), name: "search".into(), arguments: json!({"pattern": "a - b"}) },
        ]
    );
    req.messages.push(Message::assistant_calls(second.text, second.tool_calls));
    req.messages.push(Message::tool_result("call_b", "the arguments are not JSON", true));
    req.messages.push(Message::tool_result("call_c", "no match", false));
    req.messages.push(Message::user("Keep the change minimal."));

    // Turn 3: a plain answer has no calls.
    let third = provider.complete(&req).await.expect("turn 3");
    assert_eq!((third.tool_calls.len(), third.finish_reason.as_deref()), (0, Some("stop")));

    let system = json!({"role": "system", "content": "You are the Dev agent. Answer with a unified diff."});
    let task = json!({"role": "user", "content": "Fix the failing test in src/lib.rs."});
    let call_a = json!({"role": "assistant", "content": null, "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "search", "arguments": "{\"pattern\":\"fn add\"}"}}
    ]});
    let result_a = json!({"role": "tool", "tool_call_id": "call_a", "content": FOUND});
    // The text that was not JSON goes back as it came.
    let calls_bc = json!({"role": "assistant", "content": "Editing.", "tool_calls": [
        {"id": "call_b", "type": "function", "function": {"name": "edit", "arguments": NOT_JSON}},
        {"id": "call_c", "type": "function", "function": {"name": "search", "arguments": "{\"pattern\":\"a - b\"}"}}
    ]});
    let result_b = json!({"role": "tool", "tool_call_id": "call_b", "content": "ERROR: the arguments are not JSON"});
    let result_c = json!({"role": "tool", "tool_call_id": "call_c", "content": "no match"});
    let nudge = json!({"role": "user", "content": "Keep the change minimal."});
    let expected = [
        json!([system, task]),
        json!([system, task, call_a, result_a]),
        json!([system, task, call_a, result_a, calls_bc, result_b, result_c, nudge]),
    ];
    let wire_tools = json!([
        {"type": "function", "function": {
            "name": "search",
            "description": "Search the workspace for a pattern.",
            "parameters": {"type": "object", "properties": {"pattern": {"type": "string"}}, "required": ["pattern"]}
        }},
        {"type": "function", "function": {
            "name": "edit",
            "description": "Replace text in a file.",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}
        }}
    ]);
    let requests = all_requests(&seen);
    assert_eq!(requests.len(), 3);
    for (i, (request, messages)) in requests.iter().zip(expected).enumerate() {
        assert_eq!(request.body["tools"], wire_tools, "request {i}");
        assert_eq!(request.body["messages"], messages, "request {i}");
        assert!(request.body.get("tool_choice").is_none(), "request {i}: the model chooses");
    }
}

#[tokio::test]
async fn openai_reads_tool_call_arguments_leniently() {
    // A compatible server that sends the object itself, one that sends no arguments, and an
    // empty string (not JSON): none fails the call.
    let answer = openai_calls(
        Value::Null,
        json!([
            {"id": "c1", "type": "function", "function": {"name": "a", "arguments": {"x": 1}}},
            {"id": "c2", "type": "function", "function": {"name": "b"}},
            {"id": "c3", "type": "function", "function": {"name": "c", "arguments": ""}}
        ]),
        "tool_calls",
    );
    let (base, _seen) = serve(Reply::json(200, answer)).await;
    let completion = openai(&base, None).complete(&simple(None)).await.expect("completes");
    let arguments: Vec<&Value> = completion.tool_calls.iter().map(|c| &c.arguments).collect();
    assert_eq!(arguments, [&json!({"x": 1}), &json!({}), &json!("")]);

    // `tool_calls: null` is no calls; a call without an id is malformed.
    let (base, _seen) = serve(Reply::json(200, openai_calls(json!("hi"), Value::Null, "stop"))).await;
    assert_eq!(openai(&base, None).complete(&simple(None)).await.expect("completes").tool_calls, []);
    let answer = openai_calls(Value::Null, json!([{"type": "function", "function": {"name": "a"}}]), "tool_calls");
    let (base, _seen) = serve(Reply::json(200, answer)).await;
    let err = openai(&base, None).complete(&simple(None)).await.expect_err("no id");
    assert!(err.to_string().contains("choices[0].message.tool_calls[0].id"), "{err}");
}

// --- Anthropic --------------------------------------------------------------------------

#[tokio::test]
async fn anthropic_sends_the_documented_request_and_reads_the_answer() {
    let (base, seen) = serve(Reply::json(200, anthropic_answer())).await;
    let completion = anthropic(&base).complete(&conversation()).await.expect("completes");

    assert_eq!(
        completion,
        Completion {
            text: "Here is the fix:\n--- a/src/lib.rs\n+++ b/src/lib.rs\n".into(),
            tool_calls: vec![ToolCall { id: "toolu_01".into(), name: "noop".into(), arguments: json!({}) }],
            usage: TokenUsage { input_tokens: 2095, output_tokens: 503 },
            model: "claude-sonnet-4-5-20250929".into(),
            finish_reason: Some("end_turn".into()),
        }
    );
    let req = only_request(&seen);
    assert_eq!(req.method, Method::POST);
    assert_eq!(req.path, "/v1/messages");
    assert_eq!(header(&req, "x-api-key"), Some(KEY));
    assert_eq!(header(&req, "anthropic-version"), Some("2023-06-01"));
    assert_eq!(header(&req, "content-type"), Some("application/json"));
    assert_eq!(header(&req, "authorization"), None);
    assert_eq!(req.body["model"], "the-model");
    assert_eq!(req.body["max_tokens"], 512);
    assert_eq!(req.body["system"], "You are the Dev agent. Answer with a unified diff.");
    assert_eq!(
        req.body["messages"],
        json!([
            {"role": "user", "content": "Fix the failing test in src/lib.rs."},
            {"role": "assistant", "content": "Which test fails?"},
            {"role": "user", "content": "tests::adds_two"}
        ])
    );
}

#[tokio::test]
async fn anthropic_omits_absent_system_and_sends_the_configured_version() {
    let (base, seen) = serve(Reply::json(200, anthropic_answer())).await;
    let cfg = config(&format!(
        "kind = \"anthropic\"\nbase_url = \"{base}\"\napi_key_env = \"ANTHROPIC_KEY_FOR_TEST\"\nversion = \"2024-01-01\"\n"
    ));
    let provider =
        build_with_env(&cfg, |name| (name == "ANTHROPIC_KEY_FOR_TEST").then(|| KEY.to_owned())).expect("builds");
    provider.complete(&simple(None)).await.expect("completes");

    let req = only_request(&seen);
    assert_eq!(header(&req, "x-api-key"), Some(KEY));
    assert_eq!(header(&req, "anthropic-version"), Some("2024-01-01"));
    assert!(req.body.get("system").is_none(), "{}", req.body);
    assert!(req.body.get("temperature").is_none(), "{}", req.body);
    assert!(req.body.get("tools").is_none(), "no tools, no field: {}", req.body);
}

#[tokio::test]
async fn anthropic_counts_cache_tokens_as_input() {
    let mut answer = anthropic_answer();
    answer["usage"]["cache_creation_input_tokens"] = json!(100);
    answer["usage"]["cache_read_input_tokens"] = json!(1000);
    let (base, _seen) = serve(Reply::json(200, answer)).await;
    let completion = anthropic(&base).complete(&simple(None)).await.expect("completes");
    assert_eq!(completion.usage, TokenUsage { input_tokens: 3195, output_tokens: 503 });
}

#[test]
fn anthropic_needs_a_key() {
    let err = build(&config("kind = \"anthropic\"\n")).expect_err("no key");
    assert!(matches!(err, ProviderError::Config { .. }), "{err:?}");
}

/// An Anthropic answer of `content` blocks, stopped for `stop_reason`.
fn anthropic_blocks(content: Value, stop_reason: &str) -> Value {
    let mut answer = anthropic_answer();
    answer["content"] = content;
    answer["stop_reason"] = json!(stop_reason);
    answer
}

#[tokio::test]
async fn anthropic_carries_tools_calls_and_results_through_a_tool_loop() {
    let turn1 = anthropic_blocks(
        json!([
            {"type": "text", "text": "Searching."},
            {"type": "tool_use", "id": "toolu_a", "name": "search", "input": {"pattern": "fn add"}}
        ]),
        "tool_use",
    );
    let turn2 = anthropic_blocks(
        json!([
            {"type": "tool_use", "id": "toolu_b", "name": "edit", "input": {"path": "src/lib.rs"}},
            {"type": "tool_use", "id": "toolu_c", "name": "search", "input": {"pattern": "a - b"}}
        ]),
        "tool_use",
    );
    let turn3 = anthropic_blocks(json!([{"type": "text", "text": "Done."}]), "end_turn");
    let (base, seen) =
        serve_each(vec![Reply::json(200, turn1), Reply::json(200, turn2), Reply::json(200, turn3)]).await;
    let provider = anthropic(&base);
    let mut req = tool_loop();

    let first = provider.complete(&req).await.expect("turn 1");
    assert_eq!(first.text, "Searching.");
    assert_eq!(
        first.tool_calls,
        [ToolCall { id: "toolu_a".into(), name: "search".into(), arguments: json!({"pattern": "fn add"}) }]
    );
    assert_eq!(first.finish_reason.as_deref(), Some("tool_use"));
    req.messages.push(Message::assistant_calls(first.text, first.tool_calls));
    req.messages.push(Message::tool_result("toolu_a", FOUND, false));

    let second = provider.complete(&req).await.expect("turn 2");
    assert_eq!(second.text, "");
    assert_eq!(
        second.tool_calls,
        [
            ToolCall { id: "toolu_b".into(), name: "edit".into(), arguments: json!({"path": "src/lib.rs"}) },
            ToolCall { id: "toolu_c".into(), name: "search".into(), arguments: json!({"pattern": "a - b"}) },
        ]
    );
    req.messages.push(Message::assistant_calls(second.text, second.tool_calls));
    req.messages.push(Message::tool_result("toolu_b", "no such text in src/lib.rs", true));
    req.messages.push(Message::tool_result("toolu_c", "no match", false));
    req.messages.push(Message::user("Keep the change minimal."));

    let third = provider.complete(&req).await.expect("turn 3");
    assert_eq!(
        (third.text.as_str(), third.tool_calls.len(), third.finish_reason.as_deref()),
        ("Done.", 0, Some("end_turn"))
    );

    let task = json!({"role": "user", "content": "Fix the failing test in src/lib.rs."});
    let call_a = json!({"role": "assistant", "content": [
        {"type": "text", "text": "Searching."},
        {"type": "tool_use", "id": "toolu_a", "name": "search", "input": {"pattern": "fn add"}}
    ]});
    let result_a = json!({"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_a", "content": FOUND, "is_error": false}
    ]});
    // No empty text block before the calls.
    let calls_bc = json!({"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_b", "name": "edit", "input": {"path": "src/lib.rs"}},
        {"type": "tool_use", "id": "toolu_c", "name": "search", "input": {"pattern": "a - b"}}
    ]});
    // Two results and the user's words after them: one user message, roles alternate.
    let results_bc = json!({"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_b", "content": "no such text in src/lib.rs", "is_error": true},
        {"type": "tool_result", "tool_use_id": "toolu_c", "content": "no match", "is_error": false},
        {"type": "text", "text": "Keep the change minimal."}
    ]});
    let expected =
        [json!([task]), json!([task, call_a, result_a]), json!([task, call_a, result_a, calls_bc, results_bc])];
    let wire_tools = json!([
        {
            "name": "search",
            "description": "Search the workspace for a pattern.",
            "input_schema": {"type": "object", "properties": {"pattern": {"type": "string"}}, "required": ["pattern"]}
        },
        {
            "name": "edit",
            "description": "Replace text in a file.",
            "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}
        }
    ]);
    let requests = all_requests(&seen);
    assert_eq!(requests.len(), 3);
    for (i, (request, messages)) in requests.iter().zip(expected).enumerate() {
        assert_eq!(request.body["tools"], wire_tools, "request {i}");
        assert_eq!(request.body["messages"], messages, "request {i}");
        assert_eq!(request.body["system"], "You are the Dev agent. Answer with a unified diff.", "request {i}");
    }
}

#[tokio::test]
async fn anthropic_merges_consecutive_tool_results_into_one_user_message() {
    let (base, seen) = serve(Reply::json(200, anthropic_answer())).await;
    let calls = vec![
        ToolCall { id: "toolu_1".into(), name: "search".into(), arguments: json!({"pattern": "x"}) },
        ToolCall { id: "toolu_2".into(), name: "search".into(), arguments: json!({"pattern": "y"}) },
    ];
    let mut req = tool_loop();
    req.messages.push(Message::assistant_calls("", calls));
    req.messages.push(Message::tool_result("toolu_1", "x found", false));
    req.messages.push(Message::tool_result("toolu_2", "y failed", true));
    anthropic(&base).complete(&req).await.expect("completes");

    let messages = only_request(&seen).body["messages"].clone();
    assert_eq!(messages.as_array().map(Vec::len), Some(3), "{messages}");
    assert_eq!(
        messages[2],
        json!({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "x found", "is_error": false},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": "y failed", "is_error": true}
        ]})
    );
}

// --- Errors -----------------------------------------------------------------------------

#[tokio::test]
async fn rate_limit_is_retryable_with_the_providers_message_and_retry_after() {
    let mut reply = Reply::json(
        429,
        json!({"error": {
            "message": "Rate limit reached for gpt-4o in organization org-x on tokens per min (TPM).",
            "type": "tokens", "param": null, "code": "rate_limit_exceeded"
        }}),
    );
    reply.headers.push(("retry-after", "7"));
    let (base, _seen) = serve(reply).await;
    let err = openai(&base, Some(KEY)).complete(&simple(None)).await.expect_err("429");

    assert!(err.is_retryable(), "{err:?}");
    match &err {
        ProviderError::Http { status, message, retry_after, .. } => {
            assert_eq!(*status, 429);
            assert!(message.contains("Rate limit reached for gpt-4o"), "{message}");
            assert_eq!(*retry_after, Some(Duration::from_secs(7)));
        }
        other => panic!("expected Http, got {other:?}"),
    }
}

#[tokio::test]
async fn server_errors_are_retryable_with_the_providers_message() {
    let (base, _seen) = serve(Reply::json(
        500,
        json!({"type": "error", "error": {"type": "api_error", "message": "Internal server error"}}),
    ))
    .await;
    let err = anthropic(&base).complete(&simple(None)).await.expect_err("500");
    assert!(err.is_retryable(), "{err:?}");
    assert!(matches!(err, ProviderError::Http { status: 500, .. }), "{err:?}");
    assert!(err.to_string().contains("api_error: Internal server error"), "{err}");

    let (base, _seen) = serve(Reply::json(
        529,
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    ))
    .await;
    let err = anthropic(&base).complete(&simple(None)).await.expect_err("529");
    assert!(err.is_retryable() && err.to_string().contains("Overloaded"), "{err}");

    let (base, _seen) =
        serve(Reply { status: 502, body: "<html>Bad Gateway</html>".into(), ..Reply::json(0, json!({})) }).await;
    let err = openai(&base, Some(KEY)).complete(&simple(None)).await.expect_err("502");
    assert!(err.is_retryable() && err.to_string().contains("Bad Gateway"), "{err}");
}

#[tokio::test]
async fn unauthorized_is_final_and_never_shows_the_key() {
    // OpenAI echoes (part of) the key it refused; ours must not survive into the error.
    let (base, _seen) = serve(Reply::json(
        401,
        json!({"error": {
            "message": format!("Incorrect API key provided: {KEY}. You can find your API key at https://platform.openai.com/account/api-keys."),
            "type": "invalid_request_error", "param": null, "code": "invalid_api_key"
        }}),
    ))
    .await;
    let err = openai(&base, Some(KEY)).complete(&simple(None)).await.expect_err("401");
    assert!(!err.is_retryable(), "{err:?}");
    assert!(matches!(err, ProviderError::Http { status: 401, .. }), "{err:?}");
    assert!(err.to_string().contains("Incorrect API key provided"), "{err}");
    for text in [err.to_string(), format!("{err:?}")] {
        assert!(!text.contains(KEY), "key leaked: {text}");
    }

    let (base, _seen) = serve(Reply::json(
        401,
        json!({"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}),
    ))
    .await;
    let err = anthropic(&base).complete(&simple(None)).await.expect_err("401");
    assert!(!err.is_retryable(), "{err:?}");
    assert!(!err.to_string().contains(KEY) && !format!("{err:?}").contains(KEY));
    assert!(err.to_string().contains("authentication_error: invalid x-api-key"), "{err}");
}

#[tokio::test]
async fn long_error_messages_are_cut() {
    let long = "x".repeat(5000);
    let (base, _seen) = serve(Reply::json(400, json!({"error": {"message": long}}))).await;
    let err = openai(&base, None).complete(&simple(None)).await.expect_err("400");
    match err {
        ProviderError::Http { message, .. } => assert!(message.chars().count() <= 301, "{}", message.len()),
        other => panic!("expected Http, got {other:?}"),
    }
}

#[tokio::test]
async fn an_answer_without_usage_is_refused() {
    let mut answer = openai_answer();
    answer.as_object_mut().expect("object").remove("usage");
    let (base, _seen) = serve(Reply::json(200, answer)).await;
    let err = openai(&base, Some(KEY)).complete(&simple(None)).await.expect_err("no usage");
    assert!(matches!(err, ProviderError::NoUsage { .. }), "{err:?}");
    assert!(!err.is_retryable());

    let mut answer = anthropic_answer();
    answer["usage"] = Value::Null;
    let (base, _seen) = serve(Reply::json(200, answer)).await;
    let err = anthropic(&base).complete(&simple(None)).await.expect_err("no usage");
    assert!(matches!(err, ProviderError::NoUsage { .. }), "{err:?}");
}

#[tokio::test]
async fn malformed_answers_say_what_is_missing() {
    let mut answer = openai_answer();
    answer["choices"] = json!([]);
    let (base, _seen) = serve(Reply::json(200, answer)).await;
    let err = openai(&base, Some(KEY)).complete(&simple(None)).await.expect_err("no choices");
    assert!(matches!(err, ProviderError::Decode { .. }) && err.to_string().contains("choices[0]"), "{err}");

    let mut answer = anthropic_answer();
    answer.as_object_mut().expect("object").remove("model");
    let (base, _seen) = serve(Reply::json(200, answer)).await;
    let err = anthropic(&base).complete(&simple(None)).await.expect_err("no model");
    assert!(matches!(err, ProviderError::Decode { .. }) && err.to_string().contains("`model`"), "{err}");

    let (base, _seen) = serve(Reply { status: 200, body: "not json".into(), ..Reply::json(0, json!({})) }).await;
    let err = openai(&base, Some(KEY)).complete(&simple(None)).await.expect_err("not json");
    assert!(matches!(err, ProviderError::Decode { .. }), "{err:?}");
}

#[tokio::test]
async fn a_slow_provider_times_out() {
    let mut reply = Reply::json(200, openai_answer());
    reply.delay = Duration::from_secs(5);
    let (base, _seen) = serve(reply).await;
    let cfg = config(&format!("kind = \"openai\"\nbase_url = \"{base}/v1\"\ntimeout_secs = 1\n"));
    let started = std::time::Instant::now();
    let err = build(&cfg).expect("builds").complete(&simple(None)).await.expect_err("times out");
    assert!(matches!(err, ProviderError::Timeout { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
}

#[tokio::test]
async fn an_unreachable_provider_is_a_retryable_connect_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let err = anthropic(&format!("http://{addr}")).complete(&simple(None)).await.expect_err("refused");
    assert!(matches!(err, ProviderError::Connect { .. }), "{err:?}");
    assert!(err.is_retryable());
}

#[test]
fn bad_http_settings_are_config_errors() {
    for text in [
        "kind = \"openai\"\nbase_url = \"ftp://example.com\"\n",
        "kind = \"openai\"\nbase_url = \"not a url\"\n",
        "kind = \"openai\"\nbase_url = \"http://x/v1\"\ntimeout_secs = 0\n",
        "kind = \"openai\"\nbase_url = \"http://x/v1\"\napi_key = \"a\"\napi_key_env = \"B\"\n",
        "kind = \"openai\"\nbase_url = \"http://x/v1\"\napi_key = \"a\"\n[extra_headers]\nAuthorization = \"Bearer b\"\n",
    ] {
        let err = build(&config(text)).expect_err(text);
        assert!(matches!(err, ProviderError::Config { .. }), "{text}: {err:?}");
    }
}

// --- Scripted ---------------------------------------------------------------------------

const FIXTURE: &str = r#"
[[response]]
role = "dev"
match = "fix the failing"
text = """
--- a/src/lib.rs
+++ b/src/lib.rs
@@ -1 +1 @@
-pub fn add(a: i32, b: i32) -> i32 { a - b }
+pub fn add(a: i32, b: i32) -> i32 { a + b }
"""
input_tokens = 812
output_tokens = 240
model = "scripted-1"

[[response]]
role = "qa"
text = "All tests pass."
input_tokens = 300
output_tokens = 12
finish_reason = "end_turn"

[[response]]
match = "fix the failing"
text = "any other role asking for a fix"
input_tokens = 1
output_tokens = 1
"#;

fn scripted(fixture: &str) -> (tempfile::TempDir, Result<AnyProvider, ProviderError>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fixture.toml");
    std::fs::write(&path, fixture).expect("write fixture");
    let cfg = config(&format!("kind = \"scripted\"\nfixture = {:?}\n", path.to_str().expect("utf-8 path")));
    (dir, build(&cfg))
}

fn asking(role: &str, prompt: &str) -> CompletionRequest {
    CompletionRequest {
        role: role.into(),
        messages: vec![Message::user("earlier"), Message::assistant("ok"), Message::user(prompt)],
        ..conversation()
    }
}

#[tokio::test]
async fn scripted_answers_the_first_entry_whose_role_and_match_fit() {
    let (_dir, provider) = scripted(FIXTURE);
    let provider = provider.expect("builds");
    assert_eq!(provider.name(), "scripted");

    let dev = provider.complete(&asking("dev", "Please fix the failing test.")).await.expect("dev entry");
    assert!(dev.text.starts_with("--- a/src/lib.rs\n"), "{}", dev.text);
    assert_eq!(dev.usage, TokenUsage { input_tokens: 812, output_tokens: 240 });
    assert_eq!(dev.model, "scripted-1");
    assert_eq!(dev.finish_reason.as_deref(), Some("stop"));

    let qa = provider.complete(&asking("qa", "anything")).await.expect("qa entry");
    assert_eq!(qa.text, "All tests pass.");
    assert_eq!(qa.usage, TokenUsage { input_tokens: 300, output_tokens: 12 });
    assert_eq!(qa.model, "scripted");
    assert_eq!(qa.finish_reason.as_deref(), Some("end_turn"));

    // Any role with the substring reaches the third entry.
    let review = provider.complete(&asking("review", "fix the failing one")).await.expect("third entry");
    assert_eq!(review.text, "any other role asking for a fix");
}

#[tokio::test]
async fn scripted_matches_on_the_last_user_message_only() {
    let (_dir, provider) = scripted(FIXTURE);
    let provider = provider.expect("builds");
    let mut req = asking("dev", "something else");
    req.messages[0].content = "fix the failing test".into();
    let err = provider.complete(&req).await.expect_err("earlier message does not count");
    match &err {
        ProviderError::Fixture { role, prompt, task, fixture, turn } => {
            assert_eq!(role, "dev");
            assert_eq!(*turn, 2, "one assistant message so far");
            assert_eq!(prompt, "something else");
            assert_eq!(task, &req.task_id.expect("set").to_string());
            assert!(fixture.ends_with("fixture.toml"));
        }
        other => panic!("expected Fixture, got {other:?}"),
    }
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("something else"), "{err}");
}

#[test]
fn scripted_refuses_bad_fixture_files() {
    let (_dir, result) = scripted("[[response]]\nrole = \"dev\"\ntext = \"unterminated\ninput_tokens = 1\n");
    let err = result.expect_err("TOML syntax error");
    assert!(matches!(err, ProviderError::Config { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("fixture.toml") && text.contains("line 3"), "{text}");

    let (_dir, result) = scripted("[[response]]\ntext = \"no usage declared\"\n");
    let err = result.expect_err("usage is required");
    assert!(err.to_string().contains("input_tokens"), "{err}");

    let (_dir, result) = scripted("[[response]]\ntext = \"a\"\ninput_tokens = 1\noutput_tokens = 1\nmatches = \"x\"\n");
    let err = result.expect_err("unknown key");
    assert!(err.to_string().contains("matches"), "{err}");

    let (_dir, result) = scripted("");
    assert!(matches!(result, Err(ProviderError::Config { .. })), "no entries");

    let err = build(&config("kind = \"scripted\"\nfixture = \"/nonexistent/fixture.toml\"\n")).expect_err("missing");
    assert!(err.to_string().contains("/nonexistent/fixture.toml"), "{err}");
}

/// A three-turn tool loop: search, edit what the search found, finish.
const TOOL_LOOP: &str = r#"
[[response]]
role = "dev"
match = "fix the failing"
turn = 1
tool_calls = [{ name = "search", arguments = { pattern = "fn add", max = 5, paths = ["src/"] } }]
input_tokens = 300
output_tokens = 20

[[response]]
role = "dev"
turn = 2
result_match = "src/lib.rs:1:"
text = "The sign is wrong."
tool_calls = [
  { name = "edit", arguments = { path = "src/lib.rs", find = "a - b", replace = "a + b" } },
  { name = "run_tests" },
]
input_tokens = 420
output_tokens = 40

[[response]]
role = "dev"
turn = 3
text = "Fixed: add now adds."
input_tokens = 480
output_tokens = 8
"#;

#[tokio::test]
async fn scripted_plays_a_tool_loop_turn_by_turn() {
    let (_dir, provider) = scripted(TOOL_LOOP);
    let provider = provider.expect("builds");
    let mut req = asking("dev", "Please fix the failing test.");
    req.messages = vec![Message::user("Please fix the failing test.")];
    req.tools = tools();

    let first = provider.complete(&req).await.expect("turn 1");
    assert_eq!(
        first,
        Completion {
            text: String::new(),
            tool_calls: vec![ToolCall {
                id: "call_1_0".into(),
                name: "search".into(),
                arguments: json!({"pattern": "fn add", "max": 5, "paths": ["src/"]}),
            }],
            usage: TokenUsage { input_tokens: 300, output_tokens: 20 },
            model: "scripted".into(),
            finish_reason: Some("tool_calls".into()),
        }
    );
    req.messages.push(Message::assistant_calls(first.text, first.tool_calls));

    // Turn 2 wants the search's result to name the line.
    let mut missed = req.clone();
    missed.messages.push(Message::tool_result("call_1_0", "no match", false));
    match provider.complete(&missed).await.expect_err("result_match does not fit") {
        ProviderError::Fixture { turn, prompt, .. } => {
            assert_eq!((turn, prompt.as_str()), (2, "Please fix the failing test."))
        }
        other => panic!("expected Fixture, got {other:?}"),
    }
    req.messages.push(Message::tool_result(
        "call_1_0",
        "src/lib.rs:1: pub fn add(a: i32, b: i32) -> i32 { a - b }",
        false,
    ));
    let second = provider.complete(&req).await.expect("turn 2");
    assert_eq!(second.text, "The sign is wrong.");
    assert_eq!(
        second.tool_calls,
        [
            ToolCall {
                id: "call_2_0".into(),
                name: "edit".into(),
                arguments: json!({"path": "src/lib.rs", "find": "a - b", "replace": "a + b"}),
            },
            ToolCall { id: "call_2_1".into(), name: "run_tests".into(), arguments: json!({}) },
        ]
    );
    assert_eq!(second.usage, TokenUsage { input_tokens: 420, output_tokens: 40 });
    assert_eq!(second.finish_reason.as_deref(), Some("tool_calls"));
    req.messages.push(Message::assistant_calls(second.text, second.tool_calls));
    req.messages.push(Message::tool_result("call_2_0", "edited", false));
    req.messages.push(Message::tool_result("call_2_1", "1 passed", false));

    let third = provider.complete(&req).await.expect("turn 3");
    assert_eq!((third.text.as_str(), third.tool_calls.len()), ("Fixed: add now adds.", 0));
    assert_eq!((third.usage.input_tokens, third.finish_reason.as_deref()), (480, Some("stop")));

    // There is no fourth turn.
    req.messages.push(Message::assistant(third.text));
    req.messages.push(Message::user("Please fix the failing test again."));
    let err = provider.complete(&req).await.expect_err("no turn 4");
    assert!(err.to_string().contains("turn 4"), "{err}");
}

#[test]
fn scripted_refuses_entries_without_an_answer_or_with_turn_zero() {
    let ok = "[[response]]\ntext = \"a\"\ninput_tokens = 1\noutput_tokens = 1\n";
    for (second, expected) in [
        ("[[response]]\ninput_tokens = 1\noutput_tokens = 1\n", "response[1] has neither text nor tool_calls"),
        (
            "[[response]]\ntool_calls = []\ninput_tokens = 1\noutput_tokens = 1\n",
            "response[1] has neither text nor tool_calls",
        ),
        ("[[response]]\nturn = 0\ntext = \"a\"\ninput_tokens = 1\noutput_tokens = 1\n", "response[1].turn is 0"),
        (
            "[[response]]\ntool_calls = [{ name = \"run tests\" }]\ninput_tokens = 1\noutput_tokens = 1\n",
            "response[1].tool_calls[0].name \"run tests\" is not a tool name",
        ),
        (
            "[[response]]\nresult_match = \"\"\ntext = \"a\"\ninput_tokens = 1\noutput_tokens = 1\n",
            "response[1].result_match is empty",
        ),
    ] {
        let (_dir, result) = scripted(&format!("{ok}\n{second}"));
        let err = result.expect_err(expected);
        assert!(matches!(err, ProviderError::Config { .. }), "{err:?}");
        assert!(err.to_string().contains(expected), "{err}");
    }
    let (_dir, result) =
        scripted("[[response]]\ntool_calls = [{ name = \"x\", args = {} }]\ninput_tokens = 1\noutput_tokens = 1\n");
    let err = result.expect_err("unknown key in a tool call");
    assert!(err.to_string().contains("args"), "{err}");
}

#[test]
fn the_bound_grows_with_the_prompt() {
    let short = input_token_bound(&simple(None));
    let long = input_token_bound(&conversation());
    assert!(short > 0 && long > short, "{short} {long}");
}

#[tokio::test]
async fn the_example_fixture_loads_and_answers() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/fixtures/scripted-example.toml");
    let provider = build(&config(&format!("kind = \"scripted\"\nfixture = {path:?}\n"))).expect("example is valid");
    let dev = provider.complete(&asking("dev", "Please fix the failing test.")).await.expect("dev entry");
    assert_eq!(dev.usage, TokenUsage { input_tokens: 812, output_tokens: 240 });
    assert!(provider.complete(&asking("qa", "run the tests")).await.is_err(), "no qa entry in the example");

    // Its tool loop, turn by turn.
    let mut req = asking("dev", "Please rename old_name.");
    req.messages = vec![Message::user("Please rename old_name.")];
    let search = provider.complete(&req).await.expect("turn 1");
    assert_eq!(search.tool_calls[0].arguments, json!({"pattern": "fn old_name"}));
    req.messages.push(Message::assistant_calls(search.text, search.tool_calls));
    req.messages.push(Message::tool_result("call_1_0", "src/lib.rs:3: pub fn old_name() {}", false));
    let edit = provider.complete(&req).await.expect("turn 2");
    assert_eq!((edit.tool_calls[0].id.as_str(), edit.tool_calls[0].name.as_str()), ("call_2_0", "edit"));
    req.messages.push(Message::assistant_calls(edit.text, edit.tool_calls));
    req.messages.push(Message::tool_result("call_2_0", "edited", false));
    let done = provider.complete(&req).await.expect("turn 3");
    assert_eq!((done.text.as_str(), done.finish_reason.as_deref()), ("Renamed old_name to new_name.", Some("stop")));
}
