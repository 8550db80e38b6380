#!/usr/bin/env bash
# cross/test-arm.sh: the ARM builds, tested under qemu-user on an x86_64 Debian 12 machine.
#
#   bash cross/test-arm.sh
#
# 1. The whole test suite for aarch64: `cargo test --target aarch64-unknown-linux-gnu`, each
#    test binary run by `qemu-aarch64` (cargo's target runner, set in cross/lib.sh). The
#    integration tests spawn target/aarch64-…/debug/straycat themselves, an aarch64 ELF:
#    the kernel runs it through qemu thanks to a binfmt_misc registration, made here if
#    missing (qemu-user-binfmt's files; systemd-binfmt would load them at boot).
# 2. A smoke test of the armv7 release binary (cross/build.sh's) under qemu-arm: it starts on
#    127.0.0.1, answers GET /health, and answers one chat message over WebSocket (the
#    host-built examples/chat.rs is the client).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=cross/lib.sh
. cross/lib.sh

# Whether binfmt_misc's entry for qemu-$1 is enabled and its interpreter is there (or was
# opened when it was registered: the F flag, as container set-ups register it).
binfmt_ok() {
    local entry=/proc/sys/fs/binfmt_misc/qemu-$1 interp
    [ -e "$entry" ] || return 1
    grep -qx enabled "$entry" || return 1
    grep -qE '^flags: .*F' "$entry" && return 0
    interp=$(awk '$1 == "interpreter" { print $2 }' "$entry")
    [ -x "$interp" ]
}

# Registers qemu-$1 (aarch64, arm) with binfmt_misc unless a working entry is there. An
# entry left by another qemu-user-binfmt (a removed or replaced package) names an
# interpreter that no longer exists, and every spawned ARM binary would fail with ENOENT:
# such an entry is removed and made again.
ensure_binfmt() {
    local dir=/proc/sys/fs/binfmt_misc conf=/usr/lib/binfmt.d/qemu-$1.conf
    binfmt_ok "$1" && return 0
    if [ ! -e "$dir/register" ]; then
        as_root mount -t binfmt_misc binfmt_misc "$dir" ||
            die "binfmt_misc is not available: the integration tests cannot spawn ARM binaries"
    fi
    if [ ! -f "$conf" ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            qemu-user-binfmt >&2
    fi
    binfmt_ok "$1" && return 0
    if [ -e "$dir/qemu-$1" ]; then
        log "removing a stale binfmt_misc entry for qemu-$1"
        echo -1 | as_root tee "$dir/qemu-$1" >/dev/null || die "could not remove it"
    fi
    log "registering qemu-$1 with binfmt_misc"
    grep -v '^#' "$conf" | as_root tee "$dir/register" >/dev/null ||
        die "could not register qemu-$1 with binfmt_misc"
    binfmt_ok "$1" || die "qemu-$1's binfmt_misc entry does not work after registering it"
}

install_toolchain
ensure_binfmt aarch64
ensure_binfmt arm
started=$(date +%s)
log "cargo test --target aarch64-unknown-linux-gnu --all-targets (under qemu-aarch64)"
(
    cross_env
    # The straycat the tests spawn runs through binfmt's qemu, which takes its `-L` from here
    # (the runner passes -L to the test binaries themselves).
    QEMU_LD_PREFIX=$(qemu_prefix aarch64-unknown-linux-gnu)
    export QEMU_LD_PREFIX
    # --all-targets: everything but the doctests, which need a rustdoc for the target
    # (Debian ships none with rustc-web); tests/all.sh runs them on the host.
    cargo test --locked --target aarch64-unknown-linux-gnu --all-targets
)
log "aarch64 tests took $(($(date +%s) - started)) s"

log "armv7 smoke test under qemu-arm"
bin=target/armv7-unknown-linux-gnueabihf/release/straycat
# Always: a binary left by an older commit must not be tested as this one (cargo only
# rebuilds what changed).
bash cross/build.sh
env -u RUSTC cargo build --locked --quiet --example chat
pid=""
trap '[ -z "$pid" ] || kill "$pid" 2>/dev/null || true' EXIT
start_healthy target/armv7-smoke.log \
    qemu-arm -L "$(qemu_prefix armv7-unknown-linux-gnueabihf)" "$bin" --listen "127.0.0.1:{port}" --log-level info ||
    die "the armv7 binary never answered /health"
echo "GET /health: $(http_get "$port" /health | tail -n 1)"
reply=$(echo "hello from the pi" | timeout 20 target/debug/examples/chat "ws://127.0.0.1:$port/ws/smoke")
echo "chat reply: $reply"
grep -q "AI: .*hello from the pi" <<<"$reply" || die "no echo of the chat message from the armv7 binary"
kill -TERM "$pid"
status=0
wait "$pid" || status=$?
pid=""
[ "$status" = 0 ] || { cat target/armv7-smoke.log >&2; die "armv7 straycat exited with $status on SIGTERM"; }
echo "ARM tests passed (aarch64 suite under qemu, armv7 smoke test)"
