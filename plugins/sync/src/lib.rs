//! Sync: brings this host's copy of each network's events up to date with
//! its peers, with range-based set reconciliation (negentropy).
//!
//! The seed design answers a `sync_request` with `ORDER BY event_id LIMIT
//! 100` events, so a requester never gets past the first page. Here the two
//! sides instead reconcile their sets of `(created_ms, event_id)` over a few
//! rounds of a *session*, and the requester pulls exactly the ids it lacks,
//! a bounded batch per round, until nothing is left. Completeness comes from
//! the reconciliation, not from paging.
//!
//! One handler plays both parts; the host does all crypto and networking
//! (it seals requests to `seal_to`, keeps each request's transit secret and
//! accepts one response per request, and names on each envelope the
//! sender its seal proves, `sender_peer_id`, and the network its membership
//! proof proves, `network_id`; so the plaintexts do not repeat them, which
//! keeps an idle round trip under 1 KB):
//!
//! - **Requester.** The `sync_with_peers` job ([`SyncHandler::run_job`])
//!   starts a session with every active address of every network we belong
//!   to, unless one is still running or the address is backed off, and
//!   with a few candidates (peers that responses named): it sends round 0 with the summary of
//!   our set (count and sum of ids, kept up to date in memory, see
//!   `event_set`). If the responder's summary is the same, the sets are the
//!   same and the session ends there: an idle round costs two small frames
//!   and no pass over the ids. Otherwise round 1 opens reconciliation with
//!   negentropy's first message. Each response ([`SyncHandler::process`]) is turned
//!   into `store_event` envelopes for the host's event store, the first
//!   one of a session records the address it answered from (a round trip:
//!   only the holder of the peer's key can answer), the peers it names are
//!   kept as candidates, never as addresses, and the session goes on at once with the next
//!   round: the next negentropy message plus up to `max_events_per_response`
//!   of the ids still needed. Up to `WINDOW` (4) requests of a session travel
//!   at once (only one of them carries a negentropy message, held back
//!   while a window's worth of ids is queued), so fetching a large
//!   difference does not wait a round trip per batch; they leave in order
//!   on one connection, as the responder's in-order check needs. When
//!   everything is answered and nothing is left, the session is complete and
//!   `addresses.last_sync_ms` records it. Ids only we have are not listed
//!   (and a request with a negentropy message says `missing_ids`, so that
//!   the responder answers our id lists with only the ids we lack, and a
//!   count of ours it lacks, rather than with all of its own):
//!   the other side pulls them in its own session, which it opens at once
//!   when our round 0's summary shows a set that differs and is no smaller
//!   than its own, or a request of ours says it is `behind`. A response that never
//!   comes while a later one of the session does was lost on the way: its
//!   ids are asked for again at once (see `State::answered`); a session
//!   that falls silent after answers sends its requests in flight again,
//!   once (see `RETRY_AFTER_MS`). An address that
//!   answers nothing is tried less and less often, then marked inactive
//!   and at last forgotten, on a back-off kept in the database so that a
//!   restart or a reload does not reset it (see `peers::backoff`).
//! - **Responder.** A request is answered only if it is not from us, we are
//!   a member of its network, it is fresh (its `timestamp_ms` within the
//!   transit TTL of our clock, and later than that of the last request we
//!   accepted from that peer in that network, so a captured request cannot
//!   be replayed), and it passes the rate limits
//!   kept in `sync_sessions` (new sessions on a 3 s schedule per peer and
//!   network, see `admit`; continuation rounds must belong to the current
//!   session and move forward, below `max_rounds_per_session`). The answer carries
//!   the negentropy reply, the events asked for (at most
//!   `max_events_per_response`, and at most 6 MiB: ids left out for either
//!   limit are listed in `deferred` and asked for again next round) and the
//!   network's other active addresses.
//!
//! The negentropy server side is stateless: the responder keeps no session,
//! only the in-memory copy of our set of ids that both sides share (rebuilt
//! from `events` after a restart or reload). The requester's sessions (negentropy client state and the queue of
//! needed ids, capped so that a hostile responder cannot fill it) live in
//! memory only: after a restart or a plugin reload the next tick simply
//! starts new sessions. What must outlast them is in plugin tables:
//! `sync_sessions` (the responder's limits), `sync_candidates` and
//! `sync_backoff`.
//!
//! Dropped requests and responses are counted in `counters` (shown by
//! `quiet-host status`): `sync_rejected_request`, `sync_replayed_request`,
//! `sync_rate_limited`, `sync_unknown_response`, `sync_rejected_response`;
//! so are sessions whose round 0 found the sets equal (`sync_sets_equal`)
//! or different (`sync_sets_differ`).
//!
//! The files follow the same split: `session` is the requester (its
//! `response` takes in answers, its `retry` copes with missing ones),
//! `responder` answers what `admission` lets through, `peers` keeps the
//! addresses both sides learn (its `candidates` the peers only named, its
//! `backoff` those that fail), `wire` reads and writes the messages, and
//! `limits` and `event_set` are what both sides share.

