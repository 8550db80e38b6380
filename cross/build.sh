#!/usr/bin/env bash
# cross/build.sh: release builds of straycat for the Raspberry Pi on Debian 12, no Docker.
#
#   bash cross/build.sh
#
# Builds target/aarch64-unknown-linux-gnu/release/straycat (Pi 3/4/5, 64-bit OS) and
# target/armv7-unknown-linux-gnueabihf/release/straycat (32-bit Raspberry Pi OS) with Debian's
# rustc-web and its ARM standard libraries (unpacked into a private sysroot), installing the
# native toolchain first (as root, or through sudo) along with the cross linkers and
# qemu-user. Host builds are not affected: RUSTC, the sysroot and the linkers are set for
# these cargo commands only.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=cross/lib.sh
. cross/lib.sh

install_toolchain
cross_env
log "rustc for the ARM targets: $($RUSTC -V)"
# The armv7 boards are the small ones: there the binary is built for size (opt-level "z",
# about 8% smaller than "s"), and must stay within its budget.
ARMV7_BUDGET=$((1536 * 1024))
for t in "${CROSS_TARGETS[@]}"; do
    opt=s
    [ "$t" != armv7-unknown-linux-gnueabihf ] || opt=z
    log "cargo build --release --target $t (opt-level $opt)"
    CARGO_PROFILE_RELEASE_OPT_LEVEL=$opt cargo build --release --locked --target "$t"
done
for t in "${CROSS_TARGETS[@]}"; do
    bin=target/$t/release/straycat
    [ -x "$bin" ] || die "no $bin"
    echo "$bin: $(stat -c %s "$bin") bytes ($(deb_arch "$t"))"
done
armv7=target/armv7-unknown-linux-gnueabihf/release/straycat
[ "$(stat -c %s "$armv7")" -le "$ARMV7_BUDGET" ] ||
    die "$armv7 is $(stat -c %s "$armv7") bytes, over its budget of $ARMV7_BUDGET (1.5 MiB)"
