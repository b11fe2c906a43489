//! Hot reload: keeps the running host in step with the plugin folder and
//! `jobs.yaml`.
//!
//! We watch the two *folders*, not the files: cargo replaces a rebuilt
//! library by delete-and-link and editors save by rename, and a watch on the
//! file itself goes silent after the first such replace. Events are
//! debounced, and a cheap poll (a `stat` per file each second) backs the
//! watcher up, so a missed event costs at most a second. A file is reloaded
//! only when its content hash changes.
//!
//! A new or changed library is loaded from a private copy, checked (ABI,
//! name and handler clashes, its SQL migrations), and only then swapped in
//! with the other plugins as a new [`Registry`] generation. A library that
//! fails any of this is refused with one line, and whatever generation was
//! serving keeps serving. An invalid `jobs.yaml` is refused with its line,
//! and the last good configuration keeps running, plugin settings included.
//! Settings for a plugin that is not loaded are kept, with one warning: it
//! may be installed later.
//!
//! Builds the watchdog disabled are recorded in the `plugins` table and
//! dropped from what this reloader serves; the same build is not loaded
//! again (until the host restarts), another build of the file is.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    path::{Path, PathBuf},
    sync::{mpsc::SyncSender, Arc},
    time::SystemTime,
};

use arc_swap::ArcSwap;
use rusqlite::Connection;

use crate::{
    encoding::json::value_to_json,
    engine::{
        inbox::Signal,
        jobs::{self, JobsConfig},
    },
    plugins::{
        handler::CallError,
        loader::{self, hash_bytes, LoadedPlugin},
        registry::{Disabled, Plugins, Registry},
    },
    storage::db,
};

/// What a file looked like when we last read it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    #[cfg(unix)]
    inode: u64,
}

impl Stamp {
    fn of(path: &Path) -> Option<Stamp> {
        let m = fs::metadata(path).ok()?;
        Some(Stamp {
            len: m.len(),
            modified: m.modified().ok(),
            #[cfg(unix)]
            inode: std::os::unix::fs::MetadataExt::ino(&m),
        })
    }
}

/// Where the reloader finds things and whom it tells.
pub struct ReloadPaths {
    /// The plugin folder.
    pub plugins_dir: PathBuf,
    /// Where private copies of libraries are made before loading.
    pub cache_dir: PathBuf,
    /// The job configuration file.
    pub jobs_path: PathBuf,
}

/// Brings the registry and job configuration in line with the disk.
pub struct Reloader {
    paths: ReloadPaths,
    conn: Connection,
    plugins: Plugins,
    config: Arc<ArcSwap<JobsConfig>>,
    wake: SyncSender<Signal>,
    /// Plugins serving now, by file.
    loaded: BTreeMap<PathBuf, Arc<LoadedPlugin>>,
    /// The last content examined per file, loaded or refused.
    seen: HashMap<PathBuf, (Stamp, String)>,
    config_seen: Option<(Stamp, String)>,
    generation: u64,
    /// How many of [`Plugins::disabled`] are recorded.
    disabled_recorded: usize,
    /// Plugins named under `settings:` that were warned about as not loaded.
    warned_settings: BTreeSet<String>,
}

impl Reloader {
    /// A reloader over `conn`. Nothing is loaded until [`Reloader::sync`].
    pub fn new(
        paths: ReloadPaths,
        conn: Connection,
        plugins: Plugins,
        config: Arc<ArcSwap<JobsConfig>>,
        wake: SyncSender<Signal>,
    ) -> rusqlite::Result<Self> {
        // Rows describe the files of the running host only.
        conn.execute("DELETE FROM plugins", [])?;
        // Private copies left by a host that died mid-load.
        let _ = fs::remove_dir_all(&paths.cache_dir);
        Ok(Self {
            paths,
            conn,
            plugins,
            config,
            wake,
            loaded: BTreeMap::new(),
            seen: HashMap::new(),
            config_seen: None,
            generation: 0,
            disabled_recorded: 0,
            warned_settings: BTreeSet::new(),
        })
    }

