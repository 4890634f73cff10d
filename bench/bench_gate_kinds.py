"""The two routers a clone can build, end to end (issue 14): ``--gate mlp`` against
``--gate auto`` (a ``DiscriminantGate`` when target samples exist).

    OMP_NUM_THREADS=1 python bench/bench_gate_kinds.py [ZOO_SEED [CLONE_SEED [K_T]]] \\
        [--gate auto|mlp|lda] [--adapter-rank 16] [--joint-rounds N] [--zoo-root /tmp/pnc] \\
        >> bench/results/gate_kinds.jsonl

Clones ``{5, 6}`` of ``mnist-cnn-5to9`` into ``mnist-cnn-0to4`` (k = 20) on the zoo
trained from ``ZOO_SEED`` in ``ZOO_ROOT/zoo<ZOO_SEED>`` (built when missing) with
``pnc clone``'s code path, and prints one JSON line: the test metrics, the fp16
package's bytes, the gate's kind and the clone's seconds (one thread).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from pnc_net import wire
from pnc_net.cloning import CloneConfig, clone
from pnc_net.data import load_mnist
from pnc_net.insert import GATE_KINDS, InsertConfig
from pnc_net.zoo import Zoo
from pnc_net.zoo_train import build_default_zoo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("zoo_seed", type=int, nargs="?", default=0)
    ap.add_argument("seed", type=int, nargs="?", default=0, help="clone seed")
    ap.add_argument("k_t", type=int, nargs="?", default=20, help="target samples per class")
    ap.add_argument("--gate", choices=GATE_KINDS, default="auto")
    ap.add_argument("--adapter-rank", type=int, default=InsertConfig().adapter_rank,
                    help="the adapter's rank (default: the clone's default)")
    ap.add_argument("--joint-rounds", type=int, default=0,
                    help="rounds of joint refinement of the chosen branch (method.md step 4)")
    ap.add_argument("--zoo-root", type=Path, default=Path("/tmp/pnc"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_mnist()
    zoo = Zoo(args.zoo_root / f"zoo{args.zoo_seed}")
    build_default_zoo(zoo, data, progress=False, seed=args.zoo_seed)
    cfg = CloneConfig.single("mnist-cnn-0to4", "mnist-cnn-5to9", ("5", "6"), per_class=20,
                             target_per_class=args.k_t, seed=args.seed)
    cfg = replace(cfg, insert=replace(cfg.insert, gate=args.gate, adapter_rank=args.adapter_rank,
                                      joint_rounds=args.joint_rounds))
    started = time.perf_counter()
    result = clone(zoo, data, cfg)
    seconds = time.perf_counter() - started
    m = result.report["metrics"]
    print(json.dumps({
        "zoo_seed": args.zoo_seed, "seed": args.seed, "k_t": args.k_t, "gate": args.gate,
        "adapter_rank": args.adapter_rank,
        **({"joint_rounds": args.joint_rounds,
            "joint_refinement": result.report.get("joint_refinement")} if args.joint_rounds else {}),
        "gate_kind": type(result.superbody.branches[0].gate).__name__,
        "package_bytes": len(wire.encode(result.package)), "seconds": round(seconds, 1),
        **{k: round(float(m[k]), 4) for k in ("acc_old", "target_acc_old", "acc_new",
                                               "source_acc_new", "locality")},
        "gap": {k: round(float(m[k]), 4) for k in ("routing_error_old", "routing_error_new",
                                                    "branch_error_new") if k in m}}))


if __name__ == "__main__":
    main()
