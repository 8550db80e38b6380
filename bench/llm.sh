#!/usr/bin/env bash
# Benchmarks straycat's openai agent under many concurrent streamed turns, against the mock
# upstream of examples/mock_llm.rs (each answer: a role-only chunk, then 20 content tokens
# 50 ms apart, so one turn alone takes ~1 s), with the client and measurement driver of
# examples/llm_bench.rs. Prints one Markdown table and appends one JSON line (every run,
# the summary and the machine) to bench/llm-results.json.
#
#   bash bench/llm.sh            # about 1 minute
#   REPS=5 bash bench/llm.sh     # more repetitions
#
# Each repetition starts fresh processes (a mock, and a straycat per chat run) and runs:
#   single  1 user, one turn per round            (the "one turn alone" baseline)
#   many    USERS users at once, one turn each    (--openai-max-concurrent USERS)
#   direct  USERS concurrent requests straight to the mock (what straycat adds)
# each for ROUNDS rounds: round 1 is a fresh server (the headline figures), later rounds
# the same processes again (warm). straycat is pinned to core CORE_SERVER, the mock and
# the client to core CORE_LOAD (taskset, as bench/run.sh). Everything listens on
# 127.0.0.1, every wait is bounded (llm_bench --timeout-secs, the mock's
# --exit-after-secs), and the script stops what it started.
#
# Environment: REPS (3), USERS (200), ROUNDS (3), PORT (19300: first of the ports used),
# CORE_SERVER (0), CORE_LOAD (1), RT (1 as root, else 0: run the server and the mock at
# SCHED_FIFO priority 1 and the client at 2, so that other people's compilers on the same
# cores cannot delay a wake-up; on a busy shared machine a normal-priority server waits
# hundreds of ms per round in the run queue, which the table's last rows show), NICE (0:
# the niceness of every process started when RT=0),
# CARGO_TARGET_DIR (target), OUT (bench/llm-results.json).
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=${REPS:-3}
USERS=${USERS:-200}
ROUNDS=${ROUNDS:-3}
PORT=${PORT:-19300}
CORE_SERVER=${CORE_SERVER:-0}
CORE_LOAD=${CORE_LOAD:-1}
NICE=${NICE:-0}
if [[ -z ${RT:-} ]]; then
    RT=0
    if [[ $(id -u) == 0 ]] && command -v chrt >/dev/null; then RT=1; fi
fi
TARGET=${CARGO_TARGET_DIR:-target}
OUT=${OUT:-bench/llm-results.json}
HOST=127.0.0.1
TOKENS=20

echo "== building (release)" >&2
CARGO_TARGET_DIR=$TARGET cargo build --release --quiet --bin straycat --example mock_llm --example llm_bench
BIN=$TARGET/release
WORK=bench/target/llm
mkdir -p "$WORK"
RUNS=$WORK/runs.jsonl
LOG=$WORK/run.log
DUMP=$WORK/turns.csv
: >"$RUNS"
: >"$LOG"
: >"$DUMP"

MPID=""
SPID=""
stop() {
    for p in $SPID $MPID; do
        kill "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    SPID=""
    MPID=""
}
trap stop EXIT

on() { # core priority command…: pinned, at the chosen niceness or real-time priority.
    # Always run in a subshell (`&` or `$(…)`): it execs, so `$!` is the command's own pid.
    local core=$1 prio=$2
    shift 2
    if [[ $RT == 1 ]]; then
        exec chrt -f "$prio" taskset -c "$core" "$@"
    fi
    exec nice -n "$NICE" taskset -c "$core" "$@"
}

wait_listen() { # port
    for _ in $(seq 100); do
        if ss -Hltn "sport = :$1" | grep -q .; then return 0; fi
        sleep 0.05
    done
    echo "nothing listens on $1" >&2
    return 1
}

start_mock() { # port
    on "$CORE_LOAD" 1 "$BIN/examples/mock_llm" --listen "$HOST:$1" --tokens "$TOKENS" \
        --token-ms 50 --first-token-ms 50 --threads $((USERS + 16)) --exit-after-secs 300 >>"$LOG" 2>&1 &
    MPID=$!
    wait_listen "$1"
}

start_straycat() { # port mock-port
    on "$CORE_SERVER" 1 "$BIN/straycat" --listen "$HOST:$1" --agent openai \
        --openai-url "http://$HOST:$2/v1" --openai-model m --openai-max-concurrent "$USERS" \
        --log-level warn --max-messages-per-minute 0 --max-connections-per-ip 0 \
        --max-connects-per-minute-per-ip 0 2>>"$LOG" &
    SPID=$!
    wait_listen "$1"
}

