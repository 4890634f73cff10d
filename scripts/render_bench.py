#!/usr/bin/env python3
"""Regenerate the README's benchmark section from ``bench/results/*.json`` and PNGs.

Everything between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` in
README.md is replaced; nothing there is typed by hand except ``bench/notes.md``
(the reading of the figures), which is included verbatim. The full run's
results are used when present, else the quick run's.

    python scripts/render_bench.py            # rewrite README.md
    python scripts/render_bench.py --check    # exit 1 if README.md is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
TUNING = ("FT", "LwF", "KD")


def pm(r: dict, key: str, digits: int = 3) -> str:
    return f"{r[key]:.{digits}f} ± {r[key + '_std']:.{digits}f}"


def size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MiB"


def main_tables(res: dict) -> list[str]:
    out = []
    for kt in res["config"]["target_budgets"]:
        rows = [r for r in res["rows"] if r["target_budget"] == kt]
        regime = (f"k_t = {kt} target-class samples per class" if kt else
                  "k_t = 0: no target-class samples (the article's setting)")
        out += [f"**{regime}**, k = {res['config']['budget']} per cloned class:", "",
                ("| task | method | acc_old | acc_new | acc_all | locality | params modified "
                 "| bytes that travel | seconds | seeds |"), "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            name = f"**{r['method']}**" if r["method"] == "PNC" else r["method"]
            out.append(f"| {r['task']} | {name} | {pm(r, 'acc_old')} | {pm(r, 'acc_new')} | "
                       f"{pm(r, 'acc_all')} | {pm(r, 'locality')} | {r['params_modified']:,.0f} | "
                       f"{size(r['bytes'])} | {r['seconds']:.0f} ± {r['seconds_std']:.0f} | "
                       f"{len(r['seeds'])} |")
        out.append("")
    return out


def sweep_table(res: dict) -> list[str]:
    rows = res["sweep"]
    budgets = sorted({r["budget"] for r in rows}, key=lambda b: 10**9 if b == "all" else b)
    methods = [m for m in ("PNC", "PNC-F", "FT", "LwF", "KD", "Oracle")
               if any(r["method"] == m for r in rows)]
    out = ["| method | " + " | ".join(f"k={b}" for b in budgets) + " |",
           "|---|" + "---|" * len(budgets)]
    for m in methods:
        cells = []
        for b in budgets:
            r = next((r for r in rows if r["method"] == m and r["budget"] == b), None)
            cells.append("–" if r is None else f"{r['acc_all']:.3f} / {r['locality']:.3f}")
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    return out + ["", "(each cell: acc_all / locality, mean over seeds)", ""]


def transmission_table(res: dict) -> list[str]:
    out = [("| task | k_t | package (fp16) | package (int8) | superbody fp32 | full cloned model, "
            "zstd fp16 | information bound (mask entropy + adapter + fusion) | smallest tuning "
            "delta | ratio | encode | decode | rebuild |"), "|---|" + "---|" * 11]
    for t in res["transmission"]:
        ratio = t.get("smallest_tuning_over_package")
        tuning = min(t["tuning_bytes"].values()) if t["tuning_bytes"] else None
        out.append(
            f"| {t['task']} | {t['target_budget']} | {size(t['package_bytes'])} | "
            f"{size(t['package_int8_bytes'])}{int8_cost(t)} | {size(t['superbody_bytes'])} | "
            f"{size(t['full_model_zstd_fp16_bytes'])} | {size(t['bound_bytes'])} "
            f"({size(t['mask_entropy_bytes'])} + {size(t['adapter_fp16_bytes'])} + "
            f"{size(t['fusion_fp16_bytes'])}) | {size(tuning) if tuning else '–'} | "
            f"{f'{ratio:.0f}×' if ratio else '–'} | {t['encode_ms']:.1f} ms | "
            f"{t['decode_ms']:.1f} ms | {t['rebuild_ms']:.0f} ms |")
    return out + [""]


def int8_cost(t: dict) -> str:
    """acc_all / locality of the rebuilt int8 package against the fp16 one, when measured."""
    if "int8_acc_all" not in t:
        return ""
    return (f" (acc_all {t['int8_acc_all']:.3f} vs {t['fp16_acc_all']:.3f} at fp16, "
            f"locality {t['int8_locality']:.3f} vs {t['fp16_locality']:.3f})")


def verdicts(res: dict) -> list[str]:
    """The issue's targets, checked against the numbers (no judgement typed by hand)."""
    out = ["Target: at budgets k <= 20, PNC's locality and acc_all clearly above FT, LwF and KD.",
           "", "| task | k | k_t | metric | PNC | best of FT/LwF/KD | PNC minus best |",
           "|---|---|---|---|---|---|---|"]
    rows = res["rows"] + res["sweep"]
    order = {t["name"]: i for i, t in enumerate(res["config"]["tasks"])}
    small = [(r["task"], r["budget"], r["target_budget"]) for r in rows
             if r["method"] == "PNC" and r["budget"] != "all" and r["budget"] <= 20]
    for key in sorted(set(small), key=lambda k: (order.get(k[0], 99), -k[2], k[1])):
        pnc = next(r for r in rows if (r["task"], r["budget"], r["target_budget"]) == key
                   and r["method"] == "PNC")
        peers = [r for r in rows if (r["task"], r["budget"], r["target_budget"]) == key
                 and r["method"] in TUNING]
        if not peers:
            continue
        for metric in ("locality", "acc_all"):
            best = max(peers, key=lambda r: r[metric])
            diff = pnc[metric] - best[metric]
            word = "higher" if diff > 0 else "**lower**" if diff < 0 else "equal"
            out.append(f"| {key[0]} | {key[1]} | {key[2]} | {metric} | {pnc[metric]:.3f} | "
                       f"{best[metric]:.3f} ({best['method']}) | {diff:+.3f}: {word} |")
    out += ["", "Target: a package at least 100× smaller than what the tuning baselines send.", ""]
    for t in res["transmission"]:
        ratio = t.get("smallest_tuning_over_package")
        if ratio:
            ok = "meets" if ratio >= 100 else "MISSES"
            out.append(f"- {t['task']}, k_t={t['target_budget']}: the smallest tuning delta is "
                       f"{ratio:.0f}× the PNC package (fp16): {ok} the 100× target; "
                       f"{ratio * t['package_bytes'] / t['package_int8_bytes']:.0f}× the int8 "
                       "package (deltas stay fp16 there, so that one favours PNC)")
    return out


