//! The hostile-peer harness: a scripted stranger and a scripted member
//! attack a real `quiet-host` process, A, while an honest peer, B, keeps
//! syncing with it.
//!
//! Each test runs one attack through [`under_attack`], which checks the same
//! things of every attack, so that a new attack is a few lines:
//! - B's new message, written once the attack is under way, reaches A
//!   within two sync intervals;
//! - A's CPU (a share of one core, over the attack) and its RSS and thread
//!   count (their peaks, sampled every 100 ms) stay within the attack's
//!   stated [`Bounds`];
//! - after the attack, A's new message reaches B: the two still sync;
//! - nothing committed is lost: every event A held before is still there,
//!   A and B end with the same events, and every message is projected.
//!
//! The attacker uses the host's own library to build its frames, as a
//! member gone bad would. The attacks run one at a time (a lock), in a test
//! binary of their own, so the figures are A's alone. Run with
//! `--nocapture` to see them; BENCHMARKS.md ("Hostile peers") quotes them.

mod member;
mod stranger;

use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use crypto_box::PublicKey;
use quiet_host::crypto::event_crypto::{self, NetworkKey};
use quiet_test_support::{
    peers::{self, event_ids, events, query_i64, SYNC_INTERVAL},
    proc_status, wait_for, HostDirs, HostProcess,
};

/// The `quiet-host` binary under test.
fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_quiet-host"))
}

/// How long each attack lasts, at least.
const ATTACK: Duration = Duration::from_secs(8);
/// How long an attack runs before B writes its message.
const RAMP: Duration = Duration::from_secs(1);

/// The most threads A may run: a reader per connection, of which there are
/// at most 256 (64 untrusted), readers of connections just closed that have
/// not ended yet, and the host's own dozen. Attacks that open and close
/// connections without end are held to this; others to what they need.
pub const MAX_THREADS: u64 = 256 + 32;

/// What an attacker knows of A: its address and public key, and (a member)
/// the network and its key.
#[derive(Clone)]
pub struct Target {
    /// A's listening address, `ip:port`.
    pub addr: String,
    /// A's public key.
    pub key: PublicKey,
    /// The network A and B share.
    pub net: String,
    /// Its key, which every member holds.
    pub net_key: NetworkKey,
}

impl Target {
    /// What a member of `net` knows of the host `a`, running on `dirs`.
    pub fn of(dirs: &HostDirs, a: &HostProcess, net: &str) -> Self {
        let status = a.status();
        let key_file = dirs.data.join("keys").join(format!("{net}.key"));
        Self {
            addr: status["listen_addr"].as_str().unwrap().to_owned(),
            key: event_crypto::peer_key(status["peer_id"].as_str().unwrap()).unwrap(),
            net_key: NetworkKey(std::fs::read(key_file).unwrap().try_into().unwrap()),
            net: net.to_owned(),
        }
    }
}

/// What an attack may cost A.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// A's CPU over the attack, as a share of one core.
    pub cpu: f64,
    /// How far A's RSS may rise above what it was before, in MiB.
    pub rss_growth_mib: u64,
    /// How many threads A may have at once.
    pub threads: u64,
}

/// Set by the harness when the attack should end.
#[derive(Clone, Default)]
pub struct Stop(Arc<AtomicBool>);

