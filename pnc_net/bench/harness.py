"""The benchmark harness: PNC against the tuning baselines on the same tasks and data.

A run is a list of independent *cells*: one ``(task, zoo seed, seed, k, k_t)``
cell runs PNC and every baseline on the same draw of cloning data; one Oracle
cell per ``(task, zoo seed, seed)`` serves every budget (it trains on the full
train split). Cells run in worker processes (``BenchConfig.workers``) and are
reduced to mean and standard deviation over zoo seeds and clone seeds together
(``rows``), and per zoo seed (``by_zoo_seed``): a figure that holds on one zoo
may not hold on a zoo trained from another seed, so the benchmark trains one zoo
per seed (``zoo_roots``) and says. ``pnc bench`` is the command line;
``scripts/render_bench.py`` turns the saved JSON into the README section.

Example::

    from pnc_net.bench.harness import BenchConfig, run_bench
    result = run_bench(Zoo(), BenchConfig.quick())
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from pnc_net import wire
from pnc_net.bench.baselines import (
    TUNING_METHODS,
    BaselineResult,
    TuneConfig,
    run_oracle,
    run_pnc_f,
    run_tuning,
    task_data,
)
from pnc_net.bench.transmission import sim_of, transmission_of
from pnc_net.cloning import CloneConfig, SourceSpec, clone
from pnc_net.data import Dataset, load_dataset
from pnc_net.errors import InvalidInputError
from pnc_net.insert import InsertConfig
from pnc_net.localize import LocalizeConfig
from pnc_net.metrics import GAP_KEYS
from pnc_net.training import torch_threads
from pnc_net.zoo import Zoo
from pnc_net.zoo_train import ZOO_SETS, build_default_zoo

METHODS = ("PNC", "PNC-F", "FT", "LwF", "KD", "Oracle")
METRICS = ("acc_old", "acc_new", "acc_all", "locality", "bytes", "params_modified", "seconds")
ALL = 350  # the train split holds 350 samples per class: budget "all"


@dataclass(frozen=True)
class Task:
    """One clone task: a target and one or more (source, classes) pairs."""

    name: str
    target: str
    sources: tuple[SourceSpec, ...]
    kind: str
    data: str = "mnist"  # an embedded data set (``data.EMBEDDED``)
    zoo_set: str = "default"  # the zoo set its models come from (``pnc zoo build --set``)
    positions: tuple[tuple[int, int], ...] | None = None  # None: ``BenchConfig.positions``

    def config(self, k: int, kt: int, seed: int,
               positions: tuple[tuple[int, int], ...] | None, **kw: Any) -> CloneConfig:
        """The task's ``CloneConfig`` at budget ``k`` (``kt`` target samples) and ``seed``."""
        return CloneConfig(target=self.target, sources=self.sources, per_class=k,
                           target_per_class=kt, seed=seed, positions=positions, **kw)


DEFAULT_TASKS = (
    Task("cnn<-cnn {5,6}", "mnist-cnn-0to4", (SourceSpec("mnist-cnn-5to9", ("5", "6")),),
         "homogeneous"),
    Task("cnn<-resnet {7,8}", "mnist-cnn-0to4", (SourceSpec("mnist-resnet-5to9", ("7", "8")),),
         "heterogeneous"),
    Task("cnn<-cnn {5,6} + resnet {7}", "mnist-cnn-0to4",
         (SourceSpec("mnist-cnn-5to9", ("5", "6")), SourceSpec("mnist-resnet-5to9", ("7",))),
         "two sources"),
)

#: The real-architecture tasks (``pnc bench --tasks rgb``): torchvision models on the
#: colour digits, from ``pnc zoo build --set rgb``.
RGB_TASKS = (
    Task("resnet18<-mobilenet_v3 {5,6}", "rgb-resnet18-0to4",
         (SourceSpec("rgb-mobilenet_v3_small-5to9", ("5", "6")),), "rgb cnn", "rgb-digits", "rgb",
         positions=((7, 7), (6, 7))),  # the winners of the full search (docs/method.md)
    Task("resnet18<-vit {5,6}", "rgb-resnet18-0to4",
         (SourceSpec("rgb-vit-5to9", ("5", "6")),), "rgb cnn <- vit", "rgb-digits", "rgb",
         positions=((9, 6), (8, 6))),  # CNN <- ViT: the full search's winners as well
)
TASK_SETS = {"default": DEFAULT_TASKS, "rgb": RGB_TASKS, "all": DEFAULT_TASKS + RGB_TASKS}


