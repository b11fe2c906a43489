//! One engine thread as the watchdog sees it ([`EngineWatch`]): its plugin
//! calls, the queue-budget shares of the frames in hand, and the handle to
//! its database that the watchdog uses to release a stuck engine's write
//! lock from another thread (see [`crate::engine::watchdog`]).
//!
//! Apart from the watchdog so that the scheduler, which owns a watch, and
//! the watchdog, which restarts schedulers, do not name each other.

use std::{
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    thread,
    time::{Duration, Instant},
};

use rusqlite::{ffi, Connection, InterruptHandle};

use crate::{
    engine::inbox::Reserved,
    plugins::call_budget::{CallWatch, Overrun},
};

/// How long the watchdog keeps trying to roll back a stuck engine's
/// transaction (an interrupted statement must unwind first).
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// The raw handle of an engine connection, for the watchdog's rescue.
struct RawDb(*mut ffi::sqlite3);

// SAFETY: the handle is only used while the engine thread is inside a plugin
// call (see `EngineWatch::abandon_if_overrun`), on a connection opened in
// serialized mode, where SQLite itself serialises calls from any thread.
unsafe impl Send for RawDb {}
unsafe impl Sync for RawDb {}

/// One engine thread as the watchdog sees it: its plugin calls, and what the
/// watchdog needs to release its database.
pub struct EngineWatch {
    calls: Arc<CallWatch>,
    db: RawDb,
    interrupt: InterruptHandle,
    /// Queue-budget shares of the frames in hand, given back by the
    /// watchdog if it abandons the engine.
    held: Mutex<Vec<Reserved>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl EngineWatch {
    /// A watch over the engine that owns `conn`, which must stay alive for
    /// as long as the engine can make plugin calls; open it with
    /// [`crate::storage::db::open_engine`].
    pub fn new(conn: &Connection) -> Arc<Self> {
        Arc::new(Self {
            calls: Arc::default(),
            // SAFETY: only the pointer is copied here; see `RawDb`.
            db: RawDb(unsafe { conn.handle() }),
            interrupt: conn.get_interrupt_handle(),
            held: Mutex::default(),
        })
    }

    /// The engine's plugin calls, for the engine thread to install as its
    /// own (with `call_budget::install`).
    pub fn calls(&self) -> Arc<CallWatch> {
        self.calls.clone()
    }

    /// Whether the watchdog gave up on this engine; it must not start any
    /// more work.
    pub fn abandoned(&self) -> bool {
        self.calls.abandoned()
    }

    /// Keeps the queue-budget shares of the frames in hand until
    /// [`EngineWatch::release`].
    pub fn hold(&self, reserved: Vec<Reserved>) {
        *lock(&self.held) = reserved;
    }

    /// Gives the held queue-budget shares back.
    pub fn release(&self) {
        lock(&self.held).clear();
    }

    /// If the call in progress has run longer than `budget`: abandons the
    /// engine and releases its database, while the call cannot return (so
    /// the engine cannot go on to drop its connection until the rescue is
    /// over).
    pub fn abandon_if_overrun(&self, budget: Duration) -> Option<Overrun> {
        let overrun = self
            .calls
            .abandon_if_overrun(budget, || self.release_database())?;
        self.release();
        Some(overrun)
    }

    /// Stops the engine connection from ever writing again and rolls its
    /// transaction back, from the watchdog's thread. Called with the state
    /// lock held and a call in progress.
    fn release_database(&self) -> Result<(), String> {
        // SAFETY: the handle is alive: the engine is inside a plugin call
        // (checked under the state lock, which the engine needs to leave
        // the call), so the connection it borrowed is still open.
        if unsafe { ffi::sqlite3_db_mutex(self.db.0) }.is_null() {
            return Err("the engine connection is not in serialized mode".into());
        }
        // A plugin stuck inside a statement holds the connection's mutex:
        // end that statement first.
        self.interrupt.interrupt();
        // SAFETY: as above; SQLite's serialized mode makes calls from this
        // thread safe while the engine thread holds the same connection.
        // `from_handle` does not take ownership: dropping it closes nothing.
        // (The connection's last error message is shared: the stuck thread
        // may read ours in place of its own, which costs only a log line.)
        let conn = unsafe { Connection::from_handle(self.db.0) }.map_err(|e| e.to_string())?;
        let deadline = Instant::now() + RELEASE_TIMEOUT;
        loop {
            // query_only first: between the two, a plugin resuming in
            // autocommit mode could otherwise write.
            let done = conn.execute_batch("PRAGMA query_only = 1").and_then(|()| {
                match conn.is_autocommit() {
                    true => Ok(()),
                    false => conn.execute_batch("ROLLBACK"),
                }
            });
            match done {
                Ok(()) => return Ok(()),
                // An interrupted statement that has not unwound yet makes
                // our statements fail as interrupted too.
                Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}