use std::{
    collections::HashMap,
    sync::{Mutex, MutexGuard},
};

mod admission;
mod event_set;
mod limits;
mod peers;
mod responder;
mod session;
#[cfg(test)]
mod test_host;
mod wire;

use crate::{
    limits::Limits,
    peers::{listen_addr, Addr, MAX_FAILURES, MAX_RETRY_INTERVAL_MS},
    session::{State, Target},
};

/// How often the job forgets what has failed for long (`peers::prune`):
/// the limit is a week, so once a minute is plenty.
const PRUNE_EVERY_MS: i64 = 60_000;
use quiet_plugin_api::{
    export_plugin, params, Context, Envelope, FilterContext, Handler, PluginError, Value,
};

/// The `sync` handler; see the [module docs](self).
#[derive(Default)]
pub struct SyncHandler {
    state: Mutex<State>,
}

impl SyncHandler {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Handler for SyncHandler {
    fn name(&self) -> &str {
        "sync"
    }

    fn event_types(&self) -> &[&str] {
        &["sync_request", "sync_response"]
    }

    /// Only what arrived from peers; our own requests and responses leave
    /// through the host without visiting handlers.
    fn filter(&self, env: &Envelope, _ctx: &FilterContext<'_>) -> bool {
        // Frames only: any member can store an event typed `sync_request`,
        // and a stored event (it has a verified author) is not a request.
        !env.is_outgoing() && env.plaintext().is_some() && env.author().is_none()
    }

    fn process(&self, env: &Envelope, ctx: &mut Context<'_>) -> Result<Vec<Envelope>, PluginError> {
        match env.event_type() {
            Some("sync_request") => self.answer(env, ctx),
            _ => self.continue_session(env, ctx),
        }
    }

