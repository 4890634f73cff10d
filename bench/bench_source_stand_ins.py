"""Do stand-ins inverted from the *source*, of the classes it knows but does not give away,
teach the router what "not a cloned digit" looks like? (issues 10 and 14)

    OMP_NUM_THREADS=1 PYTHONPATH=bench python bench/bench_source_stand_ins.py \\
        --zoo /tmp/pnc/rgbzoo --source mobilenet --seed 0 [--target-per-class 20] \\
        >> bench/results/source_stand_ins.jsonl

At k_t = 0 the discriminant's target side is the target's BatchNorm-inverted stand-ins and
the occluded cloned digits. On the rgb pairs those stand-ins do not look like the target's
own digits (``docs/method.md``, *the discriminant against stand-ins*), and locality stays
near 0.77. The source also keeps BatchNorm statistics (MobileNet; the ViT has LayerNorm), of
training digits of every one of its classes: inverting it (``synthesize.py``, as the target
is) for its non-cloned classes (7, 8, 9) gives inputs that are digits to the source's layers
and are not cloned ones. They join the target side, grouped by the target's own prediction
as the target's stand-ins are.

Rows (the branch as ``pnc clone`` searched it, only the router refitted, on the int8 grid;
test split):

- ``built``: the router refitted as ``pnc clone`` builds it. At k_t = 0: the discriminant on
  ``[f_t, f_b]``, half kept, x the energy veto at q = 0.95. At k_t = 20: on ``[f_t, taps,
  f_b]``, half the untapped width kept, with the target's stand-ins (``half`` in
  ``bench_gate_stand_ins.py``), and without them (``built-no_stand_ins``): ``pnc clone``
  chooses between the two on validation;
- ``+source{n}``: the same fit with n source stand-ins per non-cloned class added
  (``+source{n}-no_stand_ins`` likewise);
- ``+source{n}_only`` (k_t = 0): the source's stand-ins replace the target's;
- ``source{n}_opened``: the share of the source's stand-ins the built router opens on;
- ``shift{b}`` in every row (k_t = 20): the same with b added to the log-odds, to compare
  fits at the same acc_old.

Each row: test locality, acc_old, acc_new. One JSON line.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import torch
from router_bench import Features, candidates, gate_of, parse_args, router_run

from pnc_net.cloning import router_features
from pnc_net.insert import DiscriminantFit
from pnc_net.superbody import energy_allowed
from pnc_net.synthesize import SynthesizeConfig, synthesize_target_samples

PER_CLASS = (20, 40)
SHIFTS = (-2, -1, 1, 2)


def main() -> None:
    args = parse_args(__doc__, target_per_class=0)
    started = time.time()
    k_t = args.target_per_class
    setup = router_run(args, target_per_class=k_t)
    job, branch, prep, train, group = setup.job, setup.branch, setup.prep, setup.train, setup.group
    n_cloned = len(branch.cloned_index)
    module = job.modules[0]
    source_classes = len(module.manifest.label_names)
    others = [i for i in range(source_classes) if i not in module.cloned]
    lse_cloned = train["z_t"][: len(prep.x)][prep.y >= 0].logsumexp(1)
    tau = float(torch.quantile(lse_cloned, 0.95).half())
    veto = (lambda f: energy_allowed(f["z_t"], torch.tensor([tau]))) if k_t == 0 else (
        lambda f: torch.ones(len(f["z_t"])))
    read = (lambda f: torch.cat([f["f_t"], f["f_b"]], 1)) if k_t == 0 else candidates
    half_width = (train["f_t"].shape[1] + train["f_b"].shape[1]) // 2
    if k_t:
        stand_in = prep.stand_in if prep.stand_in is not None else torch.zeros(len(prep.x), bool)
    else:  # every target-side row of prep.x is a stand-in
        stand_in = prep.y < 0
    is_stand_in = torch.cat([stand_in, torch.zeros(len(prep.x_neg), dtype=torch.bool)])

    def fit(x_fit: torch.Tensor, g_fit: torch.Tensor) -> Callable[[Features], torch.Tensor]:
        parting = DiscriminantFit(x_fit.double(), g_fit, n_cloned, 0.1).parting_weight()
        cols = parting.argsort(descending=True)[:half_width].sort().values
        gate = gate_of(x_fit[:, cols], g_fit, n_cloned, folded=False)
        return lambda f: gate(read(f)[:, cols]) * veto(f)

    def score(gate: Callable[[Features], torch.Tensor]) -> dict:
        g_old, g_new = gate(setup.test_old), gate(setup.test_new)
        row = setup.score(g_old, g_new)
        if k_t:
            log_odds = lambda g: g.double().clamp(1e-12, 1 - 1e-12).logit()  # noqa: E731
            row |= {f"shift{b}": setup.score((log_odds(g_old) + b).sigmoid(),
                                             (log_odds(g_new) + b).sigmoid()) for b in SHIFTS}
        return row

    built = fit(read(train), group)
    rows = {"built": score(built)}
    if k_t:
        rows["built-no_stand_ins"] = score(fit(read(train)[~is_stand_in], group[~is_stand_in]))
    for n in PER_CLASS:
        cfg = SynthesizeConfig(per_class=n)
        x_src = synthesize_target_samples(module.source, source_classes,
                                          tuple(module.manifest.input_shape), cfg, args.seed)
        x_src = x_src[torch.isin(torch.arange(source_classes).repeat(n), torch.tensor(others))]
        f_src = router_features(job.target, branch, x_src)
        x_all = torch.cat([read(train), read(f_src)])
        g_all = torch.cat([group, n_cloned + f_src["z_t"].argmax(1)])
        rows[f"+source{n}"] = score(fit(x_all, g_all))
        keep = torch.cat([~is_stand_in, torch.ones(len(x_src), dtype=torch.bool)])
        rows[f"+source{n}" + ("-no_stand_ins" if k_t else "_only")] = score(
            fit(x_all[keep], g_all[keep]))
        rows[f"source{n}_opened"] = round(float(built(f_src).mean()), 4)
    print(json.dumps({"source": module.manifest.name, "zoo_seed": args.zoo_seed,
                      "seed": args.seed, "target_per_class": k_t,
                      "position": list(setup.position),
                      "seconds": round(time.time() - started), "rows": rows}))


if __name__ == "__main__":
    main()
