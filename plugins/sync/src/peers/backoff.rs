//! Back-off for addresses that do not answer, kept in `sync_backoff`, one
//! row per address (peer, network, ip, port) that has failed lately. It
//! lives in the database rather than in the handler's memory so that a
//! restart or a plugin reload does not send a burst of sessions to every
//! dead peer at once and start its back-off over: an address that fails
//! all the time would otherwise be dialled every few seconds after each
//! reload, for ever.

use quiet_plugin_api::{params, Context, PluginError};

use crate::admission::MIN_SESSION_INTERVAL_MS;

/// The longest wait between sessions with an address that does not answer.
pub(crate) const MAX_RETRY_INTERVAL_MS: i64 = 300_000;
/// Unanswered sessions in a row after which an address is marked inactive
/// (`addresses.is_active = 0`: no longer given out to others) and a
/// candidate is no longer tried. At the waits of [`wait_ms`] that is about
/// eleven minutes of silence. An inactive address is still tried every
/// [`MAX_RETRY_INTERVAL_MS`], so that two hosts cut off from each other
/// for a while find each other again, until it is pruned.
pub(crate) const MAX_FAILURES: i64 = 8;
/// How long an address may keep failing before it is forgotten.
pub(crate) const PRUNE_AFTER_MS: i64 = 7 * 24 * 3_600_000;

/// Where a session was sent: what back-off and promotion are kept for.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Addr<'a> {
    pub(crate) peer_id: &'a str,
    pub(crate) network_id: &'a str,
    pub(crate) ip: &'a str,
    pub(crate) port: i64,
}

/// The wait after `failures` unanswered sessions in a row. One is
/// forgiven: a live responder may refuse a round 0 silently (its rate
/// limit, after our restart). After the second the wait doubles, from 6 s
/// up to [`MAX_RETRY_INTERVAL_MS`].
pub(crate) fn wait_ms(failures: i64) -> i64 {
    match failures {
        ..=1 => 0,
        n => MIN_SESSION_INTERVAL_MS
            .saturating_mul(1 << (n - 1).min(20))
            .min(MAX_RETRY_INTERVAL_MS),
    }
}

/// Counts one more unanswered session at `addr`, marks the address
/// inactive once it reaches [`MAX_FAILURES`], and returns the failures in
/// a row.
pub(crate) fn failed(ctx: &mut Context<'_>, addr: Addr<'_>, now: i64) -> Result<i64, PluginError> {
    let rows = ctx.query(
        "INSERT INTO sync_backoff (peer_id, network_id, ip, port, failures, next_try_ms, failing_since_ms) \
         VALUES (?1, ?2, ?3, ?4, 1, ?5, ?5) \
         ON CONFLICT (peer_id, network_id, ip, port) DO UPDATE SET failures = failures + 1 \
         RETURNING failures",
        params![addr.peer_id, addr.network_id, addr.ip, addr.port, now],
    )?;
    let failures = rows.first().and_then(|r| r.int(0)).unwrap_or(1);
    ctx.execute(
        "UPDATE sync_backoff SET next_try_ms = ?5 \
         WHERE peer_id = ?1 AND network_id = ?2 AND ip = ?3 AND port = ?4",
        params![
            addr.peer_id,
            addr.network_id,
            addr.ip,
            addr.port,
            now.saturating_add(wait_ms(failures))
        ],
    )?;
    if failures >= MAX_FAILURES {
        ctx.execute(
            "UPDATE addresses SET is_active = 0 \
             WHERE peer_id = ?1 AND network_id = ?2 AND ip = ?3 AND port = ?4 AND is_active = 1",
            params![addr.peer_id, addr.network_id, addr.ip, addr.port],
        )?;
    }
    Ok(failures)
}

/// Clears the back-off of `peer_id` in `network_id`: of the one address
/// that answered, or (`None`) of all of them, when the peer sent a request
/// of its own; logged if it was being tried less often.
pub(crate) fn cleared(
    ctx: &mut Context<'_>,
    peer_id: &str,
    network_id: &str,
    at: Option<(&str, i64)>,
) -> Result<(), PluginError> {
    let (ip, port) = at.unwrap_or(("", 0));
    let rows = ctx.query(
        "DELETE FROM sync_backoff WHERE peer_id = ?1 AND network_id = ?2 \
         AND (?3 = '' OR (ip = ?3 AND port = ?4)) RETURNING failures",
        params![peer_id, network_id, ip, port],
    )?;
    if rows
        .iter()
        .filter_map(|r| r.int(0))
        .any(|failures| failures >= 2)
    {
        ctx.info(&format!(
            "peer {peer_id} answers again in network {network_id}: back to the job's schedule"
        ));
    }
    Ok(())
}

