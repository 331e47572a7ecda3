//! Parsing Redis stream replies (RESP2 shapes, as Redis 7.0 sends them).
//!
//! Written against `redis::Value` rather than typed helpers because the shapes that matter
//! for safety — deleted entries showing up as `nil` field lists, `XAUTOCLAIM`'s third
//! element of deleted ids — must be handled explicitly.

use redis::Value;

use crate::BusError;

/// One stream entry. `fields` is `None` when the entry was deleted from the stream while it
/// was still pending (Redis reports the id with a `nil` body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Stream entry id (`<ms>-<seq>`).
    pub id: String,
    /// Field/value pairs.
    pub fields: Option<Vec<(Vec<u8>, Vec<u8>)>>,
}

impl Entry {
    /// The value of `name`, if present.
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields.as_ref()?.iter().find(|(k, _)| k == name.as_bytes()).map(|(_, v)| v.as_slice())
    }
}

fn bad(command: &'static str, detail: impl Into<String>) -> BusError {
    BusError::Reply { command, detail: detail.into() }
}

/// Bytes of a bulk or simple string.
pub fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        Value::VerbatimString { text, .. } => Some(text.as_bytes()),
        _ => None,
    }
}

/// Text of a bulk or simple string.
pub fn text(v: &Value) -> Option<String> {
    bytes(v).map(|b| String::from_utf8_lossy(b).into_owned())
}

/// An integer, also when sent as a string.
pub fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => text(other)?.parse().ok(),
    }
}

fn array<'a>(command: &'static str, v: &'a Value) -> Result<&'a [Value], BusError> {
    match v {
        Value::Array(items) | Value::Set(items) => Ok(items),
        other => Err(bad(command, format!("expected an array, got {other:?}"))),
    }
}

/// Bytes of a bulk or simple string, moved out of the reply.
fn into_bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::VerbatimString { text, .. } => Some(text.into_bytes()),
        _ => None,
    }
}

fn into_array(command: &'static str, v: Value) -> Result<Vec<Value>, BusError> {
    match v {
        Value::Array(items) | Value::Set(items) => Ok(items),
        other => Err(bad(command, format!("expected an array, got {other:?}"))),
    }
}

/// `[id, [k, v, …] | nil]`. The reply's buffers are moved into the entry, never copied:
/// an entry's envelope is its largest part, and a consumer reads thousands a second.
fn entry(command: &'static str, v: Value) -> Result<Entry, BusError> {
    let mut parts = into_array(command, v)?.into_iter();
    let (Some(id), Some(body), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad(command, "entry is not [id, fields]"));
    };
    let id = into_bytes(id).ok_or_else(|| bad(command, "entry id is not a string"))?;
    let id = String::from_utf8(id).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
    let fields = match body {
        Value::Nil => None,
        other => {
            let flat = into_array(command, other)?;
            if flat.len() % 2 != 0 {
                return Err(bad(command, "odd number of field items"));
            }
            let mut pairs = Vec::with_capacity(flat.len() / 2);
            let mut items = flat.into_iter();
            while let (Some(k), Some(v)) = (items.next(), items.next()) {
                let k = into_bytes(k).ok_or_else(|| bad(command, "field name is not a string"))?;
                let v = into_bytes(v).ok_or_else(|| bad(command, "field value is not a string"))?;
                pairs.push((k, v));
            }
            Some(pairs)
        }
    };
    Ok(Entry { id, fields })
}

/// A list of entries (`XRANGE`, `XCLAIM`); `nil` items (deleted entries in some versions) are skipped.
pub fn entries(command: &'static str, v: &Value) -> Result<Vec<Entry>, BusError> {
    entries_owned(command, v.clone())
}

/// [`entries`], taking the reply: its buffers move into the entries.
pub fn entries_owned(command: &'static str, v: Value) -> Result<Vec<Entry>, BusError> {
    into_array(command, v)?.into_iter().filter(|e| !matches!(e, Value::Nil)).map(|e| entry(command, e)).collect()
}

/// `XREADGROUP`/`XREAD` for one stream: `nil` on timeout, else `[[stream, entries]]`.
pub fn read_one_stream(v: &Value) -> Result<Vec<Entry>, BusError> {
    read_one_stream_owned(v.clone())
}

/// [`read_one_stream`], taking the reply: its buffers move into the entries (the
/// consumers' path).
pub fn read_one_stream_owned(v: Value) -> Result<Vec<Entry>, BusError> {
    const CMD: &str = "XREADGROUP";
    match v {
        Value::Nil => Ok(Vec::new()),
        Value::Map(streams) => match streams.into_iter().next() {
            Some((_, list)) => entries_owned(CMD, list),
            None => Ok(Vec::new()),
        },
        other => {
            let Some(first) = into_array(CMD, other)?.into_iter().next() else { return Ok(Vec::new()) };
            let mut pair = into_array(CMD, first)?.into_iter();
            let (Some(_), Some(list), None) = (pair.next(), pair.next(), pair.next()) else {
                return Err(bad(CMD, "stream item is not [name, entries]"));
            };
            entries_owned(CMD, list)
        }
    }
}

