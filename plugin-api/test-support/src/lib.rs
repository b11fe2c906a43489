//! [`TestHost`]: unit-test a plugin's handlers without a running host.
//!
//! A crate of its own, apart from the host, so that a plugin author's tests
//! depend on this and `quiet-plugin-api`, not on the host's internals; as
//! nushell's `nu-plugin-test-support` is to its engine.
//!
//! A `TestHost` uses the plugin's root module in-process (no `dlopen`), an
//! in-memory SQLite database with the host's schema and the plugin's
//! migrations, and the host's real pipeline and job runner. So a test sees
//! exactly what a real host would do with the handler: transactions, rolled
//! back failures, dead letters and the envelopes that would leave the host.
//! It has an identity of its own and is a member of one network,
//! [`TestHost::NETWORK_ID`], so that events a handler creates
//! (`Context::create_event`) are signed, stored and routed to their
//! subscribers as on a real host. The plugin's settings are an empty map
//! until [`TestHost::set_settings`], as on a host whose `jobs.yaml` names
//! it not.
//!
//! ```ignore
//! // plugins/my-plugin/src/lib.rs, with `quiet-plugin-test-support` as a
//! // dev-dependency
//! #[cfg(test)]
//! mod tests {
//!     use quiet_plugin_test_support::TestHost;
//!     use quiet_plugin_api::{envelope, Value};
//!
//!     #[test]
//!     fn answers_pings() {
//!         let mut host = TestHost::new(super::plugin_module()).unwrap();
//!         host.deliver(vec![envelope! {"event_type" => "ping", "n" => 1}]).unwrap();
//!         assert_eq!(host.count("SELECT COUNT(*) FROM pongs"), 1);
//!         assert!(host.dead_letters().is_empty());
//!     }
//! }
//! ```

use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use arc_swap::ArcSwap;
use quiet_plugin_api::{Envelope, Identity, PluginModRef, Value};
use rusqlite::Connection;

use quiet_host::{
    crypto::{event_crypto::NetworkKey, identity::HostIdentity},
    engine::{
        jobs::{JobSpec, JobsConfig},
        pipeline::{Outbox, Pipeline, Report, Services, Source},
        replay, scheduler,
    },
    plugins::{loader, registry::Registry},
    storage::{
        counters::{self, Counters},
        db,
        event_store::EventStore,
        networks::NetworkKeys,
    },
};

/// One plugin on an in-memory host. See the [module docs](self).
pub struct TestHost {
    /// The identity and network key, in files as a real host keeps them.
    _data: tempfile::TempDir,
    /// What the event store refused, written to `counters` after each run.
    counters: Arc<Counters>,
    conn: Connection,
    registry: Registry,
    services: Services,
    sent: Sent,
}

/// Outgoing envelopes, collected instead of sent.
type Sent = Arc<Mutex<Vec<Envelope>>>;

struct Recorder(Sent);

impl Outbox for Recorder {
    fn send(&self, envelope: Envelope) -> Result<(), String> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(envelope);
        Ok(())
    }
}

impl TestHost {
    /// The network a test host is a member of.
    pub const NETWORK_ID: &'static str = "7e570000000000000000000000000000";

    /// Loads `module` (the `plugin_module()` that `export_plugin!` defines)
    /// and runs its migrations.
    pub fn new(module: PluginModRef) -> Result<Self, String> {
        let plugin = loader::from_module(module, Path::new("<in-process>"), 1, String::new())?;
        let conn = db::open_in_memory().map_err(|e| e.to_string())?;
        db::apply_plugin_migrations(&conn, &plugin.name, &plugin.migrations)?;
        let data = tempfile::tempdir().map_err(|e| e.to_string())?;
        let me = Arc::new(HostIdentity::load_or_create(data.path()).map_err(|e| e.to_string())?);
        let keys = NetworkKeys::new(data.path());
        keys.store(Self::NETWORK_ID, &NetworkKey::generate())
            .map_err(|e| e.to_string())?;
        let counters = Arc::new(Counters::default());
        let store = EventStore::new(Arc::new(keys), counters.clone()).signing_as(me.clone());
        let sent = Sent::default();
        Ok(Self {
            _data: data,
            counters,
            conn,
            registry: Registry::new(1, vec![plugin.into()]),
            services: Services {
                identity: me.public(),
                outbox: Box::new(Recorder(sent.clone())),
                store: Some(store),
                config: Arc::new(ArcSwap::from_pointee(JobsConfig::default())),
            },
            sent,
        })
    }

    /// Gives the plugin `settings`, as `settings: <plugin>:` in jobs.yaml
    /// would: its handlers' `filter`, `process` and `run_job` read them from
    /// the next call on. Panics unless `settings` is a map.
    pub fn set_settings(&mut self, settings: Value) {
        assert!(
            settings.as_map().is_some(),
            "a plugin's settings are a map, not {}",
            settings.kind()
        );
        let plugin = self.registry.plugins[0].name.to_string();
        let settings = [(plugin, settings)].into();
        self.services.config.store(Arc::new(JobsConfig {
            settings,
            ..Default::default()
        }));
    }

