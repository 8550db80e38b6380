#!/usr/bin/env python3
"""Draws resident memory against open idle connections for each server of a bench/run.sh
run, as a hand-written SVG (standard library only, no plotting package):

    python3 bench/chart.py bench/results.json bench/memory.svg

Both axes are logarithmic: the servers differ by two orders of magnitude.
"""
import json
import math
import sys

SERIES = [("straycat", "straycat", "#d9480f"),
          ("tt", "tokio-tungstenite 0.30", "#1971c2"),
          ("lws", "libwebsockets 4.1", "#2f9e44")]
W, H = 720, 440
LEFT, RIGHT, TOP, BOTTOM = 80, 200, 40, 60


def main(src, dst):
    runs = json.load(open(src))["runs"]
    points = {}
    for r in runs:
        if r["case"].startswith("idle") and not r.get("warm") and "rss_kib" in r:
            points.setdefault(r["server"], []).append((r["conns"], r["rss_kib"] / 1024))
    if not points:
        sys.exit("no idle runs in " + src)
    # Start-up memory is the curve's value at 0 connections; drawn at x = 10 on a log axis.
    for r in runs:
        if r["case"] == "idle100" and "rss_start_kib" in r:
            points[r["server"]].append((10, r["rss_start_kib"] / 1024))
    for p in points.values():
        p.sort()
    xs = [x for p in points.values() for x, _ in p]
    ys = [y for p in points.values() for _, y in p]
    x0, x1 = math.floor(math.log10(min(xs))), math.ceil(math.log10(max(xs)))
    y0, y1 = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def px(x):
        return LEFT + (math.log10(x) - x0) / (x1 - x0) * pw

    def py(y):
        return TOP + ph - (math.log10(y) - y0) / (y1 - y0) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{LEFT}" y="22" font-size="15" font-weight="bold">'
           'Server resident memory vs open idle WebSocket connections</text>']
    for e in range(x0, x1 + 1):
        x = px(10 ** e)
        label = "start" if e == 1 and min(xs) == 10 else f"{10 ** e:,}"
        out.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{TOP + ph}" stroke="#ddd"/>')
        out.append(f'<text x="{x:.1f}" y="{TOP + ph + 18}" text-anchor="middle">{label}</text>')
    for e in range(y0, y1 + 1):
        y = py(10 ** e)
        v = 10 ** e
        label = f"{v:,} MiB"
        out.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + pw}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
    out.append(f'<text x="{LEFT + pw / 2}" y="{H - 18}" text-anchor="middle">'
               'open idle connections (log scale)</text>')
    out.append(f'<text transform="translate(18 {TOP + ph / 2}) rotate(-90)" text-anchor="middle">'
               'resident memory, VmRSS (log scale)</text>')
    ly = TOP + 10
    for key, name, colour in SERIES:
        p = points.get(key)
        if not p:
            continue
        path = " ".join(f"{'M' if i == 0 else 'L'}{px(x):.1f},{py(y):.1f}" for i, (x, y) in enumerate(p))
        out.append(f'<path d="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, y in p:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="{colour}">'
                       f'<title>{name}: {x if x != 10 else "start-up"} → {y:.1f} MiB</title></circle>')
        last = p[-1]
        out.append(f'<line x1="{LEFT + pw + 14}" y1="{ly}" x2="{LEFT + pw + 34}" y2="{ly}" '
                   f'stroke="{colour}" stroke-width="2"/>')
        out.append(f'<text x="{LEFT + pw + 40}" y="{ly + 4}">{name}</text>')
        out.append(f'<text x="{LEFT + pw + 40}" y="{ly + 19}" fill="#555">'
                   f'{last[1]:,.0f} MiB at {last[0]:,}</text>')
        ly += 44
    out.append("</svg>")
    open(dst, "w").write("\n".join(out) + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results.json",
         sys.argv[2] if len(sys.argv) > 2 else "bench/memory.svg")
