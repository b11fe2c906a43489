//! Crash safety: two real hosts syncing a few thousand messages, B killed
//! with SIGKILL (and A with it in some rounds) at random moments and
//! restarted, 30 times. A commit is the only promise the host makes, so
//! whatever a reader could see before a kill must survive it, the files
//! must stay sound, and the peers must still converge.
//!
//! The moments come from a seeded RNG; the seed is printed, and
//! `QUIET_CRASH_SEED=<seed>` replays the same delays and choices.

use std::{
    collections::HashSet,
    path::Path,
    thread,
    time::{Duration, Instant, SystemTime},
};

use quiet_host::{sim::SplitMix64, storage::db::now_ms};
use quiet_test_support::{wait_for, HostDirs, HostProcess};

use crate::{
    bin, db,
    sync::{cli, create_network, fill, message_ids, sync_host},
};

const KILLS: usize = 30;
/// Messages A holds before B joins, and how far B is kept behind A: B
/// catches up at a few thousand events a second (debug build), so it is
/// still catching up when it is killed.
const BACKLOG: usize = 8000;
/// Messages B creates itself in each of its lives.
const LOCAL: usize = 20;
/// A kill comes this long after the host said it was running. Since a
/// response's signatures are checked on the reader, a debug B takes the
/// 8,000 in about 1.5 s: kills from 2 s on found it caught up.
const KILL_AFTER_MS: (u64, u64) = (300, 1600);
const SEED_VAR: &str = "QUIET_CRASH_SEED";
/// The one job of `sync::SYNC_JOBS`.
const JOB: &str = "sync_with_peers";
const JOB_PERIOD_MS: i64 = 3000;

fn seed() -> u64 {
    match std::env::var(SEED_VAR) {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("{SEED_VAR}={s:?} is not a u64")),
        Err(_) => SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    }
}

/// The ids of the events members sent (not the hosts' membership events).
fn event_ids(data: &Path) -> HashSet<Vec<u8>> {
    let conn = db(data);
    let mut stmt = conn
        .prepare(&format!(
            "SELECT event_id FROM events WHERE {}",
            quiet_test_support::peers::SENT_EVENTS
        ))
        .unwrap();
    let ids = stmt
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    ids
}