    /// Looks at the plugin folder and `jobs.yaml`, and applies any change.
    pub fn sync(&mut self) {
        self.sync_disabled();
        let plugins_changed = self.sync_plugins().unwrap_or_else(|e| {
            tracing::error!("reload: {e}");
            false
        });
        let config_changed = self.sync_config();
        self.warn_unloaded_settings();
        if plugins_changed || config_changed {
            // A full queue means the engine is busy and will look anyway;
            // a closed one means it is shutting down.
            let _ = self.wake.try_send(Signal::Wake);
        }
    }

    /// Loads the configuration for start-up; unlike later edits, a bad file
    /// here is an error for the caller.
    pub fn initial_config(&mut self) -> Result<(), jobs::ConfigError> {
        let (config, text) = jobs::load(&self.paths.jobs_path)?;
        let stamp = Stamp::of(&self.paths.jobs_path);
        self.apply_config(config).map_err(|e| jobs::ConfigError {
            path: self.paths.jobs_path.clone(),
            line: None,
            column: None,
            message: format!("cannot record the configuration: {e}"),
        })?;
        self.config_seen = stamp.map(|s| (s, hash_bytes(text.as_bytes())));
        Ok(())
    }

    /// Records builds the watchdog disabled since the last look, and stops
    /// serving them (the current generation already left them out).
    fn sync_disabled(&mut self) {
        let disabled = self.plugins.disabled();
        for d in &disabled[self.disabled_recorded.min(disabled.len())..] {
            if self.loaded.get(&d.file).is_some_and(|p| p.hash == d.hash) {
                self.loaded.remove(&d.file);
            }
            self.record_disabled(d);
        }
        self.disabled_recorded = disabled.len();
    }

    fn sync_plugins(&mut self) -> std::io::Result<bool> {
        // The watchdog swaps in generations too, when it disables a build.
        self.generation = self.generation.max(self.plugins.current().generation);
        let mut files: Vec<PathBuf> = fs::read_dir(&self.paths.plugins_dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| loader::is_plugin_file(p) && p.is_file())
            .collect();
        files.sort();
        let mut changed = false;

        let gone: Vec<PathBuf> = self
            .loaded
            .keys()
            .filter(|p| !files.contains(p))
            .cloned()
            .collect();
        for path in gone {
            let plugin = self.loaded.remove(&path).expect("listed above");
            tracing::info!(file = %path.display(), "plugin '{}' removed; its handlers stop", plugin.name);
            changed = true;
        }
        self.seen.retain(|p, _| files.contains(p));
        self.forget_rows_except(&files);

        for path in files {
            let Some(stamp) = Stamp::of(&path) else {
                continue;
            };
            if self.seen.get(&path).is_some_and(|(s, _)| *s == stamp) {
                continue;
            }
            let Ok(bytes) = fs::read(&path) else { continue };
            let hash = hash_bytes(&bytes);
            let same = self.seen.get(&path).is_some_and(|(_, h)| *h == hash);
            self.seen.insert(path.clone(), (stamp, hash.clone()));
            if same {
                continue;
            }
            if let Some(d) = self
                .plugins
                .disabled()
                .into_iter()
                .find(|d| d.is(&path, &hash))
            {
                tracing::warn!(file = %path.display(), "plugin not loaded: this build is disabled: {}", d.reason);
                self.record_disabled(&d);
                continue;
            }
            changed |= self.load_one(&path, &bytes);
        }

        if changed {
            // A file refused for a clash, or by a migration that the new
            // generation may no longer block, gets another look.
            let loaded = &self.loaded;
            self.seen.retain(|p, _| loaded.contains_key(p));
            self.generation += 1;
            let registry = Registry::new(self.generation, self.loaded.values().cloned().collect());
            tracing::info!(
                generation = self.generation,
                plugins = registry.plugins.len(),
                "plugin generation swapped in"
            );
            self.plugins.swap(registry);
        }
        Ok(changed)
    }

