//! The per-call time budget: a plugin call that never returns costs its
//! plugin, not the host.
//!
//! Plugin calls run on the engine thread, inside the write transaction of
//! the unit of work in hand, so a call that never returns would hold the
//! database's write lock and every later job and frame for ever. Rust cannot
//! stop a thread, so instead the **watchdog** (a thread of its own) gives up
//! on it:
//!
//! 1. every call (`filter`, `process`, `run_job`) is marked on its engine's
//!    [`EngineWatch`] while it runs;
//! 2. the watchdog looks a few times per budget; when one call has run
//!    longer than the budget, it marks the engine **abandoned** and, under
//!    the same lock, releases the database: it interrupts the statement in
//!    progress (a plugin may be stuck inside SQLite), makes the engine's
//!    connection `query_only`, then rolls its transaction back. The
//!    connection is opened in SQLite's serialized mode
//!    ([`crate::db::open_engine`]), so these statements from another thread
//!    are safe; the stuck thread is in plugin code, not inside SQLite;
//! 3. it disables the plugin build (file and hash, see
//!    [`crate::registry::Plugins::disable`]): a new build of the file loads
//!    again; a restart of the host gives the same build another chance;
//! 4. it starts a fresh engine thread on a new connection, with the same
//!    plugins (minus that one), configuration and channel.
//!
//! The stuck thread is leaked: it keeps its stack, the envelopes of its
//! unit, and its CPU if it spins, until the process exits. If its call ever
//! returns, it can do no harm: its connection refuses writes, its
//! transaction is gone (so its `COMMIT` fails and nothing it queued for the
//! network is sent), the call returns [`CallError::Sql`] so its unit stops
//! at once, and the engine loop checks [`EngineWatch::abandoned`] before any
//! new unit and exits. The work of the aborted unit is lost as a rolled-back
//! transaction loses it: a job runs again next period, frames from peers are
//! asked for again by sync, CLI submissions stay queued in the database.

use std::{
    cell::RefCell,
    fmt,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard, PoisonError,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use rusqlite::{ffi, Connection, InterruptHandle};

use crate::{
    handler::{CallError, CallSite},
    network::Reserved,
    registry::Plugins,
    scheduler::Scheduler,
};

/// How long one plugin call may run before its plugin is disabled, unless
/// `--call-budget-ms` says otherwise. Generous on purpose: it is there to
/// catch calls that never return, and disabling a healthy but slow plugin
/// (a big reconciliation on a loaded machine) costs far more than waiting.
pub const DEFAULT_CALL_BUDGET: Duration = Duration::from_secs(10);

/// How long the watchdog keeps trying to roll back a stuck engine's
/// transaction (an interrupted statement must unwind first).
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// Which entry point of a handler a call goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallKind {
    /// `filter`.
    Filter,
    /// `process`.
    Process,
    /// `run_job`.
    RunJob,
}

impl fmt::Display for CallKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CallKind::Filter => "filter",
            CallKind::Process => "process",
            CallKind::RunJob => "run_job",
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

/// The raw handle of an engine connection, for the watchdog's rescue.
struct RawDb(*mut ffi::sqlite3);

// SAFETY: the handle is only used while the engine thread is inside a plugin
// call (see `EngineWatch::abandon_if_overrun`), on a connection opened in
// serialized mode, where SQLite itself serialises calls from any thread.
unsafe impl Send for RawDb {}
unsafe impl Sync for RawDb {}

