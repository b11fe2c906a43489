//! Envelopes out: the sending half of the crypto, envelope → sealed,
//! wrapped frame, handed to a [`Transport`] once the transaction that made
//! it has committed (a request's transit secret goes live then too).

use std::{net::SocketAddr, sync::Mutex};

use quiet_plugin_api::{field, Envelope, Value};

use crate::{
    crypto::{event_crypto, transit},
    encoding::codec,
    engine::pipeline::Outbox,
    network::wire::{Wire, DEFAULT_TRANSIT_TTL_MS, MAX_FRAME},
    storage::db,
};

/// Where sealed, wrapped frames go once their transaction has committed.
///
/// [`Tcp`](crate::network::tcp::Tcp) is the real one; the network
/// simulator ([`crate::sim`]) plugs in its own, so that everything up to
/// the frame's bytes is the host's code.
pub trait Transport: Send {
    /// Sends `frame` to `addr`, or drops it (counted): delivery is never
    /// guaranteed, and the sync protocol does not need it to be.
    fn send_frame(&self, addr: SocketAddr, frame: Vec<u8>);
}

/// The sending half: envelope → sealed, wrapped frame → [`Transport`].
///
/// Frames wait in `pending` until the transaction that made them commits;
/// then they go to the transport, and requests' transit secrets go live.
pub struct NetworkOutbox {
    wire: Wire,
    pending: Mutex<Vec<Outgoing>>,
    transport: Box<dyn Transport>,
}

/// A frame ready to go, and the request it makes live when it does.
struct Outgoing {
    addr: SocketAddr,
    frame: Vec<u8>,
    request: Option<([u8; 16], transit::Live, i64)>,
}

impl NetworkOutbox {
    /// An outbox sealing as our identity, registering our requests as live,
    /// and sending through `transport` ([`crate::network::tcp::Tcp`], or a
    /// simulator's).
    pub fn new(wire: Wire, transport: Box<dyn Transport>) -> Self {
        Self {
            wire,
            pending: Mutex::default(),
            transport,
        }
    }
}

impl Outbox for NetworkOutbox {
    fn send(&self, envelope: Envelope) -> Result<(), String> {
        let to = envelope
            .str(field::SEAL_TO)
            .ok_or("an outgoing envelope needs seal_to")?;
        let recipient =
            event_crypto::peer_key(to).map_err(|_| format!("seal_to '{to}' is not a peer id"))?;
        let plaintext = envelope
            .plaintext()
            .filter(|p| p.as_map().is_some())
            .ok_or("an outgoing envelope needs an event_plaintext map")?;
        let ip = envelope
            .str(field::DEST_IP)
            .ok_or("an outgoing envelope needs dest_ip")?;
        let port = envelope
            .int(field::DEST_PORT)
            .and_then(|p| u16::try_from(p).ok())
            .ok_or("an outgoing envelope needs dest_port (0-65535)")?;
        let ip: std::net::IpAddr = ip
            .trim_matches(|c| c == '[' || c == ']')
            .parse()
            .map_err(|_| format!("dest_ip '{ip}' is not an IP address"))?;
        let addr = SocketAddr::new(ip, port);

        let network_id = envelope
            .str(field::NETWORK_ID)
            .ok_or("an outgoing envelope needs a network_id")?;
        let key = self
            .wire
            .keys
            .get(network_id)
            .ok_or_else(|| format!("not a member of network {network_id}"))?;
        let mut request = None;
        let frame = match envelope.str(field::IN_RESPONSE_TO) {
            // Under the requester's transit secret only (see `transit`),
            // with our proof of membership.
            Some(request_id) => {
                let id = transit::parse_request_id(request_id)
                    .ok_or("in_response_to is not a request id")?;
                let secret = transit_secret(envelope.bytes("transit_secret"))
                    .ok_or("a response needs the request's transit_secret")?;
                let body_len = 32 + codec::encoded_len(plaintext);
                transit::wrap_response_with(id, &secret, body_len, |out| {
                    event_crypto::put_with_member_proof(&key, out, |out| {
                        codec::encode_into(out, plaintext)
                    })
                })
            }
            None => {
                let sealed = event_crypto::seal_from(
                    &self.wire.identity,
                    &recipient,
                    &codec::encode(plaintext),
                    Some((network_id, &key)),
                );
                let id = plaintext
                    .get("request_id")
                    .and_then(Value::as_bytes)
                    .and_then(|id| id.try_into().ok());
                let secret =
                    transit_secret(plaintext.get("transit_secret").and_then(Value::as_bytes));
                let ttl = envelope
                    .int("transit_ttl_ms")
                    .unwrap_or(DEFAULT_TRANSIT_TTL_MS);
                request = id.zip(secret).map(|(id, secret)| {
                    let live = transit::Live {
                        secret,
                        peer_id: to.to_owned(),
                        network_id: network_id.to_owned(),
                    };
                    (id, live, ttl)
                });
                transit::wrap_request(&sealed)
            }
        };
        if frame.len() > MAX_FRAME {
            return Err(format!(
                "frame of {} bytes exceeds the {MAX_FRAME}-byte limit",
                frame.len()
            ));
        }
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Outgoing {
                addr,
                frame,
                request,
            });
        Ok(())
    }

    fn flush(&self) {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        for Outgoing {
            addr,
            frame,
            request,
        } in pending
        {
            if let Some((id, live, ttl)) = request {
                self.wire.live.register(id, live, db::now_ms(), ttl);
            }
            self.transport.send_frame(addr, frame);
        }
    }

    fn discard(&self) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

fn transit_secret(bytes: Option<&[u8]>) -> Option<[u8; 32]> {
    bytes.and_then(|b| b.try_into().ok())
}
