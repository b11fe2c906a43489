//! Sockets in: the listener, a reader thread per connection, and the bounds
//! on what a connection may cost before it has authenticated.
//!
//! A reader reads length-prefixed frames, opens each with
//! [`Inbound::open`], books an authenticated frame's share of the engine's
//! queue budget and queues it for the engine without blocking.
//!
//! Nothing shared is committed to a connection a stranger may hold beyond a
//! small fixed bound: until one of its frames authenticates (freshly: see
//! [`Inbound::grants_trust`]), a connection holds one of
//! `MAX_UNTRUSTED` slots, may announce a request of at most
//! `UNTRUSTED_REQUEST_FRAME` bytes, must deliver a whole frame within a
//! deadline, and pays for each open by its size from the budget of opens
//! for strangers. A response may be larger only once its first 16 bytes
//! name a live request of ours, which no stranger can guess. The queue
//! budget is booked only for frames that authenticated.

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
/// Of those, how many may be untrusted at once; a new one past it closes
/// the oldest untrusted. Each is a reader thread: strangers get a quarter.
const MAX_UNTRUSTED: usize = 64;
/// A trusted connection idle this long is closed.
const IDLE: Duration = Duration::from_secs(120);
/// An untrusted connection idle this long is closed.
const UNTRUSTED_IDLE: Duration = Duration::from_secs(10);
/// The largest request an untrusted connection may announce. A new peer's
/// first request (round 0: a summary) is a few hundred bytes; the large
/// ones come once its connection is trusted. So strangers hold at most
/// `MAX_UNTRUSTED` times this in frames being read.
const UNTRUSTED_REQUEST_FRAME: usize = 64 << 10;
/// How long a frame may take to arrive once its header has, at least;
/// larger frames get a second more per 64 KiB (8 MiB: 2 min 18 s).
const FRAME_DEADLINE: Duration = Duration::from_secs(10);
/// KiB per second, across all connections, that the host opens for
/// connections it does not trust; see [`OpenBudget`].
const UNTRUSTED_OPEN_KIB_PER_SEC: f64 = 2_000.0;
/// How many KiB of them may come at once.
const UNTRUSTED_OPEN_KIB_BURST: f64 = 256.0;
/// How long a reader waits for room among its sender's frames queued for
/// the engine (see [`QueueBudget`]) before it drops the frame; meanwhile
/// its connection is not read.
const SENDER_BACKLOG_WAIT: Duration = Duration::from_secs(2);
/// A frame's buffer grows by pieces of this size as its bytes arrive.
const READ_CHUNK: usize = 64 << 10;
/// A reader's stack: it opens frames (crypto, and a decoder bounded to 16
/// levels of nesting), far less than the default 2 MiB.
const READER_STACK: usize = 256 << 10;

/// The bound on what garbage can cost: opening a frame (a sealed-box open
/// and a sender proof, ~100 µs) is the one expensive thing a stranger can
/// make the host do. A connection is trusted once a frame of it has
/// authenticated, and until one fails; frames of untrusted connections
/// (new ones, and ones that just sent garbage) take a token from this
/// budget, shared by all connections, before they are read, one per KiB
/// (opening a 1 MiB sealed frame costs about a thousand times a 1 KB one).
/// So a flood costs at most [`UNTRUSTED_OPEN_KIB_PER_SEC`] KiB of opens a
/// second (about 20 % of one core for 1 KB frames) however many
/// connections it uses, TCP back-pressure slows the flooder, and peers
/// whose connections authenticate are never held up.
///
/// Each taker is given the next free slot and sleeps once until it (a
/// virtual schedule, as GCRA): readers waiting on a drained budget cost
/// nothing while they wait.
struct OpenBudget(Mutex<Instant>);

impl OpenBudget {
    fn new() -> Self {
        Self(Mutex::new(Instant::now()))
    }