@dataclass(frozen=True)
class BenchConfig:
    """What to run. Defaults are the full run; ``quick()`` is the CI-sized one."""

    mode: str = "full"
    tasks: tuple[Task, ...] = DEFAULT_TASKS
    seeds: tuple[int, ...] = (0, 1, 2)
    # zoos trained from these seeds (``zoo_roots``): issue 14's headline figures are means
    # over 3 zoos as well as 3 clone seeds, since a result on one zoo did not hold on another
    zoo_seeds: tuple[int, ...] = (0, 1, 2)
    budget: int = 20  # k per cloned class for the main table
    target_budgets: tuple[int, ...] = (20, 0)  # the two regimes of method.md
    sweep_budgets: tuple[int, ...] = (5, 10, 20, 50, 100, ALL)
    sweep_task: int = 0  # index into tasks
    sweep_target_budget: int = 20
    sweep_seeds: tuple[int, ...] = (0, 1, 2)
    positions: tuple[tuple[int, int], ...] | None = ((3, 3), (4, 4))
    methods: tuple[str, ...] = METHODS
    tune: TuneConfig = field(default_factory=TuneConfig)
    localize: LocalizeConfig = field(default_factory=LocalizeConfig)  # PNC's own settings:
    insert: InsertConfig = field(default_factory=InsertConfig)  # the defaults, except in tests
    workers: int = 1
    threads_per_worker: int = 2
    # where PNC's own clones compute (``pnc bench --device``, resolved by the CLI); the
    # tuning baselines and the Oracle stay on the CPU, so only PNC's seconds move
    device: str = "cpu"

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise InvalidInputError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
        if not self.tasks or not self.seeds or not self.zoo_seeds:
            raise InvalidInputError("a benchmark needs at least one task, seed and zoo seed")
        if len(set(self.zoo_seeds)) != len(self.zoo_seeds) or min(self.zoo_seeds) < 0:
            raise InvalidInputError(f"zoo seeds {list(self.zoo_seeds)} repeat or are negative")
        if not 0 <= self.sweep_task < len(self.tasks):
            raise InvalidInputError(f"sweep_task {self.sweep_task} is not a task index")
        if self.workers < 1 or self.threads_per_worker < 1:
            raise InvalidInputError("workers and threads per worker must be at least 1")
        bad = [b for b in (self.budget, *self.sweep_budgets) if not 1 <= b <= ALL]
        if bad or any(kt < 0 or kt > ALL for kt in self.target_budgets):
            raise InvalidInputError(f"budgets must be in 1..{ALL} per class, got {bad}")

    @classmethod
    def quick(cls, **kw) -> BenchConfig:
        """Every table, regime and figure on a smaller grid, for CI (target: <= 5 min on 2
        cores; measured 2.5 min with ``--workers 2 --threads 1`` on 2 idle cores)."""
        base = {"mode": "quick", "tasks": DEFAULT_TASKS[::2], "seeds": (0,), "zoo_seeds": (0,),
                "budget": 10,
                "sweep_budgets": (5, 10), "sweep_seeds": (0,), "positions": ((4, 4),),
                "tune": TuneConfig(lrs=(1e-3,), epochs=12, oracle_lrs=(3e-3,), oracle_epochs=2)}
        return cls(**{**base, **kw})


# ----------------------------------------------------------------------------- cells


@dataclass(frozen=True)
class Cell:
    """One unit of work: a task at one seed and budget, or its Oracle."""

    task: int
    seed: int
    budget: int
    target_budget: int
    extras: bool = False  # also measure transmission and the Sim matrix
    oracle: bool = False
    zoo_seed: int = 0  # which zoo (``zoo_roots``); 0 is the zoo the run was given


