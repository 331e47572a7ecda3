//! A deterministic offline provider: answers from a TOML fixture file, with the token usage
//! the file declares. For the demo and for tests; never calls a network.
//!
//! # Fixture format
//!
//! ```toml
//! [[response]]
//! role = "dev"                 # optional: the requesting role must be exactly this
//! match = "fix the failing"    # optional: the last user message must contain this (case-sensitive)
//! turn = 2                     # optional, 1 or more: the conversation so far must hold exactly
//!                              #   turn - 1 assistant messages (this is the model's turn-th answer)
//! result_match = "src/lib.rs"  # optional: the last message must be a tool result containing this
//! text = """
//! --- a/src/lib.rs
//! +++ b/src/lib.rs
//! ...
//! """                          # the answer's text; optional, default ""
//! tool_calls = [               # optional: the tools the answer calls, in order
//!   { name = "read_file", arguments = { path = "src/lib.rs" } },
//! ]
//! input_tokens = 812           # required: the usage billed for this answer
//! output_tokens = 240          # required
//! model = "scripted-1"         # optional, default "scripted"
//! finish_reason = "stop"       # optional, default "tool_calls" with tool calls, else "stop"
//! ```
//!
//! An entry needs `text`, `tool_calls` or both. A tool call's `arguments` (optional, default
//! `{}`) is a TOML table, answered as the JSON object it reads as (a datetime becomes its
//! TOML text); its id is `call_<turn>_<index>`: the model's turn (1 for the first
//! answer) and the call's place in the entry, from 0. In a tool loop the tool results are
//! messages of their own role, so the last *user* message stays the task's prompt: `match`
//! picks the task, `turn` the step of the loop, and `result_match` what the tool answered.
//!
//! A three-turn script: search, then edit what the search found, then finish:
//!
//! ```toml
//! [[response]]
//! role = "dev"
//! match = "fix the failing"
//! turn = 1
//! tool_calls = [{ name = "search", arguments = { pattern = "fn add" } }]
//! input_tokens = 300
//! output_tokens = 20
//!
//! [[response]]
//! role = "dev"
//! turn = 2
//! result_match = "src/lib.rs:1:"
//! text = "The sign is wrong."
//! tool_calls = [{ name = "edit", arguments = { path = "src/lib.rs", find = "a - b", replace = "a + b" } }]
//! input_tokens = 420
//! output_tokens = 40
//!
//! [[response]]
//! role = "dev"
//! turn = 3
//! text = "Fixed: add now adds."
//! input_tokens = 480
//! output_tokens = 8
//! ```
//!
//! Entries are tried in file order; the first whose conditions all fit wins. An entry with
//! none is a catch-all, so put it last. No entry fitting is a [`ProviderError::Fixture`]
//! naming the task, role, turn and prompt. The file is read and checked once, when the
//! provider is built; unknown keys are refused, and so is an entry without an answer, with
//! `turn = 0`, an empty condition or a tool name the APIs would refuse, each naming the
//! entry (`response[<index from 0>]`).

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use super::{Completion, CompletionRequest, MessageRole, Provider, ProviderError, TokenUsage, ToolCall};

const NAME: &str = "scripted";
/// Characters of the prompt quoted in a [`ProviderError::Fixture`].
const PROMPT_EXCERPT_CHARS: usize = 200;

/// The fixture file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Fixture {
    /// The scripted answers, tried in order.
    #[serde(default)]
    response: Vec<Entry>,
}

/// One scripted answer and when to give it, as the file spells it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    /// Only for requests from this role.
    role: Option<String>,
    /// Only when the last user message contains this.
    #[serde(rename = "match")]
    contains: Option<String>,
    /// Only for the model's `turn`-th answer of the conversation (from 1).
    turn: Option<u32>,
    /// Only when the last message is a tool result containing this.
    result_match: Option<String>,
    /// The answer's text.
    text: Option<String>,
    /// The tools the answer calls.
    #[serde(default)]
    tool_calls: Vec<EntryCall>,
    /// Declared prompt tokens.
    input_tokens: u64,
    /// Declared answer tokens.
    output_tokens: u64,
    /// The model reported.
    #[serde(default = "default_model")]
    model: String,
    /// The finish reason reported; by default `tool_calls` or `stop`.
    finish_reason: Option<String>,
}

/// A tool call of an entry, as the file spells it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryCall {
    /// The tool called.
    name: String,
    /// Its arguments.
    #[serde(default)]
    arguments: toml::Table,
}

fn default_model() -> String {
    "scripted".to_owned()
}

/// An entry checked at load, its answer ready to give.
#[derive(Debug)]
struct Scripted {
    role: Option<String>,
    contains: Option<String>,
    turn: Option<u32>,
    result_match: Option<String>,
    text: String,
    /// (name, arguments as JSON) of each call; the ids depend on the turn answered.
    tool_calls: Vec<(String, Value)>,
    usage: TokenUsage,
    model: String,
    finish_reason: String,
}

/// What of a request the entries are matched against.
struct Asked<'a> {
    role: &'a str,
    /// The last user message's text.
    prompt: &'a str,
    /// 1 + the assistant messages so far.
    turn: u32,
    /// The last message's text, when it is a tool result.
    result: Option<&'a str>,
}

