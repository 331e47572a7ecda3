//! Signed MessagePack envelopes: the only thing agentfleet's processes say to each other.
//!
//! A stream entry carries one frame `[v, kid, alg, body, sig]`. The body is an
//! [`Envelope`] (who, to whom, when, under which kill epoch, and a typed [`Payload`]); the
//! signature is HMAC-SHA256 with the key of the sender→receiver edge over a length-prefixed,
//! domain-separated encoding of the frame's first four items. `docs/wire-format.md` is the
//! normative description; `tests/vectors/` holds vectors for other implementations.
//!
//! This crate does no I/O: files are parsed from strings, time and the kill epoch are
//! passed in, and the replay guard is a trait the bus implements on Redis.
//!
//! # Layout
//! - [`names`]: roles, message types, stream names: every wire name, in one place.
//! - [`body`]: [`Envelope`] and its payload types, and their MessagePack encoding.
//! - [`wire`]: the outer frame and the signing input.
//! - `strict`: holds a decoded body to the MessagePack types the spec names.
//! - [`keys`]: key ids, the master secret, HKDF derivation, keyset files, [`Keyring`].
//! - [`live`]: [`LiveKeyring`], the keyring a running process replaces when its keyset
//!   file changes.
//! - [`permissions`]: the table from `config/permissions.toml`.
//! - [`verify`]: [`Keyring::seal`], [`Verifier`] with its ordered checks, [`Verified`], and
//!   the replay guard.

pub mod body;
pub mod keys;
pub mod live;
pub mod names;
pub mod permissions;
mod strict;
pub mod verify;
pub mod wire;

pub use body::{
    CallVerdict, ControlPause, ControlResume, Envelope, Heartbeat, IncidentOpened, Outcome, Payload, Question, Sender,
    Status, TaskAssign, TaskResult, ToolCallRecord, ToolRequest, ToolResponse, Usage,
};
pub use keys::{Edge, Generations, KeyError, Keyring, Keyset, KeysetEntry, Kid, MasterFile, MasterSecret, Process};
pub use live::LiveKeyring;
pub use names::{Instance, MessageType, Role, StreamName, streams};
pub use permissions::{PermissionError, PermissionTable};
pub use verify::{
    Checked, MemoryReplayGuard, ReplayGuard, Verified, Verifier, VerifierConfig, VerifyContext, VerifyError,
};
