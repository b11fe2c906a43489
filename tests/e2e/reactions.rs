//! The shipped reactions plugin between real hosts: a reaction made on one
//! host, an event type the host itself knows nothing of, shows under its
//! message on every host.

use std::time::Duration;

use quiet_test_support::{peers, wait_for, HostDirs, HostProcess};

use crate::{
    bin,
    sync::{cli, create_network, message_ids},
};

fn reactions_host() -> (HostDirs, HostProcess) {
    peers::host_with(
        &bin(),
        peers::SYNC_JOBS,
        &[
            ("quiet-sync-plugin", "libsync.so"),
            ("quiet-messages-plugin", "libmessages.so"),
            ("quiet-reactions-plugin", "libreactions.so"),
        ],
    )
}

/// The reactions `message list --json` shows on the one message.
fn reactions(data: &std::path::Path, network: &str) -> serde_json::Value {
    let json: serde_json::Value =
        serde_json::from_str(&cli(data, &["message", "list", network, "--json"])).unwrap();
    json[0]["reactions"].clone()
}

#[test]
fn c_reacts_to_as_message_and_all_three_hosts_show_it() {
    let (a_dirs, a) = reactions_host();
    let (b_dirs, b) = reactions_host();
    let (c_dirs, c) = reactions_host();
    let (invite, net) = create_network(&a_dirs.data);
    cli(&b_dirs.data, &["network", "join", &invite]);
    let invite_b = cli(&b_dirs.data, &["network", "invite", &net]);
    cli(&c_dirs.data, &["network", "join", &invite_b]);
    let message = cli(&a_dirs.data, &["message", "send", &net, "lunch?"]);
    wait_for(Duration::from_secs(30), || {
        (message_ids(&c_dirs.data, &net) == [message.clone()]).then_some(())
    })
    .expect("C never got A's message");
    cli(
        &c_dirs.data,
        &[
            "event",
            "send",
            &net,
            "reaction",
            r#"{"emoji": "👍"}"#,
            "--dep",
            &message,
        ],
    );
    let c_id = c.status()["peer_id"].as_str().unwrap().to_owned();
    let expected = serde_json::json!([{"emoji": "👍", "count": 1, "authors": [c_id]}]);
    for (who, dirs) in [("A", &a_dirs), ("B", &b_dirs), ("C", &c_dirs)] {
        wait_for(Duration::from_secs(30), || {
            (reactions(&dirs.data, &net) == expected).then_some(())
        })
        .unwrap_or_else(|| panic!("{who} shows {}", reactions(&dirs.data, &net)));
        let text = cli(&dirs.data, &["message", "list", &net]);
        assert!(text.contains("lunch?  👍 1"), "{who}: {text}");
    }
    // A reaction to something that is not a message is a dead letter that
    // says so, on the host that sent it too; it shows nowhere.
    let note = cli(
        &c_dirs.data,
        &["event", "send", &net, "note", r#"{"text": "x"}"#],
    );
    cli(
        &c_dirs.data,
        &[
            "event",
            "send",
            &net,
            "reaction",
            r#"{"emoji": "🎉"}"#,
            "--dep",
            &note,
        ],
    );
    let status = wait_for(Duration::from_secs(20), || {
        let s = crate::status_text(&c_dirs.data);
        s.contains("a reaction to a note event").then_some(s)
    });
    assert!(status.is_some(), "{}", crate::status_text(&c_dirs.data));
    assert_eq!(reactions(&c_dirs.data, &net), expected);
    for h in [a, b, c] {
        h.stop();
    }
}
