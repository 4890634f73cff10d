"""Issue 2's targets, measured: the default task and the heterogeneous pair.

    python bench/bench_clone.py [--zoo DIR] [--threads 2] [--tasks default,hetero,kt0]

Prints one JSON line per task (the metric keys of ``pnc clone --json`` plus
``seconds``, ``package_bytes`` and the package/superbody ratio) and checks
each against the targets: acc_new >= 0.90, acc_old >= target_acc_old - 0.02,
locality >= 0.97, package <= 1% of the superbody, <= 120 s on 2 CPU cores.
Run it on an otherwise idle machine: the time target is about 2 cores.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pnc_net import wire
from pnc_net.cloning import CloneConfig, clone
from pnc_net.data import load_mnist
from pnc_net.zoo import Zoo
from pnc_net.zoo_train import build_default_zoo

TASKS = {
    "default": ("mnist-cnn-0to4", "mnist-cnn-5to9", 20, ("5", "6")),
    "hetero": ("mnist-cnn-0to4", "mnist-resnet-5to9", 20, ("5", "6")),
    "kt0": ("mnist-cnn-0to4", "mnist-cnn-5to9", 0, ("5", "6")),
    "one": ("mnist-cnn-0to4", "mnist-cnn-5to9", 20, ("7",)),  # one cloned class
}


def check(m: dict) -> dict[str, bool]:
    return {"acc_new>=0.90": m["acc_new"] >= 0.90,
            "acc_old>=target-0.02": m["acc_old"] >= m["target_acc_old"] - 0.02,
            "locality>=0.97": m["locality"] >= 0.97,
            "package<=1%": m["package_bytes"] <= 0.01 * m["superbody_bytes"],
            "seconds<=120": m["seconds"] <= 120}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tasks", default="default,hetero")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    zoo, data = Zoo(args.zoo), load_mnist()
    build_default_zoo(zoo, data, progress=False)
    for name in args.tasks.split(","):
        target, source, kt, classes = TASKS[name]
        cfg = CloneConfig.single(target, source, classes, per_class=100,
                                 target_per_class=kt, seed=args.seed)
        started = time.perf_counter()
        result = clone(zoo, data, cfg)
        seconds = time.perf_counter() - started
        m = {**result.report["metrics"], "seconds": round(seconds, 1),
             "package_bytes": len(wire.encode(result.package)),
             "position": [[b.position_r, b.position_s] for b in result.superbody.branches],
             "filters_kept": {k: f"{a}/{b}" for m in result.package.modules
                              for k, (a, b) in m.kept_filters().items()}}
        m["package_ratio"] = m["package_bytes"] / m["superbody_bytes"]
        print(json.dumps({"task": name, "target": target, "source": source,
                          "target_per_class": kt, "threads": args.threads, **m,
                          "targets_met": check(m)}), flush=True)


if __name__ == "__main__":
    main()
