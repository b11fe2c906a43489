//! Signed events, format 3. The first byte picks: 0: `parse_body` on raw
//! bytes; 1: `open_event_v3` on raw bytes (never opens: the fuzzer cannot
//! forge the AEAD); 2: seal parts read from the rest, open and verify them,
//! then again with one byte changed. Mode 0 is apart from 1 because raw
//! bytes never decrypt, so they never reach the parser through opening.
#![no_main]

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    sync::{LazyLock, OnceLock},
};

use quiet_fuzz::NET;
use quiet_host::{
    crypto::{
        event_crypto::NetworkKey,
        identity::{HostIdentity, VerifyingKeys, KEY_FILE},
        signed_event::{self, EventId, Unverified},
    },
    encoding::codec,
};

const KEY: NetworkKey = NetworkKey([1; 32]);

/// A fixed author, not `receiver()`'s random one, so that a finding replays
/// with the same signatures: only the nonce differs between runs.
fn author() -> &'static HostIdentity {
    static A: OnceLock<HostIdentity> = OnceLock::new();
    A.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        fs::write(&path, [7; 32]).unwrap();
        // The host refuses a key file that others can read.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        HostIdentity::load(dir.path()).unwrap()
    })
}

/// One cache for every input, as a receiver keeps one, so the author's key
/// is not derived again for each.
static AUTHORS: LazyLock<VerifyingKeys> = LazyLock::new(VerifyingKeys::default);

fn open(event: &[u8]) -> Result<signed_event::SignedEvent, signed_event::EventError> {
    signed_event::open_event_v3(NET, &KEY, event, &AUTHORS).and_then(Unverified::verify)
}

/// `created_ms:8 ‖ at:2 ‖ flip:1 ‖ type_len:1 ‖ type ‖ dep_count:1 ‖
/// deps:32 each ‖ content`. `None` where the bytes run out or seal refuses.
fn round_trip(rest: &[u8]) -> Option<()> {
    let (created_ms, rest) = rest.split_first_chunk::<8>()?;
    let (&[at_hi, at_lo, flip], rest) = rest.split_first_chunk::<3>()?;
    let (&type_len, rest) = rest.split_first()?;
    let (event_type, rest) = rest.split_at_checked(type_len.into())?;
    let event_type = std::str::from_utf8(event_type).ok()?;
    let (&dep_count, rest) = rest.split_first()?;
    // Up to 31, past MAX_DEPS, so that deduplication decides some refusals.
    let (deps, content) = rest.split_at_checked(usize::from(dep_count % 32) * 32)?;
    let mut deps: Vec<EventId> = deps
        .chunks_exact(32)
        .map(|d| d.try_into().unwrap())
        .collect();
    let created_ms = i64::from_be_bytes(*created_ms);
    let (id, event) = signed_event::seal_event_v3(
        author().signing(),
        NET,
        &KEY,
        created_ms,
        event_type,
        &deps,
        content,
    )
    .ok()?;
    let opened = open(&event).expect("a sealed event opens and verifies");
    deps.sort_unstable();
    deps.dedup();
    assert_eq!(
        (
            opened.id,
            opened.created_ms,
            &opened.author,
            opened.event_type.as_str(),
            &opened.deps
        ),
        (
            id,
            created_ms,
            author().signing().peer_id(),
            event_type,
            &deps
        )
    );
    // Compared encoded: a NaN in the content is unequal to itself.
    let sealed = codec::decode(content).expect("seal took it as a map");
    assert_eq!(codec::encode(&opened.content), codec::encode(&sealed));
    // Not every byte is under the tag: the time must match the signed one,
    // and a changed format byte or nonce decrypts as no format.
    let mut changed = event;
    let at = usize::from(u16::from_be_bytes([at_hi, at_lo])) % changed.len();
    changed[at] ^= flip.max(1);
    assert!(open(&changed).is_err(), "byte {at} changed, still opens");
    Some(())
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            let _ = signed_event::parse_body(rest);
        }
        1 => assert!(signed_event::open_event_v3(NET, &KEY, rest, &AUTHORS).is_err()),
        _ => {
            round_trip(rest);
        }
    }
});
