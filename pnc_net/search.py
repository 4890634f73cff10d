"""Position search: which ``(R, S)`` pair to insert at (``docs/method.md`` step 3).

Candidates are independent, which is why ``pnc_net.cluster`` can spread them
over Ray actors; ``pnc_net.cloning.run_sequential`` trains them in process. This
module chooses the candidates and picks the winner, the same way for both.
"""

from __future__ import annotations

from collections.abc import Sequence

from pnc_net.errors import InvalidInputError


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

