"""What the augmentation check costs, and whether one draw decides as four do (issue 14).

    OMP_NUM_THREADS=1 python bench/bench_augment_check.py --zoo /tmp/pnc/zoo0 --zoo-seed 0 \\
        [--source mnist|mobilenet|vit] [--seeds 0,1,2] >> bench/results/augment_check.jsonl

For each clone seed, draws the bench's ``{5, 6}`` task (k = 20, k_t = 20) as ``pnc clone``
does and runs ``insert.augment_transforms`` on its judges twice: as built (a first draw
``AUGMENT_SURE`` clear of the threshold decides alone) and with every draw
(``AUGMENT_SURE`` out of reach: stop 31's rule). The source judges alone at k_t = 0, on the
same cloned digits, so its shares here say what a k_t = 0 clone keeps too. One JSON line per
seed: the kept transforms, the shares and the seconds of each rule.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from router_bench import CLONED, SOURCES

from pnc_net import insert
from pnc_net.cloning import CloneConfig, plan
from pnc_net.data import load_dataset
from pnc_net.insert import augment_judges, augment_transforms
from pnc_net.zoo import Zoo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", choices=sorted(SOURCES), default="mnist")
    ap.add_argument("--seeds", default="0,1,2", help="clone seeds")
    ap.add_argument("--zoo", type=Path, required=True)
    ap.add_argument("--zoo-seed", type=int, default=0, help="recorded only")
    args = ap.parse_args()
    target, source, _, data_name = SOURCES[args.source]
    data = load_dataset(data_name)
    for seed in (int(s) for s in args.seeds.split(",")):
        cfg = CloneConfig.single(target, source, CLONED, per_class=20, target_per_class=20,
                                 seed=seed)
        job = plan(Zoo(args.zoo), data, replace(cfg, synthesize=False))
        m = job.modules[0]
        judges = augment_judges(job.target, m.source, m.data, m.cloned)
        row: dict = {"source": source, "zoo_seed": args.zoo_seed, "seed": seed}
        built = insert.AUGMENT_SURE
        for rule, sure in (("built", built), ("every_draw", 2.0)):
            insert.AUGMENT_SURE = sure
            started = time.perf_counter()
            kept, checks = augment_transforms(job.cfg.insert, m.data.x_new.shape[1], judges,
                                              seed, job.compute)
            row[rule] = {"kept": list(kept), "checks": checks,
                         "seconds": round(time.perf_counter() - started, 2)}
        insert.AUGMENT_SURE = built
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