def zoo_table(res: dict) -> list[str]:
    """PNC on each zoo seed, with the gap decomposition (issue 14: a figure that holds on
    one zoo must hold on another)."""
    rows = [r for r in res.get("by_zoo_seed", []) if r["method"] == "PNC"]
    if not rows or "routing_error_new" not in rows[0]:
        return []
    out = [("| task | k_t | zoo seed | acc_old (target's) | acc_new (source's) | locality "
            "(worst run) | routing error old / new | branch error new |"), "|---|" + "---|" * 7]
    for r in rows:
        out.append(
            f"| {r['task']} | {r['target_budget']} | {r['zoo_seeds'][0]} | {r['acc_old']:.3f} "
            f"({r['target_acc_old']:.3f}) | {r['acc_new']:.3f} ({r['source_acc_new']:.3f}) | "
            f"{r['locality']:.3f} ({r['locality_min']:.3f}) | {r['routing_error_old']:.3f} / "
            f"{r['routing_error_new']:.3f} | {r['branch_error_new']:.3f} |")
    return out + ["", "(means over the clone seeds of each zoo; routing error new + branch "
                  "error new = 1 - acc_new)", ""]


def check(ok: bool) -> str:
    """A target's verdict as the README writes it."""
    return "met" if ok else "**not met**"


