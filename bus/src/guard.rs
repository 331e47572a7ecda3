//! The shared replay guard: which envelope ids a consumer group has seen, and in which
//! stream entry, kept in Redis for as long as the envelope could still be accepted.
//!
//! Ids live as fields of a few hashes per stream and group, one per [`BUCKET_MS`] of expiry
//! time (`fleet:seen:{<stream>}:<group>:<bucket end ms>`), each id as its 16 bytes (not 32
//! hex digits: Redis then spends about a fifth less time per `HSETNX`, and the field 16
//! bytes less memory; `docs/benchmarks.md`), each hash expiring as a whole
//! once its last id could no longer pass the verifier's clock check. A batch is one pipeline:
//! `HSETNX` per id and one `PEXPIREAT` per bucket; only ids already there (redeliveries,
//! duplicates) take a second round trip, an `HGET` of the entry that carried them first.
//!
//! Against the guard before issue 16, a `SET … NX GET PX` key per id, Redis no longer
//! creates a key and an expiry entry per id, only a hash field: `docs/benchmarks.md` has
//! the figures. No Lua: a script or function would cost Redis more per id than these plain
//! commands (measured), and `EVAL` would let a compromised worker run any Lua.
//!
//! The keys carry the stream as hash tag, so on a Redis Cluster a batch's buckets are in
//! one slot, with the stream.

use crate::{BusError, Conn};

/// Width of a bucket: an id is kept until the end of the bucket its own expiry falls in,
/// at most this much longer than needed.
pub const BUCKET_MS: u64 = 10_000;

/// Kept past a bucket's end, for the clock skew between the consumers and Redis.
const EXPIRY_MARGIN_MS: u64 = 1_000;

/// The end (Unix ms) of the bucket that keeps an id to be remembered until `until_ms`.
pub fn bucket_end(until_ms: u64) -> u64 {
    until_ms.div_ceil(BUCKET_MS).saturating_mul(BUCKET_MS)
}

/// One envelope to mark: its id, until when it must be remembered (Unix ms), and the
/// stream entry that carries it.
#[derive(Debug, Clone, Copy)]
pub struct Sighting<'a> {
    /// The envelope's id.
    pub id: uuid::Uuid,
    /// [`envelope::Checked::remember_until_ms`].
    pub until_ms: u64,
    /// The entry id.
    pub entry: &'a str,
}

/// Marks every sighting as seen by `group` on `stream` and answers for each the entry that
/// carried its id before (`None`: first sighting). One round trip, plus one when some ids
/// were there already.
pub async fn mark(
    c: &mut Conn,
    stream: &str,
    group: &str,
    sightings: &[Sighting<'_>],
) -> Result<Vec<Option<String>>, BusError> {
    if sightings.is_empty() {
        return Ok(Vec::new());
    }
    let mut buckets: Vec<(u64, String)> = Vec::with_capacity(2);
    let mut keyed: Vec<usize> = Vec::with_capacity(sightings.len());
    let mut pipe = redis::pipe();
    for s in sightings {
        let end = bucket_end(s.until_ms);
        let b = match buckets.iter().position(|(e, _)| *e == end) {
            Some(b) => b,
            None => {
                buckets.push((end, crate::names::seen_bucket_key(stream, group, end)));
                buckets.len() - 1
            }
        };
        pipe.cmd("HSETNX").arg(&buckets[b].1).arg(s.id.as_bytes()).arg(s.entry);
        keyed.push(b);
    }
    for (end, key) in &buckets {
        pipe.cmd("PEXPIREAT").arg(key).arg(end.saturating_add(EXPIRY_MARGIN_MS)).ignore();
    }
    let fresh: Vec<bool> = pipe.query_async(c).await?;
    if fresh.len() != sightings.len() {
        return Err(BusError::Reply {
            command: "HSETNX",
            detail: format!("{} answers for {} envelopes", fresh.len(), sightings.len()),
        });
    }
    let mut answers: Vec<Option<String>> = vec![None; sightings.len()];
    let known: Vec<usize> = (0..sightings.len()).filter(|i| !fresh[*i]).collect();
    if !known.is_empty() {
        let mut pipe = redis::pipe();
        for i in &known {
            pipe.cmd("HGET").arg(&buckets[keyed[*i]].1).arg(sightings[*i].id.as_bytes());
        }
        let first: Vec<Option<String>> = pipe.query_async(c).await?;
        for (i, entry) in known.into_iter().zip(first) {
            // Gone between the two calls (its bucket expired): the envelope is past its
            // window, which the clock check refuses anyway; call it a duplicate, never new.
            answers[i] = Some(entry.unwrap_or_else(|| "expired".to_owned()));
        }
    }
    Ok(answers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_kept_to_the_end_of_its_bucket_never_less() {
        assert_eq!(bucket_end(1), BUCKET_MS);
        assert_eq!(bucket_end(BUCKET_MS), BUCKET_MS);
        assert_eq!(bucket_end(BUCKET_MS + 1), 2 * BUCKET_MS);
        for until in [0u64, 1, 9_999, 10_000, 1_700_000_000_123] {
            let end = bucket_end(until);
            assert!(end >= until && end - until < BUCKET_MS, "{until} -> {end}");
        }
    }
}
