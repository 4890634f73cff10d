"""The benchmark's figures (PNG), drawn from the saved result dict only.

``plot_sweep``: ``acc_all`` and ``locality`` against the per-class budget, one
line per method (mean over seeds, bars = std), the Oracle as a dashed level.
``plot_sim``: the article's ``Sim`` figure: for each cloned module, the cosine
similarity between the module's and the full source's penultimate features,
per class (bars) and as a class-by-class matrix of mean features (heat map).
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from pnc_net.fsutil import atomic_write_bytes

COLORS = {"PNC": "#1b7837", "PNC-F": "#7fbf7b", "FT": "#d6604d", "LwF": "#4393c3",
          "KD": "#9970ab", "Oracle": "#444444"}


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _budget_x(budget, all_value: int) -> int:
    return all_value if budget == "all" else int(budget)


def plot_sweep(result: dict, path: Path) -> Path:
    """``acc_all`` and ``locality`` vs budget per method, for the sweep task."""
    rows, all_value = result["sweep"], result["config"]["budget_all"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    methods = [m for m in COLORS if any(r["method"] == m for r in rows)]
    for ax, metric in zip(axes, ("acc_all", "locality")):
        for m in methods:
            pts = sorted((_budget_x(r["budget"], all_value), r[metric], r[f"{metric}_std"])
                         for r in rows if r["method"] == m)
            xs, ys, es = zip(*pts)
            if m == "Oracle":
                ax.axhline(ys[0], color=COLORS[m], ls="--", lw=1, label="Oracle (all data)")
                continue
            ax.errorbar(xs, ys, yerr=es, color=COLORS[m], marker="o", ms=4, capsize=2,
                        lw=2 if m == "PNC" else 1.3, label=m)
        ticks = sorted({_budget_x(r["budget"], all_value) for r in rows})
        ax.set_xscale("log")
        ax.set_xticks(ticks, [("all" if t == all_value else str(t)) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("cloning samples per cloned class (k)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    if rows:
        r0 = rows[0]
        fig.suptitle(f"{r0['task']}, k_t = {r0['target_budget']}, mean ± std over "
                     f"{len(r0['seeds'])} seed(s)", fontsize=10)
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=8)
    return _save(fig, path)


def plot_sim(result: dict, path: Path) -> Path:
    """Per-class Sim bars and the class-by-class Sim matrix of every module of every task
    (in the first regime of the run)."""
    kt = result["sim"][0]["target_budget"] if result["sim"] else None
    sims = [(s["task"], m) for s in result["sim"] if s["target_budget"] == kt for m in s["modules"]]
    fig, axes = plt.subplots(max(1, len(sims)), 2, figsize=(10, 3.4 * max(1, len(sims))),
                             squeeze=False, layout="constrained")
    for (bar_ax, mat_ax), (task, sim) in zip(axes, sims):
        labels, cloned = sim["labels"], set(sim["cloned"])
        colors = ["#1b7837" if lab in cloned else "#bbbbbb" for lab in labels]
        bar_ax.bar(labels, sim["per_class"], color=colors)
        bar_ax.set_ylim(min(0.0, min(sim["per_class"])), 1.0)
        if (bar_ax, mat_ax) == tuple(axes[-1]):
            bar_ax.set_xlabel("class of the test samples (green: cloned)")
            mat_ax.set_xlabel("source: class-mean feature")
        bar_ax.set_ylabel("Sim (cosine, module vs source)")
        bar_ax.set_title(f"task {task}: module from {sim['source']}, cloned "
                         f"{','.join(sim['cloned'])}", fontsize=9)
        im = mat_ax.imshow(sim["matrix"], cmap="viridis", vmin=-1, vmax=1)
        mat_ax.set_xticks(range(len(labels)), labels)
        mat_ax.set_yticks(range(len(labels)), labels)
        mat_ax.set_ylabel("module: class-mean feature")
        fig.colorbar(im, ax=mat_ax, fraction=0.046)
    if sims:
        fig.suptitle(f"Sim: transferable module vs its full source (test split, k_t = {kt})",
                     fontsize=10)
    return _save(fig, path)


def write_figures(result: dict, out_dir: Path) -> dict[str, str]:
    """Both figures into ``out_dir``; returns their file names."""
    mode = result["mode"]
    files = {"sweep": f"{mode}_budget_sweep.png", "sim": f"{mode}_sim_matrix.png"}
    plot_sweep(result, out_dir / files["sweep"])
    plot_sim(result, out_dir / files["sim"])
    return files
