//! The job scheduler: runs each enabled job of `jobs.yaml` when it is due.
//!
//! It keeps the seed's `job_runs(job_name, last_run_ms, run_count)` table. A
//! job is due when `now - last_run_ms >= frequency_ms`, or when it has never
//! run. Because `last_run_ms` is in SQLite, the rule holds across restarts: a
//! job that ran 2 s before a restart with a 3 s frequency runs about 1 s after
//! start, and a job overdue by hours runs once, not once per missed period.
//!
//! A due job's `run_job` is called directly, as in the seed, inside one write
//! transaction that also runs the envelopes it returns through the pipeline
//! and marks the run. So a crash leaves either all of a run or none of it.
//! The scheduler has its own thread and its own connection; it reads the
//! current plugin generation and job configuration at every tick, so reloads
//! take effect at the next tick.
//!
//! This thread is the host's **engine**: it also runs the frames from the
//! network and the CLI's submissions. If a plugin call on it overruns the call
//! budget, the watchdog abandons it and starts a fresh one on the same signal
//! queue (see [`crate::engine::watchdog`]); an abandoned engine whose call
//! comes back stops before its next unit of work.
//!
//! When the database cannot commit (a full disk, a read-only file), the
//! engine runs nothing until it can again; see [`crate::engine::health`].

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        mpsc::{Receiver, RecvTimeoutError, TryRecvError},
        Arc, PoisonError,
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use quiet_plugin_api::{field, Envelope};
use rusqlite::{Connection, OptionalExtension};

use crate::{
    encoding::codec,
    engine::{
        health::{self, Health},
        inbox::{Received, Signal, Signals},
        jobs::{JobSpec, JobsConfig},
        pipeline::{self, Pipeline, Services, Source},
        replay,
        watch::EngineWatch,
    },
    plugins::{
        call_budget,
        context::HostContext,
        handler::{CallError, LoadedHandler},
        registry::{Plugins, Registry},
    },
    storage::{
        counters::{self, Counters},
        db,
        statements::Statements,
    },
};

/// The longest the scheduler sleeps before looking again: the latency of a
/// CLI submission, and of a missed wake-up.
const MAX_SLEEP: Duration = Duration::from_millis(200);

/// Queued CLI submissions handled in one transaction at most.
const SUBMISSION_BATCH: usize = 1000;

/// Frames handled in one transaction at most.
const FRAME_BATCH: usize = 256;

/// Frame bytes after which a batch takes no more frames. Many small frames
/// share a commit; a large response (a catch-up batch of events) commits on
/// its own, so that the requests it triggers leave at once, while the peer
/// already prepares the next responses, instead of after a whole window of
/// responses (which left the engine idle half the time).
const FRAME_BATCH_BYTES: usize = 1 << 20;

/// Frames the engine takes off its queue ahead of handling them, so that it
/// sees the requests among them; see [`take_batch`].
const BACKLOG: usize = 2 * FRAME_BATCH;

/// Whether a job last run at `last_run_ms` is due at `now`.
pub fn is_due(last_run_ms: Option<i64>, frequency_ms: u64, now: i64) -> bool {
    match last_run_ms {
        None => true,
        // A clock that jumped back by more than a period must not stall jobs.
        Some(last) if last > now + frequency_ms as i64 => true,
        Some(last) => now - last >= frequency_ms as i64,
    }
}

/// The scheduler's state; [`Scheduler::run`] is its thread's body.
pub struct Scheduler {
    conn: Connection,
    plugins: Plugins,
    config: Arc<ArcSwap<JobsConfig>>,
    services: Services,
    signals: Signals,
    counters: Arc<Counters>,
    watch: Arc<EngineWatch>,
    /// Frames taken off the queue and not handled yet, in arrival order.
    /// An engine the watchdog abandons loses them, as it loses the batch in
    /// hand: peers ask again.
    backlog: VecDeque<Received>,
    /// Whether the last batch of frames was of requests; see
    /// [`take_batch`].
    served_requests: bool,
    /// Jobs that could not run: the reason last logged, and the plugin
    /// generation it was logged under (a new generation logs again).
    blocked: HashMap<String, (String, u64)>,
    /// Whether the database commits; see [`crate::engine::health`].
    health: Health,
}

