#!/usr/bin/env bash
# Builds quiet-host and the shipped plugins (release), installs the plugins
# into the data folder's plugin folder, and runs the host on ./jobs.yaml.
#
#   scripts/run.sh [DATA_DIR] [LISTEN]   (defaults: ./data 127.0.0.1:7400)
#
# Stop it with Ctrl-C. While it runs, try `quiet-host status --data DATA_DIR`,
# edit jobs.yaml, or drop another plugin library into DATA_DIR/plugins.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-data}
listen=${2:-127.0.0.1:7400}
shipped=(retention sync messages)   # plugins/<name>, package quiet-<name>-plugin, lib<name>.so

cargo build --release -p quiet-host $(printf -- '-p quiet-%s-plugin ' "${shipped[@]}")
mkdir -p "$data/plugins"
bin=${CARGO_TARGET_DIR:-target}/release
for name in "${shipped[@]}"; do
    # Copy then rename: a running host never sees a half-written library.
    cp "$bin/lib$name.so" "$data/plugins/.lib$name.so.partial"
    mv "$data/plugins/.lib$name.so.partial" "$data/plugins/lib$name.so"
done
exec "$bin/quiet-host" run --data "$data" --plugins "$data/plugins" --jobs jobs.yaml --listen "$listen"
