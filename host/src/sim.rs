//! A deterministic network simulator: many hosts in one thread, on virtual
//! time, over a lossy network that a seed makes reproducible.
//!
//! Each simulated host is a real host minus its sockets and its clock: its
//! own data folder (SQLite file, identity key, network keys) in a temporary
//! folder, the real plugin libraries loaded through the [`Reloader`] (a
//! private `dlopen`ed copy per host, so plugin state is per host, as in
//! separate processes), the real [`Scheduler`] running jobs and draining CLI
//! submissions, the real pipeline and event store, and the real
//! [`NetworkOutbox`] and [`Inbound`] doing event and transit crypto. Only
//! two things are replaced:
//!
//! - **the socket**: the outbox hands sealed frames to the simulator (a
//!   [`Transport`]), which delivers them to the destination's [`Inbound`]
//!   after a per-link latency, or loses, duplicates or reorders them; frames
//!   larger than the link's datagram size travel as fragments, each lost on
//!   its own, and arrive only if all do; partitions split hosts into groups
//!   that cannot reach each other until healed;
//! - **the clock**: [`db::now_ms`] returns the simulator's virtual time on
//!   its thread ([`db::set_thread_clock`]). Time jumps from one event (a
//!   frame arriving, a host's scheduler waking) to the next; handling takes
//!   no virtual time.
//!
//! **Determinism.** One seed drives two streams: the simulator's own
//! (latency, loss, duplication, reordering), and the host's entropy
//! ([`crate::crypto::entropy`]: identities, network ids and event nonces, hence
//! event ids, which decide how reconciliation splits ranges and so how many
//! frames a sync takes). Hosts and deliveries are visited in a fixed order
//! (host index; arrival time, then send order), on one thread. What stays
//! random is drawn inside the plugins (the sync plugin's request ids,
//! session ids and transit secrets, from the OS): fixed-length values that
//! change bytes, never the number, size, order or fate of frames, because
//! the simulator decides from sizes and its own stream only. A plugin must
//! not let hash-map order decide what it sends (the sync plugin sorts the
//! ids negentropy hands it out of a `HashSet`). [`Sim::trace_digest`]
//! hashes every delivery (time, link, size), so a test checks that a seed
//! replays exactly.
//!
//! Use it from a test (plugins built with `quiet_test_support::plugin`):
//!
//! ```ignore
//! let mut sim = Sim::new(SimConfig::new(seed_for("my_test"), vec![sync, messages]))?;
//! let (a, b) = (sim.add_host()?, sim.add_host()?);
//! let net = sim.create_network(a)?;
//! sim.join(b, a, &net)?;
//! sim.send_message(a, &net, "hello")?;
//! let took = sim.run_until(60_000, |s| s.converged(&net)).expect("converges");
//! ```

use std::{
    cmp::Reverse,
    collections::{BTreeSet, BinaryHeap},
    marker::PhantomData,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{mpsc, Arc, Mutex},
};

use arc_swap::ArcSwap;
use rusqlite::Connection;

use crate::{
    cli::commands,
    crypto::{entropy, identity::HostIdentity, transit::LiveRequests},
    engine::{
        inbox::Received,
        jobs::JobsConfig,
        pipeline::Services,
        reload::{ReloadPaths, Reloader},
        scheduler::Scheduler,
    },
    network::{
        inbound::Inbound,
        outbound::{NetworkOutbox, Transport},
        wire::Wire,
    },
    plugins::registry::Plugins,
    storage::{
        counters::Counters,
        db,
        event_store::EventStore,
        networks::{Invite, NetworkKeys},
    },
};

/// The environment variable that replays a seed.
pub const SEED_VAR: &str = "QUIET_SIM_SEED";

/// Virtual time at the start of every simulation (2026-01-01, UTC).
pub const START_MS: i64 = 1_767_225_600_000;

/// How often [`Sim::run_until`] checks its condition, in virtual ms: the
/// resolution of the times it reports.
pub const CHECK_EVERY_MS: i64 = 100;

