"""Check a ``pnc bench --json`` result for completeness (CI runs it after ``pnc bench --quick``).

    python scripts/check_bench.py RESULT.json [--max-seconds 300]

What it checks, so a broken harness cannot pass quietly: every planned cell
finished; every task has a row for every method in both data regimes; every
metric is a number in its range; the PNC package is smaller than what every
tuning baseline must send; the PNG figures exist. It reports the wall time
against the 5-minute target of ``--quick`` and fails on it only when
``--max-seconds`` is given (CI machines vary; the time target is a benchmark
figure, not a test).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REQUIRED = ("task", "method", "budget", "target_budget", "acc_old", "acc_new", "acc_all",
            "locality", "bytes", "seconds")
UNIT_INTERVAL = ("acc_old", "acc_new", "acc_all", "locality")


def problems_of(result: dict, folder: Path) -> list[str]:
    out = []
    if result.get("cells_done") != result.get("cells_planned"):
        out.append(f"{result.get('cells_done')} of {result.get('cells_planned')} cells finished")
    rows, methods = result.get("rows", []), result["config"]["methods"]
    main_budget = result["config"]["budget"]
    for row in rows:
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            out.append(f"row {row.get('task')}/{row.get('method')} lacks {missing}")
            continue
        for k in UNIT_INTERVAL:
            if not (isinstance(row[k], int | float) and 0.0 <= row[k] <= 1.0):
                out.append(f"{row['task']}/{row['method']}: {k} = {row[k]!r} is not in [0, 1]")
        if not (math.isfinite(row["bytes"]) and row["bytes"] > 0):
            out.append(f"{row['task']}/{row['method']}: bytes = {row['bytes']!r}")
    for task in result["config"]["tasks"]:
        for kt in result["config"]["target_budgets"]:
            have = {r["method"] for r in rows if r["task"] == task["name"]
                    and (r["method"] == "Oracle" or
                         (r["target_budget"] == kt and r["budget"] == main_budget))}
            lacking = sorted(set(methods) - have)
            if lacking:
                out.append(f"task {task['name']!r}, k_t = {kt}: no row for {lacking}")
    for row in (r for r in rows if r["method"] == "PNC"):
        for other in rows:
            if (other["method"] in ("FT", "LwF", "KD") and other["task"] == row["task"]
                    and other["budget"] == row["budget"]
                    and other["target_budget"] == row["target_budget"]
                    and not row["bytes"] < other["bytes"]):
                out.append(f"{row['task']}: PNC sends {row['bytes']} B, {other['method']} "
                           f"only {other['bytes']} B")
    if not result.get("transmission") or not result.get("sim"):
        out.append("no transmission or Sim measurements")
    for name in result.get("files", {}).values():
        if not (folder / name).is_file():
            out.append(f"figure {name} is missing")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result", type=Path, help="the JSON that `pnc bench --json` printed")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="fail when the run took longer (default: report only)")
    args = ap.parse_args()
    try:
        printed = json.loads(args.result.read_text())
        full = json.loads(Path(printed["json"]).read_text())  # the saved result, with raw cells
    except (OSError, ValueError, KeyError) as e:
        print(f"error: cannot read a bench result from {args.result}: {e}", file=sys.stderr)
        return 2
    problems = problems_of(full, Path(printed["json"]).parent)
    wall = float(full.get("wall_seconds", math.nan))
    print(f"bench {full.get('mode')}: {full.get('cells_done')}/{full.get('cells_planned')} "
          f"cells, {len(full.get('rows', []))} rows, {wall:.0f} s wall "
          f"({'within' if wall <= 300 else 'over'} the 300 s target of --quick)")
    if args.max_seconds is not None and not wall <= args.max_seconds:
        problems.append(f"took {wall:.0f} s, more than --max-seconds {args.max_seconds:.0f}")
    for p in problems:
        print(f"FAIL {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