    /// Starts a session with each active address that has none running,
    /// and sends again what sessions that fell silent asked for. Params:
    /// `max_events_per_response`, `transit_secret_ttl_ms`,
    /// `max_rounds_per_session`, and optionally `network_id` (else every
    /// network in `networks`).
    fn run_job(&self, ctx: &mut Context<'_>, params: &Value) -> Result<Vec<Envelope>, PluginError> {
        let limits = Limits::from_params(params)?;
        let only_network = params.str_or("network_id", "")?;
        let now = ctx.now_ms();
        let ours = ctx.identity().peer_id.to_string();
        let mut state = self.state();
        state.limits = limits;
        state.forget_expired(ctx, now)?;
        if now >= state.next_prune_ms || state.next_prune_ms > now + PRUNE_EVERY_MS {
            peers::prune(ctx, now)?;
            state.next_prune_ms = now.saturating_add(PRUNE_EVERY_MS);
        }
        let Some((reply_ip, reply_port)) = listen_addr(ctx)? else {
            ctx.debug("not listening: no reply address, so no sync requests");
            return Ok(Vec::new());
        };
        // Active addresses, and those marked inactive by failing (still
        // tried, at the longest back-off, until pruned), whose back-off is
        // over; a back-off far ahead means our clock stepped back.
        let targets = ctx.query(
            "SELECT a.peer_id, a.network_id, a.ip, a.port FROM addresses a \
             JOIN networks n ON n.network_id = a.network_id \
             LEFT JOIN sync_backoff b ON b.peer_id = a.peer_id AND b.network_id = a.network_id \
             AND b.ip = a.ip AND b.port = a.port \
             WHERE (a.is_active = 1 OR b.failures >= ?3) AND a.peer_id != ?1 \
             AND (?2 = '' OR a.network_id = ?2) \
             AND (b.next_try_ms IS NULL OR b.next_try_ms <= ?4 OR b.next_try_ms > ?4 + ?5) \
             ORDER BY a.network_id, a.peer_id",
            params![
                ours.as_str(),
                only_network,
                MAX_FAILURES,
                now,
                MAX_RETRY_INTERVAL_MS
            ],
        )?;
        let mut out = Vec::new();
        for k in state.stalled(now) {
            out.extend(state.retry(ctx, &k, now)?);
        }
        let reply = (reply_ip.as_str(), reply_port);
        for t in targets.iter() {
            let (Some(peer_id), Some(network_id), Some(ip), Some(port)) =
                (t.str(0), t.str(1), t.str(2), t.int(3))
            else {
                continue;
            };
            let to = Addr {
                peer_id,
                network_id,
                ip,
                port,
            };
            let target = Target {
                to,
                reply,
                candidate: false,
            };
            out.extend(state.start_session(ctx, target, false)?);
        }
        // Then a few candidates (see `peers::candidates`): a session that
        // one of them answers makes its address ours.
        let mut trying: HashMap<String, usize> = HashMap::new();
        for (k, _) in state.sessions.iter().filter(|(_, s)| s.candidate) {
            *trying.entry(k.1.clone()).or_default() += 1;
        }
        let sessions = &state.sessions;
        let busy = |peer: &str, net: &str| sessions.contains_key(&session::key(peer, net));
        let candidates = peers::candidates_to_try(ctx, &ours, only_network, &trying, busy, now)?;
        for (peer_id, network_id, ip, port) in &candidates {
            let to = Addr {
                peer_id,
                network_id,
                ip,
                port: *port,
            };
            let target = Target {
                to,
                reply,
                candidate: true,
            };
            out.extend(state.start_session(ctx, target, false)?);
        }
        Ok(out)
    }
}

/// Counts a dropped envelope and produces nothing.
fn dropped(ctx: &mut Context<'_>, name: &str) -> Result<Vec<Envelope>, PluginError> {
    counter(ctx, name)?;
    Ok(Vec::new())
}

/// Counts one `name` (`sync_…`) in the host's `counters`, through the
/// host: plugin SQL may not write that table.
fn counter(ctx: &mut Context<'_>, name: &str) -> Result<(), PluginError> {
    ctx.count(name, 1)
}

export_plugin! {
    name: "sync",
    version: env!("CARGO_PKG_VERSION"),
    migrations: [
        // The responder's rate limits: the current session of each requester.
        "CREATE TABLE IF NOT EXISTS sync_sessions (
            peer_id TEXT NOT NULL,
            network_id TEXT NOT NULL,
            session_id TEXT NOT NULL,
            started_ms INTEGER NOT NULL,
            last_round INTEGER NOT NULL,
            next_start_ms INTEGER NOT NULL,
            PRIMARY KEY (peer_id, network_id)
         )",
        // Replay protection: the `timestamp_ms` of the last request accepted.
        "ALTER TABLE sync_sessions ADD COLUMN last_request_ms INTEGER",
        // Peers that responses name, until one answers from that address
        // (see `peers::candidates`).
        "CREATE TABLE IF NOT EXISTS sync_candidates (
            peer_id TEXT NOT NULL,
            network_id TEXT NOT NULL,
            ip TEXT NOT NULL,
            port INTEGER NOT NULL,
            learned_from TEXT NOT NULL,
            learned_ms INTEGER NOT NULL,
            PRIMARY KEY (peer_id, network_id, ip, port)
         )",
        // Back-off of addresses and candidates that do not answer, kept
        // across restarts and reloads (see `peers::backoff`).
        "CREATE TABLE IF NOT EXISTS sync_backoff (
            peer_id TEXT NOT NULL,
            network_id TEXT NOT NULL,
            ip TEXT NOT NULL,
            port INTEGER NOT NULL,
            failures INTEGER NOT NULL,
            next_try_ms INTEGER NOT NULL,
            failing_since_ms INTEGER NOT NULL,
            PRIMARY KEY (peer_id, network_id, ip, port)
         )",
    ],
    handlers: [SyncHandler::default()],
}

