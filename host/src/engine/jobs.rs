//! Parsing and validation of `jobs.yaml`: the jobs the host runs, and each
//! plugin's `settings`.
//!
//! Operators edit this file while the host runs. An invalid edit must be
//! refused with a `file:line:column` message they can act on, and the host
//! keeps running the last good config (the caller does the keeping; this
//! module only says yes or no). So every check runs while the YAML
//! deserializer is positioned on the offending value, which is how
//! serde_yaml attaches a location to an error.
//!
//! This is the only module that knows serde_yaml (deprecated upstream), so
//! replacing it later touches this one file.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use quiet_plugin_api::{Field, Value};
use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

/// The smallest accepted `frequency_ms`.
pub const MIN_FREQUENCY_MS: u64 = 100;
/// The largest accepted `frequency_ms`: one year.
const MAX_FREQUENCY_MS: u64 = 31_536_000_000;
/// The longest accepted job name, in characters.
const MAX_NAME_LEN: usize = 64;
/// The largest `jobs.yaml` read, in bytes: hundreds of jobs fit many times.
pub const MAX_FILE_BYTES: usize = 1 << 20;
/// How deeply flow collections (`[…]`, `{…}`) may nest. libyaml's cost
/// grows with the square of the depth: a line of 100,000 brackets (200 KB)
/// took 61 s of CPU to refuse, and held up shutdown and the next edit.
pub const MAX_FLOW_DEPTH: usize = 64;
/// The most one plugin's settings may hold, counting each key and text by
/// its length and every value as 8 bytes more: they stay in memory, and
/// `status` shows them.
pub const MAX_SETTINGS_BYTES: usize = 64 << 10;
/// How deeply one plugin's settings may nest, its own map being level 1.
pub const MAX_SETTINGS_DEPTH: usize = 16;

/// A valid `jobs.yaml`: the jobs in file order, names unique, and the
/// plugins' settings.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobsConfig {
    /// Every job, enabled or not, in file order.
    pub jobs: Vec<JobSpec>,
    /// The top-level `settings:` map: plugin name to that plugin's
    /// settings, each a [`Value::Map`] within [`MAX_SETTINGS_BYTES`] and
    /// [`MAX_SETTINGS_DEPTH`]. It may name plugins that are not loaded.
    pub settings: BTreeMap<String, Value>,
}

/// One entry of `jobs.yaml`.
#[derive(Clone, Debug, PartialEq)]
pub struct JobSpec {
    /// Unique name: 1 to 64 characters from `[A-Za-z0-9_.-]`.
    pub name: String,
    /// The plugin handler to call, same charset as `name`.
    pub handler: String,
    /// How often to run, in `MIN_FREQUENCY_MS..=` one year.
    pub frequency_ms: u64,
    /// Whether the job runs; `true` unless the file says otherwise.
    pub enabled: bool,
    /// The job's parameters; always a [`Value::Map`] (empty if absent).
    pub params: Value,
}

impl JobsConfig {
    /// The job called `name`, if any.
    pub fn get(&self, name: &str) -> Option<&JobSpec> {
        self.jobs.iter().find(|j| j.name == name)
    }

    /// The enabled jobs, in file order.
    pub fn enabled(&self) -> impl Iterator<Item = &JobSpec> {
        self.jobs.iter().filter(|j| j.enabled)
    }

    /// The settings of the plugin called `plugin`; an empty map if the file
    /// gives it none.
    pub fn settings_of(&self, plugin: &str) -> &Value {
        self.settings.get(plugin).unwrap_or(Value::EMPTY_MAP)
    }
}

/// Why a `jobs.yaml` was refused. Displays as one line,
/// `path:line:column: message`, or `path: message` without a location.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: {}", .path.display(), location(.line, .column), .message.replace(['\r', '\n'], " "))]
pub struct ConfigError {
    /// The file, as given to [`parse`] or [`load`].
    pub path: PathBuf,
    /// 1-based line of the offending value, when known.
    pub line: Option<usize>,
    /// 1-based column of the offending value, when known.
    pub column: Option<usize>,
    /// What is wrong, without the location.
    pub message: String,
}

fn location(line: &Option<usize>, column: &Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(":{l}:{c}"),
        (Some(l), None) => format!(":{l}"),
        _ => String::new(),
    }
}

/// Reads and parses the file at `path`; returns the config and the raw text.
/// A file over [`MAX_FILE_BYTES`] is refused unread.
pub fn load(path: &Path) -> Result<(JobsConfig, String), ConfigError> {
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.len() > MAX_FILE_BYTES as u64 {
            return Err(too_large(meta.len(), path));
        }
    }
    let text = std::fs::read_to_string(path).map_err(|e| {
        let msg = e.to_string();
        // "No such file or directory (os error 2)" -> drop the errno.
        let msg = msg.split(" (os error").next().unwrap_or_default();
        ConfigError {
            path: path.into(),
            line: None,
            column: None,
            message: format!("cannot read: {msg}"),
        }
    })?;
    Ok((parse(&text, path)?, text))
}