    /// This host's public identity: the `author` of the events its
    /// handlers create.
    pub fn identity(&self) -> &Identity {
        &self.services.identity
    }

    /// Runs `handler`'s job once with `params` (a map, as jobs.yaml gives),
    /// through the pipeline. Returns the job's error, if it failed.
    pub fn run_job(&mut self, handler: &str, params: Value) -> Result<(), String> {
        let h = self
            .registry
            .handler(handler)
            .ok_or_else(|| format!("the plugin has no handler '{handler}'"))?
            .clone();
        let job = JobSpec {
            name: format!("test-{handler}"),
            handler: handler.to_owned(),
            frequency_ms: 1000,
            enabled: true,
            params,
        };
        let ran = scheduler::execute_job(
            &self.conn,
            &self.registry,
            &self.services,
            &h,
            &job,
            db::now_ms(),
        );
        self.catch_up()?;
        self.write_counters();
        match ran {
            Ok(None) => Ok(()),
            Ok(Some(error)) => Err(error),
            Err(e) => Err(format!("database error: {e}")),
        }
    }

    /// Runs `envelopes` through the pipeline, as the host routes events
    /// its event store has stored: their `author` and `created_ms` are
    /// kept as given, where a real host sets them from the verified
    /// signature. Envelopes the plugin returns lose their `author`, as on
    /// a real host: only the event store vouches for one.
    pub fn deliver(&mut self, envelopes: Vec<Envelope>) -> Result<Report, String> {
        let source = Source {
            plugin: None,
            handler: "test".into(),
        };
        let report = self
            .services
            .write_tx(&self.conn, |conn| {
                Pipeline::new(conn, &self.registry, &self.services).run_as_routed(envelopes, source)
            })
            .map_err(|e| format!("database error: {e}"));
        self.catch_up()?;
        self.write_counters();
        report
    }

    /// Runs the replayer until every handler has been offered every stored
    /// event of its types, as a host does between its other work: a
    /// handler installed after events were stored sees them.
    fn catch_up(&self) -> Result<(), String> {
        while replay::turn(&self.conn, &self.registry, &self.services)
            .map_err(|e| format!("database error: {e}"))?
        {}
        Ok(())
    }

    /// The host's counter `name`: what the event store refused
    /// (`drop_undecryptable_event`, `duplicate_events`, …) and what the
    /// plugin counted with `Context::count`; 0 if never counted.
    pub fn counter(&self, name: &str) -> i64 {
        self.conn
            .query_row("SELECT value FROM counters WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .unwrap_or(0)
    }

    /// Writes what the event store counted, as a real host does after each
    /// commit.
    fn write_counters(&self) {
        let pending = self.counters.take();
        counters::write(&self.conn, &pending).expect("writing counters");
    }

    /// Takes the outgoing envelopes the host would have sent so far.
    pub fn take_sent(&mut self) -> Vec<Envelope> {
        std::mem::take(&mut self.sent.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// `(handler, reason)` of every dead letter so far, oldest first.
    pub fn dead_letters(&self) -> Vec<(String, String)> {
        self.conn
            .prepare("SELECT handler, reason FROM dead_letters ORDER BY id")
            .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
            .expect("reading dead_letters")
    }

    /// One integer from `sql`; panics if the query fails.
    pub fn count(&self, sql: &str) -> i64 {
        self.conn
            .query_row(sql, [], |r| r.get(0))
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// The database, for arranging state and checking results.
    pub fn db(&self) -> &Connection {
        &self.conn
    }

    /// Arranges that this host is a member of `network_id`.
    pub fn join_network(&self, network_id: &str) {
        self.arrange(
            "INSERT OR IGNORE INTO networks (network_id, created_ms) VALUES (?1, 0)",
            [network_id],
        );
    }

    /// Arranges that this host listens on `addr` ("ip:port"), which is
    /// where plugins tell peers to reply.
    pub fn listen_on(&self, addr: &str) {
        self.arrange(
            "INSERT OR REPLACE INTO host_state (key, value) VALUES ('listen_addr', ?1)",
            [addr],
        );
    }

    /// Arranges that this host knows `peer_id` in `network_id` at
    /// `127.0.0.1:port`, active or not.
    pub fn add_peer(&self, peer_id: &str, network_id: &str, port: i64, active: bool) {
        self.arrange(
            "INSERT INTO addresses (peer_id, network_id, ip, port, is_active) \
             VALUES (?1, ?2, '127.0.0.1', ?3, ?4)",
            rusqlite::params![peer_id, network_id, port, active],
        );
    }

    /// Arranges that this host's event store holds `event` (stored as is,
    /// not encrypted) under `event_id`.
    pub fn add_event(&self, event_id: &[u8], network_id: &str, created_ms: i64, event: &[u8]) {
        self.arrange(
            "INSERT INTO events (event_id, network_id, created_ms, event_type, event, received_ms) \
             VALUES (?1, ?2, ?3, 'message', ?4, 0)",
            rusqlite::params![event_id, network_id, created_ms, event],
        );
    }

    fn arrange(&self, sql: &str, params: impl rusqlite::Params) {
        self.conn
            .prepare_cached(sql)
            .and_then(|mut s| s.execute(params))
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}
