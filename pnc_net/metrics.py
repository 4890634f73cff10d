"""The metrics of ``docs/method.md``, always on held-out test data."""

from __future__ import annotations

import copy
from typing import Protocol

import torch
import torch.nn.functional as F

from pnc_net.data import Dataset, Images, iter_batches
from pnc_net.devices import CPU, Compute
from pnc_net.models import ZooNet
from pnc_net.superbody import Superbody
from pnc_net.training import predict_logits


class Evaluable(Protocol):
    """What ``clone_metrics`` needs: a ``Superbody``, or a baseline dressed as one."""

    @property
    def label_names(self) -> tuple[str, ...]:
        """The output columns, target labels first."""

    @property
    def target_labels(self) -> tuple[str, ...]:
        """The target's labels (the first output columns)."""

    @property
    def target(self) -> ZooNet:
        """The untouched zoo target that locality is measured against."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Scores over ``label_names`` (their argmax is the prediction)."""

    def module_bytes(self) -> int:
        """fp32 bytes of every weight the model uses."""


def _samples_of(data: Dataset, labels: tuple[str, ...], split: str = "test",
                ) -> tuple[Images, torch.Tensor, list[str]]:
    """The split's images, the indices of the samples whose label name is in
    ``labels`` and their labels as names (images are read a batch at a time later)."""
    x, y = data.split(split)
    wanted = torch.tensor([data.label_names.index(n) for n in labels if n in data.label_names])
    keep = torch.nonzero(torch.isin(y, wanted)).flatten()
    return x, keep, [data.label_names[i] for i in y[keep].tolist()]


def clone_metrics(superbody: Evaluable, data: Dataset,
                  sources: list[tuple[ZooNet, tuple[str, ...]]] | None = None,
                  batch_size: int = 512, compute: Compute = CPU) -> dict[str, float]:
    """``acc_old``, ``acc_new``, ``acc_all``, ``locality``, ``target_acc_old``, and
    ``source_acc_new`` when ``sources`` (model, label names) are given; the test
    split is read ``batch_size`` images at a time. The models must be on
    ``compute.device``; predictions come back to the CPU."""
    names = superbody.label_names
    target_labels = superbody.target_labels
    new_labels = names[len(target_labels):]
    index = {n: i for i, n in enumerate(names)}
    x, i_old, y_old = _samples_of(data, target_labels)
    _, i_new, y_new = _samples_of(data, new_labels)
    yo = torch.tensor([index[n] for n in y_old], dtype=torch.long)
    yn = torch.tensor([index[n] for n in y_new], dtype=torch.long)
    p_old = predict_logits(superbody, x, batch_size, i_old, compute).argmax(1)
    p_new = predict_logits(superbody, x, batch_size, i_new, compute).argmax(1)
    t_old = predict_logits(superbody.target, x, batch_size, i_old, compute).argmax(1)
    n_all = len(yo) + len(yn)
    out = {
        "acc_old": float((p_old == yo).float().mean()),
        "acc_new": float((p_new == yn).float().mean()),
        "acc_all": float(((p_old == yo).sum() + (p_new == yn).sum()) / max(n_all, 1)),
        "locality": float((p_old == t_old).float().mean()),
        "target_acc_old": float((t_old == yo).float().mean()),
        "superbody_bytes": superbody.module_bytes(),
    }
    if sources:
        correct, total = 0, 0
        for model, labels in sources:
            xs, i_s, ys = _samples_of(data, tuple(n for n in labels if n in new_labels))
            src_idx = torch.tensor([labels.index(n) for n in ys], dtype=torch.long)
            correct += int((predict_logits(model, xs, batch_size, i_s, compute).argmax(1)
                            == src_idx).sum())
            total += len(ys)
        out["source_acc_new"] = correct / max(total, 1)
    if isinstance(superbody, Superbody) and superbody.attached():
        out.update(gap_decomposition(superbody, data, batch_size=batch_size, compute=compute))
    return out


#: What ``gap_decomposition`` returns (``pnc_cli.common.GAP_KEYS`` repeats it so that the
#: CLI starts without importing torch; a test checks they agree).
GAP_KEYS = ("routing_error_old", "routing_error_new", "branch_error_new", "oracle_acc_old",
            "oracle_acc_new")