impl Stop {
    /// Whether the attack should end.
    pub fn now(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// Sleeps until the attack should end.
    pub fn wait(&self) {
        while !self.now() {
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The hosts after an attack, and what it cost A.
pub struct Attacked {
    pub a_dirs: HostDirs,
    pub a: HostProcess,
    _b_dirs: HostDirs,
    _b: HostProcess,
    pub net: String,
    /// A's counters, once the attack and the check after it are over.
    pub counters: serde_json::Value,
}

impl Attacked {
    /// A's counter `name`, 0 if it was never bumped.
    pub fn counter(&self, name: &str) -> i64 {
        self.counters[name].as_i64().unwrap_or(0)
    }

    /// One integer from a query of A's database.
    pub fn a_query(&self, sql: &str) -> i64 {
        query_i64(&self.a_dirs.data, sql).unwrap_or_else(|| panic!("{sql} failed"))
    }
}

/// A's CPU, RSS and threads, sampled while an attack runs.
struct Sampler {
    rss_peak: Arc<Mutex<u64>>,
    threads_peak: Arc<Mutex<u64>>,
    stop: Stop,
    thread: thread::JoinHandle<()>,
}

impl Sampler {
    fn start(pid: u32) -> Self {
        let (rss_peak, threads_peak, stop) = (
            Arc::new(Mutex::new(0)),
            Arc::new(Mutex::new(0)),
            Stop::default(),
        );
        let thread = {
            let (rss, threads, stop) = (rss_peak.clone(), threads_peak.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.now() {
                    let mut r = rss.lock().unwrap();
                    *r = (*r).max(proc_status(pid, "VmRSS:"));
                    let mut t = threads.lock().unwrap();
                    *t = (*t).max(proc_status(pid, "Threads:"));
                    drop((r, t));
                    thread::sleep(Duration::from_millis(100));
                }
            })
        };
        Self {
            rss_peak,
            threads_peak,
            stop,
            thread,
        }
    }

    /// The peaks of RSS (KiB) and threads.
    fn finish(self) -> (u64, u64) {
        self.stop.0.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        let rss = *self.rss_peak.lock().unwrap();
        let threads = *self.threads_peak.lock().unwrap();
        (rss, threads)
    }
}

/// Runs `attack` against A while B syncs with it, checks what every
/// attack must leave true (see the [module docs](self)) and `bounds`,
/// prints the figures and returns the hosts for the attack's own checks.
///
/// `attack` runs on a thread of its own until [`Stop::now`]; it may also
/// end early.
pub fn under_attack(
    name: &str,
    bounds: Bounds,
    attack: impl FnOnce(Target, Stop) + Send + 'static,
) -> Attacked {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let bin = bin();
    let (a_dirs, a, b_dirs, b, net) = peers::synced_pair(&bin);
    let target = Target::of(&a_dirs, &a, &net);
    let before = event_ids(&a_dirs.data, &net);
    let rss_before = a.rss_kib();
    let cpu_before = a.cpu_seconds();
    let started = Instant::now();
    let sampler = Sampler::start(a.pid());
    let stop = Stop::default();
    let attacker = {
        let stop = stop.clone();
        thread::spawn(move || attack(target, stop))
    };

    thread::sleep(RAMP);
    b.cli(&["message", "send", &net, &format!("B, during {name}")]);
    let sent = Instant::now();
    let arrived = wait_for(Duration::from_secs(60), || {
        let text = format!("B, during {name}").replace('\'', "''");
        let sql = format!("SELECT COUNT(*) FROM messages WHERE text = '{text}'");
        (query_i64(&a_dirs.data, &sql) == Some(1)).then(|| sent.elapsed())
    })
    .unwrap_or_else(|| {
        let log = a.log();
        panic!(
            "{name}: B's message never reached A; A's counters {:#}\nA's log, last lines:\n{}",
            a.status()["counters"],
            log[log.len().saturating_sub(40)..].join("\n")
        )
    });
    thread::sleep(ATTACK.saturating_sub(started.elapsed()));
    let took = started.elapsed();
    let cpu = (a.cpu_seconds() - cpu_before) / took.as_secs_f64();
    let (rss_peak, threads_peak) = sampler.finish();
    stop.0.store(true, Ordering::Relaxed);
    attacker.join().expect("the attacker panicked");

    // After the attack: A's message reaches B, and both end with the
    // same events, everything A held before among them.
    a.cli(&["message", "send", &net, &format!("A, after {name}")]);
    let converged = wait_for(Duration::from_secs(30), || {
        let (on_a, on_b) = (event_ids(&a_dirs.data, &net), event_ids(&b_dirs.data, &net));
        (on_a.len() >= before.len() + 2 && on_a == on_b).then_some(on_a)
    })
    .unwrap_or_else(|| {
        panic!(
            "{name}: A and B did not converge after the attack: A {} events, B {}",
            events(&a_dirs.data, &net),
            events(&b_dirs.data, &net)
        )
    });
    let lost: BTreeSet<_> = before.difference(&converged).collect();
    assert!(lost.is_empty(), "{name}: A lost {} events", lost.len());
    for (host, data) in [("A", &a_dirs.data), ("B", &b_dirs.data)] {
        let projected = wait_for(Duration::from_secs(10), || {
            let m = query_i64(data, "SELECT COUNT(*) FROM messages")?;
            (m == converged.len() as i64).then_some(m)
        });
        assert!(
            projected.is_some(),
            "{name}: {host} has {} events and {:?} messages",
            converged.len(),
            query_i64(data, "SELECT COUNT(*) FROM messages")
        );
    }
    let counters = a.status()["counters"].clone();

    let rss_growth_mib = rss_peak.saturating_sub(rss_before) / 1024;
    eprintln!(
        "{name}: B's message reached A in {arrived:.1?}; A used {:.0} % of one core \
         (bound {:.0} %), RSS {} -> {} MiB (bound +{}), {threads_peak} threads (bound {}); \
         counters {}",
        cpu * 100.0,
        bounds.cpu * 100.0,
        rss_before / 1024,
        rss_peak / 1024,
        bounds.rss_growth_mib,
        bounds.threads,
        drops(&counters),
    );
    assert!(
        arrived <= 2 * SYNC_INTERVAL,
        "{name}: B's message took {arrived:?} to reach A"
    );
    assert!(cpu <= bounds.cpu, "{name}: A used {cpu:.2} of one core");
    assert!(
        rss_growth_mib <= bounds.rss_growth_mib,
        "{name}: A's RSS rose by {rss_growth_mib} MiB"
    );
    assert!(
        threads_peak <= bounds.threads,
        "{name}: A had {threads_peak} threads"
    );
    // Frames that authenticated were never turned away for want of room.
    assert_eq!(
        counters["drop_overloaded"].as_i64().unwrap_or(0),
        0,
        "{name}: {counters:#}"
    );
    Attacked {
        a_dirs,
        a,
        _b_dirs: b_dirs,
        _b: b,
        net,
        counters,
    }
}

/// The counters that say what A dropped, one line.
fn drops(counters: &serde_json::Value) -> String {
    counters
        .as_object()
        .map(|c| {
            c.iter()
                .filter(|(k, v)| !k.starts_with("net_bytes") && v.as_i64().unwrap_or(0) > 0)
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}
