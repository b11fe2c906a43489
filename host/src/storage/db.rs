//! The host's SQLite database: one file in the data folder, in WAL mode.
//!
//! WAL lets `quiet-host status` (another process) read while the host
//! writes. Every connection waits on a busy lock instead of failing, and every
//! write transaction starts with `BEGIN IMMEDIATE`, so two writers queue up
//! rather than fail with "database is locked" when a read turns into a write.
//!
//! Checkpoints (copying the WAL back into the database file) run on a thread
//! of their own, [`spawn_checkpointer`]: left to SQLite's default they run
//! inside the engine's commits, and were 15 % of its time in a catch-up.
//!
//! The host's own schema is versioned with `PRAGMA user_version`; plugins'
//! schemas are versioned per plugin in `plugin_migrations` (see
//! [`apply_plugin_migrations`]).

use std::{
    cell::Cell,
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rusqlite::{Connection, OpenFlags, OptionalExtension};

/// Sets SQLite's process-wide options, once, before SQLite starts (later
/// calls of `sqlite3_config` are refused, harmlessly): memory statistics
/// off. With them on, every allocation SQLite makes takes a global mutex;
/// the engine's connection, in serialized mode, spent a tenth of a
/// catch-up locking mutexes. Nothing reads the statistics.
fn configure_sqlite() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| unsafe {
        rusqlite::ffi::sqlite3_config(rusqlite::ffi::SQLITE_CONFIG_MEMSTATUS, 0 as libc::c_int);
    });
}

/// The database file's name inside the data folder.
pub const DB_FILE: &str = "quiet.db";

/// How long a connection waits for another writer before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Makes `conn` wait for another connection's lock by looking again every
/// millisecond, for [`BUSY_TIMEOUT`] at least. SQLite's own wait backs off
/// to sleeps of 100 ms: a CLI queueing events and the engine storing them
/// take turns with the write lock every few milliseconds, and each turn
/// lost to a long sleep left a core idle (local creation ran about a fifth
/// slower).
fn wait_for_locks(conn: &Connection) -> rusqlite::Result<()> {
    fn look_again(tries: i32) -> bool {
        std::thread::sleep(Duration::from_millis(1));
        u128::from(tries.unsigned_abs()) < BUSY_TIMEOUT.as_millis()
    }
    conn.busy_handler(Some(look_again))
}