/// The seed to run `test` with: `QUIET_SIM_SEED` if set (decimal or
/// `0x` hex), else one derived from the test's name, so that CI runs the
/// same schedule every time and a failure replays.
pub fn seed_for(test: &str) -> u64 {
    match std::env::var(SEED_VAR) {
        Ok(s) => {
            let s = s.trim();
            let parsed = match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("{SEED_VAR}={s:?} is not a u64"))
        }
        // FNV-1a: stable across Rust versions, unlike the std hasher.
        Err(_) => test.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        }),
    }
}

/// How one direction of a link treats frames.
#[derive(Clone, Debug, PartialEq)]
pub struct LinkSpec {
    /// One-way latency in ms, drawn uniformly from `min..=max` per frame.
    pub latency_ms: (u64, u64),
    /// Probability that a datagram (one fragment) is lost.
    pub loss: f64,
    /// Probability that a frame arrives twice (the copy with its own
    /// latency).
    pub duplicate: f64,
    /// Probability that a frame ignores the link's order. Otherwise a frame
    /// never arrives before one sent earlier on the same link (jitter
    /// without reordering, as on one path); a reordered frame arrives after
    /// its own latency, overtaking or overtaken.
    pub reorder: f64,
    /// The largest datagram, in bytes: a larger frame travels as
    /// `ceil(len / max_datagram)` fragments, each lost on its own, and
    /// arrives only if all of them do.
    pub max_datagram: usize,
    /// Whether the link carries anything at all.
    pub up: bool,
}

impl Default for LinkSpec {
    /// A quiet LAN: 1–10 ms, nothing lost, duplicated or reordered,
    /// UDP-sized datagrams.
    fn default() -> Self {
        Self {
            latency_ms: (1, 10),
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            max_datagram: 65_507,
            up: true,
        }
    }
}

/// What a simulation is made of.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// The seed of everything random that can change the schedule.
    pub seed: u64,
    /// Plugin libraries every host loads.
    pub plugins: Vec<PathBuf>,
    /// The `jobs.yaml` every host runs.
    pub jobs_yaml: String,
    /// Every link's behaviour until changed.
    pub link: LinkSpec,
}

impl SimConfig {
    /// `plugins` on default links, syncing every 3 s with the shipped
    /// defaults.
    pub fn new(seed: u64, plugins: Vec<PathBuf>) -> Self {
        Self {
            seed,
            plugins,
            jobs_yaml: sync_jobs(&[]),
            link: LinkSpec::default(),
        }
    }
}

/// A `jobs.yaml` with the `sync_with_peers` job every 3 s and `params`
/// (`name: value` pairs, e.g. `("max_events_per_response", 50)`).
pub fn sync_jobs(params: &[(&str, i64)]) -> String {
    let mut yaml =
        "jobs:\n  - name: sync_with_peers\n    handler: sync\n    frequency_ms: 3000\n    params:\n"
            .to_string();
    if params.is_empty() {
        yaml.push_str("      {}\n");
    }
    for (name, value) in params {
        yaml.push_str(&format!("      {name}: {value}\n"));
    }
    yaml
}

/// What the network did with frames, in all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames the hosts sent.
    pub sent: u64,
    /// Their bytes.
    pub bytes_sent: u64,
    /// Frames handed to a host (copies included).
    pub delivered: u64,
    /// Frames lost (a fragment of them was).
    pub lost: u64,
    /// Extra copies made.
    pub duplicated: u64,
    /// Frames that left their link's order.
    pub reordered: u64,
    /// Frames dropped because the link was down or partitioned, when sent
    /// or when they would have arrived.
    pub cut: u64,
    /// Frames to an address no simulated host has.
    pub unroutable: u64,
}

/// The simulator's transport: frames wait here until the simulator takes
/// them after the host's transaction.
#[derive(Clone, Default)]
struct Nic(Arc<Mutex<Vec<Frame>>>);

/// A frame and where it goes.
type Frame = (SocketAddr, Vec<u8>);

impl Transport for Nic {
    fn send_frame(&self, addr: SocketAddr, frame: Vec<u8>) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((addr, frame));
    }
}