record() { # case rep load0 json
    python3 -c 'import json,sys; d=json.loads(sys.argv[4]); d.update(case=sys.argv[1], rep=int(sys.argv[2]), loadavg=float(sys.argv[3]), rt=sys.argv[5] == "1", nice=int(sys.argv[6])); print(json.dumps(d))' \
        "$1" "$2" "$3" "$4" "$RT" "$NICE" >>"$RUNS"
}

# run CASE REP MODE USERS: fresh processes, one llm_bench run, one JSON line.
run() {
    local case=$1 rep=$2 mode=$3 users=$4 mport sport load0 out
    PORT=$((PORT + 2))
    mport=$PORT
    sport=$((PORT + 1))
    start_mock "$mport"
    local args=(--mock "$HOST:$mport" --mock-pid "$MPID" --users "$users" --rounds "$ROUNDS"
        --tokens "$TOKENS" --label "$case" --dump "$DUMP")
    if [[ $mode == chat ]]; then
        start_straycat "$sport" "$mport"
        args+=(--addr "$HOST:$sport" --pid "$SPID")
    fi
    load0=$(cut -d' ' -f1 /proc/loadavg)
    echo "-- rep $rep $case ($users users), load average $load0" >&2
    # The client above the mock's threads, which share its core: a token is stamped when it
    # arrives, not when the mock's threads have all had their turn.
    if out=$(on "$CORE_LOAD" 2 "$BIN/examples/llm_bench" "$mode" "${args[@]}" 2>"$WORK/last.err"); then
        record "$case" "$rep" "$load0" "$out"
    else
        echo "rep $rep $case: llm_bench failed (see $LOG)" >&2
        if [[ $out == "{"* ]]; then record "$case" "$rep" "$load0" "$out"; fi
    fi
    cat "$WORK/last.err" >>"$LOG"
    grep -E '^(round 1|  )' "$WORK/last.err" | head -n 2 >&2 || true
    stop
}

echo "== $(nproc) cores, server on core $CORE_SERVER, mock and client on core $CORE_LOAD, nice $NICE, RT $RT" >&2
for rep in $(seq "$REPS"); do
    run single "$rep" chat 1
    run many "$rep" chat "$USERS"
    run direct "$rep" direct "$USERS"
done

python3 - "$RUNS" "$OUT" "$USERS" "$TOKENS" <<'EOF'
import json, os, platform, statistics, subprocess, sys, time

runs_path, out_path, users, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
runs = [json.loads(l) for l in open(runs_path) if l.strip()]


def rounds(case, first=True):
    """Round 1 of every repetition of `case` (first), or the later rounds (warm)."""
    out = []
    for r in runs:
        if r.get("case") != case:
            continue
        for x in r.get("rounds", []):
            if (x["round"] == 1) == first:
                out.append((r, x))
    return out


def get(x, path):
    for k in path.split("/"):
        if not isinstance(x, dict) or k not in x:
            return None
        x = x[k]
    return x


def vals(case, path, first=True):
    return [v for v in (get(x, path) for _, x in rounds(case, first)) if isinstance(v, (int, float))]


def med(v):
    return statistics.median(v) if v else None


def fmt(v, d=1):
    return "–" if v is None or v != v else f"{v:,.{d}f}"


def ms(v, d=1):
    """median (min–max) of a list."""
    if not v:
        return "–"
    return f"{fmt(med(v), d)} ({fmt(min(v), d)}–{fmt(max(v), d)})"


def verdict(value, goal, le=True):
    if value is None:
        return "–"
    return "met" if (value <= goal if le else value >= goal) else "**not met**"


rows = []
# 1. wall time
w_many, w_single, w_direct = vals("many", "wall_ms"), vals("single", "wall_ms"), vals("direct", "wall_ms")
ratios = [a["wall_ms"] / b["wall_ms"] for (_, a), (_, b) in zip(rounds("many"), rounds("single"))]
ratio = med(w_many) / med(w_single) if w_many and w_single else None
rows.append((f"wall time, {users} users at once, first send to last `chat` (ms)", "", ms(w_many), ms(vals("many", "wall_ms", False))))
rows.append(("wall time, 1 user alone (ms)", "", ms(w_single), ms(vals("single", "wall_ms", False))))
rows.append((f"wall time, {users} direct requests to the mock, no straycat (ms)", "", ms(w_direct), ms(vals("direct", "wall_ms", False))))
wm, ws = med(vals("many", "wall_ms", False)), med(vals("single", "wall_ms", False))
warm_ratio = wm / ws if wm and ws else None
rows.append((f"{users} users / 1 user", f"≤ 1.3× ({verdict(ratio, 1.3)})",
             f"{fmt(ratio, 3)}× (per repetition {fmt(min(ratios), 3)}–{fmt(max(ratios), 3)})" if ratios else "–",
             f"{fmt(warm_ratio, 3)}×" if warm_ratio else "–"))
