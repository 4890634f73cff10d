"""Receiver-side repair: fine-tune only a rebuilt superbody's adapters and gates.

A lossy package (int8 adapters, say) can rebuild into a superbody whose probe
outputs drift past the fingerprint's tolerance. Like BitDelta's distillation
step, the receiver then fits the branch tensors again, on a small labelled set
it holds (``--repair-data FILE.npz``) plus the fingerprint's own probe outputs
as distillation targets. Zoo weights are never touched: every other parameter
is frozen, and ``repair`` checks the zoo models' digests before and after.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pnc_net.errors import IntegrityError, InvalidInputError
from pnc_net.package import Fingerprint, probe_batch
from pnc_net.rebuild import fingerprint_error
from pnc_net.superbody import Superbody
from pnc_net.zoo import state_digest


@dataclass(frozen=True)
class RepairConfig:
    """Small on purpose: repair runs inside a receiver, on its CPU."""

    steps: int = 150
    lr: float = 3e-3
    batch: int = 64
    distill_weight: float = 4.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.lr <= 0 or self.batch < 1 or self.distill_weight < 0:
            raise InvalidInputError(f"invalid repair settings {self}")


@dataclass(frozen=True)
class RepairResult:
    error_before: float
    error_after: float
    seconds: float
    steps: int
    trained_params: int
    zoo_digests: dict[str, str]  # unchanged: checked before returning


def trainable_parameters(sb: Superbody) -> list[torch.nn.Parameter]:
    """``branch.adapter`` and ``branch.gate`` parameters only; everything else frozen."""
    for p in sb.parameters():
        p.requires_grad_(False)
    params = []
    for branch in sb.attached():
        for part in (branch.adapter, branch.gate):
            for p in part.parameters():
                p.requires_grad_(True)
                params.append(p)
    return params


def zoo_digests(sb: Superbody) -> dict[str, str]:
    """Digests of every zoo network inside the superbody (target and each branch's source)."""
    out = {"target": state_digest(sb.target)}
    for i, branch in enumerate(sb.attached()):
        out[f"branch{i}.source_blocks"] = state_digest(branch.blocks)
        out[f"branch{i}.source_head"] = state_digest(branch.head)
    return out


def repair(sb: Superbody, fingerprint: Fingerprint, input_shape: tuple[int, ...],
           x: torch.Tensor, y: torch.Tensor, cfg: RepairConfig = RepairConfig()) -> RepairResult:
    """Fit adapters and gates to labelled data plus the fingerprint's probe outputs.

    ``y`` indexes ``sb.label_names``. Returns errors before and after; the caller
    decides whether ``error_after`` is within tolerance.
    """
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(input_shape) or len(x) != len(y) or not len(x):
        raise InvalidInputError(f"repair data of shape {tuple(x.shape)} does not fit inputs "
                                f"{tuple(input_shape)}")
    start = time.perf_counter()
    before_digests = zoo_digests(sb)
    err_before = fingerprint_error(sb, fingerprint, input_shape)
    params = trainable_parameters(sb)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    probes = probe_batch(fingerprint.probe_seed, fingerprint.probe_count, input_shape)
    target_probs = fingerprint.probabilities.float()
    gen = torch.Generator().manual_seed(cfg.seed)
    sb.eval()  # zoo parts stay in eval mode: their batch-norm statistics never move
    for branch in sb.attached():
        branch.adapter.train()
        branch.gate.train()
    for _ in range(cfg.steps):
        idx = torch.randint(len(x), (min(cfg.batch, len(x)),), generator=gen)
        probs = sb(x[idx]).clamp_min(1e-7)
        loss = F.nll_loss(probs.log(), y[idx])
        probe_probs = sb(probes)
        loss = loss + cfg.distill_weight * (probe_probs - target_probs).abs().mean() * 10
        opt.zero_grad()
        loss.backward()
        opt.step()
    sb.eval()
    for p in sb.parameters():
        p.requires_grad_(False)
    after_digests = zoo_digests(sb)
    if after_digests != before_digests:  # a bug, never a user error: refuse loudly
        raise IntegrityError("repair changed a zoo model's weights; refusing the result")
    return RepairResult(err_before, fingerprint_error(sb, fingerprint, input_shape),
                        time.perf_counter() - start, cfg.steps,
                        sum(p.numel() for p in params), after_digests)
