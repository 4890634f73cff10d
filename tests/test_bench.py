"""The benchmark harness end to end on a micro grid, its reduction, the README renderer
and the command line's errors."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pnc_net.bench.baselines import TuneConfig
from pnc_net.bench.harness import (
    ALL,
    DEFAULT_TASKS,
    BenchConfig,
    Cell,
    aggregate,
    cell_key,
    oracle_everywhere,
    plan_cells,
    read_checkpoint,
    run_bench,
    seeded_zoos,
    with_run_facts,
)
from pnc_net.bench.plots import write_figures
from pnc_net.errors import InvalidInputError
from pnc_net.insert import InsertConfig
from pnc_net.localize import LocalizeConfig

ROOT = Path(__file__).resolve().parent.parent
MICRO = BenchConfig(mode="micro", tasks=DEFAULT_TASKS[:1], seeds=(0,), zoo_seeds=(0,), budget=5,
                    target_budgets=(5, 0), sweep_budgets=(5,), sweep_target_budget=5,
                    sweep_seeds=(0,), positions=((4, 4),),
                    tune=TuneConfig(lrs=(1e-3,), epochs=1, min_steps=3, max_steps=3,
                                    warmup_epochs=1, oracle_lrs=(3e-3,), oracle_epochs=1),
                    localize=LocalizeConfig(perturbations_per_sample=1, refine_steps=5),
                    insert=InsertConfig(augment_copies=0, epochs=1, gate_steps=20))


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _render_module():
    return _script("render_bench")


def test_sweep_reuses_main_cells_and_oracle_runs_once_per_task_and_seed():
    cfg = BenchConfig(zoo_seeds=(0,))
    cells = plan_cells(cfg)
    keys = [(c.task, c.seed, c.budget, c.target_budget, c.oracle) for c in cells]
    assert len(keys) == len(set(keys))
    main = 3 * 2 * 3
    sweep_extra = (len(cfg.sweep_budgets) - 1) * len(cfg.sweep_seeds)
    assert sum(not c.oracle for c in cells) == main + sweep_extra
    assert sum(c.oracle for c in cells) == 3 * 3
    assert sum(c.extras for c in cells) == 3 * 2  # one transmission + Sim per task and regime


def test_aggregate_is_mean_and_population_std_over_seeds():
    raw = [{"task": "t", "kind": "k", "method": "FT", "budget": 5, "target_budget": 0,
            "seed": s, "lr": 1e-3, "acc_old": a, "acc_new": 1.0, "acc_all": 0.5,
            "locality": 0.25, "bytes": 100, "params_modified": 7, "seconds": 2.0,
            "target_acc_old": 1.0, "source_acc_new": None}
           for s, a in ((0, 0.2), (1, 0.4))]
    (row,) = aggregate(raw)
    assert row["acc_old"] == pytest.approx(0.3) and row["acc_old_std"] == pytest.approx(0.1)
    assert row["seeds"] == [0, 1] and row["bytes_std"] == 0.0
    oracle = {**raw[0], "method": "Oracle", "budget": "all"}
    spread = oracle_everywhere([*raw, oracle], MICRO)
    assert {(r["method"], r["budget"]) for r in spread} == {("FT", 5), ("Oracle", 5)}


def test_every_zoo_seed_gets_the_main_grid_and_its_oracles_but_one_sweep():
    one, three = plan_cells(BenchConfig(zoo_seeds=(0,))), plan_cells(BenchConfig())
    main = 3 * 2 * 3  # tasks x regimes x clone seeds
    assert len(three) == len(one) + 2 * (main + 3 * 3)  # + main grid and Oracles per zoo
    assert {c.zoo_seed for c in three} == {0, 1, 2}
    assert all(c.zoo_seed == 0 for c in three if c.budget not in (20, ALL))  # sweep: zoo 0
    assert all(c.zoo_seed == 0 for c in three if c.extras)
    # a checkpoint line written before zoo seeds existed is a zoo-seed-0 cell
    old = {"task": 0, "seed": 1, "budget": 20, "target_budget": 0, "extras": False,
           "oracle": False}
    assert cell_key(old) == cell_key(Cell(0, 1, 20, 0))
    assert cell_key(old) != cell_key(Cell(0, 1, 20, 0, zoo_seed=1))


def test_aggregate_per_zoo_seed_splits_what_the_mean_pools():
    raw = [{"task": "t", "kind": "k", "method": "PNC", "budget": 5, "target_budget": 0,
            "seed": s, "zoo_seed": z, "lr": None, "acc_old": 1.0, "acc_new": 1.0,
            "acc_all": 1.0, "locality": loc, "bytes": 10, "params_modified": 1,
            "seconds": 1.0, "target_acc_old": 1.0, "source_acc_new": None}
           for z, s, loc in ((0, 0, 0.9), (0, 1, 0.8), (1, 0, 0.5), (1, 1, 0.4))]
    (pooled,) = aggregate(raw)
    assert pooled["locality"] == pytest.approx(0.65) and pooled["zoo_seeds"] == [0, 1]
    per = aggregate(raw, per_zoo_seed=True)
    assert [(r["zoo_seeds"], round(r["locality"], 6)) for r in per] == [([0], 0.85), ([1], 0.45)]


def test_seeded_zoos_reuse_the_given_zoo_for_its_own_seed(zoo_dir, tmp_path):
    from pnc_net.zoo import Zoo

    roots = seeded_zoos(Zoo(zoo_dir), BenchConfig(zoo_seeds=(0,)), tmp_path)
    assert roots == {0: Path(zoo_dir)} and not list(tmp_path.iterdir())  # nothing trained
    with pytest.raises(InvalidInputError, match="repeat"):
        BenchConfig(zoo_seeds=(1, 1))


def test_bad_bench_settings_are_rejected():
    with pytest.raises(InvalidInputError):
        BenchConfig(methods=("PNC", "SGD"))
    with pytest.raises(InvalidInputError):
        BenchConfig(budget=ALL + 1)
    with pytest.raises(InvalidInputError):
        BenchConfig(workers=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench") / "micro.cells.jsonl"


@pytest.fixture(scope="module")
def micro(zoo_dir, checkpoint):
    from pnc_net.zoo import Zoo

    return run_bench(Zoo(zoo_dir), MICRO, checkpoint=checkpoint)


@pytest.mark.slow
def test_a_run_cut_short_is_reduced_from_its_checkpoint(micro, checkpoint, zoo_dir):
    from pnc_net.zoo import Zoo

    with open(checkpoint, "a") as f:
        f.write('{"cell": {"task": 0')  # a torn last line, as a kill leaves it
    assert len(read_checkpoint(checkpoint)) == 3
    again = run_bench(Zoo(zoo_dir), MICRO, checkpoint=checkpoint, resume=True, run_missing=False)
    assert again["rows"] == micro["rows"] and again["transmission"] == micro["transmission"]
    assert again["wall_seconds"] < micro["wall_seconds"]  # reducing is not the run ...
    kept = with_run_facts(again, micro)  # ... so --reduce-only keeps the run's own facts
    assert kept["wall_seconds"] == micro["wall_seconds"] and kept["rows"] == again["rows"]
    assert kept["machine"] == micro["machine"]


@pytest.mark.slow
def test_micro_run_reports_every_method_regime_and_budget(micro):
    methods = ("PNC", "PNC-F", "FT", "LwF", "KD", "Oracle")
    assert {(r["method"], r["target_budget"]) for r in micro["rows"]} == {
        (m, kt) for m in methods for kt in (5, 0)}
    assert {(r["method"], r["budget"]) for r in micro["sweep"]} == {(m, 5) for m in methods}
    assert micro["cells_done"] == micro["cells_planned"] == 3  # two regimes + one Oracle
    for r in micro["rows"]:
        for key in ("acc_old", "acc_new", "acc_all", "locality"):
            assert 0.0 <= r[key] <= 1.0 and r[f"{key}_std"] == 0.0
        assert r["bytes"] > 0 and r["seconds"] > 0
    pnc = {r["target_budget"]: r for r in micro["rows"] if r["method"] == "PNC"}
    ft = {r["target_budget"]: r for r in micro["rows"] if r["method"] == "FT"}
    assert all(pnc[kt]["bytes"] < ft[kt]["bytes"] for kt in (5, 0))  # the package is small
    (t5, _t0) = sorted(micro["transmission"], key=lambda t: -t["target_budget"])
    assert t5["bound_bytes"] < t5["package_bytes"] < t5["full_model_zstd_fp16_bytes"]
    assert t5["decode_ms"] > 0
    # an fp16 package's matrices are int8 already and int8 keeps vectors fp16: the same size
    assert t5["package_int8_bytes"] <= t5["package_bytes"] + 32
    for dtype in ("fp16", "int8"):  # what a receiver rebuilds from each encoding
        assert 0.0 <= t5[f"{dtype}_acc_all"] <= 1.0 and 0.0 <= t5[f"{dtype}_locality"] <= 1.0
    sim = micro["sim"][0]["modules"][0]
    assert len(sim["per_class"]) == 10 and sim["cloned"] == ["5", "6"]
    for r in micro["by_zoo_seed"]:  # PNC's rows say where the loss is, and it adds up
        if r["method"] == "PNC":
            assert r["routing_error_new"] + r["branch_error_new"] == pytest.approx(
                1 - r["acc_new"], abs=1e-6)
            assert r["routing_error_old"] == pytest.approx(1 - r["locality"], abs=1e-6)
            assert r["locality_min"] <= r["locality"]
        else:
            assert "routing_error_new" not in r


def test_cli_gap_keys_are_the_ones_the_library_reports():
    from pnc_cli.common import GAP_KEYS as CLI_KEYS
    from pnc_net.metrics import GAP_KEYS

    assert CLI_KEYS == GAP_KEYS


def _zoo_row(kt: int, zoo: int, locality: float, worst: float) -> dict:
    return {"task": "t", "method": "PNC", "target_budget": kt, "zoo_seeds": [zoo],
            "acc_old": 0.99, "target_acc_old": 1.0, "acc_new": 0.9, "source_acc_new": 0.98,
            "locality": locality, "locality_min": worst, "routing_error_old": 1 - locality,
            "routing_error_new": 0.08, "branch_error_new": 0.02}


def test_across_zoos_section_checks_issue_14_targets_per_zoo_seed():
    render = _render_module()
    by_zoo = [_zoo_row(20, z, 0.995, 0.99) for z in range(3)] + [
        _zoo_row(0, 0, 0.99, 0.98), _zoo_row(0, 1, 0.98, 0.96), _zoo_row(0, 2, 0.99, 0.94)]
    pooled = {"task": "t", "method": "PNC", "target_budget": 20, "locality": 0.995,
              "acc_old": 0.994, "target_acc_old": 1.0, "acc_new": 0.9, "source_acc_new": 0.98}
    lwf = {"task": "t", "method": "LwF", "target_budget": 20, "locality": 0.98,
           "locality_std": 0.004}
    oracle = {"task": "t", "method": "Oracle", "target_budget": 20, "acc_new": 0.962}
    res = {"config": {"tasks": [{"name": "t"}], "zoo_seeds": [0, 1, 2], "seeds": [0, 1, 2],
                      "budget": 20}, "rows": [pooled, lwf, oracle], "by_zoo_seed": by_zoo}
    table = render.zoo_table(res)
    assert len([line for line in table if line.startswith("| t |")]) == 6
    verdicts = "\n".join(render.zoo_verdicts(res))
    assert "locality 0.9950 >= 0.99: met" in verdicts
    assert "acc_old 0.9940 >= target's 1.0000 - 0.005: **not met**" in verdicts
    assert ("acc_new 0.9000 >= source's 0.9800 - 0.02: **not met** (the Oracle, every class on "
            "the full train split: acc_new 0.962)") in verdicts  # the ceiling beside the bar
    assert "by +0.0150, more than their largest spread over seeds (0.0040): met" in verdicts
    assert "every zoo seed (0.990, 0.980, 0.990): **not met**" in verdicts
    assert "(worst 0.940): **not met**" in verdicts
    assert render.zoo_verdicts({**res, "config": {**res["config"], "zoo_seeds": [0]}}) == []


def test_rgb_section_checks_issue_10_targets():
    render = _render_module()
    rows = [{"task": "r", "method": "PNC", "target_budget": kt, "budget": 20,
             "acc_old": old, "target_acc_old": 0.97, "acc_new": new, "source_acc_new": 0.79,
             "locality": loc, "seconds": 200.0} for kt, old, new, loc in
            ((20, 0.96, 0.70, 0.975), (0, 0.93, 0.76, 0.95))]
    oracle = {"task": "r", "method": "Oracle", "target_budget": 0, "acc_old": 0.972,
              "locality": 0.963}
    raw = [{**r, "seconds": s} for r in rows for s in (150.0, 250.0 if r["target_budget"]
                                                       else 700.0)]
    res = {"rows": [*rows, oracle], "raw": raw, "transmission": [
        {"task": "r", "target_budget": 20, "package_bytes": 12_000,
         "superbody_bytes": 20_000_000},
        {"task": "other", "target_budget": 0, "package_bytes": 1, "superbody_bytes": 1}]}
    k20, k0 = render.rgb_verdicts(res)[2:4]
    assert "acc_new 0.700 >= source's 0.790 - 0.05: **not met**" in k20
    assert "acc_old 0.960 >= target's 0.970 - 0.02: met" in k20
    assert "locality 0.975 >= 0.97: met" in k20 and "(slowest seed 4.2) <= 10: met" in k20
    assert "0.060% of the superbody's 20,000,000 B <= 0.1%: met" in k20
    assert "acc_new 0.760 >= source's 0.790 - 0.05: met" in k0
    assert "locality 0.950 >= 0.97: **not met**" in k0 and "11.7) <= 10: **not met**" in k0
    assert "(the Oracle, every class on the full train split: acc_old 0.972, locality 0.963)" in k0
    assert "Oracle" not in k20  # none in that regime
    assert k20.startswith("- r, k_t = 20:") and k0.startswith("- r, k_t = 0:")
    assert "package" not in k0  # none measured for that task and regime (only another's)


@pytest.mark.slow
def test_figures_json_and_readme_section_come_from_the_results(micro, tmp_path):
    res = {**micro, "files": write_figures(micro, tmp_path / "results")}
    for name in res["files"].values():
        assert (tmp_path / "results" / name).read_bytes()[:4] == b"\x89PNG"
    res["mode"] = "quick"
    (tmp_path / "results" / "quick.json").write_text(json.dumps(res, default=float))
    readme = tmp_path / "README.md"
    readme.write_text("# pnc\n\nintro\n")
    render = _render_module()
    text = render.render(readme, tmp_path / "results")
    section = text.split(render.START)[1].split(render.END)[0]
    assert text.startswith("# pnc\n\nintro\n")
    for method in ("**PNC**", "PNC-F", "FT", "LwF", "KD", "Oracle"):
        assert f"| {method} |" in section
    assert "micro_budget_sweep.png" in section and "Targets of issue 5" in section
    readme.write_text(text)
    assert render.render(readme, tmp_path / "results") == text  # idempotent


def test_cli_rejects_bad_options_with_one_line(tmp_path, zoo_dir):
    env = {**os.environ, "PNC_ZOO": str(zoo_dir)}
    exe = [sys.executable, "-c", "import pnc_cli; pnc_cli.main()"]
    a_file = tmp_path / "f"
    a_file.write_text("x")
    for args, fragment in (([" --out", str(a_file)], "not a folder"),
                           (["--workers", "0"], "at least 1"),
                           (["--zoo-seeds", "0,x"], "not a list of integers"),
                           (["--sweep-budgets", "5,x"], "not a list like"),
                           (["--methods", "PNC,SGD"], "unknown method"),
                           (["--tasks", "imagenet"], "not a task set")):
        res = subprocess.run([*exe, "bench", *[a.strip() for a in args]], capture_output=True,
                             text=True, env=env, timeout=120, check=False)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.returncode == 2 and len(lines) == 1 and fragment in lines[0], res.stderr
        assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_check_bench_passes_a_whole_run_and_names_what_a_broken_one_lacks(micro, tmp_path):
    check = _script("check_bench")
    res = {**micro, "files": write_figures(micro, tmp_path)}
    assert check.problems_of(res, tmp_path) == []
    broken = {**res, "rows": [r for r in res["rows"]
                              if not (r["method"] == "KD" and r["target_budget"] == 0)]}
    broken["rows"][0] = {**broken["rows"][0], "locality": 1.5}
    (tmp_path / res["files"]["sim"]).unlink()
    found = check.problems_of(broken, tmp_path)
    assert any("no row for ['KD']" in p for p in found)
    assert any("locality = 1.5" in p for p in found)
    assert any("is missing" in p for p in found)
