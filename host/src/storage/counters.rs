//! Counters of things the host dropped on purpose (malformed frames,
//! unknown responses, failed seals, oversized frames, overload) and of
//! traffic (`net_frames_sent`, `net_bytes_sent`, `net_frames_received`,
//! `net_bytes_received`: bytes on the wire, length prefixes included).
//!
//! Network threads have no database connection, and a flood must not turn
//! into a flood of writes, so counts gather in memory and the engine thread
//! adds them to the `counters` table once per tick.

use std::{collections::HashMap, sync::Mutex};

use rusqlite::Connection;

/// In-memory counts waiting to be flushed.
#[derive(Default)]
pub struct Counters(Mutex<HashMap<&'static str, i64>>);

impl Counters {
    /// Counts one `name`.
    pub fn bump(&self, name: &'static str) {
        self.add(name, 1);
    }

    /// Counts `n` more of `name`.
    pub fn add(&self, name: &'static str, n: i64) {
        *self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name)
            .or_default() += n;
    }

    /// Whether nothing is waiting to be flushed.
    pub fn is_empty(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
    }

    /// Takes the pending counts, to be written with [`write()`]; give them
    /// back with [`restore`](Self::restore) if that transaction fails.
    pub fn take(&self) -> Pending {
        Pending(std::mem::take(
            &mut *self.0.lock().unwrap_or_else(|e| e.into_inner()),
        ))
    }

    /// Puts counts that could not be written back with those counted since,
    /// so that a failed commit (a full disk) loses none of them.
    pub fn restore(&self, pending: Pending) {
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for (name, n) in pending.0 {
            *counts.entry(name).or_default() += n;
        }
    }
}

/// Counts taken from [`Counters`] on their way to the table.
#[derive(Debug, Default)]
pub struct Pending(HashMap<&'static str, i64>);

/// Adds `pending` to the `counters` table, inside the caller's transaction.
pub fn write(conn: &Connection, pending: &Pending) -> rusqlite::Result<()> {
    for (name, n) in &pending.0 {
        add(conn, name, *n)?;
    }
    Ok(())
}

/// Adds `n` to counter `name`.
pub fn add(conn: &Connection, name: &str, n: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO counters(name, value) VALUES (?1, ?2)
         ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
    )?
    .execute(rusqlite::params![name, n])?;
    Ok(())
}

/// What a counter counts, told by its name, so that readers (`status`, the
/// demo) do not list traffic as losses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterKind {
    /// Bytes and frames on the wire: `net_…`.
    Traffic,
    /// Something refused or lost on purpose: `drop_…`, and names that say
    /// `rejected`, `replayed`, `rate_limited`, `unknown` or `failed` (the
    /// sync plugin's `sync_rejected_request`, the network's `send_failed`).
    Dropped,
    /// Anything else: duplicates stored once, sessions that found the sets
    /// equal, and plugins' own counts.
    Other,
}

/// The kind of counter `name`; see [`CounterKind`].
pub fn kind(name: &str) -> CounterKind {
    const DROPPED: &[&str] = &["rejected", "replayed", "rate_limited", "unknown", "failed"];
    if name.starts_with("net_") {
        CounterKind::Traffic
    } else if name.starts_with("drop_") || DROPPED.iter().any(|w| name.contains(w)) {
        CounterKind::Dropped
    } else {
        CounterKind::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traffic_is_not_counted_as_dropped() {
        for (name, want) in [
            ("net_bytes_sent", CounterKind::Traffic),
            ("net_frames_received", CounterKind::Traffic),
            ("drop_bad_seal", CounterKind::Dropped),
            ("send_failed", CounterKind::Dropped),
            ("sync_rejected_request", CounterKind::Dropped),
            ("sync_replayed_request", CounterKind::Dropped),
            ("sync_rate_limited", CounterKind::Dropped),
            ("sync_unknown_response", CounterKind::Dropped),
            ("duplicate_events", CounterKind::Other),
            ("sync_sets_equal", CounterKind::Other),
        ] {
            assert_eq!(kind(name), want, "{name}");
        }
    }

    #[test]
    fn counts_given_back_after_a_failed_write_join_those_counted_since() {
        let counters = Counters::default();
        counters.add("drop_bad_seal", 3);
        let pending = counters.take();
        assert!(counters.is_empty());
        counters.bump("drop_bad_seal");
        counters.restore(pending);
        assert_eq!(counters.take().0.get("drop_bad_seal"), Some(&4));
    }
}
