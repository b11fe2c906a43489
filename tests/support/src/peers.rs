//! Real hosts that sync: the shipped sync and messages plugins at the
//! seed's interval, and the CLI calls tests make of them.
//!
//! Shared by the end-to-end tests and the hostile-peer harness, each of
//! which passes the `quiet-host` binary cargo built for it.

use std::{collections::BTreeSet, path::Path, process::Command, time::Duration};

use rusqlite::{Connection, OpenFlags};

use crate::{install, plugin, wait_for, HostDirs, HostProcess};

/// The shipped job, at the seed's interval.
pub const SYNC_JOBS: &str = "jobs:
  - name: sync_with_peers
    handler: sync
    frequency_ms: 3000
    params:
      max_events_per_response: 1000
      transit_secret_ttl_ms: 30000
";

/// How often [`SYNC_JOBS`] syncs with each peer.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(3000);

/// A listening host with the sync and messages plugins.
pub fn sync_host(bin: &Path) -> (HostDirs, HostProcess) {
    host_with(
        bin,
        SYNC_JOBS,
        &[
            ("quiet-sync-plugin", "libsync.so"),
            ("quiet-messages-plugin", "libmessages.so"),
        ],
    )
}

/// A listening host running `jobs`, with `plugins` (`(package, file)`,
/// built as [`plugin`] builds them) installed before it starts.
pub fn host_with(bin: &Path, jobs: &str, plugins: &[(&str, &str)]) -> (HostDirs, HostProcess) {
    let dirs = HostDirs::new(jobs);
    for (package, file) in plugins {
        install(&plugin(package, "v1"), &dirs.plugins, file);
    }
    let host = HostProcess::start_listening(bin, &dirs);
    (dirs, host)
}

/// Two listening hosts in one network, B joined through A's invite, once
/// A's first message has reached B: both have connected and authenticated.
pub fn synced_pair(bin: &Path) -> (HostDirs, HostProcess, HostDirs, HostProcess, String) {
    let (a_dirs, a) = sync_host(bin);
    let (b_dirs, b) = sync_host(bin);
    let (invite, net) = create_network(bin, &a_dirs.data);
    cli(bin, &b_dirs.data, &["network", "join", &invite]);
    cli(bin, &a_dirs.data, &["message", "send", &net, "first"]);
    wait_for(Duration::from_secs(30), || {
        (events(&b_dirs.data, &net) == 1).then_some(())
    })
    .unwrap_or_else(|| panic!("B never synced with A; log of B:\n{}", b.log().join("\n")));
    (a_dirs, a, b_dirs, b, net)
}

/// Runs `bin ARGS --data data`; returns its stdout, trimmed. Panics if it
/// fails.
pub fn cli(bin: &Path, data: &Path, args: &[&str]) -> String {
    let out = Command::new(bin)
        .args(args)
        .arg("--data")
        .arg(data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "quiet-host {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Creates a network on the host of `data`; returns its invite and id.
pub fn create_network(bin: &Path, data: &Path) -> (String, String) {
    let before = network_ids(bin, data);
    let invite = cli(bin, data, &["network", "create"]);
    let mut new = network_ids(bin, data)
        .into_iter()
        .filter(|n| !before.contains(n));
    let network = new.next().expect("network create made no network");
    (invite, network)
}

fn network_ids(bin: &Path, data: &Path) -> BTreeSet<String> {
    if !data.join("quiet.db").exists() {
        return BTreeSet::new();
    }
    let json: serde_json::Value =
        serde_json::from_str(&cli(bin, data, &["network", "list", "--json"])).unwrap();
    json.as_array()
        .unwrap()
        .iter()
        .map(|n| n["network_id"].as_str().unwrap().to_owned())
        .collect()
}

/// A read-only connection to a host's database.
pub fn db(data: &Path) -> Connection {
    let conn = Connection::open_with_flags(data.join("quiet.db"), OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn
}

/// One integer from a query, or `None` if the query fails (for example
/// because a plugin's table does not exist yet).
pub fn query_i64(data: &Path, sql: &str) -> Option<i64> {
    db(data).query_row(sql, [], |r| r.get(0)).ok()
}

/// The condition on `events` that leaves out the membership events hosts
/// write themselves (`quiet.*`, such as a network's genesis): what is left
/// is what members sent.
pub const SENT_EVENTS: &str = "event_type NOT LIKE 'quiet.%'";

/// How many events of `network` the host of `data` has stored, not
/// counting the membership events hosts write themselves (its genesis).
pub fn events(data: &Path, network: &str) -> i64 {
    query_i64(
        data,
        &format!("SELECT COUNT(*) FROM events WHERE network_id = '{network}' AND {SENT_EVENTS}"),
    )
    .unwrap_or(0)
}

/// The ids of the events of `network` the host of `data` has stored, but
/// the membership events hosts write themselves, as [`events`] counts them.
pub fn event_ids(data: &Path, network: &str) -> BTreeSet<Vec<u8>> {
    let conn = db(data);
    let mut stmt = conn
        .prepare(&format!(
            "SELECT event_id FROM events WHERE network_id = ?1 AND {SENT_EVENTS}"
        ))
        .unwrap();
    stmt.query_map([network], |r| r.get::<_, Vec<u8>>(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}
