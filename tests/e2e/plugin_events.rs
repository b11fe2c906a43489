//! Events of a type only a plugin knows: created in a plugin's job on each
//! host, signed, stored and synced by the host, projected by the plugin's
//! subscriber on every member host.

use std::time::Duration;

use quiet_test_support::{install, peers, plugin, wait_for, HostDirs, HostProcess};

use crate::{bin, query_i64, sync::cli};

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
    let dirs = HostDirs::new(JOBS);
    for (package, file) in [
        ("quiet-sync-plugin", "libsync.so"),
        ("authoring-plugin", "libauthoring.so"),
    ] {
        install(&plugin(package, "v1"), &dirs.plugins, file);
    }
    let host = HostProcess::start_listening(&bin(), &dirs);
    (dirs, host)
}

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
