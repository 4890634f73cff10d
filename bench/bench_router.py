"""Locality and accuracy over zoo seeds and clone seeds: is the router robust?

    python bench/bench_router.py [--zoo-root /tmp/pnc] [--zoo-seeds 0,1,2] [--seeds 0,1,2]
                                 [--kt 0,20] [--per-class 20] [--out bench/results/router.jsonl]

A figure that holds on one zoo may not hold on another machine's. Each zoo seed N
is the default zoo trained from seed N (``pnc zoo build --seed N``) in
``ZOO_ROOT/zooN`` (built when missing, about a minute); every (zoo seed, clone
seed, k_t) cell clones ``{5, 6}`` from ``mnist-cnn-5to9`` into ``mnist-cnn-0to4``
and appends one JSON line (metrics, gap decomposition, chosen position, per-candidate
validation scores, seconds). The summary gives mean, min and max per k_t.
One torch thread per process: run several invocations side by side to use more cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from pnc_net.cloning import CloneConfig, clone
from pnc_net.data import load_mnist
from pnc_net.zoo import Zoo
from pnc_net.zoo_train import build_default_zoo

KEYS = ("acc_old", "acc_new", "locality", "target_acc_old", "source_acc_new",
        "routing_error_old", "routing_error_new", "branch_error_new", "oracle_acc_new")


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo-root", type=Path, default=Path("/tmp/pnc"))
    ap.add_argument("--zoo-seeds", type=ints, default=[0, 1, 2])
    ap.add_argument("--seeds", type=ints, default=[0, 1, 2])
    ap.add_argument("--kt", type=ints, default=[0, 20])
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("bench/results/router.jsonl"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_mnist()
    rows = []
    for zs in args.zoo_seeds:
        zoo = Zoo(args.zoo_root / f"zoo{zs}")
        build_default_zoo(zoo, data, progress=False, seed=zs)
        for kt in args.kt:
            for seed in args.seeds:
                started = time.perf_counter()
                result = clone(zoo, data, CloneConfig.single(
                    "mnist-cnn-0to4", "mnist-cnn-5to9", ("5", "6"), per_class=args.per_class,
                    target_per_class=kt, seed=seed))
                m = result.report["metrics"]
                branch = result.superbody.attached()[0]
                row = {"zoo_seed": zs, "seed": seed, "k": args.per_class, "k_t": kt,
                       **{k: round(m[k], 4) for k in KEYS},
                       "position": [branch.position_r, branch.position_s],
                       "energy_max": float(branch.gate.energy_max),
                       "search": [[s["position"], round(s["score"], 3), s.get("energy_quantile")]
                                  for s in result.report["search"][0]],
                       "seconds": round(time.perf_counter() - started, 1)}
                print(json.dumps(row), flush=True)
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                rows.append(row)
    for kt in args.kt:
        cell = [r for r in rows if r["k_t"] == kt]
        for key in ("locality", "acc_old", "acc_new"):
            vals = [r[key] for r in cell]
            print(f"k_t={kt} {key}: mean {statistics.mean(vals):.3f} min {min(vals):.3f} "
                  f"max {max(vals):.3f} over {len(vals)} runs")


if __name__ == "__main__":
    main()
