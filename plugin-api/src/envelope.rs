//! [`Envelope`]: the unit of work that flows through the host's pipeline.
//!
//! An envelope is an ordered set of named [`Value`]s, as in the seed design's
//! Python dicts. The host and plugins agree only on the names in [`field`];
//! any other name is free for plugins to use. Because fields are looked up by
//! name at run time, adding a field never changes the ABI, so plugins built
//! before keep working.

use abi_stable::{
    std_types::{RString, RVec},
    StableAbi,
};

use crate::value::{find, set, Field, Value};

/// The field names the seed design gives meaning to.
pub mod field {
    /// The event's type, such as `"sync_request"`; handlers subscribe by it.
    pub const EVENT_TYPE: &str = "event_type";
    /// The event's id (bytes).
    pub const EVENT_ID: &str = "event_id";
    /// The decrypted event, usually a map.
    pub const EVENT_PLAINTEXT: &str = "event_plaintext";
    /// The encrypted event (bytes).
    pub const EVENT_CIPHERTEXT: &str = "event_ciphertext";
    /// A peer id: the host seals the envelope to that peer's public key.
    pub const SEAL_TO: &str = "seal_to";
    /// `true` on envelopes that leave this host.
    pub const IS_OUTGOING: &str = "is_outgoing";
    /// The request id a response answers.
    pub const IN_RESPONSE_TO: &str = "in_response_to";
    /// Destination address of an outgoing envelope.
    pub const DEST_IP: &str = "dest_ip";
    /// Destination port of an outgoing envelope.
    pub const DEST_PORT: &str = "dest_port";
    /// Event ids this event depends on (a list of 32-byte ids), on a stored
    /// event that has any.
    pub const DEPS: &str = "deps";
    /// On a stored event, the peer id (hex) of the author whose signature
    /// the host verified. Only the host's event store sets it: the host
    /// removes it from every envelope a plugin returns, so no plugin can
    /// hand another a forged author.
    pub const AUTHOR: &str = "author";
    /// On a stored event, when its author created it (milliseconds since
    /// the Unix epoch), as signed.
    pub const CREATED_MS: &str = "created_ms";
    /// The network the event belongs to. On an envelope from the network,
    /// the host sets it to the network whose key proved the sender's
    /// membership; an outgoing envelope must carry it, and the host proves
    /// our membership of that network to the receiver.
    pub const NETWORK_ID: &str = "network_id";
    /// A peer id.
    pub const PEER_ID: &str = "peer_id";
    /// On an envelope from the network, the peer whose seal (or whose
    /// request's transit secret) the host verified. Only the host sets it:
    /// it is removed from every envelope a plugin returns.
    pub const SENDER_PEER_ID: &str = "sender_peer_id";
}

/// A stored event's id: its creation time (8 bytes, big-endian, so ids
/// sort by time), then the first 24 bytes of a hash of what its author
/// signed. Returned by [`Context::create_event`](crate::Context::create_event),
/// read with [`Envelope::event_id`], named in another event's deps.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct EventId(pub [u8; 32]);

impl EventId {
    /// The id in `bytes`, if they are 32.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(EventId)
    }

    /// The id's creation time, milliseconds since the Unix epoch.
    pub fn created_ms(&self) -> i64 {
        i64::from_be_bytes(self.0[..8].try_into().expect("8 bytes"))
    }
}

impl From<EventId> for Value {
    fn from(id: EventId) -> Self {
        Value::from(id.0)
    }
}

/// A self-describing bag of named values; see the [module docs](self).
///
/// ```
/// use quiet_plugin_api::{envelope, Envelope};
///
/// let env = envelope! {
///     "event_type" => "sync_request",
///     "seal_to" => "peer_abc",
///     "is_outgoing" => true,
/// };
/// assert_eq!(env.event_type(), Some("sync_request"));
/// assert!(env.is_outgoing());
/// assert_eq!(env.str("seal_to"), Some("peer_abc"));
/// ```
#[repr(C)]
#[derive(StableAbi, Clone, Debug, Default, PartialEq)]
pub struct Envelope {
    fields: RVec<Field>,
}

