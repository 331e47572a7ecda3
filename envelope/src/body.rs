//! The signed body: [`Envelope`] and its typed payloads.
//!
//! The body is a MessagePack map with string keys in a fixed order (see
//! `docs/wire-format.md`). Serialization is written by hand so that the key order is part of
//! the code, not an accident of field order, and so that `type` and `payload` stay one value
//! in Rust (a [`Payload`] variant) while being two keys on the wire.

use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use crate::names::{Instance, MessageType, Role};

/// Who signed an envelope: the role names the key edge, the instance names the process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sender {
    /// The sending role; must equal the `from` side of the signing key's edge.
    pub role: Role,
    /// The sending process, so replies and liveness can name one worker among many.
    pub instance: Instance,
}

/// An unsigned message. Build one, sign it with [`crate::Keyring::seal`]; a received one is
/// only ever handed out as a [`crate::Verified`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// UUIDv7: unique per message (the replay guard keys on it) and time-ordered.
    pub id: Uuid,
    /// The signer.
    pub from: Sender,
    /// The receiving role; must equal the `to` side of the signing key's edge.
    pub to: Role,
    /// The task this message is about, if any.
    pub task_id: Option<Uuid>,
    /// The id of the envelope that caused this one, for tracing a task's history.
    pub causation_id: Option<Uuid>,
    /// Sender's clock, Unix milliseconds.
    pub issued_at_ms: u64,
    /// How long after `issued_at_ms` the message may still be acted on.
    pub ttl_ms: u64,
    /// The kill-switch epoch the sender believed current; older than the receiver's → refused.
    pub kill_epoch: u64,
    /// W3C `traceparent`, so a trace crosses the bus.
    pub traceparent: Option<String>,
    /// Capability lease (a JWT) on `task.assign` and `tool.request`.
    pub lease: Option<String>,
    /// The typed content; its variant is the envelope's `type`.
    pub payload: Payload,
}

impl Envelope {
    /// A new envelope with a fresh UUIDv7 and no optional fields set.
    pub fn new(from: Sender, to: Role, issued_at_ms: u64, ttl_ms: u64, kill_epoch: u64, payload: Payload) -> Self {
        Self {
            id: Uuid::now_v7(),
            from,
            to,
            task_id: None,
            causation_id: None,
            issued_at_ms,
            ttl_ms,
            kill_epoch,
            traceparent: None,
            lease: None,
            payload,
        }
    }

    /// The message type, derived from the payload variant.
    pub fn message_type(&self) -> MessageType {
        self.payload.message_type()
    }

    /// Encodes the body: the exact bytes that get signed.
    pub fn to_body_bytes(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(256 + self.payload.size_hint());
        // Writing into a Vec cannot fail, and every value here is serializable.
        self.serialize(&mut rmp_serde::Serializer::new(&mut buf).with_struct_map())
            .expect("encoding an envelope body into memory cannot fail");
        buf
    }

    /// Decodes a body. Trailing bytes after the map are an error.
    pub fn from_body_bytes(bytes: &[u8]) -> Result<Self, rmp_serde::decode::Error> {
        crate::wire::from_slice_exact(bytes)
    }
}

/// Outcome of a piece of work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The step did what it was asked.
    Success,
    /// The step ran and found a problem (tests failed, review rejected).
    Failure,
    /// The step could not run (tooling broke, sandbox died).
    Error,
}

