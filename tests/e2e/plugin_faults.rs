//! Plugin faults under load (issue 5, item 7): a plugin that panics on
//! every call, one that never returns, one that returns thousands of
//! envelopes, and one deleted while its job runs. In each case the host
//! keeps serving the other plugins (jobs on schedule, sync and messages),
//! and the fault shows in `quiet-host status`.

use std::{
    fs,
    path::Path,
    time::{Duration, Instant},
};

use quiet_test_support::{install, plugin, wait_for, write_by_rename, HostDirs, HostProcess};

use crate::{
    bin,
    faults::{assert_loaded, dead_letter_with, eventually, run_count, ticks_grow, ticks_whole},
    job, plugin_file, query_i64,
    sync::{cli, create_network, events, sync_host},
};

/// The call budget the tests run hosts with: short, to keep them quick,
/// and still far above what a healthy call takes here.
const BUDGET_MS: u64 = 1000;

fn count(data: &Path, sql: &str) -> i64 {
    query_i64(data, sql).unwrap_or(0)
}

fn dead_letters_of(data: &Path, handler: &str) -> i64 {
    count(
        data,
        &format!("SELECT COUNT(*) FROM dead_letters WHERE handler = '{handler}'"),
    )
}

fn notes(data: &Path, note: &str) -> i64 {
    count(
        data,
        &format!("SELECT COUNT(*) FROM faulty_done WHERE note = '{note}'"),
    )
}

/// Host A's jobs: ticks, sync a little faster than the shipped job, and
/// `panic_all`'s job; `extra` is appended.
fn load_jobs(extra: &str) -> String {
    format!(
        "jobs:
  - name: tick
    handler: ticker
    frequency_ms: 100
  - name: sync_with_peers
    handler: sync
    frequency_ms: 1000
  - name: panics
    handler: panic_all
    frequency_ms: 200
{extra}"
    )
}

/// A host with sync, messages, ticker and faulty, listening, with the
/// short call budget.
fn loaded_host(jobs: &str) -> (HostDirs, HostProcess) {
    let dirs = HostDirs::new(jobs);
    for (package, file) in [
        ("quiet-sync-plugin", "libsync.so"),
        ("quiet-messages-plugin", "libmessages.so"),
        ("ticker-plugin", "libticker.so"),
        ("faulty-plugin", "libfaulty.so"),
    ] {
        install(&plugin(package, "v1"), &dirs.plugins, file);
    }
    let host = HostProcess::start_with(
        &bin(),
        &dirs,
        &[
            "--listen",
            "127.0.0.1:0",
            "--call-budget-ms",
            &BUDGET_MS.to_string(),
        ],
    );
    (dirs, host)
}

/// A host with ticker and faulty only, with the default call budget.
fn ticker_and_faulty(jobs: &str) -> (HostDirs, HostProcess) {
    let dirs = HostDirs::new(jobs);
    for (package, file) in [
        ("ticker-plugin", "libticker.so"),
        ("faulty-plugin", "libfaulty.so"),
    ] {
        install(&plugin(package, "v1"), &dirs.plugins, file);
    }
    let host = HostProcess::start(&bin(), &dirs);
    (dirs, host)
}

/// Queues `n` messages on the host of `data` (running or not).
fn send(data: &Path, net: &str, n: usize, prefix: &str) {
    let texts: Vec<String> = (0..n).map(|i| format!("{prefix} {i}")).collect();
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    quiet_host::cli::commands::message_send_many(data, net, &texts).unwrap();
}

/// Waits until `data` holds `n` events of `net`.
fn synced(host: &HostProcess, data: &Path, net: &str, n: i64) -> Duration {
    let start = Instant::now();
    wait_for(Duration::from_secs(30), || {
        (events(data, net) >= n).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "{n} events did not arrive (have {}); log:\n{}",
            events(data, net),
            host.log().join("\n")
        )
    });
    start.elapsed()
}

