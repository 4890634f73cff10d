"""Position search: which ``(R, S)`` pair to insert at (``docs/method.md`` step 3).

Candidates are independent, which is why ``pnc_net.cluster`` can spread them
over Ray actors; ``pnc_net.cloning.run_sequential`` trains them in process. This
module chooses the candidates and picks the winner, the same way for both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from pnc_net.errors import InvalidInputError

if TYPE_CHECKING:  # not at run time: this module stays free of torch
    from pnc_net.insert import InsertConfig


def default_candidates(target_blocks: int, source_blocks: int) -> list[tuple[int, int]]:
    """Depth-matched pairs in the deeper half of both networks.

    ``(r, s)`` with ``r >= L/2``, ``s >= K/2`` and relative depths within a
    quarter: early boundaries carry little class evidence and make the branch
    (most of the source) expensive, so they rarely win.
    """
    out = []
    for r in range((target_blocks + 1) // 2, target_blocks + 1):
        for s in range((source_blocks + 1) // 2, source_blocks + 1):
            if r > 0 and s > 0 and abs(r / target_blocks - s / source_blocks) <= 0.25 + 1e-9:
                out.append((r, s))
    return out


def parse_positions(text: str) -> list[tuple[int, int]]:
    """``"3:3,4:4"`` -> ``[(3, 3), (4, 4)]``."""
    out = []
    for part in text.split(","):
        try:
            r, s = part.split(":")
            out.append((int(r), int(s)))
        except ValueError:
            raise InvalidInputError(
                f"position {part!r} is not R:S (two block boundaries, e.g. 3:3)") from None
    return out


def check_candidates(candidates: Sequence[tuple[int, int]], target_blocks: int,
                     source_blocks: int) -> None:
    """Refuse positions outside ``1..L`` x ``1..K`` before any training starts.

    Raises:
        InvalidInputError: a candidate names a boundary the networks do not have.
    """
    for r, s in candidates:
        if not (1 <= r <= target_blocks and 1 <= s <= source_blocks):
            raise InvalidInputError(
                f"position {r}:{s} is out of range: R must be in 1..{target_blocks} "
                f"(target boundaries) and S in 1..{source_blocks} (source boundaries)")


def best_candidate(results: Sequence[tuple[tuple[int, int], dict]]) -> int:
    """Index of the highest score; ties go to the later (cheaper) position."""
    scores = [(res["score"], pos) for pos, res in results]
    return max(range(len(scores)), key=lambda i: scores[i])



# ----------------------------------------------------------------------------- halving

SEARCH_MODES = ("exhaustive", "halving")


@dataclass
class Rung:
    """One rung of a successive-halving search: who trained, at what budget, how they scored."""

    budget: float  # fraction of the full training budget (1.0 = the full one)
    candidates: list[tuple[int, int]]
    results: list[Any]
    scores: list[float]


@dataclass
class Halving:
    """A finished search: every rung (cheapest first) and the winner of the last one."""

    rungs: list[Rung] = field(default_factory=list)

    @property
    def best(self) -> tuple[tuple[int, int], Any]:
        """``(position, result)`` of the best candidate of the last (full-budget) rung."""
        last = self.rungs[-1]
        i = best_candidate([(p, {"score": s}) for p, s in zip(last.candidates, last.scores)])
        return last.candidates[i], last.results[i]


def halving_budgets(n: int, eta: int = 3) -> list[float]:
    """Budgets (fractions of the full one, cheapest first) for ``n`` candidates.

    One rung per division by ``eta`` until at most ``eta`` candidates are left,
    then the full budget for those: the final pick is always made at full
    budget among a handful, and ``n <= eta`` is the exhaustive search.
    """
    if eta < 2:
        raise InvalidInputError(f"eta must be at least 2, got {eta}")
    rungs, left = 1, n
    while left > eta:
        left = math.ceil(left / eta)
        rungs += 1
    return [float(eta) ** -(rungs - 1 - k) for k in range(rungs)]


def rung_sizes(n: int, rungs: int, keep_fraction: float) -> list[int]:
    """How many candidates each rung trains: the top ``keep_fraction`` (rounded up) go on."""
    sizes = [n]
    for _ in range(rungs - 1):
        sizes.append(max(1, math.ceil(sizes[-1] * keep_fraction - 1e-9)))
    return sizes


def top_indices(candidates: Sequence[tuple[int, int]], scores: Sequence[float],
                k: int) -> list[int]:
    """The ``k`` best, in their original order; ties go to the later position
    (the same order as ``best_candidate``, so a survivor never depends on luck)."""
    ranked = sorted(range(len(scores)), key=lambda i: (scores[i], candidates[i]), reverse=True)
    return sorted(ranked[:k])


def successive_halving(candidates: Sequence[tuple[int, int]],
                       train: Callable[[list[tuple[int, int]], float], list[Any]],
                       budgets: Sequence[float] | None = None,
                       keep_fraction: float = 1 / 3,
                       score: Callable[[Any], float] = lambda r: float(r["score"]),
                       ) -> Halving:
    """Successive halving over positions (Jamieson and Talwalkar 2016).

    ``train(positions, budget)`` trains every position at ``budget`` (a
    fraction of the full budget) and returns one result per position, in order;
    ``score`` reads a result's validation score. Every rung but the last keeps
    the top ``keep_fraction``; the last runs at ``budgets[-1]`` (the full
    budget). Why: a deep pair of networks has dozens of ``(R, S)`` pairs and a
    short adapter/gate training already ranks the hopeless ones low, so only a
    few need the full training. The number of rungs is ``halving_budgets``'s
    with ``eta = round(1 / keep_fraction)`` (``budgets=None`` uses its budgets,
    given ``budgets`` are cut to their last that many): with at most ``eta``
    candidates, one full-budget rung, which is the exhaustive search.
    """
    if not candidates:
        raise InvalidInputError("no candidate positions to search")
    if not 0 < keep_fraction < 1:
        raise InvalidInputError(f"keep_fraction must be in (0, 1), got {keep_fraction}")
    if budgets is not None and not budgets:
        raise InvalidInputError("successive halving needs at least one budget")
    needed = halving_budgets(len(candidates), max(2, round(1 / keep_fraction)))
    budgets = needed if budgets is None else list(budgets)[-len(needed):]  # the costliest last
    out, alive = Halving(), list(candidates)
    for k, (budget, size) in enumerate(zip(budgets, rung_sizes(len(alive), len(budgets),
                                                               keep_fraction))):
        if k:
            prev = out.rungs[-1]
            alive = [prev.candidates[i] for i in top_indices(prev.candidates, prev.scores, size)]
        results = list(train(list(alive), budget))
        if len(results) != len(alive):
            raise ValueError(f"train returned {len(results)} results for {len(alive)} positions")
        out.rungs.append(Rung(budget, alive, results, [score(r) for r in results]))
    return out


def rung_insert_config(cfg: InsertConfig, budget: float) -> InsertConfig:
    """``cfg`` with its adapter epochs and gate steps scaled by ``budget`` (at least 1 each).

    Only the two loops shrink: the data, the least-squares start and the veto
    calibration are the same at every rung, so a cheap rung ranks positions by
    the same score the full one does.
    """
    if budget >= 1:
        return cfg
    return replace(cfg, epochs=max(1, round(cfg.epochs * budget)),
                   gate_steps=max(1, round(cfg.gate_steps * budget)))
