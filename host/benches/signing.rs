//! Ed25519 for signed events (docs/design/signed-events.md, §3): what
//! signing one event costs, and verifying many, with the two libraries the
//! plan weighs, measured in the same run.
//!
//! - `sign`: one signature over the 64 bytes an event's signature covers,
//!   by the host's `SigningIdentity` (dalek's hazmat `raw_sign`).
//! - `dalek_verify_batch` / `zebra_batch`: a batch of `n` signatures by 1, 4
//!   or up to 1,000 authors (a catch-up from one peer is mostly one author;
//!   a busy network's, many). Zebra's batch coalesces the signatures of one
//!   key; dalek's does not. Each iteration includes hashing the messages
//!   (zebra's `Item`s are made inside it), as a receiver pays it.
//! - `single`: one signature checked alone, dalek's `verify_strict` and
//!   zebra's (ZIP215) `verify`: what the leaves of a failed batch cost.
//!
//! Messages are 64 bytes (what format 3 signs), and 1.1 KiB at 1,024 to
//! show what signing the whole body would have cost. Criterion reports the
//! time per batch; divide by `n` for a signature.
//!
//! Run with `cargo bench -p quiet-host --bench signing`. Figures are in
//! `BENCHMARKS.md`.

use std::time::Duration;

use criterion::{
    black_box, criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use quiet_host::crypto::{
    entropy::{self, HostRng},
    identity::HostIdentity,
};

/// Authors in a batch: its signatures go round them.
const AUTHORS: [usize; 3] = [1, 4, 1000];

/// Batch sizes, from the verifier's first chunk to a large catch-up's.
const BATCHES: [usize; 4] = [64, 256, 1024, 4096];

/// A batch of `n` signatures by `authors` keys over distinct messages of
/// `len` bytes: the keys, messages and signatures, in dalek's types.
struct Batch {
    keys: Vec<VerifyingKey>,
    messages: Vec<Vec<u8>>,
    signatures: Vec<Signature>,
}

fn batch(n: usize, authors: usize, len: usize) -> Batch {
    let signers: Vec<SigningKey> = (0..authors.min(n))
        .map(|_| SigningKey::generate(&mut HostRng))
        .collect();
    let messages: Vec<Vec<u8>> = (0..n)
        .map(|i| (0..len).map(|j| (i * 31 + j * 7) as u8).collect())
        .collect();
    let (keys, signatures) = messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let signer = &signers[i % signers.len()];
            (signer.verifying_key(), signer.sign(m))
        })
        .unzip();
    Batch {
        keys,
        messages,
        signatures,
    }
}

fn zebra_batch(b: &Batch) -> Result<(), ed25519_zebra::Error> {
    let mut verifier = ed25519_zebra::batch::Verifier::new();
    for ((key, sig), msg) in b.keys.iter().zip(&b.signatures).zip(&b.messages) {
        let key = ed25519_zebra::VerificationKeyBytes::from(key.to_bytes());
        let sig = ed25519_zebra::Signature::from_bytes(&sig.to_bytes());
        verifier.queue((key, sig, msg));
    }
    verifier.verify(HostRng)
}

fn dalek_batch(b: &Batch) -> Result<(), ed25519_dalek::SignatureError> {
    let messages: Vec<&[u8]> = b.messages.iter().map(Vec::as_slice).collect();
    ed25519_dalek::verify_batch(&messages, &b.signatures, &b.keys)
}

fn signing(c: &mut Criterion) {
    // Zebra draws a 128-bit weight per signature from its RNG: the seeded
    // stream (BLAKE3) keeps a getrandom call per signature out of the
    // figures. The host will derive its weights from the batch (plan §3).
    entropy::seed_this_thread(Some(20));

    let mut group = c.benchmark_group("sign");
    let dir = tempfile::tempdir().unwrap();
    let me = HostIdentity::load_or_create(dir.path()).unwrap();
    let message = [7u8; 64];
    group.bench_function("64 B", |b| {
        b.iter(|| me.signing().sign(black_box(&message)))
    });
    group.finish();

    let mut group = c.benchmark_group("single");
    let one = batch(1, 1, 64);
    let (key, sig, msg) = (&one.keys[0], &one.signatures[0], &one.messages[0]);
    let zkey = ed25519_zebra::VerificationKey::try_from(key.to_bytes()).unwrap();
    let zsig = ed25519_zebra::Signature::from_bytes(&sig.to_bytes());
    group.bench_function("dalek_verify_strict", |b| {
        b.iter(|| key.verify_strict(black_box(msg), sig).unwrap())
    });
    group.bench_function("zebra_verify", |b| {
        b.iter(|| zkey.verify(&zsig, black_box(msg)).unwrap())
    });
    group.finish();

    for len in [64, 1100] {
        let mut group = c.benchmark_group(format!("verify {len} B"));
        group.sample_size(10);
        group.warm_up_time(Duration::from_millis(500));
        group.measurement_time(Duration::from_secs(2));
        group.sampling_mode(SamplingMode::Flat);
        for n in BATCHES {
            // The long messages only where the plan compares them.
            if len != 64 && n != 1024 {
                continue;
            }
            for authors in AUTHORS {
                let b = batch(n, authors, len);
                assert!(dalek_batch(&b).is_ok() && zebra_batch(&b).is_ok());
                let id = format!("{n}x{authors}");
                group.throughput(Throughput::Elements(n as u64));
                group.bench_with_input(BenchmarkId::new("dalek_verify_batch", &id), &b, |i, b| {
                    i.iter(|| dalek_batch(b).unwrap())
                });
                group.bench_with_input(BenchmarkId::new("zebra_batch", &id), &b, |i, b| {
                    i.iter(|| zebra_batch(b).unwrap())
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, signing);
criterion_main!(benches);