/// Parses and validates the text of a `jobs.yaml`; `path` is only used in
/// error messages. An empty or comment-only text is a valid empty config.
pub fn parse(text: &str, path: &Path) -> Result<JobsConfig, ConfigError> {
    if text.len() > MAX_FILE_BYTES {
        return Err(too_large(text.len() as u64, path));
    }
    // Bounded before the parser sees it, so that no text costs more than a
    // moment to refuse.
    let shape = Shape::of(text);
    if let Some((line, column)) = shape.too_deep {
        return Err(ConfigError {
            path: path.into(),
            line: Some(line),
            column: Some(column),
            message: format!("collections nest more than {MAX_FLOW_DEPTH} levels deep"),
        });
    }
    parse_bounded(text, path).map_err(|mut err| {
        // An alias bomb is refused without a position: point at the first
        // alias, where the expansion starts.
        if err.line.is_none() && err.message.contains("limit exceeded") {
            if let Some((line, column)) = shape.first_alias {
                (err.line, err.column) = (Some(line), Some(column));
                err.message += ": aliases expand too far";
            }
        }
        err
    })
}

fn parse_bounded(text: &str, path: &Path) -> Result<JobsConfig, ConfigError> {
    // serde_yaml reports a syntax error only when deserialization reaches it,
    // so a type error earlier in the file would hide it: check syntax first.
    serde_yaml::from_str::<de::IgnoredAny>(text).map_err(|e| config_error(&e, path))?;
    let (dup, first) = match run_pass(text, None) {
        (Ok(file), _) => {
            let JobsFile { jobs, settings } = file.unwrap_or_default();
            return Ok(JobsConfig {
                jobs: jobs
                    .unwrap_or_default()
                    .into_iter()
                    .map(Job::into_spec)
                    .collect(),
                settings,
            });
        }
        (Err(e), None) => return Err(config_error(&e, path)),
        (Err(e), Some(first)) => (e, first),
    };
    // A duplicate name: the error sits on the second occurrence. Re-run,
    // failing on purpose at the first one, to get its real line too.
    let mut out = config_error(&dup, path);
    let probe = run_pass(text, Some(first)).0;
    match probe.err().and_then(|e| e.location()) {
        Some(loc) => out.message += &format!(" (first at line {})", loc.line()),
        None => out.message += &format!(" (first at jobs[{first}])"),
    }
    Err(out)
}

fn too_large(len: u64, path: &Path) -> ConfigError {
    ConfigError {
        path: path.into(),
        line: None,
        column: None,
        message: format!(
            "{len} bytes, over the {} KiB a jobs.yaml may have",
            MAX_FILE_BYTES >> 10
        ),
    }
}

/// What a look at the text, before parsing, finds: where flow collections
/// first nest too deeply, and where the first alias is (1-based line and
/// column).
///
/// It must never see less nesting than libyaml would, or a crafted text
/// gets through; seeing more only refuses a strange file with a clear
/// error. So an opening bracket counts everywhere, even in a quoted scalar
/// or a comment, and a closing one only outside both; and a quote counts as
/// opening a quoted scalar wherever one could start, a superset of where
/// libyaml starts one.
#[derive(Debug, Default, PartialEq)]
struct Shape {
    too_deep: Option<(usize, usize)>,
    first_alias: Option<(usize, usize)>,
}

impl Shape {
    fn of(text: &str) -> Self {
        #[derive(PartialEq)]
        enum In {
            Plain,
            Single,
            Double,
            Comment,
        }
        let mut shape = Shape::default();
        let (mut line, mut column) = (1, 0);
        let (mut depth, mut state, mut escaped) = (0usize, In::Plain, false);
        // The last character seen outside scalars and comments that was
        // not blank, or '\n' at a line's start.
        let mut before = '\n';
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            column += 1;
            if c == '\n' {
                (line, column) = (line + 1, 0);
            }
            if matches!(c, '[' | '{') {
                depth += 1;
                if depth > MAX_FLOW_DEPTH && shape.too_deep.is_none() {
                    shape.too_deep = Some((line, column));
                }
            }
            let was_escaped = std::mem::take(&mut escaped);
            match state {
                _ if was_escaped => {}
                In::Comment if c == '\n' => state = In::Plain,
                // The next character is escaped (and still counted above).
                In::Double if c == '\\' => escaped = true,
                In::Double if c == '"' && !escaped => state = In::Plain,
                In::Single if c == '\'' && chars.peek() == Some(&'\'') => {
                    chars.next();
                    column += 1;
                }
                In::Single if c == '\'' => state = In::Plain,
                In::Comment | In::Double | In::Single => {}
                In::Plain => {
                    let may_start = matches!(
                        before,
                        '\n' | ' ' | ':' | '-' | '?' | '[' | '{' | ',' | '!' | '&' | '|' | '>'
                    );
                    match c {
                        '#' if matches!(before, '\n' | ' ') => state = In::Comment,
                        '\'' if may_start => state = In::Single,
                        '"' if may_start => state = In::Double,
                        ']' | '}' => depth = depth.saturating_sub(1),
                        '*' if may_start && shape.first_alias.is_none() => {
                            shape.first_alias = Some((line, column));
                        }
                        _ => {}
                    }
                    before = match c {
                        ' ' | '\t' | '\r' => ' ',
                        c => c,
                    };
                    continue;
                }
            }
            if state == In::Plain {
                before = c;
            }
        }
        shape
    }
}

