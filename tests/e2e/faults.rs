//! Faults: broken plugin files, misbehaving handlers, a second host on the
//! same data folder and a bad jobs.yaml at start-up. The host must contain
//! each one, say why in one line, and keep serving everything else.

use std::{
    fs,
    io::Read,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use quiet_test_support::{install, plugin, wait_for, HostDirs, HostProcess};

use crate::{
    bin, db, job, plugin_file, query_i64,
    sync::{cli, create_network, events, sync_host},
};

const JOBS: &str = "\
jobs:
  - name: tick
    handler: ticker
    frequency_ms: 100
  - name: boom
    handler: panicker
    frequency_ms: 300
  - name: loop
    handler: looper
    frequency_ms: 300
  - name: jobpanic
    handler: job_panicker
    frequency_ms: 300
  - name: fail
    handler: failer
    frequency_ms: 300
  - name: ghost
    handler: nobody
    frequency_ms: 300
";

/// Polls the status until `cond` holds; panics with the last status and the
/// host's log if it does not within `timeout`.
pub(crate) fn eventually(
    host: &HostProcess,
    what: &str,
    timeout: Duration,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    wait_for(timeout, || {
        let s = host.status();
        let ok = cond(&s);
        last = s;
        ok.then(|| last.clone())
    })
    .unwrap_or_else(|| {
        panic!(
            "{what}: not within {timeout:?}; last status:\n{last:#}\nlog:\n{}",
            host.log().join("\n")
        )
    })
}

pub(crate) fn ticks(data: &Path) -> i64 {
    query_i64(data, "SELECT COUNT(*) FROM ticks").unwrap_or(0)
}

/// Waits until the ticks table has more rows than `than`; returns the count.
pub(crate) fn ticks_grow(host: &HostProcess, data: &Path, than: i64, when: &str) -> i64 {
    wait_for(Duration::from_secs(5), || {
        let n = ticks(data);
        (n > than).then_some(n)
    })
    .unwrap_or_else(|| {
        panic!(
            "ticks stopped growing {when} (stuck at {than}); log:\n{}",
            host.log().join("\n")
        )
    })
}

/// `n` pseudo-random bytes (xorshift64*), never an ELF header.
fn random_bytes(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(n);
    out[0] = b'Q';
    out
}

/// A real shared library that is not a plugin: the toolchain's libstd,
/// somewhere under `<sysroot>/lib/`.
fn libstd() -> Option<PathBuf> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let lib = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("lib");
    find_libstd(&lib, 4)
}

fn find_libstd(dir: &Path, depth: u32) -> Option<PathBuf> {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    entries.sort();
    let found = entries.iter().find(|p| {
        p.is_file()
            && p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libstd-") && n.ends_with(".so"))
    });
    if let Some(p) = found {
        return Some(p.clone());
    }
    if depth == 0 {
        return None;
    }
    entries
        .iter()
        .filter(|p| p.is_dir())
        .find_map(|p| find_libstd(p, depth - 1))
}

/// Asserts the plugin file `file` was refused with a one-line error
/// containing `needle`.
fn assert_refused(status: &serde_json::Value, file: &str, needle: &str) {
    let p = plugin_file(status, file)
        .unwrap_or_else(|| panic!("{file} is not in the status: {status:#}"));
    let error = p["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{file} was not refused: {p:#}"));
    assert!(
        error.contains(needle),
        "{file}: error {error:?} does not contain {needle:?}"
    );
    assert!(
        !error.contains('\n'),
        "{file}: error is not one line: {error:?}"
    );
    assert!(
        p["name"].is_null(),
        "{file} was refused yet has a name: {p:#}"
    );
}

pub(crate) fn assert_loaded(status: &serde_json::Value, file: &str, name: &str) {
    let p = plugin_file(status, file)
        .unwrap_or_else(|| panic!("{file} is not in the status: {status:#}"));
    assert_eq!(p["name"], name, "{file}: {p:#}");
    assert!(p["error"].is_null(), "{file}: {p:#}");
}

pub(crate) fn dead_letter_with<'a>(
    status: &'a serde_json::Value,
    handler: &str,
    needles: &[&str],
) -> Option<&'a serde_json::Value> {
    status["dead_letters"]["recent"]
        .as_array()?
        .iter()
        .find(|d| {
            d["handler"] == handler
                && d["reason"]
                    .as_str()
                    .is_some_and(|r| needles.iter().all(|n| r.contains(n)))
        })
}

