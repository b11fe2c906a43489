//! `quiet-host status`: what a host is doing, read from its database.
//!
//! Status reads only SQLite (read-only, WAL), so it works whether or not the
//! host is running and never blocks it. The JSON form (`--json`) is a stable
//! schema, versioned by its `schema` field; fields may be added, never
//! renamed or removed within a schema version.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension};
use serde::Serialize;

use crate::{
    cli::{
        host::running_pid,
        terminal::{printable, short},
    },
    engine::health::{self, EngineState},
    storage::{
        counters::{self, CounterKind},
        db,
    },
};

/// The JSON schema version of [`Status`].
pub const SCHEMA: u32 = 1;

/// How much of a plugin's settings the text form shows; `--json` has all.
const SETTINGS_CHARS: usize = 100;

/// Everything `status` reports.
#[derive(Debug, Serialize)]
pub struct Status {
    /// The JSON schema version.
    pub schema: u32,
    /// The data folder.
    pub data_dir: String,
    /// The pid of the running host, if one holds the data folder.
    pub running_pid: Option<u32>,
    /// This host's peer id.
    pub peer_id: Option<String>,
    /// Where the host listens (as of its last start).
    pub listen_addr: Option<String>,
    /// The current plugin generation.
    pub generation: i64,
    /// Why the latest jobs.yaml edit was refused, if it was.
    pub config_error: Option<String>,
    /// Whether the engine's commits succeed, as it last recorded outside
    /// the database (which may be full or read-only); `null` if it never
    /// did. Added within schema 1.
    pub engine: Option<EngineState>,
    /// Plugin files, loaded or refused.
    pub plugins: Vec<PluginStatus>,
    /// Each plugin's settings from jobs.yaml, by plugin name (plugins it
    /// does not name have none); as of the last good configuration. Added
    /// within schema 1.
    pub settings: std::collections::BTreeMap<String, serde_json::Value>,
    /// Configured jobs.
    pub jobs: Vec<JobStatus>,
    /// Dead letters.
    pub dead_letters: DeadLetters,
    /// Networks, with their peers.
    pub networks: Vec<NetworkStatus>,
    /// Things dropped on purpose (bad frames, rate limits, duplicates), by
    /// reason.
    pub counters: std::collections::BTreeMap<String, i64>,
}

/// One network.
#[derive(Debug, Serialize)]
pub struct NetworkStatus {
    /// The network id.
    pub network_id: String,
    /// Events stored.
    pub events: i64,
    /// Stored events not yet routed to handlers: they wait for deps.
    pub waiting: Waiting,
    /// Its members (not counting removed ones), as this host last folded
    /// its membership events; `None` while the membership is not known
    /// (see `network members`).
    pub members: Option<i64>,
    /// Known peers.
    pub peers: Vec<PeerStatus>,
}

/// Events that wait for their deps, in one network.
#[derive(Debug, Default, Serialize)]
pub struct Waiting {
    /// How many.
    pub events: i64,
    /// Since when the oldest has waited (ms since the Unix epoch).
    pub oldest_ms: Option<i64>,
    /// The oldest's event id (hex).
    pub oldest_event_id: Option<String>,
}

/// One peer of a network.
#[derive(Debug, Serialize)]
pub struct PeerStatus {
    /// Its peer id.
    pub peer_id: String,
    /// Its address.
    pub address: String,
    /// Whether it is synced with.
    pub is_active: bool,
    /// When we last heard from it.
    pub last_seen_ms: Option<i64>,
    /// When a sync session with it last completed.
    pub last_sync_ms: Option<i64>,
    /// How long ago that was: how far behind this peer we may be.
    pub lag_ms: Option<i64>,
}

/// One plugin file.
#[derive(Debug, Serialize)]
pub struct PluginStatus {
    /// The file in the plugin folder.
    pub file: String,
    /// The plugin's name, once loaded.
    pub name: Option<String>,
    /// The plugin's version, once loaded.
    pub version: Option<String>,
    /// The generation serving now.
    pub generation: Option<i64>,
    /// When that generation loaded.
    pub loaded_at_ms: Option<i64>,
    /// Why the latest version of the file was refused.
    pub error: Option<String>,
    /// Why the watchdog disabled the build in the file (it overran the call
    /// budget); `null` while it serves. Another build of the file loads
    /// again.
    pub disabled: Option<String>,
    /// When it was disabled.
    pub disabled_at_ms: Option<i64>,
    /// While the plugin is behind in the stored events of its types (just
    /// installed, back after an absence, or `plugins replay`): how far.
    pub replay: Option<ReplayStatus>,
}

