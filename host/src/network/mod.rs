//! The network: frames over TCP, and the two paths between a socket and the
//! pipeline.
//!
//! **In** (socket → envelope): a reader thread per connection reads
//! length-prefixed frames (at most [`MAX_FRAME`] bytes; a larger length
//! closes the connection) and opens each with [`Inbound::open`]: transit
//! crypto unwraps a response with the transit secret of a live request of
//! ours, event crypto opens the sealed box with our key and verifies the
//! sender and its membership proof, and the decoded map becomes an envelope
//! that names the verified sender (`sender_peer_id`) and network
//! (`network_id`), so that payloads need not repeat them. Anything that
//! fails is dropped and counted; nothing from the network reaches a plugin
//! before it has been authenticated this far. The reader then queues the envelope for
//! the engine thread without blocking; when the queue is full it is dropped
//! and counted, so a flood cannot grow memory. Opening on the reader keeps
//! the crypto off the engine thread, which owns the database: during a
//! catch-up the two run on separate cores.
//!
//! **Out** (envelope → socket): [`NetworkOutbox`] seals `event_plaintext` to
//! `seal_to`, wraps it (a request registers its transit secret; a response
//! is encrypted under the requester's), and hands the frame for
//! `dest_ip:dest_port` to a [`Transport`]: [`Tcp`], where a sender thread
//! writes it, or the network simulator's.
//!
//! Why TCP, not UDP as the seed assumes: catch-up moves megabytes, and TCP
//! brings flow and congestion control for free. The protocol does not rely
//! on TCP's guarantees: every frame stands alone and is idempotent, so lost,
//! duplicated or reordered frames (a dropped connection, a retry) only cost
//! a later sync round.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        mpsc::{self, SyncSender, TrySendError},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use quiet_plugin_api::{field, Envelope, Value};

use crate::{
    crypto::{
        event_crypto,
        identity::HostIdentity,
        transit::{self, LiveRequests},
    },
    encoding::codec,
    engine::{
        inbox::{QueueBudget, Received, Signal},
        pipeline::Outbox,
    },
    storage::{counters::Counters, db, networks::NetworkKeys},
};

/// The largest frame accepted or sent.
pub const MAX_FRAME: usize = 8 << 20;
/// The largest request frame accepted.
pub const MAX_REQUEST_FRAME: usize = 1 << 20;
/// Concurrent inbound connections. When all are taken, a new one closes
/// the oldest that has not authenticated; see [`Connections`].
const MAX_CONNECTIONS: usize = 256;
/// An inbound connection idle this long is closed.
const IDLE: Duration = Duration::from_secs(120);
/// Frames per second, across all connections, that the host opens for
/// connections it does not trust; see [`OpenBudget`].
const UNTRUSTED_OPENS_PER_SEC: f64 = 2_000.0;
/// How many of them may come at once.
const UNTRUSTED_OPENS_BURST: f64 = 256.0;
/// Default life of a transit secret.
pub const DEFAULT_TRANSIT_TTL_MS: i64 = 30_000;

/// The bound on what garbage can cost: opening a frame (a sealed-box open
/// and a sender proof, ~100 µs) is the one expensive thing a stranger can
/// make the host do. A connection is trusted once a frame of it has
/// authenticated, and until one fails; frames of untrusted connections
/// (new ones, and ones that just sent garbage) take a token from this
/// budget, shared by all connections, before they are read. So a flood
/// costs at most [`UNTRUSTED_OPENS_PER_SEC`] opens a second (about 20 % of
/// one core) however many connections it uses, TCP back-pressure slows the
/// flooder, and peers whose connections authenticate are never held up.
///
/// Each taker is given the next free slot and sleeps once until it (a
/// virtual schedule, as GCRA): readers waiting on a drained budget cost
/// nothing while they wait.
struct OpenBudget(Mutex<Instant>);

impl OpenBudget {
    fn new() -> Self {
        Self(Mutex::new(Instant::now()))
    }

