"""Insertion: train the adapter and fusion gate for one candidate ``(R, S)``.

``docs/method.md`` step 3. The adapter starts from a least-squares fit of the
source's own features at ``S`` (then truncated to low rank by SVD) and is
trained with cross-entropy and distillation on the cloned classes plus a
feature-matching MSE. The gate is then fitted on cached features: a linear
discriminant in closed form (``fit_discriminant_gate``, the default), or the MLP
with class-balanced BCE (``train_gate``, ``gate="mlp"``): open on cloned-class
samples, closed on target-class samples (real, or inverted stand-ins) and on
*evidence-free negatives* (heavily occluded cloned samples).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from pnc_net.devices import CPU, Compute
from pnc_net.errors import InvalidInputError, PreconditionError
from pnc_net.localize import LocalizeConfig, localized_samples
from pnc_net.models import ZooNet
from pnc_net.superbody import (
    GATE_TAPS,
    NO_ENERGY_VETO,
    Branch,
    DiscriminantGate,
    Superbody,
    build_branch,
    tap_boundaries,
    target_gate_features,
)
from pnc_net.training import (
    AUGMENTS,
    VIEW_SHIFTS,
    batches,
    predict_logits,
    random_augment,
    random_shift,
)


@dataclass(frozen=True)
class InsertConfig:
    """Training settings of the adapter and fusion gate (the defaults are the measured ones)."""

    adapter_rank: int = 16  # with its weights on the int8 grid: the bytes of rank 8 in fp16
    gate_hidden: int = 8
    gate_weight_decay: float = 1e-2  # measured: 1e-4 -> 1e-2 raised test locality 0.972 -> 0.978
    augment_copies: int = 3  # shifted copies of each cloning sample, besides the original
    max_shift: int = 2
    # the copies' transforms besides shifts (training.random_augment: affine, permute,
    # invert): "auto" (each one under which the networks keep their answers:
    # augment_transforms), "off", or those named, comma-separated (docs/method.md,
    # augmentation: affine lifts MNIST's locality and acc_old, colour the rgb acc_new)
    augment: str = "auto"
    epochs: int = 6
    lr: float = 3e-3
    batch_size: int = 64  # adapter training steps
    eval_batch_size: int = 512  # forward passes without grad (cached features, scores)
    mse_weight: float = 1.0
    kd_weight: float = 1.0
    temperature: float = 2.0
    gate_steps: int = 400
    gate_lr: float = 1e-2
    negative_hide_prob: float = 0.7  # occlusion that destroys class evidence
    lsq_samples: int = 256
    # the gate's energy veto (superbody.FusionGate): quantiles of the target's logsumexp
    # on cloned samples tried as ``energy_max``, chosen on validation with real target
    # samples (None = no veto); without any, the fixed one below (docs/method.md, router)
    veto_quantiles: tuple[float | None, ...] = (None, 0.98, 0.95, 0.9)
    veto_quantile_without_target_data: float | None = 0.95
    # the router: "auto" (the measured best: a DiscriminantGate, with or without real target
    # samples, since stop 28), "mlp" (the FusionGate) or "lda" (a DiscriminantGate); method.md
    gate: str = "auto"
    gate_shrink: float = 0.1  # the discriminant's covariance shrinkage toward its mean variance
    # target boundaries the discriminant reads besides its penultimate features
    # (superbody.GATE_TAPS: none, early, all), or "auto": all with real target samples,
    # none without (the inverted stand-ins' early features do not look like real
    # digits', measured: docs/method.md, the router)
    gate_taps: str = "auto"
    # how many of those features it keeps, the ones it weighs most: "half" (half the width
    # of its untapped features [f_t, f_b]: fewer bytes than no taps, and better routing,
    # measured), "all", or a count
    gate_features: str = "half"
    # whether the target's inverted stand-ins join its real digits in the discriminant's
    # fit (at k_t = 0 they are its whole target side, whatever this says), or None: both
    # fits are made and validation keeps the better (ties keep them). Left out, acc_new
    # rose 0.045-0.05 on the rgb pairs at equal acc_old, and 0.017 on MNIST for 0.003 of
    # acc_old (router refitted only: docs/method.md, the router)
    gate_stand_ins: bool | None = None
    # the discriminant's prior log-odds of the cloned classes against the target's: 0 puts
    # half the prior mass on each side; below 0 the gate needs more evidence to open
    gate_log_odds: float = 0.0
    # rounds of joint refinement of the chosen branch (method.md step 4, cloning.joint_refine):
    # tail masks refined through the inserted path, then adapter and gate retrained
    joint_rounds: int = 0
    # the discriminant gate's second look (superbody.Superbody.parts): how many fixed views of
    # an input it also reads where it is unsure, at most the 8 shifts; 0 (the default) is none
    gate_views: int = 0

    def __post_init__(self) -> None:
        forced = self.augment.split(",") if self.augment not in ("auto", "off") else []
        unknown = [t for t in forced if t not in AUGMENTS]
        if unknown or (self.augment not in ("auto", "off") and not forced):
            raise InvalidInputError(f"unknown augmentation {self.augment!r}: use auto, off, or "
                                    f"some of {', '.join(AUGMENTS)} (comma-separated)")
        if self.gate not in GATE_KINDS:
            raise InvalidInputError(f"unknown gate {self.gate!r}; use one of {', '.join(GATE_KINDS)}")
        if self.gate_taps not in ("auto", *GATE_TAPS):
            raise InvalidInputError(f"unknown gate taps {self.gate_taps!r}; use one of "
                                    f"auto, {', '.join(GATE_TAPS)}")
        if not (self.gate_features in ("half", "all") or
                (self.gate_features.isdigit() and int(self.gate_features) > 0)):
            raise InvalidInputError(f"gate features {self.gate_features!r} must be half, all or "
                                    "a positive count")
        if not 0 < self.gate_shrink <= 1:
            raise InvalidInputError(f"gate_shrink {self.gate_shrink} must be in (0, 1]")
        if not -8 <= self.gate_log_odds <= 8:  # beyond, the softsign bound (LOG_ODDS_BOUND) eats it
            raise InvalidInputError(f"gate_log_odds {self.gate_log_odds} must be in [-8, 8]")
        if self.gate_log_odds and self.gate == "mlp":
            raise InvalidInputError("gate_log_odds is the discriminant gate's prior; the mlp "
                                    "gate has none: leave it at 0 or use --gate auto")
        if not 0 <= self.joint_rounds <= 10:
            raise InvalidInputError(f"joint_rounds {self.joint_rounds} must be in 0..10")
        if not 0 <= self.gate_views <= len(VIEW_SHIFTS):  # more would repeat them
            raise InvalidInputError(
                f"gate_views {self.gate_views} must be in 0..{len(VIEW_SHIFTS)}: there are "
                f"{len(VIEW_SHIFTS)} fixed views (one-pixel shifts), and more would repeat them")
        if self.gate_views and self.gate == "mlp":
            raise InvalidInputError("gate_views is the discriminant gate's second look; the mlp "
                                    "gate has none: leave it at 0 or use --gate auto")


GATE_KINDS = ("auto", "mlp", "lda")
# "auto" keeps a transform under which every network keeps 80% of its score, over 4 draws of
# it per sample: MNIST's networks keep 0.45-0.6 under inversion, 0.94-1.0 under the affine;
# the rgb zoo's 0.8-1.1 under each of the three (on 40 cloned digits alone a weak source's
# score was too noisy: augment_judges adds the validation ones). A first draw whose share
# is AUGMENT_SURE or more from AUGMENT_KEEPS decides alone (about 2.5 standard errors on 80
# to 100 digits): the other draws would cost the rgb pairs' clone 4-5 s and change nothing
AUGMENT_KEEPS = 0.8
AUGMENT_DRAWS = 4
AUGMENT_SURE = 0.1


@dataclass
class CloneData:
    """The cloning data ``D`` and its validation counterpart, already in the target's space.

    ``y_new`` indexes the cloned classes; target-class samples need no labels
    (the target's own predictions serve, as the method says).
    """

    x_new: torch.Tensor
    y_new: torch.Tensor
    x_old: torch.Tensor
    x_val_new: torch.Tensor
    y_val_new: torch.Tensor
    x_val_old: torch.Tensor
    real_val_old: bool = True  # False: x_val_old are inverted stand-ins (k_t = 0)
    old_stand_in: torch.Tensor | None = None  # bool per x_old row: an inverted stand-in


@dataclass
class Prepared:
    """Candidate-independent tensors computed once per clone job."""

    x: torch.Tensor  # augmented D: new samples first, then old
    y: torch.Tensor  # cloned index for new samples, -1 for old
    z_src: torch.Tensor  # full source logits on x
    x_neg: torch.Tensor  # evidence-free negatives
    x_val_neg: torch.Tensor
    stand_in: torch.Tensor | None = None  # bool per x row: an inverted stand-in
    augment: tuple[str, ...] = ()  # the copies' transforms besides shifts (random_augment)
    augment_checks: dict | None = None  # what augment_transforms measured, for the report


# who judges a transform: (role, network, inputs, labels or None: answers kept instead)
Judge = tuple[str, torch.nn.Module, torch.Tensor, torch.Tensor | None]


def augment_transforms(cfg: InsertConfig, channels: int, judges: list[Judge], seed: int,
                       compute: Compute = CPU) -> tuple[tuple[str, ...], dict[str, dict]]:
    """The transforms that augment the copies of ``D`` besides shifts, and the check
    behind each (JSON-ready, for the report).

    ``"auto"`` keeps a transform when every judge passes under it, over up to
    ``AUGMENT_DRAWS`` draws of it per sample (``kept_share``): a ``(role, network, x,
    labels)`` with labels keeps
    ``AUGMENT_KEEPS`` of its accuracy on ``x``; one without (``None``: a target's digits
    have no labels) gives the same answer on ``AUGMENT_KEEPS`` of them. MNIST's networks
    pass the affine and fail inversion (they have only seen white on black); the rgb zoo,
    trained where colour is noise, passes all three. ``permute`` needs more than one
    channel."""
    if cfg.augment == "off":
        return (), {}
    if cfg.augment != "auto":
        return tuple(t for t in AUGMENTS if t in cfg.augment.split(",")), {}
    gen = torch.Generator().manual_seed(seed + 1)  # its own: the clone's draws stay as they were
    answers = [predict_logits(net, x, cfg.eval_batch_size, compute=compute).argmax(1)
               for _, net, x, _ in judges]  # without the transform: once, not per transform
    kept, checks = [], {}
    for name in (t for t in AUGMENTS if t != "permute" or channels > 1):
        check: dict = {}
        for (role, net, x, labels), before in zip(judges, answers):
            share = kept_share(net, x, labels, before, name, gen, cfg.eval_batch_size, compute)
            check[role] = min(share, check.get(role, math.inf))
        check["kept"] = all(v >= AUGMENT_KEEPS for v in check.values())
        checks[name] = check
        if check["kept"]:
            kept.append(name)
    return tuple(kept), checks


def kept_share(net: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor | None,
               before: torch.Tensor, name: str, gen: torch.Generator, batch_size: int,
               compute: Compute = CPU) -> float:
    """What ``net`` keeps under transform ``name``: its accuracy on ``x`` drawn through it
    over its plain accuracy (with ``labels``), or the share of its plain answers ``before``
    it still gives (without). One draw per sample first; the other ``AUGMENT_DRAWS - 1``
    only when that share is within ``AUGMENT_SURE`` of ``AUGMENT_KEEPS``, where one draw's
    noise could flip the decision."""
    want = before if labels is None else labels
    plain = 1.0 if labels is None else float((before == labels).float().mean().clamp_min(1e-6))
    agree = torch.zeros(0, dtype=torch.bool)
    for draws in (1, AUGMENT_DRAWS - 1):
        drawn = random_augment(x.repeat(draws, *[1] * (x.dim() - 1)), (name,), gen)
        after = predict_logits(net, drawn, batch_size, compute=compute).argmax(1)
        agree = torch.cat([agree, after.cpu() == want.cpu().repeat(draws)])
        share = float(agree.float().mean()) / plain
        if abs(share - AUGMENT_KEEPS) >= AUGMENT_SURE:
            break
    return share


def augment_judges(target: ZooNet, source: ZooNet, data: CloneData,
                   cloned: tuple[int, ...]) -> list[Judge]:
    """Who judges a clone's augmentation: the source on the cloned training and
    validation samples (against their labels) and, when there are real ones, the target
    on its validation digits (its inverted stand-ins are not its data)."""
    x = torch.cat([data.x_new, data.x_val_new])  # 40 digits alone left the check noisy
    judges: list[Judge] = [("source", source, x,
                            torch.tensor(cloned)[torch.cat([data.y_new, data.y_val_new])])]
    if data.real_val_old and len(data.x_val_old):
        judges.append(("target", target, data.x_val_old, None))
    return judges


def prepare(source: ZooNet, data: CloneData, cfg: InsertConfig, seed: int,
            compute: Compute = CPU, augment: tuple[str, ...] = ()) -> Prepared:
    """Augmented ``D`` (shifted copies, through ``augment``'s transforms too), the source's
    logits on it and the occluded negatives.

    Every candidate position trains on these, so they are drawn once per module (on
    the CPU; ``source`` runs on ``compute.device``, and every tensor is on the CPU).
    """
    gen = torch.Generator().manual_seed(seed)
    base = torch.cat([data.x_new, data.x_old])
    y = torch.cat([data.y_new, torch.full((len(data.x_old),), -1, dtype=torch.long)])
    copies = [base] + [random_augment(random_shift(base, cfg.max_shift, gen), augment, gen)
                       for _ in range(cfg.augment_copies)]
    n_new = len(data.x_new)
    xs = torch.cat([c[:n_new] for c in copies] + [c[n_new:] for c in copies])
    ys = torch.cat([y[:n_new]] * len(copies) + [y[n_new:]] * len(copies))
    stand_in = None
    if data.old_stand_in is not None:  # the rows of xs, in the same order
        stand_in = torch.cat([torch.zeros(n_new * len(copies), dtype=torch.bool)]
                             + [data.old_stand_in.bool()] * len(copies))
    loc = LocalizeConfig(hide_prob=cfg.negative_hide_prob)
    neg, _ = localized_samples(data.x_new, loc, gen, copies=1)
    val_neg, _ = localized_samples(data.x_val_new, loc, gen, copies=1)
    return Prepared(xs, ys, predict_logits(source, xs, cfg.eval_batch_size, compute=compute),
                    neg[len(data.x_new):], val_neg[len(data.x_val_new):], stand_in, augment)


def fit_adapter_lstsq(branch: Branch, h_r: torch.Tensor, f_s: torch.Tensor,
                      ridge: float = 1e-3) -> None:
    """Least-squares start: the linear map from target features to source features,
    truncated to the adapter's rank by SVD. One row per grid position, whatever the
    layouts (``Adapter.lstsq_rows``: a token boundary's patches on their grid); a token
    output's class tokens then get the mean residual as their offset (``fit_prefix``)."""
    a = branch.adapter
    h, f = a.lstsq_rows(h_r, f_s)  # (n*h*w, c_in), (n*h*w, c_out)
    h1 = torch.cat([h, torch.ones(len(h), 1)], 1)
    gram = h1.T @ h1 + ridge * len(h1) * torch.eye(h1.shape[1])
    w = torch.linalg.solve(gram, h1.T @ f)  # (c_in + 1, c_out)
    u, s, vt = torch.linalg.svd(w[:-1], full_matrices=False)
    r = a.down.out_channels
    root = s[:r].sqrt()
    assert a.up.bias is not None  # Adapter builds ``up`` with a bias
    with torch.no_grad():
        a.down.weight.copy_((u[:, :r] * root).T.reshape(r, -1, 1, 1))
        a.up.weight.copy_((vt[:r].T * root).reshape(-1, r, 1, 1))
        a.up.bias.copy_(w[-1])
    a.fit_prefix(h_r, f_s)


def source_features(source: ZooNet, x: torch.Tensor, position_s: int,
                    keep: torch.Tensor | None, batch_size: int = 512,
                    compute: Compute = CPU) -> torch.Tensor:
    """The source's features at boundary S, only the ``keep`` channels (what the adapter
    fits), on the CPU."""
    def at_s(xb: torch.Tensor) -> torch.Tensor:
        f = source.forward_features(xb, position_s)
        return f if keep is None else f[:, keep]
    return predict_logits(at_s, x, batch_size, compute=compute)


def train_adapter(target: ZooNet, source: ZooNet, branch: Branch, keep: torch.Tensor | None,
                  prep: Prepared, cloned: torch.Tensor, cfg: InsertConfig,
                  gen: torch.Generator, compute: Compute = CPU) -> None:
    """CE + distillation on cloned samples, feature MSE on all of ``D``.

    The cached features stay on the CPU (the least-squares start is solved there, the
    same on every device); each step's batch moves to ``compute.device``."""
    h_r = predict_logits(lambda xb: target.forward_features(xb, branch.position_r), prep.x,
                         cfg.eval_batch_size, compute=compute)
    f_s = source_features(source, prep.x, branch.position_s, keep, cfg.eval_batch_size,
                          compute)
    sub = torch.randperm(len(prep.x), generator=gen)[: cfg.lsq_samples]
    branch.adapter.cpu()  # solved on the CPU, with the cached features: the same start on
    fit_adapter_lstsq(branch, h_r[sub], f_s[sub])  # every device (a no-op move on CPU)
    branch.adapter.to(compute.device)
    opt = torch.optim.Adam(branch.adapter.parameters(), lr=cfg.lr)
    is_new = prep.y >= 0
    t = cfg.temperature
    put = compute.put
    for _ in range(cfg.epochs):
        for idx in batches(len(prep.x), cfg.batch_size, gen):
            u = branch.adapter(put(h_r[idx]))
            loss = cfg.mse_weight * F.mse_loss(u, put(f_s[idx]))
            new = idx[is_new[idx]]
            if len(new):
                z = branch.source_logits(put(h_r[new]))[:, put(cloned)]
                loss = loss + F.cross_entropy(z, put(prep.y[new]))
                teacher = (put(prep.z_src[new][:, cloned]) / t).softmax(1)
                loss = loss + cfg.kd_weight * t * t * F.kl_div(
                    (z / t).log_softmax(1), teacher, reduction="batchmean")
            opt.zero_grad()
            loss.backward()
            opt.step()
    round_adapter_weights(branch)


def round_adapter_weights(branch: Branch) -> None:
    """The adapter's two weight matrices put on the int8 grid an fp16 package writes them
    on (``wire.INT8_WHEN_FP16``), before the gate is fitted and the fingerprint taken."""
    with torch.no_grad():
        for layer in (branch.adapter.down, branch.adapter.up):
            layer.weight.copy_(on_int8_grid(layer.weight))


def gate_inputs(target: ZooNet, branch: Branch, prep: Prepared, cfg: InsertConfig,
                compute: Compute = CPU, taps: tuple[int, ...] = ()) -> tuple[torch.Tensor, ...]:
    """``(label, z_t, z_s, f_b, f_t)`` on the gate's training samples (augmented ``D``,
    then the occluded negatives), on ``compute.device``; ``label`` is 1 on cloned samples.
    ``f_t`` holds the target's features pooled at boundaries ``taps`` after its
    penultimate ones (``superbody.target_gate_features``).

    Both gates fit full-batch on these, so they are computed once, without grad."""
    x = torch.cat([prep.x, prep.x_neg])
    label = compute.put(torch.cat([(prep.y >= 0).float(), torch.zeros(len(prep.x_neg))]))
    bs, parts = cfg.eval_batch_size, []
    with torch.no_grad():
        for i in range(0, len(x), bs):
            xb = compute.put(x[i : i + bs])
            with compute.autocast():
                h, feats = xb, {}
                for r in range(1, target.num_blocks + 1):  # the target runs once
                    h = target.block(r - 1)(h)
                    if r == branch.position_r or r in taps:
                        feats[r] = h
                f_pen = target.head.features(h)
                f_t = target_gate_features(target, f_pen, feats, taps)
                z_s, f_b = branch.run(feats[branch.position_r])
            parts.append([t.float() for t in (target.head.fc(f_pen), z_s, f_b, f_t)])
    z_t, z_s, f_b, f_t = (torch.cat(p) for p in zip(*parts))
    return label, z_t, z_s, f_b, f_t


def train_gate(target: ZooNet, branch: Branch, prep: Prepared, cfg: InsertConfig,
               gen: torch.Generator, compute: Compute = CPU) -> None:
    """Class-balanced BCE on cached logits: 1 on cloned samples, 0 on everything else."""
    label, z_t, z_s, f_b, _ = gate_inputs(target, branch, prep, cfg, compute)
    pos = label.sum().clamp_min(1)
    neg = (1 - label).sum().clamp_min(1)
    weight = torch.where(label > 0, 0.5 / pos, 0.5 / neg)
    opt = torch.optim.Adam(branch.gate.parameters(), lr=cfg.gate_lr,
                           weight_decay=cfg.gate_weight_decay)
    for _ in range(cfg.gate_steps):
        logit = branch.gate.logit(z_t, z_s, f_b)
        loss = (F.binary_cross_entropy_with_logits(logit, label, reduction="none") * weight).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()


def discriminant_gate_inputs(target: ZooNet, branch: Branch, prep: Prepared, cfg: InsertConfig,
                             compute: Compute = CPU,
                             real_target: bool = True) -> tuple[torch.Tensor, ...]:
    """``gate_inputs`` at the taps the discriminant gate reads (``gate_taps_for``): one
    target pass that every fit on the same branch can share."""
    taps = tap_boundaries(gate_taps_for(cfg, real_target), target.num_blocks)
    return gate_inputs(target, branch, prep, cfg, compute, taps)


def fit_discriminant_gate(target: ZooNet, branch: Branch, prep: Prepared, cfg: InsertConfig,
                          compute: Compute = CPU, real_target: bool = True,
                          inputs: tuple[torch.Tensor, ...] | None = None) -> DiscriminantGate:
    """A ``DiscriminantGate`` fitted in closed form on the gate's training samples.

    The features ``[f_t, f_b]`` are standardized; each cloned class is one Gaussian
    and the target-side samples (real target digits and the occluded negatives) are
    split by the target's own predicted class, since one Gaussian for "every target
    digit" fits five clusters badly. The shared covariance is shrunk by
    ``cfg.gate_shrink`` toward its mean variance (0.1 won over 0.3 and 0.6 in
    ``bench/bench_lda_gate.py``), and the priors are class-balanced: half the mass on
    the cloned classes. With ``cfg.gate_features`` below all, the features kept are
    those with the largest weight in the direction that parts the cloned classes' mean
    from the target classes' (``covariance^-1 (mean_cloned - mean_target)``), and the
    discriminant is fitted again on them alone. ``real_target`` says whether the
    target-side samples are real digits (``k_t > 0``) or only inverted stand-ins, which
    decides what ``cfg.gate_taps="auto"`` reads (``gate_taps_for``) and whether
    ``cfg.gate_stand_ins=False`` may leave the stand-ins out of the fit. ``inputs``, from
    ``discriminant_gate_inputs`` with the same arguments, saves the target pass when
    several fits share the branch.
    """
    taps = tap_boundaries(gate_taps_for(cfg, real_target), target.num_blocks)
    if inputs is None:
        inputs = discriminant_gate_inputs(target, branch, prep, cfg, compute, real_target)
    _, z_t, _, f_b, f_t = inputs
    x = torch.cat([f_t, f_b], 1).double()
    n_cloned = len(branch.cloned_index)
    y = compute.put(prep.y).clone()
    y = torch.cat([y, torch.full((len(x) - len(y),), -1, dtype=torch.long, device=y.device)])
    group = torch.where(y >= 0, y, n_cloned + z_t.argmax(1))
    if real_target and cfg.gate_stand_ins is False and prep.stand_in is not None:
        real = torch.cat([~prep.stand_in, torch.ones(len(x) - len(prep.stand_in), dtype=torch.bool)])
        x, group = x[compute.put(real)], group[compute.put(real)]
    n_kept = kept_features(cfg.gate_features, target.head.fc.in_features, f_b.shape[1],
                           x.shape[1])
    fit = DiscriminantFit(x, group, n_cloned, cfg.gate_shrink, cfg.gate_log_odds)
    mask = None
    if n_kept:
        mask = torch.zeros(x.shape[1], dtype=torch.bool, device=x.device)
        mask[fit.parting_weight().argsort(descending=True)[:n_kept]] = True
        fit = DiscriminantFit(x[:, mask], group, n_cloned, cfg.gate_shrink, cfg.gate_log_odds)
    gate = DiscriminantGate(n_cloned, len(fit.classes), x.shape[1], taps, n_kept)
    gate.to(compute.device)
    scale, weight, bias = fit.wire_linear(carry_scale=bool(taps or n_kept))
    with torch.no_grad():  # wire-exact, so the fingerprint holds after an fp16 package
        gate.linear.weight.copy_(weight)
        gate.linear.bias.copy_(bias)
        if taps or n_kept:
            gate.feature_scale.copy_(scale)
        if mask is not None:
            gate.feature_mask.copy_(mask.float())
    return gate


class DiscriminantFit:
    """Shared-covariance Gaussians per group on standardized features (the gate's fit)."""

    def __init__(self, x: torch.Tensor, group: torch.Tensor, n_cloned: int,
                 shrink: float, log_odds: float = 0.0) -> None:
        self.classes = group.unique()  # sorted: the cloned classes first
        self.mu, self.sd = x.mean(0), x.std(0) + 1e-3
        z = (x - self.mu) / self.sd
        self.means = torch.stack([z[group == c].mean(0) for c in self.classes])
        resid = z - self.means[torch.searchsorted(self.classes, group)]
        cov = resid.T @ resid / len(z)
        eye = torch.eye(len(cov), dtype=cov.dtype, device=cov.device)
        self.cov = (1 - shrink) * cov + shrink * eye * cov.diagonal().mean()
        self.coef = torch.linalg.solve(self.cov, self.means.T).T  # precision @ mean per class
        self.is_cloned = self.classes < n_cloned
        n_old = int((~self.is_cloned).sum())
        if int(self.is_cloned.sum()) != n_cloned or n_old == 0:
            raise PreconditionError("the discriminant gate needs samples of every cloned class "
                                    "and of at least one target class; use --gate mlp")
        # the prior mass p of the cloned side, shared equally by its classes (and 1 - p by
        # the target's): the gate's log-odds move by log(p / (1 - p)) = log_odds
        p = 1 / (1 + math.exp(-log_odds))
        self.prior = torch.where(self.is_cloned, p / n_cloned, (1 - p) / n_old).log()

    def wire_linear(self, carry_scale: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(scale, weight, bias)`` of the gate's linear layer as a package stores them
        (float32): with ``carry_scale`` the per-feature scale travels (fp16) and the weight
        stays standardized; without, the standardization is folded into the weight, which
        one int8 scale per row then suits (``scale`` is ones). The weight lies on the int8
        grid and the bias on fp16's, so a rebuild decides exactly as the sender."""
        if carry_scale:
            scale = (1 / self.sd).float().half().double()
            weight = on_int8_grid(self.coef.float()).double()
        else:
            scale, weight = torch.ones_like(self.sd), self.coef / self.sd
        bias = -weight @ (self.mu * scale) - 0.5 * (self.coef * self.means).sum(1) + self.prior
        bias = bias - bias.mean()  # softmax-invariant; keeps the bias small for fp16
        # a bias beyond fp16's range (random-init timm models gave some above 65,504) makes
        # the scores cooler instead: the same decisions, a softer gate
        cool = max(1.0, float(bias.abs().max()) / 3e4)
        return (scale.float(), on_int8_grid((weight / cool).float()),
                (bias / cool).float().half().float())

    def parting_weight(self) -> torch.Tensor:
        """``|covariance^-1 (mean of cloned means - mean of target means)|`` per feature:
        how much each standardized feature moves the cloned-versus-target decision."""
        gap = self.means[self.is_cloned].mean(0) - self.means[~self.is_cloned].mean(0)
        return torch.linalg.solve(self.cov, gap).abs()


def gate_taps_for(cfg: InsertConfig, real_target: bool) -> str:
    """``cfg.gate_taps`` with ``auto`` resolved: every boundary when the target side has real
    digits, none when it has only inverted stand-ins. Their pooled early features are
    matched to the BatchNorm statistics as a batch, not digit by digit, and a discriminant
    over them opens on real target digits (MNIST k_t = 0 locality under the energy veto
    0.959 with taps against 0.993 without, 3 zoo x 3 clone seeds: ``docs/method.md``)."""
    if cfg.gate_taps != "auto":
        return cfg.gate_taps
    return "all" if real_target else "none"


def kept_features(spec: str, untapped_target: int, branch_width: int, candidates: int) -> int:
    """How many of ``candidates`` features ``--gate-features spec`` keeps (0 = all)."""
    if spec == "all":
        return 0
    count = (untapped_target + branch_width) // 2 if spec == "half" else int(spec)
    return 0 if count >= candidates else max(1, count)


def on_int8_grid(w: torch.Tensor) -> torch.Tensor:
    """``w`` (2-d or more) rounded to the values an int8 tensor with one scale per row
    (per output channel) decodes to (``codec.array_to_proto``: scale = row peak / 127):
    an fp16 package writes the discriminant's and the adapter's weights that way
    (``wire.INT8_WHEN_FP16``), and rounding them before the fingerprint is taken keeps
    the receiver's rebuild within float error of it."""
    rows = w.reshape(len(w), -1)
    peak = rows.abs().amax(1, keepdim=True)
    scale = torch.where(peak > 0, peak / 127, torch.ones_like(peak))
    return ((rows / scale).round().clamp(-127, 127) * scale).reshape(w.shape)


def score_branch(target: ZooNet, target_labels: tuple[str, ...], branch: Branch,
                 data: CloneData, prep: Prepared, batch_size: int = 512,
                 compute: Compute = CPU) -> dict[str, float]:
    """Validation score: new-class accuracy, locality (or negative rejection without
    target-class data), and their mean."""
    sb = Superbody(target, target_labels, [branch]).eval()
    n_t = len(target_labels)

    def answer(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return predict_logits(model, x, batch_size, compute=compute).argmax(1)

    acc_new = float((answer(sb, data.x_val_new) == data.y_val_new + n_t).float().mean())
    out = {"val_acc_new": acc_new}
    if len(data.x_val_old):
        same = answer(sb, data.x_val_old) == answer(target, data.x_val_old)
        out["val_locality"] = float(same.float().mean())
    else:
        out["val_locality"] = float((answer(sb, prep.x_val_neg) < n_t).float().mean())
    out["score"] = (out["val_acc_new"] + out["val_locality"]) / 2
    return out


def calibrate_energy_veto(target: ZooNet, target_labels: tuple[str, ...], branch: Branch,
                          data: CloneData, prep: Prepared, cfg: InsertConfig,
                          compute: Compute = CPU) -> dict[str, float]:
    """Set the gate's ``energy_max`` and return the validation score it gives.

    The candidates are quantiles of the target's logsumexp on the cloned *training*
    samples (a quantile q lets a fraction q of them through). With real target-class
    validation samples the best validation score wins (ties keep the looser veto);
    without, validation locality would be measured on stand-ins whose energy is
    that of cloned digits, so it cannot judge a veto and the fixed quantile is used.
    """
    lse = predict_logits(target, prep.x[prep.y >= 0], cfg.eval_batch_size,
                         compute=compute).logsumexp(1)
    options = cfg.veto_quantiles if data.real_val_old else (cfg.veto_quantile_without_target_data,)
    best: dict[str, float] | None = None
    for q in options:
        tau = NO_ENERGY_VETO if q is None else float(torch.quantile(lse, q).half())
        branch.gate.energy_max.fill_(tau)  # fp16-exact, so an fp16 package keeps the same veto
        score = {**score_branch(target, target_labels, branch, data, prep,
                                cfg.eval_batch_size, compute),
                 "energy_quantile": 1.0 if q is None else q, "energy_max": tau}
        if best is None or score["score"] > best["score"]:
            best = score
    assert best is not None, "veto_quantiles is empty"
    branch.gate.energy_max.fill_(best["energy_max"])
    return best


def uses_discriminant_gate(cfg: InsertConfig) -> bool:
    """Whether a branch gets a ``DiscriminantGate``: ``cfg.gate`` ``"lda"`` or ``"auto"``.
    Without real target samples its target classes are the inverted stand-ins; untapped
    and under the energy veto it still beats the MLP gate there (``docs/method.md``)."""
    return cfg.gate != "mlp"


def insert_candidate(target: ZooNet, source: ZooNet, target_labels: tuple[str, ...],
                     input_shape: tuple[int, ...], position: tuple[int, int],
                     masks: dict[str, torch.Tensor], cloned: tuple[int, ...],
                     cloned_labels: tuple[str, ...], data: CloneData, prep: Prepared,
                     cfg: InsertConfig, seed: int,
                     compute: Compute = CPU) -> tuple[Branch, dict[str, float]]:
    """Train a branch at ``position = (R, S)`` and score it on validation data.

    ``target`` and ``source`` must be on ``compute.device``; the new adapter and gate
    are made on the CPU (the same initial weights on every device) and moved there."""
    gen = torch.Generator().manual_seed(seed * 1009 + position[0] * 31 + position[1])
    torch.manual_seed(seed * 1009 + position[0] * 31 + position[1])
    r, s = position
    branch, keep = build_branch(target, source, input_shape, r, s, masks, cloned, cloned_labels,
                                cfg.adapter_rank, cfg.gate_hidden, len(target_labels))
    branch = branch.to(compute.device)
    idx = torch.tensor(cloned, dtype=torch.long)
    train_adapter(target, source, branch, keep, prep, idx, cfg, gen, compute)
    if not uses_discriminant_gate(cfg):
        train_gate(target, branch, prep, cfg, gen, compute)
        return branch, calibrate_energy_veto(target, target_labels, branch, data, prep, cfg,
                                             compute)
    best: tuple[DiscriminantGate, dict[str, float]] | None = None
    inputs = discriminant_gate_inputs(target, branch, prep, cfg, compute, data.real_val_old)
    for stand_ins in stand_in_options(cfg, data, prep):
        branch.gate = fit_discriminant_gate(target, branch, prep,
                                            replace(cfg, gate_stand_ins=stand_ins), compute,
                                            real_target=data.real_val_old, inputs=inputs)
        score = {**calibrate_energy_veto(target, target_labels, branch, data, prep, cfg,
                                         compute), "gate_stand_ins": float(stand_ins)}
        if best is None or score["score"] > best[1]["score"]:
            best = (branch.gate, score)
    assert best is not None
    branch.gate = best[0]
    return branch, best[1]


def stand_in_options(cfg: InsertConfig, data: CloneData, prep: Prepared) -> tuple[bool, ...]:
    """The discriminant fits to try: with the stand-ins, without, or both when
    ``cfg.gate_stand_ins`` is None and there is a choice (real target digits beside them)."""
    if cfg.gate_stand_ins is not None:
        return (cfg.gate_stand_ins,)
    if data.real_val_old and prep.stand_in is not None and bool(prep.stand_in.any()):
        return (True, False)
    return (True,)
