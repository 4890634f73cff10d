"""Position search: successive halving (pure, no torch) and one real clone with it."""

from __future__ import annotations

import pytest

from pnc_net.errors import InvalidInputError
from pnc_net.search import (
    best_candidate,
    halving_budgets,
    rung_sizes,
    successive_halving,
    top_indices,
)

GRID = [(r, s) for r in range(1, 5) for s in range(1, 5)]  # all pairs of two 4-block nets


class FakeTrain:
    """A deterministic stand-in for training: the score grows with the budget toward a
    per-position ceiling, and every call is logged."""

    def __init__(self, ceiling: dict[tuple[int, int], float]) -> None:
        self.ceiling = ceiling
        self.calls: list[tuple[list[tuple[int, int]], float]] = []

    def __call__(self, positions: list[tuple[int, int]], budget: float) -> list[dict]:
        self.calls.append((positions, budget))
        return [{"score": self.ceiling[p] * (0.5 + 0.5 * budget)} for p in positions]


def ceiling_of(p: tuple[int, int]) -> float:
    return 0.5 + 0.03 * p[0] + 0.01 * p[1] - 0.04 * abs(p[0] - p[1])


def test_budgets_grow_by_eta_and_end_at_full():
    assert halving_budgets(16) == [1 / 9, 1 / 3, 1.0]
    assert halving_budgets(7) == [1 / 3, 1.0]
    assert halving_budgets(3) == [1.0]
    assert halving_budgets(1) == [1.0]
    assert halving_budgets(10, eta=2) == [1 / 8, 1 / 4, 1 / 2, 1.0]
    with pytest.raises(InvalidInputError):
        halving_budgets(5, eta=1)


def test_rung_sizes_keep_the_top_third_rounded_up():
    assert rung_sizes(16, 3, 1 / 3) == [16, 6, 2]
    assert rung_sizes(7, 2, 1 / 3) == [7, 3]
    assert rung_sizes(9, 3, 1 / 3) == [9, 3, 1]
    assert rung_sizes(2, 3, 1 / 3) == [2, 1, 1]


def test_rungs_train_fewer_candidates_at_growing_budgets():
    train = FakeTrain({p: ceiling_of(p) for p in GRID})
    result = successive_halving(GRID, train)
    assert [len(c) for c, _ in train.calls] == [16, 6, 2]
    assert [b for _, b in train.calls] == [1 / 9, 1 / 3, 1.0]
    assert [r.budget for r in result.rungs] == [1 / 9, 1 / 3, 1.0]
    # each rung's survivors are a subset of the previous rung's, in the given order
    for a, b in zip(result.rungs, result.rungs[1:]):
        assert set(b.candidates) <= set(a.candidates)
        assert b.candidates == [p for p in a.candidates if p in b.candidates]


def test_survivor_is_the_best_at_full_budget():
    train = FakeTrain({p: ceiling_of(p) for p in GRID})
    position, result = successive_halving(GRID, train).best
    exhaustive = train(GRID, 1.0)
    best = best_candidate(list(zip(GRID, exhaustive)))
    assert position == GRID[best] == (4, 4)
    assert result == exhaustive[best]


def test_a_cheap_rung_can_mislead_and_the_full_rung_decides():
    # (1, 1) looks best at a small budget but is beaten at the full one by (4, 4)
    def train(positions, budget):
        return [{"score": (0.9 if p == (1, 1) else 0.5) if budget < 1
                 else (0.6 if p == (1, 1) else 0.5 + 0.01 * p[0] * p[1])} for p in positions]
    out = successive_halving(GRID, train)
    assert (1, 1) in out.rungs[-1].candidates
    assert out.best[0] == (4, 4)


def test_ties_go_to_the_later_position():
    flat = successive_halving(GRID, lambda ps, b: [{"score": 0.5} for _ in ps])
    assert flat.rungs[1].candidates == GRID[-6:]  # the 6 latest survive the first rung
    assert flat.best[0] == (4, 4)
    assert top_indices([(1, 1), (2, 2), (3, 3)], [0.7, 0.7, 0.1], 1) == [1]


