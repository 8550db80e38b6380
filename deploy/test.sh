#!/usr/bin/env bash
# Several straycat instances behind HAProxy, as deploy/README.md sets them up, on 127.0.0.1:
# three instances (echo agent, a state dir each in a temp dir, --log-level info) on free
# loopback ports, HAProxy with deploy/haproxy.cfg (its global section, addresses and check
# interval swapped for the test's), 100 users chatting through it. Checks that each user's
# sockets always reach the same instance (the instances' `user=… connected` log lines),
# drains one instance with SIGTERM mid-conversation (its users must reconnect through HAProxy
# to the others and chat on), brings it back and sends its users home (they must find their
# old session: history, held replies, seq continuing). Prints what was lost and got back.
#
#   bash deploy/test.sh        about 10 s once built; exits non-zero on a failed check
#
# Installs Debian's haproxy with apt if it is missing (as root, or through sudo; what apt
# says goes to a log file, a failure is one line). The client is Python's standard library
# (deploy/failover.py): no venv, nothing from PyPI. Builds straycat with
# `cargo build --release` (into CARGO_TARGET_DIR when set). Every wait has a deadline and the
# whole run is under a time limit (STRAYCAT_DEPLOY_LIMIT, 240 s).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS

CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/straycat-deploy
mkdir -p "$CACHE"
LOG=$CACHE/setup.log
: >"$LOG"
LIMIT=${STRAYCAT_DEPLOY_LIMIT:-240}

fail() {
    echo "deploy/test.sh: $1 (log: $LOG)" >&2
    exit 1
}
as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

HAPROXY=$(command -v haproxy || true)
[ -n "$HAPROXY" ] || { [ -x /usr/sbin/haproxy ] && HAPROXY=/usr/sbin/haproxy; } || true
if [ -z "$HAPROXY" ]; then
    echo "== apt-get install haproxy"
    # Lock timeout: another apt run (unattended upgrades, a parallel build) is waited for.
    # (Where systemd runs, the package starts haproxy.service on its default config, which
    # listens nowhere; the test runs its own HAProxy on a port of its own.)
    { as_root apt-get update -q -o DPkg::Lock::Timeout=300 &&
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=300 haproxy; } >>"$LOG" 2>&1 ||
        fail "apt-get install haproxy failed: $(grep -m1 -E '^(E:|Err:)' "$LOG" || tail -n1 "$LOG")"
    HAPROXY=/usr/sbin/haproxy
    [ -x "$HAPROXY" ] || fail "apt-get installed haproxy but there is no $HAPROXY"
fi
command -v python3 >/dev/null || fail "python3 is missing"

echo "== cargo build --release"
cargo build --release --quiet >>"$LOG" 2>&1 || fail "cargo build --release failed: $(grep -m1 '^error' "$LOG" || tail -n1 "$LOG")"
BIN=${CARGO_TARGET_DIR:-target}/release/straycat

# The shipped file must be valid as it stands (Debian's layout: chroot, admin socket).
"$HAPROXY" -c -q -f deploy/haproxy.cfg >>"$LOG" 2>&1 || fail "haproxy -c rejects deploy/haproxy.cfg: $(tail -n2 "$LOG")"

WORK=$(mktemp -d /tmp/straycat-deploy.XXXXXX)
status=0
echo "== $("$HAPROXY" -v | head -n1 | cut -d' ' -f1-3), 3 straycat instances, 100 users (work dir $WORK)"
timeout -k 5 "$LIMIT" python3 deploy/failover.py --straycat "$BIN" --haproxy "$HAPROXY" \
    --cfg deploy/haproxy.cfg --work "$WORK" || status=$?
[ $status = 124 ] && echo "deploy/test.sh: over the ${LIMIT} s limit: stopped"
# STRAYCAT_DEPLOY_KEEP=1 keeps the logs of a passing run too.
if [ $status = 0 ] && [ "${STRAYCAT_DEPLOY_KEEP:-0}" = 0 ]; then rm -rf "$WORK"; else echo "deploy/test.sh: logs kept in $WORK"; fi
echo "== deploy/test.sh: $([ $status = 0 ] && echo passed || echo FAILED) in $((SECONDS - started)) s"
exit $status