macro_rules! payloads {
    ($($variant:ident($ty:ident) => $mt:ident),+ $(,)?) => {
        /// The payload of an envelope, one variant per [`MessageType`].
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub enum Payload { $(#[allow(missing_docs)] $variant($ty)),+ }

        impl Payload {
            /// The message type this payload is sent as.
            pub fn message_type(&self) -> MessageType {
                match self { $(Payload::$variant(_) => MessageType::$mt),+ }
            }

            fn serialize_value<M: SerializeMap>(&self, map: &mut M) -> Result<(), M::Error> {
                match self { $(Payload::$variant(p) => map.serialize_value(p)),+ }
            }
        }

        struct PayloadSeed(MessageType);

        impl<'de> de::DeserializeSeed<'de> for PayloadSeed {
            type Value = Payload;
            fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Payload, D::Error> {
                Ok(match self.0 { $(MessageType::$mt => Payload::$variant($ty::deserialize(d)?)),+ })
            }
        }

        $(impl From<$ty> for Payload {
            fn from(p: $ty) -> Self { Payload::$variant(p) }
        })+
    };
}

payloads! {
    TaskAssign(TaskAssign) => TaskAssign,
    TaskResult(TaskResult) => TaskResult,
    Heartbeat(Heartbeat) => Heartbeat,
    Question(Question) => Question,
    ToolRequest(ToolRequest) => ToolRequest,
    ToolResponse(ToolResponse) => ToolResponse,
    Usage(Usage) => Usage,
    Outcome(Outcome) => Outcome,
    ControlPause(ControlPause) => ControlPause,
    ControlResume(ControlResume) => ControlResume,
    IncidentOpened(IncidentOpened) => IncidentOpened,
}

impl Payload {
    pub(crate) fn size_hint(&self) -> usize {
        match self {
            Payload::TaskResult(r) => {
                r.summary.len() + r.diff.as_ref().map_or(0, Vec::len) + r.log.as_ref().map_or(0, Vec::len)
            }
            Payload::TaskAssign(a) => a.instructions.len(),
            Payload::ToolRequest(r) => r.input.len(),
            Payload::ToolResponse(r) => r.output.len(),
            _ => 0,
        }
    }
}

/// `task.assign`: the orchestrator hands one step of a task to a role.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskAssign {
    /// 1 for the first try; raised on each retry so results can be matched to attempts.
    pub attempt: u32,
    /// What to do, for the agent.
    pub instructions: String,
    /// The workspace directory the step may touch (`/workspace/task-<id>`).
    pub workspace: String,
    /// The repository the task works on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// The command QA runs in the sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_command: Option<String>,
    /// Findings from an earlier step (QA failures sent back to Dev).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub findings: Vec<String>,
    /// Repository paths (prefixes, `/`-separated, relative) the task may change; empty: any.
    /// Review rejects a diff outside them and `git.push_branch` refuses to push one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scope: Vec<String>,
    /// The change the step is about (QA, Review, Refactor): the newest diff Dev or Refactor
    /// returned. The worker rebuilds the workspace as the base commit plus this, so a step
    /// never judges leftovers of an earlier one.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_bytes")]
    pub change: Option<Vec<u8>>,
    /// The SHA-256 (lowercase hex) of `change`: the name under which QA's pass and
    /// Review's approval are recorded, and the only change the orchestrator will push.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_sha256: Option<String>,
}

/// `task.result`: a worker's answer to one `task.assign`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskResult {
    /// The attempt this answers.
    pub attempt: u32,
    /// Whether the step succeeded.
    pub status: Status,
    /// A short human-readable account.
    pub summary: String,
    /// Problems found (QA, review).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub findings: Vec<String>,
    /// A unified diff (Dev, Refactor).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_bytes")]
    pub diff: Option<Vec<u8>>,
    /// A capped log (QA test run).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_bytes")]
    pub log: Option<Vec<u8>>,
    /// The SHA-256 (lowercase hex) of the change the step judged (QA, Review) or started
    /// from (Refactor): the assignment's `change_sha256`, echoed. A pass or an approval
    /// counts only for that change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_sha256: Option<String>,
    /// The agent's tool calls in this step, in order, each with the verdict the worker's
    /// policy gave it (Dev, Review, Refactor). The orchestrator audits every refused call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub calls: Vec<ToolCallRecord>,
    /// The containment limits this step's sandbox runs hit in a way that looks like an
    /// attack (`oom_killed`, `pids_limit`, `disk_limit`, `network`): the orchestrator opens
    /// an incident. A run that merely timed out or failed is not listed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub containment: Vec<String>,
}

/// One tool call an agent made, as the worker's policy judged it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolCallRecord {
    /// The tool the model called (`read_file`, `edit_file`, ...), as the model named it.
    pub tool: String,
    /// Its arguments, shortened for the record (never file contents).
    pub args: String,
    /// `ok`, `refused` (the policy said no; it never ran) or `failed` (it ran and failed).
    pub verdict: CallVerdict,
    /// Why it was refused or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// How long it took, milliseconds.
    pub ms: u64,
}

