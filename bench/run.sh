#!/usr/bin/env bash
# Runs the same load against straycat and its peers (tokio-tungstenite, and libwebsockets
# when libwebsockets-dev is installed), one server process at a time pinned to core 0 and
# the load generator pinned to core 1, all on 127.0.0.1, and prints one Markdown table.
#
#   bash bench/run.sh            # about 3 minutes on 2 cores
#   SECS=1 bash bench/run.sh     # shorter measured windows
#
# Writes bench/results.json (every run's JSON line plus the machine) and bench/memory.svg
# (resident memory against open connections, by bench/chart.py). Each measurement starts a
# fresh server, so no run inherits another's heap. Every run is bounded: SECS seconds of
# measurement, at most 60 s to open connections, and the script kills what it started.
set -euo pipefail
cd "$(dirname "$0")/.."

SECS=${SECS:-3}
CORE_SERVER=${CORE_SERVER:-0}
CORE_LOAD=${CORE_LOAD:-1}
HOST=127.0.0.1
PORT=${PORT:-19100}
IDLE_NS=(100 1000 5000 10000)

# 10,000 client sockets in the generator, as many in the server (hard limit here: 20000).
hard=$(ulimit -Hn)
ulimit -n $(( hard < 20000 ? hard : 20000 ))

echo "== building (release)" >&2
cargo build --release --quiet --bin straycat --example loadgen
(cd bench && cargo build --release --quiet)
LOADGEN=target/release/examples/loadgen
TT=bench/target/release/tt-echo
LWS=bench/target/lws-echo
HAVE_LWS=0
if pkg-config --exists libwebsockets 2>/dev/null; then
    gcc -O2 -o "$LWS" bench/lws-echo.c $(pkg-config --cflags --libs libwebsockets)
    HAVE_LWS=1
else
    echo "libwebsockets-dev not installed: skipping lws (apt-get install libwebsockets-dev)" >&2
fi

RUNS=bench/target/runs.jsonl
LOG=bench/target/run.log
: >"$RUNS"
: >"$LOG"
SPID=""

server_cmd() { # name port
    case $1 in
    straycat) echo "target/release/straycat --listen $HOST:$2 --raw-echo --log-level warn --max-connections 11000 --max-sessions 11000 --max-connections-per-ip 0 --max-connects-per-minute-per-ip 0 --max-messages-per-minute 0" ;;
    tt) echo "$TT --listen $HOST:$2 --nodelay" ;;
    tt-nagle) echo "$TT --listen $HOST:$2" ;;
    lws) echo "$LWS $2" ;;
    esac
}

stop_server() {
    if [[ -n $SPID ]]; then
        kill "$SPID" 2>/dev/null || true
        wait "$SPID" 2>/dev/null || true
        SPID=""
    fi
}
trap stop_server EXIT

start_server() { # name port
    # shellcheck disable=SC2046
    taskset -c "$CORE_SERVER" $(server_cmd "$1" "$2") 2>>"$LOG" &
    SPID=$!
    for _ in $(seq 100); do
        if ss -Hltn "sport = :$2" | grep -q .; then return 0; fi
        sleep 0.05
    done
    echo "server $1 did not listen on $2" >&2
    return 1
}

# run CASE SERVER MODE [loadgen options…]: one fresh server, one loadgen run, one JSON line.
run() {
    local case=$1 server=$2 mode=$3
    shift 3
    PORT=$((PORT + 1))
    start_server "$server" "$PORT"
    local load0 out json
    load0=$(cut -d' ' -f1 /proc/loadavg)
    if out=$(taskset -c "$CORE_LOAD" "$LOADGEN" "$mode" --addr "$HOST:$PORT" --pid "$SPID" \
        --label "$server" --secs "$SECS" "$@" 2>>"$LOG"); then
        json=$(grep '^{' <<<"$out" | tail -1)
        python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d.update(case=sys.argv[2], server=sys.argv[3], loadavg=float(sys.argv[4])); print(json.dumps(d))' \
            "$json" "$case" "$server" "$load0" >>"$RUNS"
        printf '%-9s %-13s %s\n' "$server" "$case" "$(grep -E 'server CPU|per idle|completed' <<<"$out" | tr -s ' ' | paste -sd';')" >&2
    else
        echo "$server $case: loadgen failed (see $LOG)" >&2
    fi
    stop_server
}

SERVERS=(straycat tt)
[[ $HAVE_LWS == 1 ]] && SERVERS+=(lws)
echo "== measuring: servers ${SERVERS[*]}, ${SECS}s windows, server on core $CORE_SERVER, load on core $CORE_LOAD" >&2
# Round trips: three rounds, the servers taking turns, so that a drift of the machine's
# wake-up latency does not favour whoever ran first (bench/table.py keeps the median).
for round in 1 2 3; do
    for s in "${SERVERS[@]}"; do
        run "rtt$round" "$s" rtt
    done
done
for s in "${SERVERS[@]}"; do
    run echo50x8 "$s" echo --conns 50 --inflight 8 --size 1024
    run echo100 "$s" echo --conns 100 --inflight 1 --size 1024
    run echo10k "$s" echo --conns 10000 --inflight 1 --size 1024
    run churn "$s" churn --conns 32 --size 32
    for n in "${IDLE_NS[@]}"; do
        run "idle$n" "$s" idle --conns "$n"
    done
    run idle10k-warm "$s" idle --conns 10000 --warm --size 1024
done
run echo50x8 tt-nagle echo --conns 50 --inflight 8 --size 1024
run chat straycat chat --conns 50 --inflight 8 --size 1024 --path '/ws/u{i}'
run chat1 straycat chat --conns 50 --inflight 8 --size 1024 --one-word --path '/ws/u{i}'

python3 - "$RUNS" >bench/results.json <<'EOF'
import json, os, platform, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print(json.dumps({"machine": {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release()},
                  "runs": runs}, indent=1))
EOF
python3 bench/table.py bench/results.json
python3 bench/chart.py bench/results.json bench/memory.svg
echo "wrote bench/results.json and bench/memory.svg" >&2
