//! Frames over TCP, out: a sender thread per destination, fed through a
//! small bounded queue, with a kept connection and a back-off after a
//! failed connect.

use std::{
    collections::HashMap,
    io::{self, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        mpsc::{self, SyncSender, TrySendError},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use crate::{crypto::transit, network::outbound::Transport, storage::counters::Counters};

/// Frames over TCP: each destination has its own sender thread, fed
/// through a small bounded queue, so a slow or dead peer delays only itself.
pub struct Tcp {
    counters: Arc<Counters>,
    peers: Mutex<Destinations>,
}

/// Each destination's queue, and when a frame was last queued for it.
type Destinations = HashMap<SocketAddr, (SyncSender<Vec<u8>>, Instant)>;

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
            if !peers.contains_key(&addr) && peers.len() >= MAX_DESTINATIONS {
                evict_least_recent(&mut peers);
            }
            let (queue, used) = peers.entry(addr).or_insert_with(|| {
                (
                    spawn_peer_sender(addr, self.counters.clone()),
                    Instant::now(),
                )
            });
            *used = Instant::now();
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

/// Destinations with a sender thread at once. Where answers go is the
/// requester's to say, and a member can make identities without end, each
/// naming a new address in every session: before, each made a thread that
/// lived a minute. Past it, the destination that was sent to least lately
/// loses its thread (once its queue is sent), and gets a new one if it is
/// sent to again: honest peers are sent to every few seconds, so an
/// eviction costs one of them a reconnect, never a frame.
const MAX_DESTINATIONS: usize = 128;

/// Drops the queue of the destination sent to least lately: its sender
/// thread sends what is queued, then ends.
fn evict_least_recent(peers: &mut Destinations) {
    let oldest = peers
        .iter()
        .min_by_key(|(_, (_, used))| *used)
        .map(|(a, _)| *a);
    if let Some(addr) = oldest {
        peers.remove(&addr);
    }
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
        // It frames and writes, far less than the default 2 MiB.
        .stack_size(256 << 10)
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