impl Scheduler {
    /// A scheduler that owns `conn`, which must come from
    /// [`db::open_engine`] (the watchdog's rescue needs its serialized mode).
    pub fn new(
        conn: Connection,
        plugins: Plugins,
        config: Arc<ArcSwap<JobsConfig>>,
        services: Services,
        signals: Signals,
        counters: Arc<Counters>,
    ) -> Self {
        Self {
            watch: EngineWatch::new(&conn),
            health: Health::new(&conn),
            conn,
            plugins,
            config,
            services,
            signals,
            counters,
            backlog: VecDeque::new(),
            served_requests: false,
            blocked: HashMap::new(),
        }
    }

    /// What the watchdog watches of this engine.
    pub fn watch(&self) -> Arc<EngineWatch> {
        self.watch.clone()
    }

    /// Runs due jobs until told to stop, or until the watchdog abandons
    /// this engine.
    pub fn run(mut self) {
        call_budget::install(self.watch.calls());
        loop {
            let sleep = match self.health.cannot_commit() {
                // Until a probe commits, every unit would be rolled back.
                true => match health::probe(&self.conn) {
                    Ok(()) => {
                        self.health.recovered();
                        Duration::ZERO
                    }
                    Err(e) => self.health.failed(&e),
                },
                false => match self.tick() {
                    Ok(sleep) => sleep,
                    Err(_) if self.watch.abandoned() => break,
                    Err(e) => self.database_error(&e, "running jobs"),
                },
            };
            // Checked before taking anything off the queue: what this
            // engine takes, its replacement will never see.
            if self.watch.abandoned() {
                break;
            }
            let signals = self.signals.clone();
            let rx = signals.lock().unwrap_or_else(PoisonError::into_inner);
            if self.health.cannot_commit() {
                if self.hold_frames(&rx, sleep) {
                    break;
                }
                continue;
            }
            // Wait only with nothing in hand.
            if self.backlog.is_empty() {
                match rx.recv_timeout(sleep) {
                    Ok(Signal::Shutdown) | Err(RecvTimeoutError::Disconnected) => break,
                    Ok(Signal::Wake) | Err(RecvTimeoutError::Timeout) => continue,
                    Ok(Signal::Received(first)) => self.backlog.push_back(first),
                }
            }
            // Then take what else is queued, without waiting.
            let mut stop = false;
            while self.backlog.len() < BACKLOG {
                match rx.try_recv() {
                    Ok(Signal::Received(f)) => self.backlog.push_back(f),
                    Ok(Signal::Wake) => {}
                    Ok(Signal::Shutdown) => {
                        stop = true;
                        break;
                    }
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            drop(rx);
            let frames = take_batch(&mut self.backlog, &mut self.served_requests);
            if let Err(e) = self.receive(frames) {
                self.database_error(&e, "receiving");
            }
            if stop {
                break;
            }
        }
        match self.watch.abandoned() {
            true => tracing::warn!(
                "an abandoned engine thread came back from its plugin call and stopped"
            ),
            false => tracing::debug!("scheduler stopped"),
        }
    }

    /// While the database cannot commit: waits `wait` for the next probe,
    /// keeping the newest [`BACKLOG`] frames that arrive, to be handled once
    /// it can (handled now, they would be rolled back). Answering a peer's
    /// request late beats dropping it: the peer's session waits for that
    /// answer and starts no other until it expires. Older frames are
    /// dropped and counted; their peers ask again. Returns whether to stop.
    fn hold_frames(&mut self, rx: &Receiver<Signal>, wait: Duration) -> bool {
        let until = Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Signal::Shutdown) | Err(RecvTimeoutError::Disconnected) => return true,
                Err(RecvTimeoutError::Timeout) => return false,
                Ok(Signal::Wake) => {}
                Ok(Signal::Received(frame)) => {
                    if self.backlog.len() >= BACKLOG {
                        self.backlog.pop_front();
                        self.counters.bump("drop_cannot_commit");
                    }
                    self.backlog.push_back(frame);
                }
            }
        }
    }

    /// Logs a database error of a unit, once per change of state if it
    /// means that nothing can commit; returns how long to wait.
    fn database_error(&mut self, e: &rusqlite::Error, doing: &str) -> Duration {
        match health::is_commit_failure(e) {
            true => self.health.failed(e),
            false => {
                tracing::error!("engine: database error while {doing}: {e}");
                MAX_SLEEP
            }
        }
    }

    /// Runs every due job once; returns how long to sleep until the next.
    pub fn tick(&mut self) -> rusqlite::Result<Duration> {
        let config = self.config.load_full();
        let registry = self.plugins.current();
        let mut sleep = MAX_SLEEP;
        for job in config.enabled() {
            if self.watch.abandoned() {
                return Err(call_budget::abandoned_error());
            }
            let now = db::now_ms();
            let last = last_run(&self.conn, &job.name)?;
            let next_due = if is_due(last, job.frequency_ms, now) {
                match self.run_job(job, &registry, now) {
                    Ok(true) => now + job.frequency_ms as i64,
                    // Blocked until a reload wakes us.
                    Ok(false) => continue,
                    // The jobs after it would fail too: the job stays due,
                    // and runs once a probe commits.
                    Err(e) if health::is_commit_failure(&e) => return Err(e),
                    // Any other database error costs this job this run,
                    // not the jobs after it.
                    Err(e) => {
                        tracing::error!(job = %job.name, "job not run: database error: {e}");
                        now + MAX_SLEEP.as_millis() as i64
                    }
                }
            } else {
                last.unwrap_or(now) + job.frequency_ms as i64
            };
            let wait = Duration::from_millis((next_due - db::now_ms()).max(0) as u64);
            sleep = sleep.min(wait);
        }
        call_budget::check_not_abandoned()?;
        if self.drain_submissions(&registry)? > 0 {
            // A CLI is queueing: more may have come meanwhile, so look
            // again at once rather than after a sleep.
            sleep = Duration::ZERO;
        }
        // A plugin behind in the stored events gets a batch a turn, in
        // turns with frames and jobs.
        call_budget::check_not_abandoned()?;
        if replay::turn(&self.conn, &registry, &self.services)? {
            sleep = Duration::ZERO;
        }
        if !self.counters.is_empty() {
            let pending = self.counters.take();
            let written = self
                .services
                .write_tx(&self.conn, |c| counters::write(c, &pending));
            if let Err(e) = written {
                self.counters.restore(pending);
                return Err(e);
            }
        }
        Ok(sleep)
    }

    /// Runs envelopes from the network through the pipeline, in one
    /// transaction. Their frames' bytes stay counted against the queue
    /// budget until it is done. [`Scheduler::run`] calls it for each batch
    /// of queued frames; a simulator, which owns the thread, calls it
    /// directly.
    pub fn receive(&mut self, received: Vec<Received>) -> rusqlite::Result<()> {
        let (envelopes, held): (Vec<Envelope>, Vec<_>) =
            received.into_iter().map(Received::into_parts).unzip();
        // Held by the watch, so that the watchdog can give the budget back
        // if it abandons this engine in the middle of the batch.
        self.watch.hold(held);
        let registry = self.plugins.current();
        let source = Source {
            plugin: None,
            handler: "network".into(),
        };
        let done = self.services.write_tx(&self.conn, |conn| {
            Pipeline::new(conn, &registry, &self.services)
                .run(envelopes, source)
                .map(drop)
        });
        self.watch.release();
        done
    }

    /// Runs up to a batch of the envelopes that CLI commands queued in
    /// `submissions`; returns how many it took.
    fn drain_submissions(&mut self, registry: &Registry) -> rusqlite::Result<usize> {
        let queued: Vec<(i64, Vec<u8>)> = self
            .conn
            .prepare_cached("SELECT id, envelope FROM submissions ORDER BY id LIMIT ?")?
            .query_map([SUBMISSION_BATCH as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let Some(&(last, _)) = queued.last() else {
            self.route_ready(registry)?;
            return Ok(0);
        };
        let source = Source {
            plugin: None,
            handler: "cli".into(),
        };
        self.services.write_tx(&self.conn, |conn| {
            let mut envelopes = Vec::with_capacity(queued.len());
            for (id, bytes) in &queued {
                match codec::decode_envelope(bytes) {
                    Ok(env) => envelopes.push(env),
                    Err(e) => {
                        tracing::warn!(submission = id, "dropped a malformed submission: {e}")
                    }
                }
            }
            Pipeline::new(conn, registry, &self.services).run(envelopes, source)?;
            conn.execute("DELETE FROM submissions WHERE id <= ?", [last])?;
            Ok(queued.len())
        })
    }

    /// Routes events whose deps have all been routed but that no run has
    /// taken yet: the rest of a long cascade, or one a crash interrupted.
    /// Every run takes some ([`Pipeline`]); this is for a host with nothing
    /// else to do.
    fn route_ready(&mut self, registry: &Registry) -> rusqlite::Result<()> {
        let any: bool = self
            .conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM event_ready)")?
            .query_row([], |r| r.get(0))?;
        if !any {
            return Ok(());
        }
        let source = Source {
            plugin: None,
            handler: "event store".into(),
        };
        self.services.write_tx(&self.conn, |conn| {
            Pipeline::new(conn, registry, &self.services)
                .run([], source)
                .map(drop)
        })
    }

    /// Runs one job; returns false if it could not be run at all.
    fn run_job(&mut self, job: &JobSpec, registry: &Registry, now: i64) -> rusqlite::Result<bool> {
        let Some(handler) = registry.handler(&job.handler) else {
            let why = match self.plugins.why_disabled(&job.handler) {
                Some(reason) => format!("handler '{}' is disabled: {reason}", job.handler),
                None => format!("handler '{}' is not loaded", job.handler),
            };
            let blocked = (why, registry.generation);
            if self.blocked.get(&job.name) != Some(&blocked) {
                tracing::warn!(job = %job.name, "job cannot run: {}", blocked.0);
                set_job_error(&self.conn, &job.name, Some(&blocked.0), now)?;
                self.blocked.insert(job.name.clone(), blocked);
            }
            return Ok(false);
        };
        self.blocked.remove(&job.name);
        execute_job(&self.conn, registry, &self.services, handler, job, now)?;
        Ok(true)
    }
}

