//! The limits both sides of a session keep to: the job's, which its params
//! set, and negentropy's frame size, which is fixed. Apart from either
//! side, since both read them.

use quiet_plugin_api::{PluginError, Value};

/// Events (and need ids) per response, unless the job says otherwise.
const DEFAULT_MAX_EVENTS_PER_RESPONSE: i64 = 1000;
/// How long a request's transit secret lives, unless the job says otherwise.
const DEFAULT_TRANSIT_SECRET_TTL_MS: i64 = 30_000;
/// Rounds one session may take, unless the job says otherwise.
const DEFAULT_MAX_ROUNDS_PER_SESSION: i64 = 512;

/// Negentropy's frame size limit: bounds each reconciliation message. When
/// one side lacks much, each reply lists up to this many bytes of ids (32
/// each), so it sets how fast the ids to fetch are found: 60 KB (1,800 ids)
/// per round trip kept a catch-up waiting on reconciliation rather than on
/// fetching. 500 KB is 15,000 ids, and with the events of a response still
/// well inside the host's 8 MiB frame.
pub(crate) const FRAME_SIZE_LIMIT: u64 = 500_000;

/// The job's limits. The host passes params to `run_job` only, so the
/// responder uses those of the latest run (the defaults before the first).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) max_events: usize,
    pub(crate) ttl_ms: i64,
    pub(crate) max_rounds: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_events: DEFAULT_MAX_EVENTS_PER_RESPONSE as usize,
            ttl_ms: DEFAULT_TRANSIT_SECRET_TTL_MS,
            max_rounds: DEFAULT_MAX_ROUNDS_PER_SESSION,
        }
    }
}

impl Limits {
    pub(crate) fn from_params(params: &Value) -> Result<Self, PluginError> {
        let positive = |name, default| match params.int_or(name, default)? {
            n if n > 0 => Ok(n),
            n => Err(PluginError::msg(format!(
                "param '{name}' must be positive, got {n}"
            ))),
        };
        Ok(Self {
            max_events: positive("max_events_per_response", DEFAULT_MAX_EVENTS_PER_RESPONSE)?
                as usize,
            ttl_ms: positive("transit_secret_ttl_ms", DEFAULT_TRANSIT_SECRET_TTL_MS)?,
            max_rounds: positive("max_rounds_per_session", DEFAULT_MAX_ROUNDS_PER_SESSION)?,
        })
    }
}
