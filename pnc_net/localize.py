"""Localization: which source filters serve the cloned classes (``docs/method.md`` 1-2).

1. *Localized samples*: the cloned-class samples plus LIME-style perturbations
   (random patches hidden), each weighted by a proximity kernel
   ``pi(x') = exp(-d(x, x')^2 / sigma^2)``, with ``d`` the fraction of hidden patches.
2. *Initial masks*: every filter scored by ``pi``-weighted first-order Taylor
   importance ``|sum_hw activation * gradient|`` of the cloned-class log-likelihood
   (over the cloned logits plus one "rest of the source" bucket, ``cloned_view``);
   the top ``keep_ratio`` of each unit is kept.
3. *Refinement*: bits relaxed to gates ``sigmoid(theta)``, trained to keep the
   masked source's distribution over ``cloned_view`` close to the full source's (KL at
   temperature T, ``pi``-weighted) under an L1 pull towards zero, then thresholded.

``refine_through_branch`` is the same step for the joint refinement of step 4 (the
tail's masks fed by the trained adapter; ``cloning.joint_refine`` runs the rounds).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pnc_net.devices import CPU, Compute
from pnc_net.models import ZooNet
from pnc_net.training import predict_logits

#: Samples per refinement step (drawn with replacement; fewer when there are fewer).
REFINE_SAMPLES = 128


@dataclass(frozen=True)
class LocalizeConfig:
    """Settings of the three localization steps (the defaults are the measured ones)."""

    perturbations_per_sample: int = 4
    patch_grid: int = 7  # patches per side for the LIME-style occlusion
    hide_prob: float = 0.25
    kernel_width: float = 0.25  # sigma of the proximity kernel
    keep_ratio: float = 0.5  # fraction of each unit's filters the initial mask keeps
    refine_steps: int = 60
    refine_lr: float = 0.1
    sparsity: float = 0.02  # lambda of the L1 term
    temperature: float = 2.0
    min_keep: int = 4  # never drop a unit below this many filters
    batch_size: int = 256  # samples per forward pass (scores, the teacher, refinement chunks)


def cloned_view(logits: torch.Tensor, cloned: torch.Tensor) -> torch.Tensor:
    """The cloned logits plus one "rest of the source" logit (``logsumexp`` of the others).

    Why the extra bucket: with one cloned class the softmax over the cloned logits
    alone is constant, so scores and refinement would see no signal at all; and
    even with several classes the part we keep must still tell a cloned class from
    everything else the source knows, which the bucket keeps in the objective.
    """
    rest = torch.ones(logits.shape[1], dtype=torch.bool, device=logits.device)
    rest[cloned] = False
    view = logits[:, cloned]
    if rest.any():
        view = torch.cat([view, logits[:, rest].logsumexp(1, keepdim=True)], dim=1)
    return view


def localized_samples(x: torch.Tensor, cfg: LocalizeConfig, gen: torch.Generator,
                      hide_prob: float | None = None, copies: int | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(samples, weights)``: the originals (weight 1) and occluded copies weighted by ``pi``."""
    copies = cfg.perturbations_per_sample if copies is None else copies
    hide_prob = cfg.hide_prob if hide_prob is None else hide_prob
    b, _, h, w = x.shape
    g = cfg.patch_grid
    hidden = torch.rand(b * copies, 1, g, g, generator=gen) < hide_prob
    keep = F.interpolate((~hidden).float(), size=(h, w), mode="nearest")
    perturbed = x.repeat(copies, 1, 1, 1) * keep
    distance = hidden.float().mean(dim=(1, 2, 3))
    weights = torch.exp(-(distance**2) / cfg.kernel_width**2)
    return torch.cat([x, perturbed]), torch.cat([torch.ones(b), weights])