impl Scripted {
    fn check(i: usize, e: Entry) -> Result<Self, String> {
        if e.role.as_deref().is_some_and(|r| r.trim().is_empty()) {
            return Err(format!("response[{i}].role is empty; leave it out to match every role"));
        }
        if e.contains.as_deref().is_some_and(str::is_empty) {
            return Err(format!("response[{i}].match is empty; leave it out to match every message"));
        }
        if e.result_match.as_deref().is_some_and(str::is_empty) {
            return Err(format!("response[{i}].result_match is empty; leave it out to match every tool result"));
        }
        if e.turn == Some(0) {
            return Err(format!("response[{i}].turn is 0; turns count from 1 (the model's first answer)"));
        }
        if e.model.trim().is_empty() {
            return Err(format!("response[{i}].model is empty"));
        }
        if e.text.is_none() && e.tool_calls.is_empty() {
            return Err(format!("response[{i}] has neither text nor tool_calls; give it one or both"));
        }
        let mut tool_calls = Vec::with_capacity(e.tool_calls.len());
        for (j, call) in e.tool_calls.into_iter().enumerate() {
            if !super::is_tool_name(&call.name) {
                return Err(format!(
                    "response[{i}].tool_calls[{j}].name {:?} is not a tool name (1 to 64 of a-z, A-Z, 0-9, _ and -)",
                    call.name
                ));
            }
            let arguments = table_to_json(call.arguments)
                .map_err(|why| format!("response[{i}].tool_calls[{j}].arguments: {why}"))?;
            tool_calls.push((call.name, arguments));
        }
        let default_finish = if tool_calls.is_empty() { "stop" } else { "tool_calls" };
        Ok(Scripted {
            role: e.role,
            contains: e.contains,
            turn: e.turn,
            result_match: e.result_match,
            text: e.text.unwrap_or_default(),
            tool_calls,
            usage: TokenUsage { input_tokens: e.input_tokens, output_tokens: e.output_tokens },
            model: e.model,
            finish_reason: e.finish_reason.unwrap_or_else(|| default_finish.to_owned()),
        })
    }

    fn fits(&self, asked: &Asked<'_>) -> bool {
        self.role.as_deref().is_none_or(|r| r == asked.role)
            && self.contains.as_deref().is_none_or(|m| asked.prompt.contains(m))
            && self.turn.is_none_or(|t| t == asked.turn)
            && self.result_match.as_deref().is_none_or(|m| asked.result.is_some_and(|r| r.contains(m)))
    }
}

/// A TOML table as the JSON object it reads as.
fn table_to_json(table: toml::Table) -> Result<Value, String> {
    table
        .into_iter()
        .map(|(k, v)| Ok((k, toml_to_json(v)?)))
        .collect::<Result<serde_json::Map<_, _>, _>>()
        .map(Value::Object)
}

fn toml_to_json(value: toml::Value) -> Result<Value, String> {
    Ok(match value {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => Value::from(i),
        toml::Value::Float(f) => {
            serde_json::Number::from_f64(f).map(Value::Number).ok_or_else(|| format!("{f} has no JSON form"))?
        }
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(items) => Value::Array(items.into_iter().map(toml_to_json).collect::<Result<_, _>>()?),
        toml::Value::Table(t) => table_to_json(t)?,
    })
}

/// Answers from a fixture file loaded at build.
#[derive(Debug)]
pub struct ScriptedProvider {
    /// Where the entries came from, for error messages.
    path: PathBuf,
    /// The entries, in file order.
    entries: Vec<Scripted>,
}

impl ScriptedProvider {
    /// Reads and checks the fixture file. Any problem is a [`ProviderError::Config`] naming
    /// the file (and, for a TOML error, the line; for a bad entry, its index).
    pub fn load(path: &Path) -> Result<Self, ProviderError> {
        let setting = format!("fixture {}", path.display());
        let text = std::fs::read_to_string(path).map_err(|e| ProviderError::config(&setting, e.to_string()))?;
        Self::parse(path, &text).map_err(|problem| ProviderError::config(&setting, problem))
    }

    fn parse(path: &Path, text: &str) -> Result<Self, String> {
        let fixture: Fixture = toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())?;
        if fixture.response.is_empty() {
            return Err("has no [[response]] entries".to_owned());
        }
        let entries =
            fixture.response.into_iter().enumerate().map(|(i, e)| Scripted::check(i, e)).collect::<Result<_, _>>()?;
        Ok(ScriptedProvider { path: path.to_owned(), entries })
    }

    /// How many entries the fixture holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Always false: a fixture without entries is refused at load.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn answer(&self, req: &CompletionRequest) -> Result<Completion, ProviderError> {
        let prompt = req.messages.iter().rev().find(|m| m.role == MessageRole::User).map_or("", |m| m.content.as_str());
        let answered = req.messages.iter().filter(|m| m.role == MessageRole::Assistant).count();
        let asked = Asked {
            role: &req.role,
            prompt,
            turn: u32::try_from(answered).unwrap_or(u32::MAX).saturating_add(1),
            result: req.messages.last().filter(|m| m.role == MessageRole::Tool).map(|m| m.content.as_str()),
        };
        let entry = self.entries.iter().find(|e| e.fits(&asked)).ok_or_else(|| ProviderError::Fixture {
            fixture: self.path.clone(),
            task: req.task_id.map_or_else(|| "none".to_owned(), |id| id.to_string()),
            role: req.role.clone(),
            turn: asked.turn,
            prompt: prompt.chars().take(PROMPT_EXCERPT_CHARS).collect(),
        })?;
        let tool_calls = entry
            .tool_calls
            .iter()
            .enumerate()
            .map(|(i, (name, arguments))| ToolCall {
                id: format!("call_{}_{i}", asked.turn),
                name: name.clone(),
                arguments: arguments.clone(),
            })
            .collect();
        Ok(Completion {
            text: entry.text.clone(),
            tool_calls,
            usage: entry.usage,
            model: entry.model.clone(),
            finish_reason: Some(entry.finish_reason.clone()),
        })
    }
}

impl Provider for ScriptedProvider {
    async fn complete(&self, req: &CompletionRequest) -> Result<Completion, ProviderError> {
        self.answer(req)
    }

    fn name(&self) -> &str {
        NAME
    }
}