/// One engine thread as the watchdog sees it: the call in progress, whether
/// it was abandoned, and what the watchdog needs to release its database.
pub struct EngineWatch {
    state: Mutex<State>,
    db: RawDb,
    interrupt: InterruptHandle,
    /// Queue-budget shares of the frames in hand, given back by the
    /// watchdog if it abandons the engine.
    held: Mutex<Vec<Reserved>>,
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

impl EngineWatch {
    /// A watch over the engine that owns `conn`, which must stay alive for
    /// as long as the engine can make plugin calls; open it with
    /// [`crate::db::open_engine`].
    pub fn new(conn: &Connection) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::default(),
            // SAFETY: only the pointer is copied here; see `RawDb`.
            db: RawDb(unsafe { conn.handle() }),
            interrupt: conn.get_interrupt_handle(),
            held: Mutex::default(),
        })
    }

    /// Whether the watchdog gave up on this engine; it must not start any
    /// more work.
    pub fn abandoned(&self) -> bool {
        lock(&self.state).abandoned
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

    /// The call in progress, if it has run longer than `budget`.
    fn overrun(state: &State, budget: Duration) -> Option<&Call> {
        state
            .call
            .as_ref()
            .filter(|c| !state.abandoned && c.started.elapsed() > budget)
    }

    /// If the call in progress has run longer than `budget`: abandons the
    /// engine and releases its database, all under the state lock, so that
    /// the engine cannot leave the call (and go on to drop its connection)
    /// until the rescue is over.
    pub fn abandon_if_overrun(&self, budget: Duration) -> Option<Overrun> {
        let mut state = lock(&self.state);
        let call = Self::overrun(&state, budget)?;
        let (site, kind, elapsed) = (call.site.clone(), call.kind, call.started.elapsed());
        state.abandoned = true;
        let release_error = self.release_database().err();
        drop(state);
        self.release();
        Some(Overrun {
            site,
            kind,
            elapsed,
            release_error,
        })
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
    static ENGINE: RefCell<Option<Arc<EngineWatch>>> = const { RefCell::new(None) };
}

/// Makes `watch` the watch of this thread's plugin calls.
pub(crate) fn install(watch: Arc<EngineWatch>) {
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

/// Runs the plugin call `f` to `site`, timed by this thread's engine watch
/// (untimed on a thread that is not an engine, such as a test host's).
/// Fails if the watchdog gave up on the call meanwhile.
pub(crate) fn timed<T>(
    site: &Arc<CallSite>,
    kind: CallKind,
    f: impl FnOnce() -> T,
) -> Result<T, CallError> {
    let Some(watch) = ENGINE.with_borrow(Clone::clone) else {
        return Ok(f());
    };
    struct Leave<'a>(&'a EngineWatch);
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
        true => Err(CallError::Sql(abandoned_error())),
        false => Ok(out),
    }
}

/// The engine thread, and how to start a fresh one.
pub struct Engine {
    make: Box<dyn Fn() -> rusqlite::Result<Scheduler> + Send + Sync>,
    current: Mutex<Current>,
}

struct Current {
    watch: Arc<EngineWatch>,
    thread: JoinHandle<()>,
    number: u32,
}

fn spawn(scheduler: Scheduler, number: u32) -> Current {
    let watch = scheduler.watch();
    let name = match number {
        1 => "engine".to_string(),
        n => format!("engine-{n}"),
    };
    let thread = thread::Builder::new()
        .name(name)
        .spawn(move || scheduler.run())
        .expect("spawning a thread");
    Current {
        watch,
        thread,
        number,
    }
}

impl Engine {
    /// Starts the first engine thread; `make` builds each engine, now and
    /// after an abandoned one.
    pub fn start(
        make: Box<dyn Fn() -> rusqlite::Result<Scheduler> + Send + Sync>,
    ) -> rusqlite::Result<Arc<Self>> {
        let first = spawn(make()?, 1);
        Ok(Arc::new(Self {
            make,
            current: Mutex::new(first),
        }))
    }

    /// The watchdog's look: abandons an engine stuck in a plugin call past
    /// `budget`, disables that plugin build in `plugins`, and starts a
    /// fresh engine in place of an abandoned one.
    pub fn inspect(&self, budget: Duration, plugins: &Plugins) {
        let mut current = lock(&self.current);
        if let Some(o) = current.watch.abandon_if_overrun(budget) {
            let reason = format!(
                "exceeded the {} ms call budget in handler '{}' ({})",
                budget.as_millis(),
                o.site.handler,
                o.kind
            );
            tracing::error!(
                plugin = %o.site.plugin,
                file = %o.site.file.display(),
                "plugin disabled: {reason}: the call had run {} ms; its unit of work was rolled back; \
                 the stuck thread is abandoned (it keeps its memory, and its CPU if it spins, until the host exits)",
                o.elapsed.as_millis()
            );
            if let Some(e) = &o.release_error {
                tracing::error!(
                    "cannot release the database from the stuck engine thread: {e}; \
                     writes will fail until the host is restarted"
                );
            }
            plugins.disable(&o.site, reason);
        }
        if !current.watch.abandoned() {
            return;
        }
        match (self.make)() {
            Ok(scheduler) => {
                let next = spawn(scheduler, current.number + 1);
                tracing::info!(
                    engine = next.number,
                    "a fresh engine thread took over from the abandoned one"
                );
                // Dropping the old handle detaches the stuck thread.
                *current = next;
            }
            Err(e) => tracing::error!(
                "cannot start a fresh engine thread: {e}; retrying at the watchdog's next look"
            ),
        }
    }

