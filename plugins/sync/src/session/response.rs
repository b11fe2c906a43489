//! Taking in a response: its events go to the host's store, the address
//! it answered from to `addresses` (a round trip: see `peers::promote`),
//! the peers it names to the candidates, its reply moves reconciliation on, and the
//! session's next round leaves at once rather than at the next tick. A
//! response is trusted only as far as it matches the session it answers;
//! a malformed one ends the session, since the host accepts one response
//! per request, and the next tick starts afresh.

use std::collections::HashMap;

use negentropy::Negentropy;
use quiet_plugin_api::{envelope, field, Context, Envelope, PluginError};

use super::event_set;
use crate::{
    counter, dropped,
    event_set::EventSet,
    limits::FRAME_SIZE_LIMIT,
    peers::{learn_candidates, promote, Addr},
    wire::Response,
    SyncHandler,
};

impl SyncHandler {
    /// Requester: takes in one response and sends the session's next round,
    /// or completes the session.
    pub(crate) fn continue_session(
        &self,
        env: &Envelope,
        ctx: &mut Context<'_>,
    ) -> Result<Vec<Envelope>, PluginError> {
        let now = ctx.now_ms();
        let mut guard = self.state();
        let state = &mut *guard;
        let answered = env
            .str(field::IN_RESPONSE_TO)
            .and_then(|id| state.answered(id, now));
        let Some((k, lost)) = answered else {
            return dropped(ctx, "sync_unknown_response");
        };
        state.lost(ctx, &k, lost)?;
        let session = state.sessions.get_mut(&k).expect("answered() checked it");
        let response = Response::parse(env).filter(|r| {
            r.peer_id == session.peer_id
                && r.network_id == session.network_id
                && r.session_id == session.session_id
        });
        // The host accepts one response per request, so a bad one ends the
        // session; the next tick starts a new one.
        let Some(resp) = response else {
            state.sessions.remove(&k);
            return dropped(ctx, "sync_rejected_response");
        };
        let ours = ctx.identity().peer_id.to_string();
        let mut out: Vec<Envelope> = resp
            .events
            .iter()
            .map(|event| {
                envelope! {
                    "event_type" => "store_event",
                    "network_id" => session.network_id.as_str(),
                    "event_ciphertext" => *event,
                }
            })
            .collect();
        if !session.promoted {
            session.promoted = true;
            let addr = Addr {
                peer_id: &session.peer_id,
                network_id: &session.network_id,
                ip: &session.dest_ip,
                port: session.dest_port,
            };
            promote(ctx, addr, now)?;
        }
        learn_candidates(
            ctx,
            &session.network_id,
            resp.peers,
            &ours,
            &session.peer_id,
            now,
        )?;
        session.queue(resp.deferred);

        // Only the answer to our reconciliation request carries its reply
        // (the others only fetch ids). A responder that does not answer our
        // negentropy message ends the reconciliation; the needs already
        // found are still fetched.
        let mut next = None;
        let answers_reconciliation = session.reconciling_request.is_some()
            && session.reconciling_request.as_deref() == env.str(field::IN_RESPONSE_TO);
        let reconciling = if answers_reconciliation {
            session.reconciling_request = None;
            std::mem::take(&mut session.reconciling)
        } else {
            false
        };
        if answers_reconciliation && !reconciling {
            // The answer to round 0: a summary like ours means the sets are
            // the same; otherwise reconciliation opens now.
            if resp.summary == Some(session.summary) {
                counter(ctx, "sync_sets_equal")?;
            } else {
                counter(ctx, "sync_sets_differ")?;
                let storage = event_set(&mut state.sets, ctx, &k.1)?.storage();
                next = Some(Negentropy::owned(storage, FRAME_SIZE_LIMIT)?.initiate()?);
                session.reconciling = true;
            }
        } else if reconciling && !resp.negentropy.is_empty() {
            // Our set as last brought up to date (by round 0 of our
            // sessions and of the peers' ones we answer), not refreshed for
            // each reply: a refresh re-sorts the whole set, and a reply
            // comes every few dozen milliseconds in a catch-up. It may
            // have grown since our last message (with events of this very
            // session), which only makes ranges we have since filled in
            // compare equal; the reconciler used to keep the set of its
            // first message, which is older still.
            let storage = known_set(&mut state.sets, ctx, &k.1)?.storage();
            let mut reconciler = Negentropy::owned(storage, FRAME_SIZE_LIMIT)?;
            reconciler.set_initiator();
            // The ids only we have are the other side's to pull; listed,
            // they were 32 bytes each (32 MB when it holds none of a
            // million).
            reconciler.skip_have_ids();
            let (mut have, mut need) = (Vec::new(), Vec::new());
            match reconciler.reconcile_with_ids(resp.negentropy, &mut have, &mut need) {
                Ok(msg) => {
                    // negentropy lists needed ids out of a HashSet, in an
                    // order that changes from process to process; sorted,
                    // the batches fetched (and so a simulated run) are the
                    // same every time.
                    need.sort_unstable();
                    session.queue(need);
                    if reconciler.skipped_have_ids() > 0 && !session.told_behind {
                        session.tell_behind = true;
                    }
                    session.reconciling = msg.is_some();
                    next = msg;
                }
                Err(e) => {
                    ctx.debug(&format!(
                        "bad negentropy reply from {}: {e}",
                        session.peer_id
                    ));
                    state.sessions.remove(&k);
                    counter(ctx, "sync_rejected_response")?;
                    return Ok(out);
                }
            }
        }

        // `reconciling` stays set while a message is parked.
        if next.is_some() {
            session.parked = next;
        }
        out.extend(state.advance(ctx, &k, now)?);
        Ok(out)
    }
}

