"""Does the router decide better on several views of an input than on one? (issues 10, 14)

    OMP_NUM_THREADS=1 python bench/bench_router_tta.py --zoo /tmp/pnc/zoo0 --zoo-seed 0 \\
        --seed 0 [--source mnist|mobilenet|vit] >> bench/results/router_tta.jsonl

Clones ``{5, 6}`` (k = 20, k_t = 20, the bench's two positions) exactly as ``pnc clone``
does and keeps its gate. On the test split, the gate is also read on ``V`` views of each
input (a random shift of up to 2 px, then the transforms the clone's augmentation kept:
the views its router was fitted on) and its log-odds averaged with the input's own. The
target's and the branch's logits stay the input's own, so locality still compares against
the unchanged target: only the routing decision sees the views.

Rows: ``views-V`` for V = 0 (the built gate), 2, 4, 8; ``views-V-unsureT``, the views read
only where the input's own log-odds are within ``T`` of 0 (``looked_again``: the share of
inputs that were); each with test locality, acc_old, acc_new and ``shift{b}`` (``b`` added
to the averaged log-odds). One JSON line.
"""

from __future__ import annotations

import json
import time

import torch
from router_bench import Features, parse_args, router_run

from pnc_net.cloning import router_features
from pnc_net.training import random_augment, random_shift

SHIFTS = (-3, -2, -1, 1, 2, 3)
VIEWS = (2, 4, 8)
CASCADE = (2, 4)


def main() -> None:
    args = parse_args(__doc__)
    started = time.time()
    setup = router_run(args, target_per_class=20)
    job, branch, prep = setup.job, setup.branch, setup.prep
    max_shift = job.cfg.insert.max_shift
    data_x = {"old": setup.x_old, "new": setup.x_new}

    def log_odds(f: Features) -> torch.Tensor:
        return setup.built_gate(f).double().clamp(1e-12, 1 - 1e-12).logit()

    own = {"old": log_odds(setup.test_old), "new": log_odds(setup.test_new)}
    gen = torch.Generator().manual_seed(1234)
    views: dict[str, list[torch.Tensor]] = {"old": [], "new": []}
    for _ in range(max(VIEWS)):
        for side in ("old", "new"):
            v = random_augment(random_shift(data_x[side], max_shift, gen), prep.augment, gen)
            views[side].append(log_odds(router_features(job.target, branch, v)))

    def scored(lo_old: torch.Tensor, lo_new: torch.Tensor) -> dict:
        return {**setup.score(lo_old.sigmoid(), lo_new.sigmoid()),
                **{f"shift{b}": setup.score((lo_old + b).sigmoid(), (lo_new + b).sigmoid())
                   for b in SHIFTS}}

    rows = {"views-0": scored(own["old"], own["new"])}
    for n in VIEWS:
        mean = {s: torch.stack([own[s], *views[s][:n]]).mean(0) for s in ("old", "new")}
        rows[f"views-{n}"] = scored(mean["old"], mean["new"])
        for tau in CASCADE:  # a second look only where the input's own log-odds are unsure
            unsure = {s: own[s].abs() < tau for s in ("old", "new")}
            lo = {s: torch.where(unsure[s], mean[s], own[s]) for s in ("old", "new")}
            rows[f"views-{n}-unsure{tau}"] = {
                **scored(lo["old"], lo["new"]),
                "looked_again": round(float(torch.cat([unsure["old"], unsure["new"]])
                                            .float().mean()), 4)}
    print(json.dumps({"source": job.modules[0].manifest.name, "zoo_seed": args.zoo_seed,
                      "seed": args.seed, "position": list(setup.position),
                      "augment": list(prep.augment), "seconds": round(time.time() - started),
                      "rows": rows}))


if __name__ == "__main__":
    main()