def test_few_candidates_is_the_exhaustive_search():
    pairs = [(2, 2), (3, 3), (4, 4)]
    train = FakeTrain({p: ceiling_of(p) for p in pairs})
    out = successive_halving(pairs, train)
    assert train.calls == [(pairs, 1.0)]
    assert out.best[0] == pairs[best_candidate(list(zip(pairs, train(pairs, 1.0))))]
    # given budgets are cut to the rungs the candidates need: still one full rung
    train.calls.clear()
    successive_halving(pairs, train, budgets=[0.1, 0.3, 1.0])
    assert train.calls == [(pairs, 1.0)]


def test_bad_arguments_are_refused():
    with pytest.raises(InvalidInputError):
        successive_halving([], lambda ps, b: [])
    with pytest.raises(InvalidInputError):
        successive_halving(GRID, lambda ps, b: [], keep_fraction=1.5)
    with pytest.raises(InvalidInputError):
        successive_halving(GRID, lambda ps, b: [], budgets=[])
    with pytest.raises(ValueError, match="results"):
        successive_halving(GRID, lambda ps, b: [{"score": 0.0}])


def test_rung_config_scales_only_the_training_loops():
    from pnc_net.insert import InsertConfig
    from pnc_net.search import rung_insert_config

    cfg = InsertConfig()
    assert rung_insert_config(cfg, 1.0) is cfg
    small = rung_insert_config(cfg, 1 / 9)
    assert (small.epochs, small.gate_steps) == (1, 44)
    assert small.adapter_rank == cfg.adapter_rank and small.veto_quantiles == cfg.veto_quantiles


@pytest.mark.slow
def test_halving_clone_records_rungs_and_trains_each_rung_at_its_budget(zoo, mnist):
    from pnc_net.cloning import CloneConfig, clone, run_sequential

    seen: list[tuple[int, int, int]] = []

    def spy(job, i, positions):  # any CandidateRunner: this one checks what each rung sees
        seen.append((len(positions), job.cfg.insert.epochs, job.cfg.insert.gate_steps))
        return run_sequential(job, i, positions)

    positions = ((2, 2), (3, 3), (4, 4), (3, 4))
    cfg = CloneConfig.single("mnist-cnn-0to4", "mnist-cnn-5to9", ("5", "6"), per_class=40,
                             target_per_class=10, positions=positions, search="halving")
    result = clone(zoo, mnist, cfg, runner=spy)
    assert seen == [(4, 2, 133), (2, 6, 400)]
    records = result.report["search"][0]
    assert [tuple(r["position"]) for r in records] == list(positions)
    finalists = [r for r in records if r["rung"] == 1]
    assert len(finalists) == 2 and all(len(r["rung_scores"]) == 2 for r in finalists)
    assert all(r["budget"] == pytest.approx(1 / 3) for r in records if r["rung"] == 0)
    best = max(finalists, key=lambda r: (r["score"], tuple(r["position"])))
    branch = result.superbody.branches[0]
    assert [branch.position_r, branch.position_s] == best["position"]
    assert result.report["settings"]["search"] == "halving"
    assert result.report["metrics"]["acc_new"] >= 0.8


def test_unknown_search_mode_is_refused():
    from pnc_net.cloning import CloneConfig, settings_of

    with pytest.raises(InvalidInputError, match="--search"):
        CloneConfig.single("t", "s", ("5",), search="random")
    assert "search" not in settings_of(CloneConfig.single("t", "s", ("5",)))


def test_cli_search_option_reaches_the_config():
    from pnc_cli.clone_run import clone_config

    kw = dict(per_class=10, target_per_class=5, seed=0, positions=None, adapter_rank=8)
    cfg = clone_config("t", ["s"], ["5,6"], search="halving", **kw)
    assert cfg.search == "halving"
    assert clone_config("t", ["s"], ["5,6"], **kw).search == "exhaustive"
    with pytest.raises(InvalidInputError, match="--search"):
        clone_config("t", ["s"], ["5,6"], search="grid", **kw)