impl Envelope {
    /// An empty envelope.
    pub fn new() -> Self {
        Self::default()
    }

    /// An envelope whose `event_type` is `event_type`.
    pub fn of_type(event_type: &str) -> Self {
        Self::new().with(field::EVENT_TYPE, event_type)
    }

    /// Sets `key` and returns the envelope, for building in one expression.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.set(key, value);
        self
    }

    /// Sets `key`, replacing any value it had.
    pub fn set(&mut self, key: &str, value: impl Into<Value>) {
        set(&mut self.fields, RString::from(key), value.into());
    }

    /// Removes `key` and returns its value.
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        let at = self.fields.iter().position(|f| f.key.as_str() == key)?;
        Some(self.fields.remove(at).value)
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&Value> {
        find(&self.fields, key)
    }

    /// The text of `key`, if it is set and is text.
    pub fn str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    /// The bytes of `key`, if it is set and is bytes.
    pub fn bytes(&self, key: &str) -> Option<&[u8]> {
        self.get(key).and_then(Value::as_bytes)
    }

    /// The integer of `key`, if it is set and is an integer.
    pub fn int(&self, key: &str) -> Option<i64> {
        self.get(key).and_then(Value::as_int)
    }

    /// Whether `key` is set to `true`; a missing or non-bool field is `false`.
    pub fn flag(&self, key: &str) -> bool {
        self.get(key).and_then(Value::as_bool).unwrap_or(false)
    }

    /// The `event_type` field.
    pub fn event_type(&self) -> Option<&str> {
        self.str(field::EVENT_TYPE)
    }

    /// Whether the envelope is marked `is_outgoing`.
    pub fn is_outgoing(&self) -> bool {
        self.flag(field::IS_OUTGOING)
    }

    /// The `event_plaintext` field, usually a map.
    pub fn plaintext(&self) -> Option<&Value> {
        self.get(field::EVENT_PLAINTEXT)
    }

    /// The `author` field: on a stored event, the verified signer's peer id.
    pub fn author(&self) -> Option<&str> {
        self.str(field::AUTHOR)
    }

    /// The `created_ms` field: on a stored event, its signed creation time.
    pub fn created_ms(&self) -> Option<i64> {
        self.int(field::CREATED_MS)
    }

    /// The `event_id` field, if it is an event id (32 bytes).
    pub fn event_id(&self) -> Option<EventId> {
        self.bytes(field::EVENT_ID).and_then(EventId::from_bytes)
    }

    /// The ids in the `deps` field: on a stored event, the events it
    /// depends on, strictly ascending; empty if it has none.
    pub fn deps(&self) -> Vec<EventId> {
        self.get(field::DEPS)
            .and_then(Value::as_list)
            .map(|deps| {
                deps.iter()
                    .filter_map(|d| d.as_bytes().and_then(EventId::from_bytes))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// All fields, in the order they were first set.
    pub fn fields(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.fields.iter().map(|f| (f.key.as_str(), &f.value))
    }

    /// The number of fields.
    pub fn len(&self) -> usize {
        self.fields.len()
    }

    /// Whether the envelope has no fields.
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }
}

/// Builds an [`Envelope`] from `"name" => value` pairs; values go through
/// `Value::from`.
#[macro_export]
macro_rules! envelope {
    ($($key:expr => $value:expr),* $(,)?) => {{
        #[allow(unused_mut)]
        let mut env = $crate::Envelope::new();
        $( env.set($key, $value); )*
        env
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_replaces_and_remove_takes() {
        let mut env = Envelope::of_type("a").with("n", 1);
        env.set("n", 2);
        assert_eq!(env.len(), 2);
        assert_eq!(env.int("n"), Some(2));
        assert_eq!(env.remove("n"), Some(Value::Int(2)));
        assert_eq!(env.int("n"), None);
        assert!(!env.is_outgoing());
    }
}
