//! Convergence after a partition, and across a chain (issue 5, item 2).

use quiet_host::sim::{sync_jobs, LinkSpec};

use crate::{counts, expect_within, network, sim};

/// The lossy WAN: 10 % of datagrams lost, 20–200 ms one way.
fn lossy_wan() -> LinkSpec {
    LinkSpec {
        latency_ms: (20, 200),
        loss: 0.10,
        ..LinkSpec::default()
    }
}

/// 20 hosts on a lossy WAN write messages while split in two for a virtual
/// minute; after the heal, every host has every event, and those written
/// during the split in particular. Scaled for CI: one message per host
/// before the split and three during it (80 in all).
#[test]
fn twenty_hosts_converge_after_a_partition_heals() {
    const HOSTS: usize = 20;
    let mut sim = sim(
        "twenty_hosts_converge_after_a_partition_heals",
        sync_jobs(&[]),
    );
    let net = network(&mut sim, HOSTS, |_| 0);
    sim.set_all_links(lossy_wan());
    let mut before = Vec::new();
    for h in 0..HOSTS {
        before.push(
            sim.send_message(h, &net, &format!("before, from {h}"))
                .unwrap(),
        );
    }
    expect_within(&mut sim, "20 hosts: first convergence", 180_000, |s| {
        s.everyone_has(&net, &before) && s.converged(&net)
    });

    let (left, right): (Vec<usize>, Vec<usize>) = (0..HOSTS).partition(|h| h % 2 == 0);
    sim.partition(&[&left, &right]);
    let mut during = Vec::new();
    for round in 0..3 {
        sim.run_for(15_000);
        for h in 0..HOSTS {
            let text = format!("during {round}, from {h}");
            during.push((h, sim.send_message(h, &net, &text).unwrap()));
        }
    }
    sim.run_for(15_000);
    // The split held: no message written on one side reached the other.
    for (h, id) in &during {
        let id = hex::decode(id).unwrap();
        let other_side = if h % 2 == 0 { &right } else { &left };
        for &o in other_side {
            assert!(
                !sim.events(o, &net).contains(&id),
                "host {o} got host {h}'s message through the partition"
            );
        }
    }

    sim.heal();
    let during: Vec<String> = during.into_iter().map(|(_, id)| id).collect();
    let took = expect_within(
        &mut sim,
        "20 hosts: convergence after the heal",
        300_000,
        |s| s.everyone_has(&net, &during) && s.converged(&net),
    );
    assert!(
        took > 0,
        "the heal needed no sync: the partition did nothing"
    );
    assert_eq!(counts(&sim, &net), vec![before.len() + during.len(); HOSTS]);
    eprintln!("sim: 20 hosts: network {:?}", sim.stats());
}

/// Ten hosts in a line, each knowing (and able to reach) only its two
/// neighbours: a message from either end crosses every hop.
#[test]
fn a_chain_of_ten_hosts_carries_every_message_end_to_end() {
    const HOSTS: usize = 10;
    let mut sim = sim(
        "a_chain_of_ten_hosts_carries_every_message_end_to_end",
        sync_jobs(&[]),
    );
    // Each host joins through the one before it, so it knows only that one
    // (and learns the one after it when that one first asks).
    let net = network(&mut sim, HOSTS, |h| h - 1);
    // Peers learned by exchange beyond a neighbour stay unreachable, so
    // every message has to be relayed hop by hop.
    sim.set_all_links(LinkSpec {
        up: false,
        ..LinkSpec::default()
    });
    for h in 0..HOSTS - 1 {
        sim.set_link(
            h,
            h + 1,
            LinkSpec {
                latency_ms: (20, 200),
                ..LinkSpec::default()
            },
        );
    }
    let ids: Vec<String> = (0..HOSTS)
        .map(|h| sim.send_message(h, &net, &format!("from {h}")).unwrap())
        .collect();
    expect_within(
        &mut sim,
        "chain of 10: every message everywhere",
        120_000,
        |s| s.everyone_has(&net, &ids),
    );
    assert!(sim.converged(&net), "{:?}", counts(&sim, &net));
    assert!(sim.stats().cut > 0, "no frame tried to skip a hop");
}