    /// Loads and checks one file; on success it replaces what that file
    /// served before. Returns whether the served set changed.
    fn load_one(&mut self, path: &Path, bytes: &[u8]) -> bool {
        let generation = self.generation + 1;
        let result = loader::load_bytes(path, bytes, &self.paths.cache_dir, generation)
            .map_err(|e| e.cause)
            .and_then(|plugin| {
                let others: Vec<Arc<LoadedPlugin>> = self
                    .loaded
                    .iter()
                    .filter(|(p, _)| p.as_path() != path)
                    .map(|(_, l)| l.clone())
                    .collect();
                if let Some(clash) = Registry::conflict(&plugin, &others) {
                    return Err(clash);
                }
                db::with_write_tx(&self.conn, |c| {
                    db::apply_plugin_migrations(c, &plugin.name, &plugin.migrations)
                        .map_err(CallError::Handler)
                })
                .map_err(|e| format!("plugin '{}': {e}", plugin.name))?;
                Ok(plugin)
            });
        match result {
            Ok(plugin) => {
                tracing::info!(
                    file = %path.display(),
                    generation,
                    "loaded plugin '{}' {} with handlers [{}]",
                    plugin.name,
                    plugin.version,
                    plugin.handlers.iter().map(|h| h.name.as_str()).collect::<Vec<_>>().join(", ")
                );
                self.record_loaded(&plugin);
                self.loaded.insert(path.to_owned(), Arc::new(plugin));
                true
            }
            Err(cause) => {
                let serving = if self.loaded.contains_key(path) {
                    "; the previous version keeps serving"
                } else {
                    ""
                };
                tracing::error!("plugin refused: {}: {cause}{serving}", path.display());
                self.record_refused(path, &cause);
                false
            }
        }
    }

