//! [`Context`]: what the host lends a handler for the length of one call.
//!
//! The host owns the SQLite database; plugins never link SQLite themselves
//! (two copies of SQLite in one process break its file locking). Instead the
//! host lends SQL access through [`HostServices`], inside the transaction it
//! opened for the call: if the handler fails, everything it wrote is rolled
//! back. Plugin SQL may read every table but write only the plugin's own
//! (and tables it shares with the host, such as `addresses`): the host's
//! tables (`events`, `dead_letters`, `counters`, …) change only through the
//! host, so [`Context`] counts and prunes dead letters for plugins. The
//! context also carries the clock, logging, this host's public identity and
//! the plugin's settings from `jobs.yaml`. Private keys never cross this
//! boundary.
//!
//! `filter` gets a [`FilterContext`] instead: the settings, and nothing that
//! reaches the database.

use abi_stable::{
    sabi_trait,
    sabi_types::RMut,
    std_types::{RResult, RSlice, RStr, RString, RVec},
    StableAbi,
};

use crate::{EventId, PluginError, Value};

/// The result of a query: column names and rows of values.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, Default, PartialEq)]
pub struct Rows {
    /// Column names, in select order.
    pub columns: RVec<RString>,
    /// Each row holds one value per column.
    pub rows: RVec<RVec<Value>>,
}

impl Rows {
    /// The number of rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The rows, each as a [`Row`] that can be read by column index or name.
    pub fn iter(&self) -> impl Iterator<Item = Row<'_>> {
        self.rows.iter().map(move |values| Row {
            columns: &self.columns,
            values,
        })
    }

    /// The first row, if any.
    pub fn first(&self) -> Option<Row<'_>> {
        self.iter().next()
    }
}

/// One row of [`Rows`].
#[derive(Clone, Copy, Debug)]
pub struct Row<'a> {
    columns: &'a [RString],
    values: &'a [Value],
}

impl<'a> Row<'a> {
    /// The value in column `i` (0-based); [`Value::Null`] past the end.
    pub fn get(&self, i: usize) -> &'a Value {
        const NULL: &Value = &Value::Null;
        self.values.get(i).unwrap_or(NULL)
    }

    /// The value in the column named `name`; [`Value::Null`] if there is none.
    pub fn named(&self, name: &str) -> &'a Value {
        match self.columns.iter().position(|c| c.as_str() == name) {
            Some(i) => self.get(i),
            None => &Value::Null,
        }
    }

    /// Column `i` as text.
    pub fn str(&self, i: usize) -> Option<&'a str> {
        self.get(i).as_str()
    }

    /// Column `i` as an integer.
    pub fn int(&self, i: usize) -> Option<i64> {
        self.get(i).as_int()
    }

    /// Column `i` as bytes.
    pub fn bytes(&self, i: usize) -> Option<&'a [u8]> {
        self.get(i).as_bytes()
    }

    /// All values of the row.
    pub fn values(&self) -> &'a [Value] {
        self.values
    }
}

/// This host's public identity. It never contains secret key material.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, Default, PartialEq)]
pub struct Identity {
    /// The peer id other hosts know this host by.
    pub peer_id: RString,
    /// The host's X25519 public key (32 bytes).
    pub public_key: RVec<u8>,
}

/// What [`Context::prune_dead_letters`] deleted.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Dead letters recorded before the cut-off.
    pub expired: u64,
    /// Older dead letters past the newest ones kept.
    pub excess: u64,
}

/// Log levels for [`Context::log`].
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    /// Fine detail, off by default.
    Debug,
    /// Normal operation.
    Info,
    /// Something an operator may want to look at.
    Warn,
    /// Something failed.
    Error,
}

/// The host side of a [`Context`], as an ABI-stable trait object.
///
/// Plugin authors use [`Context`]; this trait is for the host and for test
/// harnesses that stand in for it.
#[sabi_trait]
pub trait HostServices {
    /// Runs a query and returns all its rows.
    fn query(&mut self, sql: RStr<'_>, params: RSlice<'_, Value>) -> RResult<Rows, RString>;