/// Runs `job` on `handler` once, as the seed describes: `run_job` and the
/// pipeline behind it in one write transaction, then marks the run. Returns
/// the job's error, if it failed; the run is marked either way, so a failing
/// job waits for its next period instead of spinning.
pub fn execute_job(
    conn: &Connection,
    registry: &Registry,
    services: &Services,
    handler: &LoadedHandler,
    job: &JobSpec,
    now: i64,
) -> rusqlite::Result<Option<String>> {
    let source = Source {
        plugin: Some(handler.plugin.to_string()),
        handler: handler.name.clone(),
    };
    services.write_tx(conn, |conn| {
        let statements = Statements::new(conn);
        let mut ctx = HostContext::new(
            &statements,
            &handler.plugin,
            &services.identity,
            services.store.as_ref(),
        );
        let config = services.config.load();
        let settings = config.settings_of(&handler.plugin);
        let result = db::with_savepoint(conn, || handler.run_job(&mut ctx, &job.params, settings));
        let error = match result {
            Ok(envelopes) => {
                let envelopes = envelopes.into_iter().map(pipeline::from_plugin).collect();
                let envelopes = pipeline::with_created(ctx.take_created(), envelopes);
                let report = Pipeline::new(conn, registry, services).run(envelopes, source)?;
                tracing::debug!(job = %job.name, ?report, "job ran");
                None
            }
            Err(CallError::Handler(e)) => {
                tracing::warn!(job = %job.name, handler = %handler.name, "job failed: {e}");
                Some(e)
            }
            Err(CallError::Sql(e)) => return Err(e),
        };
        mark_run(conn, &job.name, now)?;
        set_job_error(conn, &job.name, error.as_deref(), now)?;
        Ok(error)
    })
}

