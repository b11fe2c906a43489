//! The requester's sessions, one per peer and network. A session lives in
//! memory across its rounds because reconciliation takes several: it holds
//! the ids negentropy found we lack until they are fetched, a window of
//! requests in flight so that fetching is not a round trip per batch, and
//! what it takes to notice a lost response and ask again.

mod response;
mod retry;

use std::collections::{HashMap, VecDeque};

use negentropy::{Id, Negentropy};
use quiet_plugin_api::{envelope, params, Context, Envelope, PluginError, Value};

use crate::{
    admission::MIN_SESSION_INTERVAL_MS,
    counter,
    event_set::{EventSet, SUMMARY_LEN},
    limits::{Limits, FRAME_SIZE_LIMIT},
    peers::Addr,
    wire::{message, random_bytes},
};

/// How long a round 0 waits for its answer before the session is given up
/// (the next tick starts another). A responder answers round 0 at once,
/// or not at all when its rate limit refuses it (after our restart, say):
/// waiting out the transit secret's whole life then cost 30 s.
const ROUND_0_TIMEOUT_MS: i64 = 5_000;
/// Requests of one session in flight at once: fetching needed ids is
/// latency-bound, so several batches travel while one is being stored.
pub(crate) const WINDOW: usize = 4;
/// Ids one session may queue (3.2 MB): bounds what a hostile responder can
/// make us hold. Ids beyond are dropped; the next session reconciles again.
const MAX_NEEDS: usize = 100_000;

/// Sessions are keyed by `(peer_id, network_id)`.
pub(crate) type Key = (String, String);

pub(crate) fn key(peer_id: &str, network_id: &str) -> Key {
    (peer_id.to_owned(), network_id.to_owned())
}

/// The handler's memory: the requester's sessions, and what both sides
/// share (the job's limits, our sets of ids). Memory only: a restart or a
/// reload costs the sessions running, and the next tick starts new ones.
#[derive(Default)]
pub(crate) struct State {
    pub(crate) limits: Limits,
    /// Our events per network, kept up to date between rounds and sessions.
    pub(crate) sets: HashMap<String, EventSet>,
    pub(crate) sessions: HashMap<Key, Session>,
    /// The requests in flight: request id → session.
    requests: HashMap<String, Key>,
    /// When the job next forgets what has failed for long (see
    /// `peers::prune`): once a minute is plenty for a week's limit.
    pub(crate) next_prune_ms: i64,
    /// When each peer's responder admits our next new session: the same
    /// virtual schedule as its `admit` keeps, so that a session we start
    /// early (answering a peer whose set differs) never makes it refuse the
    /// next one of our job.
    pub(crate) next_start_ms: HashMap<Key, i64>,
}

/// A request of a session that has not been answered yet.
struct InFlight {
    request_id: String,
    /// The ids it asked for, asked again if its response is lost.
    need: Vec<Id>,
}

