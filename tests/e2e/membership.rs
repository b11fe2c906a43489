//! Membership between real hosts (docs/design/membership.md): every host
//! learns who created a network from the genesis `network create` wrote,
//! and a genesis that a member makes up counts for nothing anywhere.

use std::{path::Path, time::Duration};

use quiet_host::{
    crypto::identity::HostIdentity,
    storage::{event_store::EventStore, membership::Op, networks::NetworkKeys},
};
use quiet_plugin_api::field;
use quiet_test_support::wait_for;

use crate::{
    signed::{peer_id, plant_typed},
    status_text,
    sync::{cli, synced_pair},
};

/// `network members NETWORK --json` on the host of `data`.
fn roster(data: &Path, network: &str) -> serde_json::Value {
    serde_json::from_str(&cli(data, &["network", "members", network, "--json"])).unwrap()
}

#[test]
fn every_host_learns_the_creator_from_the_genesis_and_one_a_member_makes_up_counts_for_nothing() {
    let (a_dirs, a, b_dirs, b, net) = synced_pair();
    let creator = serde_json::json!([{"peer_id": peer_id(&a_dirs.data), "role": "creator"}]);
    let a_roster = roster(&a_dirs.data, &net);
    assert_eq!(a_roster["known"], true, "{a_roster}");
    assert_eq!(a_roster["members"], creator);
    let b_roster = wait_for(Duration::from_secs(30), || {
        let r = roster(&b_dirs.data, &net);
        (r["known"] == true).then_some(r)
    })
    .unwrap_or_else(|| {
        panic!(
            "B never folded A's genesis; log of B:\n{}",
            b.log().join("\n")
        )
    });
    assert_eq!(b_roster["members"], creator);
    assert!(
        status_text(&b_dirs.data).contains("1 member"),
        "{}",
        status_text(&b_dirs.data)
    );

    // B, a member gone bad, with the host's own library: a genesis of its
    // own, signed by it, naming it creator of A's network. Its sync plugin
    // offers it to A.
    let keys = std::sync::Arc::new(NetworkKeys::new(&b_dirs.data));
    let store = EventStore::new(keys, Default::default());
    let mallory = HostIdentity::load(&b_dirs.data).unwrap();
    let forged = Op::Genesis {
        members: vec![],
        salt: [7; 16],
    };
    let (id, envelope) = store
        .new_local_event(
            mallory.signing(),
            &net,
            forged.event_type(),
            &forged.content(),
            &[],
        )
        .unwrap();
    let bytes = envelope.bytes(field::EVENT_CIPHERTEXT).unwrap();
    plant_typed(&b_dirs.data, &net, forged.event_type(), &id, bytes);

    let a_roster = wait_for(Duration::from_secs(40), || {
        let r = roster(&a_dirs.data, &net);
        (r["events"] == 2).then_some(r)
    })
    .unwrap_or_else(|| panic!("A never got B's genesis; log of A:\n{}", a.log().join("\n")));
    assert_eq!(a_roster["members"], creator, "{a_roster}");
    assert_eq!(a_roster["invalid"], 1, "{a_roster}");
    a.stop();
    b.stop();
}
