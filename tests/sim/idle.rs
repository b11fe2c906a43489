//! What peers that are in sync cost each other on the wire: issue 4's goal
//! of at most 1 KB per idle round trip, checked on every build (bytes, not
//! time, so the check is exact). `scripts/bench.py --only idle` measures
//! the same on real sockets, with CPU.

use crate::{expect_within, network, sim, write_messages};
use quiet_host::sim::sync_jobs;

/// The most an idle round trip (a round-0 request and its answer) may
/// cost: the sum of the two frames' bytes.
const MAX_IDLE_ROUND_TRIP_BYTES: u64 = 1_000;

#[test]
fn an_idle_round_trip_costs_at_most_a_kilobyte() {
    let mut sim = sim(
        "an_idle_round_trip_costs_at_most_a_kilobyte",
        sync_jobs(&[]),
    );
    let net = network(&mut sim, 2, |_| 0);
    let ids = write_messages(&mut sim, 0, &net, 100);
    expect_within(&mut sim, "idle: convergence", 30_000, |s| {
        s.everyone_has(&net, &ids)
    });
    // Let the sessions that moved the events end.
    sim.run_for(10_000);
    let sessions = |s: &quiet_host::sim::Sim, name| s.counter(0, name) + s.counter(1, name);
    let (bytes, equal, differ) = (
        sim.stats().bytes_sent,
        sessions(&sim, "sync_sets_equal"),
        sessions(&sim, "sync_sets_differ"),
    );
    sim.run_for(60_000);
    let rounds = sessions(&sim, "sync_sets_equal") - equal;
    assert_eq!(
        sessions(&sim, "sync_sets_differ"),
        differ,
        "the sets differed"
    );
    // Each host starts a session every 3 s.
    assert!(rounds >= 30, "only {rounds} idle sessions in 60 s");
    let per_round_trip = (sim.stats().bytes_sent - bytes) / rounds as u64;
    eprintln!("sim: idle: {per_round_trip} bytes per round trip over {rounds} sessions");
    assert!(
        per_round_trip <= MAX_IDLE_ROUND_TRIP_BYTES,
        "an idle round trip costs {per_round_trip} bytes"
    );
}