impl Nic {
    fn take(&self) -> Vec<Frame> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

struct SimHost {
    data: PathBuf,
    addr: SocketAddr,
    peer_id: String,
    scheduler: Scheduler,
    inbound: Inbound,
    nic: Nic,
    /// For reading results; never writes.
    reader: Connection,
    next_wake_ms: i64,
    inbox: Vec<Received>,
    /// How far this host's clock is ahead of the simulator's (behind if
    /// negative): what it stamps its events and requests with.
    skew_ms: i64,
}

/// A frame on its way; ordered by arrival, then by when it was sent.
struct InFlight {
    at: i64,
    seq: u64,
    from: usize,
    to: usize,
    frame: Vec<u8>,
}

impl PartialEq for InFlight {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for InFlight {}
impl PartialOrd for InFlight {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for InFlight {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// splitmix64: a small reproducible stream from one seed, with no
/// dependency. The simulator draws its schedule from one; tests with
/// seeded choices of their own (such as the crash test's) use it too.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// True with probability `p`; draws nothing when `p` is 0, so that
    /// turning a fault off does not shift the rest of the stream.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    /// A number in `lo..=hi` (`lo` if the range is empty).
    pub fn between(&mut self, (lo, hi): (u64, u64)) -> u64 {
        lo + self.next_u64() % (hi.saturating_sub(lo).saturating_add(1)).max(1)
    }
}

/// A network of simulated hosts; see the [module docs](self). It owns the
/// virtual clock and the seeded entropy of the thread that creates it, so
/// it stays on that thread (it is not `Send`), and one thread runs one
/// simulation at a time.
pub struct Sim {
    root: tempfile::TempDir,
    config: SimConfig,
    now: i64,
    rng: SplitMix64,
    hosts: Vec<SimHost>,
    /// `links[from][to]`.
    links: Vec<Vec<LinkSpec>>,
    /// Partition group per host: hosts reach only hosts of their group.
    groups: Vec<u32>,
    /// `floor[from][to]`: the latest arrival on a link so far, which an
    /// in-order frame may not precede.
    floor: Vec<Vec<i64>>,
    /// `delivered[from][to]`: frames handed over on each link.
    delivered: Vec<Vec<u64>>,
    /// `sent[from][to]`: frames sent on each link, delivered or not.
    sent: Vec<Vec<u64>>,
    in_flight: BinaryHeap<Reverse<InFlight>>,
    seq: u64,
    stats: NetStats,
    trace: blake3::Hasher,
    _one_thread: PhantomData<*const ()>,
}

impl Sim {
    /// An empty network. Prints the seed and how to replay it (shown when
    /// the test fails).
    pub fn new(config: SimConfig) -> Result<Self, String> {
        let root = tempfile::tempdir().map_err(|e| format!("temporary folder: {e}"))?;
        std::fs::write(root.path().join("jobs.yaml"), &config.jobs_yaml)
            .map_err(|e| format!("jobs.yaml: {e}"))?;
        eprintln!(
            "simulation seed {}; replay: {}",
            config.seed,
            replay_command(config.seed)
        );
        db::set_thread_clock(Some(START_MS));
        entropy::seed_this_thread(Some(config.seed));
        Ok(Self {
            root,
            now: START_MS,
            rng: SplitMix64(config.seed),
            config,
            hosts: Vec::new(),
            links: Vec::new(),
            groups: Vec::new(),
            floor: Vec::new(),
            delivered: Vec::new(),
            sent: Vec::new(),
            in_flight: BinaryHeap::new(),
            seq: 0,
            stats: NetStats::default(),
            trace: blake3::Hasher::new(),
            _one_thread: PhantomData,
        })
    }

