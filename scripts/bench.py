#!/usr/bin/env python3
"""End-to-end sync benchmarks: real `quiet-host` processes (release build) on
loopback, each with its own SQLite file, with the real sync and messages
plugins. Prints one Markdown table row per figure, for BENCHMARKS.md.

    scripts/bench.py                 # every scenario at 100k events
    scripts/bench.py --events 1000000
    scripts/bench.py --only catchup,idle
    QUIET_HOST=/path/to/other/quiet-host scripts/bench.py --only bidi

Scenarios (an event counts once the receiver has stored and projected it):
  catchup   A holds N messages of ~1 KiB; a fresh B joins and pulls them all.
            Also the bytes on the wire against the naive baseline of sending
            the plain id list (32 B per id) plus the events.
  idle      A and B hold the same N events: bytes and CPU per sync round.
  scattered B loses 1,000 scattered events of the N and is restarted.
  tenth     B loses a random 10 % of the N and is restarted: bytes on the
            wire against the id-list baseline.
  bidi      10k messages, half created on each side, converged.
  peers     a hub and 20 peers holding the same N events: the hub's CPU.

Every scenario ends by checking that both stores hold the same event ids.
Before and after the runs it prints the machine's speed (see
`machine_speed`): on a shared machine, compare figures only with others
taken at a similar speed, or side by side.
"""

import argparse
import json
import os
import random
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
BIN = os.path.join(TARGET, "release")
# QUIET_HOST names another quiet-host binary, to compare builds side by side
# (the plugins still come from this tree's release build).
QUIET = os.environ.get("QUIET_HOST") or os.path.join(BIN, "quiet-host")
TEXT = "x" * 900  # with the envelope and crypto, an event of about 1 KiB
SYNC_JOB = "jobs:\n  - name: sync_with_peers\n    handler: sync\n    frequency_ms: 3000\n"
NO_JOBS = "jobs: []\n"
# The size the host cuts its WAL back to once it is copied into the database
# (`WAL_SIZE_LIMIT` in host/src/db.rs).
WAL_SETTLED = 64 << 20
HZ = os.sysconf("SC_CLK_TCK")


class Host:
    """One `quiet-host run` process and its folders."""

    def __init__(self, work, name):
        self.name = name
        self.dir = os.path.join(work, name)
        self.data = os.path.join(self.dir, "data")
        self.plugins = os.path.join(self.dir, "plugins")
        self.jobs = os.path.join(self.dir, "jobs.yaml")
        os.makedirs(self.plugins, exist_ok=True)
        for lib in ("libsync.so", "libmessages.so"):
            shutil.copy(os.path.join(BIN, lib), self.plugins)
        self.proc = None
        # One port for the host's life: peers keep its address across
        # restarts.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]

    def start(self, jobs=SYNC_JOB):
        with open(self.jobs, "w") as f:
            f.write(jobs)
        log_path = os.path.join(self.dir, "host.log")
        started = self.log_count(log_path)
        log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [QUIET, "run", "--data", self.data, "--plugins", self.plugins,
             "--jobs", self.jobs, "--listen", f"127.0.0.1:{self.port}"],
            stdout=log, stderr=log)
        wait(lambda: self.log_count(log_path) > started, 30, f"{self.name} to start")

    @staticmethod
    def log_count(path):
        try:
            with open(path, errors="replace") as f:
                return f.read().count("quiet-host running")
        except FileNotFoundError:
            return 0

    def stop(self):
        if self.proc:
            self.proc.terminate()
            self.proc.wait(30)
            self.proc = None

    def cli(self, *args):
        out = subprocess.run([QUIET, *args, "--data", self.data], check=True,
                             capture_output=True, text=True)
        return out.stdout.strip()

    def db(self):
        conn = sqlite3.connect(f"file:{self.data}/quiet.db?mode=ro", uri=True, timeout=30)
        return conn

    def query(self, sql, default=None):
        try:
            conn = self.db()
            try:
                found = conn.execute(sql).fetchone()
                return default if found is None else found[0]
            finally:
                conn.close()
        except sqlite3.Error:
            return default

    def state(self, key):
        return self.query(f"SELECT value FROM host_state WHERE key = '{key}'")

    def messages(self):
        # MAX(rowid) is one index step; COUNT(*) confirms it at the end.
        return self.query("SELECT MAX(rowid) FROM messages", 0) or 0

    def counter(self, name):
        return self.query(f"SELECT value FROM counters WHERE name = '{name}'", 0) or 0

    def event_ids(self):
        conn = self.db()
        try:
            return {r[0] for r in conn.execute("SELECT event_id FROM events")}
        finally:
            conn.close()

    def cpu(self):
        """CPU seconds (user + system) the process has used."""
        return cpu_seconds(self.proc.pid)

    def run_time(self):
        """CPU seconds the live threads have run, in nanoseconds' resolution
        (`/proc` ticks are 10 ms, more than an idle session costs). Threads
        that have exited are not counted: use it over windows in which none
        do, such as idle rounds."""
        total = 0
        for task in os.listdir(f"/proc/{self.proc.pid}/task"):
            try:
                with open(f"/proc/{self.proc.pid}/task/{task}/schedstat") as f:
                    total += int(f.read().split()[0])
            except FileNotFoundError:
                pass  # exited meanwhile
        return total / 1e9

    def peak_rss_mib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def wire_bytes(self):
        return self.counter("net_bytes_sent")

    def frames(self):
        return self.counter("net_frames_sent")