def plan_cells(cfg: BenchConfig) -> list[Cell]:
    """Main grid, sweep grid (sharing cells with the main grid), and Oracle cells."""
    cells: dict[tuple, Cell] = {}
    first_zoo = cfg.zoo_seeds[0]
    for z in cfg.zoo_seeds:
        for t in range(len(cfg.tasks)):
            for kt in cfg.target_budgets:
                for s in cfg.seeds:
                    cells[(t, s, cfg.budget, kt, z)] = Cell(
                        t, s, cfg.budget, kt, extras=s == cfg.seeds[0] and z == first_zoo,
                        zoo_seed=z)
    for k in cfg.sweep_budgets:  # the budget sweep runs on the first zoo only
        for s in cfg.sweep_seeds:
            key = (cfg.sweep_task, s, k, cfg.sweep_target_budget, first_zoo)
            cells.setdefault(key, Cell(*key[:4], zoo_seed=first_zoo))
    out = list(cells.values())
    if "Oracle" in cfg.methods:
        out += [Cell(t, s, ALL, 0, oracle=True, zoo_seed=z) for z in cfg.zoo_seeds
                for t in range(len(cfg.tasks)) for s in cfg.seeds]
    # seed by seed (a run cut short still reports whole seeds): main table, then sweep
    def order(c: Cell) -> tuple:
        in_main = c.oracle or (c.budget == cfg.budget and c.target_budget in cfg.target_budgets)
        return (c.seed, c.zoo_seed, not in_main, c.oracle, c.task, -c.target_budget, c.budget)

    return sorted(out, key=order)


@functools.lru_cache(maxsize=2)
def _dataset(name: str) -> Dataset:
    return load_dataset(name)


def _row(cell: Cell, task: Task, r: BaselineResult | dict) -> dict:
    if isinstance(r, BaselineResult):
        r = {"method": r.method, "metrics": r.metrics, "bytes": r.bytes,
             "params_modified": r.params_modified, "seconds": r.seconds, "lr": r.lr}
    m = r["metrics"]
    return {"task": task.name, "kind": task.kind, "method": r["method"], "seed": cell.seed,
            "zoo_seed": cell.zoo_seed,
            "budget": "all" if cell.budget >= ALL else cell.budget,
            "target_budget": cell.target_budget,
            **{k: m[k] for k in ("acc_old", "acc_new", "acc_all", "locality", "target_acc_old")},
            "source_acc_new": m.get("source_acc_new"), "bytes": r["bytes"],
            "params_modified": r["params_modified"], "seconds": r["seconds"], "lr": r.get("lr"),
            **{k: m[k] for k in GAP_KEYS if k in m}}  # PNC's clones report where the loss is


def run_cell(zoo_root: str, cfg: BenchConfig, cell: Cell) -> dict:
    """Every method of one cell, in this process. Returns rows plus the cell's extras.

    Runs under ``cfg.threads_per_worker`` intra-op threads and gives the caller's
    count back, so a cell run in process leaves the process's arithmetic as it was.
    """
    with torch_threads(cfg.threads_per_worker):
        return _run_cell(zoo_root, cfg, cell)


def clone_config_of(cfg: BenchConfig, cell: Cell) -> CloneConfig:
    """The ``pnc clone`` settings of ``cell``'s PNC clone (its draw is every method's)."""
    task = cfg.tasks[cell.task]
    return task.config(cell.budget, cell.target_budget, cell.seed,
                       task.positions or cfg.positions,
                       localize=cfg.localize, insert=cfg.insert, device=cfg.device)


