//! Editing jobs.yaml under a running host.

use std::time::{Duration, Instant};

use quiet_test_support::{install, plugin, wait_for, write_by_rename, HostDirs, HostProcess};

use crate::job;

fn runs(status: &serde_json::Value, name: &str) -> i64 {
    job(status, name).map_or(-1, |j| j["run_count"].as_i64().unwrap_or(0))
}

/// Waits until `cond` holds on the status; returns how long it took.
fn within(host: &HostProcess, what: &str, cond: impl Fn(&serde_json::Value) -> bool) -> Duration {
    let start = Instant::now();
    wait_for(Duration::from_secs(5), || {
        cond(&host.status()).then_some(())
    })
    .unwrap_or_else(|| panic!("{what}: not within 5 s; log:\n{}", host.log().join("\n")));
    start.elapsed()
}

#[test]
fn edits_to_jobs_yaml_apply_without_restart_and_bad_edits_are_refused() {
    let (dirs, host) =
        crate::ticker_host("jobs:\n  - name: a\n    handler: ticker\n    frequency_ms: 200\n");
    within(&host, "job a runs", |s| runs(s, "a") >= 2);

    // Add a job.
    write_by_rename(
        &dirs.jobs,
        "jobs:\n  - name: a\n    handler: ticker\n    frequency_ms: 200\n  - name: b\n    handler: ticker\n    frequency_ms: 100\n",
    );
    let added = within(&host, "job b added and runs", |s| runs(s, "b") >= 1);

    // Remove a job: it disappears and stops running.
    write_by_rename(
        &dirs.jobs,
        "jobs:\n  - name: b\n    handler: ticker\n    frequency_ms: 100\n",
    );
    let removed = within(&host, "job a removed", |s| job(s, "a").is_none());
    let a_runs = crate::query_i64(
        &dirs.data,
        "SELECT run_count FROM job_runs WHERE job_name = 'a'",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        crate::query_i64(
            &dirs.data,
            "SELECT run_count FROM job_runs WHERE job_name = 'a'"
        )
        .unwrap(),
        a_runs,
        "a removed job kept running"
    );

    // Change a frequency: from 100 ms to 2000 ms.
    write_by_rename(
        &dirs.jobs,
        "jobs:\n  - name: b\n    handler: ticker\n    frequency_ms: 2000\n",
    );
    let changed = within(&host, "job b slowed down", |s| {
        job(s, "b").is_some_and(|j| j["frequency_ms"] == 2000)
    });
    let b_runs = runs(&host.status(), "b");
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        runs(&host.status(), "b") <= b_runs + 1,
        "the new frequency did not apply"
    );

    // An invalid edit is refused with its line, and the old jobs keep running.
    write_by_rename(
        &dirs.jobs,
        "jobs:\n  - name: b\n    handler: ticker\n    frequncy_ms: 100\n",
    );
    let refused = within(&host, "the bad edit is refused", |s| {
        s["config_error"]
            .as_str()
            .is_some_and(|e| e.contains("jobs.yaml:4:"))
    });
    let error = host.status()["config_error"].as_str().unwrap().to_owned();
    assert!(error.contains("frequncy_ms"), "{error}");
    assert!(!error.contains('\n'), "{error}");
    host.wait_log("jobs.yaml refused", Duration::from_secs(2));
    let b_before = runs(&host.status(), "b");
    within(
        &host,
        "job b keeps running on the last good configuration",
        |s| runs(s, "b") > b_before && job(s, "b").unwrap()["frequency_ms"] == 2000,
    );

    // Fixing the file clears the error.
    write_by_rename(
        &dirs.jobs,
        "jobs:\n  - name: b\n    handler: ticker\n    frequency_ms: 100\n",
    );
    within(&host, "the fixed file applies", |s| {
        s["config_error"].is_null()
    });

    eprintln!("jobs.yaml: added in {added:?}, removed in {removed:?}, changed in {changed:?}, refused in {refused:?}");
    for (what, took) in [
        ("add", added),
        ("remove", removed),
        ("change", changed),
        ("refuse", refused),
    ] {
        assert!(took < Duration::from_secs(1), "{what} took {took:?}");
    }
    host.stop();
}

#[test]
fn a_hostile_jobs_yaml_delays_neither_the_next_good_edit_nor_shutdown() {
    let (dirs, host) =
        crate::ticker_host("jobs:\n  - name: a\n    handler: ticker\n    frequency_ms: 200\n");
    within(&host, "job a runs", |s| runs(s, "a") >= 1);
    // 200 KB of nested brackets: libyaml took a minute of CPU to refuse
    // them, and the host could not shut down meanwhile.
    let hostile = format!("jobs: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    let refused = |s: &serde_json::Value| {
        s["config_error"]
            .as_str()
            .is_some_and(|e| e.contains("jobs.yaml:1:71: collections nest more than 64 levels"))
    };
    write_by_rename(&dirs.jobs, &hostile);
    within(
        &host,
        "the hostile edit is refused, with its position",
        refused,
    );
    write_by_rename(
        &dirs.jobs,
        "jobs:\n  - name: b\n    handler: ticker\n    frequency_ms: 100\n",
    );
    within(&host, "the next good edit applies", |s| {
        s["config_error"].is_null() && runs(s, "b") >= 1
    });
    write_by_rename(&dirs.jobs, &hostile);
    within(&host, "refused again", refused);
    let stopping = Instant::now();
    host.stop();
    eprintln!("hostile jobs.yaml: shutdown took {:?}", stopping.elapsed());
}