#[test]
fn panics_on_every_call_and_a_call_that_never_returns_leave_the_rest_serving() {
    let (a_dirs, a) = loaded_host(&load_jobs(""));
    let (b_dirs, b) = sync_host();
    let (invite, net) = create_network(&a_dirs.data);
    cli(&b_dirs.data, &["network", "join", &invite]);

    // Panics under load: every message synced to A, and every run of
    // panic_all's job, panics; messages and ticks go on.
    send(&b_dirs.data, &net, 100, "before");
    let took = synced(&a, &a_dirs.data, &net, 100);
    let messages = wait_for(Duration::from_secs(10), || {
        let n = count(&a_dirs.data, "SELECT COUNT(*) FROM messages");
        (n == 100).then_some(n)
    });
    assert_eq!(messages, Some(100), "the messages plugin missed messages");
    let panics = dead_letters_of(&a_dirs.data, "panic_all");
    assert!(
        panics >= 100,
        "{panics} panic dead letters for 100 messages"
    );
    let s = eventually(&a, "panic_all's job fails", Duration::from_secs(10), |s| {
        job(s, "panics").is_some_and(|j| {
            j["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("panicked: panic_all: job"))
        })
    });
    assert!(run_count(&s, "panics") >= 1, "{s:#}");
    assert!(
        dead_letter_with(&s, "panic_all", &["panicked: panic_all: message"]).is_some(),
        "{s:#}"
    );
    let seen = ticks_grow(&a, &a_dirs.data, 0, "while panic_all panics");
    eprintln!("100 messages synced in {took:?} with a panic per message; {panics} panics");

    // A call that never returns: the plugin is disabled after the budget,
    // the rest goes on, and status says why.
    let hang = "  - name: hang\n    handler: hanger\n    frequency_ms: 100\n";
    write_by_rename(&a_dirs.jobs, &load_jobs(hang));
    let hung = Instant::now();
    let s = eventually(
        &a,
        "the hanging plugin is disabled",
        Duration::from_secs(15),
        |s| plugin_file(s, "libfaulty.so").is_some_and(|p| !p["disabled"].is_null()),
    );
    let detected = hung.elapsed();
    let faulty = plugin_file(&s, "libfaulty.so").unwrap();
    let reason = format!("exceeded the {BUDGET_MS} ms call budget in handler 'hanger' (run_job)");
    assert_eq!(faulty["disabled"], reason.as_str(), "{faulty:#}");
    assert!(faulty["disabled_at_ms"].is_i64(), "{faulty:#}");
    assert_eq!(faulty["name"], "faulty", "{faulty:#}");
    a.wait_log("a fresh engine thread took over", Duration::from_secs(5));
    let s = eventually(
        &a,
        "the jobs of the disabled plugin say why they do not run",
        Duration::from_secs(5),
        |s| {
            ["hang", "panics"].iter().all(|name| {
                job(s, name).is_some_and(|j| {
                    j["last_error"]
                        .as_str()
                        .is_some_and(|e| e.contains("is disabled: plugin 'faulty' exceeded"))
                })
            })
        },
    );
    assert_eq!(run_count(&s, "hang"), 0, "{s:#}");
    let human = crate::status_text(&a_dirs.data);
    assert!(
        human.contains(&format!("DISABLED: {reason}")),
        "human status:\n{human}"
    );
    assert!(human.contains("faulty disabled"), "human status:\n{human}");

    // Everything else keeps serving: ticks (on the fresh engine), sync and
    // messages; the disabled plugin panics no more.
    let seen = ticks_grow(&a, &a_dirs.data, seen + 5, "after the takeover");
    let panics = dead_letters_of(&a_dirs.data, "panic_all");
    send(&b_dirs.data, &net, 50, "after");
    let took = synced(&a, &a_dirs.data, &net, 150);
    let messages = wait_for(Duration::from_secs(10), || {
        let n = count(&a_dirs.data, "SELECT COUNT(*) FROM messages");
        (n == 150).then_some(n)
    });
    assert_eq!(messages, Some(150), "messages stopped after the takeover");
    assert_eq!(dead_letters_of(&a_dirs.data, "panic_all"), panics);
    ticks_grow(&a, &a_dirs.data, seen, "after more sync");
    ticks_whole(&a_dirs.data);
    assert_eq!(notes(&a_dirs.data, "hanger woke"), 0);

    // A fixed build of the file loads again, and its job runs.
    install(
        &plugin("faulty-plugin", "fixed"),
        &a_dirs.plugins,
        "libfaulty.so",
    );
    let s = eventually(
        &a,
        "the fixed build loads and its job runs",
        Duration::from_secs(10),
        |s| run_count(s, "hang") >= 1,
    );
    assert_loaded(&s, "libfaulty.so", "faulty");
    let faulty = plugin_file(&s, "libfaulty.so").unwrap();
    assert!(faulty["disabled"].is_null(), "{faulty:#}");
    assert_eq!(faulty["version"], "fixed", "{faulty:#}");
    assert!(notes(&a_dirs.data, "hanger fixed") >= 1);

    // The abandoned thread does not keep the host from stopping cleanly.
    a.stop();
    b.stop();
    eprintln!(
        "hang detected and plugin disabled {detected:?} after the job was added (budget {BUDGET_MS} ms); \
         50 more messages synced in {took:?} after the takeover"
    );
}

#[test]
fn a_plugin_returning_thousands_of_envelopes_is_bounded_and_named() {
    let jobs = |extra: &str| {
        format!(
            "jobs:
  - name: tick
    handler: ticker
    frequency_ms: 100
{extra}"
        )
    };
    let flood = |name: &str, n: u64, from: u64, event_type: &str| {
        format!(
            "  - name: {name}\n    handler: flooder\n    frequency_ms: 3600000\n    params: {{n: {n}, from: {from}, event_type: {event_type}}}\n"
        )
    };
    let (dirs, host) = ticker_and_faulty(&jobs(""));
    let seen = ticks_grow(&host, &dirs.data, 0, "at start");

    // 50,000 envelopes from one call, all wanted: all handled, in one run.
    let started = Instant::now();
    write_by_rename(&dirs.jobs, &jobs(&flood("flood", 50_000, 0, "flood")));
    let s = eventually(
        &host,
        "50,000 envelopes are handled",
        Duration::from_secs(120),
        |s| run_count(s, "flood") == 1,
    );
    let took = started.elapsed();
    assert!(job(&s, "flood").unwrap()["last_error"].is_null(), "{s:#}");
    assert_eq!(
        count(&dirs.data, "SELECT COUNT(*) FROM faulty_floods"),
        50_000
    );
    assert_eq!(s["dead_letters"]["total"], 0, "{s:#}");
    let seen = ticks_grow(&host, &dirs.data, seen, "after 50,000 envelopes");

    // 120,000 from one call: the run stops at the per-run cap, and one
    // dead letter names the cut and who caused it.
    let started = Instant::now();
    let both =
        flood("flood", 50_000, 0, "flood") + &flood("flood_big", 120_000, 1_000_000, "flood");
    write_by_rename(&dirs.jobs, &jobs(&both));
    let s = eventually(
        &host,
        "120,000 envelopes are cut at the cap",
        Duration::from_secs(180),
        |s| run_count(s, "flood_big") == 1,
    );
    let took_big = started.elapsed();
    let cut = dead_letter_with(
        &s,
        "flooder",
        &[
            "more than 100000 envelopes in one run: 20000 cut",
            "'flooder'",
        ],
    )
    .unwrap_or_else(|| panic!("no dead letter names the cut: {s:#}"));
    assert_eq!(cut["plugin"], "faulty", "{cut:#}");
    assert_eq!(s["dead_letters"]["total"], 1, "{s:#}");
    assert_eq!(
        count(
            &dirs.data,
            "SELECT COUNT(*) FROM faulty_floods WHERE seq >= 1000000"
        ),
        100_000
    );
    let seen = ticks_grow(&host, &dirs.data, seen, "after the cut");

    // 5,000 envelopes nobody wants: a dead letter each, yet a bounded log.
    let unwanted = both + &flood("unwanted", 5_000, 0, "nobody_wants");
    let logged_before = host.log().len();
    write_by_rename(&dirs.jobs, &jobs(&unwanted));
    let s = eventually(
        &host,
        "5,000 unwanted envelopes are dead-lettered",
        Duration::from_secs(60),
        |s| run_count(s, "unwanted") == 1,
    );
    assert_eq!(s["dead_letters"]["total"], 5_001, "{s:#}");
    let log = host.log();
    let lines = log[logged_before..]
        .iter()
        .filter(|l| l.contains("dead letter"))
        .count();
    assert!(
        lines <= 12,
        "{lines} log lines for 5,000 dead letters:\n{}",
        log[logged_before..].join("\n")
    );
    host.wait_log("5000 dead letters in one run", Duration::from_secs(5));
    ticks_grow(&host, &dirs.data, seen, "after the unwanted flood");
    ticks_whole(&dirs.data);
    host.stop();
    eprintln!("50,000 envelopes handled in {took:?}; 120,000 cut at the cap in {took_big:?}");
}

#[test]
fn a_plugin_deleted_while_its_job_runs_finishes_the_call_then_stops() {
    let jobs = "jobs:
  - name: tick
    handler: ticker
    frequency_ms: 100
  - name: slow
    handler: hanger
    frequency_ms: 3600000
    params: {ms: 6000}
";
    let (dirs, host) = ticker_and_faulty(jobs);
    // From the log, not status: the job is due at once and holds the write
    // lock while it sleeps (6 s), so the reloader's rows for status may
    // only land after it. Delete the file in the middle of the call.
    host.wait_log("hanger started", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(500));
    fs::remove_file(dirs.plugins.join("libfaulty.so")).unwrap();
    let deleted = Instant::now();

    // The call finishes on the private copy, and commits.
    let s = eventually(
        &host,
        "the running call finishes",
        Duration::from_secs(20),
        |s| run_count(s, "slow") == 1,
    );
    let finished = deleted.elapsed();
    assert!(job(&s, "slow").unwrap()["last_error"].is_null(), "{s:#}");
    assert_eq!(notes(&dirs.data, "hanger woke"), 1);
    // Then the plugin is gone from status, and its handler with it.
    let s = eventually(
        &host,
        "the deleted plugin is gone",
        Duration::from_secs(5),
        |s| plugin_file(s, "libfaulty.so").is_none(),
    );
    assert!(plugin_file(&s, "libticker.so").is_some(), "{s:#}");
    host.wait_log("plugin 'faulty' removed", Duration::from_secs(5));
    let seen = ticks_grow(&host, &dirs.data, 0, "after the delete");
    ticks_grow(&host, &dirs.data, seen + 5, "after the delete");
    ticks_whole(&dirs.data);
    // No private copy is left behind.
    let cache = dirs.data.join("plugin-cache");
    let left = fs::read_dir(&cache).map_or(0, |d| d.count());
    assert_eq!(left, 0, "files left in {}", cache.display());
    assert_eq!(host.status()["running_pid"], host.pid());
    host.stop();
    eprintln!("the call finished {finished:?} after its file was deleted");
}