/// The host's schema, oldest first. Append; never edit a shipped entry.
const MIGRATIONS: &[&str] = &[
    // 1: the seed's job_runs, plus what status needs to show.
    "CREATE TABLE job_runs (
        job_name TEXT PRIMARY KEY,
        last_run_ms INTEGER NOT NULL,
        run_count INTEGER DEFAULT 0
     );
     -- The job configuration the host is running, as last applied.
     CREATE TABLE job_config (
        job_name TEXT PRIMARY KEY,
        handler TEXT NOT NULL,
        frequency_ms INTEGER NOT NULL,
        enabled INTEGER NOT NULL,
        params TEXT NOT NULL,
        last_error TEXT,
        last_error_ms INTEGER
     );
     CREATE TABLE dead_letters (
        id INTEGER PRIMARY KEY,
        at_ms INTEGER NOT NULL,
        plugin TEXT,
        handler TEXT NOT NULL,
        reason TEXT NOT NULL,
        envelope TEXT NOT NULL
     );
     CREATE INDEX dead_letters_at ON dead_letters(at_ms);
     -- One row per plugin file in the plugin folder, loaded or refused.
     CREATE TABLE plugins (
        file TEXT PRIMARY KEY,
        name TEXT,
        version TEXT,
        generation INTEGER,
        loaded_at_ms INTEGER,
        hash TEXT,
        error TEXT,
        error_at_ms INTEGER
     );
     CREATE TABLE plugin_migrations (
        plugin TEXT PRIMARY KEY,
        applied INTEGER NOT NULL
     );
     CREATE TABLE host_state (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
     );",
    // 2: sync. Events are stored encrypted; `event` is the exact bytes
    // `event_id` is derived from (see `event_crypto::event_id`).
    "CREATE TABLE events (
        event_id BLOB PRIMARY KEY,
        network_id TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        event_type TEXT NOT NULL,
        event BLOB NOT NULL,
        received_ms INTEGER NOT NULL
     );
     CREATE INDEX events_network ON events(network_id, created_ms, event_id);
     -- Networks this host is a member of; their keys live in <data>/keys.
     CREATE TABLE networks (
        network_id TEXT PRIMARY KEY,
        created_ms INTEGER NOT NULL,
        invited_by TEXT
     );
     -- The seed's table of peers to sync with.
     CREATE TABLE addresses (
        peer_id TEXT NOT NULL,
        network_id TEXT NOT NULL,
        ip TEXT NOT NULL,
        port INTEGER NOT NULL,
        is_active INTEGER NOT NULL DEFAULT 1,
        last_seen_ms INTEGER,
        last_sync_ms INTEGER,
        PRIMARY KEY (peer_id, network_id)
     );
     -- Things dropped on purpose (bad packets, rate limits), by reason.
     CREATE TABLE counters (
        name TEXT PRIMARY KEY,
        value INTEGER NOT NULL
     );
     -- Envelopes queued by CLI commands for the running host's pipeline.
     CREATE TABLE submissions (
        id INTEGER PRIMARY KEY,
        envelope BLOB NOT NULL,
        submitted_ms INTEGER NOT NULL
     );",
    // 3: plugin builds the watchdog disabled (an overrun call budget).
    "ALTER TABLE plugins ADD COLUMN disabled TEXT;
     ALTER TABLE plugins ADD COLUMN disabled_at_ms INTEGER;",
    // 4: event ids become time-first (the event's clear 8-byte time, then
    // the first 24 bytes of its BLAKE3 hash, which the old id was).
    // Projections keyed by the old ids map them by those 24 bytes.
    "UPDATE events SET event_id = unhex(hex(substr(event, 1, 8)) || hex(substr(event_id, 1, 24)));",
    // 5: events become signed (format 3). Those stored before are moved
    // here: their author is only what their sender wrote, so they are
    // kept as this host's unverified history and never synced again
    // (docs/design/signed-events.md, section 7). `routed` keeps their
    // order for the plugins that will be offered them.
    "CREATE TABLE legacy_events (
        event_id BLOB PRIMARY KEY,
        network_id TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        event_type TEXT NOT NULL,
        event BLOB NOT NULL,
        received_ms INTEGER NOT NULL,
        routed INTEGER NOT NULL
     );
     INSERT INTO legacy_events
        SELECT event_id, network_id, created_ms, event_type, event, received_ms, rowid
        FROM events ORDER BY rowid;
     DELETE FROM events;
     -- Queued by an older CLI, unsigned: no host would take them.
     INSERT INTO counters(name, value)
        SELECT 'drop_unsigned_event', COUNT(*) FROM submissions WHERE true HAVING COUNT(*) > 0
        ON CONFLICT(name) DO UPDATE SET value = value + excluded.value;
     DELETE FROM submissions;",
    // 6: dependencies. An event is stored when it arrives, and routed to
    // handlers once every event it depends on has been; `routed` numbers
    // events in the order they were routed (NULL while one waits).
    // `event_waits` holds what each waiting event still waits for;
    // `event_ready` the events whose last dep came, for the engine to route
    // (a cascade is then routed a batch per transaction, and survives a
    // crash). Events stored so far were routed as they arrived.
    "ALTER TABLE events ADD COLUMN routed INTEGER;
     UPDATE events SET routed = rowid;
     CREATE INDEX events_routed ON events(routed);
     CREATE TABLE event_waits (
        dep_id BLOB NOT NULL,
        event_id BLOB NOT NULL,
        network_id TEXT NOT NULL,
        since_ms INTEGER NOT NULL,
        PRIMARY KEY (dep_id, event_id)
     ) WITHOUT ROWID;
     CREATE INDEX event_waits_by_event ON event_waits(event_id);
     CREATE TABLE event_ready (event_id BLOB PRIMARY KEY) WITHOUT ROWID;",
    // 7: replay for late plugins (engine/replay.rs): how far along the
    // routed events each handler has been offered those of each type it
    // subscribes to (`*` for all), and the replays `plugins replay` asked.
    "CREATE TABLE plugin_cursors (
        handler TEXT NOT NULL,
        event_type TEXT NOT NULL,
        plugin TEXT NOT NULL,
        offered INTEGER NOT NULL,
        PRIMARY KEY (handler, event_type)
     );
     CREATE TABLE replay_requests (
        plugin TEXT PRIMARY KEY,
        requested_ms INTEGER NOT NULL
     );",
    // 8: membership (storage/members.rs, docs/design/membership.md). A
    // network created here from now on keeps the `salt` its id was derived
    // from; those created before have none, and random ids.
    // `membership_roles` is the member set as this host last folded it from the
    // membership events it routed; `membership_dirty` the networks to fold
    // again, written with the event that changed them. The partial index
    // finds a network's membership events among its messages.
    "ALTER TABLE networks ADD COLUMN salt BLOB;
     CREATE INDEX events_membership ON events(network_id, event_type)
        WHERE event_type >= 'quiet.' AND event_type < 'quiet/';
     CREATE TABLE membership_roles (
        network_id TEXT NOT NULL,
        peer_id TEXT NOT NULL,
        role TEXT NOT NULL CHECK (role IN ('creator', 'admin', 'member', 'removed')),
        PRIMARY KEY (network_id, peer_id)
     ) WITHOUT ROWID;
     CREATE TABLE membership (
        network_id TEXT PRIMARY KEY,
        genesis BLOB,
        events INTEGER NOT NULL,
        invalid INTEGER NOT NULL,
        heads BLOB NOT NULL,
        folded_ms INTEGER NOT NULL
     );
     CREATE TABLE membership_dirty (network_id TEXT PRIMARY KEY) WITHOUT ROWID;
     INSERT OR IGNORE INTO membership_dirty
        SELECT DISTINCT network_id FROM events
        WHERE event_type >= 'quiet.' AND event_type < 'quiet/' AND routed IS NOT NULL;",
];

