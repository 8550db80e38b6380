#!/usr/bin/env bash
# The short fuzz run of the test suite (tests/all.sh): every target of fuzz/ for a bounded
# number of inputs, starting from its seeds (fuzz/seeds/<target>/); fails on any crash,
# panic, timeout or allocation past the limits. Works with the stable toolchain alone:
# cargo-fuzz builds with `-s none` (no sanitizer, the one thing that needs nightly; the code
# is `#![forbid(unsafe_code)]`), with coverage instrumentation, debug assertions and
# overflow checks. Installs cargo-fuzz from crates.io if it is not there.
#
#   bash fuzz/run.sh                      # every target, 20,000 inputs each
#   STRAYCAT_FUZZ_RUNS=10000000 STRAYCAT_FUZZ_SECS=900 bash fuzz/run.sh ws   # a long run
#
# New inputs go to a temporary corpus, deleted afterwards; a crashing input is kept in
# fuzz/artifacts/<target>/ (reproduce: fuzz/target/x86_64-unknown-linux-gnu/release/<target>
# <file>).
set -euo pipefail
cd "$(dirname "$0")"

CARGO_FUZZ_VERSION=0.13.2
RUNS=${STRAYCAT_FUZZ_RUNS:-20000}
# A cap per target, so that a slow machine still ends: the suite's run takes seconds each.
SECS=${STRAYCAT_FUZZ_SECS:-60}
TARGET_DIR=${CARGO_TARGET_DIR:+$CARGO_TARGET_DIR/fuzz}
TARGET_DIR=${TARGET_DIR:-$PWD/target}
ALL=(http_head handshake ws client_message sse http1 record journal cat_frame process_output jwt)
if [ $# -gt 0 ]; then TARGETS=("$@"); else TARGETS=("${ALL[@]}"); fi

if ! cargo fuzz --version 2>/dev/null | grep -q " $CARGO_FUZZ_VERSION\$"; then
    echo "== installing cargo-fuzz $CARGO_FUZZ_VERSION from crates.io"
    cargo install --locked --quiet cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi

echo "== cargo fuzz build -s none (stable toolchain; into $TARGET_DIR)"
cargo fuzz build -s none --target-dir "$TARGET_DIR"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
failed=0
for t in "${TARGETS[@]}"; do
    # The request heads reach the 8 KiB head bound; elsewhere 4 KiB is past every bound.
    case $t in http_head | handshake) len=9000 ;; *) len=4096 ;; esac
    mkdir -p "$scratch/$t" "artifacts/$t"
    # -rss_limit_mb / -malloc_limit_mb: a run over 512 MiB, or one allocation of 64 MiB or
    # more, is a failure (no input here may cost more than a few KiB).
    if cargo fuzz run -s none --target-dir "$TARGET_DIR" "$t" "$scratch/$t" "seeds/$t" -- \
        -runs="$RUNS" -max_total_time="$SECS" -max_len="$len" -timeout=10 \
        -rss_limit_mb=512 -malloc_limit_mb=64 -artifact_prefix="artifacts/$t/" \
        >"$scratch/$t.log" 2>&1; then
        echo "fuzz $t: ok, $(grep -E '^#[0-9]+' "$scratch/$t.log" | tail -n 1 | awk '{print $1, $3, $4, $5, $6}')"
    else
        echo "fuzz $t: FAILED"
        grep -v -E '^#[0-9]+' "$scratch/$t.log" | tail -n 40
        failed=$((failed + 1))
    fi
done
echo "fuzz: $((${#TARGETS[@]} - failed)) of ${#TARGETS[@]} targets ran clean"
[ "$failed" = 0 ]
