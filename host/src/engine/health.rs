//! Whether the engine can commit, kept where `status` can see it when the
//! database cannot be written.
//!
//! A full disk or a read-only database fails every unit of work at its
//! commit. The engine then says so once in the log, stops running units
//! (each would be rolled back, and plugins' memory would run ahead of the
//! database), and probes with an empty write instead, every 200 ms at
//! first and at least once a second, so that work resumes within a second
//! of space returning.
//!
//! The state lives in `<data>/engine.state`, one JSON object padded to a
//! fixed size. A row in SQLite could not be written, and a new file (a
//! temporary one renamed over the old) needs a free inode and block on a
//! full disk: this file is made at its full size while the disk still has
//! room, and each change overwrites it in place, which needs no new space.
//! A write that fails anyway (a read-only file system, one that copies on
//! write) is tried again at each probe; the engine keeps the state in
//! memory meanwhile. `status` reads it with the database.

use std::{
    fs::{File, OpenOptions},
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use rusqlite::{Connection, ErrorCode};
use serde::{Deserialize, Serialize};

use crate::storage::db;

/// The state file's name inside the data folder.
pub const STATE_FILE: &str = "engine.state";

/// The state file's fixed size: every record is padded to it.
const RECORD_LEN: usize = 1024;

/// The longest error kept in the record, in bytes.
const MAX_ERROR_LEN: usize = 512;

/// The first wait between probes; it doubles up to [`MAX_PROBE_WAIT`].
const FIRST_PROBE_WAIT: Duration = Duration::from_millis(200);

/// The longest wait between probes: how late work may resume once the
/// database can commit again.
const MAX_PROBE_WAIT: Duration = Duration::from_secs(1);

/// How often the log is reminded that commits still fail: an operator who
/// looks at the log later finds a line near its end, at 12 lines an hour.
const REMINDER_EVERY_MS: i64 = 5 * 60 * 1000;

/// What `status` reads: whether the engine's commits succeed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineState {
    /// `"ok"` or `"cannot_commit"`.
    pub state: String,
    /// Since when (Unix milliseconds).
    pub since_ms: i64,
    /// Why it cannot commit; `null` when it can.
    pub error: Option<String>,
}

impl EngineState {
    const OK: &str = "ok";
    const CANNOT_COMMIT: &str = "cannot_commit";

    /// Whether commits fail.
    pub fn cannot_commit(&self) -> bool {
        self.state == Self::CANNOT_COMMIT
    }
}

/// Reads the state the engine of the host in `data_dir` last recorded;
/// `None` if there is none, or it cannot be read.
pub fn read(data_dir: &Path) -> Option<EngineState> {
    // The engine overwrites the record in place: a read that meets a write
    // halfway does not parse, and the next one does.
    (0..3).find_map(|_| {
        let bytes = std::fs::read(data_dir.join(STATE_FILE)).ok()?;
        serde_json::from_slice(bytes.trim_ascii()).ok()
    })
}

/// Whether `e` says the database cannot take writes at all, rather than
/// that one unit's statement failed.
pub fn is_commit_failure(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(
            ErrorCode::DiskFull
                | ErrorCode::SystemIoFailure
                | ErrorCode::ReadOnly
                | ErrorCode::CannotOpen
                | ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::DatabaseCorrupt
                | ErrorCode::NotADatabase
                | ErrorCode::PermissionDenied
                | ErrorCode::FileLockingProtocolFailed
        )
    )
}

/// An empty write: it commits only if the database can take writes again.
pub fn probe(conn: &Connection) -> rusqlite::Result<()> {
    db::with_write_tx(conn, |c| {
        // Dirties a page, so the commit writes to the WAL; leaves nothing.
        db::set_host_state(c, "commit_probe", Some("1"))?;
        db::set_host_state(c, "commit_probe", None)
    })
}

/// The engine's side: the state, its file, and when to probe next.
pub struct Health {
    state: EngineState,
    /// The state file, once it could be opened.
    file: Option<File>,
    path: Option<PathBuf>,
    /// Whether the file holds `state`.
    written: bool,
    /// The next wait between probes.
    probe_wait: Duration,
    /// When the log last said that commits fail.
    logged_ms: i64,
}

impl Health {
    /// The health of an engine on `conn`'s database. A state file that
    /// says commits fail is believed (a replacement engine, or a host
    /// restarted, probes before it runs anything); a missing one is made
    /// now, while there may be room, and says ok.
    pub fn new(conn: &Connection) -> Self {
        // An in-memory database (tests, the simulator) has no folder.
        let path = conn
            .path()
            .filter(|p| !p.is_empty())
            .and_then(|p| Path::new(p).parent().map(|d| d.join(STATE_FILE)));
        let recorded = path
            .as_deref()
            .and_then(Path::parent)
            .and_then(read)
            .filter(EngineState::cannot_commit);
        let mut health = Self {
            written: recorded.is_some(),
            state: recorded.unwrap_or_else(|| EngineState {
                state: EngineState::OK.into(),
                since_ms: db::now_ms(),
                error: None,
            }),
            file: None,
            path,
            probe_wait: FIRST_PROBE_WAIT,
            logged_ms: db::now_ms(),
        };
        health.write();
        health
    }