/// Forgets addresses that have been failing for [`PRUNE_AFTER_MS`] (they
/// are inactive by then), candidates never confirmed in as long, and the
/// back-off of addresses no longer kept.
pub(crate) fn prune(ctx: &mut Context<'_>, now: i64) -> Result<(), PluginError> {
    let before = now.saturating_sub(PRUNE_AFTER_MS);
    ctx.execute(
        "DELETE FROM addresses WHERE is_active = 0 AND EXISTS (SELECT 1 FROM sync_backoff b \
         WHERE b.peer_id = addresses.peer_id AND b.network_id = addresses.network_id \
         AND b.ip = addresses.ip AND b.port = addresses.port AND b.failing_since_ms < ?1)",
        params![before],
    )?;
    ctx.execute(
        "DELETE FROM sync_candidates WHERE learned_ms < ?1",
        params![before],
    )?;
    ctx.execute(
        "DELETE FROM sync_backoff WHERE NOT EXISTS (SELECT 1 FROM addresses a \
         WHERE a.peer_id = sync_backoff.peer_id AND a.network_id = sync_backoff.network_id \
         AND a.ip = sync_backoff.ip AND a.port = sync_backoff.port) \
         AND NOT EXISTS (SELECT 1 FROM sync_candidates c \
         WHERE c.peer_id = sync_backoff.peer_id AND c.network_id = sync_backoff.network_id \
         AND c.ip = sync_backoff.ip AND c.port = sync_backoff.port)",
        params![],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{MAX_FAILURES, MAX_RETRY_INTERVAL_MS, PRUNE_AFTER_MS};
    use crate::{test_host::*, SyncHandler};

    /// Runs A's job every 3 s from `*t` on, B never answering, for
    /// `limit_ms` or until `done`; returns the sessions A opened with B.
    fn fail(a: &Peer, t: &mut i64, limit_ms: i64, done: impl Fn(&Peer) -> bool) -> usize {
        let until = *t + limit_ms;
        let mut tries = 0;
        while *t < until && !done(a) {
            set_thread_clock(Some(*t));
            tries += to(&a.run_job(&limits(1000)), PEER_B).len();
            *t += 3_000;
        }
        tries
    }

    fn is_active(a: &Peer) -> bool {
        a.host.count(&format!(
            "SELECT COALESCE((SELECT is_active FROM addresses WHERE peer_id = '{PEER_B}'), 0)"
        )) == 1
    }

    #[test]
    fn a_peer_that_keeps_failing_is_marked_inactive_and_pruned() {
        let (a, _b) = two_peers();
        let mut t = now_ms();
        let inactive = |a: &Peer| !is_active(a);
        let tries = fail(&a, &mut t, 3_600_000, inactive);
        assert!(!is_active(&a), "still active after an hour of silence");
        assert_eq!(tries, MAX_FAILURES as usize);
        // Inactive, it is no longer given out, but still tried now and then.
        let tries = fail(&a, &mut t, 30 * 60_000, |_| false);
        assert!((5..=7).contains(&tries), "{tries} tries in 30 minutes");
        // A request of its own makes it active again...
        set_thread_clock(Some(t));
        a.process(&request_from(PEER_B, new_id(), 0, vec![]));
        assert!(is_active(&a));
        assert_eq!(a.host.count("SELECT COUNT(*) FROM sync_backoff"), 0);
        // ...and, failing for a week once more, it is forgotten.
        fail(&a, &mut t, 3_600_000, inactive);
        assert!(!is_active(&a));
        set_thread_clock(Some(t + PRUNE_AFTER_MS + MAX_RETRY_INTERVAL_MS));
        a.handler.state().next_prune_ms = 0;
        assert!(to(&a.run_job(&limits(1000)), PEER_B).is_empty());
        set_thread_clock(None);
        assert_eq!(listed(&a.host, "addresses"), "");
        assert_eq!(a.host.count("SELECT COUNT(*) FROM sync_backoff"), 0);
    }

    #[test]
    fn back_off_survives_a_plugin_reload() {
        let (mut a, _b) = two_peers();
        let start = now_ms();
        let sent_at = |a: &Peer, ms: i64| {
            set_thread_clock(Some(start + ms));
            to(&a.run_job(&limits(1000)), PEER_B).len()
        };
        // Unanswered sessions at 0 s and 6 s; the second failure in a row
        // waits 6 s, the third (at 24 s) 12 s.
        assert_eq!(sent_at(&a, 0), 1);
        assert_eq!(sent_at(&a, 6_000), 1);
        assert_eq!(sent_at(&a, 12_000), 0);
        assert_eq!(sent_at(&a, 18_000), 1);
        assert_eq!(sent_at(&a, 24_000), 0);
        // A reload: the handler's memory is new, the database is the same.
        a.handler = SyncHandler::default();
        assert_eq!(sent_at(&a, 27_000), 0);
        assert_eq!(sent_at(&a, 36_000), 1);
        set_thread_clock(None);
    }

    #[test]
    fn the_wait_for_an_unreachable_peer_doubles_up_to_five_minutes() {
        let waits: Vec<i64> = (0..12).map(|n| super::wait_ms(n) / 1000).collect();
        // One unanswered session is forgiven: a live responder may refuse a
        // round 0 silently (its rate limit, after our restart).
        assert_eq!(waits, [0, 0, 6, 12, 24, 48, 96, 192, 300, 300, 300, 300]);
        assert_eq!(super::wait_ms(i64::MAX), 300_000);
    }
}
