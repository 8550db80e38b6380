#!/usr/bin/env bash
# A bounded abuse soak on 127.0.0.1: builds the release binary and examples/abuse.rs, starts
# straycat with the echo agent on a free port, runs the soak (baseline: well-behaved users
# only; attack: slowloris, silent sockets, slow consumers, ping floods, reconnect storms,
# garbage, oversized frames and heads, invalid messages, all from 127.0.0.2-9, while the
# users chat from 127.0.0.1; after: the users only), stops the server, and writes
# bench/abuse-results.json and a Markdown table (bench/abuse_table.py).
#
#   bash bench/abuse.sh                                    # about 90 s after the build
#   bash bench/abuse.sh --users 100 -- --max-connections-per-ip 64
#
# Arguments before `--` go to the soak client (examples/abuse.rs: phase lengths, users,
# attacker counts and rates; `--help` prints them), the ones after it to the server (none by
# default, since an option the server does not know makes it exit).
#
# Environment: PORT (19400: the first port tried), ECHO_DELAY_MS (1: the echo agent's pause
# per word), LOG_LEVEL (info), RT (0; 1, as root: the server and the soak client at
# SCHED_FIFO priority 1, so that other people's compilers on a shared machine do not delay
# their wake-ups; both sleep between their work), CARGO_TARGET_DIR (target),
# OUT (bench/abuse-results.json).
# Everything listens on and targets loopback, every phase is bounded, the client has a hard
# timeout, and the server is stopped on any exit (trap).
set -euo pipefail
cd "$(dirname "$0")/.."

PORT=${PORT:-19400}
ECHO_DELAY_MS=${ECHO_DELAY_MS:-1}
LOG_LEVEL=${LOG_LEVEL:-info}
RT=${RT:-0}
PRIO=()
if [[ $RT == 1 ]]; then PRIO=(chrt -f 1); fi
TARGET=${CARGO_TARGET_DIR:-target}
OUT=${OUT:-bench/abuse-results.json}

CLIENT_ARGS=()
SERVER_ARGS=()
seen_sep=0
for a in "$@"; do
    if [[ $seen_sep == 0 && $a == -- ]]; then
        seen_sep=1
    elif [[ $seen_sep == 0 ]]; then
        CLIENT_ARGS+=("$a")
    else
        SERVER_ARGS+=("$a")
    fi
done

echo "== building (release)" >&2
CARGO_TARGET_DIR=$TARGET cargo build --release --quiet --bin straycat --example abuse
BIN=$TARGET/release
WORK=bench/target/abuse
mkdir -p "$WORK"
LOG=$WORK/server.log
CLIENT_OUT=$WORK/client.json
: >"$LOG"

SPID=""
CPID=""
cleanup() {
    if [[ -n $CPID ]]; then
        kill "$CPID" 2>/dev/null || true
        wait "$CPID" 2>/dev/null || true
        CPID=""
    fi
    if [[ -n $SPID ]]; then
        kill -KILL "$SPID" 2>/dev/null || true
        wait "$SPID" 2>/dev/null || true
        SPID=""
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A free port: the first of PORT, PORT+1, ... nobody listens on.
for _ in $(seq 50); do
    if ! ss -Hltn "sport = :$PORT" | grep -q .; then break; fi
    PORT=$((PORT + 1))
done

SERVER_CMD=("$BIN/straycat" --listen "127.0.0.1:$PORT" --echo-delay-ms "$ECHO_DELAY_MS"
    --log-level "$LOG_LEVEL" ${SERVER_ARGS[@]+"${SERVER_ARGS[@]}"})
echo "== server: ${SERVER_CMD[*]}" >&2
${PRIO[@]+"${PRIO[@]}"} "${SERVER_CMD[@]}" 2>>"$LOG" &
SPID=$!
for _ in $(seq 100); do
    if ss -Hltn "sport = :$PORT" | grep -q .; then break; fi
    if ! kill -0 "$SPID" 2>/dev/null; then
        echo "the server exited at start-up:" >&2
        tail -5 "$LOG" >&2
        exit 1
    fi
    sleep 0.05
done

CLIENT_CMD=("$BIN/examples/abuse" --addr "127.0.0.1:$PORT" --pid "$SPID"
    --clk-tck "$(getconf CLK_TCK)" ${CLIENT_ARGS[@]+"${CLIENT_ARGS[@]}"})
echo "== soak: ${CLIENT_CMD[*]}" >&2
loadavg_start=$(cut -d' ' -f1 /proc/loadavg)
# A hard bound whatever the phases: 10 minutes.
timeout 600 ${PRIO[@]+"${PRIO[@]}"} "${CLIENT_CMD[@]}" >"$CLIENT_OUT" &
CPID=$!
client_rc=0
wait "$CPID" || client_rc=$?
CPID=""

# Still running? Then a graceful stop (SIGTERM: 5 s grace), else its exit status.
server_alive=0
server_rc=""
if kill -0 "$SPID" 2>/dev/null; then
    server_alive=1
    kill -TERM "$SPID" 2>/dev/null || true
    for _ in $(seq 100); do
        if ! kill -0 "$SPID" 2>/dev/null; then break; fi
        sleep 0.1
    done
fi
wait "$SPID" 2>/dev/null && server_rc=0 || server_rc=$?
SPID=""

if [[ $client_rc != 0 ]]; then
    echo "the soak client failed (exit $client_rc)" >&2
    exit 1
fi
python3 bench/abuse_table.py --merge "$CLIENT_OUT" --log "$LOG" --out "$OUT" \
    --server-alive "$server_alive" --server-exit "$server_rc" \
    --command "RT=$RT bash bench/abuse.sh $*" --server-cmd "${SERVER_CMD[*]}" \
    --loadavg-start "$loadavg_start"
