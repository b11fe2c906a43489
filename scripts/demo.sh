#!/usr/bin/env bash
# The main demo, from a fresh clone: builds quiet-host and the shipped
# plugins (release), then runs three hosts on loopback that sync, hot-reload
# a plugin and pick up a jobs.yaml edit, prints a summary and stops them.
#
#   scripts/demo.sh [--keep]      (--keep leaves the data folders for a look)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p quiet-host -p quiet-sync-plugin -p quiet-messages-plugin -p quiet-retention-plugin
bin=${CARGO_TARGET_DIR:-target}/release
exec "$bin/quiet-host" demo --plugins-from "$bin" "$@"
