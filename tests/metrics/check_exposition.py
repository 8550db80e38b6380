#!/usr/bin/env python3
"""Checks a Prometheus text exposition (version 0.0.4) read on stdin with a real parser,
prometheus_client's (PyPI), and the rules a scraper relies on beyond the syntax.

Usage: check_exposition.py [FAMILY ...] < metrics.txt

Every FAMILY named must be present (by its exposition name: a counter with its `_total`).
Exit code 0 and one summary line when all is well; 1 and one line per problem otherwise;
2 when prometheus_client is not installed (the Rust test checks for it before calling).
"""

import math
import sys

try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:
    print("prometheus_client is not installed (pip install prometheus_client)", file=sys.stderr)
    sys.exit(2)

KINDS = {"counter", "gauge", "histogram"}


def exposition_name(family):
    # The parser follows OpenMetrics and drops a counter's `_total` from the family name.
    return family.name + "_total" if family.type == "counter" else family.name


def check_histogram(family, problems):
    series = {}
    for s in family.samples:
        key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
        series.setdefault(key, {"buckets": [], "sum": None, "count": None})
        entry = series[key]
        if s.name == family.name + "_bucket":
            if "le" not in s.labels:
                problems.append(f"{family.name}: a bucket without le: {s}")
                continue
            entry["buckets"].append((float(s.labels["le"]), s.value))
        elif s.name == family.name + "_sum":
            entry["sum"] = s.value
        elif s.name == family.name + "_count":
            entry["count"] = s.value
        else:
            problems.append(f"{family.name}: a sample of another name: {s.name}")
    for key, entry in series.items():
        where = f"{family.name}{dict(key)}"
        buckets = entry["buckets"]
        bounds = [b for b, _ in buckets]
        if bounds != sorted(bounds) or len(set(bounds)) != len(bounds):
            problems.append(f"{where}: bucket bounds not strictly ascending: {bounds}")
        counts = [c for _, c in buckets]
        if any(b < a for a, b in zip(counts, counts[1:])):
            problems.append(f"{where}: buckets not cumulative: {counts}")
        if not bounds or not math.isinf(bounds[-1]):
            problems.append(f"{where}: no +Inf bucket")
        elif entry["count"] != counts[-1]:
            problems.append(f"{where}: _count {entry['count']} is not the +Inf bucket {counts[-1]}")
        if entry["sum"] is None or entry["sum"] < 0:
            problems.append(f"{where}: no _sum, or a negative one")


def main():
    text = sys.stdin.read()
    problems = []
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as e:  # the parser raises ValueError and others on bad syntax
        print(f"not parseable: {e!r}")
        return 1
    if not text.endswith("\n"):
        problems.append("the exposition does not end with a newline")
    seen = set()
    samples = 0
    for family in families:
        name = exposition_name(family)
        if name in seen:
            problems.append(f"{name}: declared twice")
        seen.add(name)
        # A TYPE line whose name does not match its samples leaves the type "unknown".
        if family.type not in KINDS:
            problems.append(f"{name}: type {family.type!r}")
        if not family.documentation:
            problems.append(f"{name}: no HELP")
        if not family.samples:
            problems.append(f"{name}: no samples")
        samples += len(family.samples)
        if family.type == "counter":
            for s in family.samples:
                if s.value < 0 or s.name != name:
                    problems.append(f"{name}: bad counter sample {s}")
        if family.type == "histogram":
            check_histogram(family, problems)
        for s in family.samples:
            if math.isnan(s.value):
                problems.append(f"{s.name}: NaN")
    for wanted in sys.argv[1:]:
        if wanted not in seen:
            problems.append(f"{wanted}: missing")
    for p in problems:
        print(p)
    if problems:
        return 1
    print(f"ok: {len(families)} families, {samples} samples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
