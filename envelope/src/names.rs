//! Roles, message types and stream names: every name that crosses the wire, in one place.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Declares a closed set of wire names: an enum whose variants serialize as their exact
/// string, so the wire carries `"task.result"`, never a variant index.
macro_rules! wire_names {
    ($(#[$meta:meta])* $name:ident, $what:literal { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($variant),+ }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The exact string used on the wire and in configuration.
            pub const fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownName;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(UnknownName { what: $what, got: s.to_owned(),
                        expected: &[$($text),+] }),
                }
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl serde::de::Visitor<'_> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        write!(f, "a {} string", $what)
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<$name, E> {
                        v.parse().map_err(E::custom)
                    }
                }
                d.deserialize_str(V)
            }
        }
    };
}

/// A name that is not one of the known roles, message types or similar.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {got:?}; expected one of: {}", expected.join(", "))]
pub struct UnknownName {
    what: &'static str,
    got: String,
    expected: &'static [&'static str],
}

wire_names! {
    /// A process role. Keys, permissions and consumer groups are all per role.
    Role, "role" {
        Orchestrator => "orchestrator",
        Budget => "budget",
        Dev => "dev",
        Qa => "qa",
        Review => "review",
        Refactor => "refactor",
    }
}

impl Role {
    /// The roles that run agent code. They may only publish [`MessageType::WORKER_PUBLISHABLE`].
    pub const WORKERS: &'static [Role] = &[Role::Dev, Role::Qa, Role::Review, Role::Refactor];

    /// True for the four agent roles.
    pub fn is_worker(self) -> bool {
        Self::WORKERS.contains(&self)
    }
}

wire_names! {
    /// The `type` of an envelope; it fixes the shape of the payload.
    MessageType, "message type" {
        TaskAssign => "task.assign",
        TaskResult => "task.result",
        Heartbeat => "heartbeat",
        Question => "question",
        ToolRequest => "tool.request",
        ToolResponse => "tool.response",
        Usage => "usage",
        Outcome => "outcome",
        ControlPause => "control.pause",
        ControlResume => "control.resume",
        IncidentOpened => "incident.opened",
    }
}

impl MessageType {
    /// The only types a worker may ever publish, whatever the permission file says: a
    /// worker that could publish `task.assign` or `control.resume` could steer the fleet.
    pub const WORKER_PUBLISHABLE: &'static [MessageType] =
        &[MessageType::TaskResult, MessageType::Heartbeat, MessageType::Question, MessageType::ToolRequest];
}

/// Stream names used by the fleet. Per-role and per-instance streams are built by
/// [`StreamName`]'s constructors so the spelling lives here only.
pub mod streams {
    /// Worker results, read by the orchestrator.
    pub const RESULTS: &str = "fleet:results";
    /// Worker liveness, read by the orchestrator.
    pub const HEARTBEATS: &str = "fleet:heartbeats";
    /// Questions for a human, read by the orchestrator.
    pub const QUESTIONS: &str = "fleet:questions";
    /// Tool-proxy requests from workers, read by the orchestrator.
    pub const TOOL_REQUESTS: &str = "fleet:tool:requests";
    /// Token usage, signed by the orchestrator, read by the budget manager.
    pub const USAGE: &str = "fleet:usage";
    /// Task outcomes, signed by the orchestrator, read by the budget manager.
    pub const OUTCOMES: &str = "fleet:outcomes";
    /// Entries that failed verification, with the reason.
    pub const REJECTED: &str = "fleet:rejected";
    /// Entries whose handler kept failing past the delivery limit.
    pub const DLQ: &str = "fleet:dlq";
}

/// A validated Redis stream name (`fleet:` followed by `[a-z0-9:._-]`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamName(String);

/// A stream name that is not of the form `fleet:[a-z0-9:._-]+`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid stream name {0:?}: it must start with \"fleet:\" and use only a-z, 0-9, ':', '.', '_', '-'")]
pub struct InvalidStreamName(String);

impl StreamName {
    /// Longest accepted name; Redis allows more, but nothing we build comes close.
    pub const MAX_LEN: usize = 200;

    /// Parses and validates a stream name.
    pub fn parse(s: &str) -> Result<Self, InvalidStreamName> {
        let ok = s.len() <= Self::MAX_LEN
            && s.len() > "fleet:".len()
            && s.starts_with("fleet:")
            && s.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b':' | b'.' | b'_' | b'-'));
        if ok { Ok(Self(s.to_owned())) } else { Err(InvalidStreamName(s.to_owned())) }
    }

    /// `fleet:tasks:<role>`: assignments for one role's consumer group.
    pub fn tasks(role: Role) -> Self {
        Self(format!("fleet:tasks:{role}"))
    }

    /// `fleet:control:<role>`: pause/resume for one role.
    pub fn control(role: Role) -> Self {
        Self(format!("fleet:control:{role}"))
    }

    /// `fleet:tool:responses:<role>:<instance>`: tool answers for one worker process.
    pub fn tool_responses(role: Role, instance: &Instance) -> Self {
        Self(format!("fleet:tool:responses:{role}:{}", instance.as_str()))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The name of one process instance of a role (`dev-7f3a`, `orchestrator-0`):
/// 1 to 64 characters of `[A-Za-z0-9._-]`, so it is safe inside stream and consumer names.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Instance(String);

/// An instance name outside `[A-Za-z0-9._-]{1,64}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid instance name {0:?}: use 1 to 64 characters of A-Z, a-z, 0-9, '.', '_', '-'")]
pub struct InvalidInstance(String);

impl Instance {
    /// Parses and validates an instance name.
    pub fn parse(s: &str) -> Result<Self, InvalidInstance> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok { Ok(Self(s.to_owned())) } else { Err(InvalidInstance(s.to_owned())) }
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Instance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Instance {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Instance {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Instance::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_their_strings() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>(), Ok(*r));
        }
        for t in MessageType::ALL {
            assert_eq!(t.as_str().parse::<MessageType>(), Ok(*t));
        }
        let err = "planner".parse::<Role>().unwrap_err().to_string();
        assert!(err.contains("\"planner\"") && err.contains("orchestrator"), "{err}");
    }

    #[test]
    fn stream_names_are_validated() {
        assert!(StreamName::parse("fleet:tasks:dev").is_ok());
        assert!(StreamName::parse("fleet:").is_err());
        assert!(StreamName::parse("other:x").is_err());
        assert!(StreamName::parse("fleet:Tasks").is_err());
        assert!(StreamName::parse("fleet:a b").is_err());
        let i = Instance::parse("dev-1").unwrap();
        assert_eq!(StreamName::tool_responses(Role::Dev, &i).as_str(), "fleet:tool:responses:dev:dev-1");
        assert!(Instance::parse("").is_err());
        assert!(Instance::parse("a/b").is_err());
    }
}