fn config_error(err: &serde_yaml::Error, path: &Path) -> ConfigError {
    let loc = err.location();
    let mut message = err.to_string();
    if let Some(l) = &loc {
        let suffix = format!(" at line {} column {}", l.line(), l.column());
        if let Some(i) = message.rfind(&suffix) {
            message.replace_range(i..i + suffix.len(), "");
        }
    }
    ConfigError {
        path: path.into(),
        line: loc.as_ref().map(|l| l.line()),
        column: loc.map(|l| l.column()),
        message,
    }
}

// ---- the file's shape ----------------------------------------------------

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobsFile {
    #[serde(default)]
    jobs: Option<Vec<Job>>,
    #[serde(default, deserialize_with = "de_settings")]
    settings: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Job {
    #[serde(deserialize_with = "de_name")]
    name: String,
    #[serde(deserialize_with = "de_handler")]
    handler: String,
    #[serde(deserialize_with = "de_frequency")]
    frequency_ms: u64,
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default = "empty_map", deserialize_with = "de_params")]
    params: Value,
}

impl Job {
    fn into_spec(self) -> JobSpec {
        let Job {
            name,
            handler,
            frequency_ms,
            enabled,
            params,
        } = self;
        JobSpec {
            name,
            handler,
            frequency_ms,
            enabled,
            params,
        }
    }
}

fn yes() -> bool {
    true
}

fn empty_map() -> Value {
    Value::Map(Default::default())
}

// ---- duplicate names -----------------------------------------------------

/// Names seen so far in the current pass. Serde gives visitors no context,
/// so `de_name` reaches it through a thread-local; `run_pass` resets it.
#[derive(Default)]
struct NameTracker {
    names: Vec<String>,
    /// Fail (to learn its location) at the name of this job index.
    probe: Option<usize>,
    /// Set when a duplicate was found: the index of the first occurrence.
    dup_first: Option<usize>,
}

thread_local! {
    static NAMES: RefCell<NameTracker> = RefCell::default();
}

/// One deserialization of `text`; also returns the index of the first
/// occurrence when it failed on a duplicate name.
fn run_pass(
    text: &str,
    probe: Option<usize>,
) -> (Result<Option<JobsFile>, serde_yaml::Error>, Option<usize>) {
    let fresh = NameTracker {
        probe,
        ..Default::default()
    };
    NAMES.with(|t| *t.borrow_mut() = fresh);
    let result = serde_yaml::from_str(text);
    let dup_first = NAMES.with(|t| std::mem::take(&mut *t.borrow_mut()).dup_first);
    (result, dup_first)
}

fn see_name(name: &str) -> Result<(), String> {
    NAMES.with(|t| {
        let mut t = t.borrow_mut();
        let index = t.names.len();
        if t.probe == Some(index) {
            return Err("probe".into());
        }
        if let Some(first) = t.names.iter().position(|n| n == name) {
            t.dup_first = Some(first);
            return Err(format!("duplicate job name '{name}'"));
        }
        t.names.push(name.to_owned());
        Ok(())
    })
}

// ---- field validators (run while positioned on the value) ----------------

/// A job name (unique, at most `MAX_NAME_LEN` long) or a handler name.
struct Ident {
    job_name: bool,
}

impl<'de> Visitor<'de> for Ident {
    type Value = String;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string of A-Z a-z 0-9 _ . -")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        if v.is_empty() {
            return Err(E::custom("must not be empty"));
        }
        let bad = |c: &char| !(c.is_ascii_alphanumeric() || "_.-".contains(*c));
        if let Some(c) = v.chars().find(bad) {
            let msg = format!("may only contain A-Z a-z 0-9 _ . - (found {c:?})");
            return Err(E::custom(msg));
        }
        if self.job_name && v.len() > MAX_NAME_LEN {
            let msg = format!("must be at most {MAX_NAME_LEN} characters, got {}", v.len());
            return Err(E::custom(msg));
        }
        if self.job_name {
            see_name(v).map_err(E::custom)?;
        }
        Ok(v.to_owned())
    }
}

fn de_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    d.deserialize_str(Ident { job_name: true })
}

fn de_handler<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    d.deserialize_str(Ident { job_name: false })
}

struct Frequency;