def wait(check, timeout, what):
    deadline = time.time() + timeout
    while not check():
        if time.time() > deadline:
            sys.exit(f"bench: timed out waiting for {what}")
        time.sleep(0.01)


def wait_messages(host, n, timeout=3600):
    wait(lambda: host.messages() >= n, timeout, f"{host.name} to hold {n} messages")
    count = host.query("SELECT COUNT(*) FROM messages")
    if count != n:
        sys.exit(f"bench: {host.name} holds {count} messages, expected {n}")


def proc_stat(path):
    """The name in a `/proc/.../stat` file (which may hold spaces) and the
    fields after it: `fields[0]` is proc(5)'s field 3."""
    with open(path) as f:
        text = f.read()
    return text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()


def cpu_seconds(pid):
    """CPU seconds (user + system) process `pid` has used."""
    fields = proc_stat(f"/proc/{pid}/stat")[1]
    return (int(fields[11]) + int(fields[12])) / HZ


def page_faults(pid):
    """Page faults (minor: no disk read) of process `pid` so far."""
    return int(proc_stat(f"/proc/{pid}/stat")[1][7])


def cpu_by_thread(pid):
    """CPU seconds of process `pid`'s live threads, by the first word of
    their names, most first. Threads that have exited are missing."""
    seconds = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            name, fields = proc_stat(f"/proc/{pid}/task/{task}/stat")
        except FileNotFoundError:
            continue  # exited meanwhile
        key = name.split(" ")[0]
        seconds[key] = seconds.get(key, 0) + (int(fields[11]) + int(fields[12])) / HZ
    return sorted(seconds.items(), key=lambda kv: -kv[1])


def settle_pid(pid, data, name, timeout=600):
    """Waits until the host `pid`, with its database in folder `data`, has
    written back what it last stored: its WAL copied into the database and
    cut back, and the process idle for half a second. A host that has just
    stored 100k events still has ~500 MB of WAL to copy back and cut
    (seconds of disk work); a catch-up started meanwhile would measure that
    as well as the sync. `scripts/catchup.sh` uses it too."""
    wal = os.path.join(data, "quiet.db-wal")

    def idle():
        cpu = cpu_seconds(pid)
        time.sleep(0.5)
        size = os.path.getsize(wal) if os.path.exists(wal) else 0
        return size <= WAL_SETTLED and cpu_seconds(pid) - cpu < 0.02
    wait(idle, timeout, f"{name} to write back its WAL")


def settle(host, timeout=600):
    """`settle_pid` for a running `Host`."""
    settle_pid(host.proc.pid, host.data, host.name, timeout)


def same_events(a, b):
    ids_a, ids_b = a.event_ids(), b.event_ids()
    if ids_a != ids_b:
        sys.exit(f"bench: stores differ: {len(ids_a - ids_b)} only on {a.name}, "
                 f"{len(ids_b - ids_a)} only on {b.name}")
    return len(ids_a)