pub(crate) fn run_count(status: &serde_json::Value, name: &str) -> i64 {
    job(status, name)
        .and_then(|j| j["run_count"].as_i64())
        .unwrap_or(-1)
}

#[test]
fn faulty_plugins_are_contained_and_the_host_keeps_serving() {
    let started = Instant::now();
    let ticker = plugin("ticker-plugin", "v1");
    let faulty = plugin("faulty-plugin", "v1");
    let mismatch = plugin("abi-mismatch-plugin", "v1");
    let dirs = HostDirs::new(JOBS);
    install(&ticker, &dirs.plugins, "libticker.so");
    install(&faulty, &dirs.plugins, "libfaulty.so");
    install(&mismatch, &dirs.plugins, "libabi_mismatch.so");
    let bytes = fs::read(&ticker).unwrap();
    assert!(bytes.len() > 4096);
    fs::write(dirs.plugins.join("libtruncated.so"), &bytes[..4096]).unwrap();
    fs::write(dirs.plugins.join("librandom.so"), random_bytes(64 * 1024)).unwrap();
    let std_lib = libstd();
    match &std_lib {
        Some(lib) => install(lib, &dirs.plugins, "libnotaplugin.so"),
        None => eprintln!("no libstd-*.so in the rustc sysroot: skipping the not-a-plugin library"),
    }
    let files = if std_lib.is_some() { 6 } else { 5 };
    let built = started.elapsed();

    let host = HostProcess::start(&bin(), &dirs);
    let host_started = Instant::now();

    // Every file is either loaded or refused.
    let s = eventually(
        &host,
        "every plugin file is loaded or refused",
        Duration::from_secs(10),
        |s| {
            s["plugins"].as_array().is_some_and(|ps| {
                ps.iter()
                    .filter(|p| !p["name"].is_null() || !p["error"].is_null())
                    .count()
                    >= files
            })
        },
    );
    assert_loaded(&s, "libticker.so", "ticker");
    assert_loaded(&s, "libfaulty.so", "faulty");
    assert_refused(&s, "libabi_mismatch.so", "incompatible plugin-api");
    assert_refused(&s, "libtruncated.so", "not a loadable shared library");
    assert_refused(&s, "librandom.so", "not a loadable shared library");
    if std_lib.is_some() {
        assert_refused(&s, "libnotaplugin.so", "not a quiet-host plugin");
    }
    let mut seen_ticks = ticks_grow(&host, &dirs.data, 0, "at start");

    // Each fault ends in a dead letter naming the handler and the cause.
    let s = eventually(
        &host,
        "a dead letter for each faulty handler",
        Duration::from_secs(10),
        |s| {
            dead_letter_with(s, "panicker", &["panicked: boom handler exploded"]).is_some()
                && dead_letter_with(s, "looper", &["hop limit"]).is_some()
                && dead_letter_with(s, "failer", &["refusing envelope 1"]).is_some()
        },
    );
    let looped = dead_letter_with(&s, "looper", &["hop limit"]).unwrap();
    assert!(
        looped["reason"].as_str().unwrap().contains("looper"),
        "{looped:#}"
    );
    seen_ticks = ticks_grow(&host, &dirs.data, seen_ticks, "while handlers fail");

    // A job that panics is marked as run, with the panic as its error; a job
    // whose handler is missing does not run and says why.
    let s = eventually(
        &host,
        "jobpanic fails and ghost is blocked",
        Duration::from_secs(10),
        |s| {
            run_count(s, "jobpanic") >= 1
                && job(s, "ghost").is_some_and(|j| !j["last_error"].is_null())
        },
    );
    let jobpanic = job(&s, "jobpanic").unwrap();
    let error = jobpanic["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("panicked: job exploded"),
        "jobpanic: {jobpanic:#}"
    );
    let ghost = job(&s, "ghost").unwrap();
    assert_eq!(
        ghost["last_error"], "handler 'nobody' is not loaded",
        "{ghost:#}"
    );
    assert_eq!(ghost["run_count"], 0, "{ghost:#}");
    let jobpanic_runs = run_count(&s, "jobpanic");
    let s = eventually(
        &host,
        "jobpanic keeps being run",
        Duration::from_secs(10),
        |s| run_count(s, "jobpanic") > jobpanic_runs,
    );
    assert!(
        job(&s, "jobpanic").unwrap()["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("panicked: job exploded")),
        "{s:#}"
    );
    assert_eq!(run_count(&s, "ghost"), 0, "{s:#}");

    // Over repeated rounds of faults (about 2 s), everything keeps going.
    let rounds = eventually(
        &host,
        "repeated rounds of faults",
        Duration::from_secs(10),
        |s| {
            run_count(s, "jobpanic") >= jobpanic_runs + 6
                && ["boom", "loop", "fail"]
                    .iter()
                    .all(|j| run_count(s, j) >= 6)
        },
    );
    assert_eq!(run_count(&rounds, "ghost"), 0, "{rounds:#}");
    let panics = rounds["dead_letters"]["recent"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["handler"] == "panicker")
        .count();
    assert!(
        panics >= 3,
        "panicker was not dead-lettered on every run: {rounds:#}"
    );
    seen_ticks = ticks_grow(&host, &dirs.data, seen_ticks + 10, "during repeated faults");

    // Every write of a failed call was rolled back.
    assert_eq!(
        query_i64(&dirs.data, "SELECT COUNT(*) FROM faulty_writes"),
        Some(0),
        "writes of failed handlers were not rolled back"
    );
    seen_ticks = ticks_grow(&host, &dirs.data, seen_ticks, "after the faults");

    // The ticks are whole: 1..=n, no gaps, no duplicates.
    let (count, min, max): (i64, i64, i64) = db(&dirs.data)
        .query_row("SELECT COUNT(*), MIN(seq), MAX(seq) FROM ticks", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert!(count >= seen_ticks);
    assert_eq!((min, max), (1, count), "ticks have gaps or duplicates");

    // Still alive: it holds the data folder, and the process is there.
    let s = host.status();
    assert_eq!(s["running_pid"], host.pid(), "{s:#}");
    assert!(Path::new(&format!("/proc/{}", host.pid())).exists());
    let ran = host_started.elapsed();
    host.stop();
    let (count, max): (i64, i64) = db(&dirs.data)
        .query_row("SELECT COUNT(*), MAX(seq) FROM ticks", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!(count, max, "ticks have gaps or duplicates after stop");
    assert_eq!(
        query_i64(&dirs.data, "SELECT COUNT(*) FROM faulty_writes"),
        Some(0)
    );
    eprintln!("faults: plugins built in {built:?}, host ran {ran:?}, {count} ticks");
    for p in s["plugins"].as_array().unwrap() {
        eprintln!("  {}: {}", p["file"], p["error"]);
    }
}

/// Runs `cmd`, waiting at most `timeout` for it to exit.
fn run_with_timeout(mut cmd: Command, timeout: Duration) -> (Output, Duration) {
    let start = Instant::now();
    let mut child = cmd
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_for(timeout, || child.try_wait().unwrap());
    let took = start.elapsed();
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{cmd:?} did not exit within {timeout:?}");
    };
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_end(&mut stderr)
        .unwrap();
    (
        Output {
            status,
            stdout,
            stderr,
        },
        took,
    )
}

#[test]
fn a_second_host_on_the_same_data_folder_is_refused() {
    let (dirs, host) =
        crate::ticker_host("jobs:\n  - name: tick\n    handler: ticker\n    frequency_ms: 100\n");
    ticks_grow(&host, &dirs.data, 0, "before the second host");

    let (out, took) = run_with_timeout(dirs.run_command(&bin()), Duration::from_secs(10));
    crate::one_line_error(
        &out,
        &[
            "is in use by another quiet-host",
            &format!("pid {}", host.pid()),
        ],
    );

    // The first host is untouched.
    let before = ticks(&dirs.data);
    ticks_grow(
        &host,
        &dirs.data,
        before,
        "after the second host was refused",
    );
    assert_eq!(host.status()["running_pid"], host.pid());
    host.stop();
    eprintln!("second host refused in {took:?}");
}

#[test]
fn bad_jobs_yaml_at_startup_is_refused_with_its_line() {
    let dirs = HostDirs::new("jobs:\n  - name: a\n    handler: ticker\n    frequency_ms: 5\n");
    let (out, took) = run_with_timeout(dirs.run_command(&bin()), Duration::from_secs(10));
    let line = crate::one_line_error(&out, &["jobs.yaml:4:", "frequency_ms"]);
    eprintln!("bad jobs.yaml refused in {took:?}: {line}");
}

/// Limits the size of the files the process `pid` writes to `bytes`, or
/// lifts the limit (`None`). Past it, writes fail (`EFBIG`), as they would
/// on a full disk: the host ignores `SIGXFSZ`. It takes no privilege beyond
/// owning the process, unlike a small file system to fill.
fn limit_file_size(pid: u32, bytes: Option<u64>) {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let pid = pid as libc::pid_t;
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_FSIZE, std::ptr::null(), &mut old) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    let new = libc::rlimit {
        rlim_cur: bytes.unwrap_or(old.rlim_max),
        rlim_max: old.rlim_max,
    };
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_FSIZE, &new, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// Room for the engine's state file, not for a page of the WAL or the
/// database (8 KiB pages).
const NO_ROOM: Option<u64> = Some(4096);

const TICK_JOB: &str = "jobs:\n  - name: tick\n    handler: ticker\n    frequency_ms: 100\n";

fn engine_state(s: &serde_json::Value) -> &str {
    s["engine"]["state"].as_str().unwrap_or("")
}

fn lines_with(host: &HostProcess, needle: &str) -> Vec<String> {
    host.log()
        .into_iter()
        .filter(|l| l.contains(needle))
        .collect()
}

/// Asserts the ticks so far are 1..=n: none lost or doubled by the faults.
pub(crate) fn ticks_whole(data: &Path) {
    let (n, min, max): (i64, i64, i64) = db(data)
        .query_row("SELECT COUNT(*), MIN(seq), MAX(seq) FROM ticks", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert_eq!((min, max), (1, n), "ticks have gaps or duplicates");
}

#[test]
fn a_host_that_cannot_commit_says_so_in_status_and_logs_it_once() {
    let (dirs, host) = crate::ticker_host(TICK_JOB);
    let before = ticks_grow(&host, &dirs.data, 0, "before the fault");
    assert_eq!(engine_state(&host.status()), "ok", "{:#}", host.status());

    limit_file_size(host.pid(), NO_ROOM);
    let s = eventually(
        &host,
        "status says it cannot commit",
        Duration::from_secs(5),
        |s| engine_state(s) == "cannot_commit",
    );
    let error = s["engine"]["error"].as_str().unwrap_or_default().to_owned();
    assert!(!error.is_empty(), "{s:#}");
    assert!(s["engine"]["since_ms"].as_i64().is_some(), "{s:#}");
    let text = crate::status_text(&dirs.data);
    assert!(
        text.lines()
            .any(|l| l.starts_with("engine     CANNOT COMMIT since ") && l.ends_with(&error)),
        "{text}"
    );

    // Three seconds of the fault: 15 lines at one per 200 ms, as before.
    std::thread::sleep(Duration::from_secs(3));
    let stuck = ticks(&dirs.data);
    assert!(stuck <= before + 5, "ticks went on: {before} -> {stuck}");
    let said = lines_with(&host, "cannot commit");
    assert_eq!(said.len(), 1, "log:\n{}", host.log().join("\n"));
    assert!(
        said[0].contains("ERROR") && said[0].contains(&error),
        "{said:?}"
    );
    assert!(
        lines_with(&host, "database error").is_empty(),
        "log:\n{}",
        host.log().join("\n")
    );

    limit_file_size(host.pid(), None);
    eventually(&host, "status says ok again", Duration::from_secs(5), |s| {
        engine_state(s) == "ok" && s["engine"]["error"].is_null()
    });
    ticks_grow(&host, &dirs.data, stuck, "after the fault");
    let resumed = lines_with(&host, "commits succeed again");
    assert_eq!(resumed.len(), 1, "log:\n{}", host.log().join("\n"));
    assert!(resumed[0].contains("INFO"), "{resumed:?}");
    assert_eq!(lines_with(&host, "cannot commit").len(), 1);
    host.stop();
    ticks_whole(&dirs.data);
}

#[test]
fn work_resumes_within_a_sync_interval_of_space_returning() {
    let (dirs, host) = crate::ticker_host(TICK_JOB);
    ticks_grow(&host, &dirs.data, 0, "before the fault");
    limit_file_size(host.pid(), NO_ROOM);
    eventually(&host, "the fault is seen", Duration::from_secs(5), |s| {
        engine_state(s) == "cannot_commit"
    });
    // Long enough for the probes to back off to their longest wait.
    std::thread::sleep(Duration::from_secs(5));
    let stuck = ticks(&dirs.data);

    limit_file_size(host.pid(), None);
    let space_returned = Instant::now();
    ticks_grow(&host, &dirs.data, stuck, "after space returned");
    let took = space_returned.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "work resumed {took:?} after space returned; log:\n{}",
        host.log().join("\n")
    );
    assert_eq!(engine_state(&host.status()), "ok");
    host.stop();
    ticks_whole(&dirs.data);
    eprintln!("work resumed {took:?} after space returned");
}

#[test]
fn a_host_that_could_not_commit_syncs_within_a_sync_interval_of_space_returning() {
    let (a_dirs, a) = sync_host();
    let (invite, net) = create_network(&a_dirs.data);
    let (b_dirs, b) = sync_host();
    cli(&b_dirs.data, &["network", "join", &invite]);
    // Both ways first, so that each knows where the other is.
    cli(&a_dirs.data, &["message", "send", &net, "a before"]);
    cli(&b_dirs.data, &["message", "send", &net, "b before"]);
    let (a_data, b_data, net) = (&a_dirs.data, &b_dirs.data, net.as_str());
    let both_hold =
        |n: i64| move || (events(a_data, net) == n && events(b_data, net) == n).then_some(());
    wait_for(Duration::from_secs(30), both_hold(2)).expect("A and B did not sync before the fault");

    limit_file_size(b.pid(), NO_ROOM);
    eventually(&b, "B cannot commit", Duration::from_secs(5), |s| {
        engine_state(s) == "cannot_commit"
    });
    // One for B to pull, and one B's CLI queues (the CLI is not limited)
    // for B's engine to store once it can.
    cli(&a_dirs.data, &["message", "send", net, "a during"]);
    cli(&b_dirs.data, &["message", "send", net, "b during"]);
    // Long enough for sessions begun before the fault to expire unanswered.
    std::thread::sleep(Duration::from_secs(10));
    assert_eq!(events(b_data, net), 2, "B stored something it could not");

    limit_file_size(b.pid(), None);
    let space_returned = Instant::now();
    let holds = |data: &Path| {
        wait_for(Duration::from_secs(30), || {
            (events(data, net) == 4).then(|| space_returned.elapsed())
        })
    };
    // B's work: it stores its queued message and pulls A's.
    let b_took = holds(b_data);
    assert!(
        b_took.is_some_and(|t| t < Duration::from_secs(3)),
        "B holds {} of 4 events {b_took:?} after space returned; log:\n{}",
        events(b_data, net),
        b.log().join("\n")
    );
    // A pulls on its own schedule: a session A began during the fault
    // waits out its round 0 (5 s) before A begins another.
    let a_took = holds(a_data);
    assert!(
        a_took.is_some_and(|t| t < Duration::from_secs(10)),
        "A holds {} of 4 events {a_took:?} after space returned on B",
        events(a_data, net),
    );
    eprintln!("after space returned on B: B synced in {b_took:?}, A in {a_took:?}");
    a.stop();
    b.stop();
}

/// A job of faulty's `sql_runner` running `sql` every 200 ms.
fn sql_job(name: &str, sql: &str) -> String {
    format!(
        "  - name: {name}
    handler: sql_runner
    frequency_ms: 200
    params:
      sql: \"{sql}\"
"
    )
}

#[test]
fn plugin_sql_cannot_write_the_hosts_tables_and_the_host_keeps_serving() {
    // What each job tries, and the one-line refusal it must fail with.
    let attempts = [
        (
            "forge_event",
            "INSERT INTO events VALUES (randomblob(32), 'net', 0, 'message', x'00', 0)",
            "plugin SQL may not write the host's table `events`",
        ),
        (
            "forge_submission",
            "INSERT INTO submissions (envelope, submitted_ms) VALUES (x'00', 0)",
            "plugin SQL may not write the host's table `submissions`",
        ),
        (
            "wipe_dead_letters",
            "DELETE FROM dead_letters",
            "plugin SQL may not write the host's table `dead_letters`",
        ),
        (
            "rewrite_counters",
            "REPLACE INTO counters VALUES ('drop_bad_seal', 0)",
            "plugin SQL may not write the host's table `counters`",
        ),
        (
            "shadow_events",
            "CREATE TEMP TABLE events (x)",
            "plugin SQL may not create a table or view named like the host's table `events`",
        ),
        // Creating the trigger on its own table is allowed; firing it is not.
        (
            "fire_trigger",
            "INSERT INTO faulty_writes (note) VALUES ('fire')",
            "trigger `faulty_wipe` may not write the host's table `events`",
        ),
    ];
    let mut jobs = String::from(
        "jobs:
  - name: tick
    handler: ticker
    frequency_ms: 100
  - name: fail
    handler: failer
    frequency_ms: 300
",
    );
    jobs += &sql_job(
        "arm_trigger",
        "CREATE TRIGGER IF NOT EXISTS faulty_wipe AFTER INSERT ON faulty_writes \
         BEGIN DELETE FROM events; END",
    );
    for (name, sql, _) in &attempts {
        jobs += &sql_job(name, sql);
    }
    let dirs = HostDirs::new(&jobs);
    for (package, file) in [
        ("ticker-plugin", "libticker.so"),
        ("faulty-plugin", "libfaulty.so"),
        ("quiet-messages-plugin", "libmessages.so"),
    ] {
        install(&plugin(package, "v1"), &dirs.plugins, file);
    }
    // Listening, so that it can make a network for its own messages.
    let host = HostProcess::start_with(&bin(), &dirs, &["--listen", "127.0.0.1:0"]);
    let (_, net) = create_network(&dirs.data);
    let send = |texts: &[&str]| {
        quiet_host::cli::commands::message_send_many(&dirs.data, &net, texts).unwrap();
    };
    send(&["one", "two", "three"]);

    let s = eventually(
        &host,
        "every attempt fails with its refusal, twice",
        Duration::from_secs(20),
        |s| {
            attempts.iter().all(|(name, _, why)| {
                run_count(s, name) >= 2 && job(s, name).is_some_and(|j| j["last_error"] == *why)
            }) && job(s, "arm_trigger").is_some_and(|j| j["last_error"].is_null())
                && run_count(s, "fail") >= 2
        },
    );
    let first_dead_letter = query_i64(&dirs.data, "SELECT MIN(id) FROM dead_letters");
    assert!(first_dead_letter.is_some(), "{s:#}");
    let seen_ticks = ticks_grow(&host, &dirs.data, 0, "while plugin SQL is refused");

    // Nothing the attempts aimed at changed, and the host still stores
    // events.
    wait_for(Duration::from_secs(10), || {
        (events(&dirs.data, &net) == 3).then_some(())
    })
    .expect("the host did not store its messages");
    send(&["four"]);
    wait_for(Duration::from_secs(10), || {
        (events(&dirs.data, &net) == 4).then_some(())
    })
    .expect("the host stopped storing messages");
    let ran = run_count(&host.status(), "wipe_dead_letters");
    eventually(
        &host,
        "the attempts keep failing",
        Duration::from_secs(10),
        |s| run_count(s, "wipe_dead_letters") > ran + 1,
    );
    ticks_grow(&host, &dirs.data, seen_ticks, "after the attempts");
    host.stop();
    let one = |sql: &str| query_i64(&dirs.data, sql);
    assert_eq!(events(&dirs.data, &net), 4);
    assert_eq!(one("SELECT COUNT(*) FROM messages"), Some(4));
    assert_eq!(one("SELECT COUNT(*) FROM submissions"), Some(0));
    assert_eq!(one("SELECT MIN(id) FROM dead_letters"), first_dead_letter);
    assert_eq!(
        one("SELECT COUNT(*) FROM counters WHERE name = 'drop_bad_seal' AND value = 0"),
        Some(0)
    );
}