fn last_run(conn: &Connection, job: &str) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached("SELECT last_run_ms FROM job_runs WHERE job_name = ?")?
        .query_row([job], |r| r.get(0))
        .optional()
}

fn mark_run(conn: &Connection, job: &str, now: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO job_runs(job_name, last_run_ms, run_count) VALUES (?1, ?2, 1)
         ON CONFLICT(job_name) DO UPDATE SET last_run_ms = excluded.last_run_ms, run_count = run_count + 1",
    )?
    .execute(rusqlite::params![job, now])?;
    Ok(())
}

fn set_job_error(
    conn: &Connection,
    job: &str,
    error: Option<&str>,
    now: i64,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "UPDATE job_config SET last_error = ?2, last_error_ms = CASE WHEN ?2 IS NULL THEN last_error_ms ELSE ?3 END
         WHERE job_name = ?1",
    )?
    .execute(rusqlite::params![job, error, now])?;
    Ok(())
}

/// The next batch of frames to handle, in one transaction: requests or
/// responses from the backlog, in turns when both wait, each in arrival
/// order, up to [`FRAME_BATCH`] frames and [`FRAME_BATCH_BYTES`] (at
/// least one).
///
/// Answers leave only when their transaction commits. Taken in arrival
/// order, a peer's request waited behind a window of responses, each a
/// thousand events to store, so in a two-way sync the peer's pull
/// began only when ours was done. Requests first, always, starved our
/// own responses instead while the peer kept pulling. In turns, a
/// request waits for one batch at most, and both pulls move at once.
///
/// `served_requests` says whether the last batch was of requests, and is
/// updated.
fn take_batch(backlog: &mut VecDeque<Received>, served_requests: &mut bool) -> Vec<Received> {
    let is_request = |r: &Received| r.envelope.get(field::IN_RESPONSE_TO).is_none();
    let has_requests = backlog.iter().any(is_request);
    let has_responses = backlog.iter().any(|r| !is_request(r));
    let requests = has_requests && !(*served_requests && has_responses);
    *served_requests = requests;
    let mut batch = Vec::new();
    let mut rest = VecDeque::with_capacity(backlog.len());
    let mut bytes = 0;
    for r in backlog.drain(..) {
        let room = batch.is_empty() || (batch.len() < FRAME_BATCH && bytes < FRAME_BATCH_BYTES);
        if room && is_request(&r) == requests {
            bytes += r.frame_len();
            batch.push(r);
        } else {
            rest.push_back(r);
        }
    }
    *backlog = rest;
    batch
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use quiet_plugin_api::{field, Envelope};

    use super::{is_due, take_batch};
    use crate::engine::inbox::Received;

    #[test]
    fn requests_and_responses_take_turns_each_in_arrival_order() {
        // A frame named `resp…` answers a request of ours.
        let frame = |name: &str| {
            let mut envelope = Envelope::of_type(name);
            if name.starts_with("resp") {
                envelope.set(field::IN_RESPONSE_TO, "ab");
            }
            Received::new(envelope)
        };
        let mut backlog: VecDeque<Received> = ["resp1", "resp2", "req1", "resp3", "req2"]
            .map(frame)
            .into();
        let mut served_requests = false;
        let mut next = |backlog: &mut VecDeque<Received>| -> Vec<String> {
            take_batch(backlog, &mut served_requests)
                .iter()
                .map(|r| r.envelope.event_type().unwrap_or("").to_owned())
                .collect()
        };
        // Requests first: their answers wait for their commit.
        assert_eq!(next(&mut backlog), ["req1", "req2"]);
        backlog.extend(["req3", "resp4"].map(frame));
        // Then the responses' turn, however many requests came meanwhile.
        assert_eq!(next(&mut backlog), ["resp1", "resp2", "resp3", "resp4"]);
        assert_eq!(next(&mut backlog), ["req3"]);
        // One kind alone goes on, turn or not.
        backlog.extend(["resp5"].map(frame));
        assert_eq!(next(&mut backlog), ["resp5"]);
        backlog.extend(["resp6"].map(frame));
        assert_eq!(next(&mut backlog), ["resp6"]);
        backlog.extend(["req4"].map(frame));
        assert_eq!(next(&mut backlog), ["req4"]);
        backlog.extend(["req5"].map(frame));
        assert_eq!(next(&mut backlog), ["req5"]);
        assert!(next(&mut backlog).is_empty());
    }

    #[test]
    fn due_rule_matches_the_seed_and_survives_restarts() {
        assert!(is_due(None, 3000, 10_000));
        // Ran 2 s ago with a 3 s period: not yet; due 1 s later.
        assert!(!is_due(Some(8_000), 3000, 10_000));
        assert!(is_due(Some(8_000), 3000, 11_000));
        // Overdue by hours: due (once; the run moves last_run_ms to now).
        assert!(is_due(Some(0), 3000, 10 * 3_600_000));
        // The clock jumped back a long way.
        assert!(is_due(Some(1_000_000), 3000, 10_000));
    }
}
