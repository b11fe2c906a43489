//! [`Value`]: the self-describing data that crosses the plugin boundary.
//!
//! Envelopes, job params, SQL parameters and SQL rows are all made of
//! `Value`s. The type is a plain `#[repr(C)]` enum, so the host and a plugin
//! read the same bytes without serialising them, and bytes stay bytes (no hex
//! or base64 detour).

use abi_stable::{
    std_types::{RString, RVec},
    StableAbi,
};

/// One self-describing value.
///
/// Build values with `From` (`Value::from("text")`, `Value::from(42)`,
/// `Value::from(vec![1u8, 2])`) and read them with the `as_*` accessors,
/// which return `None` when the value holds another kind.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq, Default)]
pub enum Value {
    /// No value; also what SQL `NULL` reads as.
    #[default]
    Null,
    /// A boolean.
    Bool(bool),
    /// A signed 64-bit integer (SQLite's INTEGER).
    Int(i64),
    /// A 64-bit float (SQLite's REAL).
    Float(f64),
    /// UTF-8 text.
    Text(RString),
    /// Raw bytes (SQLite's BLOB).
    Bytes(RVec<u8>),
    /// An ordered list of values.
    List(RVec<Value>),
    /// An ordered map from names to values; keys are unique.
    Map(RVec<Field>),
}

/// One named entry of a [`Value::Map`] or an [`crate::Envelope`].
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct Field {
    /// The field's name.
    pub key: RString,
    /// The field's value.
    pub value: Value,
}

impl Value {
    /// An empty map, borrowed for as long as needed: the settings of a
    /// plugin that `jobs.yaml` gives none.
    pub const EMPTY_MAP: &'static Value = &Value::Map(RVec::new());

    /// The text, if this is [`Value::Text`].
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Text(s) => Some(s.as_str()),
            _ => None,
        }
    }

    /// The bytes, if this is [`Value::Bytes`].
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Bytes(b) => Some(b.as_slice()),
            _ => None,
        }
    }

    /// The integer, if this is [`Value::Int`].
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The number as a float, if this is [`Value::Float`] or [`Value::Int`].
    pub fn as_float(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        }
    }

    /// The boolean, if this is [`Value::Bool`].
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The items, if this is [`Value::List`].
    pub fn as_list(&self) -> Option<&[Value]> {
        match self {
            Value::List(l) => Some(l.as_slice()),
            _ => None,
        }
    }

    /// The fields, if this is [`Value::Map`].
    pub fn as_map(&self) -> Option<&[Field]> {
        match self {
            Value::Map(m) => Some(m.as_slice()),
            _ => None,
        }
    }

    /// Whether this is [`Value::Null`].
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// Looks up `key` if this is a map; `None` for a missing key or a non-map.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.as_map().and_then(|fields| find(fields, key))
    }

    /// The integer at `key` of this map, or `default` when the key is
    /// missing or null; an error naming the key when it holds something
    /// else. Made for job params: `params.int_or("limit", 100)?`.
    pub fn int_or(&self, key: &str, default: i64) -> Result<i64, crate::PluginError> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Int(i)) => Ok(*i),
            Some(other) => Err(crate::PluginError::msg(format!(
                "param '{key}' must be an integer, got {}",
                other.kind()
            ))),
        }
    }

    /// The text at `key` of this map, or `default` when the key is missing
    /// or null; an error naming the key when it holds something else.
    pub fn str_or<'a>(
        &'a self,
        key: &str,
        default: &'a str,
    ) -> Result<&'a str, crate::PluginError> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Text(s)) => Ok(s.as_str()),
            Some(other) => Err(crate::PluginError::msg(format!(
                "param '{key}' must be text, got {}",
                other.kind()
            ))),
        }
    }

    /// A short name of this value's kind, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Int(_) => "integer",
            Value::Float(_) => "float",
            Value::Text(_) => "text",
            Value::Bytes(_) => "bytes",
            Value::List(_) => "list",
            Value::Map(_) => "map",
        }
    }

    /// Builds a map from `(key, value)` pairs; a later duplicate key replaces
    /// the earlier one.
    pub fn map<K: Into<RString>, V: Into<Value>>(pairs: impl IntoIterator<Item = (K, V)>) -> Self {
        let mut fields = RVec::new();
        for (k, v) in pairs {
            set(&mut fields, k.into(), v.into());
        }
        Value::Map(fields)
    }
}