impl<'de> Visitor<'de> for Frequency {
    type Value = u64;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an integer number of milliseconds")
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        frequency(v.into())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        frequency(v.into())
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<u64, E> {
        frequency(v)
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<u64, E> {
        frequency(i128::try_from(v).unwrap_or(i128::MAX))
    }
}

fn frequency<E: de::Error>(v: i128) -> Result<u64, E> {
    let (min, max) = (MIN_FREQUENCY_MS, MAX_FREQUENCY_MS);
    if v < i128::from(min) {
        Err(E::custom(format!("must be at least {min} ms, got {v}")))
    } else if v > i128::from(max) {
        Err(E::custom(format!(
            "must be at most {max} ms (1 year), got {v}"
        )))
    } else {
        Ok(v as u64)
    }
}

fn de_frequency<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    d.deserialize_any(Frequency)
}

// ---- params and settings: YAML -> Value ----------------------------------

/// Any YAML value; with `top`, only a mapping (or null, meaning empty).
/// With a `bound`, one plugin's settings: checked as they are read, so that
/// an error points at the value that went too far.
#[derive(Clone, Copy)]
struct AnyValue<'b> {
    top: bool,
    /// Collections around this value, this one included if it is one.
    depth: usize,
    bound: Option<&'b Bound>,
}

/// What one plugin's settings may still hold.
struct Bound {
    plugin: String,
    bytes_left: Cell<usize>,
}

impl AnyValue<'_> {
    const PARAMS: AnyValue<'static> = AnyValue {
        top: true,
        depth: 1,
        bound: None,
    };

    fn inner(self) -> Self {
        AnyValue {
            top: false,
            depth: self.depth + 1,
            ..self
        }
    }

    /// Takes `bytes` (and 8 for the value) from the bound, if there is one.
    fn charge<E: de::Error>(&self, bytes: usize) -> Result<(), E> {
        let Some(b) = self.bound else { return Ok(()) };
        let left = b.bytes_left.get().checked_sub(bytes.saturating_add(8));
        let left = left.ok_or_else(|| {
            E::custom(format!(
                "the settings of plugin '{}' are over the {} KiB a plugin's settings may have",
                b.plugin,
                MAX_SETTINGS_BYTES >> 10
            ))
        })?;
        b.bytes_left.set(left);
        Ok(())
    }

    /// Checks a collection's depth, and charges it.
    fn enter<E: de::Error>(&self) -> Result<(), E> {
        if let Some(b) = self.bound.filter(|_| self.depth > MAX_SETTINGS_DEPTH) {
            return Err(E::custom(format!(
                "the settings of plugin '{}' nest more than {MAX_SETTINGS_DEPTH} levels deep",
                b.plugin
            )));
        }
        self.charge(0)
    }
}

impl<'de> DeserializeSeed<'de> for AnyValue<'_> {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

fn de_params<'de, D: Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
    AnyValue::PARAMS.deserialize(d)
}

impl AnyValue<'_> {
    fn leaf<E: de::Error>(&self, v: Value, unexpected: de::Unexpected) -> Result<Value, E> {
        if self.top {
            Err(E::invalid_type(unexpected, self))
        } else {
            Ok(v)
        }
    }
}