    /// Whether commits fail: then the engine probes instead of working.
    pub fn cannot_commit(&self) -> bool {
        self.state.cannot_commit()
    }

    /// A unit (or a probe) failed with `e`, which [`is_commit_failure`]
    /// accepts. Logs when commits start failing, when the reason changes,
    /// and every few minutes; returns how long to wait before probing.
    pub fn failed(&mut self, e: &rusqlite::Error) -> Duration {
        let now = db::now_ms();
        let mut error = e.to_string();
        if error.len() > MAX_ERROR_LEN {
            let cut = (0..=MAX_ERROR_LEN)
                .rev()
                .find(|&i| error.is_char_boundary(i))
                .unwrap_or(0);
            error.truncate(cut);
        }
        if !self.cannot_commit() {
            tracing::error!(
                "engine: cannot commit: {error}; nothing runs until the database takes writes again \
                 (tried every second at most)"
            );
            self.set(EngineState {
                state: EngineState::CANNOT_COMMIT.into(),
                since_ms: now,
                error: Some(error),
            });
            self.probe_wait = FIRST_PROBE_WAIT;
            self.logged_ms = now;
        } else if self.state.error.as_deref() != Some(&error) {
            tracing::error!("engine: still cannot commit, now: {error}");
            self.state.error = Some(error);
            self.written = false;
            self.logged_ms = now;
        } else if now - self.logged_ms >= REMINDER_EVERY_MS {
            tracing::warn!(
                "engine: still cannot commit, for {}s: {error}",
                (now - self.state.since_ms) / 1000
            );
            self.logged_ms = now;
        }
        self.write();
        let wait = self.probe_wait;
        self.probe_wait = (wait * 2).min(MAX_PROBE_WAIT);
        wait
    }

    /// A probe committed: work resumes.
    pub fn recovered(&mut self) {
        let now = db::now_ms();
        tracing::info!(
            "engine: commits succeed again, after {:.1}s; work resumes",
            (now - self.state.since_ms) as f64 / 1000.0
        );
        self.set(EngineState {
            state: EngineState::OK.into(),
            since_ms: now,
            error: None,
        });
        self.write();
    }

    fn set(&mut self, state: EngineState) {
        self.state = state;
        self.written = false;
    }

    /// Writes the state to its file if the file does not hold it yet; on
    /// failure, the next call tries again.
    fn write(&mut self) {
        if self.written {
            return;
        }
        let Some(path) = &self.path else {
            return;
        };
        if self.file.is_none() {
            self.file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .ok();
        }
        let Some(file) = &self.file else {
            return;
        };
        let mut record = serde_json::to_vec(&self.state).unwrap_or_default();
        record.resize(RECORD_LEN - 1, b' ');
        record.push(b'\n');
        self.written = file.write_all_at(&record, 0).is_ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            Some("database or disk is full".into()),
        )
    }

    #[test]
    fn the_state_file_follows_the_engine_and_a_new_engine_believes_it() {
        let dir = tempfile::tempdir().unwrap();
        let conn = db::open(dir.path()).unwrap();
        let mut health = Health::new(&conn);
        let len = || {
            std::fs::metadata(dir.path().join(STATE_FILE))
                .unwrap()
                .len()
        };
        assert_eq!(len(), RECORD_LEN as u64, "made at its full size");
        assert!(!read(dir.path()).unwrap().cannot_commit());

        let waits: Vec<u128> = (0..5).map(|_| health.failed(&full()).as_millis()).collect();
        assert_eq!(waits, [200, 400, 800, 1000, 1000]);
        let s = read(dir.path()).unwrap();
        assert!(s.cannot_commit(), "{s:?}");
        assert_eq!(s.error.as_deref(), Some("database or disk is full"));
        assert_eq!(len(), RECORD_LEN as u64, "overwritten in place");

        // A replacement engine starts where this one was.
        let again = Health::new(&conn);
        assert!(again.cannot_commit());
        assert_eq!(read(dir.path()).unwrap(), s);

        health.recovered();
        assert!(!read(dir.path()).unwrap().cannot_commit());
        assert!(!Health::new(&conn).cannot_commit());
    }

    #[test]
    fn only_errors_of_the_database_itself_stop_the_engine() {
        assert!(is_commit_failure(&full()));
        assert!(!is_commit_failure(&rusqlite::Error::InvalidQuery));
        let conn = db::open_in_memory().unwrap();
        let syntax = conn.execute_batch("SELEKT").unwrap_err();
        assert!(!is_commit_failure(&syntax), "{syntax}");
        probe(&conn).unwrap();
        assert_eq!(db::host_state(&conn, "commit_probe").unwrap(), None);
    }
}