def _run_cell(zoo_root: str, cfg: BenchConfig, cell: Cell) -> dict:
    task = cfg.tasks[cell.task]
    zoo, data = Zoo(zoo_root), _dataset(task.data)
    t0, cpu0 = time.perf_counter(), time.process_time()
    clone_cfg = clone_config_of(cfg, cell)
    td = task_data(zoo, data, clone_cfg)
    if cell.oracle:
        oracle = _row(cell, task, run_oracle(td, data, cfg.tune, cell.seed))
        return {"cell": asdict(cell), "rows": [oracle], "seconds": time.perf_counter() - t0,
                "cpu_seconds": time.process_time() - cpu0, "threads": cfg.threads_per_worker}
    rows: list[dict] = []
    out: dict[str, Any] = {"cell": asdict(cell)}
    pnc = clone(zoo, data, clone_cfg)
    package_bytes = len(wire.encode(pnc.package))
    trainable = sum(t.numel() for m in pnc.package.modules for t in m.tensors.values())
    if "PNC" in cfg.methods:
        rows.append(_row(cell, task, {"method": "PNC", "metrics": pnc.report["metrics"],
                                      "bytes": package_bytes, "params_modified": trainable,
                                      "seconds": pnc.report["seconds"]}))
    if "PNC-F" in cfg.methods:
        rows.append(_row(cell, task, run_pnc_f(pnc.superbody, td, data, cfg.tune, cell.seed,
                                               package_bytes, pnc.report["seconds"])))
    for method in (m for m in TUNING_METHODS if m in cfg.methods):
        rows.append(_row(cell, task, run_tuning(method, td, data, cfg.tune, cell.seed)))
    if cell.extras:
        out["transmission"] = {"task": task.name, "target_budget": cell.target_budget,
                               **transmission_of(zoo, pnc, rows, data)}
        out["sim"] = {"task": task.name, "target_budget": cell.target_budget,
                      "modules": sim_of(zoo, pnc, data)}
        out["positions"] = [[m.position_r, m.position_s] for m in pnc.package.modules]
    out.update(rows=rows, seconds=time.perf_counter() - t0, finished_unix_s=time.time(),
               cpu_seconds=time.process_time() - cpu0, threads=cfg.threads_per_worker)
    return out


# ----------------------------------------------------------------------------- reduce


def _mean_std(values: list[float | None]) -> tuple[float, float]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), statistics.pstdev(vals) if len(vals) > 1 else 0.0


def aggregate(raw: list[dict], task_order: tuple[str, ...] = (),
              per_zoo_seed: bool = False) -> list[dict]:
    """Mean and std over seeds (clone seeds and zoo seeds together) for every
    (task, method, budget, target_budget); with ``per_zoo_seed``, one row per zoo seed."""
    groups: dict[tuple, list[dict]] = {}
    for r in raw:
        zoo = r.get("zoo_seed", 0) if per_zoo_seed else None
        groups.setdefault((r["task"], r["method"], r["budget"], r["target_budget"], zoo),
                          []).append(r)
    out = []
    for (task, method, budget, kt, _zoo), rs in groups.items():
        row = {"task": task, "kind": rs[0]["kind"], "method": method, "budget": budget,
               "target_budget": kt, "seeds": sorted(r["seed"] for r in rs),
               "zoo_seeds": sorted({r.get("zoo_seed", 0) for r in rs}),
               "lrs": [r["lr"] for r in rs]}
        for k in (*METRICS, "target_acc_old", "source_acc_new"):
            row[k], row[f"{k}_std"] = _mean_std([r[k] for r in rs])
        for k in (k for k in GAP_KEYS if any(k in r for r in rs)):
            row[k], row[f"{k}_std"] = _mean_std([r.get(k) for r in rs])
        if per_zoo_seed:  # the worst single run, which issue 14's k_t = 0 target bounds
            row["locality_min"] = min(float(r["locality"]) for r in rs)
        out.append(row)
    order = {m: i for i, m in enumerate(METHODS)}
    tasks = {t: i for i, t in enumerate(task_order)}
    return sorted(out, key=lambda r: (tasks.get(r["task"], len(tasks)), r["task"],
                                      -r["target_budget"], ALL if r["budget"] == "all"
                                      else r["budget"], order[r["method"]], r["zoo_seeds"]))