# 2. threads
th = [r.get("threads_peak") for r in runs if r.get("case") in ("many", "single")]
th = [t for t in th if t is not None]
rows.append(("server threads, peak (sampled every 10 ms over the whole run)", f"2 ({verdict(max(th) if th else None, 2)})",
             f"{max(th)} (every run: {', '.join(str(t) for t in th)})" if th else "–", ""))
# 3. CPU per token
cpu = vals("many", "cpu/server_us_per_token")
cpu_w = vals("many", "cpu/server_us_per_token", False)
rows.append(("server CPU per relayed token, run time of all threads (µs)", f"≤ 3 ({verdict(med(cpu), 3)})", ms(cpu, 2), ms(cpu_w, 2)))
tk = vals("many", "cpu/server_ticks_us_per_token")
rows.append(("same from utime+stime (10 ms ticks) (µs)", "", ms(tk, 2), ms(vals("many", "cpu/server_ticks_us_per_token", False), 2)))


def split(first):
    u = sum(vals("many", "cpu/server_utime_ticks", first))
    s = sum(vals("many", "cpu/server_stime_ticks", first))
    c = med(vals("many", "cpu/server_us_per_token", first))
    if u + s == 0 or c is None:
        return "–"
    return f"{c * u / (u + s):.2f} user + {c * s / (u + s):.2f} kernel ({u} + {s} ticks, all runs)"


rows.append(("of which user / kernel (µs; split of the ticks)", "", split(True), split(False)))
rows.append(("… between every user's 2nd and 19th token: relaying only (µs per token)", "", ms(vals("many", "cpu_steady/server_us_per_token"), 2), ms(vals("many", "cpu_steady/server_us_per_token", False), 2)))
rows.append(("… from the sends to every user's 2nd token (µs per turn: message, connect, request, 2 tokens)", "", ms(vals("many", "cpu_start/us_per_turn"), 1), ms(vals("many", "cpu_start/us_per_turn", False), 1)))
rows.append(("server CPU per single-user token (µs; 1 turn alone)", "", ms(vals("single", "cpu/server_us_per_token"), 1), ms(vals("single", "cpu/server_us_per_token", False), 1)))
# 4. memory per in-flight turn
kib = lambda path, first=True: [v / 1024 for v in vals("many", path, first)]
rows.append((f"memory per in-flight turn, VmRSS at token 10 − idle, / {users} (KiB)", f"≤ 16 ({verdict(med(kib('inflight_per_user/rss_b')), 16)})",
             ms(kib("inflight_per_user/rss_b"), 2), ms(kib("inflight_per_user/rss_b", False), 2)))
rows.append(("same, RssAnon (KiB)", "", ms(kib("inflight_per_user/anon_b"), 2), ms(kib("inflight_per_user/anon_b", False), 2)))
rows.append(("same, exact (smaps_rollup Rss / Anonymous) (KiB)", "",
             f"{ms(kib('inflight_per_user/exact_rss_b'), 2)} / {ms(kib('inflight_per_user/exact_anon_b'), 2)}",
             f"{ms(kib('inflight_per_user/exact_rss_b', False), 2)} / {ms(kib('inflight_per_user/exact_anon_b', False), 2)}"))
rows.append(("kept after the turn (VmRSS / RssAnon after − before, per user) (KiB)", "",
             f"{ms(kib('retained_per_user/rss_b'), 2)} / {ms(kib('retained_per_user/anon_b'), 2)}",
             f"{ms(kib('retained_per_user/rss_b', False), 2)} / {ms(kib('retained_per_user/anon_b', False), 2)}"))
idle = [r["mem_idle_connected"]["rss_kib"] for r in runs if r.get("case") == "many"]
rows.append((f"server VmRSS with {users} idle sessions (KiB)", "", ms(idle, 0), ""))
# 5. time to first token
for p in ("p50", "p99"):
    a, b = vals("many", f"ttft_ms/{p}"), vals("direct", f"ttft_ms/{p}")
    aw, bw = vals("many", f"ttft_ms/{p}", False), vals("direct", f"ttft_ms/{p}", False)
    rows.append((f"time to first token {p}, via straycat / direct to the mock (ms)", "",
                 f"{ms(a)} / {ms(b)}", f"{ms(aw)} / {ms(bw)}"))
    d = [x - y for x, y in zip(a, b)]
    dw = [x - y for x, y in zip(aw, bw)]
    rows.append((f"added by straycat, {p} (ms; the two {p}s subtracted per repetition)", "", ms(d), ms(dw)))