impl<'de> Visitor<'de> for AnyValue<'_> {
    type Value = Value;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let what = if self.top {
            "a mapping"
        } else {
            "a YAML value"
        };
        f.write_str(what)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.charge(0)?;
        Ok(if self.top { empty_map() } else { Value::Null })
    }
    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        self.charge(0)?;
        self.leaf(Value::Bool(v), de::Unexpected::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        self.charge(0)?;
        self.leaf(Value::Int(v), de::Unexpected::Signed(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        match i64::try_from(v) {
            Ok(i) => self.visit_i64(i),
            Err(_) => Err(E::custom(format!(
                "integer {v} is too large (max {})",
                i64::MAX
            ))),
        }
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        Err(E::custom(format!("integer {v} does not fit in 64 bits")))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        Err(E::custom(format!("integer {v} does not fit in 64 bits")))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        self.charge(0)?;
        self.leaf(Value::Float(v), de::Unexpected::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        self.charge(v.len())?;
        self.leaf(Value::from(v), de::Unexpected::Str(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        if self.top {
            return Err(de::Error::invalid_type(de::Unexpected::Seq, &self));
        }
        self.enter()?;
        let mut items = Vec::new();
        while let Some(v) = seq.next_element_seed(self.inner())? {
            items.push(v);
        }
        Ok(Value::from(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.enter()?;
        let mut fields: Vec<Field> = Vec::new();
        while let Some(key) = map.next_key_seed(Key(&fields))? {
            self.charge(key.len())?;
            let value = map.next_value_seed(self.inner())?;
            let key = key.into();
            fields.push(Field { key, value });
        }
        Ok(Value::Map(fields.into()))
    }
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Value, A::Error> {
        let (tag, _) = data.variant::<String>()?;
        let msg = format!("YAML tags are not supported (found !{tag})");
        Err(de::Error::custom(msg))
    }
}

// ---- settings: plugin name -> its settings map ---------------------------

fn de_settings<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, Value>, D::Error> {
    d.deserialize_any(SettingsMap)
}

struct SettingsMap;

impl<'de> Visitor<'de> for SettingsMap {
    type Value = BTreeMap<String, Value>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a mapping from plugin names to their settings")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(BTreeMap::new())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut names: Vec<Field> = Vec::new();
        let mut out = BTreeMap::new();
        while let Some(plugin) = map.next_key_seed(Key(&names))? {
            if plugin.is_empty() {
                return Err(de::Error::custom("a plugin name must not be empty"));
            }
            let bound = Bound {
                plugin: plugin.clone(),
                bytes_left: Cell::new(MAX_SETTINGS_BYTES),
            };
            let seed = AnyValue {
                bound: Some(&bound),
                ..AnyValue::PARAMS
            };
            let settings = map.next_value_seed(seed)?;
            names.push(Field {
                key: plugin.as_str().into(),
                value: Value::Null,
            });
            out.insert(plugin, settings);
        }
        Ok(out)
    }
}

/// A params key: a string not already in the map.
struct Key<'a>(&'a [Field]);

impl<'de> DeserializeSeed<'de> for Key<'_> {
    type Value = String;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Key<'_> {
    type Value = String;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        if self.0.iter().any(|f| f.key.as_str() == v) {
            return Err(E::custom(format!("duplicate key {v:?}")));
        }
        Ok(v.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "# jobs.yaml
jobs:
  - name: sync_with_peers
    handler: sync
    frequency_ms: 3000
    enabled: true        # optional, default true
    params:              # optional, default empty map; any YAML
      network_id: net_1
      max_events_per_response: 1000
";

    fn parse_str(text: &str) -> Result<JobsConfig, ConfigError> {
        parse(text, Path::new("jobs.yaml"))
    }

    /// A one-job file (lines 1-4) with `extra` appended at job indent.
    fn job(extra: &str) -> String {
        format!("jobs:\n  - name: a\n    handler: h\n    frequency_ms: 3000\n{extra}")
    }

    /// `text` is refused at `line`, with `msg` in the message and the
    /// location not repeated in it.
    #[track_caller]
    fn refused(text: &str, line: usize, msg: &str) -> ConfigError {
        let e = parse_str(text).expect_err("should be refused");
        assert_eq!(e.line, Some(line), "{e}");
        assert!(e.message.contains(msg), "{e}");
        assert!(
            !e.message.contains(&format!("at line {line} column")),
            "{e}"
        );
        e
    }

    fn empty() -> Value {
        Value::map(Vec::<(&str, Value)>::new())
    }

    #[test]
    fn example_parses() {
        let cfg = parse_str(EXAMPLE).unwrap();
        let want = JobSpec {
            name: "sync_with_peers".into(),
            handler: "sync".into(),
            frequency_ms: 3000,
            enabled: true,
            params: Value::map([
                ("network_id", Value::from("net_1")),
                ("max_events_per_response", 1000.into()),
            ]),
        };
        assert_eq!(
            cfg,
            JobsConfig {
                jobs: vec![want.clone()],
                settings: BTreeMap::new(),
            }
        );
        assert_eq!(cfg.get("sync_with_peers"), Some(&want));
        assert_eq!(cfg.get("nope"), None);
        assert_eq!(cfg.enabled().count(), 1);
    }

    #[test]
    fn empty_files_and_defaults() {
        for text in [
            "",
            "\n",
            "# only a comment\n  # another\n",
            "jobs: []\n",
            "jobs:\n",
        ] {
            assert_eq!(parse_str(text).unwrap().jobs, vec![], "{text:?}");
        }
        let spec = &parse_str(&job("")).unwrap().jobs[0];
        assert!(spec.enabled);
        assert_eq!(spec.params, empty());
        assert_eq!(
            parse_str(&job("    params:\n")).unwrap().jobs[0].params,
            empty()
        );
        let cfg = parse_str(&job("    enabled: false\n")).unwrap();
        assert_eq!((cfg.jobs.len(), cfg.enabled().count()), (1, 0));
    }

    #[test]
    fn unknown_and_missing_fields() {
        let e = refused(
            &job("    frequncy_ms: 3000\n"),
            5,
            "unknown field `frequncy_ms`",
        );
        assert_eq!(e.column, Some(5));
        refused("jobs: []\njob: []\n", 2, "unknown field `job`");
        // A missing field is reported where the job's mapping starts.
        refused(
            "jobs:\n  - name: a\n    frequency_ms: 3000\n",
            2,
            "missing field `handler`",
        );
        refused(
            "jobs:\n\n  - handler: h\n    frequency_ms: 3000\n",
            3,
            "missing field `name`",
        );
        refused(
            "jobs:\n  - name: a\n    handler: h\n",
            2,
            "missing field `frequency_ms`",
        );
        refused(
            &job("    enabled: yes\n"),
            5,
            "enabled: invalid type: string \"yes\"",
        );
    }

    #[test]
    fn names_and_handlers() {
        let f = |n: &str| format!("jobs:\n  - name: {n}\n    handler: h\n    frequency_ms: 3000\n");
        let e = refused(
            &f("'a b'"),
            2,
            "jobs[0].name: may only contain A-Z a-z 0-9 _ . - (found ' ')",
        );
        assert_eq!(e.column, Some(11));
        refused(&f("''"), 2, "name: must not be empty");
        refused(&f(""), 2, "name: must not be empty");
        refused(
            &f(&"x".repeat(65)),
            2,
            "name: must be at most 64 characters, got 65",
        );
        assert!(parse_str(&f(&"x".repeat(64))).is_ok());
        assert!(parse_str(&f("A-z_0.9")).is_ok());
        refused(
            "jobs:\n  - name: a\n    handler: sync/x\n    frequency_ms: 3000\n",
            3,
            "handler: may only",
        );
        refused(
            "jobs:\n  - name: a\n    handler: ''\n    frequency_ms: 3000\n",
            3,
            "handler: must not be empty",
        );
    }

    #[test]
    fn frequency_bounds() {
        let f = |v: &str| format!("jobs:\n  - name: a\n    handler: h\n    frequency_ms: {v}\n");
        let e = refused(&f("5"), 4, "frequency_ms: must be at least 100 ms, got 5");
        assert_eq!(
            e.to_string(),
            "jobs.yaml:4:19: jobs[0].frequency_ms: must be at least 100 ms, got 5"
        );
        refused(&f("-5"), 4, "must be at least 100 ms, got -5");
        refused(
            &f("31536000001"),
            4,
            "must be at most 31536000000 ms (1 year), got 31536000001",
        );
        refused(
            &f("99999999999999999999999"),
            4,
            "got 99999999999999999999999",
        );
        refused(
            &f("'3000'"),
            4,
            "expected an integer number of milliseconds",
        );
        refused(
            &f("3000.5"),
            4,
            "expected an integer number of milliseconds",
        );
        assert_eq!(
            parse_str(&f("100")).unwrap().jobs[0].frequency_ms,
            MIN_FREQUENCY_MS
        );
        assert_eq!(
            parse_str(&f("31536000000")).unwrap().jobs[0].frequency_ms,
            MAX_FREQUENCY_MS
        );
    }

    #[test]
    fn duplicate_names() {
        let two = "  - name: b\n    handler: h\n    frequency_ms: 3000\n";
        let text = job(two) + "\n  - name: a\n    handler: h\n    frequency_ms: 3000\n";
        let e = refused(&text, 9, "duplicate job name 'a' (first at line 2)");
        assert_eq!(e.column, Some(11));
        // The name tracker is per parse: the next parse starts clean.
        assert!(parse_str(&job(two)).is_ok());
    }

    #[test]
    fn params_validation() {
        let p = |body: &str| job(&format!("    params:\n{body}"));
        refused(
            &job("    params: [1]\n"),
            5,
            "params: invalid type: sequence, expected a mapping",
        );
        refused(&job("    params: 3\n"), 5, "expected a mapping");
        refused(
            &p("      n: 9223372036854775808\n"),
            6,
            "params.n: integer 9223372036854775808 is too large",
        );
        refused(
            &p("      1: a\n"),
            6,
            "invalid type: integer `1`, expected a string key",
        );
        refused(&p("      x: 1\n      x: 2\n"), 7, "duplicate key \"x\"");
        refused(
            &p("      a:\n        - !custom 1\n"),
            7,
            "YAML tags are not supported (found !custom)",
        );
    }

    #[test]
    fn params_nested_conversion() {
        let body = "      list: [1, two, 3.5, ~]\n      map:\n        ok: true\n        inner:\n          - k: -1\n";
        let params = &parse_str(&job(&format!("    params:\n{body}      empty: {{}}\n")))
            .unwrap()
            .jobs[0]
            .params;
        let inner = Value::from(vec![Value::map([("k", -1)])]);
        let want = Value::map([
            (
                "list",
                Value::from(vec![1.into(), "two".into(), 3.5.into(), Value::Null]),
            ),
            (
                "map",
                Value::map([("ok", Value::Bool(true)), ("inner", inner)]),
            ),
            ("empty", empty()),
        ]);
        assert_eq!(params, &want);
        let keys: Vec<_> = params
            .as_map()
            .unwrap()
            .iter()
            .map(|f| f.key.as_str())
            .collect();
        assert_eq!(keys, ["list", "map", "empty"], "file order is kept");
    }

    #[test]
    fn settings_are_a_map_per_plugin_and_empty_for_the_others() {
        let text = "settings:\n  template:\n    keyword: apple\n    keep: 3\n  other.plugin:\n  \
                    nested:\n    a: {b: [1, {c: ~}]}\n"
            .to_owned()
            + &job("");
        let cfg = parse_str(&text).unwrap();
        assert_eq!(cfg.jobs.len(), 1);
        assert_eq!(
            cfg.settings_of("template"),
            &Value::map([("keyword", Value::from("apple")), ("keep", 3.into())])
        );
        // Named without a map: empty, like a plugin the file does not name.
        assert_eq!(cfg.settings_of("other.plugin"), &empty());
        assert_eq!(cfg.settings_of("absent"), &empty());
        let inner = Value::from(vec![1.into(), Value::map([("c", Value::Null)])]);
        assert_eq!(
            cfg.settings_of("nested"),
            &Value::map([("a", Value::map([("b", inner)]))])
        );
        let names: Vec<&str> = cfg.settings.keys().map(String::as_str).collect();
        assert_eq!(names, ["nested", "other.plugin", "template"]);
        for text in ["settings:\n", "settings: {}\n", "jobs: []\n", ""] {
            assert!(parse_str(text).unwrap().settings.is_empty(), "{text:?}");
        }
    }

    #[test]
    fn settings_errors_name_the_plugin_and_the_line() {
        refused(
            "jobs: []\nsettings: [1]\n",
            2,
            "settings: invalid type: sequence, expected a mapping from plugin names",
        );
        refused(
            "settings:\n  template: [1]\n",
            2,
            "settings.template: invalid type: sequence, expected a mapping",
        );
        refused("settings:\n  template: 3\n", 2, "expected a mapping");
        refused(
            "settings:\n  template: {}\n  other: {}\n  template: {}\n",
            4,
            "duplicate key \"template\"",
        );
        refused(
            "settings:\n  '': {}\n",
            2,
            "a plugin name must not be empty",
        );
        refused(
            "settings:\n  template:\n    n: 9223372036854775808\n",
            3,
            "settings.template.n: integer 9223372036854775808 is too large",
        );
        refused(
            "settings:\n  template:\n    k: !tag 1\n",
            3,
            "YAML tags are not supported",
        );
    }

    #[test]
    fn settings_are_bounded_in_depth_and_size_per_plugin() {
        // `depth` maps inside each other, the plugin's own the first; the
        // innermost holds `x` on line `depth + 2`.
        let nested = |depth: usize| {
            let mut text = "settings:\n  template:\n".to_owned();
            for level in 1..depth {
                text += &format!("{}k{level}:\n", " ".repeat(2 + 2 * level));
            }
            text + &format!("{}x: 1\n", " ".repeat(2 + 2 * depth))
        };
        assert!(parse_str(&nested(MAX_SETTINGS_DEPTH)).is_ok());
        let e = refused(
            &nested(MAX_SETTINGS_DEPTH + 1),
            MAX_SETTINGS_DEPTH + 3,
            "the settings of plugin 'template' nest more than 16 levels deep",
        );
        assert!(e.message.starts_with("settings.template.k1.k2."), "{e}");
        let flow = format!(
            "settings:\n  p:\n    a: {}1{}\n",
            "[".repeat(16),
            "]".repeat(16)
        );
        refused(
            &flow,
            3,
            "the settings of plugin 'p' nest more than 16 levels",
        );

        // One long text; then many small values, refused at the one that
        // goes over, on its own line.
        let long = format!(
            "settings:\n  template:\n    big: {}\n",
            "x".repeat(MAX_SETTINGS_BYTES)
        );
        let e = refused(
            &long,
            3,
            "settings.template.big: the settings of plugin 'template' are over the 64 KiB",
        );
        assert_eq!(
            e.to_string(),
            "jobs.yaml:3:10: settings.template.big: the settings of plugin 'template' are over \
             the 64 KiB a plugin's settings may have"
        );
        let items: String = (0..9000).map(|i| format!("      - {i}\n")).collect();
        let many = format!("settings:\n  p:\n    list:\n{items}");
        let e = parse_str(&many).unwrap_err();
        let line = e.line.unwrap();
        assert!((8000..9000).contains(&line), "{e}");
        assert!(e.message.contains("plugin 'p' are over the 64 KiB"), "{e}");
        // Aliases count as often as they are used.
        let anchor = format!("[{}]", vec!["x".repeat(100); 100].join(", "));
        let aliased =
            format!("settings:\n  p:\n    a: &a {anchor}\n    b: [*a, *a, *a, *a, *a, *a]\n");
        let e = parse_str(&aliased).unwrap_err();
        assert!(e.message.contains("settings.p.b["), "{e}");
        assert!(e.message.contains("plugin 'p' are over"), "{e}");

        // The bound is per plugin: two plugins of 40 KiB each are fine.
        let big = |p: &str| format!("  {p}:\n    t: {}\n", "y".repeat(40 << 10));
        let two = format!("settings:\n{}{}", big("a"), big("b"));
        assert_eq!(parse_str(&two).unwrap().settings.len(), 2);
        // Params have no such bound.
        let params = job(&format!(
            "    params:\n      big: {}\n",
            "z".repeat(MAX_SETTINGS_BYTES)
        ));
        assert!(parse_str(&params).is_ok());
    }

    #[test]
    fn syntax_errors_keep_their_location() {
        let e = refused("jobs:\n  - name: a\n\thandler: h\n", 3, "tab character");
        assert_eq!(e.column, Some(1));
        // Reported before the type error (a list as `name`) that precedes it.
        let text = "jobs:\n  - name: [a\n    handler: h\n";
        let e = refused(text, 3, "did not find expected ',' or ']'");
        assert!(
            e.message.ends_with("flow sequence at line 2 column 11"),
            "{e}"
        );
        // Several documents: serde_yaml gives no location.
        let e = parse_str("jobs: []\n---\njobs: []\n").unwrap_err();
        assert_eq!((e.line, e.column), (None, None));
        assert!(e.to_string().starts_with("jobs.yaml: "), "{e}");
    }

    #[test]
    fn display_is_one_line_starting_with_the_path() {
        let s = parse_str(&job("    frequncy_ms: 1\n"))
            .unwrap_err()
            .to_string();
        assert!(
            s.starts_with("jobs.yaml:5:5: jobs[0]: unknown field `frequncy_ms`"),
            "{s}"
        );
        assert!(!s.contains('\n'));
        let e = ConfigError {
            path: "/etc/jobs.yaml".into(),
            line: None,
            column: None,
            message: "a\nb".into(),
        };
        assert_eq!(e.to_string(), "/etc/jobs.yaml: a b");
    }

    #[test]
    fn a_hostile_jobs_yaml_is_refused_before_parsing_with_its_position() {
        let path = Path::new("jobs.yaml");
        // 100,000 brackets took libyaml 61 s to refuse.
        let deep = format!("jobs: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
        let err = parse(&deep, path).unwrap_err();
        assert_eq!((err.line, err.column), (Some(1), Some(7 + MAX_FLOW_DEPTH)));
        assert!(err.message.contains("nest more than 64 levels"), "{err}");
        // Nesting cannot hide behind a quote that libyaml reads as part of
        // a plain scalar, nor behind closing brackets inside strings, nor
        // in a comment.
        for hidden in [
            format!("a: it 's\njobs: {}\n", "[".repeat(70)),
            format!("jobs: {}\n", "[ \"]\" ".repeat(70)),
            format!("# {}\njobs: []\n", "[".repeat(70)),
            format!("jobs: \"\\\"{}\"\n", "[".repeat(70)),
        ] {
            let err = parse(&hidden, path).unwrap_err();
            assert!(err.message.contains("nest more than"), "{hidden:?}: {err}");
        }
        // What real files hold is not refused: brackets, quotes, comments.
        let fine = "# jobs [of this host]\njobs:\n  - name: \"a\"\n    handler: 'tick'\n    \
                    frequency_ms: 100\n    params: {tags: [x, [y, z]], note: \"]]]]\", q: 'it''s'}\n";
        let jobs = parse(fine, path).unwrap().jobs;
        assert_eq!(
            jobs[0].params.get("q").and_then(Value::as_str),
            Some("it's")
        );

        let mut bomb = String::from(
            "jobs:\n  - name: x\n    handler: h\n    frequency_ms: 100\n    params:\n      \
             a0: &a0 [x, x, x, x, x, x, x, x, x]\n",
        );
        for i in 1..9 {
            let refs = vec![format!("*a{}", i - 1); 9].join(", ");
            bomb += &format!("      a{i}: &a{i} [{refs}]\n");
        }
        let err = parse(&bomb, path).unwrap_err();
        assert_eq!((err.line, err.column), (Some(7), Some(16)), "{err}");
        assert!(err.message.contains("aliases expand too far"), "{err}");

        let huge = format!("jobs: []\n{}", "#".repeat(MAX_FILE_BYTES));
        let err = parse(&huge, path).unwrap_err();
        assert!(err.message.contains("over the 1024 KiB"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("jobs.yaml");
        std::fs::write(&file, &huge).unwrap();
        assert!(load(&file)
            .unwrap_err()
            .message
            .contains("over the 1024 KiB"));
    }

    #[test]
    fn load_reads_or_says_why_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.yaml");
        let e = load(&path).unwrap_err();
        assert_eq!(
            (e.line, e.message.as_str()),
            (None, "cannot read: No such file or directory")
        );
        std::fs::write(&path, EXAMPLE).unwrap();
        let (cfg, raw) = load(&path).unwrap();
        assert_eq!((cfg.jobs.len(), raw.as_str()), (1, EXAMPLE));
        std::fs::write(&path, job("    frequncy_ms: 1\n")).unwrap();
        assert!(load(&path)
            .unwrap_err()
            .to_string()
            .starts_with(&format!("{}:5:5: ", path.display())));
    }

    #[test]
    fn params_json_shapes() {
        let v = Value::map([
            ("b", Value::from(vec![0x00u8, 0xab, 0x10])),
            (
                "l",
                Value::from(vec![
                    Value::Int(1),
                    Value::Float(0.5),
                    Value::Null,
                    Value::Bool(false),
                ]),
            ),
            ("m", Value::map([("t", "x")])),
            ("nan", Value::Float(f64::NAN)),
        ]);
        let want = serde_json::json!({
            "b": {"$bytes": "00ab10"}, "l": [1, 0.5, null, false], "m": {"t": "x"}, "nan": null
        });
        assert_eq!(crate::encoding::json::value_to_json(&v), want);
    }
}
