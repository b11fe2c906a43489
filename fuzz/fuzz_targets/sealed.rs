//! Sealed payloads and network events. The first byte picks the entry:
//! 0: `open_from` on raw bytes; 1: `open_from` on bytes really sealed to
//! us (so the fuzzer explores the inner payload); 2: `decrypt_event` on raw
//! bytes; 3: encrypt then decrypt round trip.
#![no_main]

use quiet_host::crypto::event_crypto::{self, CryptoError};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    let r = quiet_fuzz::receiver();
    match mode % 4 {
        0 => assert!(event_crypto::open_from(&r.identity, rest).is_err()),
        1 => {
            // Without one of the two secret keys no sender proof verifies.
            let sealed = event_crypto::seal(r.identity.public_key(), rest);
            assert!(event_crypto::open_from(&r.identity, &sealed).is_err());
        }
        2 => assert_eq!(
            event_crypto::decrypt_event(&r.key, rest),
            Err(CryptoError::BadEvent)
        ),
        _ => {
            let created = i64::from_le_bytes(rest.get(..8).unwrap_or(&[0; 8]).try_into().unwrap());
            let event = event_crypto::encrypt_event(&r.key, created, rest);
            assert_eq!(
                event_crypto::decrypt_event(&r.key, &event),
                Ok((created, rest.to_vec()))
            );
        }
    }
});