    /// Waits for the tokens of opening a frame of `len` bytes: one per KiB,
    /// at least one.
    fn take(&self, len: usize) {
        let interval = Duration::from_secs_f64(1.0 / UNTRUSTED_OPEN_KIB_PER_SEC);
        let tokens = (len / 1024).max(1) as u32;
        let slot = {
            let mut next = self.0.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            // A budget left unused allows a burst, no more.
            let earliest = now
                .checked_sub(interval.mul_f64(UNTRUSTED_OPEN_KIB_BURST))
                .unwrap_or(now);
            let slot = (*next).max(earliest);
            *next = slot + interval * tokens;
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
        if state.open >= MAX_CONNECTIONS || state.untrusted.len() >= MAX_UNTRUSTED {
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
                let reader = thread::Builder::new()
                    .name("reader".into())
                    .stack_size(READER_STACK);
                let spawned = reader.spawn({
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

/// Fills `buf` from `stream` before `deadline`, however the peer spreads
/// its bytes: a per-read timeout alone lets a byte every few minutes hold
/// a connection, and the frame it announced, for ever.
fn read_by(stream: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        let left = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or(io::ErrorKind::TimedOut)?;
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf[at..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// How long a frame of `len` bytes may take to arrive after its header.
fn frame_deadline(len: usize) -> Duration {
    FRAME_DEADLINE + Duration::from_secs((len >> 16) as u64)
}

/// Reads the rest of a frame of `len` bytes whose first bytes `head` have
/// arrived, by `deadline`. The buffer grows a piece at a time as bytes
/// arrive, so that it holds what has arrived, give or take a piece, not
/// what was announced. A frame of more than one piece is copied into one
/// buffer at the end, each piece freed as it is copied: one copy of the
/// frame, where growing one buffer by pieces would copy it over and over.
fn read_body(
    stream: &mut TcpStream,
    head: Vec<u8>,
    len: usize,
    deadline: Instant,
) -> io::Result<Vec<u8>> {
    let mut full: Vec<Vec<u8>> = Vec::new();
    let mut piece = head;
    let mut got = piece.len();
    while got < len {
        if piece.len() == READ_CHUNK {
            full.push(std::mem::take(&mut piece));
        }
        let n = (READ_CHUNK - piece.len()).min(len - got);
        let at = piece.len();
        piece.reserve_exact(n);
        piece.resize(at + n, 0);
        read_by(stream, &mut piece[at..], deadline)?;
        got += n;
    }
    if full.is_empty() {
        return Ok(piece);
    }
    let mut bytes = Vec::with_capacity(len);
    for full in full {
        bytes.extend_from_slice(&full);
    }
    bytes.extend_from_slice(&piece);
    Ok(bytes)
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
    // Whether its last frame authenticated: frames after one that did not
    // pay the budget of opens again.
    let mut trusted = false;
    // Whether any frame of it authenticated freshly: for good, since an
    // honest peer's connection may carry a late response now and then, and
    // its next request must not meet a stranger's size limit.
    let mut proven = false;
    loop {
        let idle = if proven { IDLE } else { UNTRUSTED_IDLE };
        let mut head = [0u8; 5];
        if read_by(&mut stream, &mut head, Instant::now() + idle).is_err() {
            return;
        }
        let len = u32::from_be_bytes(head[..4].try_into().expect("4 bytes")) as usize;
        // A host of another version: nothing it sends can be read, so say
        // so once and hang up rather than count each of its frames as junk.
        if inbound.other_version(from, head[4]) {
            return;
        }
        let deadline = Instant::now() + frame_deadline(len);
        let response = head[4] == transit::RESPONSE;
        // Requests are small (ids and a reconciliation message), and
        // smaller still from a stranger; only a response to one of our live
        // requests may be large.
        let limit = match (response, proven) {
            (true, _) => MAX_FRAME,
            (false, true) => MAX_REQUEST_FRAME,
            (false, false) => UNTRUSTED_REQUEST_FRAME,
        };
        if len == 0 || len > limit {
            counters.bump("drop_oversized_frame");
            return;
        }
        let mut bytes = vec![0u8; 1 + transit::REQUEST_ID_LEN.min(len - 1)];
        bytes[0] = head[4];
        if read_by(&mut stream, &mut bytes[1..], deadline).is_err() {
            counters.bump("drop_truncated_frame");
            return;
        }
        // A stranger's large response is refused before its body is read:
        // only a live request of ours makes one worth reading.
        if response
            && !proven
            && len > UNTRUSTED_REQUEST_FRAME
            && !inbound.answers_live_request(&bytes)
        {
            counters.bump("drop_unknown_response");
            return;
        }
        if !trusted {
            untrusted.take(len);
        }
        let Ok(bytes) = read_body(&mut stream, bytes, len, deadline) else {
            counters.bump("drop_truncated_frame");
            return;
        };
        counters.bump("net_frames_received");
        counters.add("net_bytes_received", 4 + len as i64);
        let opened = inbound.open(from, bytes);
        let fresh = opened.as_ref().is_some_and(|e| inbound.grants_trust(e));
        if fresh && !proven {
            trust();
            proven = true;
        }
        trusted = fresh;
        let Some(envelope) = opened else {
            continue;
        };
        // Booked once authenticated: a stranger's announced lengths book
        // nothing.
        let sender = envelope.str("sender_peer_id").unwrap_or_default();
        let reserved = match budget.reserve(sender, len, Instant::now() + SENDER_BACKLOG_WAIT) {
            Ok(reserved) => reserved,
            Err(refused) => {
                counters.bump(refused.counter());
                continue;
            }
        };
        match engine.try_send(Signal::Received(Received::queued(envelope, reserved))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => counters.bump("drop_overloaded"),
            Err(TrySendError::Disconnected(_)) => return,
        }
    }
}