    /// Adds a host with its own data folder and plugins; returns its index.
    pub fn add_host(&mut self) -> Result<usize, String> {
        let i = self.hosts.len();
        let dir = self.root.path().join(format!("host{i:02}"));
        let (data, plugins_dir) = (dir.join("data"), dir.join("plugins"));
        for d in [&data, &plugins_dir] {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        for lib in &self.config.plugins {
            let name = lib.file_name().ok_or("a plugin path without a file name")?;
            std::os::unix::fs::symlink(lib, plugins_dir.join(name))
                .map_err(|e| format!("{}: {e}", lib.display()))?;
        }
        // 10.0.0.0/8 with one address per host; every host listens on 7000.
        let ip = Ipv4Addr::from(0x0a00_0001 + i as u32);
        let addr = SocketAddr::new(IpAddr::V4(ip), 7000);
        let identity = Arc::new(HostIdentity::load_or_create(&data).map_err(|e| e.to_string())?);
        let db_err = |e: rusqlite::Error| format!("host {i}: {e}");
        {
            let conn = db::open(&data).map_err(db_err)?;
            db::set_host_state(&conn, "peer_id", Some(&identity.peer_id())).map_err(db_err)?;
            db::set_host_state(&conn, "listen_addr", Some(&addr.to_string())).map_err(db_err)?;
        }
        let plugins = Plugins::default();
        let config = Arc::new(ArcSwap::from_pointee(JobsConfig::default()));
        // The reloader's wake-ups go nowhere: the simulator ticks every
        // scheduler itself.
        let (wake, signals) = mpsc::sync_channel(1);
        let paths = ReloadPaths {
            plugins_dir,
            cache_dir: dir.join("plugin-cache"),
            jobs_path: self.root.path().join("jobs.yaml"),
        };
        let mut reloader = Reloader::new(
            paths,
            db::open(&data).map_err(db_err)?,
            plugins.clone(),
            config.clone(),
            wake,
        )
        .map_err(db_err)?;
        reloader.initial_config().map_err(|e| e.to_string())?;
        reloader.sync();
        let loaded = plugins.current().plugins.len();
        if loaded != self.config.plugins.len() {
            return Err(format!(
                "host {i} loaded {loaded} of {} plugins (see the log)",
                self.config.plugins.len()
            ));
        }
        let counters = Arc::new(Counters::default());
        let keys = Arc::new(NetworkKeys::new(&data));
        let wire = Wire {
            identity: identity.clone(),
            live: Arc::new(LiveRequests::default()),
            keys: keys.clone(),
            counters: counters.clone(),
        };
        let nic = Nic::default();
        // Shared with the inbound side, which opens responses' events
        // ahead as a real host's reader thread does.
        let store = EventStore::new(keys, counters.clone()).signing_as(identity.clone());
        let services = Services {
            identity: identity.public(),
            outbox: Box::new(NetworkOutbox::new(wire.clone(), Box::new(nic.clone()))),
            store: Some(store.clone()),
            config: config.clone(),
        };
        let scheduler = Scheduler::new(
            db::open(&data).map_err(db_err)?,
            plugins,
            config,
            services,
            Arc::new(Mutex::new(signals)),
            counters,
        );
        self.hosts.push(SimHost {
            reader: db::open_read_only(&data).map_err(db_err)?,
            data,
            addr,
            peer_id: identity.peer_id(),
            scheduler,
            inbound: Inbound::new(wire).opening_events_ahead(store),
            nic,
            next_wake_ms: self.now,
            skew_ms: 0,
            inbox: Vec::new(),
        });
        grow(&mut self.links, self.config.link.clone());
        grow(&mut self.floor, 0);
        grow(&mut self.delivered, 0);
        grow(&mut self.sent, 0);
        self.groups.push(0);
        Ok(i)
    }

    /// Adds `n` hosts; returns their indices.
    pub fn add_hosts(&mut self, n: usize) -> Result<Vec<usize>, String> {
        (0..n).map(|_| self.add_host()).collect()
    }

    /// The number of hosts.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// Whether there are no hosts.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Host `i`'s data folder (SQLite file, keys).
    pub fn data_dir(&self, i: usize) -> &Path {
        &self.hosts[i].data
    }

    /// Host `i`'s peer id.
    pub fn peer_id(&self, i: usize) -> &str {
        &self.hosts[i].peer_id
    }

    /// Creates a network on host `i` (as `quiet-host network create`);
    /// returns its id.
    pub fn create_network(&mut self, i: usize) -> Result<String, String> {
        let addr = self.hosts[i].addr.to_string();
        let invite = commands::network_create(&self.hosts[i].data, Some(&addr))?;
        Ok(Invite::decode(&invite)?.network_id)
    }

    /// Host `i` joins `network` through an invite from `inviter`, who is
    /// then the only peer it knows.
    pub fn join(&mut self, i: usize, inviter: usize, network: &str) -> Result<(), String> {
        let host = &self.hosts[inviter];
        let invite = commands::network_invite(&host.data, network, Some(&host.addr.to_string()))?;
        commands::network_join(&self.hosts[i].data, &invite).map(drop)
    }

    /// Queues a message on host `i` (as `quiet-host message send`): the
    /// host's scheduler stores and projects it at its next tick, within
    /// 200 virtual ms. Returns the event id (hex).
    pub fn send_message(&mut self, i: usize, network: &str, text: &str) -> Result<String, String> {
        self.on_clock_of(i, |data| commands::message_send(data, network, text))
    }

    /// Queues an event on host `i`, as `quiet-host event send NETWORK TYPE
    /// CONTENT --dep …` does (`content` is JSON). Returns the event id (hex).
    pub fn send_event(
        &mut self,
        i: usize,
        network: &str,
        event_type: &str,
        content: &str,
        deps: &[String],
    ) -> Result<String, String> {
        self.on_clock_of(i, |data| {
            commands::event_send(data, network, event_type, content, deps)
        })
    }

    /// Sets host `i`'s clock `skew_ms` ahead of the simulator's (behind if
    /// negative), as real hosts' clocks differ: the times it signs and
    /// stamps requests with. Beyond the transit TTL (30 s), sync with it
    /// fails, as it would.
    pub fn set_clock_skew(&mut self, i: usize, skew_ms: i64) {
        self.hosts[i].skew_ms = skew_ms;
    }

    /// Runs `f` on host `i`'s data folder with the thread's clock at that
    /// host's time.
    fn on_clock_of<T>(&mut self, i: usize, f: impl FnOnce(&Path) -> T) -> T {
        db::set_thread_clock(Some(self.now + self.hosts[i].skew_ms));
        let out = f(&self.hosts[i].data);
        db::set_thread_clock(Some(self.now));
        out
    }

    /// Like [`Sim::send_message`], for many messages in one transaction;
    /// returns their event ids (hex), in order.
    pub fn send_messages(
        &mut self,
        i: usize,
        network: &str,
        texts: &[&str],
    ) -> Result<Vec<String>, String> {
        self.on_clock_of(i, |data| commands::message_send_many(data, network, texts))
    }

    /// Sets both directions of the link between `a` and `b`.
    pub fn set_link(&mut self, a: usize, b: usize, spec: LinkSpec) {
        self.links[a][b] = spec.clone();
        self.links[b][a] = spec;
    }

    /// Sets one direction of a link: frames from `from` to `to`.
    pub fn set_one_way(&mut self, from: usize, to: usize, spec: LinkSpec) {
        self.links[from][to] = spec;
    }

    /// Sets every link.
    pub fn set_all_links(&mut self, spec: LinkSpec) {
        for row in &mut self.links {
            row.fill(spec.clone());
        }
    }

    /// Splits the hosts into `groups` that cannot reach each other; hosts
    /// in no group form one more. Frames already on their way across the
    /// split are lost when they arrive.
    pub fn partition(&mut self, groups: &[&[usize]]) {
        self.groups.fill(0);
        for (g, hosts) in groups.iter().enumerate() {
            for &h in *hosts {
                self.groups[h] = g as u32 + 1;
            }
        }
    }

    /// Ends any partition.
    pub fn heal(&mut self) {
        self.groups.fill(0);
    }

    /// Whether a frame from `a` can reach `b` now.
    pub fn reachable(&self, a: usize, b: usize) -> bool {
        self.links[a][b].up && self.groups[a] == self.groups[b]
    }

    /// Virtual time now, in ms since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        self.now
    }

