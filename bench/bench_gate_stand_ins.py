"""Should the inverted stand-ins join real target digits in the discriminant's fit? (issue 14)

    OMP_NUM_THREADS=1 python bench/bench_gate_stand_ins.py --zoo /tmp/pnc/zoo0 --zoo-seed 0 \\
        --seed 0 [--source mnist|mobilenet|vit] >> bench/results/gate_stand_ins_router.jsonl

Clones ``{5, 6}`` (k = 20, k_t = 20, the bench's two positions for the pair) exactly as
``pnc clone`` does, keeps the branch, and refits only the discriminant
(``insert.DiscriminantFit``, on the int8 grid as a package stores it) with and without the
stand-in rows (``Prepared.stand_in``: the target's BatchNorm-inverted images, which join
its real digits when ``--gate-stand-ins``, the default):

- ``built``: the package's gate as trained (the defaults of when this runs);
- ``half``, ``half-no_stand_ins``: every tap, half the untapped width kept by parting
  weight (``--gate-taps all --gate-features half``: ``half`` reproduces ``built``);
- ``all-no_stand_ins``: every tap, every feature kept;
- ``none``, ``none-no_stand_ins``: no taps, standardization folded (stop 25's router);
- ``half-stand_in_groups``: the stand-ins kept, but as groups of their own (one per target
  class they are read as), so they do not move the real digits' class means;
- ``half-stand_in_group``: the same with all stand-ins one group (one row more, not five).

Each row: test locality, acc_old, acc_new (the branch fixed) and ``shift{b}``, the same
with ``b`` added to the gate's log-odds (a threshold moved toward the branch for b > 0),
so the two fits can be compared at the same acc_old. One JSON line.
"""

from __future__ import annotations

import json
import time

import torch
from router_bench import candidates, gate_of, parse_args, router_run

from pnc_net.insert import DiscriminantFit

SHIFTS = (-3, -2, -1, 1, 2, 3)


def main() -> None:
    args = parse_args(__doc__)
    started = time.time()
    setup = router_run(args, target_per_class=20)
    job, branch, prep, train, group = setup.job, setup.branch, setup.prep, setup.train, setup.group
    assert prep.stand_in is not None
    cloned, score = branch.cloned_index, setup.score
    test_old, test_new = setup.test_old, setup.test_new
    real = torch.cat([~prep.stand_in, torch.ones(len(prep.x_neg), dtype=torch.bool)])
    every_row = torch.ones_like(real)

    def with_shifts(g_old: torch.Tensor, g_new: torch.Tensor) -> dict:
        log_odds = lambda g: g.double().clamp(1e-12, 1 - 1e-12).logit()  # noqa: E731
        return {**score(g_old, g_new),
                **{f"shift{b}": score((log_odds(g_old) + b).sigmoid(),
                                      (log_odds(g_new) + b).sigmoid()) for b in SHIFTS}}

    def run(cols: torch.Tensor, rows: torch.Tensor, folded: bool = False) -> dict:
        cols = cols.sort().values
        gate = gate_of(candidates(train)[rows][:, cols], group[rows], len(cloned), folded)
        return with_shifts(gate(candidates(test_old)[:, cols]),
                           gate(candidates(test_new)[:, cols]))

    d_t, d_taps, d_b = (train[k].shape[1] for k in ("f_t", "taps", "f_b"))
    everything = torch.arange(d_t + d_taps + d_b)
    base = torch.cat([everything[:d_t], everything[d_t + d_taps:]])

    def top_half(rows: torch.Tensor) -> torch.Tensor:
        fit = DiscriminantFit(candidates(train)[rows].double(), group[rows], len(cloned), 0.1)
        return fit.parting_weight().argsort(descending=True)[: len(base) // 2]

    n_target = len(job.target_labels)
    stand_in = ~real
    own_groups = torch.where(stand_in, group + n_target, group)
    one_group = torch.where(stand_in, len(cloned) + n_target, group)

    def half_with(groups: torch.Tensor) -> dict:
        fit = DiscriminantFit(candidates(train).double(), groups, len(cloned), 0.1)
        cols = fit.parting_weight().argsort(descending=True)[: len(base) // 2].sort().values
        gate = gate_of(candidates(train)[:, cols], groups, len(cloned), False)
        return with_shifts(gate(candidates(test_old)[:, cols]),
                           gate(candidates(test_new)[:, cols]))

    rows = {"built": with_shifts(setup.built_gate(test_old), setup.built_gate(test_new)),
            "half": run(top_half(every_row), every_row),
            "half-no_stand_ins": run(top_half(real), real),
            "all-no_stand_ins": run(everything, real),
            "none": run(base, every_row, folded=True),
            "none-no_stand_ins": run(base, real, folded=True),
            "half-stand_in_groups": half_with(own_groups),
            "half-stand_in_group": half_with(one_group)}
    print(json.dumps({"source": job.modules[0].manifest.name, "zoo_seed": args.zoo_seed,
                      "seed": args.seed, "position": list(setup.position), "stand_in_rows": int(prep.stand_in.sum()),
                      "seconds": round(time.time() - started), "rows": rows}))


if __name__ == "__main__":
    main()