/// The sync job's `(last_run_ms, run_count)`, once it has run.
fn job_run(data: &Path) -> Option<(i64, i64)> {
    db(data)
        .query_row(
            "SELECT last_run_ms, run_count FROM job_runs WHERE job_name = ?",
            [JOB],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .ok()
}

fn check(data: &Path, pragma: &str) -> String {
    db(data)
        .query_row(&format!("PRAGMA {pragma}"), [], |r| r.get(0))
        .unwrap()
}

/// One host, across its lives.
struct Peer {
    name: &'static str,
    peer_id: String,
    dirs: HostDirs,
    host: Option<HostProcess>,
    /// Restarts listen where the peer already knows this host.
    listen: String,
    /// Every event id a reader saw just before one of the kills.
    committed: HashSet<Vec<u8>>,
    /// The sync job's `(last_run_ms, run_count)` seen before each kill.
    runs: Vec<(i64, i64)>,
    kills: usize,
}

impl Peer {
    fn new(name: &'static str, (dirs, host): (HostDirs, HostProcess)) -> Self {
        let status = host.status();
        Peer {
            name,
            peer_id: status["peer_id"].as_str().unwrap().to_owned(),
            listen: status["listen_addr"].as_str().unwrap().to_owned(),
            dirs,
            host: Some(host),
            committed: HashSet::new(),
            runs: Vec::new(),
            kills: 0,
        }
    }

    fn data(&self) -> &Path {
        &self.dirs.data
    }

    /// Kills the host; checks the files as the kill left them, before a
    /// restart could repair anything. Returns the ids seen before the kill.
    fn crash(&mut self) -> HashSet<Vec<u8>> {
        let seen = event_ids(self.data());
        let run = job_run(self.data());
        self.host.take().expect("running").kill();
        self.kills += 1;
        let what = format!("{} after kill {}", self.name, self.kills);
        assert_eq!(check(self.data(), "quick_check"), "ok", "{what}");
        let kept = event_ids(self.data());
        let lost = seen.difference(&kept).count();
        assert_eq!(lost, 0, "{what}: {lost} committed events are gone");
        if let Some(run) = run {
            let after = job_run(self.data());
            assert!(
                after.is_some_and(|a| a >= run),
                "{what}: job_runs went back from {run:?} to {after:?}"
            );
            self.runs.push(run);
        }
        self.committed.extend(seen.iter().cloned());
        seen
    }

    /// When the last request of `peer`'s sync session that this host
    /// accepted was sent.
    fn session_request_ms(&self, peer: &str) -> Option<i64> {
        db(self.data())
            .query_row(
                "SELECT last_request_ms FROM sync_sessions WHERE peer_id = ?",
                [peer],
                |r| r.get(0),
            )
            .ok()
    }

    fn restart(&mut self) {
        self.host = Some(HostProcess::start_with(
            &bin(),
            &self.dirs,
            &["--listen", &self.listen],
        ));
    }

    /// Checks, with the host stopped, what every kill must have left alone.
    fn check_at_rest(&self, test_start_ms: i64) -> HashSet<Vec<u8>> {
        let data = self.data();
        assert_eq!(check(data, "integrity_check"), "ok", "{}", self.name);
        let ids = event_ids(data);
        let lost = self.committed.difference(&ids).count();
        assert_eq!(lost, 0, "{}: committed events lost", self.name);

        // The projection holds each event once, and nothing else.
        let messages = message_ids(data, &network_of(data));
        let projected: HashSet<String> = messages.iter().cloned().collect();
        assert_eq!(projected.len(), messages.len(), "{}: doubled", self.name);
        let stored: HashSet<String> = ids.iter().map(hex::encode).collect();
        assert!(
            projected == stored,
            "{}: messages differ from events",
            self.name
        );
        let queued = crate::query_i64(data, "SELECT COUNT(*) FROM submissions");
        assert_eq!(queued, Some(0), "{}: submissions left behind", self.name);
        let dead = crate::query_i64(data, "SELECT COUNT(*) FROM dead_letters");
        assert_eq!(dead, Some(0), "{}: dead letters", self.name);

        // job_runs: one row per job, its time in the past, and the run
        // counter never going back nor counting runs closer than a period.
        let rows = crate::query_i64(data, "SELECT COUNT(*) FROM job_runs");
        assert_eq!(rows, Some(1), "{}: job_runs rows", self.name);
        let (last, count) = job_run(data).expect("the job ran");
        assert!(
            (test_start_ms..=now_ms()).contains(&last),
            "{}: last_run_ms {last} outside the test",
            self.name
        );
        let mut history = self.runs.clone();
        history.push((last, count));
        for w in history.windows(2) {
            let ((l0, c0), (l1, c1)) = (w[0], w[1]);
            assert!(l1 >= l0 && c1 >= c0, "{}: job_runs went back", self.name);
            assert!(
                (c1 - c0) * JOB_PERIOD_MS <= l1 - l0,
                "{}: {} runs counted in {} ms",
                self.name,
                c1 - c0,
                l1 - l0
            );
        }
        assert!(
            count > history[0].1,
            "{}: no run after the first kill",
            self.name
        );
        ids
    }
}

/// The one network a host is in.
fn network_of(data: &Path) -> String {
    db(data)
        .query_row("SELECT network_id FROM networks", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn thirty_kills_during_heavy_sync_lose_nothing_committed() {
    let seed = seed();
    eprintln!("crash test seed {seed}; replay with {SEED_VAR}={seed}");
    let mut rng = SplitMix64(seed);
    let test_start = now_ms();
    let started = Instant::now();

    let mut a = Peer::new("A", sync_host());
    let (invite, net) = create_network(a.data());
    // Every message sent (and each id the CLI reported): all must reach
    // both peers, once.
    let mut sent = BACKLOG;
    let mut reported: HashSet<String> = fill(a.data(), &net, BACKLOG, |i| {
        format!("initial {i:05} {}", "x".repeat(300))
    })
    .into_iter()
    .collect();
    let mut b = Peer::new("B", sync_host());
    cli(b.data(), &["network", "join", &invite]);

    let mut in_session = 0;
    for round in 1..=KILLS {
        for p in [&mut a, &mut b] {
            if p.host.is_none() {
                p.restart();
            }
        }
        let life = Instant::now();
        let life_ms = now_ms();
        let b_before = event_ids(b.data());
        // B's own messages go in while it runs; the kill may come before
        // the host has taken them from the queue.
        let local = {
            let (data, net) = (b.data().to_owned(), net.clone());
            let text = format!("b life {round}");
            thread::spawn(move || {
                let count = LOCAL.to_string();
                cli(&data, &["message", "send", &net, &text, "--count", &count])
            })
        };
        // The last round takes A down too, so that the convergence measured
        // afterwards is the catch-up, not A's wait for its sessions with
        // the dead B to expire (the transit TTL, 30 s).
        let kill_a = rng.next_u64().is_multiple_of(4) || round == KILLS;
        let delay = Duration::from_millis(rng.between(KILL_AFTER_MS));
        thread::sleep(delay.saturating_sub(life.elapsed()));

        let a_ids = event_ids(a.data());
        // A records each request of B's that it admits, in the transaction
        // that answers it: a later one than the restart means B was in a
        // catch-up session during this life.
        let session = a
            .session_request_ms(&b.peer_id)
            .is_some_and(|t| t >= life_ms);
        if kill_a {
            a.crash();
        }
        let b_seen = b.crash();
        let got = b_seen
            .difference(&b_before)
            .filter(|id| a_ids.contains(*id))
            .count();
        let behind = a_ids.difference(&b_seen).count();
        in_session += usize::from(session && behind > 0);
        eprintln!(
            "kill {round:2} at +{:4} ms{}: B holds {} events, got {got} from A in this life, \
             {behind} behind, {}",
            life.elapsed().as_millis(),
            if kill_a { " (and A)" } else { "" },
            b_seen.len(),
            if session {
                "in a session"
            } else {
                "between sessions"
            },
        );

        let ids = local.join().expect("message send on B");
        reported.extend(ids.lines().map(str::to_owned));
        sent += LOCAL;
        let short = BACKLOG.saturating_sub(behind);
        if short > 0 {
            let text = format!("top-up {round}");
            let ids = cli(
                a.data(),
                &[
                    "message",
                    "send",
                    &net,
                    &text,
                    "--count",
                    &short.to_string(),
                ],
            );
            reported.extend(ids.lines().map(str::to_owned));
            sent += short;
        }
    }
    let killing = started.elapsed();
    // The moments are random, but a run where hardly any kill hit a
    // catch-up session of B's would not test what it says.
    assert!(
        in_session >= KILLS / 5,
        "only {in_session} of {KILLS} kills came during a session of B's"
    );

    a.restart();
    b.restart();
    let converged = wait_for(Duration::from_secs(90), || {
        let (ia, ib) = (event_ids(a.data()), event_ids(b.data()));
        (ia.len() == sent && ia == ib).then_some(())
    });
    assert!(
        converged.is_some(),
        "no convergence on {sent} events: A {}, B {}",
        event_ids(a.data()).len(),
        event_ids(b.data()).len()
    );
    let converging = started.elapsed() - killing;
    a.host.take().unwrap().stop();
    b.host.take().unwrap().stop();
    let ia = a.check_at_rest(test_start);
    let ib = b.check_at_rest(test_start);
    assert!(ia == ib, "A and B hold different events");
    let stored: HashSet<String> = ia.iter().map(hex::encode).collect();
    let missing = reported.difference(&stored).count();
    assert_eq!(missing, 0, "ids the CLI reported were never stored");
    eprintln!(
        "crash: {} kills of B ({in_session} in one of its catch-up sessions), {} of A; \
         {sent} events, all on both; kills took {killing:.1?}, convergence \
         {converging:.1?}, the whole test {:.1?}",
        b.kills,
        a.kills,
        started.elapsed()
    );
}