    /// Virtual ms since the simulation started.
    pub fn elapsed_ms(&self) -> i64 {
        self.now - START_MS
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.config.seed
    }

    /// What the network did so far.
    pub fn stats(&self) -> &NetStats {
        &self.stats
    }

    /// Frames handed from `from` to `to` so far.
    pub fn delivered(&self, from: usize, to: usize) -> u64 {
        self.delivered[from][to]
    }

    /// Frames `from` sent to `to` so far, whether they arrived or not.
    pub fn sent(&self, from: usize, to: usize) -> u64 {
        self.sent[from][to]
    }

    /// A hash of every delivery so far (time, link, size, in order): equal
    /// for two runs with the same seed and the same test.
    pub fn trace_digest(&self) -> String {
        self.trace.finalize().to_hex().to_string()
    }

    /// Runs for `ms` of virtual time.
    pub fn run_for(&mut self, ms: i64) {
        let until = self.now + ms;
        while let Some(next) = self.next_event().filter(|t| *t <= until) {
            self.step(next);
        }
        self.set_now(until);
    }

    /// Runs until `done` holds (checked every [`CHECK_EVERY_MS`]) or
    /// `limit_ms` of virtual time have passed; returns the virtual ms it
    /// took, or `None` if `done` never held.
    pub fn run_until(&mut self, limit_ms: i64, mut done: impl FnMut(&Sim) -> bool) -> Option<i64> {
        let start = self.now;
        loop {
            if done(self) {
                return Some(self.now - start);
            }
            if self.now - start >= limit_ms {
                return None;
            }
            self.run_for(CHECK_EVERY_MS.min(start + limit_ms - self.now));
        }
    }