    /// Runs a statement and returns the number of rows it changed.
    fn execute(&mut self, sql: RStr<'_>, params: RSlice<'_, Value>) -> RResult<u64, RString>;

    /// Milliseconds since the Unix epoch, from the host's clock.
    fn now_ms(&self) -> i64;

    /// Logs a line under the plugin's name.
    fn log(&self, level: LogLevel, message: RStr<'_>);

    /// This host's public identity.
    #[sabi(last_prefix_field)]
    fn identity(&self) -> Identity;

    // Appended after the prefix: plugins built before these existed still
    // load.

    /// Adds `n` to the counter `name`, which must start with the plugin's
    /// name and `_`.
    fn count(&mut self, name: RStr<'_>, n: u64) -> RResult<(), RString>;

    /// Deletes the dead letters recorded before `before_ms`, then all but
    /// the newest `keep`.
    fn prune_dead_letters(&mut self, before_ms: i64, keep: u64) -> RResult<Pruned, RString>;

    /// Creates a signed event of `event_type` in `network_id` whose content
    /// is `content`, depending on `deps` (32 bytes per id, concatenated);
    /// returns its id (32 bytes). See [`Context::create_event`].
    fn create_event(
        &mut self,
        network_id: RStr<'_>,
        event_type: RStr<'_>,
        content: &Value,
        deps: RSlice<'_, u8>,
    ) -> RResult<RVec<u8>, RString>;
}

/// The FFI-safe handle to the host's services that crosses the boundary.
pub type HostRef<'a> = HostServices_TO<'a, RMut<'a, ()>>;

/// The host's service object, handed to [`crate::Handler::process`] and
/// [`crate::Handler::run_job`]. See the [module docs](self).
pub struct Context<'a> {
    host: HostRef<'a>,
    settings: &'a Value,
}

impl<'a> Context<'a> {
    /// Wraps the host's services and the plugin's settings. The plugin-api
    /// glue does this for you; a harness without settings passes
    /// [`Value::EMPTY_MAP`].
    pub fn new(host: HostRef<'a>, settings: &'a Value) -> Self {
        Self { host, settings }
    }

    /// This plugin's settings: its map under `settings:` in `jobs.yaml`
    /// (an empty map if there is none), as of the start of the host's unit
    /// of work. The operator edits them while the host runs, and the next
    /// unit of work sees the edit: read them where they are used, rather
    /// than keeping a copy. Read them as job params are read:
    /// `ctx.settings().str_or("keyword", "")?`.
    pub fn settings(&self) -> &'a Value {
        self.settings
    }

    /// Runs `sql` with positional parameters (`?1`, `?2`, … or `?`) and
    /// returns every row.
    ///
    /// ```ignore
    /// let peers = ctx.query(
    ///     "SELECT peer_id, ip, port FROM addresses WHERE network_id = ?",
    ///     params![network_id],
    /// )?;
    /// ```
    pub fn query(&mut self, sql: &str, params: &[Value]) -> Result<Rows, PluginError> {
        self.host
            .query(sql.into(), params.into())
            .into_result()
            .map_err(|e| PluginError::msg(e.into_string()))
    }

    /// Runs a statement and returns the number of rows it changed.
    pub fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, PluginError> {
        self.host
            .execute(sql.into(), params.into())
            .into_result()
            .map_err(|e| PluginError::msg(e.into_string()))
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        self.host.now_ms()
    }

    /// Logs `message` at `level`, tagged with the plugin's name.
    pub fn log(&self, level: LogLevel, message: &str) {
        self.host.log(level, message.into())
    }

    /// Logs at [`LogLevel::Info`].
    pub fn info(&self, message: &str) {
        self.log(LogLevel::Info, message)
    }

    /// Logs at [`LogLevel::Warn`].
    pub fn warn(&self, message: &str) {
        self.log(LogLevel::Warn, message)
    }

