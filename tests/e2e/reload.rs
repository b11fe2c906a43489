//! Hot reload of plugin libraries in a running host.

use std::{
    fs,
    time::{Duration, Instant},
};

use quiet_test_support::{install, plugin, wait_for, HostDirs, HostProcess};

use crate::{bin, plugin_file, query_i64};

const TICK_EVERY_100MS: &str =
    "jobs:\n  - name: tick\n    handler: ticker\n    frequency_ms: 100\n";

#[test]
fn a_dropped_in_plugin_loads_within_a_second_and_its_job_runs() {
    let ticker = plugin("ticker-plugin", "v1");
    let dirs = HostDirs::new(TICK_EVERY_100MS);
    let host = HostProcess::start(&bin(), &dirs);
    // Before the drop-in, the job cannot run and says why.
    let status = host.status();
    assert_eq!(
        crate::job(&status, "tick").unwrap()["last_error"],
        "handler 'ticker' is not loaded"
    );

    let dropped = Instant::now();
    install(&ticker, &dirs.plugins, "libticker.so");
    host.wait_log("loaded plugin 'ticker' v1", Duration::from_secs(5));
    let loaded_after = dropped.elapsed();
    let first_tick = wait_for(Duration::from_secs(5), || {
        query_i64(&dirs.data, "SELECT COUNT(*) FROM ticks").filter(|n| *n > 0)
    });
    let ticking_after = dropped.elapsed();
    eprintln!("drop-in: loaded after {loaded_after:?}, first tick after {ticking_after:?}");
    assert!(first_tick.is_some(), "the ticker job never ran");
    assert!(
        loaded_after < Duration::from_secs(1),
        "loaded after {loaded_after:?}"
    );
    assert!(
        ticking_after < Duration::from_secs(1),
        "first tick after {ticking_after:?}"
    );

    let status = host.status();
    let entry = plugin_file(&status, "libticker.so").unwrap();
    assert_eq!(entry["name"], "ticker");
    assert!(entry["error"].is_null());
    assert!(crate::job(&status, "tick").unwrap()["last_error"].is_null());

    // A removed plugin stops being used, and its job says why.
    fs::remove_file(dirs.plugins.join("libticker.so")).unwrap();
    host.wait_log("plugin 'ticker' removed", Duration::from_secs(5));
    let stopped = wait_for(Duration::from_secs(5), || {
        let s = host.status();
        (crate::job(&s, "tick")?["last_error"] == "handler 'ticker' is not loaded").then_some(())
    });
    assert!(
        stopped.is_some(),
        "the job did not report its missing handler"
    );
    let before = query_i64(&dirs.data, "SELECT COUNT(*) FROM ticks").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        query_i64(&dirs.data, "SELECT COUNT(*) FROM ticks").unwrap(),
        before
    );
    host.stop();
}

#[test]
fn replacing_a_plugin_switches_code_and_handles_every_envelope_exactly_once() {
    let v1 = plugin("ticker-plugin", "v1");
    let v2 = plugin("ticker-plugin", "v2");
    assert_ne!(
        fs::read(&v1).unwrap(),
        fs::read(&v2).unwrap(),
        "variants must differ"
    );
    let dirs = HostDirs::new(TICK_EVERY_100MS);
    install(&v1, &dirs.plugins, "libticker.so");
    let host = HostProcess::start(&bin(), &dirs);
    let latest_variant = |data: &std::path::Path| {
        crate::db(data)
            .query_row(
                "SELECT variant FROM ticks ORDER BY seq DESC LIMIT 1",
                [],
                |r| r.get::<_, String>(0),
            )
            .ok()
    };
    wait_for(Duration::from_secs(5), || {
        latest_variant(&dirs.data).filter(|v| v == "v1")
    })
    .expect("v1 never ticked");

    let rss_before = host.rss_kib();
    let mut switch_times = Vec::new();
    for i in 0..20 {
        let (lib, want) = if i % 2 == 0 { (&v2, "v2") } else { (&v1, "v1") };
        let started = Instant::now();
        install(lib, &dirs.plugins, "libticker.so");
        let seen = wait_for(Duration::from_secs(5), || {
            latest_variant(&dirs.data).filter(|v| v == want)
        });
        assert!(
            seen.is_some(),
            "reload {i}: {want} never ticked; log:\n{}",
            host.log().join("\n")
        );
        switch_times.push(started.elapsed());
        // Status answers while the host is busy reloading and ticking.
        let status = host.status();
        assert_eq!(
            plugin_file(&status, "libticker.so").unwrap()["version"],
            want
        );
    }
    let rss_after = host.rss_kib();
    switch_times.sort();
    let median = switch_times[switch_times.len() / 2];
    let worst = *switch_times.last().unwrap();
    eprintln!(
        "20 reloads: switch median {median:?}, worst {worst:?}; RSS {rss_before} KiB -> {rss_after} KiB (+{} KiB/reload)",
        (rss_after.saturating_sub(rss_before)) / 20
    );
    assert!(median < Duration::from_secs(1), "median switch {median:?}");

    // Keep ticking a little on the last generation, then stop cleanly.
    std::thread::sleep(Duration::from_millis(300));
    host.stop();

    // Every tick the job emitted was handled exactly once: seqs are 1..=n
    // with no gap and no duplicate, and nothing was dead-lettered.
    let n = query_i64(&dirs.data, "SELECT COUNT(*) FROM ticks").unwrap();
    let distinct = query_i64(&dirs.data, "SELECT COUNT(DISTINCT seq) FROM ticks").unwrap();
    let max = query_i64(&dirs.data, "SELECT MAX(seq) FROM ticks").unwrap();
    let emitted = query_i64(&dirs.data, "SELECT next_seq - 1 FROM ticker_state").unwrap();
    let dead = query_i64(&dirs.data, "SELECT COUNT(*) FROM dead_letters").unwrap();
    let runs = query_i64(
        &dirs.data,
        "SELECT run_count FROM job_runs WHERE job_name = 'tick'",
    )
    .unwrap();
    eprintln!("{n} ticks over {runs} job runs");
    assert!(n > 40, "only {n} ticks");
    assert_eq!((n, distinct, max, emitted, dead), (n, n, n, n, 0));
    assert_eq!(runs, n, "one envelope per job run");
}

/// The template plugin of the author's guide works in a real host as it is.
#[test]
fn the_template_plugin_loads_and_its_job_runs() {
    let template = plugin("quiet-template-plugin", "v1");
    let dirs = HostDirs::new(
        "jobs:\n  - name: greet\n    handler: greeter\n    frequency_ms: 200\n    params:\n      text: hi from the template\n",
    );
    install(&template, &dirs.plugins, "libtemplate.so");
    let host = HostProcess::start(&bin(), &dirs);
    let greeted = wait_for(Duration::from_secs(10), || {
        query_i64(
            &dirs.data,
            "SELECT COUNT(*) FROM template_greetings WHERE text = 'hi from the template'",
        )
        .filter(|n| *n >= 2)
    });
    assert!(
        greeted.is_some(),
        "no greetings; log:\n{}",
        host.log().join("\n")
    );
    assert_eq!(
        query_i64(&dirs.data, "SELECT COUNT(*) FROM dead_letters"),
        Some(0)
    );
    host.stop();
}
