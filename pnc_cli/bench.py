"""``pnc bench``: PNC against FT, LwF, KD, PNC-F and the Oracle, with figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from pnc_cli.common import JsonOpt, ZooOpt, console, err_console, print_json
from pnc_net.errors import InvalidInputError

OutOpt = Annotated[Path, typer.Option("--out", help="Folder for the JSON and PNG results.")]
BenchDeviceOpt = Annotated[str, typer.Option(
    "--device", metavar="auto|cpu|cuda[:N]",
    help="Where PNC's clones compute (cpu, the default, reproduces the published cells; "
         "auto takes the first GPU when there is one). The tuning baselines and the "
         "Oracle stay on the CPU, so with a GPU only PNC's seconds are comparable to a "
         "GPU baseline's, not to these.")]


def _fmt(row: dict, key: str, digits: int = 3) -> str:
    return f"{row[key]:.{digits}f} ± {row[key + '_std']:.{digits}f}"


def _size(n: float) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MiB"


def print_table(result: dict) -> None:
    table = Table(title=f"pnc bench ({result['mode']}): k = {result['config']['budget']} per "
                        f"cloned class, mean ± std over {len(result['config']['seeds'])} seed(s)")
    for col in ("task", "k_t", "method", "acc_old", "acc_new", "acc_all", "locality",
                "params modified", "bytes", "seconds"):
        table.add_column(col, justify="left" if col in ("task", "method") else "right")
    for r in result["rows"]:
        table.add_row(r["task"], str(r["target_budget"]), r["method"], _fmt(r, "acc_old"),
                      _fmt(r, "acc_new"), _fmt(r, "acc_all"), _fmt(r, "locality"),
                      f"{r['params_modified']:,.0f}", _size(r["bytes"]), f"{r['seconds']:.1f}")
    console.print(table)


def bench(
    quick: Annotated[bool, typer.Option(
        "--quick", help="The CI-sized run: 2 tasks, 1 seed, small budgets.")] = False,
    out: OutOpt = Path("bench/results"),
    workers: Annotated[int, typer.Option("--workers", help="Worker processes for the cells.")] = 1,
    threads: Annotated[int, typer.Option("--threads", help="Torch threads per worker.")] = 2,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Reuse the cells already finished in --out (a run cut short).")] = False,
    reduce_only: Annotated[bool, typer.Option(
        "--reduce-only", help="Run nothing: report the finished cells in --out (the machine, wall "
        "time and zoo folders stay those of the run that wrote them).")] = False,
    zoo_seeds: Annotated[str, typer.Option(
        "--zoo-seeds", help="Comma-separated zoo seeds, e.g. 0,1,2 (the full run's default; "
        "--quick: 0): the tasks run on a zoo trained from each (the --zoo for its own seed, "
        "--out/zoo-seed<N> for the others, trained when missing); rows are means over zoo "
        "and clone seeds, and by_zoo_seed in the JSON gives each zoo's.",
        show_default=False)] = "",
    tasks: Annotated[str, typer.Option(
        "--tasks", help="default: the MNIST tasks; rgb: torchvision resnet18 <- "
        "mobilenet_v3_small on the colour digits (trains the rgb zoo set when missing; "
        "slow on CPU); all: both.")] = "default",
    sweep_budgets: Annotated[str, typer.Option(
        "--sweep-budgets", help="Comma-separated k of the budget sweep, 'all' for every "
        "sample (the full run's default: 5,10,20,50,100,all; --quick: 5,10). Give only the "
        "main table's k (20) to skip the sweep: on the rgb task each sweep cell takes "
        "minutes.", show_default=False)] = "",
    methods: Annotated[str, typer.Option(
        "--methods", help="Comma-separated methods to run, from PNC, PNC-F, FT, LwF, KD, "
        "Oracle (default: all). The Oracle trains the target's architecture from scratch on "
        "the whole train split: on the rgb task, a resnet18 for many minutes a seed.",
        show_default=False)] = "",
    zoo_dir: ZooOpt = None,
    device: BenchDeviceOpt = "cpu",
    json_out: JsonOpt = False,
) -> None:
    """Benchmark PNC against the tuning baselines; write JSON + PNG results to --out."""
    from pnc_net.bench.harness import (
        ALL,
        TASK_SETS,
        BenchConfig,
        run_bench,
        seeded_zoos,
        with_run_facts,
    )
    from pnc_net.bench.plots import write_figures
    from pnc_net.devices import resolve_device
    from pnc_net.fsutil import atomic_write_bytes
    from pnc_net.zoo import Zoo

    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"--out {out} exists and is not a folder")
    if tasks not in TASK_SETS:
        raise InvalidInputError(f"--tasks {tasks!r} is not a task set; choose "
                                f"{', '.join(TASK_SETS)}")
    make = BenchConfig.quick if quick else BenchConfig
    cfg = make(workers=workers, threads_per_worker=threads, device=resolve_device(device),
               **({"zoo_seeds": _seeds(zoo_seeds)} if zoo_seeds else {}),
               **({"sweep_budgets": _budgets(sweep_budgets, ALL)} if sweep_budgets else {}),
               **({"methods": _methods(methods)} if methods else {}),
               **({} if tasks == "default" else {"tasks": TASK_SETS[tasks]}))
    zoo = Zoo(zoo_dir)
    roots = seeded_zoos(zoo, cfg, out, lambda msg: err_console.print(msg, highlight=False))

    def progress(cell_out: dict) -> None:
        c = cell_out["cell"]
        what = "Oracle" if c["oracle"] else f"k={c['budget']} k_t={c['target_budget']}"
        err_console.print(f"task {c['task']} zoo seed {c.get('zoo_seed', 0)} seed {c['seed']} "
                          f"{what}: "
                          f"{cell_out['seconds']:.0f}s", highlight=False)

    checkpoint = out / f"{cfg.mode}.cells.jsonl"
    if reduce_only and not checkpoint.exists():
        raise InvalidInputError(f"--reduce-only: no finished cells in {checkpoint}")
    result = run_bench(zoo, cfg, progress, checkpoint=checkpoint, resume=resume or reduce_only,
                       run_missing=not reduce_only, zoo_roots=roots)
    path = out / f"{cfg.mode}.json"
    if reduce_only and path.exists():
        result = with_run_facts(result, _earlier_result(path))
    result["files"] = write_figures(result, out)
    atomic_write_bytes(path, json.dumps(result, indent=1, sort_keys=True, default=float).encode())
    if json_out:
        print_json({k: v for k, v in result.items() if k != "raw"} | {"json": str(path)})
        return
    print_table(result)
    console.print(f"results: {path}, figures: {', '.join(result['files'].values())} "
                  f"({result['cells_done']}/{result['cells_planned']} cells, "
                  f"{result['wall_seconds']:.0f}s)")


def _earlier_result(path: Path) -> dict:
    """The result a run wrote to ``path`` (``{}`` when it is not readable JSON)."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return earlier if isinstance(earlier, dict) else {}


