#!/usr/bin/env bash
# straycat's openai agent against a real OpenAI-compatible server that this project did not
# write: llama-cpp-python's (PyPI), serving a tiny random-weight Llama that
# tests/llm/make_model.py writes around llama.cpp's vendored Llama-2 vocabulary. Nothing is
# downloaded from a model hub; everything listens on 127.0.0.1 only.
#
#   bash tests/llm/run.sh      # first run ~10 min (setup.sh builds llama.cpp), then ~1 min
#
# What it starts, each on a free port of 127.0.0.1, and stops on exit (trap):
#   - llama-cpp-python's server with the test model (--n_ctx 2048, --seed fixed);
#   - two more with the model that never stops by itself: --n_ctx 512 (answers of ~500
#     tokens, ~2 s: two users surely overlap) and 4096 (an answer of ~30 s: the long turn,
#     and the turn past --turn-timeout-secs 2);
#   - proxy.py, a recording relay between each straycat and its server, so the checks see
#     the requests straycat made and the raw stream the server sent;
#   - straycat (release build) with --agent openai, --openai-max-concurrent 1 (and 2).
# check.py is the WebSocket client (the `websockets` package in the cache's venv).
#
# Environment: STRAYCAT_LLM_CACHE (default ~/.cache/straycat-llm), STRAYCAT_LLM_LONG=0
# skips the long turn (~30 s), STRAYCAT_LLM_KEEP=1 keeps the work folder (logs, captures)
# even when every check passed. Exit code 0 if every check passed, 1 if one failed.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
CACHE="${STRAYCAT_LLM_CACHE:-$HOME/.cache/straycat-llm}"
VPY="$CACHE/venv/bin/python"
MODEL_NAME=tiny
START=$(date +%s)

die() { echo "tests/llm/run.sh: $*" >&2; exit 1; }
say() { echo "== $*"; }

