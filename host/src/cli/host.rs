//! `quiet-host run`: wires the parts together and keeps them running.
//!
//! Threads:
//! - the **engine** ([`Scheduler`], its own SQLite connection) runs due jobs,
//!   frames from peers and CLI submissions, and the pipeline behind them;
//! - the **watchdog** gives up on an engine stuck in a plugin call past the
//!   call budget, disables that plugin and starts a fresh engine (see
//!   [`crate::engine::watchdog`]);
//! - the **watcher** waits on file-system events for the plugin folder and
//!   the folder of `jobs.yaml`, and polls once a second as a backstop; it
//!   runs the [`Reloader`], which has its own connection;
//! - the caller's thread waits for [`RunningHost::shutdown`] (the CLI calls
//!   it on SIGINT or SIGTERM).
//!
//! One host per data folder: `run` takes an exclusive lock on
//! `<data>/host.lock`, so a second host on the same folder fails at once with
//! a clear message instead of corrupting the first one's state.

use std::{
    fs::{self, File},
    io::Write,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use arc_swap::ArcSwap;
use notify::RecursiveMode;
use notify_debouncer_full::new_debouncer;

use crate::{
    cli::commands,
    crypto::transit::LiveRequests,
    engine::{
        inbox::Signal,
        jobs::JobsConfig,
        pipeline::{NoTransport, Outbox, Services},
        reload::{ReloadPaths, Reloader},
        scheduler::Scheduler,
        watchdog::{self, Engine},
    },
    network::{inbound::Inbound, listener, outbound::NetworkOutbox, tcp::Tcp, wire::Wire},
    plugins::registry::Plugins,
    storage::{counters::Counters, db, event_store::EventStore, members, networks::NetworkKeys},
};

/// Signals (mostly network frames) the engine may have queued.
const ENGINE_QUEUE: usize = 4096;
/// How long file events are gathered before a reload.
const DEBOUNCE: Duration = Duration::from_millis(150);
/// The backstop poll of the plugin folder and `jobs.yaml`.
const POLL: Duration = Duration::from_millis(1000);

/// Where a host keeps and finds things.
#[derive(Clone, Debug)]
pub struct HostOptions {
    /// The data folder: database, identity key, lock, plugin cache.
    pub data_dir: PathBuf,
    /// The plugin folder.
    pub plugins_dir: PathBuf,
    /// The job configuration.
    pub jobs_path: PathBuf,
    /// Where to listen for peers (`ip:port`; port 0 picks one); `None`
    /// for a host that does not sync.
    pub listen: Option<String>,
    /// How long one plugin call may run before its plugin is disabled
    /// ([`watchdog::DEFAULT_CALL_BUDGET`] unless the operator says).
    pub call_budget: Duration,
}

/// Why a host could not start; each is one line for the operator.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data folder could not be created or used.
    #[error("data folder {path}: {message}")]
    DataDir {
        /// The folder.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Another host holds the data folder.
    #[error("data folder {path} is in use by another quiet-host{holder}; stop it first or pass another --data")]
    Locked {
        /// The folder.
        path: PathBuf,
        /// " (pid N)" when known.
        holder: String,
    },
    /// A network key is unusable.
    #[error("{0}")]
    Keys(String),
    /// The identity key is unusable.
    #[error(transparent)]
    Identity(#[from] crate::crypto::identity::IdentityError),
    /// The database could not be opened.
    #[error("database {path}: {source}")]
    Database {
        /// The database file.
        path: PathBuf,
        /// The cause.
        source: rusqlite::Error,
    },
    /// The plugin folder is missing or unreadable.
    #[error("plugin folder {path}: {message}")]
    PluginsDir {
        /// The folder.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// `jobs.yaml` is invalid at start-up.
    #[error("{0}")]
    Config(#[from] crate::engine::jobs::ConfigError),
    /// The listen address is unusable.
    #[error("cannot listen on {address}: {message}")]
    Listen {
        /// The address asked for.
        address: String,
        /// The cause, with what to do.
        message: String,
    },
    /// The file watcher could not start.
    #[error("cannot watch {path}: {message}")]
    Watch {
        /// The folder.
        path: PathBuf,
        /// The cause.
        message: String,
    },
}

/// A started host; dropping it without [`RunningHost::shutdown`] leaves the
/// threads running until the process exits.
pub struct RunningHost {
    engine: Arc<Engine>,
    watchdog: Option<JoinHandle<()>>,
    stop_watchdog: Arc<AtomicBool>,
    watcher: Option<JoinHandle<()>>,
    checkpointer: Option<JoinHandle<()>>,
    to_scheduler: mpsc::SyncSender<Signal>,
    stop_threads: Arc<AtomicBool>,
    _lock: File,
    /// This host's peer id.
    pub peer_id: String,
    /// Where it listens, if it does.
    pub listen_addr: Option<std::net::SocketAddr>,
}

impl RunningHost {
    /// Finishes the job in hand, stops every thread and releases the lock.
    /// An engine stuck in a plugin call is first replaced by the watchdog,
    /// within the call budget; the stuck thread ends with the process.
    pub fn shutdown(mut self) {
        self.stop_threads.store(true, Ordering::SeqCst);
        let _ = self.to_scheduler.send(Signal::Shutdown);
        if let Some(watchdog) = self.watchdog.take() {
            self.engine.wait_stopped(&watchdog);
            self.stop_watchdog.store(true, Ordering::SeqCst);
            let _ = watchdog.join();
        }
        for t in [self.watcher.take(), self.checkpointer.take()]
            .into_iter()
            .flatten()
        {
            let _ = t.join();
        }
    }
}

/// Starts a host: lock, identity, database, plugins, jobs, threads.
pub fn start(opts: &HostOptions) -> Result<RunningHost, StartError> {
    let data = &opts.data_dir;
    db::create_private_dir(data).map_err(|e| StartError::DataDir {
        path: data.clone(),
        message: e.to_string(),
    })?;
    let lock = lock_data_dir(data)?;
    NetworkKeys::new(data)
        .check_private()
        .map_err(StartError::Keys)?;
    let identity = Arc::new(commands::identity_of(data)?);
    let db_err = |source| StartError::Database {
        path: data.join(db::DB_FILE),
        source,
    };
    if !opts.plugins_dir.is_dir() {
        return Err(StartError::PluginsDir {
            path: opts.plugins_dir.clone(),
            message: "not a folder (create it, or pass --plugins)".into(),
        });
    }

    let plugins = Plugins::default();
    let config = Arc::new(ArcSwap::from_pointee(JobsConfig::default()));
    // Bounded: under a flood, frames are dropped (and counted) at the
    // socket instead of piling up in memory.
    let (to_scheduler, signals) = mpsc::sync_channel(ENGINE_QUEUE);
    let signals = Arc::new(Mutex::new(signals));
    let counters = Arc::new(Counters::default());
    let keys = Arc::new(NetworkKeys::new(data));
    let paths = ReloadPaths {
        plugins_dir: opts.plugins_dir.clone(),
        cache_dir: data.join("plugin-cache"),
        jobs_path: opts.jobs_path.clone(),
    };
    let mut reloader = Reloader::new(
        paths,
        db::open(data).map_err(db_err)?,
        plugins.clone(),
        config.clone(),
        to_scheduler.clone(),
    )
    .map_err(db_err)?;
    // One store, cloned: the network opens responses' events ahead into
    // what it shares with every engine's.
    let store = EventStore::new(keys.clone(), counters.clone()).signing_as(identity.clone());
    let wire = Wire {
        identity: identity.clone(),
        live: Arc::new(LiveRequests::default()),
        keys: keys.clone(),
        counters: counters.clone(),
    };
    let listen_addr = match &opts.listen {
        Some(address) => Some(
            listener::listen(
                address,
                Inbound::new(wire.clone()).opening_events_ahead(store.clone()),
                to_scheduler.clone(),
            )
            .map_err(|e| StartError::Listen {
                address: address.clone(),
                message: match e.kind() {
                    std::io::ErrorKind::AddrInUse => {
                        "the port is in use; pick another --listen port".into()
                    }
                    _ => e.to_string(),
                },
            })?,
        ),
        None => None,
    };
    {
        let conn = db::open(data).map_err(db_err)?;
        db::set_host_state(&conn, "peer_id", Some(&identity.peer_id())).map_err(db_err)?;
        let listen = listen_addr.map(|a| a.to_string());
        db::set_host_state(&conn, "listen_addr", listen.as_deref()).map_err(db_err)?;
        // Networks this host created before membership get their genesis.
        let (written, failed) = members::ensure_geneses(&conn, &store);
        if !written.is_empty() {
            tracing::info!(networks = ?written, "wrote the membership genesis of networks created here");
        }
        for why in failed {
            tracing::warn!("membership genesis not written: {why}");
        }
    }
    reloader.initial_config()?;
    reloader.sync();

    // Each engine (a fresh one replaces one the watchdog abandoned) gets
    // its own connection and outbox, and shares everything else.
    let make_engine = {
        let (data, plugins, counters) = (data.clone(), plugins.clone(), counters.clone());
        let identity = identity.public();
        let wire = listen_addr.map(|_| wire.clone());
        move || {
            let outbox: Box<dyn Outbox + Send> = match &wire {
                Some(wire) => Box::new(NetworkOutbox::new(
                    wire.clone(),
                    Box::new(Tcp::new(wire.counters.clone())),
                )),
                None => Box::new(NoTransport),
            };
            let services = Services {
                identity: identity.clone(),
                outbox,
                store: Some(store.clone()),
                config: config.clone(),
            };
            Ok(Scheduler::new(
                db::open_engine(&data)?,
                plugins.clone(),
                config.clone(),
                services,
                signals.clone(),
                counters.clone(),
            ))
        }
    };
    if listen_addr.is_none() {
        tracing::warn!(
            "not listening (no --listen): peers cannot reach this host and it cannot sync"
        );
    }
    let engine = Engine::start(Box::new(make_engine)).map_err(db_err)?;
    let stop_watchdog = Arc::new(AtomicBool::new(false));
    let watchdog = watchdog::spawn_watchdog(
        engine.clone(),
        plugins,
        opts.call_budget,
        stop_watchdog.clone(),
    );

    let stop_threads = Arc::new(AtomicBool::new(false));
    let watcher = spawn_watcher(opts, reloader, stop_threads.clone())?;
    let checkpointer =
        db::spawn_checkpointer(db::open(data).map_err(db_err)?, stop_threads.clone());
    tracing::info!(
        peer_id = %identity.peer_id(),
        data = %data.display(),
        listen = %listen_addr.map_or("-".to_string(), |a| a.to_string()),
        "quiet-host running"
    );
    Ok(RunningHost {
        engine,
        watchdog: Some(watchdog),
        stop_watchdog,
        watcher: Some(watcher),
        checkpointer: Some(checkpointer),
        to_scheduler,
        stop_threads,
        _lock: lock,
        peer_id: identity.peer_id(),
        listen_addr,
    })
}

fn spawn_watcher(
    opts: &HostOptions,
    mut reloader: Reloader,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<()>, StartError> {
    let (tx, rx) = mpsc::channel();
    let mut debouncer = new_debouncer(DEBOUNCE, None, tx).map_err(|e| StartError::Watch {
        path: opts.plugins_dir.clone(),
        message: e.to_string(),
    })?;
    let jobs_dir = match opts.jobs_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    for dir in [&opts.plugins_dir, &jobs_dir] {
        debouncer
            .watch(dir, RecursiveMode::NonRecursive)
            .map_err(|e| StartError::Watch {
                path: dir.clone(),
                message: e.to_string(),
            })?;
    }
    Ok(thread::Builder::new()
        .name("watcher".into())
        .spawn(move || {
            let _debouncer = debouncer;
            while !stop.load(Ordering::SeqCst) {
                // Any event, or a quiet second, means: look again.
                match rx.recv_timeout(POLL) {
                    Ok(Err(errors)) => tracing::warn!("file watcher: {errors:?}"),
                    Ok(Ok(_)) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
                if !stop.load(Ordering::SeqCst) {
                    reloader.sync();
                }
            }
        })
        .expect("spawning a thread"))
}

fn lock_data_dir(data: &Path) -> Result<File, StartError> {
    let path = data.join("host.lock");
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| StartError::DataDir {
            path: data.to_owned(),
            message: format!("cannot open {}: {e}", path.display()),
        })?;
    if file.try_lock().is_err() {
        let holder = fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .map(|pid| format!(" (pid {pid})"))
            .unwrap_or_default();
        return Err(StartError::Locked {
            path: data.to_owned(),
            holder,
        });
    }
    file.set_len(0).ok();
    let _ = write!(file, "{}", std::process::id());
    Ok(file)
}

/// The pid of the host holding `data_dir`, if one is running.
pub fn running_pid(data_dir: &Path) -> Option<u32> {
    let path = data_dir.join("host.lock");
    let file = File::open(&path).ok()?;
    match file.try_lock_shared() {
        Ok(()) => None,
        Err(_) => fs::read_to_string(&path).ok()?.trim().parse().ok(),
    }
}
