//! What a session does when answers do not come. A response can be lost
//! on the way (a connection that drops), a session can fall silent, and a
//! peer can be gone for good. A lost response is asked for again as soon
//! as a later one shows it, and a silent session's after a few seconds,
//! rather than either waiting out the transit TTL; a dead peer is tried
//! less and less often, since its address is never forgotten.

use quiet_plugin_api::{Context, Envelope, PluginError};

use super::{InFlight, Key, Session, State, MAX_NEEDS};
use crate::{admission::MIN_SESSION_INTERVAL_MS, counter};

/// How long a session that has been answered before may hear nothing at
/// all before its requests in flight count as lost and are sent again,
/// once: a lost last response is followed by no other that would show it
/// (see [`State::answered`]), and waiting for the session to expire cost
/// the transit TTL (30 s). A responder answers a round in milliseconds.
pub(super) const RETRY_AFTER_MS: i64 = 5_000;
/// The longest wait between sessions with a peer that does not answer;
/// see [`Unreachable`].
pub(crate) const MAX_RETRY_INTERVAL_MS: i64 = 300_000;

/// A peer that has not answered our last `failures` sessions (their round
/// 0 expired unanswered: it is down, or gone, or cut off). Addresses are
/// never forgotten (peers gossip them, and a peer may come back), so
/// without a back-off every host would open a session with every dead peer
/// every few seconds, for ever. After the second failure in a row the wait
/// doubles, from 6 s up to [`MAX_RETRY_INTERVAL_MS`]. Any answer from the
/// peer, or any request of its own, clears it.
pub(super) struct Unreachable {
    failures: u32,
    pub(super) retry_ms: i64,
}

impl Unreachable {
    /// The wait after `failures` unanswered sessions in a row.
    fn backoff_ms(failures: u32) -> i64 {
        match failures {
            0 | 1 => 0,
            n => MIN_SESSION_INTERVAL_MS
                .saturating_mul(1 << (n - 1).min(20))
                .min(MAX_RETRY_INTERVAL_MS),
        }
    }
}

impl Session {
    /// Puts the ids of requests whose responses were lost back at the
    /// head of the queue, and ends reconciliation if its request was
    /// among them (its reply cannot come): the session then fetches what
    /// it found so far and does not count as complete, so that the next
    /// one reconciles again.
    fn ask_again(&mut self, lost: Vec<InFlight>) {
        for request in lost.into_iter().rev() {
            if self.reconciling_request.as_ref() == Some(&request.request_id) {
                self.reconciling_request = None;
                self.reconciling = false;
                self.parked = None;
                self.dropped_needs = true;
            }
            for id in request.need.into_iter().rev() {
                if self.needs.len() >= MAX_NEEDS {
                    self.dropped_needs = true;
                    break;
                }
                self.needs.push_front(id);
            }
        }
    }
}

impl State {
    /// The session that `request_id` belongs to, with that request no
    /// longer in flight, and the requests sent before it that are still
    /// unanswered; `None` if there is none or it has expired.
    ///
    /// A responder answers a session's requests in order, and its answers
    /// leave in order on one connection, so those earlier responses were
    /// lost (a connection that dropped, say): the caller asks again for
    /// what they carried rather than wait out the session. Should one still
    /// arrive (it came on another connection), it is dropped as unknown and
    /// its events come again: bytes wasted, nothing lost.
    pub(super) fn answered(&mut self, request_id: &str, now: i64) -> Option<(Key, Vec<InFlight>)> {
        let k = self.requests.remove(request_id)?;
        let session = self.sessions.get_mut(&k)?;
        if now > session.expires_ms {
            self.sessions.remove(&k);
            return None;
        }
        let at = session
            .in_flight
            .iter()
            .position(|r| r.request_id == request_id)?;
        let lost: Vec<InFlight> = session.in_flight.drain(..=at).take(at).collect();
        session.heard = true;
        session.last_heard_ms = now;
        session.retried = false;
        Some((k, lost))
    }

    /// Sends again what `k`'s requests in flight asked for, counted as
    /// lost: the session has been answered before and has now heard
    /// nothing for [`RETRY_AFTER_MS`]. Once per silence.
    pub(crate) fn retry(
        &mut self,
        ctx: &mut Context<'_>,
        k: &Key,
        now: i64,
    ) -> Result<Vec<Envelope>, PluginError> {
        let session = self.sessions.get_mut(k).expect("a session to retry");
        session.retried = true;
        let lost: Vec<InFlight> = session.in_flight.drain(..).collect();
        self.lost(ctx, k, lost)?;
        self.advance(ctx, k, now)
    }

    /// Forgets `k`'s requests in `lost` (a late answer to one is then
    /// unknown), counts them, and queues what they asked for again.
    pub(super) fn lost(
        &mut self,
        ctx: &mut Context<'_>,
        k: &Key,
        lost: Vec<InFlight>,
    ) -> Result<(), PluginError> {
        for request in &lost {
            self.requests.remove(&request.request_id);
            counter(ctx, "sync_lost_response")?;
        }
        if let Some(session) = self.sessions.get_mut(k) {
            session.ask_again(lost);
        }
        Ok(())
    }

    /// The sessions that have been answered before and have heard
    /// nothing since for [`RETRY_AFTER_MS`], not yet retried; sorted, so
    /// that their requests leave in the same order every run (a simulation
    /// replays exactly).
    pub(crate) fn stalled(&self, now: i64) -> Vec<Key> {
        let mut stalled: Vec<Key> = self
            .sessions
            .iter()
            .filter(|(_, s)| {
                s.heard
                    && !s.retried
                    && !s.in_flight.is_empty()
                    && now.saturating_sub(s.last_heard_ms) >= RETRY_AFTER_MS
            })
            .map(|(k, _)| k.clone())
            .collect();
        stalled.sort();
        stalled
    }

