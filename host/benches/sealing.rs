//! Sealing one sync response of a thousand ~1 KiB events: the host's way
//! against two naive ones, measured in the same run.
//!
//! - `per_frame` is what a serving host does: the events are encoded into
//!   the frame, proven with the network key (BLAKE3) and encrypted in one
//!   pass under the requester's transit secret (XChaCha20-Poly1305), in one
//!   buffer (`transit::wrap_response_with`).
//! - `per_event_secretbox` frames and encrypts each event on its own under
//!   the same transit secret: a thousand nonces, tags and buffers.
//! - `per_event_sealed_box` seals each event to the requester's public key
//!   (`crypto_box_seal`, an X25519 key agreement per event), as a reading of
//!   the seed that seals every answer to the peer would.
//!
//! Run with `cargo bench -p quiet-host --bench sealing`. Figures are in
//! `BENCHMARKS.md`.

use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use crypto_box::SecretKey;
use quiet_host::{
    crypto::{
        entropy::HostRng,
        event_crypto::{self, NetworkKey},
        transit,
    },
    encoding::codec,
};
use quiet_plugin_api::Value;

/// Events per response: the sync plugin's default `max_events_per_response`.
const EVENTS: usize = 1000;

/// Bytes per event, about what a 900-character message encrypts to.
const EVENT_BYTES: usize = 1100;

fn sealing(c: &mut Criterion) {
    let events: Vec<Vec<u8>> = (0..EVENTS)
        .map(|i| (0..EVENT_BYTES).map(|j| (i * 31 + j) as u8).collect())
        .collect();
    let body = Value::List(events.iter().map(|e| Value::from(e.as_slice())).collect());
    let network = NetworkKey::generate();
    let secret = [7u8; 32];
    let request_id = [9u8; 16];
    let recipient = SecretKey::generate(&mut HostRng).public_key();

    let mut group = c.benchmark_group("seal a response of 1000 events");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(10));
    group.bench_function("per_frame", |b| {
        b.iter(|| {
            let body_len = 32 + codec::encoded_len(&body);
            black_box(transit::wrap_response_with(
                request_id,
                &secret,
                body_len,
                |out| {
                    event_crypto::put_with_member_proof(&network, out, |out| {
                        codec::encode_into(out, &body)
                    })
                },
            ))
        })
    });
    group.bench_function("per_event_secretbox", |b| {
        b.iter(|| {
            let frames: Vec<Vec<u8>> = events
                .iter()
                .map(|e| transit::wrap_response(request_id, &secret, e))
                .collect();
            black_box(frames)
        })
    });
    group.bench_function("per_event_sealed_box", |b| {
        b.iter(|| {
            let sealed: Vec<Vec<u8>> = events
                .iter()
                .map(|e| event_crypto::seal(&recipient, e))
                .collect();
            black_box(sealed)
        })
    });
    group.finish();
}

criterion_group!(benches, sealing);
criterion_main!(benches);
