//! Reading raw `redis::Value` replies (Lua script results, `XINFO`, `CONFIG GET`) without
//! panicking on a shape we did not expect: every mismatch is a [`QueueError::Protocol`].
//! RESP2 arrays and RESP3 maps are both accepted.

use std::collections::HashMap;

use redis::Value;

use super::error::{QueueError, Result};

pub(crate) fn string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::Okay => Some("OK".into()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

pub(crate) fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.trim().parse().ok(),
        Value::SimpleString(s) => s.trim().parse().ok(),
        _ => None,
    }
}

pub(crate) fn array(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Array(a) | Value::Set(a) => Some(a),
        _ => None,
    }
}

pub(crate) fn req_string(what: &'static str, v: Option<&Value>) -> Result<String> {
    v.and_then(string)
        .ok_or_else(|| QueueError::protocol(what, format!("expected a string, got {v:?}")))
}

pub(crate) fn req_int(what: &'static str, v: Option<&Value>) -> Result<i64> {
    v.and_then(int)
        .ok_or_else(|| QueueError::protocol(what, format!("expected an integer, got {v:?}")))
}

pub(crate) fn req_array<'a>(what: &'static str, v: Option<&'a Value>) -> Result<&'a [Value]> {
    match v {
        Some(Value::Nil) => Ok(&[]),
        Some(v) => array(v)
            .ok_or_else(|| QueueError::protocol(what, format!("expected an array, got {v:?}"))),
        None => Err(QueueError::protocol(what, "reply too short")),
    }
}

/// A flat `[k1, v1, k2, v2, …]` array or a RESP3 map as ordered pairs.
pub(crate) fn pairs(what: &'static str, v: &Value) -> Result<Vec<(String, Value)>> {
    match v {
        Value::Map(m) => Ok(m
            .iter()
            .filter_map(|(k, v)| string(k).map(|k| (k, v.clone())))
            .collect()),
        Value::Array(a) => {
            if a.len() % 2 != 0 {
                return Err(QueueError::protocol(
                    what,
                    "odd number of field/value items",
                ));
            }
            Ok(a.chunks(2)
                .filter_map(|c| string(&c[0]).map(|k| (k, c[1].clone())))
                .collect())
        }
        Value::Nil => Ok(Vec::new()),
        other => Err(QueueError::protocol(
            what,
            format!("expected field/value pairs, got {other:?}"),
        )),
    }
}

/// Stream entry fields as a map (UTF-8 decoded lossily; a repeated field keeps its last value).
pub(crate) fn fields(what: &'static str, v: &Value) -> Result<HashMap<String, String>> {
    Ok(pairs(what, v)?
        .into_iter()
        .map(|(k, v)| (k, string(&v).unwrap_or_default()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_arrays_and_maps_read_alike() {
        let flat = Value::Array(vec![
            Value::BulkString(b"job".to_vec()),
            Value::BulkString(b"{}".to_vec()),
        ]);
        let map = Value::Map(vec![(
            Value::BulkString(b"job".to_vec()),
            Value::BulkString(b"{}".to_vec()),
        )]);
        assert_eq!(fields("t", &flat).unwrap(), fields("t", &map).unwrap());
        assert!(fields("t", &Value::Array(vec![Value::Int(1)])).is_err());
        assert_eq!(int(&Value::BulkString(b"42".to_vec())), Some(42));
        assert!(req_array("t", Some(&Value::Int(1))).is_err());
        assert!(req_array("t", Some(&Value::Nil)).unwrap().is_empty());
    }
}