def _methods(text: str) -> tuple[str, ...]:
    """``--methods``: names checked by ``BenchConfig``. PNC's clone runs in every cell
    (PNC-F tunes its superbody); its row is reported only when PNC is named."""
    names = tuple(p.strip() for p in text.split(",") if p.strip())
    if not names:
        raise InvalidInputError("--methods names no method; give e.g. PNC,FT,LwF")
    return names


def _budgets(text: str, every: int) -> tuple[int, ...]:
    """``--sweep-budgets``: integers, or ``all`` for ``every`` (the run's "all" budget)."""
    try:
        budgets = tuple(every if p.strip() == "all" else int(p)
                        for p in text.split(",") if p.strip())
    except ValueError:
        raise InvalidInputError(f"--sweep-budgets {text!r} is not a list like 5,10,20,all"
                                ) from None
    if not budgets:
        raise InvalidInputError("--sweep-budgets names no budget; give e.g. 20 or 5,10,20")
    return budgets


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise InvalidInputError(f"--zoo-seeds {text!r} is not a list of integers like 0,1,2"
                                ) from None
    if not seeds:
        raise InvalidInputError("--zoo-seeds names no seed; give e.g. 0 or 0,1,2")
    return seeds


def register(app: typer.Typer) -> None:
    """Add ``pnc bench`` to ``app``."""
    app.command("bench")(bench)
