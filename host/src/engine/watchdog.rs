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
//!    [`CallWatch`](crate::plugins::call_budget::CallWatch) while it runs (see
//!    [`crate::plugins::call_budget`]);
//! 2. the watchdog looks a few times per budget; when one call has run longer
//!    than the budget, it marks the engine **abandoned** and, under the same
//!    lock, releases the database: it interrupts the statement in progress (a
//!    plugin may be stuck inside SQLite), makes the engine's connection
//!    `query_only`, then rolls its transaction back. The connection is opened
//!    in SQLite's serialized mode ([`crate::storage::db::open_engine`]), so
//!    these statements from another thread are safe; the stuck thread is in
//!    plugin code, not inside SQLite;
//! 3. it disables the plugin build (file and hash, see
//!    [`crate::plugins::registry::Plugins::disable`]): a new build of the file
//!    loads again; a restart of the host gives the same build another chance;
//! 4. it starts a fresh engine thread on a new connection, with the same
//!    plugins (minus that one), configuration and channel.
//!
//! The stuck thread is leaked: it keeps its stack, the envelopes of its unit,
//! and its CPU if it spins, until the process exits. If its call ever returns,
//! it can do no harm: its connection refuses writes, its transaction is gone
//! (so its `COMMIT` fails and nothing it queued for the network is sent), the
//! call returns [`CallError::Sql`](crate::plugins::handler::CallError::Sql) so
//! its unit stops at once, and the engine loop checks
//! [`EngineWatch::abandoned`] before any new unit and exits. The work of the
//! aborted unit is lost as a rolled-back transaction loses it: a job runs again
//! next period, frames from peers are asked for again by sync, CLI submissions
//! stay queued in the database.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard, PoisonError,
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use crate::{
    engine::{scheduler::Scheduler, watch::EngineWatch},
    plugins::registry::Plugins,
};

/// How long one plugin call may run before its plugin is disabled, unless
/// `--call-budget-ms` says otherwise. Generous on purpose: it is there to
/// catch calls that never return, and disabling a healthy but slow plugin
/// (a big reconciliation on a loaded machine) costs far more than waiting.
pub const DEFAULT_CALL_BUDGET: Duration = Duration::from_secs(10);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
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
        time::Instant,
    };

    use arc_swap::ArcSwap;
    use quiet_plugin_api::{
        into_abi, params, Context, Envelope, Handler, Identity, PluginError, Value,
    };

    use super::*;
    use crate::{
        engine::{
            inbox::Signal,
            jobs::{JobSpec, JobsConfig},
            pipeline::{NoTransport, Services},
        },
        plugins::{handler::LoadedHandler, loader::LoadedPlugin, registry::Registry},
        storage::{counters::Counters, db},
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
            ..Default::default()
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
                    config: config.clone(),
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
