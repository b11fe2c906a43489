//! The per-call time budget, as the calls see it: every plugin call on an
//! engine thread is marked while it runs, so that the watchdog
//! ([`crate::engine::watchdog`]) can see one that overran and give up on
//! it.
//!
//! This half knows nothing of engines or databases: it keeps the call in
//! progress and whether its thread was abandoned. Giving up means more
//! (releasing the database, starting a fresh engine); the watchdog passes
//! that in as the `release` step of [`CallWatch::abandon_if_overrun`], which
//! runs under the same lock as the calls' bookkeeping. A call that comes
//! back after its thread was abandoned fails with [`abandoned_error`], so
//! its caller writes nothing more.

use std::{
    cell::RefCell,
    fmt,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use rusqlite::ffi;

/// Which handler of which library build a call goes to: what the watchdog
/// names, and disables, when a call overruns its budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallSite {
    /// The plugin's name.
    pub plugin: Arc<str>,
    /// The handler's name.
    pub handler: String,
    /// The file in the plugin folder the build came from.
    pub file: PathBuf,
    /// BLAKE3 of that build, in hex.
    pub hash: String,
}

/// Which entry point of a handler a call goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallKind {
    /// `filter`.
    Filter,
    /// `process`.
    Process,
    /// `run_job`.
    RunJob,
    /// `reset`.
    Reset,
}

impl fmt::Display for CallKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CallKind::Filter => "filter",
            CallKind::Process => "process",
            CallKind::RunJob => "run_job",
            CallKind::Reset => "reset",
        })
    }
}

struct Call {
    site: Arc<CallSite>,
    kind: CallKind,
    started: Instant,
}

#[derive(Default)]
struct State {
    call: Option<Call>,
    abandoned: bool,
}

/// One engine thread's plugin calls: the call in progress, and whether the
/// watchdog gave up on the thread.
#[derive(Default)]
pub struct CallWatch {
    state: Mutex<State>,
}

/// What the watchdog found and did about one overrun.
#[derive(Debug)]
pub struct Overrun {
    /// The call that overran.
    pub site: Arc<CallSite>,
    /// Its entry point.
    pub kind: CallKind,
    /// How long it had been running.
    pub elapsed: Duration,
    /// Why the database could not be released, if it could not.
    pub release_error: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl CallWatch {
    /// Whether the watchdog gave up on this thread; it must not start any
    /// more work.
    pub fn abandoned(&self) -> bool {
        lock(&self.state).abandoned
    }

    /// If the call in progress has run longer than `budget`: marks the
    /// thread abandoned and runs `release`, both under the state lock, so
    /// that the call cannot return (and its thread go on to drop what
    /// `release` uses) until `release` is over.
    pub fn abandon_if_overrun(
        &self,
        budget: Duration,
        release: impl FnOnce() -> Result<(), String>,
    ) -> Option<Overrun> {
        let mut state = lock(&self.state);
        let call = state
            .call
            .as_ref()
            .filter(|c| !state.abandoned && c.started.elapsed() > budget)?;
        let (site, kind, elapsed) = (call.site.clone(), call.kind, call.started.elapsed());
        state.abandoned = true;
        let release_error = release().err();
        Some(Overrun {
            site,
            kind,
            elapsed,
            release_error,
        })
    }

    fn enter(&self, site: &Arc<CallSite>, kind: CallKind) {
        lock(&self.state).call = Some(Call {
            site: site.clone(),
            kind,
            started: Instant::now(),
        });
    }

    fn leave(&self) {
        lock(&self.state).call = None;
    }
}

thread_local! {
    /// The watch of the engine running on this thread, if it is one.
    static ENGINE: RefCell<Option<Arc<CallWatch>>> = const { RefCell::new(None) };
}

/// Makes `watch` the watch of this thread's plugin calls.
pub(crate) fn install(watch: Arc<CallWatch>) {
    ENGINE.set(Some(watch));
}

/// The error of any database step an abandoned engine still attempts.
pub fn abandoned_error() -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(
        ffi::Error::new(ffi::SQLITE_ABORT),
        Some("this engine thread was abandoned: a plugin call overran its budget".into()),
    )
}

/// Fails if this thread's engine was abandoned: checked before each unit
/// of work, so that an abandoned engine whose call came back starts none.
pub(crate) fn check_not_abandoned() -> rusqlite::Result<()> {
    match ENGINE.with_borrow(|w| w.as_ref().is_some_and(|w| w.abandoned())) {
        true => Err(abandoned_error()),
        false => Ok(()),
    }
}

/// Runs the plugin call `f` to `site`, timed by this thread's watch
/// (untimed on a thread that is not an engine, such as a test host's).
/// Fails with [`abandoned_error`] if the watchdog gave up on the call
/// meanwhile.
pub(crate) fn timed<T>(
    site: &Arc<CallSite>,
    kind: CallKind,
    f: impl FnOnce() -> T,
) -> rusqlite::Result<T> {
    let Some(watch) = ENGINE.with_borrow(Clone::clone) else {
        return Ok(f());
    };
    struct Leave<'a>(&'a CallWatch);
    impl Drop for Leave<'_> {
        // Also on unwinding: the engine must not drop its connection while
        // the watchdog may be using it.
        fn drop(&mut self) {
            self.0.leave();
        }
    }
    watch.enter(site, kind);
    let leave = Leave(&watch);
    let out = f();
    drop(leave);
    // The call is over: from here on `abandoned` cannot change.
    match watch.abandoned() {
        true => Err(abandoned_error()),
        false => Ok(out),
    }
}