    /// Waits for a token.
    fn take(&self) {
        let interval = Duration::from_secs_f64(1.0 / UNTRUSTED_OPENS_PER_SEC);
        let slot = {
            let mut next = self.0.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            // A budget left unused allows a burst, no more.
            let earliest = now
                .checked_sub(interval.mul_f64(UNTRUSTED_OPENS_BURST))
                .unwrap_or(now);
            let slot = (*next).max(earliest);
            *next = slot + interval;
            slot
        };
        if let Some(wait) = slot.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
    }
}

/// The open inbound connections. A stranger can open connections and send
/// nothing (or junk) to hold all [`MAX_CONNECTIONS`] slots; so a connection
/// counts as untrusted until one of its frames authenticates, and when the
/// slots are full a new connection closes the oldest untrusted one instead
/// of being refused. Peers whose connections have authenticated keep them;
/// a new honest peer always gets in, and authenticates on its first frame.
#[derive(Default)]
struct Connections(Mutex<ConnectionsState>);

#[derive(Default)]
struct ConnectionsState {
    open: usize,
    next_id: u64,
    /// Untrusted connections, oldest first, with a handle to close them.
    untrusted: VecDeque<(u64, TcpStream)>,
    /// Connections closed to make room whose readers have not ended yet;
    /// their slots are already free.
    evicted: HashSet<u64>,
}

impl Connections {
    /// Takes a slot for `stream`, closing the oldest untrusted connection
    /// if none is free; `None` if every slot holds a trusted connection.
    fn admit(&self, stream: &TcpStream, counters: &Counters) -> Option<u64> {
        let handle = stream.try_clone().ok()?;
        let mut state = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if state.open >= MAX_CONNECTIONS {
            let (oldest_id, oldest) = state.untrusted.pop_front()?;
            // Its reader fails its next read and ends.
            let _ = oldest.shutdown(Shutdown::Both);
            state.evicted.insert(oldest_id);
            state.open -= 1;
            counters.bump("drop_evicted_connection");
        }
        state.open += 1;
        state.next_id += 1;
        let id = state.next_id;
        state.untrusted.push_back((id, handle));
        Some(id)
    }

    /// Connection `id` has authenticated a frame: it can no longer be
    /// evicted.
    fn trust(&self, id: u64) {
        let mut state = self.0.lock().unwrap_or_else(|e| e.into_inner());
        state.untrusted.retain(|(i, _)| *i != id);
    }

    /// Connection `id` has ended.
    fn close(&self, id: u64) {
        let mut state = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !state.evicted.remove(&id) {
            state.untrusted.retain(|(i, _)| *i != id);
            state.open -= 1;
        }
    }
}

/// Listens on `address`, opens frames with `inbound` and queues what
/// authenticates for the engine. Returns the bound address (useful with
/// port 0).
pub fn listen(
    address: &str,
    inbound: Inbound,
    engine: SyncSender<Signal>,
) -> io::Result<SocketAddr> {
    let inbound = Arc::new(inbound);
    let counters = inbound.wire.counters.clone();
    let listener = TcpListener::bind(address)?;
    let local = listener.local_addr()?;
    let connections = Arc::new(Connections::default());
    let budget = QueueBudget::default();
    let untrusted = Arc::new(OpenBudget::new());
    thread::Builder::new()
        .name("listener".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let Some(id) = connections.admit(&stream, &counters) else {
                    counters.bump("drop_too_many_connections");
                    continue;
                };
                let (inbound, engine, connections, budget, untrusted) = (
                    inbound.clone(),
                    engine.clone(),
                    connections.clone(),
                    budget.clone(),
                    untrusted.clone(),
                );
                let spawned = thread::Builder::new().name("reader".into()).spawn({
                    let connections = connections.clone();
                    move || {
                        let trust = || connections.trust(id);
                        read_frames(stream, &inbound, &engine, &budget, &untrusted, trust);
                        connections.close(id);
                    }
                });
                if spawned.is_err() {
                    connections.close(id);
                }
            }
        })?;
    Ok(local)
}

