"""A Gaussian-discriminant router against the built gate, on one real clone (issue 14).

    OMP_NUM_THREADS=1 python bench/bench_lda_gate.py [ZOO_SEED [CLONE_SEED [K_T]]] \\
        [--zoo-root /tmp/pnc] >> bench/results/lda_gate.jsonl

Clones ``{5, 6}`` of ``mnist-cnn-5to9`` into ``mnist-cnn-0to4`` (k = 20) on the zoo
trained from ``ZOO_SEED`` in ``ZOO_ROOT/zoo<ZOO_SEED>`` (built when missing, about a
minute) exactly as ``pnc clone`` does (same plan, masks, search),
then scores routers on the test split, the branch unchanged:

- ``built``: the package's gate (MLP x energy veto); ``mlp_only``, ``veto_only``;
  ``oracle_branch``: every cloned input to the branch, every target input to the target.
- ``lda[KEYS]sS``: linear discriminant analysis on standardized features ``KEYS``
  (``f_t``: the target's pooled penultimate features, ``f_b``: the branch's, ``z_t``,
  ``z_s``: both heads' logits), one Gaussian per cloned class and per target class
  (target samples labelled by the target's own prediction), a shared covariance
  shrunk by ``S`` toward its mean variance, class-balanced priors; the gate is the
  posterior mass of the cloned classes. ``+veto`` multiplies in the built veto,
  ``_val`` is the same router on the validation split.

Trained on the gate's own training set (augmented ``D`` and the occluded negatives).
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pnc_net.cloning import CloneConfig, plan, searched_branch
from pnc_net.data import load_mnist
from pnc_net.zoo import Zoo
from pnc_net.zoo_train import build_default_zoo

Features = dict[str, torch.Tensor]
CLONED = ("5", "6")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("zoo_seed", type=int, nargs="?", default=0)
    ap.add_argument("seed", type=int, nargs="?", default=0, help="clone seed")
    ap.add_argument("k_t", type=int, nargs="?", default=20, help="target samples per class")
    ap.add_argument("--zoo-root", type=Path, default=Path("/tmp/pnc"))
    args = ap.parse_args()
    zoo_seed, seed, k_t = args.zoo_seed, args.seed, args.k_t
    torch.set_num_threads(1)
    data = load_mnist()
    zoo = Zoo(args.zoo_root / f"zoo{zoo_seed}")
    build_default_zoo(zoo, data, progress=False, seed=zoo_seed)
    cfg = CloneConfig.single("mnist-cnn-0to4", "mnist-cnn-5to9", CLONED, per_class=20,
                             target_per_class=k_t, seed=seed)
    started = time.time()
    job = plan(zoo, data, cfg)
    module = job.modules[0]
    position, branch = searched_branch(job)
    target, prep, cd = job.target, module.prepared, module.data

    @torch.no_grad()
    def features(x: torch.Tensor) -> Features:
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("z_t", "f_t", "z_s", "f_b")}
        for i in range(0, len(x), 512):
            xb = x[i : i + 512]
            f_t = target.head.features(target.forward_features(xb, target.num_blocks))
            z_s, f_b = branch.run(target.forward_features(xb, branch.position_r))
            for key, value in zip(("z_t", "f_t", "z_s", "f_b"), (target.head.fc(f_t), f_t, z_s, f_b)):
                parts[key].append(value)
        return {k: torch.cat(v) for k, v in parts.items()}

    x_test, y_test = data.split("test")
    names = data.label_names
    is_old = torch.isin(y_test, torch.tensor([names.index(n) for n in job.target_labels]))
    is_new = torch.isin(y_test, torch.tensor([names.index(n) for n in CLONED]))
    test_old, test_new = features(x_test[is_old]), features(x_test[is_new])
    y_new = torch.tensor([CLONED.index(names[i]) for i in y_test[is_new].tolist()])
    train = features(torch.cat([prep.x, prep.x_neg]))
    y_train = torch.cat([prep.y, torch.full((len(prep.x_neg),), -1)])
    val_old, val_new = features(cd.x_val_old), features(cd.x_val_new)
    cloned = branch.cloned_index
    n_t = len(job.target_labels)

    def routed(g_old: torch.Tensor, g_new: torch.Tensor, old: Features = test_old,
               new: Features = test_new, y: torch.Tensor = y_new) -> dict[str, float]:
        def fused(f: Features, g: torch.Tensor) -> torch.Tensor:
            return torch.cat([(1 - g)[:, None] * f["z_t"].softmax(1),
                              g[:, None] * f["z_s"][:, cloned].softmax(1)], 1).argmax(1)
        return {"locality": round(float((fused(old, g_old) == old["z_t"].argmax(1)).float().mean()), 4),
                "acc_new": round(float((fused(new, g_new) == y + n_t).float().mean()), 4)}

    gate = branch.gate

    def built(f: Features) -> torch.Tensor:
        return gate(f["z_t"], f["z_s"], f["f_b"])

    def mlp(f: Features) -> torch.Tensor:
        return torch.sigmoid(gate.logit(f["z_t"], f["z_s"], f["f_b"]))

    def veto(f: Features) -> torch.Tensor:
        return (f["z_t"].logsumexp(1) <= gate.energy_max).float()

    rows = {"built": routed(built(test_old), built(test_new)),
            "oracle_branch": routed(torch.zeros(int(is_old.sum())), torch.ones(len(y_new))),
            "mlp_only": routed(mlp(test_old), mlp(test_new)),
            "veto_only": routed(veto(test_old), veto(test_new))}
    for keys in (("f_t",), ("f_b",), ("f_t", "f_b"), ("f_t", "f_b", "z_t", "z_s")):
        for shrink in (0.1, 0.3, 0.6):
            g = lda_gate(train, y_train, keys, shrink)
            name = f"lda[{'+'.join(keys)}]s{shrink}"
            rows[name] = routed(g(test_old), g(test_new))
            if len(cd.x_val_old):
                rows[name + "_val"] = routed(g(val_old), g(val_new), val_old, val_new, cd.y_val_new)
            rows[name + "+veto"] = routed(g(test_old) * veto(test_old), g(test_new) * veto(test_new))
    print(json.dumps({"zoo_seed": zoo_seed, "seed": seed, "k_t": k_t, "position": list(position),
                      "energy_max": float(gate.energy_max), "seconds": round(time.time() - started),
                      "rows": rows}))


def lda_gate(train: Features, y: torch.Tensor, keys: tuple[str, ...], shrink: float):
    """``g(features) -> P(cloned class)`` from a shrunk shared-covariance Gaussian per class.

    ``y`` is the cloned index (0, 1) or -1 for target-side samples, which are split
    by the target's own predicted class: one Gaussian for "all target digits" would
    be a poor fit to five clusters."""
    x = torch.cat([train[k] for k in keys], 1)
    mu, sd = x.mean(0), x.std(0) + 1e-3
    z = (x - mu) / sd
    n_cloned = int(y.max()) + 1
    cid = torch.where(y >= 0, y, n_cloned + train["z_t"].argmax(1))
    classes = cid.unique()
    means = torch.stack([z[cid == c].mean(0) for c in classes])
    resid = z - means[torch.searchsorted(classes, cid)]
    cov = resid.T @ resid / len(z)
    cov = (1 - shrink) * cov + shrink * torch.eye(len(cov)) * cov.diagonal().mean()
    precision = torch.linalg.inv(cov)
    is_cloned = classes < n_cloned
    n_old = int((~is_cloned).sum())
    prior = torch.where(is_cloned, 0.5 / n_cloned, 0.5 / max(n_old, 1)).log()

    def gate(f: Features) -> torch.Tensor:
        d = ((torch.cat([f[k] for k in keys], 1) - mu) / sd)[:, None, :] - means[None]
        log_lik = -0.5 * torch.einsum("nkd,de,nke->nk", d, precision, d) + prior
        return log_lik.softmax(1)[:, is_cloned].sum(1)

    return gate


if __name__ == "__main__":
    main()
