//! The engine's inbox: what reaches the engine thread from outside it, as
//! [`Signal`]s on one queue.
//!
//! Frames from the network arrive authenticated, as [`Received`]; each
//! holds its share of the [`QueueBudget`], the bytes that may wait for the
//! engine at once, until the engine is done with it. The network books the
//! share before it queues a frame and drops the frame when the budget is
//! spent, so a flood cannot grow memory; the engine gives the share back
//! when its unit of work ends (the watchdog does, if it abandons the
//! engine).
//!
//! Defined here, in the engine, so that the transports above it (the TCP
//! network, the simulator) plug in without the engine naming any of them.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    mpsc::Receiver,
    Arc, Mutex,
};

use quiet_plugin_api::Envelope;

/// The most bytes of frames that may wait for the engine at once; past it,
/// frames are dropped (and counted) at the socket.
const MAX_QUEUED_BYTES: usize = 128 << 20;

/// Messages to the engine thread.
#[derive(Debug)]
pub enum Signal {
    /// The configuration or the plugins changed: look again now.
    Wake,
    /// An authenticated envelope from the network.
    Received(Received),
    /// Finish the work in hand and stop.
    Shutdown,
}

/// The engine's signal queue. Shared, so that a fresh engine can take over
/// the queue of an abandoned one; only the running engine receives.
pub type Signals = Arc<Mutex<Receiver<Signal>>>;

/// An authenticated envelope from the network, on its way to the engine.
#[derive(Debug)]
pub struct Received {
    /// The envelope the network opened from the frame.
    pub envelope: Envelope,
    /// Its frame's share of the bytes that may wait for the engine, given
    /// back when the engine is done with it.
    _reserved: Reserved,
}

impl Received {
    /// An envelope outside the queue budget (for tests and simulators).
    pub fn new(envelope: Envelope) -> Self {
        Self {
            envelope,
            _reserved: Reserved(None),
        }
    }

    /// An envelope whose frame holds `reserved` of the queue budget.
    pub fn queued(envelope: Envelope, reserved: Reserved) -> Self {
        Self {
            envelope,
            _reserved: reserved,
        }
    }

    /// The size of the frame it came in.
    pub fn frame_len(&self) -> usize {
        self._reserved.0.as_ref().map_or(0, |(_, n)| *n)
    }

    /// The envelope, and the budget share to hold while working on it.
    pub fn into_parts(self) -> (Envelope, Reserved) {
        (self.envelope, self._reserved)
    }
}

/// The bytes of frames waiting for the engine, shared by everything that
/// queues frames for it.
#[derive(Clone, Debug, Default)]
pub struct QueueBudget(Arc<AtomicUsize>);

impl QueueBudget {
    /// Takes `n` bytes of the budget, unless that would pass its bound.
    pub fn reserve(&self, n: usize) -> Option<Reserved> {
        let before = self.0.fetch_add(n, Ordering::SeqCst);
        if before + n > MAX_QUEUED_BYTES {
            self.0.fetch_sub(n, Ordering::SeqCst);
            return None;
        }
        Some(Reserved(Some((self.0.clone(), n))))
    }
}

/// Bytes taken from the [`QueueBudget`], given back when dropped.
#[derive(Debug)]
pub struct Reserved(Option<(Arc<AtomicUsize>, usize)>);

impl Drop for Reserved {
    fn drop(&mut self) {
        if let Some((budget, n)) = self.0.take() {
            budget.fetch_sub(n, Ordering::SeqCst);
        }
    }
}
