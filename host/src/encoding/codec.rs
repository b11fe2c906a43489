//! A compact, self-describing binary form of [`Value`], for bytes that leave
//! the process: event plaintexts inside encryption, sync messages inside
//! sealed boxes, and queued CLI submissions.
//!
//! Every decoded byte may come from an attacker (after decryption, but a
//! peer can encrypt anything it likes), so the decoder bounds everything:
//! nesting depth, every length against the bytes actually left, and it
//! rejects trailing bytes and non-UTF-8 text. It never panics.
//!
//! Format: one tag byte per value, then
//! `Int`/`Float`: 8 bytes little-endian; `Text`/`Bytes`: LEB128 length and
//! the bytes; `List`: LEB128 count and the items; `Map`: LEB128 count and
//! (LEB128 key length, key, value) per field.

use quiet_plugin_api::{
    abi_stable::std_types::{RString, RVec},
    Field, Value,
};

/// How deeply lists and maps may nest.
pub const MAX_DEPTH: usize = 16;
/// How many fields one map may have (keys are checked for duplicates).
pub const MAX_MAP_FIELDS: usize = 256;
/// How many values one decode may produce in all. A `Value` takes 40 bytes
/// for as little as one byte of input, so without a budget a frame of nulls
/// would cost 40 times its size in memory.
pub const MAX_VALUES: usize = 1 << 16;
/// The most items reserved up front for one list or map; more grow as read.
const PREALLOCATE: usize = 1024;

const NULL: u8 = 0;
const FALSE: u8 = 1;
const TRUE: u8 = 2;
const INT: u8 = 3;
const FLOAT: u8 = 4;
const TEXT: u8 = 5;
const BYTES: u8 = 6;
const LIST: u8 = 7;
const MAP: u8 = 8;

/// Why bytes did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed value: {0}")]
pub struct DecodeError(&'static str);

/// Encodes `v`.
pub fn encode(v: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_len(v));
    put(&mut out, v);
    out
}

/// Appends the encoding of `v` to `out`. Reserve [`encoded_len`] first: a
/// sync response is a megabyte, and growing it by doubling copied it about
/// eight times over. (The network sizes a whole frame with it, so this does
/// not measure again.)
pub fn encode_into(out: &mut Vec<u8>, v: &Value) {
    put(out, v);
}

/// How many bytes [`encode`] makes of `v`.
pub fn encoded_len(v: &Value) -> usize {
    match v {
        Value::Null | Value::Bool(_) => 1,
        Value::Int(_) | Value::Float(_) => 9,
        Value::Text(s) => 1 + bytes_len(s.len()),
        Value::Bytes(b) => 1 + bytes_len(b.len()),
        Value::List(items) => {
            1 + len_len(items.len()) + items.iter().map(encoded_len).sum::<usize>()
        }
        Value::Map(fields) => {
            let content: usize = fields
                .iter()
                .map(|f| bytes_len(f.key.len()) + encoded_len(&f.value))
                .sum();
            1 + len_len(fields.len()) + content
        }
    }
}

fn bytes_len(n: usize) -> usize {
    len_len(n) + n
}

/// The bytes of `n` as LEB128.
fn len_len(n: usize) -> usize {
    (usize::BITS - (n | 1).leading_zeros()).div_ceil(7) as usize
}

fn put(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => out.push(NULL),
        Value::Bool(false) => out.push(FALSE),
        Value::Bool(true) => out.push(TRUE),
        Value::Int(i) => {
            out.push(INT);
            out.extend_from_slice(&i.to_le_bytes());
        }
        Value::Float(f) => {
            out.push(FLOAT);
            out.extend_from_slice(&f.to_le_bytes());
        }
        Value::Text(s) => {
            out.push(TEXT);
            put_bytes(out, s.as_bytes());
        }
        Value::Bytes(b) => {
            out.push(BYTES);
            put_bytes(out, b);
        }
        Value::List(items) => {
            out.push(LIST);
            put_len(out, items.len());
            items.iter().for_each(|i| put(out, i));
        }
        Value::Map(fields) => {
            out.push(MAP);
            put_len(out, fields.len());
            for f in fields.iter() {
                put_bytes(out, f.key.as_bytes());
                put(out, &f.value);
            }
        }
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_len(out, b.len());
    out.extend_from_slice(b);
}