def oracle_everywhere(raw: list[dict], cfg: BenchConfig) -> list[dict]:
    """The Oracle ignores the budget: it is reported beside every (budget, k_t) of its task."""
    oracle = [r for r in raw if r["method"] == "Oracle"]
    others = [r for r in raw if r["method"] != "Oracle"]
    slots = {(r["task"], r["budget"], r["target_budget"], r["seed"], r.get("zoo_seed", 0))
             for r in others}
    extra = [{**o, "budget": b, "target_budget": kt} for o in oracle
             for (t, b, kt, s, z) in sorted(slots, key=str)
             if t == o["task"] and s == o["seed"] and z == o.get("zoo_seed", 0)]
    return others + extra


# ----------------------------------------------------------------------------- run


def run_cells(zoo_roots: Mapping[int, str], cfg: BenchConfig, cells: list[Cell],
              on_done: Callable[[dict], None] | None = None) -> list[dict]:
    """Run ``cells`` (in ``cfg.workers`` spawned processes), each on the zoo of its zoo
    seed; ``on_done`` sees each as it ends."""
    say = on_done or (lambda _r: None)
    outs = []
    if cfg.workers == 1:
        for c in cells:
            outs.append(run_cell(zoo_roots[c.zoo_seed], cfg, c))
            say(outs[-1])
        return outs
    with ProcessPoolExecutor(cfg.workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_cell, zoo_roots[c.zoo_seed], cfg, c) for c in cells]
        for f in as_completed(futures):
            outs.append(f.result())
            say(outs[-1])
    return outs


def cell_key(cell: Cell | dict) -> str:
    """A cell's identity in a checkpoint file: its fields as sorted JSON (a cell written
    before zoo seeds existed is of zoo seed 0)."""
    fields = asdict(cell) if isinstance(cell, Cell) else {"zoo_seed": 0, **cell}
    return json.dumps(fields, sort_keys=True)


def read_checkpoint(path: Path) -> dict[str, dict]:
    """Finished cells from a ``*.cells.jsonl`` file (a torn last line is ignored)."""
    done: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[cell_key(out["cell"])] = out
    return done


