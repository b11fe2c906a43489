//! Whole inbound frames through `Inbound::open`, as the engine sees them.
//! The first byte picks: 0: raw frame bytes (never accepted); 1: a member's
//! sealed request whose payload is the rest; 2: the same payload as a
//! response to a live request of ours; 3: a raw frame for
//! `LiveRequests::accept` (its first byte in the tag's place).
#![no_main]

use quiet_host::{
    crypto::{event_crypto, transit},
    storage::db,
};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    let r = quiet_fuzz::receiver();
    let sealed = || {
        event_crypto::seal_from(
            &r.peer,
            r.identity.public_key(),
            rest,
            Some((quiet_fuzz::NET, &r.key)),
        )
    };
    let opened = match mode % 4 {
        0 => {
            assert!(r.open(rest.to_vec()).is_none());
            return;
        }
        1 => r.open(transit::wrap_request(&sealed())),
        2 => {
            let (id, secret) = ([mode / 4; 16], [9; 32]);
            let asked = transit::Live {
                secret,
                peer_id: r.peer.peer_id(),
                network_id: quiet_fuzz::NET.into(),
            };
            r.live.register(id, asked, db::now_ms(), 30_000);
            let body = event_crypto::with_member_proof(&r.key, rest);
            let env = r.open(transit::wrap_response(id, &secret, &body));
            if let Some(env) = &env {
                assert_eq!(env.str("in_response_to"), Some(hex_id(id).as_str()));
            }
            // Accepted or not, the request is used up.
            assert!(r
                .live
                .accept(transit::wrap_response(id, &secret, b"x"), db::now_ms())
                .is_err());
            env
        }
        _ => {
            assert!(r.live.accept(data.to_vec(), db::now_ms()).is_err());
            return;
        }
    };
    if let Some(env) = opened {
        // Only what decodes, named as about the proven network and from
        // its sealer (or the peer a request of ours was sealed to).
        let plaintext = quiet_host::encoding::codec::decode(rest).expect("opened, so it decoded");
        assert_eq!(env.plaintext(), Some(&plaintext));
        assert_eq!(env.str("network_id"), Some(quiet_fuzz::NET));
        assert_eq!(env.str("sender_peer_id"), Some(r.peer.peer_id().as_str()));
    }
});

fn hex_id(id: [u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}