/// How far a plugin is behind in the stored events.
#[derive(Debug, Serialize)]
pub struct ReplayStatus {
    /// Stored events after the furthest-behind of its cursors.
    pub events_behind: i64,
    /// Whether `quiet-host plugins replay` asked for it and the host has
    /// not started yet.
    pub requested: bool,
}

/// One job.
#[derive(Debug, Serialize)]
pub struct JobStatus {
    /// The job's name.
    pub name: String,
    /// The handler it calls.
    pub handler: String,
    /// Its period.
    pub frequency_ms: i64,
    /// Whether it runs.
    pub enabled: bool,
    /// Its params.
    pub params: serde_json::Value,
    /// When it last ran.
    pub last_run_ms: Option<i64>,
    /// How many times it has run.
    pub run_count: i64,
    /// When it is next due.
    pub next_due_ms: Option<i64>,
    /// Why its last run failed, or why it cannot run.
    pub last_error: Option<String>,
}

/// Dead letters: a count and the newest few.
#[derive(Debug, Serialize)]
pub struct DeadLetters {
    /// All rows in the table.
    pub total: i64,
    /// The newest rows, newest first.
    pub recent: Vec<DeadLetter>,
}

/// One dead letter.
#[derive(Debug, Serialize)]
pub struct DeadLetter {
    /// Its row id.
    pub id: i64,
    /// When it was recorded.
    pub at_ms: i64,
    /// The plugin involved, if any.
    pub plugin: Option<String>,
    /// The handler (or job, or host component) involved.
    pub handler: String,
    /// Why.
    pub reason: String,
    /// The envelope.
    pub envelope: serde_json::Value,
}

/// Reads the status of the host whose data folder is `data_dir`.
pub fn read(data_dir: &Path, recent_dead_letters: usize) -> Result<Status, String> {
    if !data_dir.join(db::DB_FILE).exists() {
        return Err(format!(
            "{}: no quiet-host database here (run `quiet-host run --data {}` first)",
            data_dir.display(),
            data_dir.display()
        ));
    }
    let conn = db::open_read_only(data_dir)
        .map_err(|e| format!("{}: {e}", data_dir.join(db::DB_FILE).display()))?;
    read_from(&conn, data_dir, recent_dead_letters)
        .map_err(|e| format!("{}: {e}", data_dir.display()))
}

