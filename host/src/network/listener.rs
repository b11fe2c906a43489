//! Sockets in: the listener, a reader thread per connection, and the bounds
//! on what a connection may cost before it has authenticated (a slot among
//! `MAX_CONNECTIONS`, a token of the budget of opens for strangers).
//!
//! A reader reads length-prefixed frames, books each frame's share of the
//! engine's queue budget, opens it with [`Inbound::open`] and queues what
//! authenticates for the engine without blocking.

use std::{
    collections::{HashSet, VecDeque},
    io::{self, Read},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        mpsc::{SyncSender, TrySendError},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use crate::{
    crypto::transit,
    engine::inbox::{QueueBudget, Received, Signal},
    network::{
        inbound::Inbound,
        wire::{MAX_FRAME, MAX_REQUEST_FRAME},
    },
    storage::counters::Counters,
};

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
    let counters = inbound.counters().clone();
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
    let counters = inbound.counters();
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