for p in ("p50", "p99"):
    a, b = vals("many", f"ttft_outside_model_ms/{p}"), vals("direct", f"ttft_outside_model_ms/{p}")
    aw, bw = vals("many", f"ttft_outside_model_ms/{p}", False), vals("direct", f"ttft_outside_model_ms/{p}", False)
    rows.append((f"… of it outside the model (send to request at the mock + first token back), {p}, via straycat / direct (ms)", "",
                 f"{ms(a, 2)} / {ms(b, 2)}", f"{ms(aw, 2)} / {ms(bw, 2)}"))
    rows.append((f"… the mock's own time to first token (50 ms scheduled; late when its core is busy), {p}, via straycat / direct (ms)", "",
                 f"{ms(vals('many', f'ttft_model_ms/{p}'))} / {ms(vals('direct', f'ttft_model_ms/{p}'))}",
                 f"{ms(vals('many', f'ttft_model_ms/{p}', False))} / {ms(vals('direct', f'ttft_model_ms/{p}', False))}"))
for p in ("p50", "p99"):
    rows.append((f"relay delay per token {p}: mock's write to client's receipt, via straycat / direct (ms)", "",
                 f"{ms(vals('many', f'relay_ms/{p}'), 2)} / {ms(vals('direct', f'relay_ms/{p}'), 2)}",
                 f"{ms(vals('many', f'relay_ms/{p}', False), 2)} / {ms(vals('direct', f'relay_ms/{p}', False), 2)}"))
# the load side
rows.append((f"client CPU / mock CPU during the {users}-user rounds (% of a core)", "",
             f"{ms(vals('many', 'cpu/client_util_pct'), 0)} / {ms(vals('many', 'cpu/mock_util_pct'), 0)}",
             f"{ms(vals('many', 'cpu/client_util_pct', False), 0)} / {ms(vals('many', 'cpu/mock_util_pct', False), 0)}"))
busy = [x["cpu"].get("core_busy_pct", []) for _, x in rounds("many")]
rows.append((f"cores busy during the {users}-user rounds, all processes (%, per core)", "",
             "; ".join("/".join(f"{c:.0f}" for c in b) for b in busy), ""))
rows.append((f"run-queue wait in the {users}-user rounds, server / client (ms per round; time runnable but not running)", "",
             f"{ms(vals('many', 'cpu/server_runqueue_wait_ms'))} / {ms(vals('many', 'cpu/client_runqueue_wait_ms'))}",
             f"{ms(vals('many', 'cpu/server_runqueue_wait_ms', False))} / {ms(vals('many', 'cpu/client_runqueue_wait_ms', False))}"))
failed = sum(x.get("failed", 0) for r in runs for x in r.get("rounds", []))
errors = sorted({e for r in runs for x in r.get("rounds", []) for e in x.get("errors", [])})

loads = [r["loadavg"] for r in runs]
cpu_model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print()
print(f"| figure | goal | round 1 (fresh server), median (min–max) of {len(rounds('many'))} | later rounds (same processes) |")
print("|---|---|---|---|")
for r in rows:
    print("| " + " | ".join(r) + " |")
print()
rt = any(r.get("rt") for r in runs)
prio = "SCHED_FIFO (server and mock 1, client 2)" if rt else f"normal priority (nice {runs[0].get('nice', 0) if runs else 0})"
print(f"{cpu_model}, {os.cpu_count()} cores, Linux {platform.release()}; {prio}; 1-minute load average at the start "
      f"of each run: {min(loads):.2f}–{max(loads):.2f}; failed turns: {failed}" + (f" ({'; '.join(errors[:3])})" if errors else ""))
summary = {r[0]: r[2] for r in rows}
def git(*args):
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


commit = git("rev-parse", "--short", "HEAD") + (" + uncommitted changes in src/" if git("status", "--porcelain", "--", "src") else "")
line = {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": commit, "users": users, "tokens_per_turn": tokens,
        "machine": {"cpu": cpu_model, "cores": os.cpu_count(), "kernel": platform.release(),
                    "loadavg_at_starts": loads},
        "summary": summary, "runs": runs}
with open(out_path, "a") as f:
    f.write(json.dumps(line) + "\n")
print(f"\nappended one line to {out_path}; per-turn timings in bench/target/llm/turns.csv", file=sys.stderr)
EOF
