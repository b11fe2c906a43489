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
//!
//! Members are not strangers, and a member can make any number of
//! identities; so what frames being read hold is bounded for everyone
//! together, by the `ReadBudget`. A frame's buffer grows by
//! `READ_CHUNK` as its bytes arrive, each piece booked before it is read
//! into, so a frame holds what it has sent, not what it announced; the
//! bytes go back when the frame has been opened, or is dropped. When the
//! budget is full, whoever needs the next piece gets it:
//!
//! 1. by dropping the connection whose frame holds the most of the
//!    **unasked** frames (requests, and responses that name no live
//!    request of ours), the one asking included: the frames that hold the
//!    most are the ones that cost the most. A frame that holds less than
//!    some other unasked frame always gets in, and when unasked frames
//!    fill the budget, over at most `MAX_CONNECTIONS` connections, one of
//!    them holds 256 KiB or more: a sync round's requests are a few KiB
//!    (only a reconciliation message may reach 500 KB);
//! 2. if no unasked frame holds anything, and it is an **answer** (a
//!    response naming a live request of ours, which only the peer we asked
//!    can send), by waiting for room until its deadline while TCP holds
//!    its sender back, the answer with the least left to read served
//!    first; if every frame holding the budget is such a waiting answer,
//!    none would ever finish, so the one with the most left is dropped.
//!    An unasked frame does not wait: it is dropped.
//!
//! So members trickling requests, however many identities they use, can
//! take from an answer we asked for nothing it needs: an 8 MiB catch-up
//! response is read whole while 200 connections trickle 1 MiB requests,
//! each of which it may drop to make room. Drops are counted as
//! `drop_read_budget` and close the connection, as a frame that arrives
//! late does; an honest peer's sync sends again next round.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    io::{self, Read},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        mpsc::{SyncSender, TrySendError},
        Arc, Condvar, Mutex, MutexGuard,
    },
    thread,
    time::{Duration, Instant},
};

use crate::{
    crypto::transit,
    engine::inbox::{QueueBudget, Received, Signal},
    network::{
        inbound::Inbound,
        sender_rates,
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
/// The most bytes that frames being read may hold at once, across all
/// connections; see [`ReadBudget`]. Half the engine's queue budget (128
/// MiB), since every frame read goes on to queue there: reading more than
/// can wait for the engine only moves the drop later. It is eight of the
/// largest frames (8 MiB; a sync response carries at most 6 MiB of
/// events), so a catch-up from several peers at once is read without
/// waiting, and 256 KiB per connection when all `MAX_CONNECTIONS` read at
/// once. With the queue budget, frames from the network hold about 192 MiB
/// at most, however many connections a flood uses.
const MAX_READING_BYTES: usize = 64 << 20;
/// A frame's buffer grows by pieces of this size as its bytes arrive,
/// each booked from the [`ReadBudget`] before it is read into.
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

/// The bytes held by frames being read, shared by all connections; the
/// rule when it is full is in the [module doc](self). Each connection
/// joins it with a handle to close it by, and books each piece of a frame
/// before reading into it; what a frame booked goes back when its reader
/// is done with it.
struct ReadBudget {
    state: Mutex<ReadState>,
    /// Signalled whenever bytes go back, for answers waiting for room.
    room: Condvar,
    counters: Arc<Counters>,
}

#[derive(Default)]
struct ReadState {
    reads: Reads,
    /// A handle to each connection, to close one dropped to make room:
    /// its reader is woken from its read and ends.
    handles: HashMap<u64, TcpStream>,
    next_id: u64,
}

impl ReadBudget {
    fn new(counters: Arc<Counters>) -> Self {
        Self {
            state: Mutex::default(),
            room: Condvar::new(),
            counters,
        }
    }

    fn lock(&self) -> MutexGuard<'_, ReadState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers the connection of `stream`; `None` if it cannot be given
    /// a handle.
    fn join(&self, stream: &TcpStream) -> Option<ReadSlot<'_>> {
        let handle = stream.try_clone().ok()?;
        let mut state = self.lock();
        state.next_id += 1;
        let id = state.next_id;
        state.reads.frames.insert(id, Frame::default());
        state.handles.insert(id, handle);
        Some(ReadSlot { budget: self, id })
    }

    /// Closes the connections `dropped` to make room, and counts them.
    fn close_dropped(&self, state: &ReadState, dropped: &[u64]) {
        for id in dropped {
            if let Some(handle) = state.handles.get(id) {
                let _ = handle.shutdown(Shutdown::Both);
            }
            self.counters.bump("drop_read_budget");
        }
        if !dropped.is_empty() {
            self.room.notify_all();
        }
    }
}

/// One connection's place in the [`ReadBudget`].
struct ReadSlot<'a> {
    budget: &'a ReadBudget,
    id: u64,
}

