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

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        mpsc::Receiver,
        Arc, Condvar, Mutex,
    },
    time::Instant,
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
        self._reserved.0.as_ref().map_or(0, |share| share.bytes)
    }

    /// The envelope, and the budget share to hold while working on it.
    pub fn into_parts(self) -> (Envelope, Reserved) {
        (self.envelope, self._reserved)
    }
}

/// What waits for the engine, shared by everything that queues frames for
/// it: the bytes of all frames, and the frames of each sender.
///
/// A member may send as many valid requests as its rate allows, each of
/// which costs the engine an answer; if the engine answers more slowly,
/// the queue in front of it fills with that member's frames, and an honest
/// peer's request waits behind all of them (tried: behind thousands, for
/// longer than the peer's session lasts). So each sender may have at most
/// [`MAX_QUEUED_PER_SENDER`] frames waiting: an honest peer's frame waits
/// behind at most that many of each other sender's. An honest peer's
/// sessions go a round at a time, so it rarely has more than one or two
/// waiting. A sender's next frame waits for room (see
/// [`reserve`](Self::reserve)), so that its connection is not read
/// meanwhile: TCP then slows the sender, rather than the host opening
/// frames only to drop them.
#[derive(Clone, Debug, Default)]
pub struct QueueBudget(Arc<Waiting>);

#[derive(Debug, Default)]
struct Waiting {
    bytes: AtomicUsize,
    /// Frames waiting per sender; senders with none are removed.
    per_sender: Mutex<HashMap<String, usize>>,
    /// Notified whenever a sender's frame is done with.
    room: Condvar,
}

/// The most frames one sender may have waiting for the engine at once.
pub const MAX_QUEUED_PER_SENDER: usize = 16;

/// Why [`QueueBudget::reserve`] turned a frame away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// All senders' frames together fill the budget of bytes.
    Overloaded,
    /// This sender already has [`MAX_QUEUED_PER_SENDER`] frames waiting.
    SenderBacklog,
}

impl Refused {
    /// The counter a frame turned away for this reason goes under.
    pub fn counter(self) -> &'static str {
        match self {
            Refused::Overloaded => "drop_overloaded",
            Refused::SenderBacklog => "drop_sender_backlog",
        }
    }
}

impl QueueBudget {
    /// Takes `n` bytes of the budget and one of `sender`'s frames, unless
    /// either would pass its bound. A sender with [`MAX_QUEUED_PER_SENDER`]
    /// frames waiting waits until `until` for one of them to be done with.
    pub fn reserve(&self, sender: &str, n: usize, until: Instant) -> Result<Reserved, Refused> {
        {
            let mut per_sender = self.0.per_sender.lock().unwrap_or_else(|e| e.into_inner());
            while per_sender.get(sender).copied().unwrap_or(0) >= MAX_QUEUED_PER_SENDER {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Refused::SenderBacklog);
                }
                per_sender = self
                    .0
                    .room
                    .wait_timeout(per_sender, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            *per_sender.entry(sender.to_owned()).or_default() += 1;
        }
        let share = Share {
            waiting: self.0.clone(),
            bytes: n,
            sender: sender.to_owned(),
        };
        let before = self.0.bytes.fetch_add(n, Ordering::SeqCst);
        if before + n > MAX_QUEUED_BYTES {
            // Dropping the share gives back both.
            drop(share);
            return Err(Refused::Overloaded);
        }
        Ok(Reserved(Some(share)))
    }
}

/// A frame's share of the [`QueueBudget`], given back when dropped.
#[derive(Debug)]
pub struct Reserved(Option<Share>);

#[derive(Debug)]
struct Share {
    waiting: Arc<Waiting>,
    bytes: usize,
    sender: String,
}

impl Drop for Share {
    fn drop(&mut self) {
        self.waiting.bytes.fetch_sub(self.bytes, Ordering::SeqCst);
        let mut per_sender = self
            .waiting
            .per_sender
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per_sender.get_mut(&self.sender) {
            *n -= 1;
            if *n == 0 {
                per_sender.remove(&self.sender);
            }
        }
        self.waiting.room.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn one_sender_cannot_fill_the_queue_and_gets_its_share_back() {
        let budget = QueueBudget::default();
        let now = Instant::now;
        let mallory: Vec<_> = (0..MAX_QUEUED_PER_SENDER)
            .map(|_| budget.reserve("mallory", 100, now()).unwrap())
            .collect();
        assert_eq!(
            budget.reserve("mallory", 100, now()).unwrap_err(),
            Refused::SenderBacklog
        );
        // Another sender is not held up by hers.
        let honest = budget.reserve("honest", 100, now()).unwrap();
        // Her next frame waits for room, and gets it once one of hers is
        // done with.
        let waiter = {
            let budget = budget.clone();
            std::thread::spawn(move || {
                budget
                    .reserve("mallory", 100, Instant::now() + Duration::from_secs(10))
                    .is_ok()
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        drop(mallory);
        assert!(waiter.join().unwrap());
        assert_eq!(
            budget.reserve("honest", 129 << 20, now()).unwrap_err(),
            Refused::Overloaded
        );
        drop(honest);
        // What was refused was given back: nothing is left booked.
        assert!(budget.0.per_sender.lock().unwrap().is_empty());
        assert_eq!(budget.0.bytes.load(Ordering::SeqCst), 0);
    }
}
