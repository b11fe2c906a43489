//! JSON views of plugin values, for people: `status --json`, dead letters,
//! stored job params, `event list --json`. Bytes become
//! `{"$bytes": "<hex>"}` so they stay distinguishable from text; non-finite
//! floats become `null`.
//!
//! And back, for what people write (`event send`): [`json_to_value`] reads
//! exactly what [`value_to_json`] writes, so a value shown can be sent
//! again. What does not come back as it was:
//!
//! - a non-finite float was written as `null`, and reads as `Null`;
//! - a map whose only key is `$bytes` reads as bytes (or is refused if its
//!   value is not hex): that one object is the bytes form;
//! - a map's keys come back in the order serde_json keeps them, sorted, and
//!   a key written twice in a text keeps its last value (serde_json's rule).
//!   Plugins look keys up by name, so neither changes what a map says.

use quiet_plugin_api::{abi_stable::std_types::RVec, Envelope, Field, Value};
use serde_json::Value as Json;

use crate::encoding::codec;

/// `v` as JSON.
pub fn value_to_json(v: &Value) -> Json {
    match v {
        Value::Null => Json::Null,
        Value::Bool(b) => Json::Bool(*b),
        Value::Int(i) => Json::from(*i),
        Value::Float(f) => serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number),
        Value::Text(s) => Json::String(s.to_string()),
        Value::Bytes(b) => serde_json::json!({ BYTES_KEY: hex::encode(b) }),
        Value::List(l) => Json::Array(l.iter().map(value_to_json).collect()),
        Value::Map(m) => Json::Object(
            m.iter()
                .map(|f| (f.key.to_string(), value_to_json(&f.value)))
                .collect(),
        ),
    }
}

/// The one key of the object that stands for bytes.
const BYTES_KEY: &str = "$bytes";

/// The value `j` stands for: the inverse of [`value_to_json`] (see the
/// [module docs](self) for what differs). A number written with a fraction
/// or an exponent (`1.0`, `1e3`) is a float, as near as an `f64` gets, the
/// way every JSON reader takes it; one written without is an integer, and
/// must fit an `i64`: beyond that it is refused rather than rounded to a
/// float, since a number that silently changes is worse than an error.
/// Also refused, so that nothing made here is refused later by the codec:
/// lists and maps nested deeper than [`codec::MAX_DEPTH`], maps of more
/// than [`codec::MAX_MAP_FIELDS`] keys. The error is one line, naming where
/// in `j` (`at .reactions[2]: …`).
pub fn json_to_value(j: &Json) -> Result<Value, String> {
    to_value(j, 0).map_err(|(path, what)| match path.is_empty() {
        true => what,
        false => format!("at {path}: {what}"),
    })
}

/// A refusal: where (built up as it returns, innermost first) and what.
type Refusal = (String, String);

fn to_value(j: &Json, depth: usize) -> Result<Value, Refusal> {
    let refuse = |what: String| Err((String::new(), what));
    Ok(match j {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => match (n.as_i64(), n.is_f64()) {
            (Some(i), _) => Value::Int(i),
            (None, true) => Value::Float(n.as_f64().expect("an f64 number")),
            (None, false) => {
                return refuse(format!(
                    "the integer {n} is beyond the 64-bit range: write it as a float ({n}.0) or as text"
                ))
            }
        },
        Json::String(s) => Value::from(s.as_str()),
        Json::Object(o) if o.len() == 1 && o.contains_key(BYTES_KEY) => {
            match o[BYTES_KEY].as_str().map(hex::decode) {
                Some(Ok(bytes)) => Value::from(bytes),
                _ => return refuse(format!(
                    "{{\"{BYTES_KEY}\": …}} stands for bytes, and takes a string of hex digits, two a byte"
                )),
            }
        }
        Json::Array(_) | Json::Object(_) if depth >= codec::MAX_DEPTH => {
            return refuse(format!(
                "lists and maps nest at most {} deep",
                codec::MAX_DEPTH
            ))
        }
        Json::Array(items) => Value::List(
            items
                .iter()
                .enumerate()
                .map(|(i, item)| to_value(item, depth + 1).map_err(|e| within(&format!("[{i}]"), e)))
                .collect::<Result<RVec<Value>, Refusal>>()?,
        ),
        Json::Object(o) if o.len() > codec::MAX_MAP_FIELDS => {
            return refuse(format!(
                "a map has at most {} keys, this one {}",
                codec::MAX_MAP_FIELDS,
                o.len()
            ))
        }
        Json::Object(o) => Value::Map(
            o.iter()
                .map(|(k, v)| {
                    let value = to_value(v, depth + 1).map_err(|e| within(&key_step(k), e))?;
                    Ok(Field {
                        key: k.as_str().into(),
                        value,
                    })
                })
                .collect::<Result<RVec<Field>, Refusal>>()?,
        ),
    })
}

/// `refusal`, one step further out: `step` is the key or index it was in.
fn within(step: &str, (path, what): Refusal) -> Refusal {
    (format!("{step}{path}"), what)
}

/// How a path names a key: `.name` for a plain one, `["…"]` quoted and
/// escaped otherwise, so that a key with a line break keeps the error on
/// one line.
fn key_step(key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'$'));
    match plain {
        true => format!(".{key}"),
        false => format!("[{key:?}]"),
    }
}