def send_messages(host, network, n):
    if n:
        host.cli("message", "send", network, TEXT, "--count", str(n))


def event_bytes(host, where=""):
    return host.query(f"SELECT COALESCE(SUM(LENGTH(event)), 0) FROM events {where}", 0)


def row(*cells):
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def machine_speed():
    """Medians of two fixed workloads, in ms: a pure-Python loop (one core's
    speed) and BLAKE2b over 64 MiB (memory bandwidth too). This shared
    machine's speed drifts by half from hour to hour; these say how fast it
    was when the figures were taken, so that runs of different days compare."""
    import hashlib
    data = bytes(64 << 20)

    def loop():
        total = 0
        for i in range(2_000_000):
            total += i * i
        return total

    def median_ms(f):
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            f()
            times.append((time.perf_counter() - t0) * 1000)
        return sorted(times)[2]

    return median_ms(loop), median_ms(lambda: hashlib.blake2b(data).digest())


def two_hosts(work, n):
    """A with n messages, running; B joined to A's network, not started."""
    a, b = Host(work, "a"), Host(work, "b")
    a.start()
    invite = a.cli("network", "create")
    network = json.loads(a.cli("network", "list", "--json"))[0]["network_id"]
    send_messages(a, network, n)
    wait_messages(a, n)
    settle(a)
    b.cli("network", "join", invite)
    return a, b, network


def catchup(work, n):
    a, b, _ = two_hosts(work, n)
    cpu_a, wire_a = a.cpu(), a.wire_bytes()
    # A's peak from storing its own messages, before it serves anything.
    rss_a0 = a.peak_rss_mib()
    t0 = time.time()
    b.start()
    wait_messages(b, n)
    took = time.time() - t0
    wire = settled(lambda: a.wire_bytes() - wire_a + b.wire_bytes())
    baseline = 32 * n + event_bytes(a)
    same_events(a, b)
    row(f"catch-up {n:,}", f"{took:.2f} s", f"**{n / took:,.0f} events/s**",
        f"CPU A {a.cpu() - cpu_a:.2f} s, B {b.cpu():.2f} s",
        f"peak RSS A {a.peak_rss_mib():.0f} MiB ({rss_a0:.0f} before serving), B {b.peak_rss_mib():.0f} MiB",
        f"wire {wire / 1e6:.1f} MB = {wire / baseline:.2f}× id list + events")
    return a, b


def idle(work, a, b, n, seconds=15):
    # A host with no peers, measured over the same window, gives what a
    # host costs with nothing to sync (its timers, checkpoints, polls).
    lonely = Host(work, "lonely")
    lonely.start()
    # Let the catch-up's last sessions finish.
    time.sleep(4)
    lonely_cpu = lonely.run_time()
    start = [(h.run_time(), h.wire_bytes(), h.counter("sync_sets_equal"), h.counter("sync_sets_differ"))
             for h in (a, b)]
    time.sleep(seconds)
    end = [(h.run_time(), h.wire_bytes(), h.counter("sync_sets_equal"), h.counter("sync_sets_differ"))
           for h in (a, b)]
    rounds = sum(e[2] - s[2] for s, e in zip(start, end))
    differ = sum(e[3] - s[3] for s, e in zip(start, end))
    wire = sum(e[1] - s[1] for s, e in zip(start, end))
    cpu = [e[0] - s[0] for s, e in zip(start, end)]
    base = lonely.run_time() - lonely_cpu
    lonely.stop()
    if rounds == 0 or differ:
        sys.exit(f"bench: idle peers ran {rounds} equal and {differ} differing sessions")
    same_events(a, b)
    # Each session is one request and one response; each host serves one
    # and asks one per interval, so a host's CPU per session is its whole
    # CPU (idle overhead included) over the sessions it took part in.
    per = [1000 * (c - base) / rounds for c in cpu]
    row(f"idle, both hold {n:,}", f"{rounds} sessions in {seconds} s",
        f"**{wire / rounds:,.0f} B per round trip** ({wire / rounds / 2:,.0f} B per frame)",
        f"CPU per session over a host with no peers ({1000 * base:.1f} ms in {seconds} s): "
        f"A {per[0]:.2f} ms, B {per[1]:.2f} ms",
        "1 round trip each", "")


