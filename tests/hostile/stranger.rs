//! Attacks by a stranger: it knows A's address and public key (both are in
//! every invite and on the wire), holds no network key, and may have
//! captured frames off the wire.
//!
//! The bounds under test are in `network::listener`: until a frame of a
//! connection authenticates, it holds one of 64 untrusted slots, may
//! announce a request of at most 64 KiB, must deliver a frame whole within
//! a deadline, and pays for each open from a budget of 2,000 KiB a second
//! shared by all strangers; nothing else shared is booked for it.

use std::{
    io::{Read, Write},
    net::TcpStream,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use quiet_host::crypto::{event_crypto, transit};

use crate::{
    member::{round_0, write_frame, Mallory},
    under_attack, Bounds, Stop, Target, MAX_THREADS,
};

/// Sends `frames` round and round to `addr` until `stop`, reconnecting
/// whenever the host closes the connection.
fn flood(addr: &str, frames: &[Vec<u8>], stop: &Stop) {
    while !stop.now() {
        let Ok(mut s) = TcpStream::connect(addr) else {
            continue;
        };
        let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
        for frame in frames.iter().cycle() {
            if stop.now() || !write_frame(&mut s, frame) {
                break;
            }
        }
    }
}

/// Runs `attack` on `n` threads until `stop`.
fn on_threads(n: usize, target: &Target, stop: &Stop, attack: fn(usize, &Target, &Stop)) {
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let (target, stop) = (target.clone(), stop.clone());
            thread::spawn(move || attack(i, &target, &stop))
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn junk_sealed_to_the_host_and_garbage_over_eight_connections_cost_a_bounded_share() {
    let started = Instant::now();
    let attacked = under_attack(
        "a flood of junk over 8 connections",
        Bounds {
            cpu: 0.75,
            rss_growth_mib: 64,
            threads: MAX_THREADS,
        },
        |target, stop| {
            // Junk sealed to A costs it a full open; garbage, a failed one.
            let mut frames: Vec<Vec<u8>> = (0..32u8)
                .map(|i| transit::wrap_request(&event_crypto::seal(&target.key, &[i; 900])))
                .collect();
            frames.extend((0..32u8).map(|i| {
                let mut junk = vec![i; 1000];
                junk[0] = transit::REQUEST;
                junk
            }));
            let frames = Arc::new(frames);
            let threads: Vec<_> = (0..8)
                .map(|_| {
                    let (target, stop, frames) = (target.clone(), stop.clone(), frames.clone());
                    thread::spawn(move || flood(&target.addr, &frames, &stop))
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
        },
    );
    let opened = ["drop_bad_seal", "drop_malformed_payload"]
        .iter()
        .map(|c| attacked.counter(c))
        .sum::<i64>();
    assert!(
        opened > 0,
        "the flood never reached A: {:#}",
        attacked.counters
    );
    // Opens of junk stay within 2,000 KiB a second (each ~1 KB frame is
    // one), plus one burst of 256, whatever the flooders write.
    let budget = 2_000.0 * started.elapsed().as_secs_f64() + 256.0 + 50.0;
    assert!(
        (opened as f64) <= budget,
        "{opened} junk frames opened, more than {budget:.0}"
    );
}

/// Opens a connection to `addr` and writes a frame header announcing `len`
/// bytes of a frame of kind `tag`, then `first` bytes of its body.
fn announce(addr: &str, tag: u8, len: usize, first: &[u8]) -> Option<TcpStream> {
    let mut s = TcpStream::connect(addr).ok()?;
    let mut head = (len as u32).to_be_bytes().to_vec();
    head.push(tag);
    head.extend_from_slice(first);
    s.write_all(&head).ok()?;
    Some(s)
}

#[test]
fn strangers_announcing_large_frames_and_trickling_them_hold_nothing_shared() {
    let attacked = under_attack(
        "120 connections announcing large frames and stalling",
        Bounds {
            cpu: 0.25,
            rss_growth_mib: 32,
            threads: 100,
        },
        |target, stop| {
            // Before, 16 headers announcing 8 MiB responses booked the
            // engine's whole 128 MiB queue budget, and honest frames were
            // dropped as overloaded for as long as the strangers trickled.
            on_threads(6, &target, &stop, |round, target, stop| {
                let mut held = Vec::new();
                for i in 0..20u8 {
                    let opened = match round % 3 {
                        // A large response to no request of A's.
                        0 => announce(&target.addr, transit::RESPONSE, 8 << 20, &[i; 16]),
                        // A large request from a connection not trusted.
                        1 => announce(&target.addr, transit::REQUEST, 1 << 20, &[i; 64]),
                        // The largest request a stranger may announce,
                        // trickled a byte at a time.
                        _ => announce(&target.addr, transit::REQUEST, 64 << 10, &[i; 64]),
                    };
                    held.extend(opened);
                }
                while !stop.now() {
                    for s in &mut held {
                        let _ = s.write_all(&[0]);
                    }
                    thread::sleep(Duration::from_millis(500));
                }
            });
        },
    );
    assert!(
        attacked.counter("drop_unknown_response") >= 1
            && attacked.counter("drop_oversized_frame") >= 1,
        "{:#}",
        attacked.counters
    );
}

#[test]
fn a_stranger_holding_every_connection_slot_and_reconnecting_keeps_nobody_out() {
    let attacked = under_attack(
        "300 idle connections, reopened as they close",
        Bounds {
            cpu: 0.5,
            rss_growth_mib: 48,
            threads: MAX_THREADS,
        },
        |target, stop| {
            // More than A's 256 slots, each reopened as soon as A closes it.
            let mut idle: Vec<Option<TcpStream>> = (0..300).map(|_| None).collect();
            while !stop.now() {
                for slot in &mut idle {
                    let closed = slot.as_mut().is_none_or(|s| {
                        let _ = s.set_nonblocking(true);
                        matches!(s.read(&mut [0u8; 1]), Ok(0))
                    });
                    if closed {
                        *slot = TcpStream::connect(&target.addr).ok();
                    }
                }
                thread::sleep(Duration::from_millis(100));
            }
        },
    );
    assert!(
        attacked.counter("drop_evicted_connection") >= 1,
        "{:#}",
        attacked.counters
    );
}

#[test]
fn a_stranger_replaying_a_captured_request_gains_no_trust() {
    let attacked = under_attack(
        "a captured request replayed by a stranger",
        Bounds {
            // Each replay is an open paid from the strangers' budget, as
            // junk is, on a new connection: accepting and a reader thread
            // for each cost as much again (debug build).
            cpu: 1.0,
            rss_growth_mib: 32,
            threads: 64,
        },
        |target, stop| {
            // A member's request, sent once and captured off the wire.
            let captured = Mallory::new().request(&target, &round_0(1, 0));
            let mut s = TcpStream::connect(&target.addr).unwrap();
            write_frame(&mut s, &captured);
            // Opened first, so that the copies below are the replays.
            thread::sleep(Duration::from_millis(300));
            while !stop.now() {
                let Ok(mut s) = TcpStream::connect(&target.addr) else {
                    continue;
                };
                // Had the replay made the connection trusted, a request of
                // a member's size would be read next.
                write_frame(&mut s, &captured);
                let _ = s.write_all(&(1u32 << 20).to_be_bytes());
                let _ = s.write_all(&[transit::REQUEST]);
                let _ = s.read(&mut [0u8; 1]);
            }
        },
    );
    assert!(
        attacked.counter("drop_replayed_frame") >= 10,
        "{:#}",
        attacked.counters
    );
    assert!(
        attacked.counter("drop_oversized_frame") >= 10,
        "{:#}",
        attacked.counters
    );
}

#[test]
fn malformed_headers_and_truncated_frames_are_dropped_and_counted() {
    let attacked = under_attack(
        "malformed headers and truncated frames",
        Bounds {
            cpu: 0.5,
            rss_growth_mib: 32,
            threads: MAX_THREADS,
        },
        |target, stop| {
            let other_version = transit::REQUEST ^ 0xf0;
            let heads: [&[u8]; 4] = [
                // An empty frame.
                &[0, 0, 0, 0, transit::REQUEST],
                // Four GiB.
                &[0xff, 0xff, 0xff, 0xff, transit::RESPONSE],
                // A frame of another wire version.
                &[0, 0, 0, 8, other_version, 1, 2, 3, 4, 5, 6, 7],
                // 100 bytes announced, 10 sent, then the connection closes.
                &[0, 0, 0, 100, transit::REQUEST, 1, 2, 3, 4, 5, 6, 7, 8, 9],
            ];
            for head in heads.iter().cycle() {
                if stop.now() {
                    break;
                }
                if let Ok(mut s) = TcpStream::connect(&target.addr) {
                    let _ = s.write_all(head);
                }
            }
        },
    );
    for counter in [
        "drop_oversized_frame",
        "drop_truncated_frame",
        "drop_wire_version",
    ] {
        assert!(
            attacked.counter(counter) >= 10,
            "{counter}: {:#}",
            attacked.counters
        );
    }
}