def gap_decomposition(superbody: Superbody, data: Dataset, split: str = "test",
                      batch_size: int = 512, compute: Compute = CPU) -> dict[str, float]:
    """Where a superbody loses against the two networks it is made of.

    An *oracle gate* knows the true class set: it sends a target-class input to
    the target and a cloned-class input to the branch that holds its class. Its
    ``oracle_acc_old`` is the target's own accuracy and its ``oracle_acc_new``
    the branches' accuracy on their own labels: the superbody's ceiling. The
    real gate's errors split exactly in two (``docs/method.md``, gap decomposition):

    - ``routing_error_old``: target-class inputs predicted as a cloned label
      (``1 - locality``: every other target-class answer equals the target's);
    - ``routing_error_new``: cloned-class inputs predicted outside their own
      branch's labels (the gate kept them in the target, or another branch won);
    - ``branch_error_new``: cloned-class inputs that reached their branch but got
      its other label, so ``routing_error_new + branch_error_new = 1 - acc_new``.
    """
    names = superbody.label_names
    n_t = len(superbody.target_labels)
    branches = superbody.attached()
    starts = torch.tensor([n_t + sum(len(b.label_names) for b in branches[:i])
                           for i in range(len(branches))])
    x, i_old, y_old = _samples_of(data, superbody.target_labels, split)
    _, i_new, y_new = _samples_of(data, names[n_t:], split)
    truth = torch.tensor([names.index(n) for n in y_new], dtype=torch.long)
    owner = torch.bucketize(truth, starts, right=True) - 1  # the branch holding each class
    pred_old = predict_logits(superbody, x, batch_size, i_old, compute).argmax(1)
    t_old = predict_logits(superbody.target, x, batch_size, i_old, compute).argmax(1)
    fused, branch_votes = [], []  # per batch: the superbody's answer, each branch's own
    superbody.eval()
    with torch.no_grad():
        for xb in iter_batches(x, i_new, batch_size, compute.device):
            with compute.autocast():
                parts = superbody.parts(xb)
                fused.append(superbody.fuse(parts).argmax(1).cpu())
            branch_votes.append(torch.stack([zs[:, b.cloned_index].argmax(1) for b, zs
                                             in zip(branches, parts["z_s"])], 1).cpu())
    pred_new = torch.cat(fused) if fused else truth[:0]
    votes = torch.cat(branch_votes) if branch_votes else truth[:0, None]
    oracle_new = torch.empty_like(truth)  # each input's own branch decides among its labels
    in_own = torch.zeros_like(truth, dtype=torch.bool)
    for i, b in enumerate(branches):
        rows = owner == i
        own = starts[i] + torch.arange(len(b.label_names))
        oracle_new[rows] = votes[rows, i] + starts[i]
        in_own[rows] = torch.isin(pred_new[rows], own)
    n_new = max(len(truth), 1)
    y_old_idx = torch.tensor([names.index(n) for n in y_old], dtype=torch.long)
    return {
        "routing_error_old": float((pred_old >= n_t).float().mean()),
        "routing_error_new": float((~in_own).sum()) / n_new,
        "branch_error_new": float((in_own & (pred_new != truth)).sum()) / n_new,
        "oracle_acc_old": float((t_old == y_old_idx).float().mean()),
        "oracle_acc_new": float((oracle_new == truth).sum()) / n_new,
    }


def penultimate(model: ZooNet, x: Images, compute: Compute = CPU) -> torch.Tensor:
    """Pooled penultimate features ``(n, c)`` of ``model`` (on ``compute.device``, gates as
    set), without grad, back on the CPU."""
    with torch.no_grad():
        return torch.cat([model.head.features(model.forward_features(xb, model.num_blocks)).cpu()
                          for xb in iter_batches(x, batch_size=512, device=compute.device)])


def sim_matrix(source: ZooNet, masks: dict[str, torch.Tensor], data: Dataset,
               split: str = "test") -> dict:
    """Conditional similarity of the transferable module to its source.

    ``per_class[i]``: mean cosine between the module's and the full source's
    penultimate features on samples of class ``i``. ``matrix[i][j]``: cosine
    between the module's mean feature on class ``i`` and the source's on class
    ``j``: its diagonal shows what the module keeps, per class.
    """
    module = copy.deepcopy(source)
    module.set_gates({k: v.float() for k, v in masks.items()})
    x, y = data.split(split)
    f_src, f_mod = penultimate(source, x), penultimate(module, x)
    classes = sorted(set(y.tolist()))
    per_class = [float(F.cosine_similarity(f_mod[y == c], f_src[y == c]).mean()) for c in classes]
    mean_src = torch.stack([f_src[y == c].mean(0) for c in classes])
    mean_mod = torch.stack([f_mod[y == c].mean(0) for c in classes])
    matrix = F.cosine_similarity(mean_mod.unsqueeze(1), mean_src.unsqueeze(0), dim=2)
    return {"labels": [data.label_names[c] for c in classes], "per_class": per_class,
            "matrix": matrix.tolist()}


def detach_is_exact(superbody: Superbody, fresh_target: ZooNet, x: Images) -> bool:
    """True when the detached superbody's outputs equal those of ``fresh_target`` (the
    same zoo model loaded anew from disk) bit for bit. Branches are re-attached after."""
    branches = superbody.attached()
    detached = superbody.detach()
    try:
        same = torch.equal(predict_logits(detached, x), predict_logits(fresh_target, x))
    finally:
        for branch in branches:
            superbody.attach(branch)
    return same