thread_local! {
    /// The calling thread's virtual time, if a simulator set one.
    static VIRTUAL_NOW_MS: Cell<Option<i64>> = const { Cell::new(None) };
}

/// Sets (with `Some`) or clears (with `None`) the calling thread's virtual
/// clock, which [`now_ms`] then returns. It is per thread so that
/// simulations in parallel tests keep their own time; a real host never
/// sets it. Everything that tells time (the scheduler, transit TTLs, the
/// context plugins read `now_ms` from) goes through [`now_ms`].
pub fn set_thread_clock(now_ms: Option<i64>) {
    VIRTUAL_NOW_MS.set(now_ms);
}

/// Milliseconds since the Unix epoch, or the thread's virtual time (see
/// [`set_thread_clock`]).
pub fn now_ms() -> i64 {
    if let Some(now) = VIRTUAL_NOW_MS.get() {
        return now;
    }
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Creates `dir` (and its parents) if needed, and makes it private (0700):
/// a data folder holds decrypted messages and dead letters, and secret keys.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Makes the database file and its WAL and shared-memory files, where they
/// exist, readable by their owner only. SQLite gives the WAL and shm files
/// it creates the database file's mode, so a new WAL stays private too.
fn make_private(db_file: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for suffix in ["", "-wal", "-shm"] {
            let mut name = db_file.as_os_str().to_owned();
            name.push(suffix);
            match std::fs::set_permissions(&name, std::fs::Permissions::from_mode(0o600)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
    }
    Ok(())
}

/// Opens (creating if needed) the database in `data_dir` and brings the
/// host's schema up to date; the files are made private (0600).
pub fn open(data_dir: &Path) -> rusqlite::Result<Connection> {
    open_with(data_dir, OpenFlags::default())
}

fn open_with(data_dir: &Path, flags: OpenFlags) -> rusqlite::Result<Connection> {
    configure_sqlite();
    // Gathered WAL writes (see `wal_writes`); the platform's VFS if that
    // cannot be registered.
    let path = data_dir.join(DB_FILE);
    let conn = match crate::storage::wal_writes::register() {
        Ok(vfs) => Connection::open_with_flags_and_vfs(&path, flags, vfs)?,
        Err(rc) => {
            tracing::warn!("writing the WAL page by page: its VFS failed to register ({rc})");
            Connection::open_with_flags(&path, flags)?
        }
    };
    // Before the WAL exists (configure makes it), so that it is made
    // with the database's private mode.
    make_private(&path).map_err(|e| {
        rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
            Some(format!("cannot make {} private: {e}", path.display())),
        )
    })?;
    configure(&conn)?;
    migrate(&conn)?;
    Ok(conn)
}

/// The page size of a new database, in bytes. A catch-up's receiver ran
/// 2.9 % fewer instructions and wrote 4.5 % less WAL with 8 KiB than with
/// SQLite's 4 KiB: a kilobyte event or message row fills a larger page
/// better, and index pages split half as often. 16 KiB ran more
/// instructions than 8 KiB. A database keeps the page size it was made
/// with.
const PAGE_SIZE: i64 = 8192;

/// WAL bytes the engine lets pile up before it checkpoints in its own
/// commit: a backstop for long bursts of writes.
///
/// While commits come back to back the WAL cannot restart from its start:
/// the writer restarts it only when it begins a transaction with every
/// frame already copied back, and the checkpointer is always a commit
/// behind. So the WAL grows for as long as a burst lasts and restarts when
/// the engine pauses. Each engine checkpoint stalled the engine 150-190 ms
/// (its fsync); at 64 MiB that was every ~18k events of a catch-up, 15 % of
/// its time. A restart asked for by the checkpointer (holding the engine
/// off meanwhile) stalled it as long. At 1 GiB it is once per ~250k events.
const ENGINE_CHECKPOINT_BYTES: i64 = 1 << 30;

/// The size a restarted WAL file is cut back to, in bytes, so that a burst
/// does not leave its whole length on disk.
const WAL_SIZE_LIMIT: i64 = 64 << 20;

/// The engine's page cache, in KiB. SQLite's default (2 MiB) is smaller
/// than one batch of a catch-up writes, so dirty pages spilled to the WAL
/// before the commit (10 % of the engine's time). 16 MiB cost the same CPU
/// as 32 MiB in a 100k catch-up, and is half the memory.
const ENGINE_CACHE_KIB: i64 = 16 * 1024;

/// How often the checkpointer looks at the WAL.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// The most looks in a row the checkpointer skips while the engine
/// commits; see [`spawn_checkpointer`].
const BUSY_SKIPS: u32 = 9;

/// The WAL size from which the checkpointer no longer skips looks: nearer
/// [`ENGINE_CHECKPOINT_BYTES`], it keeps the WAL copied back, so that the
/// engine's own checkpoint finds little left to copy inside its commit.
const SKIP_BELOW_WAL_BYTES: u64 = 256 << 20;

/// [`open`], for the engine thread: it leaves checkpoints to
/// [`spawn_checkpointer`], and is in SQLite's serialized mode, so that the
/// watchdog may roll back its transaction from another thread while a
/// plugin call is stuck on it (see [`crate::engine::watchdog`]). The mutex this
/// costs per SQLite call is uncontended.
pub fn open_engine(data_dir: &Path) -> rusqlite::Result<Connection> {
    let flags = (OpenFlags::default() - OpenFlags::SQLITE_OPEN_NO_MUTEX)
        | OpenFlags::SQLITE_OPEN_FULL_MUTEX;
    let conn = open_with(data_dir, flags)?;
    // In pages of this database's size, which an older one may not share.
    let page_size: i64 = conn.pragma_query_value(None, "page_size", |r| r.get(0))?;
    conn.pragma_update(
        None,
        "wal_autocheckpoint",
        ENGINE_CHECKPOINT_BYTES / page_size.max(512),
    )?;
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
    conn.pragma_update(None, "cache_size", -ENGINE_CACHE_KIB)?;
    Ok(conn)
}

/// Starts the thread that checkpoints the WAL of `conn`'s database, until
/// `stop` is set. Its checkpoints are passive: they never wait for, or hold
/// up, a writer.
///
/// It looks every 100 ms, and checkpoints when the database has not
/// changed since its last look, or at least once a second (at every look
/// once the WAL passes 256 MiB, `SKIP_BELOW_WAL_BYTES`). While commits
/// come back to back the WAL cannot restart anyway (see
/// `ENGINE_CHECKPOINT_BYTES`), so copying it back early frees nothing;
/// copied later, a page that many commits rewrote (an index's) is copied
/// once rather than once per look, and the copying leaves the cores to the
/// engine and its peers while they work.
pub fn spawn_checkpointer(conn: Connection, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    thread::Builder::new()
        .name("checkpointer".into())
        .spawn(move || {
            lower_this_threads_priority();
            let mut failing = false;
            let mut pacing = Pacing::default();
            let wal = conn.path().map(|db| format!("{db}-wal"));
            while !stop.load(Ordering::SeqCst) {
                // Changes whenever another connection commits.
                let version = conn.query_row("PRAGMA data_version", [], |r| r.get(0));
                let wal_bytes = wal
                    .as_ref()
                    .and_then(|w| std::fs::metadata(w).ok())
                    .map_or(0, |m| m.len());
                if !pacing.due(version.ok(), wal_bytes) {
                    thread::sleep(CHECKPOINT_EVERY);
                    continue;
                }
                let done =
                    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(1));
                if done
                    .as_ref()
                    .is_ok_and(|&frames| frames >= RESTART_FROM_FRAMES)
                {
                    restart_wal(&conn);
                }
                let done = done.map(drop);
                // Log a failure once, not ten times a second, and its end:
                // otherwise the last word in the log is the failure.
                match &done {
                    Err(e) if !failing => tracing::warn!("checkpoint failed: {e}"),
                    Ok(()) if failing => tracing::info!("checkpoints work again"),
                    _ => {}
                }
                failing = done.is_err();
                thread::sleep(CHECKPOINT_EVERY);
            }
        })
        .expect("spawning a thread")
}

