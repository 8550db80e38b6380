#!/usr/bin/env bash
# straycat against the official Cheshire Cat clients: the Python one (PyPI cheshire-cat-api,
# tests/clients/python, pytest) and the TypeScript one (npm ccat-api under Node.js,
# tests/clients/node, node --test), each starting straycat on 127.0.0.1 ports of its own.
#
#   bash tests/clients/run.sh                 both
#   bash tests/clients/run.sh python [ARGS]   only the Python tests (ARGS go to pytest)
#   bash tests/clients/run.sh node            only the Node tests
#
# Installs what is missing: Node.js and npm with apt if there is no `node` (as root, or
# through sudo), the pinned packages of requirements.txt into a venv under
# ~/.cache/straycat-clients (rebuilt when the file changes), node/package-lock.json with
# `npm ci` (again when the lock changes). What the installers say goes to a log file; a
# failure is one line naming it. Then `cargo build --release` (into CARGO_TARGET_DIR when
# set) and the tests, each run under a time limit. Needs no network but the registries.
set -euo pipefail
cd "$(dirname "$0")/../.."
started=$SECONDS
which=${1:-all}
[ $# -gt 0 ] && shift
case $which in all | python | node) ;; *) echo "usage: $0 [all|python [PYTEST ARGS]|node]" >&2; exit 2 ;; esac

CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/straycat-clients
VENV=$CACHE/venv
REQ=tests/clients/requirements.txt
NODE_DIR=tests/clients/node
mkdir -p "$CACHE"
LOG=$CACHE/setup.log
: >"$LOG"
# Time limits: the Python tests take 6-10 s, the Node ones about 6 s.
PY_LIMIT=${STRAYCAT_CLIENTS_PY_LIMIT:-300}
NODE_LIMIT=${STRAYCAT_CLIENTS_NODE_LIMIT:-300}

fail() {
    echo "tests/clients: $1 (log: $LOG)" >&2
    exit 1
}
as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}
apt_install() {
    echo "== apt-get install $*"
    { as_root apt-get update -q -o DPkg::Lock::Timeout=300 && as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q -o DPkg::Lock::Timeout=300 "$@"; } >>"$LOG" 2>&1 ||
        fail "apt-get install $* failed: $(grep -m1 -E '^(E:|Err:)' "$LOG" || tail -n1 "$LOG")"
}

# Everything the tests reach is on 127.0.0.1: no proxy may be asked for it (axios and
# websocket-client both read the proxy variables).
export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost

if [ "$which" != python ]; then
    if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
        apt_install nodejs npm
    fi
    major=$(node -p 'process.versions.node.split(".")[0]')
    [ "$major" -ge 18 ] || fail "Node.js $(node --version) is too old for node --test (18 or later; tested with 20)"
    # npm ci again whenever the lock changes (a copy in node_modules says what it has).
    if ! cmp -s "$NODE_DIR/package-lock.json" "$NODE_DIR/node_modules/.straycat-package-lock.json" 2>/dev/null; then
        echo "== npm ci in $NODE_DIR (ccat-api, ws: package-lock.json)"
        (cd "$NODE_DIR" && npm ci --no-audit --no-fund --loglevel=error) >>"$LOG" 2>&1 ||
            fail "npm ci in $NODE_DIR failed: $(grep -m1 -E 'npm (ERR|error)' "$LOG" || tail -n1 "$LOG")"
        cp "$NODE_DIR/package-lock.json" "$NODE_DIR/node_modules/.straycat-package-lock.json"
    fi
fi

if [ "$which" != node ]; then
    if ! cmp -s "$REQ" "$VENV/requirements.txt" 2>/dev/null; then
        echo "== Python venv $VENV (cheshire-cat-api, pytest: $REQ)"
        rm -rf "$VENV"
        if ! python3 -m venv "$VENV" >>"$LOG" 2>&1; then
            apt_install python3-venv
            python3 -m venv "$VENV" >>"$LOG" 2>&1 || fail "python3 -m venv failed"
        fi
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$REQ" >>"$LOG" 2>&1 ||
            fail "pip install -r $REQ failed: $(grep -m1 -E '^ERROR' "$LOG" || tail -n1 "$LOG")"
        cp "$REQ" "$VENV/requirements.txt"
    fi
fi

echo "== cargo build --release"
cargo build --release --quiet >>"$LOG" 2>&1 ||
    fail "cargo build --release failed: $(grep -m1 -E '^error' "$LOG" || tail -n1 "$LOG")"

status=0
if [ "$which" != node ]; then
    echo "== Python client: cheshire-cat-api $(sed -n 's/^cheshire-cat-api==//p' "$REQ") (pytest tests/clients/python)"
    timeout -k 10 "$PY_LIMIT" "$VENV/bin/python" -m pytest -q -rsxf tests/clients/python "$@" || {
        code=$?
        [ $code = 124 ] && echo "tests/clients: the Python tests ran past ${PY_LIMIT} s" >&2
        status=1
    }
fi
if [ "$which" != python ]; then
    NODE_LOG=$CACHE/node-tests.log
    echo "== TypeScript client: ccat-api $(node -p "require('./$NODE_DIR/node_modules/ccat-api/package.json').version") under Node.js $(node --version) (node --test tests/clients/node)"
    code=0
    (cd "$NODE_DIR" && timeout -k 10 "$NODE_LIMIT" node --test --test-reporter=tap ccat_api.test.js) >"$NODE_LOG" 2>&1 || code=$?
    # The TAP stream goes to its log; here: what failed, what is TODO or skipped, the counts.
    awk '/^ *(not )?ok [0-9]+ - .*# TODO/ { sub(/^ *(not )?ok [0-9]+ - /, "  todo: "); print; next }
         /^ *ok [0-9]+ - .*# SKIP/ { sub(/^ *ok [0-9]+ - /, "  skipped: "); print; next }
         /^ *not ok [0-9]+ - / { sub(/^ *not ok [0-9]+ - /, "  FAILED: "); print }
         /^# (tests|pass|fail|skipped|todo|cancelled) / { sub(/^# /, ""); counts = counts sep $0; sep = ", " }
         END { if (counts != "") print counts }' "$NODE_LOG"
    if [ $code != 0 ]; then
        [ $code = 124 ] && echo "tests/clients: the Node tests ran past ${NODE_LIMIT} s" >&2
        echo "tests/clients: Node tests failed (whole TAP output: $NODE_LOG)" >&2
        status=1
    fi
fi
echo "== tests/clients: $([ $status = 0 ] && echo passed || echo FAILED) in $((SECONDS - started)) s"
exit $status
