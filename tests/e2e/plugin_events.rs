//! Events of a type only a plugin knows: created in a plugin's job on each
//! host, signed, stored and synced by the host, projected by the plugin's
//! subscriber on every member host.

use std::time::Duration;

use quiet_test_support::{install, peers, plugin, wait_for, HostDirs, HostProcess};

use crate::{bin, db, query_i64, sync::cli};

/// The sync job and the authoring plugin's, which makes 6 notes per
/// network, 2 a second.
const JOBS: &str = "jobs:
  - name: sync_with_peers
    handler: sync
    frequency_ms: 3000
    params:
      max_events_per_response: 1000
  - name: write_notes
    handler: authoring
    frequency_ms: 1000
    params:
      per_run: 2
      limit: 6
";

fn authoring_host() -> (HostDirs, HostProcess) {
    authoring_host_with(JOBS)
}

/// A host with the sync and authoring plugins, running `jobs`.
fn authoring_host_with(jobs: &str) -> (HostDirs, HostProcess) {
    peers::host_with(&bin(), jobs, PLUGINS)
}

const PLUGINS: &[(&str, &str)] = &[
    ("quiet-sync-plugin", "libsync.so"),
    ("authoring-plugin", "libauthoring.so"),
];

#[test]
fn events_a_plugin_creates_in_run_job_reach_every_member_and_their_subscribers() {
    let (a_dirs, a) = authoring_host();
    let (b_dirs, b) = authoring_host();
    let (invite, net) = peers::create_network(&bin(), &a_dirs.data);
    cli(&b_dirs.data, &["network", "join", &invite]);
    let peer_id = |h: &HostProcess| h.status()["peer_id"].as_str().unwrap().to_owned();
    let (a_id, b_id) = (peer_id(&a), peer_id(&b));
    let notes_by = |data: &std::path::Path, author: &str| {
        query_i64(
            data,
            &format!(
                "SELECT COUNT(*) FROM authoring_notes WHERE network_id = '{net}' AND author = '{author}'"
            ),
        )
        .unwrap_or(0)
    };
    // Each host's six notes, projected on both, under their own author.
    let all = wait_for(Duration::from_secs(60), || {
        [&a_dirs, &b_dirs]
            .iter()
            .all(|d| notes_by(&d.data, &a_id) == 6 && notes_by(&d.data, &b_id) == 6)
            .then_some(())
    });
    all.unwrap_or_else(|| {
        panic!(
            "notes did not reach both; A has {} of A's, {} of B's; B has {} of A's, {} of B's; log of B:\n{}",
            notes_by(&a_dirs.data, &a_id),
            notes_by(&a_dirs.data, &b_id),
            notes_by(&b_dirs.data, &a_id),
            notes_by(&b_dirs.data, &b_id),
            b.log().join("\n")
        )
    });
    for d in [&a_dirs, &b_dirs] {
        assert_eq!(
            query_i64(
                &d.data,
                "SELECT COUNT(*) FROM events WHERE event_type = 'authoring_note'"
            ),
            Some(12)
        );
        // Each note after an author's first names the one before it.
        assert_eq!(
            query_i64(
                &d.data,
                "SELECT COUNT(*) FROM authoring_notes a JOIN authoring_notes b \
                 ON a.dep = b.event_id AND a.author = b.author AND a.n = b.n + 1"
            ),
            Some(10)
        );
        assert_eq!(
            query_i64(&d.data, "SELECT COUNT(*) FROM dead_letters"),
            Some(0)
        );
    }
    a.stop();
    b.stop();
}

