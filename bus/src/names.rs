//! Keys and field names the bus uses besides the streams themselves.

/// The one field of a stream entry that carries the frame.
pub const ENV_FIELD: &str = "env";

/// Replay-guard key for an envelope id within a consumer group. Its value is the stream
/// entry that first carried the id, so a redelivery of that same entry is told apart from
/// a duplicate carried by another entry.
pub fn seen_key(group: &str, id: &uuid::Uuid) -> String {
    format!("fleet:seen:{group}:{}", id.as_simple())
}

/// Set once a handler succeeded for an envelope id, just before the ack, so an entry
/// redelivered after a crash between the two is acknowledged without running the handler.
pub fn done_key(group: &str, id: &uuid::Uuid) -> String {
    format!("fleet:done:{group}:{}", id.as_simple())
}

/// Fields of `fleet:rejected` and `fleet:dlq` entries (besides [`ENV_FIELD`], the raw bytes).
pub mod fields {
    /// Stream the entry was read from.
    pub const STREAM: &str = "stream";
    /// Its entry id there.
    pub const ENTRY: &str = "entry";
    /// Consumer group that read it.
    pub const GROUP: &str = "group";
    /// Consumer that read it.
    pub const CONSUMER: &str = "consumer";
    /// `fleet:rejected`: the verifier's code (`bad_signature`, …).
    pub const REASON: &str = "reason";
    /// Human-readable detail.
    pub const DETAIL: &str = "detail";
    /// `fleet:dlq`: Redis's delivery count when it was given up.
    pub const DELIVERIES: &str = "deliveries";
    /// When it was moved, Unix ms.
    pub const AT_MS: &str = "at_ms";
}
