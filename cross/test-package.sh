#!/usr/bin/env bash
# cross/test-package.sh: builds the amd64 .deb, installs it on this (Debian, amd64) machine,
# runs the installed binary on 127.0.0.1, then removes and purges the package.
#
#   sudo bash cross/test-package.sh
#
# Checks: the package holds the binary, both units and the /etc/default/straycat conffile;
# the units pass `systemd-analyze verify`; /usr/bin/straycat starts with every option of the
# example file set, answers GET /health and stops cleanly on SIGTERM; removal keeps the
# conffile, purge removes it. It refuses to run if straycat is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=cross/lib.sh
. cross/lib.sh

[ "$(id -u)" = 0 ] || die "run as root (it installs and removes a package)"
[ "$(dpkg --print-architecture)" = amd64 ] || die "tests the amd64 package on an amd64 machine"
# The unit's state dir; this test makes it and removes it.
state=/var/lib/straycat
[ ! -e "$state" ] || die "$state exists here; not touching it"
if dpkg-query -W straycat >/dev/null 2>&1 &&
    [ "$(dpkg-query -W -f='${db:Status-Abbrev}' straycat)" != "un " ]; then
    die "straycat is already installed here; not touching it"
fi

bash cross/package.sh amd64
# The chat client of examples/chat.rs talks to the installed server.
cargo build --release --quiet --example chat
chat=${CARGO_TARGET_DIR:-target}/release/examples/chat
version=$(awk -F'"' '/^version *=/ { print $2; exit }' Cargo.toml)
deb=target/debian/straycat_${version}-1_amd64.deb
[ -f "$deb" ] || die "no $deb"

pid=""
cleanup() {
    [ -z "$pid" ] || kill "$pid" 2>/dev/null || true
    dpkg -P straycat >/dev/null 2>&1 || true
    rm -rf "$state"
}
trap cleanup EXIT

log "dpkg -i $deb"
dpkg -i "$deb"
for f in /usr/bin/straycat /lib/systemd/system/straycat.service \
    /lib/systemd/system/straycat.socket /etc/default/straycat; do
    dpkg -S "$f" >/dev/null || die "$f is not in the package"
    [ -e "$f" ] || die "$f was not installed"
done
dpkg-query -W -f='${Conffiles}\n' straycat | grep -q '/etc/default/straycat' ||
    die "/etc/default/straycat is not a conffile"

if command -v systemd-analyze >/dev/null; then
    log "systemd-analyze verify"
    systemd-analyze verify /lib/systemd/system/straycat.service /lib/systemd/system/straycat.socket
else
    echo "systemd-analyze not found: units not verified" >&2
fi

log "/usr/bin/straycat --version"
out=$(/usr/bin/straycat --version)
echo "$out"
[ "$out" = "straycat $version" ] || die "unexpected --version output"

# Every option of the example file, uncommented: the names and example values must all be
# accepted. Listen on 127.0.0.1 only, on a free port.
mapfile -t opts < <(sed -n 's/^#\(STRAYCAT_[A-Z_]*=.*\)$/\1/p' /etc/default/straycat |
    grep -v '^STRAYCAT_LISTEN=')
[ ${#opts[@]} -ge 17 ] || die "expected every option in /etc/default/straycat, found ${#opts[@]}"
# As systemd would start it: the unit's Environment= lines, then the environment file.
mapfile -t unit_env < <(sed -n 's/^Environment=//p' /lib/systemd/system/straycat.service)
run_installed() {
    start_healthy target/debian/test-package.log \
        env "${unit_env[@]}" "${opts[@]}" STRAYCAT_LISTEN="127.0.0.1:{port}" /usr/bin/straycat ||
        die "the installed straycat never answered /health"
}
stop_installed() {
    kill -TERM "$pid"
    status=0
    wait "$pid" || status=$?
    pid=""
}
run_installed
log "GET http://127.0.0.1:$port/health"
http_get "$port" /health | tail -n 1
echo
log "chat, restart the binary, and the conversation is still there ($state)"
# Every line of the file is in force, the example API key too.
key=$(sed -n 's/^#STRAYCAT_API_KEY=//p' /etc/default/straycat)
out=$(echo "remember me" | timeout 20 "$chat" "ws://127.0.0.1:$port/ws/pkg?token=$key" 2>&1) ||
    die "chat failed: $out"
grep -q "AI: remember me" <<<"$out" || die "unexpected reply: $out"
stop_installed
[ "$status" = 0 ] || die "straycat exited with $status on SIGTERM"
ls "$state"/*.log >/dev/null 2>&1 || die "nothing was written to $state"
run_installed
# With since=0 the held frames come first: the reply from before the restart.
out=$(echo "again" | timeout 20 "$chat" "ws://127.0.0.1:$port/ws/pkg?token=$key&since=0" 2>&1) ||
    die "chat failed after the restart: $out"
grep -q "AI: remember me" <<<"$out" || die "the conversation did not survive the restart: $out"
stop_installed
[ "$status" = 0 ] || die "straycat exited with $status on SIGTERM"

log "dpkg -r straycat"
dpkg -r straycat
[ ! -e /usr/bin/straycat ] || die "/usr/bin/straycat left after removal"
[ -e /etc/default/straycat ] || die "removal deleted the conffile (only purge should)"
log "dpkg -P straycat"
dpkg -P straycat
[ ! -e /etc/default/straycat ] || die "/etc/default/straycat left after purge"
trap - EXIT
echo "package test passed: $deb"
