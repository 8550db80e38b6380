#!/usr/bin/env bash
# The kiosk page's browser tests: headless Chromium (Debian's chromium and chromium-driver)
# driven by Selenium against the release binary.
#
#   bash tests/browser/run.sh                   every test (extra arguments go to pytest)
#   bash tests/browser/run.sh -k restart        some of them
#   bash tests/browser/run.sh --screenshots DIR the screenshots, into DIR
#
# Installs what is missing: chromium and chromium-driver with apt (as root, or through
# sudo), the pinned Python packages of requirements.txt into a venv under
# ~/.cache/straycat-browser. What the installers say goes to a log file; a failure is one
# line naming it. Then `cargo build --release` (into CARGO_TARGET_DIR when set) and pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."
started=$SECONDS

CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/straycat-browser
VENV=$CACHE/venv
REQ=tests/browser/requirements.txt
mkdir -p "$CACHE"
LOG=$CACHE/setup.log
: >"$LOG"

fail() {
    echo "tests/browser: $1 (whole log: $LOG)" >&2
    exit 1
}
as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}
apt_install() {
    echo "== apt-get install $*"
    # Lock timeout: another apt run (unattended upgrades, a parallel build) is waited for.
    { as_root apt-get update -q -o DPkg::Lock::Timeout=300 && as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q -o DPkg::Lock::Timeout=300 "$@"; } >>"$LOG" 2>&1 ||
        fail "apt-get install $* failed: $(grep -m1 -E '^(E:|Err:)' "$LOG" || tail -n1 "$LOG")"
}

if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    apt_install chromium chromium-driver
fi

# The venv is rebuilt whenever requirements.txt changes (a copy inside it says what it has).
if ! cmp -s "$REQ" "$VENV/requirements.txt" 2>/dev/null; then
    echo "== Python venv $VENV (selenium, pytest: $REQ)"
    rm -rf "$VENV"
    if ! python3 -m venv "$VENV" >>"$LOG" 2>&1; then
        apt_install python3-venv
        python3 -m venv "$VENV" >>"$LOG" 2>&1 || fail "python3 -m venv failed"
    fi
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$REQ" >>"$LOG" 2>&1 ||
        fail "pip install -r $REQ failed: $(grep -m1 -E '^ERROR' "$LOG" || tail -n1 "$LOG")"
    cp "$REQ" "$VENV/requirements.txt"
fi

echo "== cargo build --release"
cargo build --release --quiet || fail "cargo build --release failed"

if [ "${1:-}" = --screenshots ]; then
    [ -n "${2:-}" ] || fail "--screenshots needs a directory"
    "$VENV/bin/python" tests/browser/screenshots.py "$2"
    exit
fi

echo "== browser tests (pytest tests/browser)"
status=0
"$VENV/bin/python" -m pytest -p no:cacheprovider -q tests/browser "$@" || status=$?
echo "== tests/browser: $([ $status = 0 ] && echo passed || echo FAILED) in $((SECONDS - started)) s"
exit $status
