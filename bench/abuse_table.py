#!/usr/bin/env python3
"""Renders bench/abuse-results.json (the abuse soak, bench/abuse.sh) as Markdown tables.

    python3 bench/abuse_table.py                      # print the tables of the last run
    python3 bench/abuse_table.py --merge client.json --log server.log --out FILE ...

With --merge (what bench/abuse.sh does) it first adds to the client's JSON what only the
script knows: the server's log (lines by level, panics, the most frequent warnings with
user ids, peers and numbers folded), whether the server was still alive at the end and its
exit status, the commands, and the machine; then writes --out and prints.
"""
import argparse
import collections
import json
import os
import platform
import re
import sys

LEVELS = ("ERROR", "WARN", "INFO", "DEBUG", "TRACE")


def log_summary(path):
    counts = collections.Counter()
    panics = []
    warnings = collections.Counter()
    lines = 0
    with open(path, errors="replace") as f:
        for line in f:
            lines += 1
            if "panic" in line.lower():
                if len(panics) < 20:
                    panics.append(line.rstrip()[:300])
            level = next((lv for lv in LEVELS if f" {lv} " in line[:40]), None)
            if level:
                counts[level] += 1
            if level in ("WARN", "ERROR"):
                msg = line.split("]", 1)[-1] if "]" in line else line
                msg = re.sub(r"(user|peer)=\S+", r"\1=*", msg)
                msg = re.sub(r"\d+", "N", msg).strip()[:160]
                warnings[f"{level} {msg}"] += 1
    return {
        "lines": lines,
        "by_level": dict(counts),
        "panics": len(panics),
        "panic_lines": panics,
        "top_warnings": warnings.most_common(12),
    }


def machine():
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "loadavg_at_end": os.getloadavg()[0],
    }


def fmt_int(n):
    return f"{n:,}"


def loop_cell(lp):
    if not lp or not lp.get("iterations"):
        return "n/a"
    p99 = lp.get("p99_bound_ms")
    p99 = "> 100" if p99 is None else f"{p99:g}"
    return f"{lp['mean_us']:.0f}, {fmt_int(int(lp['over_10ms']))} of {fmt_int(int(lp['iterations']))}, {p99}"


def render(r):
    out = []
    out.append("| phase | secs | replies | p50 / p99 / max reply (ms) | users' errors, disconnects | server CPU (s) | VmRSS start / peak / end (KiB) | RssAnon start / peak / end (KiB) | fds start / peak / end | loop iterations: mean (µs), > 10 ms, p99 ≤ (ms) |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for p in r["phases"]:
        g, s = p["good"], p["server"]
        errs = ", ".join(f"{k} {v}" for k, v in sorted(g["errors"].items())) or "0"
        rss, anon, fds = s["rss_kib"], s["anon_kib"], s["fds"]
        out.append(
            f"| {p['phase']} | {p['secs']} | {fmt_int(g['replies'])} of {fmt_int(g['sent'])} "
            f"| {g['p50_ms']:.2f} / {g['p99_ms']:.2f} / {g['max_ms']:.2f} | {errs} | {s['cpu_s']:.2f} "
            f"| {fmt_int(rss['start'])} / {fmt_int(rss['peak'])} / {fmt_int(rss['end'])} "
            f"| {fmt_int(anon['start'])} / {fmt_int(anon['peak'])} / {fmt_int(anon['end'])} "
            f"| {fds['start']} / {fds['peak']} / {fds['end']} | {loop_cell(p.get('loop'))} |"
        )
    last = r["phases"][-1]["server"]
    log = r.get("server_log", {})
    out.append("")
    out.append(
        f"VmHWM at the end: {fmt_int(last['hwm_kib'])} KiB; server at start: VmRSS "
        f"{fmt_int(r['server_at_start']['rss_kib'])} KiB, {r['server_at_start']['fds']} fds. "
        f"Panics in the server's log: {log.get('panics', '?')}; server alive at the end: "
        f"{'yes' if r.get('server_alive') else 'NO'}, exit status after SIGTERM: {r.get('server_exit', '?')}."
    )
    out.append("")
    out.append("| attacker (source) | what the server did to it |")
    out.append("|---|---|")
    attackers = collections.defaultdict(dict)
    for key, v in r["attackers"].items():
        kind, event = key.split(".", 1)
        attackers[kind][event] = v
    sources = r["config"].get("sources", {})
    for kind, ev in sorted(attackers.items()):
        parts = []
        n = ev.pop("lifetimes", 0)
        total = ev.pop("lifetime_sum_ms", 0)
        mx = ev.pop("lifetime_max_ms", 0)
        for event, v in sorted(ev.items(), key=lambda kv: -kv[1]):
            parts.append(f"{event} {fmt_int(v)}")
        if n:
            parts.append(f"socket lifetime mean {total / n / 1000:.1f} s, max {mx / 1000:.1f} s")
        out.append(f"| {kind} ({sources.get(kind, '?')}) | {'; '.join(parts)} |")
    if log:
        out.append("")
        out.append(f"Server log: {fmt_int(log['lines'])} lines, {log['by_level']}. Most frequent warnings:")
        out.append("")
        for msg, n in log["top_warnings"]:
            out.append(f"- {fmt_int(n)} × `{msg}`")
    m = r.get("machine")
    if m:
        out.append("")
        out.append(
            f"{m['cpu']}, {m['cores']} cores, Linux {m['kernel']}; 1-minute load average "
            f"{m.get('loadavg_at_start')} at the start, {m['loadavg_at_end']:.2f} at the end."
        )
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--merge")
    ap.add_argument("--log")
    ap.add_argument("--out", default="bench/abuse-results.json")
    ap.add_argument("--server-alive", type=int)
    ap.add_argument("--server-exit")
    ap.add_argument("--command")
    ap.add_argument("--server-cmd")
    ap.add_argument("--loadavg-start", type=float)
    a = ap.parse_args()
    if a.merge:
        with open(a.merge) as f:
            r = json.load(f)
        if a.log:
            r["server_log"] = log_summary(a.log)
        r["server_alive"] = bool(a.server_alive)
        r["server_exit"] = a.server_exit
        r["command"] = a.command
        r["server_command"] = a.server_cmd
        r["machine"] = machine()
        r["machine"]["loadavg_at_start"] = a.loadavg_start
        with open(a.out, "w") as f:
            json.dump(r, f, indent=1)
            f.write("\n")
    else:
        with open(a.out) as f:
            r = json.load(f)
    print(render(r))


if __name__ == "__main__":
    sys.exit(main())
