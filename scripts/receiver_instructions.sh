#!/usr/bin/env bash
# Instructions the receiver spends per event in a one-way catch-up: runs
# `scripts/catchup.sh N` with host B under callgrind, then again with one
# event for the fixed cost (start-up, plugin loading), and prints the
# difference per event. Instruction counts do not depend on what else the
# machine is doing, so two builds compare exactly where timings are noise.
#
#   scripts/receiver_instructions.sh [N]      (default 10000)
#
# QUIET_HOST names the quiet-host binary (default: the release build).
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-10000}
command -v valgrind >/dev/null || { echo "needs valgrind (apt install valgrind)" >&2; exit 1; }
cargo build --quiet --release -p quiet-host -p quiet-sync-plugin -p quiet-messages-plugin
host=$(realpath "${QUIET_HOST:-${CARGO_TARGET_DIR:-target}/release/quiet-host}")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# catchup.sh starts both hosts through QUIET_HOST; this wrapper puts only
# the one whose data folder is .../b/data under callgrind.
cat >"$tmp/wrap.sh" <<EOF
#!/usr/bin/env bash
for a in "\$@"; do
    case "\$a" in */b/data)
        exec valgrind --tool=callgrind --callgrind-out-file="$tmp/\$RUN.out" "$host" "\$@" 2>"$tmp/\$RUN.log";;
    esac
done
exec "$host" "\$@"
EOF
chmod +x "$tmp/wrap.sh"

total() {
    RUN=$1 QUIET_HOST="$tmp/wrap.sh" scripts/catchup.sh "$2" >/dev/null
    awk '/^totals:/ {print $2}' "$tmp/$1.out"
}
full=$(total full "$n")
base=$(total base 1)
python3 -c "
n, full, base = $n, $full, $base
print(f'receiver: {full:,} instructions for {n:,} events, {base:,} for 1: {(full - base) / (n - 1):,.0f} per event')"