/// WAL frames from which the checkpointer, having copied them back,
/// restarts the WAL: see [`restart_wal`].
const RESTART_FROM_FRAMES: i64 = 4096;

/// How long a restart waits for the engine's transaction, and then holds
/// the engine's next one off.
const RESTART_WAIT: Duration = Duration::from_millis(200);

/// Restarts the WAL from its start, right after a passive checkpoint
/// copied back nearly all of it: only the frames of the commits since are
/// left to copy, and the engine waits for that and one small fsync.
///
/// Why: while the engine commits back to back, the WAL never restarts by
/// itself (see `ENGINE_CHECKPOINT_BYTES`), so it grew by every page a
/// catch-up wrote, 300 MB for 100k events. Writing to a file past its end
/// costs the kernel fresh page-cache pages; rewriting the start of a WAL
/// that restarted finds them cached. A fourth of the engine's time in a
/// catch-up was that copying into new pages.
fn restart_wal(conn: &Connection) {
    // A reader holding an old snapshot (a `status` command) would hold the
    // engine off: give up after a short wait instead.
    let _ = conn.busy_timeout(RESTART_WAIT);
    let _ = conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()));
    let _ = wait_for_locks(conn);
}

/// When the checkpointer copies the WAL back; see [`spawn_checkpointer`].
#[derive(Debug, Default)]
struct Pacing {
    /// The database's `data_version` at the last look.
    seen: Option<i64>,
    /// Looks skipped in a row.
    skipped: u32,
}

