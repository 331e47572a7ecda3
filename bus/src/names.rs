//! Keys and field names the bus uses besides the streams themselves.

/// The one field of a stream entry that carries the frame.
pub const ENV_FIELD: &str = "env";

/// Replay-guard bucket of a consumer group of `stream`: a hash whose fields are the envelope
/// ids to remember until `bucket_end_ms` (see [`crate::guard`]), each valued with the stream
/// entry that first carried it, so a redelivery of that same entry is told apart from a
/// duplicate carried by another entry.
///
/// The key carries the stream's name as its hash tag (`{fleet:tasks:dev}`), so on a Redis
/// Cluster it lives in the stream's slot: a consumer's guard writes for a batch are one
/// call to one node, like its read and its acknowledgement.
pub fn seen_bucket_key(stream: &str, group: &str, bucket_end_ms: u64) -> String {
    format!("fleet:seen:{{{stream}}}:{group}:{bucket_end_ms}")
}

/// The done marker consumers before issue 16 set once a handler succeeded, just before the
/// ack. Consumers no longer write it (the acknowledgement itself is the mark: an
/// acknowledged entry is never handed out again, so the marker only covered a settle
/// pipeline cut between its `SET` and its `XACK`); a redelivered entry whose marker an
/// older consumer wrote is still acknowledged without running the handler again.
pub fn done_key(group: &str, id: &uuid::Uuid) -> String {
    format!("fleet:done:{group}:{}", id.as_simple())
}

/// Most of an entry's frame that `fleet:rejected` and `fleet:dlq` keep: a longer frame is
/// kept as its first `SIDE_COPY_MAX` bytes plus its length and SHA-256 (the fields
/// [`fields::ENV_LEN`] and [`fields::ENV_SHA256`], written for every copy), so a flood of
/// oversized junk costs each side stream at most [`SIDE_STREAM_CAP`] × (this + a few hundred
/// bytes of fields), not its whole bytes.
pub const SIDE_COPY_MAX: usize = 4096;
/// Longest `detail` a side-stream entry keeps (a handler's error text can be long).
pub const SIDE_DETAIL_MAX: usize = 1024;
/// Approximate `MAXLEN` of `fleet:rejected` and `fleet:dlq`: they are read by operators,
/// not consumed. With [`SIDE_COPY_MAX`] this bounds each to roughly 100 MiB.
pub const SIDE_STREAM_CAP: u64 = 20_000;

/// What a side stream keeps of a frame: at most [`SIDE_COPY_MAX`] bytes of it, its length,
/// and the lower-case hex SHA-256 of the whole frame.
pub fn side_copy(frame: &[u8]) -> (&[u8], usize, String) {
    use sha2::Digest as _;
    let kept = &frame[..frame.len().min(SIDE_COPY_MAX)];
    (kept, frame.len(), hex::encode(sha2::Sha256::digest(frame)))
}

/// `detail` cut to at most [`SIDE_DETAIL_MAX`] bytes, on a character boundary.
pub fn side_detail(detail: &str) -> &str {
    if detail.len() <= SIDE_DETAIL_MAX {
        return detail;
    }
    let mut end = SIDE_DETAIL_MAX;
    while !detail.is_char_boundary(end) {
        end -= 1;
    }
    &detail[..end]
}

/// Fields of `fleet:rejected` and `fleet:dlq` entries (besides [`ENV_FIELD`], the frame or,
/// past [`SIDE_COPY_MAX`], its prefix).
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
    /// Length in bytes of the original frame (the `env` field holds at most
    /// [`super::SIDE_COPY_MAX`] of them).
    pub const ENV_LEN: &str = "env_len";
    /// Lower-case hex SHA-256 of the whole original frame.
    pub const ENV_SHA256: &str = "env_sha256";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn side_copies_keep_a_prefix_the_length_and_the_hash() {
        let small = b"frame";
        let (kept, len, sha) = side_copy(small);
        assert_eq!((kept, len), (&small[..], 5));
        assert_eq!(sha, "9dff50df08c635815f4b19da10f756605a34a79a48d4ba48712782502975a70e");
        let big = vec![7u8; SIDE_COPY_MAX * 3 + 1];
        let (kept, len, _) = side_copy(&big);
        assert_eq!((kept.len(), len), (SIDE_COPY_MAX, big.len()));
        let long = "é".repeat(SIDE_DETAIL_MAX);
        assert!(side_detail(&long).len() <= SIDE_DETAIL_MAX);
        assert_eq!(side_detail("short"), "short");
    }
}
