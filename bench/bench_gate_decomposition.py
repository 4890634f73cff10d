"""Where a k_t = 0 clone loses new-class accuracy: the energy veto, the gate's MLP, or
the branch; and whether shifting the MLP's bias (the veto kept) buys it back.

    OMP_NUM_THREADS=1 python bench/bench_gate_decomposition.py ZOO_SEED [CLONE_SEED] [K_T] \\
        >> bench/results/gate_decomposition.jsonl

Clones ``{5, 6}`` of ``mnist-cnn-5to9`` into ``mnist-cnn-0to4`` (k = 20) on the zoo
trained from ``ZOO_SEED`` in ``/tmp/pnc/zoo<ZOO_SEED>`` (built when missing), then
scores the superbody on the test split with the veto on and off and the MLP's output
bias shifted by ``delta`` (100: the MLP always open, so only the veto routes). Prints
one JSON line.
"""

from __future__ import annotations

import json
import math
import sys
import time

import torch

from pnc_net.cloning import CloneConfig, clone
from pnc_net.data import load_mnist
from pnc_net.metrics import clone_metrics
from pnc_net.zoo import Zoo
from pnc_net.zoo_train import build_default_zoo

DELTAS = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 100.0)


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    zoo_seed, seed, k_t = (int(a) for a in [*argv, "0", "0"][:3])
    data = load_mnist()
    zoo = Zoo(f"/tmp/pnc/zoo{zoo_seed}")
    build_default_zoo(zoo, data, progress=False, seed=zoo_seed)
    cfg = CloneConfig.single("mnist-cnn-0to4", "mnist-cnn-5to9", ("5", "6"), per_class=20,
                             target_per_class=k_t, seed=seed)
    started = time.time()
    superbody = clone(zoo, data, cfg).superbody
    source, manifest = zoo.load("mnist-cnn-5to9")
    (branch,) = superbody.branches
    gate = branch.gate
    bias, energy_max = gate.net[2].bias.data.clone(), float(gate.energy_max)
    out = {"zoo_seed": zoo_seed, "seed": seed, "k_t": k_t, "seconds": time.time() - started,
           "position": [branch.position_r, branch.position_s], "energy_max": energy_max,
           "rows": []}
    for veto in (True, False):
        for delta in DELTAS:
            gate.energy_max.fill_(energy_max if veto else math.inf)
            gate.net[2].bias.data = bias + delta
            m = clone_metrics(superbody, data, [(source, manifest.label_names)])
            out["rows"].append({"veto": veto, "delta": delta,
                                **{k: round(m[k], 4) for k in ("acc_old", "acc_new", "locality")}})
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
