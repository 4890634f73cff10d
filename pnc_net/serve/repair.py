"""Receiver-side repair: fine-tune only a rebuilt superbody's adapters and gates.

A lossy package (int8 adapters, say) can rebuild into a superbody whose probe
outputs drift past the fingerprint's tolerance. Like BitDelta's distillation
step, the receiver then fits the branch tensors again, on a small labelled set
it holds (``--repair-data FILE.npz``) plus the fingerprint's own probe outputs
as distillation targets. Zoo weights are never touched: every other parameter
is frozen, and ``repair`` checks the zoo models' digests before and after.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pnc_net.devices import CPU, Compute
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
           x: torch.Tensor, y: torch.Tensor, cfg: RepairConfig = RepairConfig(),
           compute: Compute = CPU) -> RepairResult:
    """Fit adapters and gates to labelled data plus the fingerprint's probe outputs.

    ``y`` indexes ``sb.label_names``. Returns errors before and after; the caller
    decides whether ``error_after`` is within tolerance. Off the CPU, the fine-tuning
    runs on a copy of ``sb`` on ``compute.device`` (``sb``'s target is the zoo's
    shared model, never moved) and only the adapters and gates are copied back; both
    fingerprint errors are measured on the CPU superbody, as verification does.
    """
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(input_shape) or len(x) != len(y) or not len(x):
        raise InvalidInputError(f"repair data of shape {tuple(x.shape)} does not fit inputs "
                                f"{tuple(input_shape)}")
    start = time.perf_counter()
    before_digests = zoo_digests(sb)
    err_before = fingerprint_error(sb, fingerprint, input_shape)
    work = sb if compute.is_cpu else copy.deepcopy(sb).to(compute.device)
    params = trainable_parameters(work)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    put = compute.put
    probes = put(probe_batch(fingerprint.probe_seed, fingerprint.probe_count, input_shape))
    target_probs = put(fingerprint.probabilities.float())
    gen = torch.Generator().manual_seed(cfg.seed)  # CPU draws: the same batches on any device
    work.eval()  # zoo parts stay in eval mode: their batch-norm statistics never move
    for branch in work.attached():
        branch.adapter.train()
        branch.gate.train()
    for _ in range(cfg.steps):
        idx = torch.randint(len(x), (min(cfg.batch, len(x)),), generator=gen)
        probs = work(put(x[idx])).clamp_min(1e-7)
        loss = F.nll_loss(probs.log(), put(y[idx]))
        probe_probs = work(probes)
        loss = loss + cfg.distill_weight * (probe_probs - target_probs).abs().mean() * 10
        opt.zero_grad()
        loss.backward()
        opt.step()
    if work is not sb:  # only the trained parts come back; zoo parts are never written
        for mine, fitted in zip(sb.attached(), work.attached()):
            mine.adapter.load_state_dict(fitted.adapter.state_dict())
            mine.gate.load_state_dict(fitted.gate.state_dict())
    sb.eval()
    for p in sb.parameters():
        p.requires_grad_(False)
    after_digests = zoo_digests(sb)
    if after_digests != before_digests:  # a bug, never a user error: refuse loudly
        raise IntegrityError("repair changed a zoo model's weights; refusing the result")
    return RepairResult(err_before, fingerprint_error(sb, fingerprint, input_shape),
                        time.perf_counter() - start, cfg.steps,
                        sum(p.numel() for p in params), after_digests)
