//! Retention: keeps the host's `dead_letters` table from growing without
//! bound.
//!
//! Run it as a job from `jobs.yaml`, for example hourly:
//!
//! ```yaml
//! - name: retention
//!   handler: retention
//!   params:
//!     dead_letter_max_age_ms: 604800000  # 7 days (the default)
//!     max_dead_letters: 10000            # the default
//! ```
//!
//! Each run deletes dead letters older than `dead_letter_max_age_ms`, then
//! keeps only the newest `max_dead_letters` (by id), through the host's
//! `Context::prune_dead_letters` (the table is the host's: plugin SQL may
//! only read it). A run that deleted anything logs the count and records it
//! in `retention_log`.

use quiet_plugin_api::{
    bail, export_plugin, params, Context, Envelope, Handler, PluginError, Pruned, Value,
};

const DEFAULT_MAX_AGE_MS: i64 = 7 * 24 * 60 * 60 * 1000;
const DEFAULT_MAX_DEAD_LETTERS: i64 = 10_000;

/// The `retention` job handler. It subscribes to no events.
pub struct Retention;

impl Handler for Retention {
    fn name(&self) -> &str {
        "retention"
    }

    fn event_types(&self) -> &[&str] {
        &[]
    }

    fn run_job(&self, ctx: &mut Context<'_>, params: &Value) -> Result<Vec<Envelope>, PluginError> {
        let max_age_ms = non_negative_param(params, "dead_letter_max_age_ms", DEFAULT_MAX_AGE_MS)?;
        let max_rows = non_negative_param(params, "max_dead_letters", DEFAULT_MAX_DEAD_LETTERS)?;
        let now = ctx.now_ms();

        // Through the host: plugin SQL may not write its `dead_letters`.
        let Pruned { expired, excess } =
            ctx.prune_dead_letters(now.saturating_sub(max_age_ms), max_rows as u64)?;

        let deleted = expired + excess;
        if deleted > 0 {
            ctx.execute(
                "INSERT INTO retention_log (at_ms, deleted) VALUES (?1, ?2)",
                params![now, deleted],
            )?;
            ctx.info(&format!(
                "deleted {deleted} dead letters ({expired} older than {max_age_ms} ms, \
                 {excess} over the limit of {max_rows})"
            ));
        }
        Ok(Vec::new())
    }
}

/// The integer param `name`, or `default` when it is absent or null.
fn non_negative_param(params: &Value, name: &str, default: i64) -> Result<i64, PluginError> {
    let n = params.int_or(name, default)?;
    if n < 0 {
        bail!("param '{name}' must not be negative, got {n}");
    }
    Ok(n)
}

export_plugin! {
    name: "retention",
    version: env!("CARGO_PKG_VERSION"),
    migrations: ["CREATE TABLE IF NOT EXISTS retention_log (at_ms INTEGER NOT NULL, deleted INTEGER NOT NULL)"],
    handlers: [Retention],
}

#[cfg(test)]
mod tests {
    use quiet_plugin_api::Value;
    use quiet_plugin_test_support::TestHost;

    const DAY_MS: i64 = 24 * 60 * 60 * 1000;

    fn host_with_dead_letters(ages_ms: &[i64]) -> TestHost {
        let host = TestHost::new(super::plugin_module()).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        for age in ages_ms {
            host.db()
                .execute(
                    "INSERT INTO dead_letters(at_ms, handler, reason, envelope) VALUES (?1, 'h', 'r', '{}')",
                    [now - age],
                )
                .unwrap();
        }
        host
    }

    #[test]
    fn deletes_expired_then_keeps_the_newest() {
        let mut host = host_with_dead_letters(&[10 * DAY_MS, 8 * DAY_MS, 3, 2, 1]);
        host.run_job("retention", Value::map([("max_dead_letters", 2)]))
            .unwrap();
        assert_eq!(host.count("SELECT COUNT(*) FROM dead_letters"), 2);
        // The two newest (ids 4 and 5) are the ones kept.
        assert_eq!(host.count("SELECT MIN(id) FROM dead_letters"), 4);
        assert_eq!(host.count("SELECT SUM(deleted) FROM retention_log"), 3);
    }

    #[test]
    fn defaults_keep_recent_rows_and_log_nothing() {
        let mut host = host_with_dead_letters(&[DAY_MS, 1]);
        host.run_job("retention", Value::map([("unused", 0)]))
            .unwrap();
        assert_eq!(host.count("SELECT COUNT(*) FROM dead_letters"), 2);
        assert_eq!(host.count("SELECT COUNT(*) FROM retention_log"), 0);
    }

    #[test]
    fn a_bad_param_fails_the_job_and_deletes_nothing() {
        let mut host = host_with_dead_letters(&[10 * DAY_MS]);
        let err = host
            .run_job(
                "retention",
                Value::map([("dead_letter_max_age_ms", "a week")]),
            )
            .unwrap_err();
        assert_eq!(
            err,
            "param 'dead_letter_max_age_ms' must be an integer, got text"
        );
        let err = host
            .run_job("retention", Value::map([("max_dead_letters", -1)]))
            .unwrap_err();
        assert!(err.contains("must not be negative"), "{err}");
        assert_eq!(host.count("SELECT COUNT(*) FROM dead_letters"), 1);
    }
}
