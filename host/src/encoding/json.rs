//! JSON views of plugin values, for people: `status --json`, dead letters,
//! stored job params. Bytes become `{"$bytes": "<hex>"}` so they stay
//! distinguishable from text; non-finite floats become `null`.

use quiet_plugin_api::{Envelope, Value};
use serde_json::Value as Json;

/// `v` as JSON.
pub fn value_to_json(v: &Value) -> Json {
    match v {
        Value::Null => Json::Null,
        Value::Bool(b) => Json::Bool(*b),
        Value::Int(i) => Json::from(*i),
        Value::Float(f) => serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number),
        Value::Text(s) => Json::String(s.to_string()),
        Value::Bytes(b) => serde_json::json!({ "$bytes": hex::encode(b) }),
        Value::List(l) => Json::Array(l.iter().map(value_to_json).collect()),
        Value::Map(m) => Json::Object(
            m.iter()
                .map(|f| (f.key.to_string(), value_to_json(&f.value)))
                .collect(),
        ),
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
    use super::*;

    #[test]
    fn bytes_stay_distinguishable_from_text() {
        let v = Value::map([
            ("b", Value::from(vec![0u8, 0xab])),
            ("t", Value::from("00ab")),
        ]);
        assert_eq!(
            value_to_json(&v),
            serde_json::json!({"b": {"$bytes": "00ab"}, "t": "00ab"})
        );
        assert_eq!(value_to_json(&Value::Float(f64::NAN)), Json::Null);
    }
}