impl Pacing {
    /// Whether to checkpoint now, the database's `data_version` being
    /// `version` (`None` if it could not be read: then checkpoint, as
    /// before pacing) and its WAL `wal_bytes` long.
    fn due(&mut self, version: Option<i64>, wal_bytes: u64) -> bool {
        let busy = version.is_some() && self.seen.is_some() && version != self.seen;
        self.seen = version;
        if busy && self.skipped < BUSY_SKIPS && wal_bytes < SKIP_BELOW_WAL_BYTES {
            self.skipped += 1;
            return false;
        }
        self.skipped = 0;
        true
    }
}

/// Lets the engine have a core before the checkpointer: copying the WAL
/// back can wait, and on two busy cores the engine thread spent a sixth of
/// a catch-up waiting to run. Raising one's own nice value needs no
/// privilege; on failure the thread runs at the usual priority.
fn lower_this_threads_priority() {
    // With `PRIO_PROCESS`, Linux reads the id as a thread's.
    let tid = unsafe { libc::gettid() };
    unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, CHECKPOINTER_NICE) };
}

/// The checkpointer's nice value: it gets about a tenth of a core that the
/// engine also wants.
const CHECKPOINTER_NICE: libc::c_int = 10;

/// An in-memory database with the host's schema, for tests.
pub fn open_in_memory() -> rusqlite::Result<Connection> {
    let conn = Connection::open_in_memory()?;
    configure(&conn)?;
    migrate(&conn)?;
    Ok(conn)
}

