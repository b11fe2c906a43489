//! Tests on the network simulator (`quiet_host::sim`): real hosts, real
//! plugin libraries (built with cargo, `dlopen`ed per host) and real SQLite
//! files, on virtual time over a seeded lossy network.
//!
//! Every test prints its seed and the command that replays it; set
//! `QUIET_SIM_SEED` to try another schedule. Each prints the virtual time
//! it took (`sim: …` lines; BENCHMARKS.md, "Simulator").

mod convergence;
mod deps;
mod edge_cases;
mod idle;

use std::time::Instant;

use quiet_host::sim::{seed_for, Sim, SimConfig};
use quiet_test_support::plugin;

/// A simulation of the shipped sync and messages plugins, seeded for
/// `test`, with `jobs_yaml` (see `quiet_host::sim::sync_jobs`).
fn sim(test: &str, jobs_yaml: String) -> Sim {
    let config = SimConfig {
        jobs_yaml,
        ..SimConfig::new(
            seed_for(test),
            vec![
                plugin("quiet-sync-plugin", "v1"),
                plugin("quiet-messages-plugin", "v1"),
            ],
        )
    };
    Sim::new(config).expect("starting the simulation")
}

/// `n` hosts in one network, each joined through `inviter(i)`; returns the
/// network id.
fn network(sim: &mut Sim, n: usize, inviter: impl Fn(usize) -> usize) -> String {
    let hosts = sim.add_hosts(n).expect("adding hosts");
    let net = sim.create_network(hosts[0]).expect("creating the network");
    for &h in &hosts[1..] {
        sim.join(h, inviter(h), &net).expect("joining");
    }
    // Every host holds the network's genesis before a test's own events, so
    // that what a test measures is its own events' way (a session still
    // fetching the genesis would carry them at once).
    expect_within(sim, "the genesis everywhere", 60_000, |s| s.converged(&net));
    net
}

/// Runs until `done`, at most `limit_ms` virtual; panics (the seed is in
/// the output) if it does not happen. Prints and returns the virtual ms.
fn expect_within(sim: &mut Sim, what: &str, limit_ms: i64, done: impl FnMut(&Sim) -> bool) -> i64 {
    let wall = Instant::now();
    let took = sim.run_until(limit_ms, done).unwrap_or_else(|| {
        panic!(
            "{what}: not within {limit_ms} virtual ms (seed {}); network: {:?}",
            sim.seed(),
            sim.stats()
        )
    });
    eprintln!(
        "sim: {what}: {took} virtual ms ({:.1} s wall)",
        wall.elapsed().as_secs_f64()
    );
    took
}

/// Host `h` writes `n` messages (`"h/i"`) in one transaction; returns
/// their event ids. Its scheduler stores them at its next tick.
fn write_messages(sim: &mut Sim, h: usize, net: &str, n: usize) -> Vec<String> {
    let texts: Vec<String> = (0..n).map(|i| format!("{h}/{i}")).collect();
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    sim.send_messages(h, net, &texts).expect("sending messages")
}

/// Each host's events of `net` as counts, for failure messages.
fn counts(sim: &Sim, net: &str) -> Vec<usize> {
    (0..sim.len()).map(|i| sim.events(i, net).len()).collect()
}