def lose(host, where):
    """Deletes events (and their messages) from a stopped host."""
    conn = sqlite3.connect(f"{host.data}/quiet.db")
    ids = [r[0] for r in conn.execute(f"SELECT event_id FROM events {where}")]
    # One pass over each table: `messages` has no index on the event id
    # alone, so a DELETE per id would scan it once per id.
    conn.execute("CREATE TEMP TABLE lost (event_id BLOB PRIMARY KEY)")
    conn.executemany("INSERT INTO lost VALUES (?)", [(i,) for i in ids])
    conn.execute("DELETE FROM events WHERE event_id IN (SELECT event_id FROM lost)")
    conn.execute("DELETE FROM messages WHERE event_id IN (SELECT event_id FROM lost)")
    conn.commit()
    conn.close()
    return ids


def settled(read):
    """`read()` once it has stopped changing: hosts write their counters to
    SQLite on the engine's next pass (within 200 ms), so the last frames of
    a sync show up a little after its last event is stored. A short repair
    is a few frames, and reading at once undercounted them."""
    last = read()
    while True:
        time.sleep(0.5)
        now = read()
        if now == last:
            return now
        last = now


def repair(a, b, n, label, where):
    b.stop()
    lost = lose(b, where)
    lost_bytes = event_bytes(a, "WHERE event_id IN (%s)" % ",".join("x'%s'" % i.hex() for i in lost))
    wire0, frames0 = a.wire_bytes() + b.wire_bytes(), a.frames() + b.frames()
    # A peer admits a new session of B's at most every 3 s: a restart
    # sooner than that waits for B's next try.
    time.sleep(3)
    # Rows come back with rowids past the largest left: counting those is a
    # range scan of the new rows only.
    top = b.query("SELECT COALESCE(MAX(rowid), 0) FROM events", 0)
    t0 = time.time()
    b.start()
    wait(lambda: b.query(f"SELECT COUNT(*) FROM events WHERE rowid > {top}", 0) >= len(lost),
         3600, "B to repair")
    took = time.time() - t0
    wait_messages(b, n)
    wire, frames = settled(lambda: (a.wire_bytes() + b.wire_bytes() - wire0,
                                    a.frames() + b.frames() - frames0))
    baseline = 32 * n + lost_bytes
    same_events(a, b)
    row(f"{label}: {len(lost):,} of {n:,} missing, B restarted", f"{took:.2f} s",
        f"{len(lost) / took:,.0f} events/s", f"{frames} frames (≈ {frames // 2} round trips)",
        f"wire {wire / 1e6:.2f} MB, of which {(wire - lost_bytes) / 1e6:.2f} MB not events",
        f"= {wire / baseline:.2f}× id list + events")