    /// Waits until the engine has stopped for good (after it was sent
    /// `Signal::Shutdown`). A stuck engine is replaced by the watchdog
    /// meanwhile, and its replacement takes the shutdown signal from the
    /// queue; so this returns within the call budget, while `watchdog` runs.
    pub fn wait_stopped(&self, watchdog: &JoinHandle<()>) {
        loop {
            {
                let current = lock(&self.current);
                let replaced_soon = current.watch.abandoned() && !watchdog.is_finished();
                if current.thread.is_finished() && !replaced_soon {
                    return;
                }
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// How often the watchdog looks, for a given budget: a few times per budget,
/// so an overrun is caught within about a quarter budget of its end.
pub fn watchdog_period(budget: Duration) -> Duration {
    (budget / 4).clamp(Duration::from_millis(10), Duration::from_millis(250))
}

/// Starts the watchdog thread over `engine`; it stops when `stop` is set.
pub fn spawn_watchdog(
    engine: Arc<Engine>,
    plugins: Plugins,
    budget: Duration,
    stop: Arc<AtomicBool>,
) -> JoinHandle<()> {
    let period = watchdog_period(budget);
    thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                thread::sleep(period);
                engine.inspect(budget, &plugins);
            }
        })
        .expect("spawning a thread")
}

#[cfg(test)]
mod tests {
    use std::{
        path::Path,
        sync::mpsc::{self, SyncSender},
    };

    use arc_swap::ArcSwap;
    use quiet_plugin_api::{
        into_abi, params, Context, Envelope, Handler, Identity, PluginError, Value,
    };

    use super::*;
    use crate::{
        counters::Counters,
        db,
        handler::LoadedHandler,
        jobs::{JobSpec, JobsConfig},
        loader::LoadedPlugin,
        pipeline::{NoTransport, Services},
        registry::Registry,
        scheduler::Signal,
    };

    /// How a stuck handler is stuck.
    #[derive(Clone, Copy)]
    enum Stuck {
        /// In its own code, until the test lets it go.
        Blocked,
        /// Inside SQLite, in a query that never ends.
        InSql,
    }

    /// Writes `before`, gets stuck, and if it ever comes back tries to
    /// write `after`, reporting how that went.
    struct Sticky {
        stuck: Stuck,
        release: Mutex<mpsc::Receiver<()>>,
        after: SyncSender<Result<u64, String>>,
    }

    impl Handler for Sticky {
        fn name(&self) -> &str {
            "sticky"
        }
        fn event_types(&self) -> &[&str] {
            &[]
        }
        fn run_job(&self, ctx: &mut Context<'_>, _: &Value) -> Result<Vec<Envelope>, PluginError> {
            ctx.execute("INSERT INTO t(note) VALUES ('before')", params![])?;
            match self.stuck {
                Stuck::Blocked => {
                    let _ = lock(&self.release).recv();
                }
                Stuck::InSql => {
                    let endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT COUNT(*) FROM c";
                    // It ends in an error. Its message is usually
                    // "interrupted", but the watchdog's own statements on
                    // this connection can reset SQLite's per-connection
                    // error text first ("not an error"), so only the error
                    // itself is checked.
                    ctx.query(endless, params![]).unwrap_err();
                }
            }
            let after = ctx
                .execute("INSERT INTO t(note) VALUES ('after')", params![])
                .map_err(|e| e.message().to_owned());
            let _ = self.after.send(after);
            Ok(vec![])
        }
    }

    /// A healthy job in another plugin: one row per run.
    struct Steady;

    impl Handler for Steady {
        fn name(&self) -> &str {
            "steady"
        }
        fn event_types(&self) -> &[&str] {
            &[]
        }
        fn run_job(&self, ctx: &mut Context<'_>, _: &Value) -> Result<Vec<Envelope>, PluginError> {
            ctx.execute("INSERT INTO t(note) VALUES ('steady')", params![])?;
            Ok(vec![])
        }
    }

    fn plugin(name: &str, handler: impl Handler) -> Arc<LoadedPlugin> {
        let name: Arc<str> = name.into();
        let file = Path::new("/plugins").join(format!("lib{name}.so"));
        let hash = format!("hash-of-{name}");
        let h = LoadedHandler::new(name.clone(), file.clone(), hash.clone(), into_abi(handler))
            .unwrap();
        Arc::new(LoadedPlugin {
            file,
            name,
            version: "1".into(),
            generation: 1,
            hash,
            migrations: vec![],
            handlers: vec![Arc::new(h)],
        })
    }

    fn job(handler: &str) -> JobSpec {
        JobSpec {
            name: handler.into(),
            handler: handler.into(),
            frequency_ms: 100,
            enabled: true,
            params: Value::Null,
        }
    }