fn read_from(conn: &Connection, data_dir: &Path, recent: usize) -> rusqlite::Result<Status> {
    // One read transaction: a consistent snapshot of a host that keeps writing.
    conn.execute_batch("BEGIN")?;
    let plugins = conn
        .prepare(
            "SELECT file, name, version, generation, loaded_at_ms, error, disabled, disabled_at_ms
             FROM plugins ORDER BY file",
        )?
        .query_map([], |r| {
            Ok(PluginStatus {
                file: r.get(0)?,
                name: r.get(1)?,
                version: r.get(2)?,
                generation: r.get(3)?,
                loaded_at_ms: r.get(4)?,
                error: r.get(5)?,
                disabled: r.get(6)?,
                disabled_at_ms: r.get(7)?,
                replay: None,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut plugins = plugins;
    for p in &mut plugins {
        if let Some(name) = &p.name {
            p.replay = missing_table_is_empty(read_replay(conn, name))?;
        }
    }
    let jobs = conn
        .prepare(
            "SELECT c.job_name, c.handler, c.frequency_ms, c.enabled, c.params, r.last_run_ms,
                    COALESCE(r.run_count, 0), c.last_error
             FROM job_config c LEFT JOIN job_runs r ON r.job_name = c.job_name ORDER BY c.job_name",
        )?
        .query_map([], |r| {
            let frequency_ms: i64 = r.get(2)?;
            let enabled: bool = r.get(3)?;
            let last_run_ms: Option<i64> = r.get(5)?;
            let params: String = r.get(4)?;
            Ok(JobStatus {
                name: r.get(0)?,
                handler: r.get(1)?,
                frequency_ms,
                enabled,
                params: serde_json::from_str(&params).unwrap_or(serde_json::Value::Null),
                next_due_ms: enabled
                    .then(|| last_run_ms.map_or_else(db::now_ms, |l| l + frequency_ms)),
                last_run_ms,
                run_count: r.get(6)?,
                last_error: r.get(7)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let total = conn.query_row("SELECT COUNT(*) FROM dead_letters", [], |r| r.get(0))?;
    let recent = conn
        .prepare("SELECT id, at_ms, plugin, handler, reason, envelope FROM dead_letters ORDER BY id DESC LIMIT ?")?
        .query_map([recent as i64], |r| {
            let envelope: String = r.get(5)?;
            Ok(DeadLetter {
                id: r.get(0)?,
                at_ms: r.get(1)?,
                plugin: r.get(2)?,
                handler: r.get(3)?,
                reason: r.get(4)?,
                envelope: serde_json::from_str(&envelope).unwrap_or(serde_json::Value::String(envelope)),
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let networks = read_networks(conn)?;
    let counters = conn
        .prepare("SELECT name, value FROM counters ORDER BY name")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let status = Status {
        schema: SCHEMA,
        data_dir: data_dir.display().to_string(),
        running_pid: running_pid(data_dir),
        peer_id: db::host_state(conn, "peer_id")?,
        listen_addr: db::host_state(conn, "listen_addr")?,
        generation: plugins
            .iter()
            .filter_map(|p| p.generation)
            .max()
            .unwrap_or(0),
        config_error: db::host_state(conn, "config_error")?,
        engine: health::read(data_dir),
        plugins,
        settings: db::host_state(conn, "settings")?
            .and_then(|json| serde_json::from_str(&json).ok())
            .unwrap_or_default(),
        jobs,
        dead_letters: DeadLetters { total, recent },
        networks,
        counters,
    };
    conn.execute_batch("COMMIT")?;
    Ok(status)
}

/// `result`, or `None` if it failed for a table a host that has not run
/// since an upgrade has yet to create: status reads without migrating.
fn missing_table_is_empty<T>(result: rusqlite::Result<Option<T>>) -> rusqlite::Result<Option<T>> {
    match result {
        Err(e) if e.to_string().contains("no such table") => Ok(None),
        other => other,
    }
}

/// How far `plugin` is behind; `None` when it is caught up.
fn read_replay(conn: &Connection, plugin: &str) -> rusqlite::Result<Option<ReplayStatus>> {
    let requested: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM replay_requests WHERE plugin = ?1)",
        [plugin],
        |r| r.get(0),
    )?;
    let behind: i64 = conn.query_row(
        "SELECT COUNT(*) FROM events
         WHERE routed > (SELECT MIN(offered) FROM plugin_cursors WHERE plugin = ?1)",
        [plugin],
        |r| r.get(0),
    )?;
    Ok((requested || behind > 0).then_some(ReplayStatus {
        events_behind: behind,
        requested,
    }))
}

fn read_networks(conn: &Connection) -> rusqlite::Result<Vec<NetworkStatus>> {
    let ids: Vec<(String, i64)> = conn
        .prepare(
            "SELECT n.network_id, (SELECT COUNT(*) FROM events e WHERE e.network_id = n.network_id)
             FROM networks n ORDER BY n.network_id",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut peers = conn.prepare(
        "SELECT peer_id, ip, port, is_active, last_seen_ms, last_sync_ms FROM addresses
         WHERE network_id = ? ORDER BY peer_id",
    )?;
    let mut waiting = missing_table_is_empty(
        conn.prepare(
            "SELECT COUNT(DISTINCT event_id), MIN(since_ms),
                    (SELECT event_id FROM event_waits w2 WHERE w2.network_id = ?1
                     ORDER BY since_ms, event_id LIMIT 1)
             FROM event_waits WHERE network_id = ?1",
        )
        .map(Some),
    )?;
    let mut members = missing_table_is_empty(
        conn.prepare(
            "SELECT (SELECT COUNT(*) FROM membership_roles m WHERE m.network_id = ?1 AND m.role != 'removed')
             FROM membership WHERE network_id = ?1 AND genesis IS NOT NULL",
        )
        .map(Some),
    )?;
    ids.into_iter()
        .map(|(network_id, events)| {
            let members = match &mut members {
                Some(stmt) => stmt.query_row([&network_id], |r| r.get(0)).optional()?,
                None => None,
            };
            let waiting = match &mut waiting {
                Some(stmt) => stmt.query_row([&network_id], |r| {
                    Ok(Waiting {
                        events: r.get(0)?,
                        oldest_ms: r.get(1)?,
                        oldest_event_id: r.get::<_, Option<Vec<u8>>>(2)?.map(hex::encode),
                    })
                })?,
                None => Waiting::default(),
            };
            let peers = peers
                .query_map([&network_id], |r| {
                    Ok(PeerStatus {
                        peer_id: r.get(0)?,
                        address: format!("{}:{}", r.get::<_, String>(1)?, r.get::<_, i64>(2)?),
                        is_active: r.get(3)?,
                        last_seen_ms: r.get(4)?,
                        last_sync_ms: r.get(5)?,
                        lag_ms: r.get::<_, Option<i64>>(5)?.map(|t| db::now_ms() - t),
                    })
                })?
                .collect::<Result<_, _>>()?;
            Ok(NetworkStatus {
                network_id,
                events,
                waiting,
                members,
                peers,
            })
        })
        .collect()
}

/// The human-readable, one-screen form.
pub fn render(s: &Status) -> String {
    use std::fmt::Write;
    let now = db::now_ms();
    let mut out = String::new();
    let state = match s.running_pid {
        Some(pid) => format!("running (pid {pid})"),
        None => "not running".into(),
    };
    let _ = writeln!(out, "quiet-host {state}  data {}", s.data_dir);
    let engine = match &s.engine {
        Some(e) if e.cannot_commit() => format!(
            "CANNOT COMMIT since {}: {}{}",
            relative(e.since_ms, now),
            printable(e.error.as_deref().unwrap_or("?")),
            if s.running_pid.is_none() {
                " (when it stopped)"
            } else {
                ""
            }
        ),
        Some(_) => "ok".into(),
        None => "-".into(),
    };
    let _ = writeln!(out, "engine     {engine}");
    let _ = writeln!(out, "peer id    {}", s.peer_id.as_deref().unwrap_or("-"));
    let _ = writeln!(
        out,
        "listening  {}",
        s.listen_addr.as_deref().unwrap_or("no")
    );
    let _ = writeln!(
        out,
        "jobs.yaml  {}",
        s.config_error
            .as_deref()
            .map_or("ok".to_string(), |e| format!("REFUSED: {}", printable(e)))
    );

    let _ = writeln!(out, "\nPLUGINS (generation {})", s.generation);
    if s.plugins.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for p in &s.plugins {
        let file = Path::new(&p.file)
            .file_name()
            .map_or(p.file.clone(), |f| f.to_string_lossy().into());
        let serving = match (&p.name, p.generation, &p.disabled) {
            (Some(name), _, Some(_)) => format!("{} disabled", printable(name)),
            (Some(name), Some(g), None) => format!(
                "{} {} gen {g}",
                printable(name),
                printable(p.version.as_deref().unwrap_or("?"))
            ),
            _ => "not loaded".into(),
        };
        let _ = writeln!(out, "  {:<28} {serving}", printable(&file));
        if let Some(e) = &p.error {
            let _ = writeln!(out, "  {:<28} REFUSED: {}", "", printable(e));
        }
        if let Some(why) = &p.disabled {
            let _ = writeln!(
                out,
                "  {:<28} DISABLED: {}; install another build to load it again",
                "",
                printable(why)
            );
        }
        if let Some(r) = &p.replay {
            let asked = if r.requested {
                " (replay asked, not started)"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "  {:<28} replaying: {} stored events to go{asked}",
                "", r.events_behind
            );
        }
    }

    if !s.settings.is_empty() {
        let _ = writeln!(out, "\nSETTINGS");
    }
    for (plugin, settings) in &s.settings {
        let loaded = s
            .plugins
            .iter()
            .any(|p| p.name.as_ref() == Some(plugin) && p.disabled.is_none());
        let text = settings.to_string();
        let cut = text.chars().count() > SETTINGS_CHARS;
        let _ = writeln!(
            out,
            "  {:<28} {}{}{}",
            printable(plugin),
            short(&text, SETTINGS_CHARS),
            if cut { "…" } else { "" },
            if loaded { "" } else { "  (not loaded)" }
        );
    }

    let _ = writeln!(out, "\nJOBS");
    if s.jobs.is_empty() {
        let _ = writeln!(out, "  (none)");
    } else {
        let _ = writeln!(
            out,
            "  {:<22} {:<14} {:>8} {:>6} {:>12} {:>12}",
            "NAME", "HANDLER", "EVERY", "RUNS", "LAST RUN", "NEXT"
        );
    }
    for j in &s.jobs {
        let next = match (j.enabled, j.next_due_ms) {
            (false, _) => "disabled".into(),
            // A stopped host runs nothing: its jobs run when it starts.
            (true, _) if s.running_pid.is_none() => "at start".into(),
            (true, Some(t)) if t <= now => "due now".into(),
            (true, Some(t)) => relative(t, now),
            (true, None) => "-".into(),
        };
        let _ = writeln!(
            out,
            "  {:<22} {:<14} {:>8} {:>6} {:>12} {:>12}",
            printable(&j.name),
            printable(&j.handler),
            format!("{}ms", j.frequency_ms),
            j.run_count,
            j.last_run_ms.map_or("never".into(), |t| relative(t, now)),
            next
        );
        if let Some(e) = &j.last_error {
            let _ = writeln!(out, "  {:<22} ERROR: {}", "", printable(e));
        }
    }

    let _ = writeln!(out, "\nNETWORKS");
    if s.networks.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for n in &s.networks {
        let _ = writeln!(
            out,
            "  {}  {} events  {} peers  {}",
            printable(&n.network_id),
            n.events,
            n.peers.len(),
            n.members
                .map_or("membership not yet known".into(), |m| format!(
                    "{m} member{}",
                    if m == 1 { "" } else { "s" }
                ))
        );
        if n.waiting.events > 0 {
            let since = n.waiting.oldest_ms.map_or("?".into(), |t| relative(t, now));
            let _ = writeln!(
                out,
                "    WAITING {} events on missing deps, the oldest from {since}",
                n.waiting.events
            );
        }
        for p in &n.peers {
            let _ = writeln!(
                out,
                "    {}  {:<21} last sync {}",
                short(&p.peer_id, 16),
                printable(&p.address),
                p.last_sync_ms.map_or("never".into(), |t| relative(t, now))
            );
        }
    }
    for (title, of_kind) in [
        ("TRAFFIC", CounterKind::Traffic),
        ("DROPPED", CounterKind::Dropped),
        ("COUNTERS", CounterKind::Other),
    ] {
        let mut rows = s
            .counters
            .iter()
            .filter(|(name, _)| counters::kind(name) == of_kind);
        if let Some(first) = rows.next() {
            let _ = writeln!(out, "\n{title}");
            for (name, n) in std::iter::once(first).chain(rows) {
                let _ = writeln!(out, "  {:<40} {n}", printable(name));
            }
        }
    }

    let _ = writeln!(
        out,
        "\nDEAD LETTERS ({} total{})",
        s.dead_letters.total,
        if s.dead_letters.recent.is_empty() {
            ""
        } else {
            ", newest first"
        }
    );
    for d in &s.dead_letters.recent {
        let _ = writeln!(
            out,
            "  #{:<5} {:>10}  {}/{}: {}",
            d.id,
            relative(d.at_ms, now),
            printable(d.plugin.as_deref().unwrap_or("host")),
            printable(&d.handler),
            printable(&d.reason)
        );
    }
    out
}

fn relative(t: i64, now: i64) -> String {
    let d = t - now;
    let secs = d.abs() as f64 / 1000.0;
    let amount = if secs < 120.0 {
        format!("{secs:.1}s")
    } else if secs < 7200.0 {
        format!("{:.0}m", secs / 60.0)
    } else {
        format!("{:.1}h", secs / 3600.0)
    };
    if d <= 0 {
        format!("{amount} ago")
    } else {
        format!("in {amount}")
    }
}