#[test]
fn notes_that_arrive_before_the_note_they_follow_wait_and_are_projected_after_it() {
    // A makes three notes, each after the one before; B and M only sync.
    let chain = JOBS.replace("per_run: 2\n      limit: 6", "per_run: 3\n      limit: 3");
    let (a_dirs, a) = authoring_host_with(&chain);
    let (invite, net) = peers::create_network(&bin(), &a_dirs.data);
    let ids: Vec<Vec<u8>> = wait_for(Duration::from_secs(30), || {
        let ids: Vec<Vec<u8>> = db(&a_dirs.data)
            .prepare("SELECT event_id FROM authoring_notes ORDER BY n")
            .ok()?
            .query_map([], |r| r.get(0))
            .ok()?
            .collect::<Result<_, _>>()
            .ok()?;
        (ids.len() == 3).then_some(ids)
    })
    .expect("A made no notes");
    let sync_only = peers::SYNC_JOBS;
    // M, a member that holds only the second and third notes (copied from
    // A's database) and knows no peer: it cannot fetch the first.
    let m_dirs = HostDirs::new(sync_only);
    cli(&m_dirs.data, &["network", "join", &invite]);
    {
        let m = quiet_host::storage::db::open(&m_dirs.data).unwrap();
        m.execute("DELETE FROM addresses", []).unwrap();
        let a_db = db(&a_dirs.data);
        for id in &ids[1..] {
            let (created_ms, event): (i64, Vec<u8>) = a_db
                .query_row(
                    "SELECT created_ms, event FROM events WHERE event_id = ?1",
                    [id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .unwrap();
            m.execute(
                "INSERT INTO events (event_id, network_id, created_ms, event_type, event, received_ms, routed) \
                 VALUES (?1, ?2, ?3, 'authoring_note', ?4, 0, ?3)",
                rusqlite::params![id, net, created_ms, event],
            )
            .unwrap();
        }
    }
    for (package, file) in PLUGINS {
        install(&plugin(package, "v1"), &m_dirs.plugins, file);
    }
    let m = HostProcess::start_listening(&bin(), &m_dirs);
    // B learns only of M, and gets the two notes first.
    let (b_dirs, b) = authoring_host_with(sync_only);
    let invite_m = cli(&m_dirs.data, &["network", "invite", &net]);
    cli(&b_dirs.data, &["network", "join", &invite_m]);
    let waiting = wait_for(Duration::from_secs(30), || {
        let status = b.status();
        let n = status["networks"][0]["waiting"]["events"].as_i64()?;
        (n == 2).then_some(status)
    })
    .unwrap_or_else(|| panic!("B is not waiting on two notes: {:#}", b.status()));
    assert_eq!(
        query_i64(&b_dirs.data, "SELECT COUNT(*) FROM authoring_notes"),
        Some(0),
        "projected before the note they follow"
    );
    let text = crate::status_text(&b_dirs.data);
    assert!(text.contains("WAITING 2 events on missing deps"), "{text}");
    assert!(waiting["networks"][0]["waiting"]["oldest_event_id"].is_string());

    // B now learns A's address, and gets the first note from it.
    let a_addr = a.status()["listen_addr"].as_str().unwrap().to_owned();
    let (ip, port) = a_addr.rsplit_once(':').unwrap();
    let a_id = a.status()["peer_id"].as_str().unwrap().to_owned();
    quiet_host::storage::db::open(&b_dirs.data)
        .unwrap()
        .execute(
            "INSERT INTO addresses (peer_id, network_id, ip, port) VALUES (?1, ?2, ?3, ?4)",
            rusqlite::params![a_id, net, ip, port.parse::<i64>().unwrap()],
        )
        .unwrap();
    wait_for(Duration::from_secs(30), || {
        (query_i64(&b_dirs.data, "SELECT COUNT(*) FROM authoring_notes") == Some(3)).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "B never projected the three; log of B:\n{}",
            b.log().join("\n")
        )
    });
    // Routed in the order they follow each other, though stored the other way.
    let b_db = db(&b_dirs.data);
    let routed: Vec<i64> = ids
        .iter()
        .map(|id| {
            b_db.query_row("SELECT routed FROM events WHERE event_id = ?1", [id], |r| {
                r.get(0)
            })
            .unwrap()
        })
        .collect();
    assert!(routed[0] < routed[1] && routed[1] < routed[2], "{routed:?}");
    assert_eq!(b.status()["networks"][0]["waiting"]["events"], 0);
    assert_eq!(
        query_i64(&b_dirs.data, "SELECT COUNT(*) FROM dead_letters"),
        Some(0)
    );
    for h in [a, b, m] {
        h.stop();
    }
}
