//! The membership fold (`quiet_host::storage::membership::fold`), which a
//! host runs again over a network's whole membership log whenever one of
//! its membership events is routed (`storage/members.rs`).
//!
//! - `honest/N`: a creator that adds `N` members one after another, each
//!   add depending on the one before, as an admin host writes them.
//! - `spam/N`: 200 such adds, and `N` events a member (not an admin) signs
//!   to cost the host: adds and leaves, concurrent, as many as it likes.
//!   The fold sets these aside unjudged, so they should cost about what
//!   reading them costs, not what judging them would.
//!
//! Run with `cargo bench -p quiet-host --bench membership`. Figures are in
//! `BENCHMARKS.md`.

use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use quiet_host::storage::membership::{fold, Event, Op, Peer};

fn peer(i: usize) -> Peer {
    let mut p = [0u8; 32];
    p[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
    p
}

/// Event ids in the order they are made, as time-first ids are.
fn id(n: usize) -> [u8; 32] {
    let mut id = [0u8; 32];
    id[..8].copy_from_slice(&(n as u64 + 1).to_be_bytes());
    id
}

/// The genesis by `peer(0)` naming `peer(1)`, then `adds` adds in a chain.
fn honest(adds: usize) -> Vec<Event> {
    let mut log = vec![Event {
        id: id(0),
        author: peer(0),
        deps: vec![],
        op: Op::Genesis {
            members: vec![peer(1)],
            salt: [0; 16],
        },
    }];
    for i in 0..adds {
        log.push(Event {
            id: id(log.len()),
            author: peer(0),
            deps: vec![log[log.len() - 1].id],
            op: Op::Add {
                peer: peer(i + 2),
                invite: [0; 16],
            },
        });
    }
    log
}

/// [`honest`] with 200 adds, and `n` events by `peer(1)`, a member, half
/// adds and half leaves, each depending on the genesis.
fn spam(n: usize) -> Vec<Event> {
    let mut log = honest(200);
    for i in 0..n {
        let op = match i % 2 {
            0 => Op::Add {
                peer: peer(10_000 + i),
                invite: [0; 16],
            },
            _ => Op::Leave,
        };
        log.push(Event {
            id: id(log.len()),
            author: peer(1),
            deps: vec![id(0)],
            op,
        });
    }
    log
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("membership_fold");
    group.measurement_time(Duration::from_secs(5));
    group.sample_size(10);
    for n in [100, 1_000, 2_000] {
        let log = honest(n);
        group.bench_with_input(BenchmarkId::new("honest", n), &log, |b, log| {
            b.iter(|| black_box(fold(&id(0), log)))
        });
    }
    for n in [1_000, 10_000, 100_000] {
        let log = spam(n);
        group.bench_with_input(BenchmarkId::new("spam", n), &log, |b, log| {
            b.iter(|| black_box(fold(&id(0), log)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