def zoo_verdicts(res: dict) -> list[str]:
    """Issue 14's targets on the first task, checked against the numbers."""
    task = res["config"]["tasks"][0]["name"]
    rows = [r for r in res["rows"] if r["task"] == task]
    zoo_rows = [r for r in res.get("by_zoo_seed", []) if r["task"] == task and r["method"] == "PNC"]
    if len(res["config"]["zoo_seeds"]) < 3 or not zoo_rows:
        return []

    out = [f"Targets of issue 14 on {task}, k = {res['config']['budget']}, means over zoo seeds "
           f"{res['config']['zoo_seeds']} and clone seeds {res['config']['seeds']}:", ""]
    pnc = next((r for r in rows if r["method"] == "PNC" and r["target_budget"] > 0), None)
    if pnc is not None:
        peers = [r for r in rows if r["target_budget"] == pnc["target_budget"]
                 and r["method"] in TUNING]
        best = max(peers, key=lambda r: r["locality"]) if peers else None
        spread = max((r["locality_std"] for r in peers), default=0.0)
        out += [
            f"- k_t = {pnc['target_budget']}: locality {pnc['locality']:.4f} >= 0.99: "
            f"{check(pnc['locality'] >= 0.99)}",
            f"- k_t = {pnc['target_budget']}: acc_old {pnc['acc_old']:.4f} >= target's "
            f"{pnc['target_acc_old']:.4f} - 0.005: "
            f"{check(pnc['acc_old'] >= pnc['target_acc_old'] - 0.005)}",
            f"- k_t = {pnc['target_budget']}: acc_new {pnc['acc_new']:.4f} >= source's "
            f"{pnc['source_acc_new']:.4f} - 0.02: "
            f"{check(pnc['acc_new'] >= pnc['source_acc_new'] - 0.02)}"
            + oracle_note(rows, pnc, "acc_new")]
        if best is not None:
            margin = pnc["locality"] - best["locality"]
            out.append(f"- k_t = {pnc['target_budget']}: locality above the best tuning baseline "
                       f"({best['method']}, {best['locality']:.4f}) by {margin:+.4f}, more than "
                       f"their largest spread over seeds ({spread:.4f}): {check(margin > spread)}")
    free = [r for r in zoo_rows if r["target_budget"] == 0]
    if free:
        per_zoo = ", ".join(f"{r['locality']:.3f}" for r in free)
        worst = min(r["locality_min"] for r in free)
        out += [f"- k_t = 0: locality >= 0.985 on every zoo seed ({per_zoo}): "
                f"{check(all(r['locality'] >= 0.985 for r in free))}",
                f"- k_t = 0: never below 0.95 in a single run (worst {worst:.3f}): "
                f"{check(worst >= 0.95)}"]
    return out + [""]


def oracle_note(rows: list[dict], row: dict, *metrics: str) -> str:
    """What the Oracle (the target's architecture trained on the full train split of every
    class) reached on ``metrics`` in ``row``'s task: the ceiling a bar is read against."""
    oracle = next((r for r in rows if r["method"] == "Oracle" and r["task"] == row["task"]
                   and r["target_budget"] == row["target_budget"]), None)
    if oracle is None:
        return ""
    return (" (the Oracle, every class on the full train split: "
            + ", ".join(f"{m} {oracle[m]:.3f}" for m in metrics) + ")")


def partial_note(res: dict) -> list[str]:
    if res["cells_done"] >= res["cells_planned"]:
        return []
    return [(f"**Partial run: {res['cells_done']} of {res['cells_planned']} cells finished** "
             "(cells run seed by seed; the `seeds` column says how many seeds each row "
             "averages; `pnc bench --resume` completes the run)."), ""]


def zoo_seeds_note(cfg: dict) -> str:
    seeds = cfg.get("zoo_seeds", [0])
    return "" if len(seeds) < 2 else f" on zoos trained from seeds {seeds} (`--zoo-seeds`)"


def load_note(mach: dict) -> str:
    if "load_1min_before" not in mach:
        return ""
    return (f", 1-minute load average {mach['load_1min_before']:.1f} before and "
            f"{mach['load_1min_after']:.1f} after")


def section(results_dir: Path) -> str:
    path = results_dir / "full.json"
    if not path.exists():
        path = results_dir / "quick.json"
    if not path.exists():
        return "No benchmark results yet: run `pnc bench` (or `pnc bench --quick`).\n"
    res = json.loads(path.read_text())
    cfg, mach = res["config"], res["machine"]
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    tasks = "; ".join(f"{t['name']} ({t['kind']})" for t in cfg["tasks"])
    lines = [
        "## Benchmarks", "",
        (f"Generated by `scripts/render_bench.py` from `{rel}` (mode **{res['mode']}**, "
         f"`pnc bench{' --quick' if res['mode'] == 'quick' else ''}`); method details and how "
         "each baseline was built: [docs/benchmarks.md](docs/benchmarks.md)."), "",
        (f"Tasks: {tasks}. Seeds {cfg['seeds']}{zoo_seeds_note(cfg)}; every figure is on the held-out test split; "
         f"mean ± std over seeds. Machine: {mach['cpus']} CPUs, {mach['workers']} worker(s) × "
         f"{mach['threads_per_worker']} thread(s), torch {mach['torch']}; "
         f"the whole run took {res['wall_seconds'] / 60:.0f} min of wall time "
         f"({res['cell_seconds'] / 60:.0f} min of cell time){load_note(mach)}. Seconds are "
         "wall time per method including its search (learning rates; PNC: positions; PNC-F "
         "includes PNC); they depend on the machine and its load, so compare them within a "
         "row group, not across runs."), "",
        *partial_note(res),
        "### PNC against parameter tuning", "", *main_tables(res),
        "### Data budget", "",
        f"![acc_all and locality against budget](bench/results/{res['files']['sweep']})", "",
        *sweep_table(res),
        "### What the module keeps: Sim", "",
        f"![Sim matrix](bench/results/{res['files']['sim']})", "",
        *(["### Across zoos", "", *zoo_table(res), *zoo_verdicts(res)] if zoo_table(res) else []),
        *rgb_section(results_dir),
        "### What travels", "", *transmission_table(res),
        "### Targets of issue 5, checked", "", *verdicts(res), "",
    ]
    notes = results_dir.parent / "notes.md"
    if notes.exists():
        lines += ["### Reading", "", notes.read_text().strip(), ""]
    return "\n".join(lines)