/// One requester-side session with a peer, in one network.
pub(crate) struct Session {
    peer_id: String,
    network_id: String,
    dest_ip: String,
    dest_port: i64,
    reply_ip: String,
    reply_port: i64,
    /// Whether the peer is only a candidate at this address (see
    /// `peers::candidates`): the job tries a few at a time.
    pub(crate) candidate: bool,
    /// Whether an answer from the peer has recorded its address (see
    /// `peers::promote`): once per session.
    promoted: bool,
    session_id: [u8; 16],
    /// The round the next request will carry.
    round: i64,
    /// Requests sent and not yet answered, oldest first, at most
    /// [`WINDOW`]; see [`State::answered`].
    in_flight: VecDeque<InFlight>,
    /// The request in flight that carries our latest negentropy message.
    reconciling_request: Option<String>,
    /// Whether reconciliation is under way; then the request in flight
    /// carries our latest negentropy message. The negentropy client is made
    /// afresh for each reply, over our set as last brought up to date (a
    /// negentropy initiator keeps no state between rounds besides being
    /// one), so that no session pins an old version of the set: while
    /// events arrive, a pinned version made every update copy the whole set
    /// (40 MB at a million events) and kept both.
    reconciling: bool,
    /// Our next negentropy message, held back while the queue of needed
    /// ids holds a window's worth or more: reconciliation can find ids far
    /// faster than they are fetched, and they would pile up past
    /// [`MAX_NEEDS`] (and be dropped) in a large catch-up.
    parked: Option<Vec<u8>>,
    /// Reconciliation found ids only we have, and the next request is to
    /// say so (`behind`), so that the peer pulls them.
    tell_behind: bool,
    /// The peer has been told.
    told_behind: bool,
    /// The summary of our set that round 0 carried.
    summary: [u8; SUMMARY_LEN],
    /// Ids we need and have not asked for yet, at most [`MAX_NEEDS`].
    pub(crate) needs: VecDeque<Id>,
    /// Whether ids were dropped for [`MAX_NEEDS`]: then the session is not
    /// complete, whatever the queue says.
    dropped_needs: bool,
    /// The `timestamp_ms` of the latest request: each next one is later,
    /// since the responder refuses any other as a replay.
    sent_ms: i64,
    /// When the request in flight counts as lost.
    expires_ms: i64,
    /// Whether any response of this session arrived.
    heard: bool,
    /// When the latest response arrived, the session started, or its
    /// requests were last sent again for silence.
    quiet_since_ms: i64,
    /// How many times the requests in flight were sent again for silence,
    /// since the latest response; see [`RETRY_AFTER_MS`](retry::RETRY_AFTER_MS).
    retries: u8,
}

impl Session {
    /// Queues `ids`, up to [`MAX_NEEDS`].
    fn queue(&mut self, ids: impl IntoIterator<Item = Id>) {
        let mut ids = ids.into_iter();
        let room = MAX_NEEDS.saturating_sub(self.needs.len());
        self.needs.extend(ids.by_ref().take(room));
        self.dropped_needs |= ids.next().is_some();
    }
}

/// Whom a session is with: the peer, network and address it is sent to,
/// the reply address it asks for, and whether the peer is a candidate.
pub(crate) struct Target<'a> {
    pub(crate) to: Addr<'a>,
    pub(crate) reply: (&'a str, i64),
    pub(crate) candidate: bool,
}

impl State {
    /// Starts a session with `target`, and returns its round 0: only our set's summary, so that peers in
    /// sync are done after it and only peers that differ reconcile; or,
    /// when the peer has just told us we are `behind`, reconciliation's
    /// first message at once (the summaries are known to differ, and the
    /// round trip saved is one through both engines' queues). `None` if one
    /// is running or the peer would not admit a new one yet.
    pub(crate) fn start_session(
        &mut self,
        ctx: &mut Context<'_>,
        target: Target<'_>,
        behind: bool,
    ) -> Result<Option<Envelope>, PluginError> {
        let now = ctx.now_ms();
        let Target {
            to,
            reply,
            candidate,
        } = target;
        let (peer_id, network_id) = (to.peer_id, to.network_id);
        let k = key(peer_id, network_id);
        let due = self.next_start_ms.get(&k).copied().unwrap_or(i64::MIN);
        // A schedule far ahead means our clock stepped back: start afresh.
        let due = if due > now.saturating_add(MIN_SESSION_INTERVAL_MS) {
            i64::MIN
        } else {
            due
        };
        // The job leaves out addresses in back-off (see `peers::backoff`),
        // and a peer that asks us is not in back-off.
        if self.sessions.contains_key(&k) || now < due {
            return Ok(None);
        }
        self.next_start_ms.insert(
            k.clone(),
            due.max(now).saturating_add(MIN_SESSION_INTERVAL_MS),
        );
        let set = event_set(&mut self.sets, ctx, network_id)?;
        let summary = set.summary();
        let opening = match behind {
            true => {
                let first = Negentropy::owned(set.storage(), FRAME_SIZE_LIMIT)?.initiate()?;
                counter(ctx, "sync_sets_differ")?;
                Opening::Negentropy(first)
            }
            false => Opening::Summary(summary),
        };
        let session = Session {
            peer_id: peer_id.to_owned(),
            network_id: network_id.to_owned(),
            dest_ip: to.ip.to_owned(),
            dest_port: to.port,
            reply_ip: reply.0.to_owned(),
            reply_port: reply.1,
            candidate,
            promoted: false,
            session_id: random_bytes(),
            round: 0,
            in_flight: VecDeque::new(),
            reconciling_request: None,
            reconciling: behind,
            parked: None,
            tell_behind: false,
            told_behind: false,
            summary,
            needs: VecDeque::new(),
            dropped_needs: false,
            sent_ms: 0,
            expires_ms: 0,
            heard: false,
            quiet_since_ms: now,
            retries: 0,
        };
        self.sessions.insert(k.clone(), session);
        Ok(Some(self.send(&k, opening, now)))
    }