    /// The event ids host `i` stores in `network`, but the membership
    /// events hosts write themselves (`quiet.*`, such as its genesis):
    /// what its members sent.
    pub fn events(&self, i: usize, network: &str) -> BTreeSet<Vec<u8>> {
        self.event_ids(i, network, "AND event_type NOT LIKE 'quiet.%'")
    }

    fn event_ids(&self, i: usize, network: &str, only: &str) -> BTreeSet<Vec<u8>> {
        self.hosts[i]
            .reader
            .prepare_cached(&format!(
                "SELECT event_id FROM events WHERE network_id = ? {only}"
            ))
            .and_then(|mut s| s.query_map([network], |r| r.get(0))?.collect())
            .unwrap_or_else(|e| panic!("host {i}: reading events: {e}"))
    }

    /// Whether every host stores the same events of `network`, membership
    /// events too.
    pub fn converged(&self, network: &str) -> bool {
        let first = self.event_ids(0, network, "");
        (1..self.hosts.len()).all(|i| self.event_ids(i, network, "") == first)
    }

    /// Whether every host stores every event id (hex) in `ids`.
    pub fn everyone_has(&self, network: &str, ids: &[String]) -> bool {
        (0..self.hosts.len()).all(|i| self.has(i, network, ids))
    }

    /// Whether host `i` stores every one of `ids` (hex) in `network`.
    pub fn has(&self, i: usize, network: &str, ids: &[String]) -> bool {
        let have = self.events(i, network);
        ids.iter()
            .all(|id| hex::decode(id).is_ok_and(|id| have.contains(&id)))
    }

    /// One integer from `sql` on host `i`'s database; panics if it fails.
    pub fn query_i64(&self, i: usize, sql: &str) -> i64 {
        self.hosts[i]
            .reader
            .query_row(sql, [], |r| r.get(0))
            .unwrap_or_else(|e| panic!("host {i}: {sql}: {e}"))
    }

    /// Host `i`'s counter `name` as last flushed (schedulers flush at every
    /// tick, at least every 200 virtual ms).
    pub fn counter(&self, i: usize, name: &str) -> i64 {
        self.hosts[i]
            .reader
            .query_row(
                "SELECT COALESCE((SELECT value FROM counters WHERE name = ?), 0)",
                [name],
                |r| r.get(0),
            )
            .unwrap_or_else(|e| panic!("host {i}: counter {name}: {e}"))
    }

    fn set_now(&mut self, now: i64) {
        self.now = now;
        db::set_thread_clock(Some(now));
    }

    fn next_event(&self) -> Option<i64> {
        let frame = self.in_flight.peek().map(|Reverse(f)| f.at);
        let wake = self.hosts.iter().map(|h| h.next_wake_ms).min();
        frame.into_iter().chain(wake).min()
    }

