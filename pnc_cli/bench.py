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
        "--reduce-only", help="Run nothing: report the finished cells in --out.")] = False,
    zoo_dir: ZooOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Benchmark PNC against the tuning baselines; write JSON + PNG results to --out."""
    from pnc_net.bench.harness import BenchConfig, run_bench
    from pnc_net.bench.plots import write_figures
    from pnc_net.data import load_mnist
    from pnc_net.fsutil import atomic_write_bytes
    from pnc_net.zoo import Zoo
    from pnc_net.zoo_train import build_default_zoo

    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"--out {out} exists and is not a folder")
    make = BenchConfig.quick if quick else BenchConfig
    cfg = make(workers=workers, threads_per_worker=threads)
    zoo = Zoo(zoo_dir)
    for manifest, new in build_default_zoo(zoo, load_mnist(), progress=False):
        if new:
            err_console.print(f"built zoo model {manifest.name}")

    def progress(cell_out: dict) -> None:
        c = cell_out["cell"]
        what = "Oracle" if c["oracle"] else f"k={c['budget']} k_t={c['target_budget']}"
        err_console.print(f"task {c['task']} seed {c['seed']} {what}: "
                          f"{cell_out['seconds']:.0f}s", highlight=False)

    checkpoint = out / f"{cfg.mode}.cells.jsonl"
    if reduce_only and not checkpoint.exists():
        raise InvalidInputError(f"--reduce-only: no finished cells in {checkpoint}")
    result = run_bench(zoo, cfg, progress, checkpoint=checkpoint, resume=resume or reduce_only,
                       run_missing=not reduce_only)
    result["files"] = write_figures(result, out)
    path = out / f"{cfg.mode}.json"
    atomic_write_bytes(path, json.dumps(result, indent=1, sort_keys=True, default=float).encode())
    if json_out:
        print_json({k: v for k, v in result.items() if k != "raw"} | {"json": str(path)})
        return
    print_table(result)
    console.print(f"results: {path}, figures: {', '.join(result['files'].values())} "
                  f"({result['cells_done']}/{result['cells_planned']} cells, "
                  f"{result['wall_seconds']:.0f}s)")


def register(app: typer.Typer) -> None:
    """Add ``pnc bench`` to ``app``."""
    app.command("bench")(bench)
