//! Dependencies on the simulator: an event is projected only after the
//! events it depends on, on every host, whatever order sync brings them in.

use quiet_host::sim::{seed_for, sync_jobs, LinkSpec, Sim, SimConfig};
use quiet_test_support::plugin;

use crate::{expect_within, network};

#[test]
fn a_reaction_arriving_before_its_message_is_projected_after_it_on_every_host() {
    let config = SimConfig {
        jobs_yaml: sync_jobs(&[("max_events_per_response", 1)]),
        ..SimConfig::new(
            seed_for("a_reaction_arriving_before_its_message"),
            [
                "quiet-sync-plugin",
                "quiet-messages-plugin",
                "quiet-reactions-plugin",
            ]
            .iter()
            .map(|p| plugin(p, "v1"))
            .collect(),
        )
    };
    let mut sim = Sim::new(config).expect("starting the simulation");
    let net = network(&mut sim, 3, |_| 0);
    sim.set_all_links(LinkSpec {
        latency_ms: (5, 150),
        reorder: 0.3,
        ..LinkSpec::default()
    });
    // A's clock runs 10 s ahead: its messages carry later times than the
    // reactions C makes to them a moment after, so sync, which sends older
    // events first, brings B each reaction before its message.
    sim.set_clock_skew(0, 10_000);
    sim.partition(&[&[0, 2], &[1]]);
    let texts: Vec<String> = (0..10).map(|i| format!("message {i}")).collect();
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let messages = sim.send_messages(0, &net, &texts).unwrap();
    expect_within(&mut sim, "C has A's messages", 30_000, |s| {
        s.has(2, &net, &messages)
    });
    let reactions: Vec<String> = messages
        .iter()
        .map(|m| {
            sim.send_event(
                2,
                &net,
                "reaction",
                r#"{"emoji": "👍"}"#,
                std::slice::from_ref(m),
            )
            .unwrap()
        })
        .collect();
    expect_within(&mut sim, "A has C's reactions", 30_000, |s| {
        s.has(0, &net, &reactions)
    });
    sim.heal();
    expect_within(
        &mut sim,
        "every host projects every reaction",
        120_000,
        |s| (0..3).all(|i| s.query_i64(i, "SELECT COUNT(*) FROM reactions") == 10),
    );
    let waited: i64 = (0..3).map(|i| sim.counter(i, "events_waited")).sum();
    assert!(
        waited > 0,
        "no reaction arrived before its message: the test proves nothing"
    );
    for i in 0..3 {
        // Every reaction routed (so projected) after its message.
        let misordered = sim.query_i64(
            i,
            "SELECT COUNT(*) FROM reactions r
             JOIN events m ON m.event_id = r.message_id
             JOIN events e ON e.event_id = r.event_id
             WHERE e.routed <= m.routed",
        );
        assert_eq!(
            misordered, 0,
            "host {i} routed a reaction before its message"
        );
        assert_eq!(
            sim.query_i64(i, "SELECT COUNT(*) FROM dead_letters"),
            0,
            "host {i}"
        );
        assert_eq!(
            sim.query_i64(i, "SELECT COUNT(*) FROM event_waits"),
            0,
            "host {i}"
        );
    }
}
