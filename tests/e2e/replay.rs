//! Replay for late plugins: a plugin sees every stored event of its types,
//! in order, whenever it was installed, and `plugins replay` rebuilds a
//! projection from scratch.

use std::{
    fs,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use quiet_test_support::{install, peers, plugin, wait_for};

use crate::{
    bin, one_line_error, query_i64,
    sync::{cli, create_network, events, fill, synced_pair},
};

fn messages(data: &std::path::Path) -> i64 {
    query_i64(data, "SELECT COUNT(*) FROM messages").unwrap_or(0)
}

fn dead_letters(data: &std::path::Path) -> i64 {
    query_i64(data, "SELECT COUNT(*) FROM dead_letters").unwrap_or(0)
}

#[test]
fn a_plugin_installed_after_ten_thousand_events_projects_all_of_them() {
    let (dirs, host) = peers::host_with(
        &bin(),
        peers::SYNC_JOBS,
        &[("quiet-sync-plugin", "libsync.so")],
    );
    let (_, net) = create_network(&dirs.data);
    fill(&dirs.data, &net, 10_000, |i| {
        format!("before the plugin {i}")
    });
    // Stored, and no plugin wants them yet: they wait, not dead letters.
    assert_eq!(dead_letters(&dirs.data), 0);
    install(
        &plugin("quiet-messages-plugin", "v1"),
        &dirs.plugins,
        "libmessages.so",
    );
    wait_for(Duration::from_secs(60), || {
        (messages(&dirs.data) == 10_000).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "projected {} of 10000; status: {:#}",
            messages(&dirs.data),
            host.status()
        )
    });
    let status = host.status();
    assert!(status["counters"]["events_replayed"].as_i64().unwrap_or(0) >= 10_000);
    assert_eq!(dead_letters(&dirs.data), 0);
    // Caught up: status shows no replay, and new messages arrive live.
    wait_for(Duration::from_secs(10), || {
        let s = host.status();
        let p = s["plugins"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == "messages")?
            .clone();
        p["replay"].is_null().then_some(())
    })
    .expect("the replay never ended");
    cli(&dirs.data, &["message", "send", &net, "after"]);
    wait_for(Duration::from_secs(10), || {
        (messages(&dirs.data) == 10_001).then_some(())
    })
    .expect("a live message after the replay");
    host.stop();
}

#[test]
fn a_plugin_removed_for_a_minute_of_sync_and_put_back_has_no_gap() {
    let (a_dirs, a, b_dirs, b, net) = synced_pair();
    let sending = AtomicBool::new(true);
    const BATCHES: usize = 70;
    std::thread::scope(|s| {
        // A sends throughout: a batch of 20 every second, for 70 s.
        let sender = s.spawn(|| {
            for i in 0..BATCHES {
                let texts: Vec<String> =
                    (0..20).map(|j| format!("batch {i} message {j}")).collect();
                let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
                quiet_host::cli::commands::message_send_many(&a_dirs.data, &net, &texts).unwrap();
                std::thread::sleep(Duration::from_secs(1));
            }
            sending.store(false, Ordering::Relaxed);
        });
        // B's messages plugin goes away for a minute of that sync.
        std::thread::sleep(Duration::from_secs(3));
        fs::remove_file(b_dirs.plugins.join("libmessages.so")).unwrap();
        b.wait_log("plugin 'messages' removed", Duration::from_secs(10));
        std::thread::sleep(Duration::from_secs(60));
        // It synced all along: B stored what it could not project.
        assert!(events(&b_dirs.data, &net) > messages(&b_dirs.data) + 500);
        install(
            &plugin("quiet-messages-plugin", "v1"),
            &b_dirs.plugins,
            "libmessages.so",
        );
        sender.join().unwrap();
    });
    assert!(!sending.load(Ordering::Relaxed));
    let total = events(&a_dirs.data, &net);
    assert_eq!(total, 1 + BATCHES as i64 * 20);
    wait_for(Duration::from_secs(60), || {
        (events(&b_dirs.data, &net) == total && messages(&b_dirs.data) == total).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "B holds {} events and {} messages of {total}",
            events(&b_dirs.data, &net),
            messages(&b_dirs.data)
        )
    });
    assert_eq!(
        dead_letters(&b_dirs.data),
        0,
        "no event became a dead letter"
    );
    a.stop();
    b.stop();
}

#[test]
fn plugins_replay_rebuilds_a_projection_from_scratch() {
    let (dirs, host) = crate::sync::sync_host();
    let (_, net) = create_network(&dirs.data);
    fill(&dirs.data, &net, 50, |i| format!("message {i}"));
    wait_for(Duration::from_secs(20), || {
        (messages(&dirs.data) == 50).then_some(())
    })
    .expect("projected");
    // The projection goes wrong: rows lost, a row no event backs.
    let db = quiet_host::storage::db::open(&dirs.data).unwrap();
    db.execute("DELETE FROM messages WHERE rowid % 5 = 0", [])
        .unwrap();
    db.execute(
        "INSERT INTO messages (event_id, network_id, author, text, created_ms, verified) \
         VALUES (x'00', ?1, 'nobody', 'never sent', 1, 1)",
        [&net],
    )
    .unwrap();
    assert_eq!(messages(&dirs.data), 41);

    let said = cli(&dirs.data, &["plugins", "replay", "messages"]);
    assert!(said.contains("will be reset"), "{said}");
    wait_for(Duration::from_secs(20), || {
        let back = messages(&dirs.data) == 50
            && query_i64(
                &dirs.data,
                "SELECT COUNT(*) FROM messages WHERE author = 'nobody'",
            ) == Some(0);
        back.then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "not rebuilt: {} rows; status {:#}",
            messages(&dirs.data),
            host.status()
        )
    });
    assert_eq!(dead_letters(&dirs.data), 0);
    // A plugin this host never had is refused in one line.
    let out = std::process::Command::new(bin())
        .args(["plugins", "replay", "nosuch", "--data"])
        .arg(&dirs.data)
        .output()
        .unwrap();
    one_line_error(&out, &["no plugin named \"nosuch\""]);
    host.stop();
}