PIDS=()
WORK=""
cleanup() {
    local rc=$?
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        # Bounded: a process that ignores SIGTERM for 5 s is killed.
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    if [ -n "$WORK" ]; then
        if [ "$rc" = 0 ] && [ "${STRAYCAT_LLM_KEEP:-0}" != 1 ]; then
            rm -rf "$WORK"
        else
            echo "logs and captures kept in $WORK"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'echo "tests/llm/run.sh: line $LINENO failed: $BASH_COMMAND" >&2' ERR
trap 'exit 130' INT TERM

# 1. What it needs.
say "setup (cache: $CACHE)"
mapfile -t MODELS < <(bash "$HERE/setup.sh") || true
[ "${#MODELS[@]}" = 2 ] && [ -s "${MODELS[0]}" ] && [ -s "${MODELS[1]}" ] || die "setup.sh failed (see above)"
MODEL="${MODELS[0]}"
MODEL_NOSTOP="${MODELS[1]}"
SETUP_DONE=$(date +%s)

say "cargo build --release --bin straycat"
(cd "$ROOT" && timeout 1200 cargo build --release --quiet --bin straycat) || die "cargo build failed"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/straycat"
[ -x "$BIN" ] || die "no $BIN after the build"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/straycat-llm.XXXXXX")"

free_port() {
    "$VPY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_http URL PID SECS LOG: until URL answers 200, or PID died, or SECS passed.
wait_http() {
    local url="$1" pid="$2" secs="$3" logf="$4"
    local deadline=$(($(date +%s) + secs))
    until curl -sf --max-time 2 -o /dev/null "$url"; do
        kill -0 "$pid" 2>/dev/null || die "the process for $url exited: $(tail -n 1 "$logf")"
        [ "$(date +%s)" -lt "$deadline" ] || die "$url did not answer within ${secs}s (log: $logf)"
        sleep 0.2
    done
}

# start_llama NAME MODEL N_CTX: a llama-cpp-python server on a free port; sets LLAMA_PORT.
start_llama() {
    local name="$1" model="$2" n_ctx="$3"
    LLAMA_PORT=$(free_port)
    "$VPY" -m llama_cpp.server --model "$model" --model_alias "$MODEL_NAME" \
        --host 127.0.0.1 --port "$LLAMA_PORT" --n_ctx "$n_ctx" --seed 1865 --verbose False \
        >"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
    wait_http "http://127.0.0.1:$LLAMA_PORT/v1/models" "$!" 60 "$WORK/$name.log"
}

# start_proxy NAME UPSTREAM_PORT: proxy.py on a free port; sets PROXY_PORT.
start_proxy() {
    local name="$1" up="$2"
    "$VPY" -u "$HERE/proxy.py" --upstream-port "$up" --dir "$WORK/$name" >"$WORK/$name.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    for _ in $(seq 100); do
        PROXY_PORT=$(sed -n 's/^ready //p' "$WORK/$name.log")
        [ -n "$PROXY_PORT" ] && return 0
        kill -0 "$pid" 2>/dev/null || die "proxy.py exited: $(tail -n 1 "$WORK/$name.log")"
        sleep 0.1
    done
    die "proxy.py did not start within 10 s"
}

# start_straycat NAME UPSTREAM_PORT MAX_CONCURRENT [options...]: sets WS.
start_straycat() {
    local name="$1" up="$2" conc="$3"
    shift 3
    local port
    port=$(free_port)
    "$BIN" --listen "127.0.0.1:$port" --agent openai --openai-url "http://127.0.0.1:$up/v1" \
        --openai-model "$MODEL_NAME" --openai-max-concurrent "$conc" "$@" \
        >"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
    wait_http "http://127.0.0.1:$port/health" "$!" 20 "$WORK/$name.log"
    WS="ws://127.0.0.1:$port"
}

FAILS=0
RESULTS=()
# scenario LABEL ARGS...: check.py's lines, and one summary line.
scenario() {
    local label="$1"
    shift
    say "$label"
    if timeout 300 "$VPY" -u "$HERE/check.py" "$@" --model "$MODEL_NAME" | tee "$WORK/check-$1.out"; then
        RESULTS+=("ok    $label")
    else
        RESULTS+=("FAIL  $label")
        FAILS=$((FAILS + 1))
    fi
}

# 2. The server, and what it really sends.
say "llama-cpp-python server ($(basename "$MODEL"), n_ctx 2048) on 127.0.0.1"
start_llama llama "$MODEL" 2048
LLAMA="$LLAMA_PORT"
say "one raw streamed response (curl -N --raw: HTTP chunk sizes shown), $WORK/raw-stream.txt"
curl -sN --raw -i --max-time 60 "http://127.0.0.1:$LLAMA/v1/chat/completions" \
    -H 'Content-Type: application/json' \
    -d '{"model":"tiny","stream":true,"messages":[{"role":"user","content":"Hi there"}]}' \
    >"$WORK/raw-stream.txt" || die "curl to the llama server failed"
tr -d '\r' <"$WORK/raw-stream.txt" | grep -v '^$' | cut -c1-200 | sed 's/^/  | /' >"$WORK/raw-lines.txt" || true
sed -n '1,17p' "$WORK/raw-lines.txt"
echo "  | ..."
tail -n 5 "$WORK/raw-lines.txt"
echo "  ($(grep -c '^data: ' "$WORK/raw-stream.txt") data events, $(grep -o '\\u[0-9a-fA-F]\{4\}' "$WORK/raw-stream.txt" | wc -l) \\u escapes)"

# 3. The checks.
start_proxy proxy-1 "$LLAMA"
start_straycat straycat-1 "$PROXY_PORT" 1
scenario "one user, two turns (--openai-max-concurrent 1)" serial --ws "$WS" --dir "$WORK/proxy-1"

say "a second server: the model that never stops ($(basename "$MODEL_NOSTOP"), n_ctx 512: every answer ~500 tokens)"
start_llama llama-short "$MODEL_NOSTOP" 512
SHORT="$LLAMA_PORT"
start_proxy proxy-2 "$SHORT"
start_straycat straycat-2 "$PROXY_PORT" 1
scenario "two users at once, one request at a time (--openai-max-concurrent 1)" queue --ws "$WS" --dir "$WORK/proxy-2"
scenario "a history too long for the server's context" overflow --ws "$WS" --dir "$WORK/proxy-2"
start_proxy proxy-3 "$SHORT"
start_straycat straycat-3 "$PROXY_PORT" 2
scenario "two users at once, two requests at a time (--openai-max-concurrent 2; the server cuts)" cut --ws "$WS" --dir "$WORK/proxy-3"

say "a third server: the same model, n_ctx 4096 (an answer of ~30 s)"
start_llama llama-long "$MODEL_NOSTOP" 4096
LONG="$LLAMA_PORT"
if [ "${STRAYCAT_LLM_LONG:-1}" != 0 ]; then
    start_proxy proxy-4 "$LONG"
    start_straycat straycat-4 "$PROXY_PORT" 1 --max-message-bytes 1048576
    scenario "a turn longer than 15 s, through the server's ': ping' comments" long --ws "$WS" --dir "$WORK/proxy-4" --timeout 110
fi
start_proxy proxy-5 "$LONG"
start_straycat straycat-5 "$PROXY_PORT" 1 --turn-timeout-secs 2
scenario "a turn past --turn-timeout-secs 2, then the next one" timeout --ws "$WS" --dir "$WORK/proxy-5" --server-log "$WORK/llama-long.log"

# straycat must not have logged a panic.
if grep -l 'panicked' "$WORK"/straycat-*.log >/dev/null 2>&1; then
    RESULTS+=("FAIL  straycat logged a panic: $(grep -h panicked "$WORK"/straycat-*.log | head -n 1)")
    FAILS=$((FAILS + 1))
fi

END=$(date +%s)
echo
say "summary (setup $((SETUP_DONE - START)) s, all $((END - START)) s)"
printf '  %s\n' "${RESULTS[@]}"
[ "$FAILS" = 0 ] || { echo "$FAILS failed"; exit 1; }
echo "all passed"