impl ReadSlot<'_> {
    /// A frame begins with `len` bytes left to read; `answer`: it names a
    /// live request of ours. It books nothing yet; what it books goes back when the
    /// returned guard is dropped.
    fn begin(&self, len: usize, answer: bool) -> FrameBooking<'_> {
        self.budget.lock().reads.begin(self.id, len, answer);
        FrameBooking(self)
    }

    /// Books the next `n` bytes of the frame, by `deadline`; false if the
    /// frame was dropped for the budget (counted), or its connection was.
    fn take(&self, n: usize, deadline: Instant) -> bool {
        let mut state = self.budget.lock();
        loop {
            let (outcome, dropped) = state.reads.take(self.id, n, MAX_READING_BYTES);
            self.budget.close_dropped(&state, &dropped);
            match outcome {
                Take::Granted => {
                    // Room may be left for an answer behind this one.
                    if state.reads.frames.values().any(|f| f.waiting) {
                        self.budget.room.notify_all();
                    }
                    return true;
                }
                Take::Dropped => return false,
                Take::Refused => {
                    self.budget.counters.bump("drop_read_budget");
                    return false;
                }
                Take::Wait => {
                    let Some(left) = deadline
                        .checked_duration_since(Instant::now())
                        .filter(|d| !d.is_zero())
                    else {
                        state.reads.refuse(self.id);
                        self.budget.counters.bump("drop_read_budget");
                        return false;
                    };
                    state = self
                        .budget
                        .room
                        .wait_timeout(state, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
    }

    /// The frame has all its bytes: it is about to be opened, and its
    /// bytes go back soon; it is no longer dropped to make room.
    fn complete(&self) {
        self.budget.lock().reads.complete(self.id);
    }

    /// Whether this connection was dropped to make room (and counted so):
    /// its failed read is no truncated frame.
    fn dropped(&self) -> bool {
        self.budget.lock().reads.frames[&self.id].dropped
    }
}

impl Drop for ReadSlot<'_> {
    fn drop(&mut self) {
        let mut state = self.budget.lock();
        state.reads.release(self.id);
        state.reads.frames.remove(&self.id);
        state.handles.remove(&self.id);
        self.budget.room.notify_all();
    }
}

/// A frame's booking in the [`ReadBudget`], given back when dropped.
struct FrameBooking<'a>(&'a ReadSlot<'a>);

impl Drop for FrameBooking<'_> {
    fn drop(&mut self) {
        let budget = self.0.budget;
        if budget.lock().reads.release(self.0.id) > 0 {
            budget.room.notify_all();
        }
    }
}

/// The rule of the [`ReadBudget`] on its own, without sockets or clocks.
#[derive(Default)]
struct Reads {
    /// Bytes booked, by all frames.
    booked: usize,
    /// Each connection's frame being read, by connection id.
    frames: BTreeMap<u64, Frame>,
}

/// What a connection's frame being read holds of the budget.
#[derive(Default)]
struct Frame {
    /// Bytes booked for it so far.
    booked: usize,
    /// Bytes of it not booked yet.
    left: usize,
    /// Whether it names a live request of ours.
    answer: bool,
    /// Whether it waits for room (rather than for its peer's bytes).
    waiting: bool,
    /// What it waits for: the size of its next piece.
    want: usize,
    /// Whether all its bytes have arrived: it goes back soon.
    complete: bool,
    /// Whether its connection was dropped to make room: for good, as the
    /// connection is closed.
    dropped: bool,
}

impl Frame {
    /// Whether it may be dropped to make room: it holds something, and is
    /// not about to give it back.
    fn droppable(&self) -> bool {
        self.booked > 0 && !self.complete && !self.dropped
    }
}

/// What a frame asking for its next piece gets.
#[derive(Debug, PartialEq, Eq)]
enum Take {
    /// The piece is booked.
    Granted,
    /// No room yet: ask again when bytes go back.
    Wait,
    /// The frame is dropped to make room for others (to be counted).
    Refused,
    /// Its connection was dropped already, for another's frame (counted).
    Dropped,
}

impl Reads {
    fn begin(&mut self, id: u64, len: usize, answer: bool) {
        let frame = self.frames.entry(id).or_default();
        frame.left = len;
        frame.answer = answer;
    }

    fn complete(&mut self, id: u64) {
        if let Some(frame) = self.frames.get_mut(&id) {
            frame.complete = true;
        }
    }

    /// Gives back what `id`'s frame booked; returns how much.
    fn release(&mut self, id: u64) -> usize {
        let Some(frame) = self.frames.get_mut(&id) else {
            return 0;
        };
        let booked = frame.booked;
        self.booked -= booked;
        *frame = Frame {
            dropped: frame.dropped,
            ..Frame::default()
        };
        booked
    }

    /// Drops `id`'s connection to make room: its bytes are free at once
    /// (its reader frees the memory as soon as it wakes).
    fn drop_frame(&mut self, id: u64, dropped: &mut Vec<u64>) {
        self.release(id);
        if let Some(frame) = self.frames.get_mut(&id) {
            frame.dropped = true;
        }
        dropped.push(id);
    }

    /// `id`'s frame asks for its next `n` bytes, with at most `limit`
    /// booked in all; also returns the connections dropped to make room.
    fn take(&mut self, id: u64, n: usize, limit: usize) -> (Take, Vec<u64>) {
        let mut dropped = Vec::new();
        loop {
            let me = &self.frames[&id];
            if me.dropped {
                return (Take::Dropped, dropped);
            }
            let (answer, left) = (me.answer, me.left);
            // Waiting answers are served least left first, so that they
            // finish and give their bytes back.
            let ahead = self
                .frames
                .iter()
                .filter(|(&k, f)| k != id && f.waiting && (f.left, k) < (left, id))
                .min_by_key(|(&k, f)| (f.left, k))
                .map(|(_, f)| f.want);
            let fits = |want: usize| self.booked + want <= limit;
            match ahead.filter(|_| answer) {
                None if fits(n) => {
                    let me = self.frames.get_mut(&id).expect("joined");
                    me.booked += n;
                    me.left = me.left.saturating_sub(n);
                    me.waiting = false;
                    self.booked += n;
                    return (Take::Granted, dropped);
                }
                // It has room, and runs when woken: room only grows as
                // bytes go back, which wakes it.
                Some(want) if fits(want) => return (self.wait(id, n), dropped),
                _ => {}
            }
            // Room is made by the unasked frame that holds the most, this
            // one included, as what it would hold.
            let largest = self
                .frames
                .iter()
                .filter(|(&k, f)| !f.answer && (f.droppable() || k == id))
                .max_by_key(|(&k, f)| match k == id {
                    true => (f.booked + n, false),
                    false => (f.booked, true),
                })
                .map(|(&k, _)| k);
            match largest {
                Some(k) if k == id => return (self.refuse(id), dropped),
                Some(k) => {
                    self.drop_frame(k, &mut dropped);
                    continue;
                }
                None => {}
            }
            // An answer, and only answers hold the budget: wait for one to
            // finish, unless every one of them waits too (the last to begin
            // waiting sees it), when none ever would.
            let finishing = self
                .frames
                .iter()
                .any(|(&k, f)| k != id && f.booked > 0 && !f.dropped && !f.waiting);
            if !finishing {
                let most_left = self
                    .frames
                    .iter()
                    .filter(|(&k, f)| f.droppable() && (f.waiting || k == id))
                    .max_by_key(|(&k, f)| (f.left, k == id))
                    .map(|(&k, _)| k);
                match most_left {
                    Some(k) if k == id => return (self.refuse(id), dropped),
                    Some(k) => {
                        self.drop_frame(k, &mut dropped);
                        continue;
                    }
                    None => {}
                }
            }
            return (self.wait(id, n), dropped);
        }
    }

    fn wait(&mut self, id: u64, n: usize) -> Take {
        let me = self.frames.get_mut(&id).expect("joined");
        me.waiting = true;
        me.want = n;
        Take::Wait
    }

    fn refuse(&mut self, id: u64) -> Take {
        self.frames.get_mut(&id).expect("joined").waiting = false;
        Take::Refused
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
    let reading = Arc::new(ReadBudget::new(counters.clone()));
    let untrusted = Arc::new(OpenBudget::new());
    thread::Builder::new()
        .name("listener".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let Some(id) = connections.admit(&stream, &counters) else {
                    counters.bump("drop_too_many_connections");
                    continue;
                };
                let (inbound, engine, connections, budget, reading, untrusted) = (
                    inbound.clone(),
                    engine.clone(),
                    connections.clone(),
                    budget.clone(),
                    reading.clone(),
                    untrusted.clone(),
                );
                let reader = thread::Builder::new()
                    .name("reader".into())
                    .stack_size(READER_STACK);
                let spawned = reader.spawn({
                    let connections = connections.clone();
                    move || {
                        if let Some(slot) = reading.join(&stream) {
                            let trust = || connections.trust(id);
                            let budgets = Budgets {
                                queue: &budget,
                                reading: &slot,
                                untrusted: &untrusted,
                            };
                            read_frames(stream, &inbound, &engine, budgets, trust);
                        }
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

/// A reader's share of what all connections share.
struct Budgets<'a> {
    /// Bytes that may wait for the engine.
    queue: &'a QueueBudget,
    /// This connection's place in the bytes of frames being read.
    reading: &'a ReadSlot<'a>,
    /// Opens for connections not trusted.
    untrusted: &'a OpenBudget,
}

/// Why a frame's body was not read whole.
enum Cut {
    /// Its peer did not send it in time, or closed (to be counted).
    Truncated,
    /// It was dropped for the read budget (counted).
    Budget,
}

/// Reads the rest of a frame of `len` bytes whose first bytes `head` have
/// arrived, by `deadline`. The buffer grows a piece at a time, each booked
/// from the read budget before it is read into, so that it holds what has
/// arrived, give or take a piece, not what was announced. A frame of more
/// than one piece is copied into one buffer at the end, each piece freed
/// as it is copied: one copy of the frame, where growing one buffer by
/// pieces would copy it over and over.
fn read_body(
    stream: &mut TcpStream,
    head: Vec<u8>,
    len: usize,
    deadline: Instant,
    slot: &ReadSlot<'_>,
) -> Result<Vec<u8>, Cut> {
    let mut full: Vec<Vec<u8>> = Vec::new();
    let mut piece = head;
    let mut got = piece.len();
    while got < len {
        if piece.len() == READ_CHUNK {
            full.push(std::mem::take(&mut piece));
        }
        let n = (READ_CHUNK - piece.len()).min(len - got);
        if !slot.take(n, deadline) {
            return Err(Cut::Budget);
        }
        let at = piece.len();
        piece.reserve_exact(n);
        piece.resize(at + n, 0);
        if read_by(stream, &mut piece[at..], deadline).is_err() {
            return Err(match slot.dropped() {
                true => Cut::Budget,
                false => Cut::Truncated,
            });
        }
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
    budgets: Budgets<'_>,
    trust: impl Fn(),
) {
    let Budgets {
        queue: budget,
        reading,
        untrusted,
    } = budgets;
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
        // What it may cost in the read budget: an answer to a request of
        // ours is read whole, an unasked frame only while nothing larger
        // is (see the module doc).
        let answer = response && inbound.answers_live_request(&bytes);
        let booking = reading.begin(len - bytes.len(), answer);
        let bytes = match read_body(&mut stream, bytes, len, deadline, reading) {
            Ok(bytes) => bytes,
            Err(Cut::Budget) => return,
            Err(Cut::Truncated) => {
                counters.bump("drop_truncated_frame");
                return;
            }
        };
        reading.complete();
        counters.bump("net_frames_received");
        counters.add("net_bytes_received", 4 + len as i64);
        let opened = inbound.open(from, bytes);
        // Handed off: from here its bytes are the engine's queue budget's
        // to bound.
        drop(booking);
        let fresh = opened.as_ref().is_ok_and(|e| inbound.grants_trust(e));
        if fresh && !proven {
            trust();
            proven = true;
        }
        trusted = fresh;
        let envelope = match opened {
            Ok(envelope) => envelope,
            // A member past its rate: its connection is not read until the
            // rate allows another frame, so it cannot make the host open
            // frames faster than that only to drop them.
            Err("drop_sender_over_rate") => {
                thread::sleep(sender_rates::refill_time(len));
                continue;
            }
            Err(_) => continue,
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

#[cfg(test)]
mod tests {
    use super::*;

    const PIECE: usize = READ_CHUNK;

    /// Reads holding connections `ids`, each beginning a frame of `len`.
    fn begin(reads: &mut Reads, ids: std::ops::Range<u64>, len: usize, answer: bool) {
        for id in ids {
            reads.frames.entry(id).or_default();
            reads.begin(id, len, answer);
        }
    }

    #[test]
    fn an_answer_is_read_whole_while_two_hundred_members_trickle_requests() {
        let mut reads = Reads::default();
        let limit = MAX_READING_BYTES;
        // 200 members' connections announce 1 MiB requests and send them a
        // piece each in turn, until the budget is full and beyond.
        begin(&mut reads, 0..200, 1 << 20, false);
        let mut dropped = 0;
        for _ in 0..16 {
            for id in 0..200 {
                if reads.frames[&id].dropped {
                    continue;
                }
                let (take, gone) = reads.take(id, PIECE, limit);
                assert!(take == Take::Granted || take == Take::Refused);
                dropped += gone.len() + usize::from(take == Take::Refused);
                assert!(reads.booked <= limit);
            }
        }
        assert_eq!(reads.booked, limit, "the members fill the budget");
        assert!(dropped > 0);
        // An 8 MiB answer to a live request of ours, while the members
        // still trickle (and those dropped come back as new connections).
        let answer = 1 << 40;
        begin(&mut reads, answer..answer + 1, MAX_FRAME, true);
        let mut next = 200;
        for _ in 0..MAX_FRAME / PIECE {
            let (take, _) = reads.take(answer, PIECE, limit);
            assert_eq!(take, Take::Granted);
            let members: Vec<u64> = reads
                .frames
                .keys()
                .copied()
                .filter(|&k| k != answer)
                .collect();
            for id in members {
                let frame = &reads.frames[&id];
                if frame.dropped {
                    reads.frames.remove(&id);
                    begin(&mut reads, next..next + 1, 1 << 20, false);
                    next += 1;
                    continue;
                }
                if frame.left == 0 {
                    // Whole: opened, and the next one begins.
                    reads.release(id);
                    reads.begin(id, 1 << 20, false);
                }
                let (take, gone) = reads.take(id, PIECE, limit);
                assert!(!gone.contains(&answer) && take != Take::Wait);
                assert!(reads.booked <= limit);
            }
        }
        assert!(next > 300, "members dropped and back: {}", next - 200);
        assert_eq!(reads.frames[&answer].booked, MAX_FRAME);
        assert!(!reads.frames[&answer].dropped);
        assert_eq!(reads.release(answer), MAX_FRAME);
        assert!(reads.booked <= limit - MAX_FRAME);
    }

    #[test]
    fn room_is_made_by_the_unasked_frame_that_holds_the_most() {
        let mut reads = Reads::default();
        let limit = 8 * PIECE;
        begin(&mut reads, 0..3, 1 << 20, false);
        for (id, pieces) in [(0, 2), (1, 4), (2, 2)] {
            for _ in 0..pieces {
                assert_eq!(reads.take(id, PIECE, limit), (Take::Granted, vec![]));
            }
        }
        // A small request of a new connection drops the largest.
        begin(&mut reads, 3..4, 300, false);
        assert_eq!(reads.take(3, 300, limit), (Take::Granted, vec![1]));
        assert!(reads.frames[&1].dropped);
        assert_eq!(reads.take(1, PIECE, limit).0, Take::Dropped);
        assert_eq!(reads.booked, 4 * PIECE + 300);
        assert_eq!(reads.take(0, PIECE, limit).0, Take::Granted);
        begin(&mut reads, 4..5, 1 << 20, false);
        for _ in 0..2 {
            assert_eq!(reads.take(4, PIECE, limit).0, Take::Granted);
        }
        assert_eq!(reads.booked, 7 * PIECE + 300);
        // 4 asking for a third piece would hold as much as 0: 0 goes.
        assert_eq!(reads.take(4, PIECE, limit), (Take::Granted, vec![0]));
        for _ in 0..2 {
            assert_eq!(reads.take(4, PIECE, limit).0, Take::Granted);
        }
        // Now 4 would hold the most: asking for more, it is refused.
        assert_eq!(reads.take(4, PIECE, limit), (Take::Refused, vec![]));
        assert_eq!(reads.frames[&4].booked, 5 * PIECE);
        assert!(reads.booked <= limit);
    }

    #[test]
    fn answers_wait_for_room_least_left_first_and_never_all_wait() {
        let mut reads = Reads::default();
        let limit = 4 * PIECE;
        begin(&mut reads, 0..1, 3 * PIECE, true);
        begin(&mut reads, 1..2, 8 * PIECE, true);
        begin(&mut reads, 2..3, 16 * PIECE, true);
        for id in 0..3 {
            assert_eq!(reads.take(id, PIECE, limit).0, Take::Granted);
        }
        assert_eq!(reads.take(2, PIECE, limit).0, Take::Granted);
        // Full. 2 waits: 0 and 1 are reading, and will give bytes back.
        assert_eq!(reads.take(2, PIECE, limit), (Take::Wait, vec![]));
        // 0 has the least left: it waits too, but is served first.
        assert_eq!(reads.take(0, PIECE, limit), (Take::Wait, vec![]));
        // 1 asking is the last to wait: none would ever finish, so the one
        // with the most left goes, 2; and 1 waits behind 0.
        assert_eq!(reads.take(1, PIECE, limit), (Take::Wait, vec![2]));
        // 0 is served before 1, though both fit now.
        assert_eq!(reads.take(0, PIECE, limit).0, Take::Granted);
        assert_eq!(reads.take(0, PIECE, limit).0, Take::Granted);
        assert_eq!(reads.frames[&0].left, 0);
        assert_eq!(reads.take(1, PIECE, limit).0, Take::Wait);
        reads.complete(0);
        assert_eq!(reads.release(0), 3 * PIECE);
        assert_eq!(reads.take(1, PIECE, limit).0, Take::Granted);
        // An unasked frame never waits, and no answer is dropped for it.
        begin(&mut reads, 3..4, 300, false);
        reads.take(1, PIECE, limit);
        reads.take(1, PIECE, limit);
        assert_eq!(reads.booked, limit);
        assert_eq!(reads.take(3, 300, limit), (Take::Refused, vec![]));
    }
}
