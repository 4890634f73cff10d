"""Rerun the PNC-F rows of a finished ``pnc bench`` run after a fix to the baseline.

Each cell's PNC clone is rebuilt (seeded, so the same superbody: its metrics are checked
against the stored PNC row) and PNC-F is tuned again only where a gate carries an energy
veto; elsewhere ``baselines.tuned_energy_vetoes`` is a no-op and the stored row stands.

    OMP_NUM_THREADS=1 python scripts/rerun_pnc_f.py bench/results/full.cells.jsonl \
        --zoos '/tmp/pnc/zoo{seed}' --part 0/2 --out part0.jsonl
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pnc_net import wire
from pnc_net.bench.baselines import energy_vetoes, run_pnc_f, task_data
from pnc_net.bench.harness import (
    BenchConfig,
    Cell,
    _dataset,
    _row,
    append_checkpoint,
    cell_key,
    clone_config_of,
    read_checkpoint,
)
from pnc_net.cloning import clone
from pnc_net.superbody import NO_ENERGY_VETO
from pnc_net.zoo import Zoo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cells", type=Path)
    ap.add_argument("--zoos", required=True, help="each zoo seed's folder, '{seed}' in it")
    ap.add_argument("--part", default="0/1", help="I/N: this process takes every Nth cell")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    part, parts = (int(v) for v in args.part.split("/"))
    cfg = BenchConfig()
    done = read_checkpoint(args.out)
    todo = [c for c in read_checkpoint(args.cells).values()
            if any(r["method"] == "PNC-F" for r in c["rows"])][part::parts]
    for out in (c for c in todo if cell_key(c["cell"]) not in done):
        cell = Cell(**out["cell"])
        task = cfg.tasks[cell.task]
        zoo, data = Zoo(args.zoos.format(seed=cell.zoo_seed)), _dataset(task.data)
        clone_cfg = clone_config_of(cfg, cell)
        pnc = clone(zoo, data, clone_cfg)
        stored = next(r for r in out["rows"] if r["method"] == "PNC")
        same = all(abs(stored[k] - pnc.report["metrics"][k]) < 1e-6
                   for k in ("acc_old", "acc_new", "locality"))
        vetoed = any(float(v) < NO_ENERGY_VETO for v in energy_vetoes(pnc.superbody))
        if vetoed:
            td = task_data(zoo, data, clone_cfg)
            row = _row(cell, task, run_pnc_f(pnc.superbody, td, data, cfg.tune, cell.seed,
                                             len(wire.encode(pnc.package)),
                                             pnc.report["seconds"]))
            out["rows"] = [row if r["method"] == "PNC-F" else r for r in out["rows"]]
        out["pnc_f_rerun"] = {"vetoed": vetoed, "rerun": vetoed, "pnc_reproduced": same}
        append_checkpoint(args.out, out)
        print(cell, "vetoed" if vetoed else "no veto", "PNC reproduced" if same else
              "PNC DIFFERS", flush=True)


if __name__ == "__main__":
    main()
