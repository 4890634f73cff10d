"""Pair ``scripts/gate_taps_runs.sh``'s clones with the bench's PNC rows (same task, zoo
seed, clone seed and positions; k = 20, k_t = 20) and print the mean change per task and
``--gate-taps`` value; ``--jsonl FILE`` also writes every run as one line.

    python scripts/compare_gate_taps.py OUT_DIR [--jsonl bench/results/gate_taps.jsonl]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CELLS = (ROOT / "bench/results/full.cells.jsonl", ROOT / "bench/results/rgb/full.cells.jsonl")
TASKS = {"mnist": "cnn<-cnn {5,6}", "mob": "resnet18<-mobilenet_v3 {5,6}",
         "vit": "resnet18<-vit {5,6}"}
METRICS = ("locality", "acc_new", "acc_old")


def bench_rows() -> dict[tuple[str, int, int], dict]:
    """The bench's PNC rows at k = 20, k_t = 20, by (task, zoo seed, clone seed)."""
    rows = {}
    for path in CELLS:
        for line in path.read_text().splitlines():
            cell = json.loads(line)
            c = cell["cell"]
            if c["budget"] != 20 or c["target_budget"] != 20 or c["oracle"]:
                continue
            for r in cell["rows"]:
                if r["method"] == "PNC":
                    rows[(r["task"], r.get("zoo_seed", 0), r["seed"])] = r
    return rows


def run_of(path: Path) -> dict:
    """One clone's ``--json`` with what its file name says (``mnist_z1_s2_all``)."""
    parts = path.stem.split("_")
    zoo_seed = int(parts[1][1:]) if parts[0] == "mnist" else 0
    return {"run": path.stem, "task": TASKS[parts[0]], "gate_taps": parts[-1],
            "zoo_seed": zoo_seed, "seed": int(parts[-2][1:]), "per_class": 20,
            "target_per_class": 20, **json.loads(path.read_text())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--jsonl", type=Path)
    args = ap.parse_args()
    base = bench_rows()
    runs = [run_of(p) for p in sorted(args.out_dir.glob("*.json"))
            if p.stat().st_size]  # a clone still running has written nothing yet
    if args.jsonl:
        args.jsonl.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "package"})
                                      + "\n" for r in runs))
    groups: dict[tuple[str, str], list[tuple[dict, dict]]] = {}
    for r in runs:
        b = base[(r["task"], r["zoo_seed"], r["seed"])]
        groups.setdefault((r["task"], r["gate_taps"]), []).append((b, r))
    for (task, taps), pairs in sorted(groups.items()):
        n = len(pairs)
        cols = [f"{m} {sum(b[m] for b, _ in pairs) / n:.4f} -> "
                f"{sum(r[m] for _, r in pairs) / n:.4f}" for m in METRICS]
        grow = sum(r["package_bytes"] / b["bytes"] - 1 for b, r in pairs) / n
        print(f"{task}, --gate-taps {taps}, {n} runs: {', '.join(cols)}, bytes {grow:+.0%}")


if __name__ == "__main__":
    main()