    /// Everything due at `t`: frames arrive (and are opened by their
    /// host's transit and event crypto), then each host in turn runs what
    /// arrived through its pipeline in one transaction, ticks its scheduler
    /// if due, and its frames go out.
    fn step(&mut self, t: i64) {
        self.set_now(t);
        while self.in_flight.peek().is_some_and(|Reverse(f)| f.at <= t) {
            let Reverse(f) = self.in_flight.pop().expect("peeked");
            self.arrive(f);
        }
        for i in 0..self.hosts.len() {
            let host = &mut self.hosts[i];
            db::set_thread_clock(Some(t + host.skew_ms));
            if !host.inbox.is_empty() {
                let batch = std::mem::take(&mut host.inbox);
                if let Err(e) = host.scheduler.receive(batch) {
                    tracing::error!(host = i, "simulated host: database error: {e}");
                }
            }
            if host.next_wake_ms <= t {
                let sleep = host.scheduler.tick().unwrap_or_else(|e| {
                    tracing::error!(host = i, "simulated host: database error: {e}");
                    std::time::Duration::from_millis(200)
                });
                // At least 1 ms, so that time moves.
                host.next_wake_ms = t + (sleep.as_millis() as i64).max(1);
            }
            for (addr, frame) in host.nic.take() {
                self.transmit(i, addr, frame);
            }
        }
        db::set_thread_clock(Some(t));
    }

    fn arrive(&mut self, f: InFlight) {
        if !self.reachable(f.from, f.to) {
            self.stats.cut += 1;
            return;
        }
        self.stats.delivered += 1;
        self.delivered[f.from][f.to] += 1;
        for n in [f.at, f.from as i64, f.to as i64, f.frame.len() as i64] {
            self.trace.update(&n.to_le_bytes());
        }
        let from = self.hosts[f.from].addr;
        let host = &mut self.hosts[f.to];
        db::set_thread_clock(Some(self.now + host.skew_ms));
        if let Ok(envelope) = host.inbound.open(from, f.frame) {
            host.inbox.push(Received::new(envelope));
        }
        db::set_thread_clock(Some(self.now));
    }

    fn transmit(&mut self, from: usize, addr: SocketAddr, frame: Vec<u8>) {
        self.stats.sent += 1;
        self.stats.bytes_sent += frame.len() as u64;
        let Some(to) = self.hosts.iter().position(|h| h.addr == addr) else {
            self.stats.unroutable += 1;
            return;
        };
        self.sent[from][to] += 1;
        if !self.reachable(from, to) {
            self.stats.cut += 1;
            return;
        }
        let link = self.links[from][to].clone();
        let fragments = frame.len().div_ceil(link.max_datagram.max(1)).max(1);
        // Every fragment's fate is drawn, lost or not, so that one loss
        // does not shift the stream for the frames after it.
        let lost = (0..fragments)
            .map(|_| self.rng.chance(link.loss))
            .fold(false, |a, b| a | b);
        if lost {
            self.stats.lost += 1;
            return;
        }
        let copies = if self.rng.chance(link.duplicate) {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let (lo, hi) = link.latency_ms;
            let mut at = self.now + self.rng.between((lo, hi)) as i64;
            if self.rng.chance(link.reorder) {
                self.stats.reordered += 1;
            } else {
                at = at.max(self.floor[from][to]);
                self.floor[from][to] = at;
            }
            self.seq += 1;
            self.in_flight.push(Reverse(InFlight {
                at,
                seq: self.seq,
                from,
                to,
                frame: frame.clone(),
            }));
        }
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        db::set_thread_clock(None);
        entropy::seed_this_thread(None);
    }
}

/// Adds a row and a column, filled with `value`, to a square matrix.
fn grow<T: Clone>(m: &mut Vec<Vec<T>>, value: T) {
    for row in m.iter_mut() {
        row.push(value.clone());
    }
    m.push(vec![value; m.len() + 1]);
}

/// The command that reruns the current test with `seed`.
fn replay_command(seed: u64) -> String {
    let test = std::thread::current()
        .name()
        .filter(|n| *n != "main")
        .map(|n| format!(" -- {n} --exact --nocapture"))
        .unwrap_or_default();
    // A test binary is named `<target>-<hash>`.
    let target = std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.file_stem()?.to_str()?.rsplit_once('-')?.0.to_owned()))
        .map(|t| format!(" --test {t}"))
        .unwrap_or_default();
    let package = std::env::var("CARGO_PKG_NAME")
        .map(|p| format!(" -p {p}"))
        .unwrap_or_default();
    format!("{SEED_VAR}={seed} cargo test{package}{target}{test}")
}
