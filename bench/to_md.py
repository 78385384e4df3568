#!/usr/bin/env python3
"""Turns `streamfarm bench --out FILE.json` results into Markdown tables (for BENCHMARKS.md).

usage: bench/to_md.py RESULTS.json [SECTION...]
e.g.   bench/to_md.py bench/data/fanout.json
"""
import json
import sys


def num(v):
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3f}"


def main():
    report = json.load(open(sys.argv[1]))
    wanted = sys.argv[2:] or list(report["sections"])
    for name in wanted:
        section = report["sections"].get(name)
        if section is None:
            continue
        print(f"#### {name}\n")
        print("| system | setting | figure | median | min–max (runs) |")
        print("|---|---|---|---:|---|")
        for row in section["rows"]:
            for fig, f in sorted(row["figures"].items()):
                print(f"| {row['system']} | {row['setting']} | {fig} | {num(f['median'])} | "
                      f"{num(f['min'])}–{num(f['max'])} ({f['runs']}) |")
            if row.get("failed"):
                why = row["failed"].replace("|", "\\|").replace("\n", " ")
                print(f"| {row['system']} | {row['setting']} | **FAILED** | | {why} |")
        for note in section["notes"]:
            print(f"\n- {note}")
        print()


if __name__ == "__main__":
    main()