def rgb_verdicts(res: dict) -> list[str]:
    """Issue 10's targets for the rgb task, checked against the numbers."""
    out = ["Targets of issue 10 (means over the clone seeds; package share from clone seed 0):",
           ""]
    for r in (r for r in res["rows"] if r["method"] == "PNC"):
        kt, slowest = r["target_budget"], max_seconds(res, r)
        t = next((t for t in res["transmission"]
                  if t["target_budget"] == kt and t["task"] == r["task"]), None)
        out += [f"- {r['task']}, k_t = {kt}: acc_new {r['acc_new']:.3f} >= source's "
                f"{r['source_acc_new']:.3f} - 0.05: "
                f"{check(r['acc_new'] >= r['source_acc_new'] - 0.05)}; acc_old "
                f"{r['acc_old']:.3f} >= target's {r['target_acc_old']:.3f} - 0.02: "
                f"{check(r['acc_old'] >= r['target_acc_old'] - 0.02)}; locality "
                f"{r['locality']:.3f} >= 0.97: {check(r['locality'] >= 0.97)}"
                + oracle_note(res["rows"], r, "acc_old", "locality") + "; clone "
                f"{r['seconds'] / 60:.1f} min (slowest seed {slowest / 60:.1f}) "
                f"<= 10: {check(slowest <= 600)}"]
        if t is not None:
            share = t["package_bytes"] / t["superbody_bytes"]
            out[-1] += (f"; package {t['package_bytes']:,} B = {100 * share:.3f}% of the "
                        f"superbody's {t['superbody_bytes']:,} B <= 0.1%: {check(share <= 0.001)}")
    return out + [""]


def max_seconds(res: dict, row: dict) -> float:
    """The slowest single run behind an aggregated row."""
    return max(r["seconds"] for r in res["raw"] if r["method"] == row["method"]
               and r["task"] == row["task"] and r["target_budget"] == row["target_budget"]
               and r["budget"] == row["budget"])


def rgb_section(results_dir: Path) -> list[str]:
    """The real-architectures run (``pnc bench --tasks rgb --out bench/results/rgb``)."""
    path = results_dir / "rgb" / "full.json"
    if not path.exists():
        return []
    res = json.loads(path.read_text())
    cfg, mach = res["config"], res["machine"]
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    cmd = res.get("command", "pnc bench --tasks rgb --zoo-seeds 0 --sweep-budgets 20 "
                             "--out bench/results/rgb --workers 2 --threads 1")
    return [
        "### Real architectures: torchvision resnet18 <- mobilenet_v3_small, <- ViT", "",
        (f"From `{rel}` (`{cmd}`): the colour digits (3x32x32), seeds {cfg['seeds']} on zoo "
         f"seed {cfg['zoo_seeds'][0]}, k = {cfg['budget']}, no budget sweep, methods "
         f"{', '.join(cfg['methods'])}; "
         f"{mach['workers']} worker(s) × {mach['threads_per_worker']} thread(s), "
         f"{res['wall_seconds'] / 60:.0f} min of wall time{load_note(mach)}."), "",
        *partial_note(res), *main_tables(res), *zoo_table(res), *rgb_verdicts(res),
    ]


def render(readme: Path, results_dir: Path) -> str:
    text = readme.read_text()
    if START not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{section(results_dir)}{END}{tail}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when README.md is stale")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    new = render(args.readme, args.results)
    if args.check:
        stale = new != args.readme.read_text()
        print("README.md benchmark section is stale" if stale else "up to date")
        return int(stale)
    tmp = args.readme.with_suffix(".md.tmp")
    tmp.write_text(new)
    tmp.replace(args.readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
