//! The permission table: which role may publish which message types, to whom, on which
//! streams. Loaded from `config/permissions.toml`; the same file generates the Redis ACLs,
//! so the verifier and the broker enforce one policy twice.

use std::collections::BTreeSet;
use std::fmt;

use serde::Deserialize;

use crate::keys::Edge;
use crate::names::{MessageType, Role};

/// A stream name, or a prefix ending in `*` (`fleet:tool:responses:dev:*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamPattern {
    text: String,
    prefix: bool,
}

impl StreamPattern {
    fn parse(s: &str) -> Result<Self, String> {
        let (body, prefix) = match s.strip_suffix('*') {
            Some(b) => (b, true),
            None => (s, false),
        };
        let ok = body.starts_with("fleet:")
            && (prefix || body.len() > "fleet:".len())
            && body.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b':' | b'.' | b'_' | b'-'));
        if !ok {
            return Err(format!(
                "invalid stream pattern {s:?}: use \"fleet:\" followed by a-z, 0-9, ':', '.', '_', '-', optionally ending in '*'"
            ));
        }
        Ok(Self { text: body.to_owned(), prefix })
    }

    /// True when `stream` is this name, or starts with this prefix.
    pub fn matches(&self, stream: &str) -> bool {
        if self.prefix { stream.starts_with(&self.text) && stream.len() > self.text.len() } else { stream == self.text }
    }

    /// The pattern as written, usable as a Redis ACL key pattern.
    pub fn as_redis_pattern(&self) -> String {
        if self.prefix { format!("{}*", self.text) } else { self.text.clone() }
    }
}

impl fmt::Display for StreamPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_redis_pattern())
    }
}

/// One grant: `from` may publish `types` addressed `to` on streams matching `stream`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Publisher.
    pub from: Role,
    /// Addressee; the pair is the key edge.
    pub to: Role,
    /// Where.
    pub stream: StreamPattern,
    /// What.
    pub types: Vec<MessageType>,
}

/// A permission file that can't be loaded; the message names the rule and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid permission file: {0}")]
pub struct PermissionError(String);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileToml {
    #[serde(rename = "rule")]
    rules: Vec<RuleToml>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleToml {
    from: String,
    to: String,
    stream: String,
    types: Vec<String>,
}

/// The loaded table, indexed by (publisher, type) for the verifier's hot path.
#[derive(Clone, Debug)]
pub struct PermissionTable {
    rules: Vec<Rule>,
    /// `index[role][type]` lists `(stream pattern, addressee)` pairs.
    index: Vec<Vec<(StreamPattern, Role)>>,
}

fn slot(from: Role, ty: MessageType) -> usize {
    from as usize * MessageType::ALL.len() + ty as usize
}

impl PermissionTable {
    /// Parses and checks `config/permissions.toml` text.
    pub fn parse(text: &str) -> Result<Self, PermissionError> {
        let file: FileToml = toml::from_str(text).map_err(|e| PermissionError(e.to_string()))?;
        let mut rules = Vec::with_capacity(file.rules.len());
        for (n, r) in file.rules.into_iter().enumerate() {
            let at = |msg: String| {
                PermissionError(format!("rule #{} ({} -> {} on {}): {msg}", n + 1, r.from, r.to, r.stream))
            };
            let from: Role = r.from.parse().map_err(|e: crate::names::UnknownName| at(e.to_string()))?;
            let to: Role = r.to.parse().map_err(|e: crate::names::UnknownName| at(e.to_string()))?;
            if from == to {
                return Err(at("a role cannot address itself".into()));
            }
            let stream = StreamPattern::parse(&r.stream).map_err(at)?;
            if r.types.is_empty() {
                return Err(at("`types` is empty".into()));
            }
            let mut types = Vec::with_capacity(r.types.len());
            for t in &r.types {
                let ty: MessageType = t.parse().map_err(|e: crate::names::UnknownName| at(e.to_string()))?;
                if from.is_worker() && !MessageType::WORKER_PUBLISHABLE.contains(&ty) {
                    return Err(at(format!(
                        "workers may publish only task.result, heartbeat, question and tool.request, not {ty}"
                    )));
                }
                types.push(ty);
            }
            rules.push(Rule { from, to, stream, types });
        }
        Ok(Self::from_rules(rules))
    }

