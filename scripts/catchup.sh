#!/usr/bin/env bash
# One-way catch-up, end to end, in release mode: host A holds N messages of
# ~1 KiB; a fresh host B joins A's network; the clock stops when B has
# stored and projected all N. Both hosts are real processes on loopback,
# each with its own SQLite file.
#
#   scripts/catchup.sh [N]        (default 20000)
#
# B joins before it starts, so its first sync runs at once: the clock runs
# from B's start to its last event.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-20000}
cargo build --quiet --release -p quiet-host -p quiet-sync-plugin -p quiet-messages-plugin
bin=${CARGO_TARGET_DIR:-target}/release
q=$bin/quiet-host
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

printf 'jobs:\n  - name: sync_with_peers\n    handler: sync\n    frequency_ms: 3000\n    params: {max_events_per_response: 1000}\n' >"$work/jobs.yaml"
start() {
    mkdir -p "$work/$1/plugins"
    cp $bin/libsync.so $bin/libmessages.so "$work/$1/plugins/"
    $q run --data "$work/$1/data" --plugins "$work/$1/plugins" --jobs "$work/jobs.yaml" \
        --listen 127.0.0.1:0 2>"$work/$1.log" &
    pids+=($!)
}
start a
sleep 1
count() { python3 -c "import sqlite3,sys; print(sqlite3.connect('file:$1?mode=ro', uri=True).execute('SELECT COUNT(*) FROM messages').fetchone()[0])" 2>/dev/null || echo 0; }
now() { date +%s.%N; }

invite=$($q network create --data "$work/a/data")
net=$($q network list --data "$work/a/data" --json | python3 -c "import json,sys; print(json.load(sys.stdin)[0]['network_id'])")
text=$(printf 'x%.0s' $(seq 900))
t0=$(now)
$q message send --data "$work/a/data" "$net" "$text" --count "$n" >/dev/null
until [ "$(count "$work/a/data/quiet.db")" = "$n" ]; do sleep 0.05; done
$q network join --data "$work/b/data" "$invite" >/dev/null
t1=$(now)
start b
until [ "$(count "$work/b/data/quiet.db")" = "$n" ]; do sleep 0.05; done
t2=$(now)
python3 -c "
n=$n; a=$t1-$t0; b=$t2-$t1
print(f'| {n} | A stores and projects its own: {a:.2f} s ({n/a:,.0f}/s) | A to a fresh B: {b:.2f} s ({n/b:,.0f} events/s) |')"