def many_peers(work, n, peers=int(os.environ.get("BENCH_PEERS", 20)), seconds=int(os.environ.get("BENCH_SECONDS", 30))):
    """A hub and `peers` hosts holding the same n events, syncing at the
    3000 ms interval: the hub's share of one core in steady state."""
    hub = Host(work, "hub")
    hub.start(NO_JOBS)
    hub.cli("network", "create")
    network = json.loads(hub.cli("network", "list", "--json"))[0]["network_id"]
    send_messages(hub, network, n)
    wait_messages(hub, n)
    hub.stop()
    hub_id = hub.state("peer_id")
    spokes = []
    for i in range(peers):
        h = Host(work, f"peer{i:02}")
        # The same store under a new identity: cheaper than 20 catch-ups.
        shutil.copytree(hub.data, h.data,
                        ignore=shutil.ignore_patterns("identity.key", "host.lock", "plugin-cache"))
        conn = sqlite3.connect(f"{h.data}/quiet.db")
        conn.execute("INSERT INTO addresses (peer_id, network_id, ip, port, is_active) "
                     "VALUES (?, ?, '127.0.0.1', ?, 1)", (hub_id, network, hub.port))
        conn.commit()
        conn.close()
        spokes.append(h)
    hub.start()
    for h in spokes:
        h.start()
    try:
        # Let every pair meet (and the hub learn every address).
        time.sleep(10)
        cpu0, equal0, differ0 = hub.cpu(), hub.counter("sync_sets_equal"), hub.counter("sync_sets_differ")
        frames0 = hub.counter("net_frames_received")
        t0 = time.time()
        time.sleep(seconds)
        took = time.time() - t0
        share = (hub.cpu() - cpu0) / took
        asked = hub.counter("sync_sets_equal") - equal0
        frames = hub.counter("net_frames_received") - frames0
        differ = hub.counter("sync_sets_differ") - differ0
        if differ or not asked:
            sys.exit(f"bench: {peers} peers: {asked} equal, {differ} differing sessions")
        for h in spokes[:3]:
            same_events(hub, h)
        row(f"{peers} peers, all hold {n:,}, 3000 ms interval", f"{took:.0f} s steady state",
            f"**hub at {100 * share:.1f} % of one core**",
            f"the hub asked {asked} sessions and took in {frames} frames "
            "(peers learn each other from the hub: a full mesh)",
            f"hub peak RSS {hub.peak_rss_mib():.0f} MiB", "")
    finally:
        for h in [hub, *spokes]:
            h.stop()


def bidirectional(work, n):
    a, b = Host(work, "bidi-a"), Host(work, "bidi-b")
    a.start(NO_JOBS)
    invite = a.cli("network", "create")
    network = json.loads(a.cli("network", "list", "--json"))[0]["network_id"]
    b.cli("network", "join", invite)
    b.start(NO_JOBS)
    send_messages(a, network, n // 2)
    send_messages(b, network, n - n // 2)
    wait_messages(a, n // 2)
    wait_messages(b, n - n // 2)
    b.stop()
    a.stop()
    a.start()
    t0 = time.time()
    b.start()
    wait(lambda: a.messages() >= n and b.messages() >= n, int(os.environ.get("BIDI_TIMEOUT", 600)), "both to converge")
    took = time.time() - t0
    wait_messages(a, n)
    wait_messages(b, n)
    same_events(a, b)
    row(f"bidirectional {n:,} ({n // 2:,} made on each side)", f"{took:.2f} s",
        f"**{n / took:,.0f} events/s**", f"CPU A {a.cpu():.2f} s, B {b.cpu():.2f} s", "", "")
    a.stop()
    b.stop()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=100_000, help="N, the events A holds (default 100000)")
    p.add_argument("--only", default="catchup,idle,scattered,tenth,bidi,peers",
                   help="comma-separated scenarios to run")
    p.add_argument("--keep", action="store_true", help="keep the hosts' folders")
    args = p.parse_args()
    only = set(args.only.split(","))
    subprocess.run(["cargo", "build", "--quiet", "--release", "-p", "quiet-host",
                    "-p", "quiet-sync-plugin", "-p", "quiet-messages-plugin"], cwd=ROOT, check=True)
    work = tempfile.mkdtemp(prefix="quiet-bench-")
    hosts = []
    speed = "machine speed: Python loop {:.0f} ms, BLAKE2b of 64 MiB {:.0f} ms (lower is faster)"
    try:
        print(speed.format(*machine_speed()), flush=True)
        row("scenario", "time", "rate / cost", "CPU", "memory / rounds", "wire")
        row(*["---"] * 6)
        n = args.events
        if only & {"catchup", "idle", "scattered", "tenth"}:
            a, b = catchup(work, n)
            hosts += [a, b]
            if "idle" in only:
                idle(work, a, b, n)
            if "scattered" in only:
                repair(a, b, n, "scattered", "ORDER BY random() LIMIT 1000")
            if "tenth" in only:
                repair(a, b, n, "10 % different", f"ORDER BY random() LIMIT {n // 10}")
        if "peers" in only:
            many_peers(work, n)
        if "bidi" in only:
            bidirectional(work, 10_000)
    finally:
        for h in hosts:
            h.stop()
        print(speed.format(*machine_speed()), flush=True)
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    random.seed(0)
    main()
