#!/usr/bin/env bash
# What the state dir costs (README, State dir): bytes written per turn against the frames'
# bytes, syncs per second under load, writes while idle, the dir's size and the start-up
# time with 4,096 sessions of 20 turns. 127.0.0.1 only; bounded; stops by itself.
# Usage: bash bench/state.sh [DIR]   (DIR: where the state goes; default under /tmp)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-/tmp/straycat-state-bench}
cargo build --release --quiet --bin straycat --example state_bench
target=${CARGO_TARGET_DIR:-target}
timeout 1200 "$target/release/examples/state_bench" --bin "$target/release/straycat" \
    --dir "$dir" --users 4096 --turns 20