def taylor_scores(source: ZooNet, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor,
                  cloned: torch.Tensor, batch_size: int = 256,
                  compute: Compute = CPU) -> dict[str, torch.Tensor]:
    """Per-filter importance for the cloned classes (``y`` indexes ``cloned``).

    A filter's first-order Taylor score on one sample is ``|d loss / d g|`` for a
    gate ``g = 1`` on it, which is ``|sum_hw activation * gradient|`` where the
    gate multiplies an activation, and sums over every place a coupled channel is
    read where it multiplies several (``graphnet``). ``source`` runs on
    ``compute.device``; the samples and the scores stay on the CPU.
    """
    widths = source.mask_widths()
    scores = {name: torch.zeros(w) for name, w in widths.items()}
    try:
        for i in range(0, len(x), batch_size):
            xb = compute.put(x[i : i + batch_size])
            gates = {name: torch.ones(len(xb), w, requires_grad=True, device=xb.device)
                     for name, w in widths.items()}
            source.set_gates(gates)
            logits = cloned_view(source(xb), compute.put(cloned))  # (b, |Y_c| + 1)
            w = compute.put(weights[i : i + batch_size])
            loss = (F.cross_entropy(logits, compute.put(y[i : i + batch_size]),
                                    reduction="none") * w).sum()
            grads = torch.autograd.grad(loss, list(gates.values()), allow_unused=True)
            for name, g in zip(gates, grads):
                if g is not None:
                    scores[name] += g.abs().sum(0).cpu()
    finally:
        source.set_gates(None)
    return scores


def top_fraction_masks(scores: dict[str, torch.Tensor], keep_ratio: float,
                       min_keep: int) -> dict[str, torch.Tensor]:
    """The initial masks: each unit's ``keep_ratio`` best-scored filters (at least ``min_keep``)."""
    masks = {}
    for name, s in scores.items():
        k = min(len(s), max(min_keep, round(keep_ratio * len(s))))
        m = torch.zeros(len(s), dtype=torch.bool)
        m[s.topk(k).indices] = True
        masks[name] = m
    return masks


def refine_masks(source: ZooNet, x: torch.Tensor, weights: torch.Tensor, cloned: torch.Tensor,
                 init: dict[str, torch.Tensor], cfg: LocalizeConfig,
                 gen: torch.Generator, compute: Compute = CPU) -> dict[str, torch.Tensor]:
    """Relax bits to gates, fit local fidelity + L1, threshold back (method.md step 2).

    The gates' logits live on ``compute.device`` with ``source``; the batch indices are
    drawn on the CPU generator ``gen``, and the masks come back to the CPU."""
    teacher = (cloned_view(predict_logits(source, x, cfg.batch_size, compute=compute), cloned)
               / cfg.temperature).log_softmax(1)
    theta = {k: compute.put(torch.where(m, 2.0, -2.0)).requires_grad_(True)
             for k, m in init.items()}
    return _fit_gates(source, theta, lambda chunk: source(compute.put(x[chunk])), teacher,
                      weights, cloned, cfg, gen, compute)


def _fit_gates(source: ZooNet, theta: dict[str, torch.Tensor],
               student_logits: Callable[[torch.Tensor], torch.Tensor],
               teacher: torch.Tensor, weights: torch.Tensor, cloned: torch.Tensor,
               cfg: LocalizeConfig, gen: torch.Generator, compute: Compute
               ) -> dict[str, torch.Tensor]:
    """The refinement loop both mask steps share: Adam on the gate logits ``theta`` (on
    ``compute.device``) for the weighted KL of ``student_logits(sample indices)`` to the
    ``teacher``'s log-probabilities over the cloned view, plus the L1 term; thresholded."""
    opt = torch.optim.Adam(theta.values(), lr=cfg.refine_lr)
    on_dev = compute.put(cloned)
    for _ in range(cfg.refine_steps):
        idx = torch.randint(0, len(teacher), (min(REFINE_SAMPLES, len(teacher)),),
                            generator=gen)
        w_total = weights[idx].sum()
        opt.zero_grad()
        # The step's samples go through in chunks of at most cfg.batch_size with their
        # gradients summed, so a large model's step holds one chunk's activations;
        # one chunk (the MNIST default) is the plain step, bit for bit.
        for i, chunk in enumerate(idx.split(cfg.batch_size)):
            source.set_gates({k: torch.sigmoid(t) for k, t in theta.items()})
            student = (cloned_view(student_logits(chunk), on_dev)
                       / cfg.temperature).log_softmax(1)
            w = compute.put(weights[chunk])
            kl = (F.kl_div(student, compute.put(teacher[chunk]), log_target=True,
                           reduction="none").sum(1) * w).sum() / compute.put(w_total)
            loss = kl * cfg.temperature**2
            if i == 0:  # the sparsity term once per step
                l1 = torch.cat([torch.sigmoid(t) for t in theta.values()]).mean()
                loss = loss + cfg.sparsity * l1
            loss.backward()
        opt.step()
    source.set_gates(None)
    return _threshold(theta, cfg.min_keep)


