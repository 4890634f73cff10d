"""What the router's second look (``pnc clone --gate-views N``) costs a receiver that serves.

    OMP_NUM_THREADS=1 python bench/bench_second_look_cost.py PACKAGE --zoo ZOO --data mnist \\
        >> bench/results/second_look_cost.jsonl

Rebuilds the package's superbody from the local zoo and times forwards over the first
``--inputs`` test inputs of every class, in batches of ``--batch`` on one thread, with the
gate's views as packaged and with none, interleaved ``--repeats`` times (medians: this
machine's timings drift by a third between runs, so only the ratio within a run counts).
Also reports the share of inputs the gate is unsure of (the ones that get the views).
``--band B`` sets the unsure band (``superbody.SECOND_LOOK_LOG_ODDS``, the receiver's
constant, 4) for the run. One JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import pnc_net.superbody as superbody_module
from pnc_net import wire
from pnc_net.data import load_dataset
from pnc_net.rebuild import build_superbody
from pnc_net.zoo import Zoo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("package", type=Path)
    ap.add_argument("--zoo", type=Path, required=True)
    ap.add_argument("--data", default="mnist")
    ap.add_argument("--inputs", type=int, default=512)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--band", type=float, default=superbody_module.SECOND_LOOK_LOG_ODDS)
    args = ap.parse_args()
    superbody_module.SECOND_LOOK_LOG_ODDS = args.band
    torch.set_num_threads(1)
    package, _ = wire.read_package(args.package)
    superbody = build_superbody(Zoo(args.zoo), package).eval()
    gate = superbody.branches[0].gate
    views = getattr(gate, "views", 0)
    if not views:
        raise SystemExit(f"error: {args.package} has no second look (cloned without --gate-views)")
    x = torch.as_tensor(load_dataset(args.data).split("test")[0])[: args.inputs]
    seconds: dict[int, list[float]] = {views: [], 0: []}
    with torch.no_grad():
        log_odds = superbody._looks(x, superbody.attached())[2][0]
        for _ in range(args.repeats):
            for n in seconds:
                gate.views = n
                started = time.perf_counter()
                for i in range(0, len(x), args.batch):
                    superbody(x[i : i + args.batch])
                seconds[n].append(time.perf_counter() - started)
    median = {n: statistics.median(s) for n, s in seconds.items()}
    print(json.dumps({"package": args.package.name, "views": views, "band": args.band,
                      "inputs": len(x),
                      "batch": args.batch, "unsure": round(float(
                          (log_odds.abs() < args.band).float().mean()), 4),
                      "seconds": {str(n): round(s, 3) for n, s in median.items()},
                      "ratio": round(median[views] / median[0], 2)}))


if __name__ == "__main__":
    main()