    fn from_rules(rules: Vec<Rule>) -> Self {
        let mut index = vec![Vec::new(); Role::ALL.len() * MessageType::ALL.len()];
        for r in &rules {
            for ty in &r.types {
                index[slot(r.from, *ty)].push((r.stream.clone(), r.to));
            }
        }
        Self { rules, index }
    }

    /// True when `from` may publish `ty` addressed to `to` on `stream`.
    pub fn permits(&self, from: Role, to: Role, stream: &str, ty: MessageType) -> bool {
        self.index[slot(from, ty)].iter().any(|(p, t)| *t == to && p.matches(stream))
    }

    /// Every edge some rule uses: the keys that must exist.
    pub fn edges(&self) -> BTreeSet<Edge> {
        self.rules.iter().map(|r| Edge { from: r.from, to: r.to }).collect()
    }

    /// The rules, in file order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = include_str!("../../config/permissions.toml");

    #[test]
    fn shipped_file_loads_and_grants_what_the_design_says() {
        let t = PermissionTable::parse(FILE).unwrap();
        assert!(t.permits(Role::Dev, Role::Orchestrator, "fleet:results", MessageType::TaskResult));
        assert!(t.permits(Role::Orchestrator, Role::Qa, "fleet:tasks:qa", MessageType::TaskAssign));
        assert!(t.permits(Role::Orchestrator, Role::Dev, "fleet:tool:responses:dev:dev-1", MessageType::ToolResponse));
        assert!(!t.permits(Role::Orchestrator, Role::Dev, "fleet:tool:responses:dev:", MessageType::ToolResponse));
        assert!(!t.permits(Role::Dev, Role::Qa, "fleet:tasks:qa", MessageType::TaskAssign));
        assert!(!t.permits(Role::Dev, Role::Orchestrator, "fleet:tasks:qa", MessageType::TaskResult));
        assert!(!t.permits(Role::Orchestrator, Role::Qa, "fleet:tasks:dev", MessageType::TaskAssign));
        for r in t.rules() {
            if r.from.is_worker() {
                assert!(r.types.iter().all(|ty| MessageType::WORKER_PUBLISHABLE.contains(ty)));
            }
        }
        assert!(t.edges().contains(&Edge { from: Role::Budget, to: Role::Refactor }));
    }

    #[test]
    fn a_worker_granted_more_is_refused_with_the_rule_named() {
        let bad = "[[rule]]\nfrom = \"dev\"\nto = \"qa\"\nstream = \"fleet:tasks:qa\"\ntypes = [\"task.assign\"]\n";
        let err = PermissionTable::parse(bad).unwrap_err().to_string();
        assert!(err.contains("rule #1") && err.contains("workers may publish only"), "{err}");
    }

    #[test]
    fn bad_names_are_refused() {
        for bad in [
            "[[rule]]\nfrom = \"boss\"\nto = \"qa\"\nstream = \"fleet:x\"\ntypes = [\"heartbeat\"]\n",
            "[[rule]]\nfrom = \"dev\"\nto = \"orchestrator\"\nstream = \"results\"\ntypes = [\"heartbeat\"]\n",
            "[[rule]]\nfrom = \"dev\"\nto = \"orchestrator\"\nstream = \"fleet:x\"\ntypes = [\"hello\"]\n",
            "[[rule]]\nfrom = \"dev\"\nto = \"orchestrator\"\nstream = \"fleet:x\"\ntypes = []\n",
            "[[rule]]\nfrom = \"dev\"\nto = \"orchestrator\"\nstream = \"fleet:x\"\ntypes = [\"heartbeat\"]\nextra = 1\n",
        ] {
            assert!(PermissionTable::parse(bad).is_err(), "{bad}");
        }
    }
}