    fn notes(data: &Path, note: &str) -> i64 {
        db::open(data)
            .unwrap()
            .query_row("SELECT COUNT(*) FROM t WHERE note = ?", [note], |r| {
                r.get(0)
            })
            .unwrap()
    }

    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "{what}: not within 10 s");
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// A real engine and watchdog, with a handler stuck in its job: the
    /// watchdog disables its plugin, rolls back what it wrote, frees the
    /// database for a fresh engine that keeps running the other job; and
    /// the stuck thread, once let go, writes nothing and stops.
    fn stuck_engine_is_replaced(stuck: Stuck) {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path();
        db::open(data)
            .unwrap()
            .execute_batch("CREATE TABLE t(note TEXT NOT NULL)")
            .unwrap();
        let (release, released) = mpsc::channel();
        let (after_tx, after) = mpsc::sync_channel(1);
        let sticky = plugin(
            "sticky",
            Sticky {
                stuck,
                release: Mutex::new(released),
                after: after_tx,
            },
        );
        let plugins = Plugins::default();
        plugins.swap(Registry::new(1, vec![plugin("steady", Steady), sticky]));
        let config = Arc::new(ArcSwap::from_pointee(JobsConfig {
            jobs: vec![job("sticky"), job("steady")],
        }));
        let (to_engine, signals) = mpsc::sync_channel(16);
        let signals = Arc::new(Mutex::new(signals));
        let make = {
            let (data, plugins) = (data.to_owned(), plugins.clone());
            move || {
                let services = Services {
                    identity: Identity::default(),
                    outbox: Box::new(NoTransport),
                    store: None,
                };
                Ok(Scheduler::new(
                    db::open_engine(&data)?,
                    plugins.clone(),
                    config.clone(),
                    services,
                    signals.clone(),
                    Arc::new(Counters::default()),
                ))
            }
        };
        let engine = Engine::start(Box::new(make)).unwrap();
        let first = lock(&engine.current).watch.clone();
        let budget = Duration::from_millis(200);
        let stop = Arc::new(AtomicBool::new(false));
        let watchdog = spawn_watchdog(engine.clone(), plugins.clone(), budget, stop.clone());

        wait_until("the sticky plugin is disabled", || {
            !plugins.disabled().is_empty()
        });
        let d = &plugins.disabled()[0];
        assert_eq!(
            (d.plugin.as_str(), d.handlers.as_slice()),
            ("sticky", &["sticky".to_string()][..])
        );
        assert_eq!(
            d.reason,
            "exceeded the 200 ms call budget in handler 'sticky' (run_job)"
        );
        assert!(first.abandoned());
        assert!(plugins.current().handler("sticky").is_none());
        assert!(plugins.current().handler("steady").is_some());
        assert_eq!(
            plugins.why_disabled("sticky").unwrap(),
            "plugin 'sticky' exceeded the 200 ms call budget in handler 'sticky' (run_job)"
        );

        // The fresh engine writes; the stuck one's write was rolled back.
        let steady = notes(data, "steady");
        wait_until("the steady job runs on the fresh engine", || {
            notes(data, "steady") > steady + 2
        });
        assert_eq!(notes(data, "before"), 0);

        // Let the stuck call come back: its write is refused, and nothing
        // it did survives.
        let _ = release.send(());
        let attempt = after
            .recv_timeout(Duration::from_secs(10))
            .expect("the stuck handler came back");
        // A handler stuck in its own code comes back to a read-only
        // connection. One stuck in SQL is interrupted first, so a write it
        // makes at once may still land in the transaction the watchdog
        // then rolls back: what matters, checked below, is that none of it
        // survives.
        if let Stuck::Blocked = stuck {
            let err = attempt.expect_err("the abandoned engine wrote after its rescue");
            assert!(err.contains("readonly"), "{err}");
        }
        let steady = notes(data, "steady");
        wait_until("the steady job still runs", || {
            notes(data, "steady") > steady + 2
        });
        assert_eq!(notes(data, "before") + notes(data, "after"), 0);
        let runs: i64 = db::open(data)
            .unwrap()
            .query_row(
                "SELECT COUNT(*) FROM job_runs WHERE job_name = 'sticky'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(runs, 0, "the abandoned run was marked");

        to_engine.send(Signal::Shutdown).unwrap();
        engine.wait_stopped(&watchdog);
        stop.store(true, Ordering::SeqCst);
        watchdog.join().unwrap();
    }

    #[test]
    fn a_handler_stuck_in_its_own_code_is_abandoned_and_never_writes_again() {
        stuck_engine_is_replaced(Stuck::Blocked);
    }

    #[test]
    fn a_handler_stuck_in_an_endless_query_is_interrupted_and_abandoned() {
        stuck_engine_is_replaced(Stuck::InSql);
    }

    #[test]
    fn the_watchdog_looks_a_few_times_per_budget() {
        assert_eq!(
            watchdog_period(Duration::from_millis(500)),
            Duration::from_millis(125)
        );
        assert_eq!(
            watchdog_period(DEFAULT_CALL_BUDGET),
            Duration::from_millis(250)
        );
        assert_eq!(
            watchdog_period(Duration::from_millis(1)),
            Duration::from_millis(10)
        );
    }
}