    /// Logs at [`LogLevel::Debug`].
    pub fn debug(&self, message: &str) {
        self.log(LogLevel::Debug, message)
    }

    /// This host's public identity.
    pub fn identity(&self) -> Identity {
        self.host.identity()
    }

    /// Adds `n` to the host's counter `name` (`quiet-host status` lists
    /// it). A plugin's counters are named after it: `name` must start with
    /// the plugin's name and `_` (`sync_rejected_request`). The `counters`
    /// table is the host's, and plugin SQL may not write it.
    pub fn count(&mut self, name: &str, n: u64) -> Result<(), PluginError> {
        self.host
            .count(name.into(), n)
            .into_result()
            .map_err(|e| PluginError::msg(e.into_string()))
    }

    /// Deletes the host's dead letters recorded before `before_ms`, then
    /// all but the newest `keep`, oldest first, and says how many went. The
    /// `dead_letters` table is the host's: plugin SQL may read it, but not
    /// write it, so that no plugin can forge or pick out dead letters; this
    /// prunes by age and number only.
    pub fn prune_dead_letters(&mut self, before_ms: i64, keep: u64) -> Result<Pruned, PluginError> {
        self.host
            .prune_dead_letters(before_ms, keep)
            .into_result()
            .map_err(|e| PluginError::msg(e.into_string()))
    }

    /// Creates an event of `event_type` in `network_id`, signed by this
    /// host, whose content is the map `content`, depending on `deps` (at
    /// most 16 events of the same network). Returns its id at once, so that
    /// the same call can create events that depend on it.
    ///
    /// The host signs, encrypts, stores and syncs it; on every member host,
    /// the handlers subscribed to `event_type` receive it, with this host
    /// as its verified `author` and its signed `created_ms`, as they
    /// receive events from `quiet-host message send`. It belongs to this
    /// call: if the call fails, the event never existed. `content` may not
    /// use the keys the host sets (`type`, `author`, `created_ms`, `deps`);
    /// an event must fit in 64 KiB; this host must be a member of the
    /// network. Types that begin with `quiet.` are the host's own (its
    /// membership events) and are refused. An event with the same type, content, deps and millisecond
    /// as another of this host's is that event, stored once.
    ///
    /// ```ignore
    /// let id = ctx.create_event(network_id, "reaction", &Value::map([("emoji", "👍")]), &[message])?;
    /// ```
    pub fn create_event(
        &mut self,
        network_id: &str,
        event_type: &str,
        content: &Value,
        deps: &[EventId],
    ) -> Result<EventId, PluginError> {
        let deps: Vec<u8> = deps.iter().flat_map(|d| d.0).collect();
        let id = self
            .host
            .create_event(
                network_id.into(),
                event_type.into(),
                content,
                deps.as_slice().into(),
            )
            .into_result()
            .map_err(|e| PluginError::msg(e.into_string()))?;
        EventId::from_bytes(&id).ok_or_else(|| PluginError::msg("the host returned no event id"))
    }
}

/// What [`crate::Handler::filter`] gets of the host: the plugin's settings,
/// and nothing that reaches the database, since a filter is a cheap look
/// outside any transaction.
#[derive(Clone, Copy, Debug)]
pub struct FilterContext<'a> {
    settings: &'a Value,
}

impl<'a> FilterContext<'a> {
    /// A filter's context over `settings`. The plugin-api glue does this for
    /// you.
    pub fn new(settings: &'a Value) -> Self {
        Self { settings }
    }

    /// This plugin's settings, as [`Context::settings`] gives them.
    pub fn settings(&self) -> &'a Value {
        self.settings
    }
}

/// Builds a `&[Value]` parameter list for [`Context::query`] and
/// [`Context::execute`]: `params![network_id, 42, b"raw".to_vec()]`.
#[macro_export]
macro_rules! params {
    () => { &[] as &[$crate::Value] };
    ($($p:expr),+ $(,)?) => { &[$($crate::Value::from($p)),+][..] };
}
