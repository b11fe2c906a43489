//! What a session does when answers do not come. A response can be lost
//! on the way (a connection that drops), a session can fall silent, and a
//! peer can be gone for good. A lost response is asked for again as soon
//! as a later one shows it, and a silent session's after a few seconds,
//! rather than either waiting out the transit TTL; an address that answers
//! nothing is backed off, in the database (see `peers::backoff`).

use quiet_plugin_api::{Context, Envelope, PluginError};

use super::{InFlight, Key, Session, State, MAX_NEEDS};
use crate::{
    counter,
    peers::{self, Addr, MAX_FAILURES, MAX_RETRY_INTERVAL_MS},
};

/// How long a session that has been answered before may hear nothing at
/// all before its requests in flight count as lost and are sent again: a
/// lost last response is followed by no other that would show it (see
/// [`State::answered`]), and waiting for the session to expire cost the
/// transit TTL (30 s). A responder answers a round in milliseconds.
pub(super) const RETRY_AFTER_MS: i64 = 5_000;

/// How many times in a row a silent session sends again, [`RETRY_AFTER_MS`]
/// apart, before it waits for its requests to expire. More than once: on
/// a link that loses one frame in ten, a retry lost too (one in a hundred
/// silences) cost the TTL, and made a catch-up of 2,000 events take 48 s
/// instead of 3 (measured in the simulator). A peer gone for good costs
/// this many requests more per session.
pub(super) const MAX_RETRIES: u8 = 3;

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
        session.quiet_since_ms = now;
        session.retries = 0;
        Some((k, lost))
    }

    /// Sends again what `k`'s requests in flight asked for, counted as
    /// lost: the session has been answered before and has now heard
    /// nothing for [`RETRY_AFTER_MS`]. At most [`MAX_RETRIES`] times per
    /// silence.
    pub(crate) fn retry(
        &mut self,
        ctx: &mut Context<'_>,
        k: &Key,
        now: i64,
    ) -> Result<Vec<Envelope>, PluginError> {
        let session = self.sessions.get_mut(k).expect("a session to retry");
        session.retries += 1;
        session.quiet_since_ms = now;
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
    /// nothing for [`RETRY_AFTER_MS`] since, or since they last sent again,
    /// fewer than [`MAX_RETRIES`] times; sorted, so
    /// that their requests leave in the same order every run (a simulation
    /// replays exactly).
    pub(crate) fn stalled(&self, now: i64) -> Vec<Key> {
        let mut stalled: Vec<Key> = self
            .sessions
            .iter()
            .filter(|(_, s)| {
                s.heard
                    && s.retries < MAX_RETRIES
                    && !s.in_flight.is_empty()
                    && now.saturating_sub(s.quiet_since_ms) >= RETRY_AFTER_MS
            })
            .map(|(k, _)| k.clone())
            .collect();
        stalled.sort();
        stalled
    }

    /// Forgets sessions whose request in flight has expired (lost on the
    /// way, or dropped by the responder): the peer gets a new session, and
    /// the address of one that answered nothing at all counts one more
    /// failure (see `peers::backoff`), logged when it starts to be tried
    /// less often and when it is marked inactive.
    pub(crate) fn forget_expired(
        &mut self,
        ctx: &mut Context<'_>,
        now: i64,
    ) -> Result<(), PluginError> {
        let mut expired: Vec<&Session> = self
            .sessions
            .values()
            .filter(|s| now > s.expires_ms && !s.heard)
            .collect();
        // In the same order every run (a simulation replays exactly).
        expired.sort_by(|a, b| (&a.peer_id, &a.network_id).cmp(&(&b.peer_id, &b.network_id)));
        for s in expired {
            let addr = Addr {
                peer_id: &s.peer_id,
                network_id: &s.network_id,
                ip: &s.dest_ip,
                port: s.dest_port,
            };
            let at = format!("{}:{}", s.dest_ip, s.dest_port);
            match peers::failed(ctx, addr, now)? {
                2 => ctx.info(&format!(
                    "peer {} at {at} has not answered two sync sessions in a row in network {}: \
                     trying it less often (up to every {} s) until it answers or syncs with us",
                    s.peer_id,
                    s.network_id,
                    MAX_RETRY_INTERVAL_MS / 1000
                )),
                MAX_FAILURES => ctx.info(&format!(
                    "peer {} at {at} has not answered {MAX_FAILURES} sync sessions in a row in \
                     network {}: marked inactive (no longer given to others)",
                    s.peer_id, s.network_id
                )),
                _ => {}
            }
        }
        self.sessions.retain(|_, s| now <= s.expires_ms);
        let sessions = &self.sessions;
        self.requests.retain(|_, k| sessions.contains_key(k));
        // A schedule already due says nothing more than none at all.
        self.next_start_ms.retain(|_, due| *due > now);
        Ok(())
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
    fn a_session_silent_after_answers_sends_its_requests_again_a_few_times() {
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
        let to_b = |mut requests: Vec<quiet_plugin_api::Envelope>| {
            requests.retain(|r| r.str("seal_to") == Some(PEER_B));
            requests
        };
        // A tick before the silence has lasted RETRY_AFTER_MS sends nothing.
        at(super::RETRY_AFTER_MS - 1_000);
        let early = to_b(a.run_job(&limits(100)));
        assert!(early.is_empty(), "{early:?}");
        // One after it asks again for everything in flight; and again each
        // RETRY_AFTER_MS of silence after that, MAX_RETRIES times in all.
        let mut again = Vec::new();
        for n in 1..=super::MAX_RETRIES as i64 {
            at(n * super::RETRY_AFTER_MS + 1_000);
            again = to_b(a.run_job(&limits(100)));
            assert!(!again.is_empty(), "retry {n}");
            if n == 1 {
                let lost = counter(&a.host, "sync_lost_response");
                assert!((1..=WINDOW as i64).contains(&lost), "{lost} counted lost");
            }
        }
        // Then it waits: still nothing heard, nothing sent again.
        at((super::MAX_RETRIES as i64 + 2) * super::RETRY_AFTER_MS);
        let later = to_b(a.run_job(&limits(100)));
        assert!(later.is_empty(), "{later:?}");
        let second = exchange(&a, &b, again, 100, |_| false);
        set_thread_clock(None);

        let stored = each_once([first.stored, second.stored].concat());
        assert_eq!(stored.len(), 2_500);
        assert!(!with_b(&a), "complete");
    }
}
