//! Restarts: the job schedule lives in SQLite, so a restarted host neither
//! reruns a job early nor makes up for missed periods in a burst.

use std::{
    thread,
    time::{Duration, Instant},
};

use quiet_host::storage::db::now_ms;
use quiet_test_support::{wait_for, HostProcess};

use crate::{bin, job, query_i64};

const SLOW: &str = "jobs:\n  - name: slow\n    handler: ticker\n    frequency_ms: 3000\n";

/// `(run_count, last_run_ms)` of job `slow`; `(0, None)` before it ran.
fn slow(host: &HostProcess) -> (i64, Option<i64>) {
    let s = host.status();
    let j = job(&s, "slow").unwrap_or_else(|| panic!("no job 'slow' in the status: {s:#}"));
    (
        j["run_count"].as_i64().unwrap_or(-1),
        j["last_run_ms"].as_i64(),
    )
}

/// Waits until job `slow` has run at least `n` times; returns its state.
fn slow_runs(host: &HostProcess, n: i64, timeout: Duration) -> (i64, i64) {
    wait_for(timeout, || match slow(host) {
        (count, Some(last)) if count >= n => Some((count, last)),
        _ => None,
    })
    .unwrap_or_else(|| {
        panic!(
            "job 'slow' did not reach {n} runs within {timeout:?}; log:\n{}",
            host.log().join("\n")
        )
    })
}

fn sleep_until_ms(t: i64) {
    let now = now_ms();
    if t > now {
        thread::sleep(Duration::from_millis((t - now) as u64));
    }
}

#[test]
fn restart_keeps_the_job_schedule() {
    let (dirs, host) = crate::ticker_host(SLOW);
    let (count, l) = slow_runs(&host, 1, Duration::from_secs(10));
    assert_eq!(count, 1, "a 3 s job ran {count} times at once");

    // Stop about 1 s after the first run, and start again at once.
    sleep_until_ms(l + 1000);
    let stopping = now_ms();
    host.stop();
    let host = HostProcess::start(&bin(), &dirs);
    let restarted = now_ms();

    // Not before its period is up: the first run was 3 s ago only at L+3000.
    let mut polls = 0;
    loop {
        let (count, last) = slow(&host);
        let seen = now_ms();
        if seen >= l + 3000 - 250 {
            break;
        }
        polls += 1;
        assert_eq!(
            (count, last),
            (1, Some(l)),
            "job 'slow' ran again {} ms after its first run (host restarted at +{} ms); log:\n{}",
            seen - l,
            restarted - l,
            host.log().join("\n")
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert!(polls > 0, "never looked at the job before L+2750");

    // But on time: by L+4500 it has run a second time, at L+[3000, 4000).
    let deadline = l + 3000 + 1500;
    let second = wait_for(
        Duration::from_millis((deadline - now_ms()).max(0) as u64),
        || match slow(&host) {
            (count, Some(last)) if count >= 2 => Some((count, last)),
            _ => None,
        },
    )
    .unwrap_or_else(|| {
        panic!(
            "job 'slow' did not run a second time by L+4500 ms (now L+{}); log:\n{}",
            now_ms() - l,
            host.log().join("\n")
        )
    });
    let (count, last) = second;
    assert_eq!(count, 2, "job 'slow' ran {count} times");
    let delay = last - l;
    assert!(
        (3000..4000).contains(&delay),
        "the second run came {delay} ms after the first"
    );
    host.stop();
    assert_eq!(query_i64(&dirs.data, "SELECT COUNT(*) FROM ticks"), Some(2));
    eprintln!(
        "restart: stopped at L+{} ms, running again at L+{} ms, second run at L+{delay} ms",
        stopping - l,
        restarted - l
    );
}

#[test]
fn overdue_job_runs_once_not_in_a_burst() {
    let (dirs, host) = crate::ticker_host(SLOW);
    let (count, _) = slow_runs(&host, 1, Duration::from_secs(10));
    assert_eq!(count, 1);
    host.stop();

    // Pretend the host was down for five hours.
    let five_hours_ago = now_ms() - 5 * 3_600_000;
    {
        let conn = rusqlite::Connection::open(dirs.data.join("quiet.db")).unwrap();
        conn.busy_timeout(Duration::from_secs(10)).unwrap();
        let changed = conn
            .execute(
                "UPDATE job_runs SET last_run_ms = ?1 WHERE job_name = 'slow'",
                [five_hours_ago],
            )
            .unwrap();
        assert_eq!(changed, 1);
    }

    let before_start = now_ms();
    let host = HostProcess::start(&bin(), &dirs);
    let started = Instant::now();
    let (count, last) = slow_runs(&host, 2, Duration::from_secs(2));
    let took = started.elapsed();
    assert_eq!(count, 2, "an overdue job ran in a burst");
    assert!(
        last >= before_start,
        "last_run_ms {last} is older than the restart at {before_start}"
    );

    thread::sleep(Duration::from_secs(1));
    let (count, _) = slow(&host);
    assert_eq!(
        count,
        2,
        "an overdue job ran in a burst; log:\n{}",
        host.log().join("\n")
    );
    assert_eq!(query_i64(&dirs.data, "SELECT COUNT(*) FROM ticks"), Some(2));
    host.stop();
    assert_eq!(query_i64(&dirs.data, "SELECT COUNT(*) FROM ticks"), Some(2));
    eprintln!("overdue: ran once, {took:?} after the host said it was running");
}