/// `XAUTOCLAIM … JUSTID` on Redis ≥ 7: `[next cursor, [ids], [deleted ids]]`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AutoClaim {
    /// Where the next call starts; `0-0` when the scan is complete.
    pub cursor: String,
    /// Ids now owned by the caller.
    pub claimed: Vec<String>,
    /// Pending ids whose entries no longer exist; Redis removed them from the PEL.
    pub deleted: Vec<String>,
}

/// Parses an `XAUTOCLAIM … JUSTID` reply.
pub fn autoclaim_justid(v: &Value) -> Result<AutoClaim, BusError> {
    const CMD: &str = "XAUTOCLAIM";
    let parts = array(CMD, v)?;
    let cursor = parts.first().and_then(text).ok_or_else(|| bad(CMD, "missing cursor"))?;
    let ids = |v: Option<&Value>| -> Result<Vec<String>, BusError> {
        match v {
            None | Some(Value::Nil) => Ok(Vec::new()),
            Some(list) => {
                array(CMD, list)?.iter().map(|i| text(i).ok_or_else(|| bad(CMD, "id is not a string"))).collect()
            }
        }
    };
    Ok(AutoClaim { cursor, claimed: ids(parts.get(1))?, deleted: ids(parts.get(2))? })
}

/// One row of `XPENDING key group [IDLE ms] start end count [consumer]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// Entry id.
    pub id: String,
    /// Owner.
    pub consumer: String,
    /// Milliseconds since last delivery.
    pub idle_ms: u64,
    /// Redis's delivery counter.
    pub deliveries: u64,
}

/// Parses the extended form of `XPENDING`.
pub fn pending(v: &Value) -> Result<Vec<Pending>, BusError> {
    const CMD: &str = "XPENDING";
    array(CMD, v)?
        .iter()
        .map(|row| {
            let r = array(CMD, row)?;
            let [id, consumer, idle, count] = r else { return Err(bad(CMD, "row is not [id, consumer, idle, count]")) };
            Ok(Pending {
                id: text(id).ok_or_else(|| bad(CMD, "id"))?,
                consumer: text(consumer).ok_or_else(|| bad(CMD, "consumer"))?,
                idle_ms: int(idle).ok_or_else(|| bad(CMD, "idle"))?.max(0) as u64,
                deliveries: int(count).ok_or_else(|| bad(CMD, "count"))?.max(0) as u64,
            })
        })
        .collect()
}

/// `XINFO GROUPS` / `XINFO CONSUMERS`: a list of flat `[k, v, …]` maps (or RESP3 maps).
pub fn info_maps(command: &'static str, v: &Value) -> Result<Vec<Vec<(String, Value)>>, BusError> {
    array(command, v)?
        .iter()
        .map(|item| match item {
            Value::Map(pairs) => Ok(pairs.iter().filter_map(|(k, v)| Some((text(k)?, v.clone()))).collect()),
            other => {
                let flat = array(command, other)?;
                Ok(flat.chunks_exact(2).filter_map(|kv| Some((text(&kv[0])?, kv[1].clone()))).collect())
            }
        })
        .collect()
}

/// Looks up `key` in an info map.
pub fn info_get<'a>(map: &'a [(String, Value)], key: &str) -> Option<&'a Value> {
    map.iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bs(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn xreadgroup_replies_parse_including_deleted_entries() {
        assert!(read_one_stream(&Value::Nil).unwrap().is_empty());
        let reply = Value::Array(vec![Value::Array(vec![
            bs("fleet:results"),
            Value::Array(vec![
                Value::Array(vec![bs("1-0"), Value::Array(vec![bs("env"), bs("abc")])]),
                Value::Array(vec![bs("2-0"), Value::Nil]),
            ]),
        ])]);
        let got = read_one_stream(&reply).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].field("env"), Some(&b"abc"[..]));
        assert_eq!(got[1].fields, None);
        assert!(read_one_stream(&bs("weird")).is_err());
    }

    #[test]
    fn xautoclaim_reports_deleted_ids() {
        let reply = Value::Array(vec![bs("0-0"), Value::Array(vec![bs("5-0")]), Value::Array(vec![bs("3-0")])]);
        let got = autoclaim_justid(&reply).unwrap();
        assert_eq!(got, AutoClaim { cursor: "0-0".into(), claimed: vec!["5-0".into()], deleted: vec!["3-0".into()] });
    }

    #[test]
    fn xpending_rows_parse() {
        let reply = Value::Array(vec![Value::Array(vec![bs("1-0"), bs("c1"), Value::Int(1500), Value::Int(3)])]);
        assert_eq!(
            pending(&reply).unwrap(),
            vec![Pending { id: "1-0".into(), consumer: "c1".into(), idle_ms: 1500, deliveries: 3 }]
        );
        assert!(pending(&Value::Array(vec![Value::Array(vec![bs("1-0")])])).is_err());
    }
}
