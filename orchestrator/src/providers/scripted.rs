//! A deterministic offline provider: answers from a TOML fixture file, with the token usage
//! the file declares. For the demo and for tests; never calls a network.
//!
//! # Fixture format
//!
//! ```toml
//! [[response]]
//! role = "dev"                 # optional: the requesting role must be exactly this
//! match = "fix the failing"    # optional: the last user message must contain this (case-sensitive)
//! text = """
//! --- a/src/lib.rs
//! +++ b/src/lib.rs
//! ...
//! """                          # the answer
//! input_tokens = 812           # required: the usage billed for this answer
//! output_tokens = 240          # required
//! model = "scripted-1"         # optional, default "scripted"
//! finish_reason = "stop"       # optional, default "stop"
//! ```
//!
//! Entries are tried in file order; the first whose `role` and `match` both fit wins. An
//! entry with neither is a catch-all, so put it last. No entry fitting is a
//! [`ProviderError::Fixture`] naming the task, role and prompt. The file is read and
//! checked once, when the provider is built; unknown keys are refused.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{Completion, CompletionRequest, MessageRole, Provider, ProviderError, TokenUsage};

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

/// One scripted answer and when to give it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    /// Only for requests from this role.
    role: Option<String>,
    /// Only when the last user message contains this.
    #[serde(rename = "match")]
    contains: Option<String>,
    /// The answer.
    text: String,
    /// Declared prompt tokens.
    input_tokens: u64,
    /// Declared answer tokens.
    output_tokens: u64,
    /// The model reported.
    #[serde(default = "default_model")]
    model: String,
    /// The finish reason reported.
    #[serde(default = "default_finish_reason")]
    finish_reason: String,
}

fn default_model() -> String {
    "scripted".to_owned()
}
fn default_finish_reason() -> String {
    "stop".to_owned()
}

impl Entry {
    fn fits(&self, role: &str, prompt: &str) -> bool {
        self.role.as_deref().is_none_or(|r| r == role) && self.contains.as_deref().is_none_or(|m| prompt.contains(m))
    }
}

/// Answers from a fixture file loaded at build.
#[derive(Debug)]
pub struct ScriptedProvider {
    /// Where the entries came from, for error messages.
    path: PathBuf,
    /// The entries, in file order.
    entries: Vec<Entry>,
}

impl ScriptedProvider {
    /// Reads and checks the fixture file. Any problem is a [`ProviderError::Config`] naming
    /// the file (and, for a TOML error, the line).
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
        for (i, entry) in fixture.response.iter().enumerate() {
            if entry.role.as_deref().is_some_and(|r| r.trim().is_empty()) {
                return Err(format!("response[{i}].role is empty; leave it out to match every role"));
            }
            if entry.contains.as_deref().is_some_and(str::is_empty) {
                return Err(format!("response[{i}].match is empty; leave it out to match every message"));
            }
            if entry.model.trim().is_empty() {
                return Err(format!("response[{i}].model is empty"));
            }
        }
        Ok(ScriptedProvider { path: path.to_owned(), entries: fixture.response })
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
        let entry = self.entries.iter().find(|e| e.fits(&req.role, prompt)).ok_or_else(|| ProviderError::Fixture {
            fixture: self.path.clone(),
            task: req.task_id.map_or_else(|| "none".to_owned(), |id| id.to_string()),
            role: req.role.clone(),
            prompt: prompt.chars().take(PROMPT_EXCERPT_CHARS).collect(),
        })?;
        Ok(Completion {
            text: entry.text.clone(),
            tool_calls: Vec::new(),
            usage: TokenUsage { input_tokens: entry.input_tokens, output_tokens: entry.output_tokens },
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