    /// Builds the request for `session`'s current round (with `opening`
    /// and the next batch of needed ids) and keeps the session until its
    /// response arrives or the request expires.
    fn send(&mut self, k: &Key, opening: Opening, now: i64) -> Envelope {
        let session = self.sessions.get_mut(k).expect("a session to send for");
        let reconciles = !matches!(opening, Opening::Nothing);
        let negentropy_message = matches!(opening, Opening::Negentropy(_));
        let patience = match session.round {
            0 => ROUND_0_TIMEOUT_MS.min(self.limits.ttl_ms),
            _ => self.limits.ttl_ms,
        };
        let (negentropy, summary) = match opening {
            Opening::Nothing => (Value::Null, Value::Null),
            Opening::Summary(s) => (Value::Null, Value::from(&s[..])),
            Opening::Negentropy(m) => (Value::from(m), Value::Null),
        };
        let batch = session.needs.len().min(self.limits.max_events);
        let ids: Vec<Id> = session.needs.drain(..batch).collect();
        let need: Vec<Value> = ids.iter().map(|id| Value::from(**id)).collect();
        let request_id = random_bytes::<16>();
        // Rounds within one millisecond (or after our clock stepped back)
        // still carry increasing timestamps.
        session.sent_ms = now.max(session.sent_ms.saturating_add(1));
        session.expires_ms = now.saturating_add(patience);
        let plaintext = message([
            ("type", Value::from("sync_request")),
            ("request_id", request_id.into()),
            ("transit_secret", random_bytes::<32>().into()),
            ("timestamp_ms", session.sent_ms.into()),
            ("reply_ip", session.reply_ip.as_str().into()),
            ("reply_port", session.reply_port.into()),
            ("session_id", session.session_id.into()),
            ("round", session.round.into()),
            ("summary", summary),
            // Our reconciler skips the ids only we have, so the answer to an
            // id list of ours need only list the ids we lack.
            ("missing_ids", negentropy_message.then_some(true).into()),
            ("negentropy", negentropy),
            ("need", need.into()),
            ("behind", session.tell_behind.then_some(true).into()),
        ]);
        session.told_behind |= session.tell_behind;
        session.tell_behind = false;
        let env = envelope! {
            "event_type" => "sync_request",
            "is_outgoing" => true,
            "seal_to" => session.peer_id.as_str(),
            "dest_ip" => session.dest_ip.as_str(),
            "dest_port" => session.dest_port,
            "network_id" => session.network_id.as_str(),
            "transit_ttl_ms" => self.limits.ttl_ms,
            "event_plaintext" => plaintext,
        };
        session.round += 1;
        let request_id = hex::encode(request_id);
        if reconciles {
            session.reconciling_request = Some(request_id.clone());
        }
        session.in_flight.push_back(InFlight {
            request_id: request_id.clone(),
            need: ids,
        });
        self.requests.insert(request_id, k.clone());
        env
    }

