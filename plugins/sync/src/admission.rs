//! Admission: whether the responder answers a request at all. A verified
//! sender is not enough: a member could replay a request it captured, or
//! ask faster than we can answer, so a request must also be fresh, later
//! than the last one taken from its peer, and within the rate limits kept
//! in `sync_sessions`.

use quiet_plugin_api::{params, Context, PluginError};

use crate::{limits::Limits, wire::Request};

/// The least time between new sessions of one peer and network.
pub(crate) const MIN_SESSION_INTERVAL_MS: i64 = 3_000;
/// How early a new session may come without being refused; see [`admit`].
const SESSION_START_TOLERANCE_MS: i64 = 1_000;

/// Why the responder does not answer `req`: the counter it is dropped
/// under, or `None` if it is answered. Each check runs only once the ones
/// before it pass, so a stale request or one for another network leaves no
/// trace in `sync_sessions`.
pub(crate) fn refusal(
    ctx: &mut Context<'_>,
    req: &Request<'_>,
    limits: Limits,
    now: i64,
) -> Result<Option<&'static str>, PluginError> {
    // A request older than its transit secret lives is stale or replayed;
    // one as far ahead could be kept back to be replayed later.
    if now.abs_diff(req.timestamp_ms) > limits.ttl_ms.unsigned_abs() {
        return Ok(Some("sync_rejected_request"));
    }
    if !is_member(ctx, req.network_id)? {
        return Ok(Some("sync_rejected_request"));
    }
    Ok(admit(ctx, req, limits.max_rounds, now)?.err())
}

/// The responder's replay protection and rate limits, kept per peer and
/// network in `sync_sessions`. Returns the counter a refused request is
/// counted under.
///
/// A request must be later than the last one accepted (`last_request_ms`):
/// the requester's timestamps increase, and a captured request, even within
/// its TTL, cannot reset the session of the real one. A continuation round
/// must name the current session and come after the last one accepted,
/// below `max_rounds`. It may skip rounds: one lost on the way would
/// otherwise make every later one of the session refused, and the
/// requester wait out the session (its TTL) before starting again. The
/// requester asks again for what the lost one asked (see
/// `State::answered`); the responder keeps no state a skip could upset.
///
/// A new session (round 0) is admitted at most once per
/// [`MIN_SESSION_INTERVAL_MS`] on average, as a virtual schedule:
/// `next_start_ms` is when the next one is due, and one may come up to
/// [`SESSION_START_TOLERANCE_MS`] early. A strict "3 s since the previous
/// one" rule would refuse an honest requester whose job ticks every 3 s
/// whenever one request is delayed a little more than the previous one; the
/// schedule still refuses an immediate second session and any faster rate.
fn admit(
    ctx: &mut Context<'_>,
    req: &Request<'_>,
    max_rounds: i64,
    now: i64,
) -> Result<Result<(), &'static str>, PluginError> {
    // `sync_sessions` keeps session ids in hex.
    let session_id = hex::encode(req.session_id);
    let current = ctx.query(
        "SELECT session_id, last_round, next_start_ms, last_request_ms FROM sync_sessions \
         WHERE peer_id = ?1 AND network_id = ?2",
        params![req.peer_id, req.network_id],
    )?;
    let current = current.first();
    let last_request = current.and_then(|r| r.int(3)).unwrap_or(i64::MIN);
    if req.timestamp_ms <= last_request {
        return Ok(Err("sync_replayed_request"));
    }
    if req.round == 0 {
        // The schedule is never further ahead than one interval plus the
        // tolerance; a later one means our clock stepped back, and would
        // refuse every new session until it caught up.
        let due = current
            .and_then(|r| r.int(2))
            .filter(|due| {
                *due <= now.saturating_add(MIN_SESSION_INTERVAL_MS + SESSION_START_TOLERANCE_MS)
            })
            .unwrap_or(i64::MIN);
        if now.saturating_add(SESSION_START_TOLERANCE_MS) < due {
            return Ok(Err("sync_rate_limited"));
        }
        ctx.execute(
            "INSERT INTO sync_sessions (peer_id, network_id, session_id, started_ms, last_round, next_start_ms, last_request_ms) \
             VALUES (?1, ?2, ?3, ?4, 0, ?5, ?6) \
             ON CONFLICT (peer_id, network_id) DO UPDATE SET session_id = excluded.session_id, \
             started_ms = excluded.started_ms, last_round = 0, next_start_ms = excluded.next_start_ms, \
             last_request_ms = excluded.last_request_ms",
            params![
                req.peer_id,
                req.network_id,
                session_id,
                now,
                due.max(now).saturating_add(MIN_SESSION_INTERVAL_MS),
                req.timestamp_ms
            ],
        )?;
        return Ok(Ok(()));
    }
    let forward = current.is_some_and(|r| {
        r.str(0) == Some(session_id.as_str()) && r.int(1).is_some_and(|last| req.round > last)
    });
    if !forward || req.round >= max_rounds {
        return Ok(Err("sync_rate_limited"));
    }
    ctx.execute(
        "UPDATE sync_sessions SET last_round = ?3, last_request_ms = ?4 \
         WHERE peer_id = ?1 AND network_id = ?2",
        params![req.peer_id, req.network_id, req.round, req.timestamp_ms],
    )?;
    Ok(Ok(()))
}

