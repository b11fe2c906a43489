//! Where the host's randomness comes from: the operating system, or, on a
//! thread that a simulator has seeded, a reproducible stream.
//!
//! Every key, nonce and id the host makes is drawn through [`HostRng`].
//! In a real host no thread is ever seeded, so it is `OsRng`. The network
//! simulator ([`crate::sim`]) runs all its hosts on one thread and seeds it:
//! then identities, network ids and event nonces (hence event ids, which
//! decide how reconciliation splits ranges and so how many frames a sync
//! takes) are the same on every run with the same seed.

use std::cell::RefCell;

use crypto_box::aead::{
    rand_core::{CryptoRng, Error, RngCore},
    OsRng,
};

thread_local! {
    /// The seeded stream of this thread, if a simulator set one.
    static SEEDED: RefCell<Option<blake3::OutputReader>> = const { RefCell::new(None) };
}

/// Seeds (with `Some`) or unseeds (with `None`) the calling thread's
/// [`HostRng`]. The seeded stream is BLAKE3 in XOF mode over the seed: a
/// fine generator for tests, and never used by a real host.
pub fn seed_this_thread(seed: Option<u64>) {
    let reader = seed.map(|s| {
        let mut h = blake3::Hasher::new_derive_key("quiet-host 2026 simulator entropy");
        h.update(&s.to_le_bytes());
        h.finalize_xof()
    });
    SEEDED.with(|r| *r.borrow_mut() = reader);
}

/// `N` bytes from [`HostRng`].
pub fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    HostRng.fill_bytes(&mut b);
    b
}

/// The host's random number generator; see the [module docs](self).
#[derive(Clone, Copy, Debug, Default)]
pub struct HostRng;

impl RngCore for HostRng {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.fill_bytes(&mut b);
        u32::from_le_bytes(b)
    }

    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.fill_bytes(&mut b);
        u64::from_le_bytes(b)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        let seeded = SEEDED.with(|r| {
            r.borrow_mut()
                .as_mut()
                .map(|reader| reader.fill(dest))
                .is_some()
        });
        if !seeded {
            OsRng.fill_bytes(dest);
        }
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl CryptoRng for HostRng {}

/// The random weights of one batch signature verification: drawn from the
/// operating system once per batch, stretched with BLAKE3, so that an
/// attacker cannot know them. Never from a seeded [`HostRng`]: which thread
/// verifies which batch varies from run to run, and drawing from the
/// simulator's stream would make its runs differ. The weights decide no
/// outcome (ZIP215 batches accept exactly what single checks accept).
pub struct BatchWeights(blake3::OutputReader);

impl BatchWeights {
    /// Weights for one batch.
    pub fn new() -> Self {
        let mut seed = [0u8; 32];
        OsRng.fill_bytes(&mut seed);
        Self(blake3::Hasher::new_keyed(&seed).finalize_xof())
    }
}

impl Default for BatchWeights {
    fn default() -> Self {
        Self::new()
    }
}

impl RngCore for BatchWeights {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.0.fill(&mut b);
        u32::from_le_bytes(b)
    }

    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.0.fill(&mut b);
        u64::from_le_bytes(b)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.0.fill(dest);
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), Error> {
        self.0.fill(dest);
        Ok(())
    }
}

impl CryptoRng for BatchWeights {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seeded_thread_repeats_its_stream_and_others_do_not() {
        let draw = || {
            let mut b = [0u8; 32];
            HostRng.fill_bytes(&mut b);
            b
        };
        seed_this_thread(Some(7));
        let first = (draw(), draw());
        seed_this_thread(Some(7));
        assert_eq!((draw(), draw()), first);
        assert_ne!(first.0, first.1);
        seed_this_thread(None);
        assert_ne!(draw(), first.0);
    }
}