/// Our events of `network_id` as last brought up to date, loaded if they
/// never were.
fn known_set<'s>(
    sets: &'s mut HashMap<String, EventSet>,
    ctx: &mut Context<'_>,
    network_id: &str,
) -> Result<&'s EventSet, PluginError> {
    if sets.contains_key(network_id) {
        return Ok(&sets[network_id]);
    }
    event_set(sets, ctx, network_id)
}

#[cfg(test)]
mod tests {
    use quiet_plugin_api::{envelope, Value};

    use crate::test_host::*;

    #[test]
    fn a_response_to_no_request_of_ours_is_dropped_and_counted() {
        let mut host = host("127.0.0.1:7001");
        host.deliver(vec![envelope! {
            "event_type" => "sync_response",
            "is_outgoing" => false,
            "in_response_to" => hex::encode(new_id()),
            "sender_peer_id" => PEER_B,
            "network_id" => NET,
            "event_plaintext" => Value::map([
                ("type", Value::from("sync_response")),
                ("session_id", new_id().into()),
                ("events", vec![Value::from(b"evil".to_vec())].into()),
            ]),
        }])
        .unwrap();
        assert!(host.take_sent().is_empty());
        assert_eq!(counter(&host, "sync_unknown_response"), 1);
        assert!(host.dead_letters().is_empty(), "{:?}", host.dead_letters());
    }

    #[test]
    fn a_session_pulls_only_the_difference_and_ends_at_once_when_in_sync() {
        let (a, b) = two_peers();
        add_events(&b.host, 1, 0..2_500);
        add_events(&a.host, 1, 500..1_500); // a thousand of B's
        add_events(&a.host, 2, 0..300); // and some only A has
        let outcome = session(&a, &b, 1000);
        // What only A has, B pulls in a session of its own, opened at once.
        assert_eq!(outcome.reverse, 1);
        let mut stored = outcome.stored;
        stored.sort();
        let mut expected = event_bytes(1, 0..500);
        expected.extend(event_bytes(1, 1_500..2_500));
        expected.sort();
        assert_eq!(stored, expected);

        // Once A has stored them, the next session finds nothing to pull
        // (what only A has is B's to pull)...
        add_events(&a.host, 1, 0..500);
        add_events(&a.host, 1, 1_500..2_500);
        let later = |b: &Peer| {
            b.host
                .db()
                .execute("DELETE FROM sync_sessions", [])
                .unwrap()
        };
        later(&b);
        assert!(session(&a, &b, 1000).stored.is_empty());
        // ...and with equal sets a session is one round trip.
        add_events(&b.host, 2, 0..300);
        later(&b);
        let again = session(&a, &b, 1000);
        assert!(again.stored.is_empty());
        assert_eq!(again.rounds, 1);
    }

    #[test]
    fn a_late_response_is_dropped_and_counted() {
        let (a, b) = two_peers();
        let params = Value::map([("transit_secret_ttl_ms", 1)]);
        let request = a.run_job(&params).pop().unwrap();
        let response = b.process(&arrived(&request, PEER_A)).remove(0);
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(a.process(&arrived(&response, PEER_B)).is_empty());
        assert_eq!(counter(&a.host, "sync_unknown_response"), 1);
    }

    #[test]
    fn a_response_from_another_peer_ends_the_session() {
        let (a, b) = two_peers();
        add_events(&b.host, 1, 0..10);
        let request = a.run_job(&limits(1000)).pop().unwrap();
        let response = b.process(&arrived(&request, PEER_A)).remove(0);
        assert!(a.process(&arrived(&response, PEER_X)).is_empty());
        assert_eq!(counter(&a.host, "sync_rejected_response"), 1);
        // The request was used up; a replay is unknown.
        assert!(a.process(&arrived(&response, PEER_B)).is_empty());
        assert_eq!(counter(&a.host, "sync_unknown_response"), 1);
    }
}