fn is_member(ctx: &mut Context<'_>, network_id: &str) -> Result<bool, PluginError> {
    let rows = ctx.query(
        "SELECT 1 FROM networks WHERE network_id = ?1",
        params![network_id],
    )?;
    Ok(!rows.is_empty())
}

#[cfg(test)]
mod tests {
    use quiet_plugin_api::Value;

    use crate::test_host::*;

    #[test]
    fn new_sessions_are_rate_limited_and_rounds_only_move_forward() {
        let mut host = host("127.0.0.1:7002");
        let first = new_id();
        host.deliver(vec![
            request_from(PEER_A, first, 0, vec![]),
            request_from(PEER_A, new_id(), 0, vec![]),
        ])
        .unwrap();
        assert_eq!(host.take_sent().len(), 1);
        assert_eq!(counter(&host, "sync_rate_limited"), 1);
        // Another peer is not held back by peer-a.
        host.deliver(vec![request_from(PEER_X, new_id(), 0, vec![])])
            .unwrap();
        assert_eq!(host.take_sent().len(), 1);

        host.deliver(vec![
            request_from(PEER_A, new_id(), 1, vec![]), // not the session
            request_from(PEER_A, first, 2, vec![]),    // round 1 was lost: taken
            request_from(PEER_A, first, 1, vec![]),    // behind the last one taken
            request_from(PEER_A, first, 2, vec![]),    // a replay
        ])
        .unwrap();
        assert_eq!(host.take_sent().len(), 1);
        assert_eq!(counter(&host, "sync_rate_limited"), 4);

        // New sessions follow a 3 s schedule, and may come up to 1 s early
        // (a request delayed more than the one before it).
        let due_in = |host: &TestHost, ms: i64| {
            host.db()
                .execute(
                    "UPDATE sync_sessions SET next_start_ms = ?1 WHERE peer_id = ?2",
                    (now_ms() + ms, PEER_A),
                )
                .unwrap()
        };
        due_in(&host, 1_500);
        host.deliver(vec![request_from(PEER_A, new_id(), 0, vec![])])
            .unwrap();
        assert_eq!(counter(&host, "sync_rate_limited"), 5);
        due_in(&host, 500);
        host.deliver(vec![request_from(PEER_A, new_id(), 0, vec![])])
            .unwrap();
        assert_eq!(host.take_sent().len(), 1);
        // The next one is due 3 s after the scheduled time, not the arrival.
        assert!(
            host.count(&format!(
                "SELECT next_start_ms FROM sync_sessions WHERE peer_id = '{PEER_A}'"
            )) >= now_ms() + 3_400
        );
        assert!(host.dead_letters().is_empty(), "{:?}", host.dead_letters());
    }

