#!/usr/bin/env bash
# One-way catch-up, end to end, in release mode: host A holds N messages of
# ~1 KiB; a fresh host B joins A's network; the clock stops when B has
# stored and projected all N. Both hosts are real processes on loopback,
# each with its own SQLite file.
#
#   scripts/catchup.sh [N]        (default 20000)
#
# A first writes back what it stored (see `settle`); B joins before it
# starts, so its first sync runs at once: the clock runs from B's start to
# its last event.
#
# Prints one table row, and on stderr the page faults and CPU of A while it
# served and those of B, by thread: where a change's effect hides in noise,
# these counts still show it.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-20000}
cargo build --quiet --release -p quiet-host -p quiet-sync-plugin -p quiet-messages-plugin
bin=${CARGO_TARGET_DIR:-target}/release
q=${QUIET_HOST:-$bin/quiet-host}
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

printf 'jobs:\n  - name: sync_with_peers\n    handler: sync\n    frequency_ms: 3000\n    params: {max_events_per_response: 1000}\n' >"$work/jobs.yaml"
# Both hosts' plugins are in place before either starts, so B's clock
# counts its start-up but not copying its plugins.
for h in a b; do
    mkdir -p "$work/$h/plugins"
    cp $bin/libsync.so $bin/libmessages.so "$work/$h/plugins/"
done
start() {
    $q run --data "$work/$1/data" --plugins "$work/$1/plugins" --jobs "$work/jobs.yaml" \
        --listen 127.0.0.1:0 2>"$work/$1.log" &
    pids+=($!)
}
start a
sleep 1
# Waits until the messages table of database $1 holds $2 rows. One poller
# process, and MAX(rowid) (one index step) rather than COUNT(*), so that
# watching costs the hosts next to nothing; COUNT(*) confirms at the end.
# TRACE=1 prints the progress on stderr.
wait_for() {
    python3 - "$1" "$2" <<'PY'
import os, sqlite3, sys, time
path, n = sys.argv[1], int(sys.argv[2])
t0 = time.time()
while True:
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        top = db.execute("SELECT MAX(rowid) FROM messages").fetchone()[0] or 0
        if top >= n and db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == n:
            break
        db.close()
    except sqlite3.Error:
        top = 0
    if os.environ.get("TRACE"):
        print(f"{time.time() - t0:.2f} {top}", file=sys.stderr)
    time.sleep(0.01)
PY
}
now() { date +%s.%N; }
# Runs the Python statements $1 with bench.py imported and the rest of the
# arguments in sys.argv[1:]: bench.py waits for a host and reads /proc for
# both scripts.
with_bench() {
    local code=$1
    shift
    python3 -c "import sys; sys.path.insert(0, 'scripts'); import bench; $code" "$@"
}
# Waits until host $1 (a pid) with data folder $2 has written back what it
# stored, as bench.py's `settle_pid` says.
settle() { with_bench "bench.settle_pid(int(sys.argv[1]), sys.argv[2], 'A')" "$1" "$2"; }
# Page faults and CPU seconds of process $1 so far.
faults_cpu() { with_bench "p = int(sys.argv[1]); print(bench.page_faults(p), bench.cpu_seconds(p))" "$1"; }

invite=$($q network create --data "$work/a/data")
net=$($q network list --data "$work/a/data" --json | python3 -c "import json,sys; print(json.load(sys.stdin)[0]['network_id'])")
text=$(printf 'x%.0s' $(seq 900))
t0=$(now)
$q message send --data "$work/a/data" "$net" "$text" --count "$n" >/dev/null
wait_for "$work/a/data/quiet.db" "$n"
t1=$(now)
settle "${pids[0]}" "$work/a/data"
$q network join --data "$work/b/data" "$invite" >/dev/null
read -r faults_a0 cpu_a0 < <(faults_cpu "${pids[0]}")
t2=$(now)
start b
wait_for "$work/b/data/quiet.db" "$n"
t3=$(now)
read -r faults_a cpu_a < <(faults_cpu "${pids[0]}")
read -r faults_b cpu_b < <(faults_cpu "${pids[1]}")
# What A used while serving, and B by thread, on stderr so that stdout stays
# one table row. Threads that have exited (the engine's short-lived helpers,
# a closed connection's reader) are missing, so B's add up to less than its
# CPU.
with_bench "
f0, c0, f1, c1, b_faults, b = sys.argv[1:]
threads = ', '.join(f'{k} {v:.2f} s' for k, v in bench.cpu_by_thread(int(b)) if v)
print(f\"A while serving: {int(f1) - int(f0)} page faults, {float(c1) - float(c0):.2f} s CPU; \"
      f\"B: {b_faults} page faults; B's threads: {threads}\")" \
    "$faults_a0" "$cpu_a0" "$faults_a" "$cpu_a" "$faults_b" "${pids[1]}" >&2
python3 -c "
n=$n; a=$t1-$t0; b=$t3-$t2
print(f'| {n} | A stores and projects its own: {a:.2f} s ({n/a:,.0f}/s) | A to a fresh B: {b:.2f} s ({n/b:,.0f} events/s) | CPU s: A {$cpu_a:.2f}, B {$cpu_b:.2f} |')"