/// What became of a [`ToolCallRecord`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallVerdict {
    /// Allowed and done.
    Ok,
    /// Refused by the policy before it ran.
    Refused,
    /// Allowed, but it failed (a missing file, an edit that did not match).
    Failed,
}

/// `heartbeat`: a worker is alive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// Increments per heartbeat of one process, so gaps are visible.
    pub seq: u64,
    /// Whether the worker is running a task (the envelope's `task_id` names it).
    pub busy: bool,
}

/// `question`: a worker needs a human.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Question {
    /// The question.
    pub text: String,
}

/// `tool.request`: a worker asks the orchestrator's tool proxy to act for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolRequest {
    /// Correlates the response.
    pub request_id: Uuid,
    /// The action (`llm.complete`, `git.push_branch`, …).
    pub action: String,
    /// The action's arguments, JSON text.
    pub input: String,
}

/// `tool.response`: the tool proxy's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolResponse {
    /// The request answered.
    pub request_id: Uuid,
    /// Whether the action was performed.
    pub ok: bool,
    /// The action's output (JSON text), or why it was refused.
    pub output: String,
}

/// `usage`: tokens spent on one model call, as the provider reported them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Usage {
    /// The role the call was made for.
    pub role: Role,
    /// Model name as configured.
    pub model: String,
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Completion tokens.
    pub output_tokens: u64,
    /// Cost in millionths of a US dollar (integers: no float rounding in budgets).
    pub cost_micro_usd: u64,
}

/// `outcome`: how a task step ended, for the failure counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outcome {
    /// The role whose step ended.
    pub role: Role,
    /// How it ended.
    pub status: Status,
    /// A classified error (`timeout`, `sandbox_oom`, …); unknown kinds trip the kill switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<String>,
}

/// `control.pause`: stop claiming work (the kill switch).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlPause {
    /// The new kill epoch.
    pub epoch: u64,
    /// Why, for operators.
    pub reason: String,
    /// The person who asked for it: the subject of the admin token the orchestrator
    /// accepted. Absent when no person did (a budget trigger, the orchestrator itself), so
    /// the budget manager's alert can name the admin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// `control.resume`: resume claiming work.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlResume {
    /// The epoch in force after the resume.
    pub epoch: u64,
    /// The person who asked for it (the admin token's subject); absent when none did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// `incident.opened`: the orchestrator tells the budget manager, whose alert channels reach
/// people, that an incident was opened (docs/incident-response.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncidentOpened {
    /// The incident, as `fleetctl incident show` takes it.
    pub incident: Uuid,
    /// `critical`, `high`, `medium` or `low`.
    pub severity: String,
    /// What opened it (`operator`, `secret_after_approval`, `rejection_burst`, …).
    pub trigger: String,
    /// One line saying what happened (redacted).
    pub title: String,
    /// The repository whose merges it freezes; absent: every repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// Whether it freezes automatic merges until resolved.
    pub freezes_merges: bool,
    /// When it was opened, Unix milliseconds.
    pub opened_at_ms: u64,
    /// Who opened it: an operator's name, or `orchestrator/<instance>`.
    pub opened_by: String,
    /// The tasks it concerns.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<Uuid>,
}

/// `Option<Vec<u8>>` as MessagePack `bin` (serde's default would write an array of ints).
mod opt_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_bytes(b),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Ok(Option::<serde_bytes::ByteBuf>::deserialize(d)?.map(serde_bytes::ByteBuf::into_vec))
    }
}

/// Body keys, in the order they are written.
const KEYS: [&str; 12] = [
    "id",
    "type",
    "from",
    "to",
    "task_id",
    "causation_id",
    "issued_at_ms",
    "ttl_ms",
    "kill_epoch",
    "traceparent",
    "lease",
    "payload",
];

