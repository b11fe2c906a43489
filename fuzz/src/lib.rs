//! What the fuzz targets share: a receiving host with real keys, and the
//! codec check. Each target's input is bytes; structured targets decode
//! them with the host's own codec, so the fuzzer mutates values.

use std::{
    net::SocketAddr,
    sync::{Arc, OnceLock},
};

use quiet_host::{
    crypto::{event_crypto::NetworkKey, identity::HostIdentity, transit::LiveRequests},
    encoding::codec,
    network::{inbound::Inbound, wire::Wire},
    storage::{counters::Counters, networks::NetworkKeys},
};
use quiet_plugin_api::{Envelope, Value};

/// The network the receiver is in.
pub const NET: &str = "0123456789abcdef0123456789abcdef";

/// A host's receiving side with an identity and the key of `NET`, made
/// once per process (keys are files, as in a real data folder).
pub struct Receiver {
    pub identity: Arc<HostIdentity>,
    pub peer: HostIdentity,
    pub live: Arc<LiveRequests>,
    pub key: NetworkKey,
    pub inbound: Inbound,
}

pub fn receiver() -> &'static Receiver {
    static R: OnceLock<Receiver> = OnceLock::new();
    R.get_or_init(|| {
        // Kept for the life of the process: the keys are read lazily.
        let dir = tempfile::tempdir().unwrap().keep();
        let identity = Arc::new(HostIdentity::load_or_create(&dir).unwrap());
        let peer_dir = dir.join("peer");
        std::fs::create_dir(&peer_dir).unwrap();
        let peer = HostIdentity::load_or_create(&peer_dir).unwrap();
        let key = NetworkKey([1; 32]);
        NetworkKeys::new(&dir).store(NET, &key).unwrap();
        let live = Arc::<LiveRequests>::default();
        let inbound = Inbound::new(Wire {
            identity: identity.clone(),
            live: live.clone(),
            keys: Arc::new(NetworkKeys::new(&dir)),
            counters: Arc::new(Counters::default()),
        });
        Receiver {
            identity,
            peer,
            live,
            key,
            inbound,
        }
    })
}

impl Receiver {
    pub fn open(&self, bytes: Vec<u8>) -> Option<Envelope> {
        let from: SocketAddr = "127.0.0.1:9".parse().unwrap();
        self.inbound.open(from, bytes).ok()
    }
}

/// Whatever decodes re-encodes to bytes (never longer) that decode to the
/// same value; envelopes decode exactly when the value is a map.
pub fn check_codec(input: &[u8]) -> Option<Value> {
    let decoded = codec::decode(input);
    assert_eq!(
        codec::decode_envelope(input).is_ok(),
        matches!(decoded, Ok(Value::Map(_)))
    );
    let v = decoded.ok()?;
    let again = codec::encode(&v);
    assert!(again.len() <= input.len());
    let back = codec::decode(&again).expect("an encoding decodes");
    assert_eq!(codec::encode(&back), again);
    if !has_nan(&v) {
        assert_eq!(back, v);
    }
    Some(v)
}

/// Whether `v` holds a NaN anywhere, which compares unequal to itself. (Not
/// `v != v`: RVec's equality takes the same pointer as equal.)
pub fn has_nan(v: &Value) -> bool {
    match v {
        Value::Float(f) => f.is_nan(),
        Value::List(items) => items.iter().any(has_nan),
        Value::Map(fields) => fields.iter().any(|f| has_nan(&f.value)),
        _ => false,
    }
}

/// `base` with the fields of `overrides` (if a map) set over it.
pub fn overlay(base: Value, overrides: &Value) -> Value {
    let Value::Map(fields) = base else {
        return base;
    };
    let extra = overrides.as_map().unwrap_or_default();
    Value::map(
        fields
            .into_iter()
            .map(|f| (f.key, f.value))
            .chain(extra.iter().map(|f| (f.key.clone(), f.value.clone()))),
    )
}