fn read_frames(
    mut stream: TcpStream,
    inbound: &Inbound,
    engine: &SyncSender<Signal>,
    budget: &QueueBudget,
    untrusted: &OpenBudget,
    trust: impl Fn(),
) {
    let counters = &inbound.wire.counters;
    let Ok(from) = stream.peer_addr() else { return };
    let _ = stream.set_read_timeout(Some(IDLE));
    let mut trusted = false;
    loop {
        let mut head = [0u8; 5];
        if stream.read_exact(&mut head).is_err() {
            return;
        }
        let len = u32::from_be_bytes(head[..4].try_into().expect("4 bytes")) as usize;
        // A host of another version: nothing it sends can be read, so say
        // so once and hang up rather than count each of its frames as junk.
        if inbound.other_version(from, head[4]) {
            return;
        }
        // Requests are small (ids and a reconciliation message); only a
        // response to one of our live requests may be large.
        let limit = if head[4] == transit::RESPONSE {
            MAX_FRAME
        } else {
            MAX_REQUEST_FRAME
        };
        if len == 0 || len > limit {
            counters.bump("drop_oversized_frame");
            return;
        }
        if !trusted {
            untrusted.take();
        }
        let Some(reserved) = budget.reserve(len) else {
            counters.bump("drop_overloaded");
            return;
        };
        let mut bytes = vec![0u8; len];
        bytes[0] = head[4];
        if stream.read_exact(&mut bytes[1..]).is_err() {
            counters.bump("drop_truncated_frame");
            return;
        }
        counters.bump("net_frames_received");
        counters.add("net_bytes_received", 4 + len as i64);
        let opened = inbound.open(from, bytes);
        if opened.is_some() && !trusted {
            trust();
        }
        trusted = opened.is_some();
        let Some(envelope) = opened else {
            continue;
        };
        match engine.try_send(Signal::Received(Received::queued(envelope, reserved))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => counters.bump("drop_overloaded"),
            Err(TrySendError::Disconnected(_)) => return,
        }
    }
}

/// What both directions share: our identity, the transit secrets of our
/// live requests, the network keys, and the drop counters.
#[derive(Clone)]
pub struct Wire {
    /// This host's key pair.
    pub identity: Arc<HostIdentity>,
    /// Requests of ours that may be answered.
    pub live: Arc<LiveRequests>,
    /// Keys of the networks we are in.
    pub keys: Arc<NetworkKeys>,
    /// Where drops are counted.
    pub counters: Arc<Counters>,
}

/// The receiving half of the crypto: frame → authenticated envelope.
pub struct Inbound {
    wire: Wire,
    /// Addresses already warned about for speaking another wire version.
    warned: Mutex<HashSet<std::net::IpAddr>>,
}

/// Addresses [`Inbound`] remembers having warned about: past that it stops
/// warning, so that a flood of forged tags cannot grow memory.
const MAX_WARNED: usize = 1024;

impl Inbound {
    /// Opens frames sealed to us, accepting responses to our live requests
    /// and messages about networks we are in.
    pub fn new(wire: Wire) -> Self {
        Self {
            wire,
            warned: Mutex::default(),
        }
    }

    /// Whether a frame with `tag` comes from a host of another wire
    /// version; if so, it is counted, and warned about once per address.
    pub fn other_version(&self, from: SocketAddr, tag: u8) -> bool {
        let Some(theirs) = transit::wire_version(tag).filter(|&v| v != transit::WIRE_VERSION)
        else {
            return false;
        };
        self.wire.counters.bump("drop_wire_version");
        let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
        if warned.len() < MAX_WARNED && warned.insert(from.ip()) {
            let age = match theirs < transit::WIRE_VERSION {
                true => "an older",
                false => "a newer",
            };
            tracing::warn!(
                %from,
                "{age} quiet-host sends frames of wire protocol version {theirs}, and this one \
                 speaks version {}: they cannot sync until both run the same version \
                 (its frames are dropped, counted as drop_wire_version)",
                transit::WIRE_VERSION
            );
        }
        true
    }