/// Finds `key` in a field list. Linear: envelopes and params hold a handful
/// of fields, where a scan beats hashing.
pub(crate) fn find<'a>(fields: &'a [Field], key: &str) -> Option<&'a Value> {
    fields
        .iter()
        .find(|f| f.key.as_str() == key)
        .map(|f| &f.value)
}

/// Sets `key` in a field list, replacing an existing entry in place.
pub(crate) fn set(fields: &mut RVec<Field>, key: RString, value: Value) {
    match fields.iter_mut().find(|f| f.key == key) {
        Some(f) => f.value = value,
        None => fields.push(Field { key, value }),
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Text(s.into())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Text(s.into())
    }
}
impl From<&String> for Value {
    fn from(s: &String) -> Self {
        Value::Text(s.as_str().into())
    }
}
impl From<RString> for Value {
    fn from(s: RString) -> Self {
        Value::Text(s)
    }
}
impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}
impl From<f64> for Value {
    fn from(f: f64) -> Self {
        Value::Float(f)
    }
}
impl From<Vec<u8>> for Value {
    fn from(b: Vec<u8>) -> Self {
        Value::Bytes(b.into())
    }
}
impl From<&[u8]> for Value {
    fn from(b: &[u8]) -> Self {
        Value::Bytes(b.into())
    }
}
impl<const N: usize> From<[u8; N]> for Value {
    fn from(b: [u8; N]) -> Self {
        Value::Bytes(b.as_slice().into())
    }
}
impl From<RVec<u8>> for Value {
    fn from(b: RVec<u8>) -> Self {
        Value::Bytes(b)
    }
}
impl From<Vec<Value>> for Value {
    fn from(l: Vec<Value>) -> Self {
        Value::List(l.into())
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(o: Option<T>) -> Self {
        o.map_or(Value::Null, Into::into)
    }
}
impl From<&Value> for Value {
    fn from(v: &Value) -> Self {
        v.clone()
    }
}

macro_rules! int_from {
    ($($t:ty),*) => {$(
        impl From<$t> for Value {
            fn from(i: $t) -> Self { Value::Int(i as i64) }
        }
    )*};
}
int_from!(i8, i16, i32, i64, u8, u16, u32, isize);

/// Counts beyond `i64::MAX` saturate; SQLite integers are 64-bit signed.
impl From<u64> for Value {
    fn from(i: u64) -> Self {
        Value::Int(i64::try_from(i).unwrap_or(i64::MAX))
    }
}

/// Counts beyond `i64::MAX` saturate; SQLite integers are 64-bit signed.
impl From<usize> for Value {
    fn from(i: usize) -> Self {
        Value::Int(i64::try_from(i).unwrap_or(i64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accessors_return_none_for_other_kinds() {
        let v = Value::from("x");
        assert_eq!(v.as_str(), Some("x"));
        assert_eq!(v.as_int(), None);
        assert_eq!(Value::from(7u16).as_int(), Some(7));
        assert_eq!(Value::from(vec![1u8, 2]).as_bytes(), Some(&[1u8, 2][..]));
        assert_eq!(Value::from(None::<i64>), Value::Null);
        assert_eq!(Value::from(u64::MAX), Value::Int(i64::MAX));
    }

    #[test]
    fn params_with_defaults_name_the_bad_key() {
        let p = Value::map([
            ("n", Value::from(5)),
            ("s", Value::from("x")),
            ("z", Value::Null),
        ]);
        assert_eq!(p.int_or("n", 1).unwrap(), 5);
        assert_eq!(p.int_or("missing", 1).unwrap(), 1);
        assert_eq!(p.int_or("z", 1).unwrap(), 1);
        assert_eq!(
            p.int_or("s", 1).unwrap_err().message(),
            "param 's' must be an integer, got text"
        );
        assert_eq!(p.str_or("s", "d").unwrap(), "x");
        assert!(p.str_or("n", "d").is_err());
    }

    #[test]
    fn map_keeps_last_duplicate_and_order() {
        let m = Value::map([("a", 1), ("b", 2), ("a", 3)]);
        let keys: Vec<_> = m.as_map().unwrap().iter().map(|f| f.key.as_str()).collect();
        assert_eq!(keys, ["a", "b"]);
        assert_eq!(m.get("a"), Some(&Value::Int(3)));
        assert_eq!(m.get("zz"), None);
        assert_eq!(Value::Int(1).get("a"), None);
    }
}