    fn sync_config(&mut self) -> bool {
        let path = self.paths.jobs_path.clone();
        let Some(stamp) = Stamp::of(&path) else {
            let message =
                "cannot read: the file is missing; the last good configuration keeps running";
            self.record_config_error(Some(&format!("{}: {message}", path.display())));
            return false;
        };
        if self.config_seen.as_ref().is_some_and(|(s, _)| *s == stamp) {
            return false;
        }
        let Ok(text) = fs::read_to_string(&path) else {
            return false;
        };
        let hash = hash_bytes(text.as_bytes());
        let same = self.config_seen.as_ref().is_some_and(|(_, h)| *h == hash);
        self.config_seen = Some((stamp, hash));
        if same {
            return false;
        }
        match jobs::parse(&text, &path) {
            Ok(config) => match self.apply_config(config) {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!("{}: cannot record the configuration: {e}", path.display());
                    false
                }
            },
            Err(e) => {
                tracing::error!(
                    "jobs.yaml refused: {e}; the last good configuration keeps running"
                );
                self.record_config_error(Some(&e.to_string()));
                false
            }
        }
    }

    /// Warns, once per name, of settings for a plugin that no loaded plugin
    /// has: a typo, or a plugin not installed yet.
    fn warn_unloaded_settings(&mut self) {
        let config = self.config.load();
        for name in config.settings.keys() {
            let loaded = self.loaded.values().any(|p| *p.name == **name);
            if !loaded && self.warned_settings.insert(name.clone()) {
                tracing::warn!(
                    "jobs.yaml has settings for plugin '{name}', which is not loaded; they apply when it is"
                );
            }
        }
    }

    fn apply_config(&mut self, config: JobsConfig) -> rusqlite::Result<()> {
        db::with_write_tx(&self.conn, |c| {
            let names: Vec<&str> = config.jobs.iter().map(|j| j.name.as_str()).collect();
            let stale: Vec<String> = c
                .prepare("SELECT job_name FROM job_config")?
                .query_map([], |r| r.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .filter(|n| !names.contains(&n.as_str()))
                .collect();
            for name in stale {
                c.execute("DELETE FROM job_config WHERE job_name = ?", [name])?;
            }
            for job in &config.jobs {
                c.execute(
                    "INSERT INTO job_config(job_name, handler, frequency_ms, enabled, params) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT(job_name) DO UPDATE SET handler = excluded.handler,
                        frequency_ms = excluded.frequency_ms, enabled = excluded.enabled, params = excluded.params",
                    rusqlite::params![
                        job.name,
                        job.handler,
                        job.frequency_ms as i64,
                        job.enabled,
                        value_to_json(&job.params).to_string()
                    ],
                )?;
            }
            let settings: serde_json::Map<String, serde_json::Value> = config
                .settings
                .iter()
                .map(|(plugin, s)| (plugin.clone(), value_to_json(s)))
                .collect();
            let settings = serde_json::Value::Object(settings).to_string();
            db::set_host_state(c, "settings", Some(&settings))?;
            db::set_host_state(c, "config_error", None)
        })?;
        tracing::info!(
            jobs = config.jobs.len(),
            enabled = config.enabled().count(),
            "job configuration applied from {}",
            self.paths.jobs_path.display()
        );
        self.config.store(Arc::new(config));
        Ok(())
    }

    fn record_config_error(&self, error: Option<&str>) {
        if let Err(e) = db::set_host_state(&self.conn, "config_error", error) {
            tracing::error!("cannot record the configuration error: {e}");
        }
    }

    fn record_loaded(&self, p: &LoadedPlugin) {
        let r = self.conn.execute(
            "INSERT INTO plugins(file, name, version, generation, loaded_at_ms, hash, error, error_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL, NULL)
             ON CONFLICT(file) DO UPDATE SET name = excluded.name, version = excluded.version,
                generation = excluded.generation, loaded_at_ms = excluded.loaded_at_ms, hash = excluded.hash,
                error = NULL, error_at_ms = NULL, disabled = NULL, disabled_at_ms = NULL",
            rusqlite::params![
                p.file.display().to_string(),
                &*p.name,
                p.version,
                p.generation as i64,
                db::now_ms(),
                p.hash
            ],
        );
        if let Err(e) = r {
            tracing::error!("cannot record plugin status: {e}");
        }
    }

    /// Marks the row of `d`'s file disabled, unless it now shows another
    /// build.
    fn record_disabled(&self, d: &Disabled) {
        let r = self.conn.execute(
            "INSERT INTO plugins(file, name, hash, disabled, disabled_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(file) DO UPDATE SET disabled = excluded.disabled, disabled_at_ms = excluded.disabled_at_ms
             WHERE hash = excluded.hash",
            rusqlite::params![d.file.display().to_string(), d.plugin, d.hash, d.reason, d.at_ms],
        );
        if let Err(e) = r {
            tracing::error!("cannot record plugin status: {e}");
        }
    }

    fn record_refused(&self, path: &Path, cause: &str) {
        let r = self.conn.execute(
            "INSERT INTO plugins(file, error, error_at_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT(file) DO UPDATE SET error = excluded.error, error_at_ms = excluded.error_at_ms",
            rusqlite::params![path.display().to_string(), cause, db::now_ms()],
        );
        if let Err(e) = r {
            tracing::error!("cannot record plugin status: {e}");
        }
    }

    fn forget_rows_except(&self, files: &[PathBuf]) {
        let keep: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
        let rows: Vec<String> = self
            .conn
            .prepare("SELECT file FROM plugins")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .unwrap_or_default();
        for row in rows.into_iter().filter(|r| !keep.contains(r)) {
            let _ = self
                .conn
                .execute("DELETE FROM plugins WHERE file = ?", [row]);
        }
    }
}