    /// The peer of `k` answered, or asked: it is reachable again.
    pub(crate) fn heard_from(&mut self, ctx: &Context<'_>, k: &Key) {
        if self.unreachable.remove(k).is_some_and(|u| u.failures >= 2) {
            ctx.info(&format!(
                "peer {} answers again in network {}: back to the job's schedule",
                k.0, k.1
            ));
        }
    }

    /// Forgets sessions whose request in flight has expired (lost on the
    /// way, or dropped by the responder): the peer gets a new session, and
    /// one that answered nothing at all counts as unreachable (see
    /// [`Unreachable`]). Returns the peers that just became unreachable.
    pub(crate) fn forget_expired(&mut self, now: i64) -> Vec<Key> {
        let mut newly = Vec::new();
        for (k, s) in &self.sessions {
            if now <= s.expires_ms || s.heard {
                continue;
            }
            let u = self.unreachable.entry(k.clone()).or_insert(Unreachable {
                failures: 0,
                retry_ms: 0,
            });
            u.failures = u.failures.saturating_add(1);
            u.retry_ms = now.saturating_add(Unreachable::backoff_ms(u.failures));
            if u.failures == 2 {
                newly.push(k.clone());
            }
        }
        self.sessions.retain(|_, s| now <= s.expires_ms);
        let sessions = &self.sessions;
        self.requests.retain(|_, k| sessions.contains_key(k));
        // A schedule already due says nothing more than none at all.
        self.next_start_ms.retain(|_, due| *due > now);
        newly
    }
}

#[cfg(test)]
mod tests {
    use crate::{session::WINDOW, test_host::*};

    #[test]
    fn a_lost_response_is_asked_for_again_when_a_later_one_arrives() {
        let (a, b) = two_peers();
        add_events(&b.host, 1, 0..2_500);
        // The first response that only carries events is lost on the way;
        // the three requests sent after it are answered.
        let lost = std::cell::Cell::new(None);
        let outcome = session_losing(&a, &b, 100, |req| {
            let fetch_only =
                plaintext(req, "negentropy").is_null() && !list(req, "need").is_empty();
            if lost.get().is_none() && fetch_only {
                lost.set(plaintext(req, "round").as_int());
            }
            lost.get() == plaintext(req, "round").as_int()
        });
        assert!(lost.get().is_some());
        assert_eq!(counter(&a.host, "sync_lost_response"), 1);
        let stored = each_once(outcome.stored);
        let mut expected = event_bytes(1, 0..2_500);
        expected.sort();
        assert_eq!(
            stored.len(),
            expected.len(),
            "the lost response's events came again"
        );
        assert!(stored == expected);
        // Complete, without waiting for the session to expire.
        assert!(a.handler.state().sessions.is_empty());
        assert!(synced_with_b(&a));
    }

    #[test]
    fn a_session_silent_after_answers_sends_its_requests_again_once() {
        let (a, b) = two_peers();
        add_events(&b.host, 1, 0..2_500);
        // Every response from round 8 on is lost, the last ones among them:
        // no later answer shows the loss, and the session falls silent.
        let first = session_losing(&a, &b, 100, |req| {
            plaintext(req, "round").as_int().is_some_and(|r| r >= 8)
        });
        let with_b = |a: &Peer| a.handler.state().sessions.keys().any(|k| k.0 == PEER_B);
        assert!(with_b(&a), "the session is still waiting");
        let start = now_ms();
        let at = |ms: i64| set_thread_clock(Some(start + ms));
        // A tick before the silence has lasted RETRY_AFTER_MS sends nothing.
        at(super::RETRY_AFTER_MS - 1_000);
        let early: Vec<_> = a.run_job(&limits(100));
        assert!(
            early.iter().all(|r| r.str("seal_to") != Some(PEER_B)),
            "{early:?}"
        );
        // One after it asks again for everything in flight.
        at(super::RETRY_AFTER_MS + 1_000);
        let mut again = a.run_job(&limits(100));
        again.retain(|r| r.str("seal_to") == Some(PEER_B));
        assert!(!again.is_empty());
        let lost = counter(&a.host, "sync_lost_response");
        assert!((1..=WINDOW as i64).contains(&lost), "{lost} counted lost");
        // Once per silence: still nothing heard, nothing sent again.
        at(3 * super::RETRY_AFTER_MS);
        let later = a.run_job(&limits(100));
        assert!(
            later.iter().all(|r| r.str("seal_to") != Some(PEER_B)),
            "{later:?}"
        );
        let second = exchange(&a, &b, again, 100, |_| false);
        set_thread_clock(None);

        let stored = each_once([first.stored, second.stored].concat());
        assert_eq!(stored.len(), 2_500);
        assert!(!with_b(&a), "complete");
    }

    #[test]
    fn the_wait_for_an_unreachable_peer_doubles_up_to_five_minutes() {
        let waits: Vec<i64> = (0..12)
            .map(|n| super::Unreachable::backoff_ms(n) / 1000)
            .collect();
        // One unanswered session is forgiven: a live responder may refuse a
        // round 0 silently (its rate limit, after our restart).
        assert_eq!(waits, [0, 0, 6, 12, 24, 48, 96, 192, 300, 300, 300, 300]);
        assert_eq!(super::Unreachable::backoff_ms(u32::MAX), 300_000);
    }
}