    /// After a response (or a retry): completes `k`'s session if nothing
    /// is left, or sends its next requests, keeping up to [`WINDOW`] in
    /// flight.
    fn advance(
        &mut self,
        ctx: &mut Context<'_>,
        k: &Key,
        now: i64,
    ) -> Result<Vec<Envelope>, PluginError> {
        let session = self.sessions.get_mut(k).expect("a session to advance");
        let done = !session.reconciling && session.needs.is_empty();
        if done && session.in_flight.is_empty() && !session.tell_behind {
            let session = self.sessions.remove(k).expect("still there");
            // Ids dropped for MAX_NEEDS are still missing: the session is not
            // complete, and the next one reconciles again.
            if !session.dropped_needs {
                ctx.execute(
                    "UPDATE addresses SET last_sync_ms = ?3 WHERE peer_id = ?1 AND network_id = ?2",
                    params![session.peer_id.as_str(), session.network_id.as_str(), now],
                )?;
            }
            return Ok(Vec::new());
        }
        // The next reconciliation message goes at once (with needed ids)
        // unless a window's worth of ids is still queued; meanwhile, and
        // once reconciliation is over, more requests for needed ids keep up
        // to WINDOW in flight, so that fetching does not wait a round trip
        // per batch. They leave in order on one connection, which the
        // responder's check that rounds move forward relies on.
        let window_ids = WINDOW * self.limits.max_events;
        let mut out = Vec::new();
        loop {
            let session = self.sessions.get_mut(k).expect("still there");
            let release = session.needs.len() < window_ids && session.in_flight.len() < WINDOW;
            let message = match release {
                true => session.parked.take(),
                false => None,
            };
            // Telling the peer it is behind is worth a request of its own
            // once nothing else is left to send.
            let more = message.is_some()
                || (!session.needs.is_empty() && session.in_flight.len() < WINDOW)
                || (session.tell_behind && session.in_flight.is_empty());
            if !more {
                break;
            }
            if session.round >= self.limits.max_rounds {
                ctx.warn(&format!(
                    "sync session with {} in {} ended after {} rounds with {} ids still needed",
                    session.peer_id,
                    session.network_id,
                    self.limits.max_rounds,
                    session.needs.len()
                ));
                if session.in_flight.is_empty() {
                    self.sessions.remove(k);
                }
                break;
            }
            let opening = message.map_or(Opening::Nothing, Opening::Negentropy);
            out.push(self.send(k, opening, now));
        }
        Ok(out)
    }
}

/// What a request carries to move reconciliation on, besides needed ids.
enum Opening {
    /// Nothing: the request only fetches ids.
    Nothing,
    /// Round 0: the summary of our set.
    Summary([u8; SUMMARY_LEN]),
    /// A negentropy message.
    Negentropy(Vec<u8>),
}

/// Our events of `network_id`, brought up to date in `sets`.
pub(crate) fn event_set<'s>(
    sets: &'s mut HashMap<String, EventSet>,
    ctx: &mut Context<'_>,
    network_id: &str,
) -> Result<&'s EventSet, PluginError> {
    let set = EventSet::current(sets.remove(network_id), ctx, network_id)?;
    Ok(sets.entry(network_id.to_owned()).or_insert(set))
}

#[cfg(test)]
mod tests {
    use quiet_plugin_api::Value;

    use crate::{limits::FRAME_SIZE_LIMIT, test_host::*};

    #[test]
    fn a_session_pulls_every_missing_event_in_bounded_rounds() {
        let (a, b) = two_peers();
        add_events(&b.host, 1, 0..2_500);
        let outcome = session(&a, &b, 1000);
        let stored = each_once(outcome.stored);
        let mut expected = event_bytes(1, 0..2_500);
        expected.sort();
        assert_eq!(stored, expected);
        assert!(outcome.rounds >= 3, "1000 events per round");
        // A holds nothing B lacks, so B opens no session of its own.
        assert_eq!(outcome.reverse, 0);

        // The session is complete: recorded, and forgotten, so the next tick
        // starts a new one; and A learned about peer-c from B, as a
        // candidate to try.
        assert!(synced_with_b(&a));
        assert_eq!(
            listed(&a.host, "sync_candidates"),
            format!("{PEER_C} 127.0.0.1 7003")
        );
        let next: Vec<_> = a
            .run_job(&limits(1000))
            .iter()
            .map(|r| r.str("seal_to").unwrap().to_owned())
            .collect();
        assert_eq!(next, [PEER_B, PEER_C]);
    }