def append_checkpoint(path: Path, out: dict) -> None:
    """Append one finished cell as a JSON line, fsynced so a crash keeps it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(out, sort_keys=True, default=float) + "\n")
        f.flush()
        os.fsync(f.fileno())


def zoo_seed_of(zoo: Zoo, cfg: BenchConfig) -> int | None:
    """The seed that trained ``zoo``'s copy of the first task's target (None: not there)."""
    have = {m.name: m for m in zoo.manifests()}
    target = have.get(cfg.tasks[0].target)
    return None if target is None else int(target.recipe.get("seed", 0))


def seeded_zoos(zoo: Zoo, cfg: BenchConfig, home: Path,
                say: Callable[[str], None] | None = None) -> dict[int, Path]:
    """One zoo per zoo seed, with every model the tasks need, trained where missing.

    The zoo seed that trained ``zoo`` (0 when it is empty) is ``zoo`` itself; every
    other seed gets ``home/zoo-seed<N>``, trained by ``build_default_zoo`` from
    that seed (about a minute per MNIST zoo on 2 cores, longer for ``--set rgb``).
    """
    own = zoo_seed_of(zoo, cfg) or 0
    roots = {}
    for z in cfg.zoo_seeds:
        root = zoo.root if z == own else home / f"zoo-seed{z}"
        for zoo_set in sorted({t.zoo_set for t in cfg.tasks}):
            data_name, specs = ZOO_SETS[zoo_set]
            built = build_default_zoo(Zoo(root), load_dataset(data_name), progress=False,
                                      seed=z, specs=specs)
            for manifest, new in built:
                if new and say:
                    say(f"built zoo model {manifest.name} (zoo seed {z}) in {root}")
        roots[z] = Path(root)
    return roots


def run_bench(zoo: Zoo, cfg: BenchConfig, on_done: Callable[[dict], None] | None = None,
              checkpoint: Path | None = None, resume: bool = False,
              run_missing: bool = True, zoo_roots: Mapping[int, Path] | None = None) -> dict:
    """Run every cell and reduce. The returned dict is what ``bench/results/*.json`` holds.

    ``zoo_roots`` maps each of ``cfg.zoo_seeds`` to its zoo (``seeded_zoos``); without
    it every zoo seed is ``zoo``. With ``checkpoint``, each finished cell is appended
    there as it ends; ``resume`` reuses the cells already in it, and
    ``run_missing=False`` only reduces them.
    """
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    roots = {z: str((zoo_roots or {}).get(z, zoo.root)) for z in cfg.zoo_seeds}
    cells = plan_cells(cfg)
    if checkpoint is not None and not resume and checkpoint.exists():
        checkpoint.unlink()
    done = read_checkpoint(checkpoint) if checkpoint is not None else {}
    todo = [c for c in cells if cell_key(c) not in done] if run_missing else []

    def finished(out: dict) -> None:
        if checkpoint is not None:
            append_checkpoint(checkpoint, out)
        (on_done or (lambda _o: None))(out)

    new = run_cells(roots, cfg, todo, finished)
    wanted = {cell_key(c) for c in cells}
    outs = [o for k, o in done.items() if k in wanted] + new
    raw = [r for o in outs for r in o["rows"]]
    spread = oracle_everywhere(raw, cfg)
    rows = aggregate(spread, tuple(t.name for t in cfg.tasks))
    task_index = {t.name: i for i, t in enumerate(cfg.tasks)}

    def by_task(items: list[dict]) -> list[dict]:
        return sorted(items, key=lambda d: (task_index.get(d["task"], 99), -d["target_budget"]))

    main = [r for r in rows if r["budget"] == cfg.budget]
    sweep_task = cfg.tasks[cfg.sweep_task].name
    sweep = [r for r in rows if r["task"] == sweep_task
             and r["target_budget"] == cfg.sweep_target_budget]
    return {
        "mode": cfg.mode, "config": _config_summary(cfg),
        "machine": {**_machine(cfg), "load_1min_before": load_before,
                    "load_1min_after": os.getloadavg()[0]},
        "rows": main, "sweep": sweep, "raw": raw,
        "by_zoo_seed": [r for r in aggregate(spread, tuple(t.name for t in cfg.tasks),
                                             per_zoo_seed=True) if r["budget"] == cfg.budget],
        "zoo_roots": {str(z): root for z, root in roots.items()},
        "transmission": by_task([o["transmission"] for o in outs if "transmission" in o]),
        "sim": by_task([o["sim"] for o in outs if "sim" in o]),
        "cells_planned": len(cells), "cells_done": len(outs),
        "cell_seconds": sum(o["seconds"] for o in outs),
        "cell_cpu_seconds": sum(o.get("cpu_seconds", 0.0) for o in outs),
        "cells_with_cpu_seconds": sum("cpu_seconds" in o for o in outs),
        "wall_seconds": time.perf_counter() - started,
    }


#: what ``--reduce-only`` keeps from the run that computed the cells (``with_run_facts``)
RUN_FACTS = ("machine", "wall_seconds", "zoo_roots")


def with_run_facts(reduced: dict, earlier: dict) -> dict:
    """``reduced`` (cells reduced again, e.g. after some were rerun) with the facts of the
    run that computed them from ``earlier``, its result: the machine, workers and load,
    the wall time and the zoo folders describe that run, not the seconds of reducing."""
    return {**reduced, **{k: earlier[k] for k in RUN_FACTS if k in earlier}}


def _config_summary(cfg: BenchConfig) -> dict:
    d = asdict(cfg)
    if d["device"] == "cpu":  # the summaries of CPU runs stay what they were
        d.pop("device")
    d["tasks"] = [{"name": t.name, "kind": t.kind, "target": t.target, "data": t.data,
                   "zoo_set": t.zoo_set,
                   "sources": [[s.source, list(s.classes)] for s in t.sources]} for t in cfg.tasks]
    d["budget_all"] = ALL
    return d


def _machine(cfg: BenchConfig) -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
            "workers": cfg.workers, "threads_per_worker": cfg.threads_per_worker,
            "python": platform.python_version()}