    /// The envelope in a frame that came `from` a socket address, or `None`
    /// (counted) if it does not authenticate or decode.
    pub fn open(&self, from: SocketAddr, frame: Vec<u8>) -> Option<Envelope> {
        if self.other_version(from, frame.first().copied().unwrap_or(0)) {
            return None;
        }
        match self.try_open(frame) {
            Ok(envelope) => Some(envelope),
            Err(counter) => {
                tracing::debug!(%from, "dropped frame: {counter}");
                self.wire.counters.bump(counter);
                None
            }
        }
    }

    fn try_open(&self, frame: Vec<u8>) -> Result<Envelope, &'static str> {
        // What `payload` borrows from: a request's opened box, or a
        // response's frame, decrypted in place.
        let (unsealed, accepted);
        // Who sent it, about which network, its membership proof and the
        // payload; and the request it answers, for a response.
        let (sender, network_id, proof, payload, in_response_to) = match frame.first() {
            Some(&transit::REQUEST) => {
                let opened = event_crypto::open_from(&self.wire.identity, &frame[1..]).map_err(
                    |e| match e {
                        event_crypto::CryptoError::BadSeal => "drop_bad_seal",
                        event_crypto::CryptoError::BadProof => "drop_bad_sender_proof",
                        _ => "drop_malformed_payload",
                    },
                )?;
                let (network_id, proof) = opened.network.ok_or("drop_not_a_member")?;
                unsealed = opened.payload;
                (opened.sender, network_id, proof, &unsealed[..], None)
            }
            Some(&transit::RESPONSE) => {
                // Only the peer we sealed the request to holds its transit
                // secret: the request names the sender and the network.
                accepted = self
                    .wire
                    .live
                    .accept(frame, db::now_ms())
                    .map_err(|e| e.counter())?;
                let (proof, payload) = event_crypto::split_member_proof(accepted.body())
                    .ok_or("drop_malformed_payload")?;
                (
                    accepted.peer_id.clone(),
                    accepted.network_id.clone(),
                    *proof,
                    payload,
                    Some(hex::encode(accepted.request_id)),
                )
            }
            _ => return Err("drop_malformed_frame"),
        };
        // Every message is about a network: only members of it are heard,
        // and only when we are one. Checked before the payload is decoded.
        let key = self.wire.keys.get(&network_id).ok_or("drop_not_a_member")?;
        if proof != event_crypto::member_proof(&key, payload) {
            return Err("drop_not_a_member");
        }
        let plaintext = codec::decode(payload).map_err(|_| "drop_malformed_payload")?;
        let event_type = plaintext
            .get("type")
            .and_then(Value::as_str)
            .ok_or("drop_malformed_payload")?
            .to_owned();
        let mut envelope = Envelope::of_type(&event_type)
            .with("sender_peer_id", sender)
            .with(field::NETWORK_ID, network_id)
            .with(field::EVENT_PLAINTEXT, plaintext);
        if let Some(id) = in_response_to {
            envelope.set(field::IN_RESPONSE_TO, id);
        }
        Ok(envelope)
    }
}

/// Where sealed, wrapped frames go once their transaction has committed.
///
/// [`Tcp`] is the real one; the network simulator ([`crate::sim`]) plugs in
/// its own, so that everything up to the frame's bytes is the host's code.
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

/// Frames over TCP: each destination has its own sender thread, fed
/// through a small bounded queue, so a slow or dead peer delays only itself.
pub struct Tcp {
    counters: Arc<Counters>,
    peers: Mutex<HashMap<SocketAddr, SyncSender<Vec<u8>>>>,
}