impl Serialize for Envelope {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let optional =
            [self.task_id.is_some(), self.causation_id.is_some(), self.traceparent.is_some(), self.lease.is_some()];
        let len = 8 + optional.iter().filter(|p| **p).count();
        let mut map = s.serialize_map(Some(len))?;
        map.serialize_entry("id", &self.id)?;
        map.serialize_entry("type", &self.message_type())?;
        map.serialize_entry("from", &self.from)?;
        map.serialize_entry("to", &self.to)?;
        if let Some(t) = &self.task_id {
            map.serialize_entry("task_id", t)?;
        }
        if let Some(c) = &self.causation_id {
            map.serialize_entry("causation_id", c)?;
        }
        map.serialize_entry("issued_at_ms", &self.issued_at_ms)?;
        map.serialize_entry("ttl_ms", &self.ttl_ms)?;
        map.serialize_entry("kill_epoch", &self.kill_epoch)?;
        if let Some(t) = &self.traceparent {
            map.serialize_entry("traceparent", t)?;
        }
        if let Some(l) = &self.lease {
            map.serialize_entry("lease", l)?;
        }
        map.serialize_key("payload")?;
        self.payload.serialize_value(&mut map)?;
        map.end()
    }
}

impl<'de> Deserialize<'de> for Envelope {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(EnvelopeVisitor)
    }
}

struct EnvelopeVisitor;

/// A body key, matched against [`KEYS`] without allocating.
struct Key(&'static str);

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an envelope body key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                KEYS.iter().find(|k| **k == v).map(|k| Key(k)).ok_or_else(|| E::unknown_field(v, &KEYS))
            }
        }
        d.deserialize_str(V)
    }
}

/// Records a field, refusing a second occurrence of the same key.
fn set_once<T, E: de::Error>(slot: &mut Option<T>, key: &'static str, v: T) -> Result<(), E> {
    if slot.replace(v).is_some() {
        return Err(E::duplicate_field(key));
    }
    Ok(())
}

impl<'de> Visitor<'de> for EnvelopeVisitor {
    type Value = Envelope;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an envelope body map")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Envelope, A::Error> {
        let (mut id, mut ty, mut from, mut to) = (None, None, None, None);
        let (mut task_id, mut causation_id, mut issued, mut ttl, mut epoch) = (None, None, None, None, None);
        let (mut traceparent, mut lease, mut payload) = (None, None, None);
        while let Some(key) = map.next_key::<Key>()? {
            match key.0 {
                "id" => set_once(&mut id, "id", map.next_value::<Uuid>()?)?,
                "type" => set_once(&mut ty, "type", map.next_value::<MessageType>()?)?,
                "from" => set_once(&mut from, "from", map.next_value::<Sender>()?)?,
                "to" => set_once(&mut to, "to", map.next_value::<Role>()?)?,
                "task_id" => set_once(&mut task_id, "task_id", map.next_value::<Uuid>()?)?,
                "causation_id" => set_once(&mut causation_id, "causation_id", map.next_value::<Uuid>()?)?,
                "issued_at_ms" => set_once(&mut issued, "issued_at_ms", map.next_value::<u64>()?)?,
                "ttl_ms" => set_once(&mut ttl, "ttl_ms", map.next_value::<u64>()?)?,
                "kill_epoch" => set_once(&mut epoch, "kill_epoch", map.next_value::<u64>()?)?,
                "traceparent" => set_once(&mut traceparent, "traceparent", map.next_value::<String>()?)?,
                "lease" => set_once(&mut lease, "lease", map.next_value::<String>()?)?,
                "payload" => {
                    // The payload's shape depends on `type`, so `type` must come first (the
                    // spec fixes the key order; this is the one place a decoder relies on it).
                    let Some(t) = ty else {
                        return Err(de::Error::custom("\"payload\" appears before \"type\""));
                    };
                    set_once(&mut payload, "payload", map.next_value_seed(PayloadSeed(t))?)?
                }
                other => return Err(de::Error::unknown_field(other, &KEYS)),
            }
        }
        Ok(Envelope {
            id: id.ok_or_else(|| de::Error::missing_field("id"))?,
            from: from.ok_or_else(|| de::Error::missing_field("from"))?,
            to: to.ok_or_else(|| de::Error::missing_field("to"))?,
            task_id,
            causation_id,
            issued_at_ms: issued.ok_or_else(|| de::Error::missing_field("issued_at_ms"))?,
            ttl_ms: ttl.ok_or_else(|| de::Error::missing_field("ttl_ms"))?,
            kill_epoch: epoch.ok_or_else(|| de::Error::missing_field("kill_epoch"))?,
            traceparent,
            lease,
            payload: payload.ok_or_else(|| de::Error::missing_field("payload"))?,
        })
    }
}