#[cfg(test)]
mod tests {
    use quiet_plugin_api::Value;

    use crate::{event_set::SUMMARY_LEN, test_host::*};

    #[test]
    fn the_job_sends_one_round_0_request_per_active_peer() {
        let mut host = host("127.0.0.1:7001");
        add_address(&host, PEER_B, 7002, true);
        add_address(&host, PEER_OFF, 7003, false);
        let me = host.identity().peer_id.to_string();
        add_address(&host, &me, 7001, true);
        add_events(&host, 1, 0..3);
        let other_network = Value::map([("network_id", "net-2")]);
        host.run_job("sync", other_network).unwrap();
        assert!(host.take_sent().is_empty());
        host.run_job("sync", limits(1000)).unwrap();
        let sent = host.take_sent();
        assert_eq!(sent.len(), 1, "{sent:?}");
        let req = &sent[0];
        assert_eq!(req.event_type(), Some("sync_request"));
        assert!(req.is_outgoing());
        assert_eq!(req.str("seal_to"), Some(PEER_B));
        assert_eq!(req.str("dest_ip"), Some("127.0.0.1"));
        assert_eq!(req.int("dest_port"), Some(7002));
        assert_eq!(req.str("network_id"), Some(NET));
        assert_eq!(req.int("transit_ttl_ms"), Some(30_000));
        let text = |k| plaintext(req, k).as_str().unwrap();
        assert_eq!(text("type"), "sync_request");
        assert_eq!(plaintext(req, "request_id").as_bytes().unwrap().len(), 16);
        assert_eq!(plaintext(req, "session_id").as_bytes().unwrap().len(), 16);
        // Who sends, to whom, in which network: the host vouches for those
        // (the seal, the recipient it is sealed to, the membership proof),
        // so the plaintext does not repeat them.
        for vouched in ["network_id", "peer_id", "user_id", "target_peer_id"] {
            assert_eq!(plaintext(req, vouched), &Value::Null, "{vouched}");
        }
        assert_eq!(text("reply_ip"), "127.0.0.1");
        assert_eq!(plaintext(req, "reply_port").as_int(), Some(7001));
        assert_eq!(plaintext(req, "round").as_int(), Some(0));
        assert!(plaintext(req, "timestamp_ms").as_int().unwrap() > 0);
        assert_eq!(
            plaintext(req, "transit_secret").as_bytes().unwrap().len(),
            32
        );
        // Round 0 carries our set's summary (the count, then the sum of the
        // ids), not yet a reconciliation message.
        let summary = plaintext(req, "summary").as_bytes().unwrap();
        assert_eq!(summary.len(), SUMMARY_LEN);
        let count = host.count("SELECT COUNT(*) FROM events");
        assert_eq!(summary[..8], (count as u64).to_be_bytes());
        // Nothing else: empty fields are left out.
        assert_eq!(plaintext(req, "negentropy"), &Value::Null);
        assert_eq!(plaintext(req, "need"), &Value::Null);

        // The session is still running: no second request to that peer.
        host.run_job("sync", limits(1000)).unwrap();
        assert!(host.take_sent().is_empty());
        assert!(host.dead_letters().is_empty(), "{:?}", host.dead_letters());
    }

    #[test]
    fn a_host_that_does_not_listen_sends_no_requests() {
        let mut host = host("unused");
        host.db()
            .execute("DELETE FROM host_state WHERE key = 'listen_addr'", [])
            .unwrap();
        add_address(&host, PEER_B, 7002, true);
        host.run_job("sync", limits(1000)).unwrap();
        assert!(host.take_sent().is_empty());
    }
}
