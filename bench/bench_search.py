"""Position search: exhaustive against successive halving (issue 10 item 7).

    python bench/bench_search.py [--zoo /tmp/pnc/zoo0] [--seeds 0,1] [--grids all,default]
        [--data mnist] [--target mnist-cnn-0to4] [--source mnist-cnn-5to9] [--classes 5,6]
        [--out bench/results/search_halving.json]

Per seed, the task is planned and localized once (timed); then each grid
(``all``: every ``R`` in 1..L x ``S`` in 1..K; ``default``: ``default_candidates``)
is searched both ways with ``cloning.search_module``, exactly as ``clone()``
does, and the chosen superbody is scored on the test split.

A training is a pure function of (job, position, epochs, gate steps), so a
training asked again (the halving's full-budget finalists, the default grid
after the full one) is replayed from a cache and *charged the seconds it took
when it ran*: every row's ``search_s`` is what that search alone costs, with
fewer processes on the shared machine. Run one at a time, one torch thread.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from pnc_net.cloning import (
    CloneConfig,
    CloneJob,
    localize_sequential,
    make_package,
    plan,
    run_sequential,
    search_module,
)
from pnc_net.data import load_dataset
from pnc_net.metrics import clone_metrics
from pnc_net.search import default_candidates
from pnc_net.superbody import Branch
from pnc_net.zoo import Zoo

METRICS = ("acc_old", "acc_new", "acc_all", "locality", "target_acc_old", "source_acc_new")


class ChargedRunner:
    """``run_sequential`` with a cache: a repeated training is replayed and charged its cost."""

    def __init__(self) -> None:
        self.cache: dict[tuple, tuple[tuple[Branch, dict], float]] = {}
        self.charged = 0.0
        self.trained = 0

    def __call__(self, job: CloneJob, i: int, positions: list[tuple[int, int]],
                 ) -> list[tuple[Branch, dict]]:
        out = []
        for p in positions:
            key = (i, tuple(p), job.cfg.insert.epochs, job.cfg.insert.gate_steps)
            if key not in self.cache:
                started = time.perf_counter()
                value = run_sequential(job, i, [p])[0]
                self.cache[key] = (value, time.perf_counter() - started)
            value, seconds = self.cache[key]
            self.charged += seconds
            self.trained += 1
            out.append(value)
        return out


def grid_of(job: CloneJob, name: str) -> list[tuple[int, int]]:
    """The candidate positions of grid ``name`` for module 0."""
    L, K = job.target.num_blocks, job.modules[0].source.num_blocks
    if name == "all":
        return [(r, s) for r in range(1, L + 1) for s in range(1, K + 1)]
    if name == "default":
        return default_candidates(L, K)
    raise SystemExit(f"unknown grid {name!r} (all, default)")


def search_row(job: CloneJob, data, runner: ChargedRunner, grid: str, mode: str,
               localize_s: float) -> dict:
    """Search module 0 of ``job`` over ``grid`` with ``mode``; the test metrics of the pick."""
    job.modules[0].candidates = grid_of(job, grid)
    mode_job = replace(job, cfg=replace(job.cfg, search=mode))
    runner.charged, runner.trained = 0.0, 0
    position, branch, record = search_module(mode_job, 0, runner)
    _, superbody = make_package(mode_job, [branch], {})
    m = job.modules[0]
    metrics = clone_metrics(superbody, data, [(m.source, m.manifest.label_names)],
                            job.cfg.eval_batch_size)
    rungs = [sum(1 for r in record if r.get("rung", 0) >= k)
             for k in range(1 + max(r.get("rung", 0) for r in record))]
    return {"seed": job.cfg.seed, "grid": grid, "mode": mode, "candidates": len(record),
            "rung_sizes": rungs, "trainings": runner.trained, "position": list(position),
            "search_s": round(runner.charged, 1), "localize_s": round(localize_s, 1),
            "total_s": round(runner.charged + localize_s, 1),
            "val_score": next(r["score"] for r in record if tuple(r["position"]) == position),
            **{k: metrics[k] for k in METRICS if k in metrics},
            "search": [{k: r[k] for k in ("position", "score", "rung", "rung_scores") if k in r}
                       for r in record]}


def summarize(rows: list[dict]) -> list[dict]:
    """Means over seeds per (task, grid, mode)."""
    out = []
    keys = {(json.dumps(r["task"], sort_keys=True), r["grid"], r["mode"]) for r in rows}
    for key in sorted(keys):
        group = [r for r in rows if (json.dumps(r["task"], sort_keys=True), r["grid"],
                                     r["mode"]) == key]
        mean = {k: round(sum(r[k] for r in group) / len(group), 4)
                for k in ("search_s", "total_s", "acc_old", "acc_new", "locality")}
        out.append({"task": json.loads(key[0]), "grid": key[1], "mode": key[2], "seeds": [r["seed"] for r in group],
                    "positions": [r["position"] for r in group],
                    "trainings": group[0]["trainings"], **mean})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default="/tmp/pnc/zoo0")
    ap.add_argument("--data", default=None, help="dataset (default: embedded MNIST)")
    ap.add_argument("--target", default="mnist-cnn-0to4")
    ap.add_argument("--source", default="mnist-cnn-5to9")
    ap.add_argument("--classes", default="5,6")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--grids", default="all,default")
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--target-per-class", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/search_halving.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    zoo, data = Zoo(args.zoo), load_dataset(args.data)
    out = Path(args.out)
    rows: list[dict] = json.loads(out.read_text())["rows"] if out.exists() else []
    task = {"target": args.target, "source": args.source, "classes": args.classes,
            "data": data.name, "per_class": args.per_class,
            "target_per_class": args.target_per_class}
    rows = [r for r in rows if r.get("task", task) != task or str(r["seed"]) not in
            args.seeds.split(",")]  # a rerun replaces this task's rows
    for seed in (int(s) for s in args.seeds.split(",")):
        cfg = CloneConfig.single(args.target, args.source, args.classes.split(","), seed=seed,
                                 per_class=args.per_class,
                                 target_per_class=args.target_per_class)
        torch.manual_seed(seed)
        started = time.perf_counter()
        job = plan(zoo, data, cfg)
        for m, (masks, prepared) in zip(job.modules, localize_sequential(job)):
            m.masks, m.prepared = masks, prepared
        localize_s = time.perf_counter() - started
        runner = ChargedRunner()
        for grid in args.grids.split(","):
            for mode in ("exhaustive", "halving"):
                row = {"task": task, **search_row(job, data, runner, grid, mode, localize_s)}
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "search"}), flush=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps({
                    "what": "position search: exhaustive vs successive halving (eta=3)",
                    "command": "python bench/bench_search.py " + " ".join(
                        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                        if v is not None),
                    "machine": f"{platform.machine()}, torch threads {args.threads}, "
                               "2 cores shared with other work",
                    "summary": summarize(rows), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