impl Tcp {
    /// A transport counting its drops in `counters`.
    pub fn new(counters: Arc<Counters>) -> Self {
        Self {
            counters,
            peers: Mutex::default(),
        }
    }
}

impl Transport for Tcp {
    fn send_frame(&self, addr: SocketAddr, frame: Vec<u8>) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let mut frame = Some(frame);
        // At most twice: a sender thread that went idle has exited.
        for _ in 0..2 {
            let queue = peers
                .entry(addr)
                .or_insert_with(|| spawn_peer_sender(addr, self.counters.clone()));
            match queue.try_send(frame.take().expect("one frame")) {
                Ok(()) => return,
                Err(TrySendError::Full(_)) => {
                    self.counters.bump("drop_send_queue_full");
                    return;
                }
                Err(TrySendError::Disconnected(f)) => {
                    frame = Some(f);
                    peers.remove(&addr);
                }
            }
        }
    }
}

/// A frame ready to go, and the request it makes live when it does.
struct Outgoing {
    addr: SocketAddr,
    frame: Vec<u8>,
    request: Option<([u8; 16], transit::Live, i64)>,
}

impl NetworkOutbox {
    /// An outbox sealing as our identity, registering our requests as live,
    /// and sending over TCP.
    pub fn new(wire: Wire) -> Self {
        let tcp = Tcp::new(wire.counters.clone());
        Self::with_transport(wire, Box::new(tcp))
    }

    /// Like [`NetworkOutbox::new`], sending through `transport`.
    pub fn with_transport(wire: Wire, transport: Box<dyn Transport>) -> Self {
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

/// Frames one destination may have waiting.
const PEER_QUEUE: usize = 64;
/// A destination's sender thread exits after this long without frames
/// (before the peer's reader closes the idle connection).
const PEER_IDLE: Duration = Duration::from_secs(60);
/// After a failed connect, frames to that destination are dropped this long.
const BACKOFF: Duration = Duration::from_secs(5);

fn spawn_peer_sender(addr: SocketAddr, counters: Arc<Counters>) -> SyncSender<Vec<u8>> {
    let (tx, rx) = mpsc::sync_channel(PEER_QUEUE);
    let spawned = thread::Builder::new()
        .name(format!("send {addr}"))
        .spawn(move || send_frames(addr, rx, &counters));
    if spawned.is_err() {
        tracing::error!(%addr, "cannot start a sender thread");
    }
    tx
}

fn send_frames(addr: SocketAddr, queue: mpsc::Receiver<Vec<u8>>, counters: &Counters) {
    let mut stream: Option<TcpStream> = None;
    let mut backoff_until: Option<Instant> = None;
    while let Ok(frame) = queue.recv_timeout(PEER_IDLE) {
        // While backing off from a peer that did not accept a connection,
        // requests to it are dropped; a response is not: it answers a
        // request that peer has just sent, so it is back (restarted, say).
        let responding = frame.first() == Some(&transit::RESPONSE);
        if !responding && backoff_until.is_some_and(|t| Instant::now() < t) {
            counters.bump("send_failed");
            continue;
        }
        let mut sent = false;
        // A kept connection may have died since; one fresh retry.
        for _ in 0..2 {
            if stream.is_none() {
                match connect(addr) {
                    Ok(s) => {
                        stream = Some(s);
                        backoff_until = None;
                    }
                    Err(_) => {
                        backoff_until = Some(Instant::now() + BACKOFF);
                        break;
                    }
                }
            }
            let s = stream.as_mut().expect("connected above");
            let len = (frame.len() as u32).to_be_bytes();
            if s.write_all(&len).and_then(|()| s.write_all(&frame)).is_ok() {
                sent = true;
                counters.bump("net_frames_sent");
                counters.add("net_bytes_sent", 4 + frame.len() as i64);
                break;
            }
            stream = None;
        }
        if !sent {
            tracing::debug!(%addr, "could not send a frame");
            counters.bump("send_failed");
        }
    }
}

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}