/// An envelope as a JSON object, fields in order.
pub fn envelope_to_json(envelope: &Envelope) -> Json {
    Json::Object(
        envelope
            .fields()
            .map(|(k, v)| (k.to_owned(), value_to_json(v)))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn bytes_stay_distinguishable_from_text() {
        let v = Value::map([
            ("b", Value::from(vec![0u8, 0xab])),
            ("t", Value::from("00ab")),
        ]);
        assert_eq!(
            value_to_json(&v),
            json!({"b": {"$bytes": "00ab"}, "t": "00ab"})
        );
        assert_eq!(value_to_json(&Value::Float(f64::NAN)), Json::Null);
    }

    /// Through JSON text and back, as `event list --json` then `event
    /// send` would take it. Keys in sorted order: see the module docs.
    fn round_trip(v: &Value) -> Value {
        let text = serde_json::to_string(&value_to_json(v)).unwrap();
        json_to_value(&serde_json::from_str(&text).unwrap()).unwrap()
    }

    #[test]
    fn every_kind_of_value_comes_back_as_it_was() {
        let nested =
            (0..codec::MAX_DEPTH - 1).fold(Value::Null, |v, _| Value::List(vec![v].into()));
        let v = Value::map([
            ("bytes", Value::from(vec![0u8, 0xab, 0xff])),
            ("empty_bytes", Value::from(Vec::<u8>::new())),
            ("f", Value::Float(1.0)),
            ("f_small", Value::Float(-2.5e-300)),
            ("i", Value::Int(1)),
            ("i_max", Value::Int(i64::MAX)),
            ("i_min", Value::Int(i64::MIN)),
            (
                "list",
                Value::from(vec![Value::Null, Value::Bool(true), Value::from("x")]),
            ),
            (
                "map",
                Value::map([
                    ("a", Value::Bool(false)),
                    ("b", Value::map::<&str, Value>([])),
                ]),
            ),
            ("nested", nested),
            ("text", Value::from("é\n\u{1b}\"\\")),
        ]);
        assert_eq!(round_trip(&v), v);
        // A float that is a whole number stays a float: its text says so.
        assert_eq!(
            serde_json::to_string(&value_to_json(&Value::Float(3.0))).unwrap(),
            "3.0"
        );
    }

    #[test]
    fn numbers_are_integers_or_floats_as_written() {
        let v = json_to_value(&json!({"a": 7, "b": -7, "c": 7.0, "d": 1e3, "e": 0.1})).unwrap();
        assert_eq!(v.get("a"), Some(&Value::Int(7)));
        assert_eq!(v.get("b"), Some(&Value::Int(-7)));
        assert_eq!(v.get("c"), Some(&Value::Float(7.0)));
        assert_eq!(v.get("d"), Some(&Value::Float(1000.0)));
        assert_eq!(v.get("e"), Some(&Value::Float(0.1)));
        // Beyond i64: refused, not rounded, naming where and what to do.
        let e = json_to_value(&json!({"ids": [1, u64::MAX]})).unwrap_err();
        assert_eq!(
            e,
            "at .ids[1]: the integer 18446744073709551615 is beyond the 64-bit range: \
             write it as a float (18446744073709551615.0) or as text"
        );
    }

    #[test]
    fn what_has_no_value_is_refused_in_one_line_naming_where() {
        for bad in [
            json!({"$bytes": "zz"}),
            json!({"$bytes": "abc"}),
            json!({"$bytes": 5}),
        ] {
            let e = json_to_value(&json!({"k": bad})).unwrap_err();
            assert!(
                e.starts_with("at .k: {\"$bytes\": …} stands for bytes"),
                "{e}"
            );
        }
        // Too deep or too wide for the codec: refused here, not later. As
        // deep as the codec reads is taken.
        let nest = |n| (0..n).fold(json!(1), |j, _| json!([j]));
        let deepest = json_to_value(&nest(codec::MAX_DEPTH)).unwrap();
        assert_eq!(codec::decode(&codec::encode(&deepest)), Ok(deepest));
        let e = json_to_value(&nest(codec::MAX_DEPTH + 1)).unwrap_err();
        assert_eq!(
            e,
            format!(
                "at {}: lists and maps nest at most 16 deep",
                "[0]".repeat(16)
            )
        );
        let wide: serde_json::Map<String, Json> = (0..=codec::MAX_MAP_FIELDS)
            .map(|i| (format!("k{i}"), json!(i)))
            .collect();
        let e = json_to_value(&Json::Object(wide)).unwrap_err();
        assert_eq!(e, "a map has at most 256 keys, this one 257");
        // A key someone could make a line break of stays quoted.
        let e = json_to_value(&json!({"a\nb": [{"$bytes": 1}]})).unwrap_err();
        assert!(e.starts_with("at [\"a\\nb\"][0]: "), "{e}");
        assert_eq!(e.lines().count(), 1);
    }

    #[test]
    fn what_json_cannot_say_is_as_documented() {
        // A non-finite float was shown as null.
        assert_eq!(round_trip(&Value::Float(f64::INFINITY)), Value::Null);
        // The one map that looks like bytes is bytes.
        let lookalike = Value::map([("$bytes", Value::from("00"))]);
        assert_eq!(round_trip(&lookalike), Value::from(vec![0u8]));
        // With a second key, `$bytes` is an ordinary key.
        let map = Value::map([("$bytes", Value::from("00")), ("x", Value::Null)]);
        assert_eq!(round_trip(&map), map);
        // Keys come back sorted.
        let unsorted = Value::map([("b", Value::Null), ("a", Value::Null)]);
        assert_eq!(
            round_trip(&unsorted),
            Value::map([("a", Value::Null), ("b", Value::Null)])
        );
    }
}