    #[test]
    fn requests_without_a_verified_sender_or_not_for_our_networks_are_rejected() {
        let mut host = host("127.0.0.1:7002");
        // Only the host sets `sender_peer_id`, having verified the seal.
        let mut unsigned = request_from(PEER_A, new_id(), 0, vec![]);
        unsigned.remove("sender_peer_id");
        let elsewhere = request_from(PEER_A, new_id(), 0, vec![]).with("network_id", "net-unknown");
        let mut malformed = request_from(PEER_A, new_id(), 0, vec![]);
        malformed.set("event_plaintext", Value::map([("type", "sync_request")]));
        host.deliver(vec![unsigned, elsewhere, malformed]).unwrap();
        assert!(host.take_sent().is_empty());
        assert_eq!(counter(&host, "sync_rejected_request"), 3);
        assert!(host.dead_letters().is_empty(), "{:?}", host.dead_letters());
    }

    #[test]
    fn stale_future_and_replayed_requests_are_refused() {
        let mut host = host("127.0.0.1:7002");
        let at = |session: [u8; 16], round, ts: i64| {
            with_field(
                request_from(PEER_A, session, round, vec![]),
                "timestamp_ms",
                ts,
            )
        };
        // Beyond the transit TTL (30 s unless the job says otherwise), either way.
        let now = now_ms();
        let session = new_id();
        host.deliver(vec![
            at(session, 0, now - 31_000),
            at(session, 0, now + 31_000),
        ])
        .unwrap();
        assert!(host.take_sent().is_empty());
        assert_eq!(counter(&host, "sync_rejected_request"), 2);

        let captured = request_from(PEER_A, session, 0, vec![]);
        let captured_ms = plaintext(&captured, "timestamp_ms").as_int().unwrap();
        host.deliver(vec![captured.clone()]).unwrap();
        assert_eq!(host.take_sent().len(), 1);
        // Once a new session is due, neither the captured request nor any
        // other not later than it resets the session...
        let due_now = |host: &TestHost| {
            host.db()
                .execute("UPDATE sync_sessions SET next_start_ms = 0", [])
                .unwrap()
        };
        due_now(&host);
        host.deliver(vec![captured, at(new_id(), 0, captured_ms)])
            .unwrap();
        assert!(host.take_sent().is_empty());
        assert_eq!(counter(&host, "sync_replayed_request"), 2);
        // ...so the real requester goes on, and its rounds cannot be replayed.
        let round_1 = request_from(PEER_A, session, 1, vec![]);
        host.deliver(vec![round_1.clone(), round_1]).unwrap();
        assert_eq!(host.take_sent().len(), 1);
        assert_eq!(counter(&host, "sync_replayed_request"), 3);
        assert_eq!(counter(&host, "sync_rate_limited"), 0);
        assert!(host.dead_letters().is_empty(), "{:?}", host.dead_letters());
    }

    #[test]
    fn a_schedule_left_far_ahead_by_our_clock_stepping_back_is_reset() {
        let mut host = host("127.0.0.1:7002");
        host.deliver(vec![request_from(PEER_A, new_id(), 0, vec![])])
            .unwrap();
        assert_eq!(host.take_sent().len(), 1);
        let due_in = |host: &TestHost, ms: i64| {
            host.db()
                .execute(
                    "UPDATE sync_sessions SET next_start_ms = ?1",
                    [now_ms() + ms],
                )
                .unwrap()
        };
        // The schedule can run ahead by an interval plus the tolerance of
        // its own accord: that is still kept...
        due_in(&host, 4_000);
        host.deliver(vec![request_from(PEER_A, new_id(), 0, vec![])])
            .unwrap();
        assert!(host.take_sent().is_empty());
        assert_eq!(counter(&host, "sync_rate_limited"), 1);
        // ...but an hour ahead means our clock stepped back an hour.
        due_in(&host, 3_600_000);
        let before = now_ms();
        host.deliver(vec![request_from(PEER_A, new_id(), 0, vec![])])
            .unwrap();
        assert_eq!(host.take_sent().len(), 1);
        let next_start_ms = host.count("SELECT next_start_ms FROM sync_sessions");
        assert!((before + 3_000..=now_ms() + 3_000).contains(&next_start_ms));
        assert!(host.dead_letters().is_empty(), "{:?}", host.dead_letters());
    }
}
