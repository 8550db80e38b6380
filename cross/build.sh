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
for t in "${CROSS_TARGETS[@]}"; do
    log "cargo build --release --target $t"
    cargo build --release --locked --target "$t"
done
for t in "${CROSS_TARGETS[@]}"; do
    bin=target/$t/release/straycat
    [ -x "$bin" ] || die "no $bin"
    echo "$bin: $(stat -c %s "$bin") bytes ($(deb_arch "$t"))"
done