/// The template's greeter records only greetings holding its `keyword`
/// setting (`filter`) and keeps the newest `keep` (`process`); two jobs
/// greet with an apple and a pear.
#[test]
fn a_settings_edit_reaches_filter_and_process_within_a_second() {
    let yaml = |settings: &str| {
        format!(
            "settings:\n{settings}jobs:\n  - name: apples\n    handler: greeter\n    frequency_ms: 100\n    \
             params:\n      text: an apple\n  - name: pears\n    handler: greeter\n    frequency_ms: 100\n    \
             params:\n      text: a pear\n"
        )
    };
    let dirs = HostDirs::new(&yaml(
        "  template:\n    keyword: apple\n  not_installed:\n    x: 1\n",
    ));
    install(
        &plugin("quiet-template-plugin", "v1"),
        &dirs.plugins,
        "libtemplate.so",
    );
    let host = HostProcess::start(&crate::bin(), &dirs);
    let count = |text: &str| {
        crate::query_i64(
            &dirs.data,
            &format!("SELECT COUNT(*) FROM template_greetings WHERE text = '{text}'"),
        )
        .unwrap_or(-1)
    };
    let newest = |text: &str| {
        crate::query_i64(
            &dirs.data,
            &format!("SELECT COALESCE(MAX(id), 0) FROM template_greetings WHERE text = '{text}'"),
        )
        .unwrap_or(-1)
    };
    within(&host, "apples are recorded", |_| count("an apple") >= 3);
    assert_eq!(count("a pear"), 0, "the keyword filter let a pear through");
    let status = host.status();
    assert_eq!(
        status["settings"]["template"]["keyword"], "apple",
        "{status}"
    );
    let text = crate::status_text(&dirs.data);
    assert!(text.contains("SETTINGS"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("not_installed") && l.contains("{\"x\":1}  (not loaded)")),
        "{text}"
    );
    let warning = "settings for plugin 'not_installed', which is not loaded";
    host.wait_log(warning, Duration::from_secs(2));

    // Another keyword, and a bound for process.
    write_by_rename(
        &dirs.jobs,
        &yaml("  template:\n    keyword: pear\n    keep: 3\n  not_installed:\n    x: 1\n"),
    );
    let edited = Instant::now();
    wait_for(Duration::from_secs(5), || {
        (count("a pear") >= 1 && count("an apple") + count("a pear") <= 3).then_some(())
    })
    .unwrap_or_else(|| panic!("the edit did not apply; log:\n{}", host.log().join("\n")));
    let took = edited.elapsed();
    within(&host, "only pears are left", |_| count("a pear") == 3);
    let last_apple = newest("an apple");
    assert_eq!(count("an apple"), 0);

    // An edit over the bounds is refused in one line naming the plugin and
    // the line; the last good settings stay.
    let big = format!("  template:\n    keyword: {}\n", "x".repeat(70_000));
    write_by_rename(&dirs.jobs, &yaml(&big));
    let refused = within(&host, "the oversized settings are refused", |s| {
        s["config_error"]
            .as_str()
            .is_some_and(|e| e.contains("jobs.yaml:3:14: settings.template.keyword"))
    });
    let error = host.status()["config_error"].as_str().unwrap().to_owned();
    assert!(
        error.contains("plugin 'template' are over the 64 KiB"),
        "{error}"
    );
    assert!(!error.contains('\n'), "{error}");
    let pears = newest("a pear");
    within(&host, "pears keep being recorded", |_| {
        newest("a pear") > pears
    });
    let status = host.status();
    assert_eq!(
        status["settings"]["template"]["keyword"], "pear",
        "{status}"
    );
    assert_eq!(count("an apple"), 0, "the refused edit's settings applied");
    assert!(newest("an apple") <= last_apple);
    assert_eq!(
        host.log().iter().filter(|l| l.contains(warning)).count(),
        1,
        "warned more than once"
    );
    assert_eq!(
        crate::query_i64(&dirs.data, "SELECT COUNT(*) FROM dead_letters"),
        Some(0)
    );

    eprintln!("settings: applied in {took:?}, refused in {refused:?}");
    assert!(took < Duration::from_secs(1), "the edit took {took:?}");
    assert!(
        refused < Duration::from_secs(1),
        "the refusal took {refused:?}"
    );
    host.stop();
}