def _threshold(theta: dict[str, torch.Tensor], min_keep: int) -> dict[str, torch.Tensor]:
    """Gate logits back to bits (kept where positive, never fewer than ``min_keep``)."""
    masks = {}
    for k, t in theta.items():
        m = t.detach() > 0
        if m.sum() < min(min_keep, len(m)):
            m = torch.zeros_like(m)
            m[t.detach().topk(min(min_keep, len(m))).indices] = True
        masks[k] = m.cpu()
    return masks


def units_after(source: ZooNet, position_s: int, input_shape: tuple[int, ...]) -> list[str]:
    """The mask units the branch of boundary S computes: those whose gates a pass from S
    reaches (found by gradient, so any network that reads its gates works), minus the
    unit owning boundary S, whose kept channels are the adapter's outputs."""
    device = next(source.parameters()).device
    gates = {k: torch.ones(w, device=device, requires_grad=True)
             for k, w in source.mask_widths().items()}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        h = source.forward_features(torch.rand(2, *input_shape, generator=gen).to(device),
                                    position_s)
    source.set_gates(gates)
    try:
        out = source.forward_from(h, position_s)
        if not out.requires_grad:  # no gate read after S (only the head is left)
            return []
        out.square().sum().backward()
    finally:
        source.set_gates(None)
    owner = source.feature_info(input_shape)[position_s].masked_by
    return sorted(k for k, g in gates.items()
                  if k != owner and g.grad is not None and bool(g.grad.abs().sum() > 0))


def refine_through_branch(source: ZooNet, position_s: int, units: list[str],
                          u: torch.Tensor, teacher_logits: torch.Tensor, cloned: torch.Tensor,
                          masks: dict[str, torch.Tensor], cfg: LocalizeConfig,
                          gen: torch.Generator, compute: Compute = CPU,
                          ) -> dict[str, torch.Tensor]:
    """Joint refinement's mask step (method.md step 4): the masks of ``units`` (the
    source's tail after S) refined as in step 2, but fed what the branch feeds them, the
    adapter's output ``u`` on the target's features (full width at S, dropped channels
    zero), against the full source's logits on the same inputs. Returns ``masks`` with
    those units replaced. ``source`` is a private copy on ``compute.device``."""
    teacher = (cloned_view(teacher_logits, cloned) / cfg.temperature).log_softmax(1)
    theta = {k: compute.put(torch.where(masks[k], 2.0, -2.0)).requires_grad_(True)
             for k in units}
    refined = _fit_gates(source, theta,
                         lambda chunk: source.forward_from(compute.put(u[chunk]), position_s),
                         teacher, torch.ones(len(u)), cloned, cfg, gen, compute)
    return {**masks, **refined}


def localize(source: ZooNet, x_new: torch.Tensor, y_new: torch.Tensor,
             cloned: tuple[int, ...], cfg: LocalizeConfig | None = None,
             seed: int = 0, compute: Compute = CPU) -> dict[str, torch.Tensor]:
    """Masks (unit name -> bool per filter, on the CPU) of the source part that serves
    ``cloned``.

    Works on a private copy of ``source``, on ``compute.device``: the zoo model is
    never touched. The samples are drawn on the CPU whatever the device.
    """
    cfg = cfg or LocalizeConfig()
    if not source.mask_widths():
        return {}  # nothing can be dropped exactly (e.g. channel shuffles): keep the whole source
    gen = torch.Generator().manual_seed(seed)
    work = copy.deepcopy(source).to(compute.device).eval()
    x, w = localized_samples(x_new, cfg, gen)
    y = y_new.repeat(cfg.perturbations_per_sample + 1)
    idx = torch.tensor(cloned, dtype=torch.long)
    scores = taylor_scores(work, x, y, w, idx, cfg.batch_size, compute)
    init = top_fraction_masks(scores, cfg.keep_ratio, cfg.min_keep)
    if cfg.refine_steps <= 0:
        return init
    return refine_masks(work, x, w, idx, init, cfg, gen, compute)
