#!/usr/bin/env python3
"""Prints the Markdown table of a bench/run.sh run: `python3 bench/table.py bench/results.json`.

Rows are the figures of the issue's targets, columns the servers; standard library only.
"""
import json
import sys

NAMES = {"straycat": "straycat", "tt": "tokio-tungstenite 0.30", "lws": "libwebsockets 4.1"}


def main(path):
    data = json.load(open(path))
    runs = {(r["server"], r["case"]): r for r in data["runs"]}
    # Round trips are measured in several rounds, servers taking turns, because an idle
    # server's wake-up latency drifts over a minute on a shared machine: keep the median.
    for server in {r["server"] for r in data["runs"]}:
        rounds = [r for r in data["runs"] if r["server"] == server and r["case"].startswith("rtt")]
        if rounds:
            med = lambda k: sorted(r[k] for r in rounds)[len(rounds) // 2]
            runs[(server, "rtt")] = {"p50_us": med("p50_us"), "p99_us": med("p99_us")}
    servers = [s for s in NAMES if any(k[0] == s for k in runs)]

    def get(server, case, key):
        return runs.get((server, case), {}).get(key)

    def fmt(v, digits=1):
        if v is None:
            return "–"
        if isinstance(v, float) and v != v:  # NaN
            return "–"
        return f"{v:,.{digits}f}"

    def cell(server, fn):
        try:
            return fn(server)
        except (TypeError, ZeroDivisionError, KeyError):
            return "–"

    def echo50(s):
        v = fmt(get(s, "echo50x8", "server_cpu_us"), 2)
        if s == "tt" and get("tt-nagle", "echo50x8", "server_cpu_us") is not None:
            v += f" ({fmt(get('tt-nagle', 'echo50x8', 'server_cpu_us'), 2)} Nagle on)"
        return v

    def scale(s):
        a, b = get(s, "echo100", "server_cpu_us"), get(s, "echo10k", "server_cpu_us")
        return f"{fmt(b, 2)} ({(b / a - 1) * 100:+.0f} %)"

    def user_part(case):
        return lambda s: fmt(get(s, case, "server_user_us"), 2)

    def scale_user(s):
        a, b = get(s, "echo100", "server_user_us"), get(s, "echo10k", "server_user_us")
        return f"{fmt(a, 2)} → {fmt(b, 2)} ({(b / a - 1) * 100:+.0f} %)"

    def rtt(s):
        p50 = get(s, "rtt", "p50_us")
        p99 = get(s, "rtt", "p99_us")
        return f"{fmt(p50)} / {fmt(p99)}"

    def kib(case):
        return lambda s: fmt(get(s, case, "bytes_per_conn") / 1024, 2)

    def startup(s):
        vals = [r["rss_start_kib"] for (sv, c), r in runs.items() if sv == s and c.startswith("idle")]
        return fmt(min(vals) / 1024, 2)

    def startup_anon(s):
        vals = [r["anon_start_kib"] for (sv, c), r in runs.items()
                if sv == s and c.startswith("idle") and r.get("anon_start_kib") is not None]
        return fmt(min(vals), 0)

    def chat(s):
        if s != "straycat":
            return "n/a"
        turn = get(s, "chat", "server_cpu_us")
        per_tok = get(s, "chat", "tokens") / max(get(s, "chat", "done"), 1)
        ratio = turn / get(s, "echo50x8", "server_cpu_us")
        return f"{fmt(turn, 1)} per turn = {per_tok + 1:.0f} frames out ({turn / (per_tok + 1):.2f} per frame, {ratio:.1f}× echo's per message)"

    def chat1(s):
        if s != "straycat":
            return "n/a"
        turn = get(s, "chat1", "server_cpu_us")
        ratio = turn / get(s, "echo50x8", "server_cpu_us")
        return f"{fmt(turn, 2)} per turn ({ratio:.1f}× echo)"

    rows = [
        ("server CPU per echoed 1 KiB message, 50 conns × 8 in flight (µs)", "≤ 2.5", echo50),
        ("echo throughput, 50 × 8, 1 KiB (msgs/s)", "", lambda s: fmt(get(s, "echo50x8", "rate"), 0)),
        ("load generator's own CPU per message, same run (µs)", "", lambda s: fmt(get(s, "echo50x8", "loadgen_cpu_us"), 2)),
        ("round trip of one 32 B message, idle server, p50 / p99 (µs; median of the rounds)", "≤ peers", rtt),
        ("server CPU per message, 100 conns × 1 in flight (µs)", "", lambda s: fmt(get(s, "echo100", "server_cpu_us"), 2)),
        ("server CPU per message, 10,000 conns × 1 in flight (µs, vs 100)", "within 20 %", scale),
        ("of which user space, 100 → 10,000 conns (µs; the rest is the kernel's TCP)", "", scale_user),
        ("connect + upgrade + echo + close per second (32 at once)", "≥ 10,000", lambda s: fmt(get(s, "churn", "rate"), 0)),
        ("memory per idle connection, 10,000 open (KiB)", "≤ 4", kib("idle10000")),
        ("memory per idle connection after one 1 KiB echo (KiB)", "", kib("idle10k-warm")),
        ("start-up resident memory, VmRSS (MiB)", "≤ 1.5", startup),
        ("start-up private memory, RssAnon (KiB)", "", startup_anon),
        ("chat, 1 KiB text of 190 words: /ws/{user}, echo agent, 50 × 8 (server CPU, µs)", "≤ 2× echo", chat),
        ("chat, 1 KiB one-word text: 1 chat_token + 1 chat out, 50 × 8 (server CPU, µs)", "≤ 2× echo", chat1),
    ]
    print("| figure | target | " + " | ".join(NAMES[s] for s in servers) + " |")
    print("|---|---|" + "---|" * len(servers))
    for label, target, fn in rows:
        print(f"| {label} | {target} | " + " | ".join(cell(s, fn) for s in servers) + " |")
    loads = [r.get("loadavg", 0) for r in data["runs"]]
    m = data.get("machine", {})
    print(f"\n{m.get('cpu', '?')}, {m.get('cores', '?')} cores, Linux {m.get('kernel', '?')}; "
          f"1-minute load average at the start of each run: {min(loads):.2f}–{max(loads):.2f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results.json")