/// Opens the database read-only, for CLI commands that only look.
pub fn open_read_only(data_dir: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        data_dir.join(DB_FILE),
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    wait_for_locks(&conn)?;
    Ok(conn)
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    wait_for_locks(conn)?;
    // Before the first write, or it has no effect.
    conn.pragma_update(None, "page_size", PAGE_SIZE)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // NORMAL in WAL mode is durable against process crashes; only a power
    // loss can drop the last commits.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", true)?;
    crate::storage::plugin_sql::install_authorizer(conn);
    Ok(())
}

fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    with_write_tx(conn, |conn| {
        let version: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            conn.execute_batch(sql)?;
            conn.pragma_update(None, "user_version", i + 1)?;
        }
        Ok(())
    })
}

/// Runs `f` in a `BEGIN IMMEDIATE` transaction: committed if `f` returns
/// `Ok`, rolled back otherwise.
pub fn with_write_tx<T, E: From<rusqlite::Error>>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<T, E>,
) -> Result<T, E> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    match f(conn) {
        Ok(v) => match conn.execute_batch("COMMIT") {
            Ok(()) => Ok(v),
            // A commit that fails for a full disk or an I/O error may leave
            // the transaction open, and every later BEGIN would fail.
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                Err(e.into())
            }
        },
        Err(e) => {
            // The rollback can only fail if the transaction is already gone.
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

/// Runs `f` inside a savepoint of the current transaction: released on
/// `Ok`, rolled back (undoing only what `f` wrote) on `Err`.
pub fn with_savepoint<T, E: From<rusqlite::Error>>(
    conn: &Connection,
    f: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    // One savepoint per handler call: cached, so that a catch-up storing
    // thousands of events does not parse these statements each time.
    let run = |sql| conn.prepare_cached(sql)?.execute([]).map(drop);
    run("SAVEPOINT call")?;
    let result = f();
    if result.is_err() {
        run("ROLLBACK TO call")?;
    }
    run("RELEASE call")?;
    result
}

/// Runs a plugin's migrations that this database has not run yet, in order,
/// under the guard on plugin SQL (they may not write the host's tables
/// either). Call inside a write transaction.
pub fn apply_plugin_migrations(
    conn: &Connection,
    plugin: &str,
    migrations: &[&str],
) -> Result<usize, String> {
    let applied: usize = conn
        .query_row(
            "SELECT applied FROM plugin_migrations WHERE plugin = ?",
            [plugin],
            |r| r.get(0),
        )
        .optional()
        .map_err(|e| e.to_string())?
        .unwrap_or(0);
    if applied > migrations.len() {
        return Err(format!(
            "the database has {applied} migrations of plugin '{plugin}' applied, but this build ships only {}: \
             it is older than the one that last ran here",
            migrations.len()
        ));
    }
    for (i, sql) in migrations.iter().enumerate().skip(applied) {
        crate::storage::plugin_sql::execute_migration(conn, sql)
            .map_err(|e| format!("migration {} failed: {e}", i + 1))?;
    }
    conn.execute(
        "INSERT INTO plugin_migrations(plugin, applied) VALUES (?1, ?2)
         ON CONFLICT(plugin) DO UPDATE SET applied = excluded.applied",
        rusqlite::params![plugin, migrations.len()],
    )
    .map_err(|e| e.to_string())?;
    Ok(migrations.len() - applied)
}

/// Reads one row of `host_state`.
pub fn host_state(conn: &Connection, key: &str) -> rusqlite::Result<Option<String>> {
    conn.query_row("SELECT value FROM host_state WHERE key = ?", [key], |r| {
        r.get(0)
    })
    .optional()
}

/// Sets (or, with `None`, clears) one row of `host_state`.
pub fn set_host_state(conn: &Connection, key: &str, value: Option<&str>) -> rusqlite::Result<()> {
    match value {
        Some(v) => conn.execute(
            "INSERT INTO host_state(key, value) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [key, v],
        ),
        None => conn.execute("DELETE FROM host_state WHERE key = ?", [key]),
    }
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The name of the VFS `conn`'s main database was opened with.
    fn vfs_name(conn: &Connection) -> String {
        let mut vfs: *mut rusqlite::ffi::sqlite3_vfs = std::ptr::null_mut();
        let rc = unsafe {
            rusqlite::ffi::sqlite3_file_control(
                conn.handle(),
                c"main".as_ptr(),
                rusqlite::ffi::SQLITE_FCNTL_VFS_POINTER,
                (&raw mut vfs).cast(),
            )
        };
        assert_eq!(rc, rusqlite::ffi::SQLITE_OK);
        unsafe { std::ffi::CStr::from_ptr((*vfs).zName) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn the_engine_and_cli_writers_gather_wal_writes() {
        let dir = tempfile::tempdir().unwrap();
        let engine = open_engine(dir.path()).unwrap();
        let cli = open(dir.path()).unwrap();
        let expected = crate::storage::wal_writes::VFS_NAME.to_str().unwrap();
        assert_eq!(vfs_name(&engine), expected);
        assert_eq!(vfs_name(&cli), expected);
    }

    #[test]
    fn events_stored_under_whole_hash_ids_get_time_first_ids() {
        let conn = Connection::open_in_memory().unwrap();
        for sql in &MIGRATIONS[..3] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 3).unwrap();
        let mut event = 1_700_000_000_123i64.to_be_bytes().to_vec();
        event.extend_from_slice(b"the rest of an encrypted event");
        let old_id = blake3::hash(&event).as_bytes().to_vec();
        conn.execute(
            "INSERT INTO events (event_id, network_id, created_ms, event_type, event, received_ms)
             VALUES (?1, 'net', 1700000000123, 'message', ?2, 0)",
            rusqlite::params![old_id, event],
        )
        .unwrap();

        migrate(&conn).unwrap();
        // Kept, as legacy history since migration 5.
        let id: Vec<u8> = conn
            .query_row("SELECT event_id FROM legacy_events", [], |r| r.get(0))
            .unwrap();
        assert_eq!(id, crate::crypto::event_crypto::event_id(&event));
        assert_eq!(id[8..], old_id[..24]);
    }

    #[test]
    fn events_stored_before_signatures_become_legacy_and_stay_listed() {
        let conn = Connection::open_in_memory().unwrap();
        for sql in &MIGRATIONS[..4] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 4).unwrap();
        for i in 0..3u8 {
            conn.execute(
                "INSERT INTO events (event_id, network_id, created_ms, event_type, event, received_ms)
                 VALUES (?1, 'net', ?2, 'message', x'00', 0)",
                rusqlite::params![vec![9 - i; 32], i64::from(i)],
            )
            .unwrap();
        }
        conn.execute(
            "INSERT INTO submissions (envelope, submitted_ms) VALUES (x'00', 0), (x'01', 0)",
            [],
        )
        .unwrap();

        migrate(&conn).unwrap();
        let count = |sql: &str| conn.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap();
        assert_eq!(count("SELECT COUNT(*) FROM events"), 0, "none synced again");
        assert_eq!(count("SELECT COUNT(*) FROM submissions"), 0);
        assert_eq!(
            count("SELECT value FROM counters WHERE name = 'drop_unsigned_event'"),
            2,
            "unsigned submissions are counted, not silently lost"
        );
        // Every one kept, in the order it was stored.
        let kept: Vec<(i64, i64)> = conn
            .prepare("SELECT created_ms, routed FROM legacy_events ORDER BY routed")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(kept, [(0, 1), (1, 2), (2, 3)]);
    }

    #[test]
    fn the_checkpointer_waits_for_a_pause_in_commits_but_not_for_long() {
        let mut pacing = Pacing::default();
        let small = SKIP_BELOW_WAL_BYTES - 1;
        // Nothing committed between looks: copy back at every look.
        assert!(pacing.due(Some(1), small));
        assert!(pacing.due(Some(1), small));
        // Commits between every two looks: one look in ten.
        let looks: Vec<bool> = (2..32).map(|v| pacing.due(Some(v), small)).collect();
        let due: Vec<usize> = (0..looks.len()).filter(|&i| looks[i]).collect();
        assert_eq!(due, [9, 19, 29]);
        // A pause: at once.
        assert!(pacing.due(Some(31), small));
        // A version that cannot be read: as if idle.
        assert!(pacing.due(None, small));
        assert!(pacing.due(Some(40), small));
        // A long WAL: every look, commits or not.
        assert!((41..45).all(|v| pacing.due(Some(v), SKIP_BELOW_WAL_BYTES)));
    }

    #[test]
    fn a_burst_of_commits_leaves_a_wal_cut_back_once_the_engine_pauses() {
        let dir = tempfile::tempdir().unwrap();
        let engine = open_engine(dir.path()).unwrap();
        engine.execute_batch("CREATE TABLE t(b BLOB)").unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let checkpointer = spawn_checkpointer(open(dir.path()).unwrap(), stop.clone());
        let wal_len = || {
            std::fs::metadata(dir.path().join(format!("{DB_FILE}-wal")))
                .unwrap()
                .len()
        };
        let write = |rows: usize| {
            with_write_tx(&engine, |tx| {
                for _ in 0..rows {
                    tx.execute("INSERT INTO t VALUES (?1)", [&vec![7u8; 3_000]])?;
                }
                Ok::<_, rusqlite::Error>(())
            })
            .unwrap();
        };
        // About 96 MiB (a page per row), committed back to back.
        for _ in 0..384 {
            write(64);
        }
        assert!(wal_len() > WAL_SIZE_LIMIT as u64, "{}", wal_len());
        // Once the checkpointer has copied it all back, the next commit
        // restarts the WAL and cuts the file back. (Copying 96 MiB takes a
        // while on a busy machine: a commit now and then until it has.)
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while wal_len() > WAL_SIZE_LIMIT as u64 && std::time::Instant::now() < deadline {
            thread::sleep(CHECKPOINT_EVERY);
            write(1);
        }
        assert!(wal_len() <= WAL_SIZE_LIMIT as u64, "{}", wal_len());
        stop.store(true, Ordering::SeqCst);
        checkpointer.join().unwrap();
    }

    #[test]
    fn open_is_idempotent_and_savepoint_rolls_back_only_its_part() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open(dir.path()).unwrap();
        drop(conn);
        let conn = open(dir.path()).unwrap();
        let v: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, MIGRATIONS.len() as i64);

        with_write_tx(&conn, |c| {
            set_host_state(c, "kept", Some("1"))?;
            let r: Result<(), rusqlite::Error> = with_savepoint(c, || {
                set_host_state(c, "dropped", Some("1"))?;
                Err(rusqlite::Error::InvalidQuery)
            });
            assert!(r.is_err());
            Ok::<_, rusqlite::Error>(())
        })
        .unwrap();
        assert_eq!(host_state(&conn, "kept").unwrap().as_deref(), Some("1"));
        assert_eq!(host_state(&conn, "dropped").unwrap(), None);
    }

    #[test]
    fn every_table_of_the_hosts_schema_is_closed_to_plugin_writes() {
        let conn = open_in_memory().unwrap();
        let tables: Vec<String> = conn
            .prepare(
                "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
            )
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        // The sync plugin's table of peers, which the host seeds.
        let shared = ["addresses"];
        for table in &tables {
            assert!(
                crate::storage::plugin_sql::is_host_table(table)
                    || shared.contains(&table.as_str()),
                "`{table}` is neither in plugin_sql::HOST_TABLES nor shared with plugins"
            );
        }
        assert!(tables.len() > shared.len());
    }

    #[test]
    fn plugin_migrations_may_not_write_the_hosts_tables() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open(dir.path()).unwrap();
        let m = ["CREATE TABLE p_a(x); INSERT INTO submissions(envelope, submitted_ms) VALUES (x'00', 0)"];
        let err = with_write_tx(&conn, |c| {
            apply_plugin_migrations(c, "p", &m).map_err(Box::<dyn std::error::Error>::from)
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "migration 1 failed: plugin SQL may not write the host's table `submissions`"
        );
        let left: i64 = conn
            .query_row(
                "SELECT (SELECT COUNT(*) FROM submissions) + (SELECT COUNT(*) FROM sqlite_schema WHERE name = 'p_a')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(left, 0);
    }

    #[test]
    fn plugin_migrations_run_once_and_refuse_downgrades() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open(dir.path()).unwrap();
        let m = ["CREATE TABLE a(x)", "CREATE TABLE b(x)"];
        assert_eq!(apply_plugin_migrations(&conn, "p", &m[..1]).unwrap(), 1);
        assert_eq!(apply_plugin_migrations(&conn, "p", &m).unwrap(), 1);
        assert_eq!(apply_plugin_migrations(&conn, "p", &m).unwrap(), 0);
        let err = apply_plugin_migrations(&conn, "p", &m[..1]).unwrap_err();
        assert!(err.contains("older"), "{err}");
    }
}