    #[test]
    fn ten_thousand_events_arrive_through_a_limit_of_a_thousand() {
        let (a, b) = two_peers();
        add_events(&b.host, 1, 0..10_000);
        let outcome = session(&a, &b, 1000);
        assert_eq!(outcome.stored.len(), 10_000);
        eprintln!("10,000 events in {} rounds", outcome.rounds);
    }

    #[test]
    fn reconciliation_finds_ids_no_faster_than_they_are_fetched() {
        // More ids than one reconciliation reply lists: the next message is
        // held back while a window's worth is queued, then sent.
        let (a, b) = two_peers();
        let n = 2 * FRAME_SIZE_LIMIT as u32 / 32 + 1_000;
        add_events(&b.host, 1, 0..n);
        let outcome = session(&a, &b, 1000);
        assert_eq!(each_once(outcome.stored).len(), n as usize);
        assert!(synced_with_b(&a), "the session completed");
    }

    #[test]
    fn a_sessions_requests_carry_increasing_timestamps() {
        let (a, _b) = two_peers();
        let first = a.run_job(&limits(1000)).pop().unwrap();
        let t0 = plaintext(&first, "timestamp_ms").as_int().unwrap();
        let mut request_id = first.plaintext().unwrap().get("request_id").cloned();
        let mut sent = vec![t0];
        let mut state = a.handler.state();
        // Two more rounds within the same millisecond, then one after our
        // clock stepped back.
        for now in [t0, t0, t0 - 5_000] {
            let id = hex::encode(request_id.as_ref().and_then(Value::as_bytes).unwrap());
            let (k, _) = state.answered(&id, now).unwrap();
            let next = state.send(&k, super::Opening::Nothing, now);
            sent.push(plaintext(&next, "timestamp_ms").as_int().unwrap());
            request_id = next.plaintext().unwrap().get("request_id").cloned();
        }
        assert_eq!(sent, [t0, t0 + 1, t0 + 2, t0 + 3]);
    }

    #[test]
    fn a_responder_cannot_queue_more_than_max_needs() {
        let (a, b) = two_peers();
        let params = limits(super::MAX_NEEDS as i64);
        b.run_job(&params);
        let request = a.run_job(&params).pop().unwrap();
        let response = b.process(&arrived(&request, PEER_A)).remove(0);
        // B ends the reconciliation and claims to defer more than the cap.
        let flood: Vec<Value> = (0..super::MAX_NEEDS as u32 + 5)
            .map(|i| event_id(7, i).into())
            .collect();
        let response = with_field(response, "deferred", flood);
        let response = with_field(response, "negentropy", Value::Null);
        let next = a.process(&arrived(&response, PEER_B)).pop().unwrap();
        let need = plaintext(&next, "need").as_list().unwrap();
        assert_eq!(need.len(), super::MAX_NEEDS);
        assert_eq!(
            need.last(),
            Some(&event_id(7, super::MAX_NEEDS as u32 - 1).into())
        );
        assert!(a
            .handler
            .state()
            .sessions
            .values()
            .all(|s| s.needs.is_empty()));

        // B has none of them: the queue empties, but the dropped ids were
        // never asked for, so the session is not recorded as complete.
        let response = b.process(&arrived(&next, PEER_A)).pop().unwrap();
        assert!(a.process(&arrived(&response, PEER_B)).is_empty());
        assert_eq!(
            a.host.count(&format!(
                "SELECT COUNT(*) FROM addresses WHERE peer_id = '{PEER_B}' AND last_sync_ms IS NULL"
            )),
            1
        );
        assert!(a.handler.state().sessions.is_empty());
    }
}
