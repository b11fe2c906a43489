//! The plaintexts of `sync_request` and `sync_response`. Every field a
//! peer sends is read and checked here, once, so that the rest of the
//! plugin only sees well-formed messages (a member gone bad may send
//! anything: see `tests/hostile.rs`); and a message is written without its
//! empty fields, so that an idle round's frames carry only what they say.

use negentropy::Id;
use quiet_plugin_api::{field, Envelope, Value};

use crate::{
    event_set::SUMMARY_LEN,
    peers::{is_ip, is_peer_id, is_port},
};

/// A verified incoming `sync_request`: what the host vouches for (the
/// sender, by its seal, and the network, by its membership proof) and the
/// plaintext, borrowed.
///
/// The plaintext names neither the sender, nor us, nor the network: the
/// host's envelope already says who sent it and for which network, and the
/// sender's proof is made for the recipient's key, so a request sealed to
/// another peer cannot be re-sealed to us. Repeating them (and, in
/// responses, the request id, network and sender) cost 440 of the 1,461
/// bytes of an idle round trip.
pub(crate) struct Request<'a> {
    pub(crate) peer_id: &'a str,
    pub(crate) network_id: &'a str,
    pub(crate) request_id: [u8; 16],
    pub(crate) reply_ip: &'a str,
    pub(crate) reply_port: i64,
    pub(crate) timestamp_ms: i64,
    pub(crate) session_id: [u8; 16],
    pub(crate) round: i64,
    pub(crate) transit_secret: &'a [u8],
    pub(crate) summary: Option<[u8; SUMMARY_LEN]>,
    pub(crate) negentropy: &'a [u8],
    pub(crate) need: Vec<Id>,
    /// The requester holds ids we lack.
    pub(crate) behind: bool,
    /// The requester wants its id lists answered with only the ids it
    /// lacks (see `Negentropy::answer_id_lists_with_missing_ids`).
    pub(crate) missing_ids: bool,
}

impl<'a> Request<'a> {
    /// `None` if any field is missing or malformed.
    pub(crate) fn parse(env: &'a Envelope) -> Option<Self> {
        let p = env.plaintext()?;
        let text = |k| p.get(k).and_then(Value::as_str);
        let int = |k| p.get(k).and_then(Value::as_int);
        Some(Self {
            peer_id: env.str("sender_peer_id").filter(|id| is_peer_id(id))?,
            network_id: env.str(field::NETWORK_ID)?,
            request_id: id16(p.get("request_id"))?,
            reply_ip: text("reply_ip").filter(|ip| is_ip(ip))?,
            reply_port: int("reply_port").filter(|p| is_port(*p))?,
            timestamp_ms: int("timestamp_ms")?,
            session_id: id16(p.get("session_id"))?,
            round: int("round").filter(|r| *r >= 0)?,
            transit_secret: p
                .get("transit_secret")
                .and_then(Value::as_bytes)
                .filter(|s| s.len() == 32)?,
            summary: summary(p.get("summary"))?,
            negentropy: optional_bytes(p.get("negentropy"))?,
            need: ids(p.get("need"))?,
            behind: flag(p.get("behind"))?,
            missing_ids: flag(p.get("missing_ids"))?,
        })
    }
}

/// A verified incoming `sync_response`: its sender and network as the host
/// vouches for them, and the plaintext, borrowed.
pub(crate) struct Response<'a> {
    pub(crate) peer_id: &'a str,
    pub(crate) network_id: &'a str,
    pub(crate) session_id: [u8; 16],
    pub(crate) summary: Option<[u8; SUMMARY_LEN]>,
    pub(crate) negentropy: &'a [u8],
    pub(crate) events: Vec<&'a [u8]>,
    pub(crate) deferred: Vec<Id>,
    pub(crate) peers: &'a [Value],
}

impl<'a> Response<'a> {
    /// `None` if any field is missing or malformed.
    pub(crate) fn parse(env: &'a Envelope) -> Option<Self> {
        let p = env.plaintext()?;
        let list = |k| p.get(k).map_or(Some(&[][..]), Value::as_list);
        Some(Self {
            peer_id: env.str("sender_peer_id")?,
            network_id: env.str(field::NETWORK_ID)?,
            session_id: id16(p.get("session_id"))?,
            summary: summary(p.get("summary"))?,
            negentropy: optional_bytes(p.get("negentropy"))?,
            events: list("events")?
                .iter()
                .map(Value::as_bytes)
                .collect::<Option<_>>()?,
            deferred: ids(p.get("deferred"))?,
            peers: list("peers")?,
        })
    }
}

/// A sync message's plaintext: the fields, less those that are null or
/// empty lists (a reader takes a missing field as empty), so that an idle
/// round's frames carry only what they say.
pub(crate) fn message<const N: usize>(fields: [(&str, Value); N]) -> Value {
    Value::map(
        fields
            .into_iter()
            .filter(|(_, v)| !v.is_null() && v.as_list().is_none_or(|items| !items.is_empty())),
    )
}

/// A 16-byte id (request and session ids).
fn id16(v: Option<&Value>) -> Option<[u8; 16]> {
    v?.as_bytes()?.try_into().ok()
}

/// Bytes, with a missing or null value read as empty.
fn optional_bytes(v: Option<&Value>) -> Option<&[u8]> {
    match v {
        None | Some(Value::Null) => Some(&[]),
        Some(v) => v.as_bytes(),
    }
}

/// A list of 32-byte ids, with a missing or null value read as empty.
fn ids(v: Option<&Value>) -> Option<Vec<Id>> {
    match v {
        None | Some(Value::Null) => Some(Vec::new()),
        Some(v) => v
            .as_list()?
            .iter()
            .map(|id| Id::from_slice(id.as_bytes()?).ok())
            .collect(),
    }
}

/// A flag: absent (false), or a bool.
fn flag(v: Option<&Value>) -> Option<bool> {
    match v {
        None | Some(Value::Null) => Some(false),
        Some(v) => v.as_bool(),
    }
}

/// A summary field: absent, or exactly [`SUMMARY_LEN`] bytes.
fn summary(v: Option<&Value>) -> Option<Option<[u8; SUMMARY_LEN]>> {
    match optional_bytes(v)? {
        [] => Some(None),
        s => s.try_into().ok().map(Some),
    }
}

pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::getrandom(&mut bytes).expect("the OS random number generator failed");
    bytes
}