fn put_len(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Decodes exactly one value from all of `bytes`.
pub fn decode(bytes: &[u8]) -> Result<Value, DecodeError> {
    let mut r = Reader {
        bytes,
        at: 0,
        values: 0,
    };
    let v = r.value(0)?;
    if r.at != bytes.len() {
        return Err(DecodeError("trailing bytes"));
    }
    Ok(v)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    values: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.bytes.len());
        let end = end.ok_or(DecodeError("truncated"))?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn len(&mut self) -> Result<usize, DecodeError> {
        let mut n: usize = 0;
        for shift in (0..64).step_by(7) {
            let byte = self.take(1)?[0];
            n |= ((byte & 0x7f) as usize)
                .checked_shl(shift)
                .ok_or(DecodeError("length overflow"))?;
            if byte & 0x80 == 0 {
                // Every item takes at least one byte, so no honest length
                // exceeds what is left.
                if n > self.bytes.len() - self.at {
                    return Err(DecodeError("length beyond the input"));
                }
                return Ok(n);
            }
        }
        Err(DecodeError("length overflow"))
    }

    fn eight(&mut self) -> Result<[u8; 8], DecodeError> {
        Ok(self.take(8)?.try_into().expect("took 8"))
    }

    fn text(&mut self) -> Result<RString, DecodeError> {
        let n = self.len()?;
        let b = self.take(n)?;
        std::str::from_utf8(b)
            .map(RString::from)
            .map_err(|_| DecodeError("text is not UTF-8"))
    }

    fn value(&mut self, depth: usize) -> Result<Value, DecodeError> {
        self.values += 1;
        if self.values > MAX_VALUES {
            return Err(DecodeError("too many values"));
        }
        Ok(match self.take(1)?[0] {
            NULL => Value::Null,
            FALSE => Value::Bool(false),
            TRUE => Value::Bool(true),
            INT => Value::Int(i64::from_le_bytes(self.eight()?)),
            FLOAT => Value::Float(f64::from_le_bytes(self.eight()?)),
            TEXT => Value::Text(self.text()?),
            BYTES => {
                let n = self.len()?;
                Value::Bytes(self.take(n)?.into())
            }
            LIST | MAP if depth >= MAX_DEPTH => return Err(DecodeError("nested too deeply")),
            LIST => {
                let n = self.len()?;
                let mut items = RVec::with_capacity(n.min(PREALLOCATE));
                for _ in 0..n {
                    items.push(self.value(depth + 1)?);
                }
                Value::List(items)
            }
            MAP => {
                let n = self.len()?;
                if n > MAX_MAP_FIELDS {
                    return Err(DecodeError("map has too many fields"));
                }
                let mut fields: RVec<Field> = RVec::with_capacity(n.min(PREALLOCATE));
                for _ in 0..n {
                    let key = self.text()?;
                    if fields.iter().any(|f| f.key == key) {
                        return Err(DecodeError("duplicate map key"));
                    }
                    let value = self.value(depth + 1)?;
                    fields.push(Field { key, value });
                }
                Value::Map(fields)
            }
            _ => return Err(DecodeError("unknown tag")),
        })
    }
}

/// Encodes an envelope as a map of its fields.
pub fn encode_envelope(envelope: &quiet_plugin_api::Envelope) -> Vec<u8> {
    encode(&Value::map(envelope.fields().map(|(k, v)| (k, v.clone()))))
}

/// Decodes what [`encode_envelope`] made.
pub fn decode_envelope(bytes: &[u8]) -> Result<quiet_plugin_api::Envelope, DecodeError> {
    match decode(bytes)? {
        Value::Map(fields) => Ok(fields
            .into_iter()
            .fold(quiet_plugin_api::Envelope::new(), |env, f| {
                env.with(f.key.as_str(), f.value)
            })),
        _ => Err(DecodeError("an envelope is a map")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_kind() {
        let v = Value::map([
            ("n", Value::Null),
            ("b", Value::from(true)),
            ("i", Value::from(-5)),
            ("f", Value::from(1.5)),
            ("t", Value::from("héllo")),
            ("y", Value::from(vec![0u8; 300])),
            (
                "l",
                Value::from(vec![Value::from(1), Value::map([("x", 2)])]),
            ),
        ]);
        assert_eq!(decode(&encode(&v)).unwrap(), v);
    }

    #[test]
    fn the_reserved_size_is_the_encoded_size() {
        // Lengths on each side of LEB128's byte boundaries.
        for n in [0, 1, 127, 128, 16_383, 16_384, 2_097_152] {
            let list = Value::List((0..n.min(300)).map(Value::from).collect());
            for v in [
                Value::from(vec![7u8; n]),
                Value::from("é".repeat(n / 2)),
                list.clone(),
                Value::map([("k".repeat(n.min(200)), list)]),
            ] {
                let bytes = encode(&v);
                assert_eq!(encoded_len(&v), bytes.len(), "{n}");
                // One allocation of the exact size, never regrown.
                assert_eq!(bytes.capacity(), bytes.len(), "{n}");
            }
        }
        let mut out = b"head".to_vec();
        encode_into(&mut out, &Value::from(5));
        assert_eq!(out[4..], encode(&Value::from(5))[..]);
    }

    #[test]
    fn hostile_input_is_refused_without_panicking() {
        let good = encode(&Value::map([("k", Value::from("v"))]));
        for cut in 0..good.len() {
            assert!(decode(&good[..cut]).is_err(), "prefix {cut} decoded");
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(decode(&trailing), Err(DecodeError("trailing bytes")));
        // A list claiming 2^62 items in a few bytes.
        assert!(decode(&[LIST, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x3f]).is_err());
        // 10,000 nested lists.
        let deep: Vec<u8> = std::iter::repeat_n([LIST, 1], 10_000).flatten().collect();
        assert_eq!(decode(&deep), Err(DecodeError("nested too deeply")));
        assert_eq!(
            decode(&[TEXT, 1, 0xff]),
            Err(DecodeError("text is not UTF-8"))
        );
        assert_eq!(decode(&[99]), Err(DecodeError("unknown tag")));
        let dup = [MAP, 2, 1, b'a', NULL, 1, b'a', NULL];
        assert_eq!(decode(&dup), Err(DecodeError("duplicate map key")));
        // A megabyte of nulls: refused by the value budget, not decoded
        // into 40 MB of values.
        let mut nulls = vec![LIST];
        put_len(&mut nulls, 1 << 20);
        nulls.resize(nulls.len() + (1 << 20), NULL);
        assert_eq!(decode(&nulls), Err(DecodeError("too many values")));
    }
}
