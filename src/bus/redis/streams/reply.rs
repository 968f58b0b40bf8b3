//! Parsing of stream replies (`XREADGROUP`, `XCLAIM`) from [`Value`]s: RESP2 arrays or
//! RESP3 maps, nil for "nothing" and for an entry deleted while pending. Malformed replies
//! are errors, never panics.

use ::redis::Value;

use crate::durable::StreamId;

/// One entry as Redis returned it; `fields` is `None` for an entry deleted while pending.
pub(super) struct Entry {
    pub id: StreamId,
    pub fields: Option<Vec<(Vec<u8>, Vec<u8>)>>,
}

/// An `XREADGROUP` reply (nil, or per stream its entries), RESP2 arrays or RESP3 maps.
pub(super) fn parse_streams(reply: Value) -> Result<Vec<(String, Vec<Entry>)>, String> {
    let pairs: Vec<(Value, Value)> = match reply {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::Array(mut kv) if kv.len() == 2 => {
                    let v = kv.pop().unwrap_or(Value::Nil);
                    let k = kv.pop().unwrap_or(Value::Nil);
                    Ok((k, v))
                }
                other => Err(format!("unexpected stream item {other:?}")),
            })
            .collect::<Result<_, _>>()?,
        Value::Map(map) => map,
        other => return Err(format!("unexpected reply {other:?}")),
    };
    pairs
        .into_iter()
        .map(|(k, v)| Ok((text(&k)?, parse_entries(v)?)))
        .collect()
}

/// An array of `[id, [field, value, …] | nil]` (XREADGROUP per stream, XCLAIM).
pub(super) fn parse_entries(v: Value) -> Result<Vec<Entry>, String> {
    let items = match v {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(items) => items,
        other => return Err(format!("unexpected entries {other:?}")),
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(parts) = item else {
            // Redis 6.2 answers XCLAIM of a deleted entry with nil: nothing to take.
            continue;
        };
        let mut parts = parts.into_iter();
        let id = text(&parts.next().unwrap_or(Value::Nil))?;
        let id: StreamId = id.parse().map_err(|e| format!("{e}"))?;
        let fields = match parts.next().unwrap_or(Value::Nil) {
            Value::Nil => None,
            Value::Array(flat) => {
                let mut fields = Vec::with_capacity(flat.len() / 2);
                let mut flat = flat.into_iter();
                while let (Some(k), Some(v)) = (flat.next(), flat.next()) {
                    fields.push((bytes(k)?, bytes(v)?));
                }
                Some(fields)
            }
            Value::Map(map) => Some(
                map.into_iter()
                    .map(|(k, v)| Ok((bytes(k)?, bytes(v)?)))
                    .collect::<Result<_, String>>()?,
            ),
            other => return Err(format!("unexpected fields {other:?}")),
        };
        out.push(Entry { id, fields });
    }
    Ok(out)
}

fn bytes(v: Value) -> Result<Vec<u8>, String> {
    match v {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.into_bytes()),
        other => Err(format!("unexpected value {other:?}")),
    }
}

fn text(v: &Value) -> Result<String, String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).map_err(|e| e.to_string()),
        Value::SimpleString(s) => Ok(s.clone()),
        other => Err(format!("unexpected value {other:?}")),
    }
}
