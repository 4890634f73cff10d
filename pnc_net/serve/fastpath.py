"""The forward a receiver's Predict runs for a package: compiled, checked, or eager.

A receiver serves each verified package's superbody through a ``Forward``, built once
when the package is loaded (``prepare``). Two engines (receiver ``--predict-engine``):

* ``jit`` (default): the superbody traced (``torch.jit.trace``), frozen
  (``torch.jit.freeze``: weights become constants, batch norm is folded into the
  convolutions) and optimized for inference (``torch.jit.optimize_for_inference``:
  oneDNN convolutions with their ReLU, no Python per layer). On the default superbody
  on one CPU thread it ran 1.3-1.9x faster per image than the eager channels-last
  forward at batches of 8 to 64 (``bench/bench_predict.py --forward-only``).
* ``eager``: a channels-last copy of the superbody run by PyTorch op by op (what the
  receiver ran before; on CPU its convolutions beat the default NCHW layout).

A compiled forward is only used when it agrees with the eager superbody: ``prepare``
runs both on the package's fingerprint probes (the seeded batch its fingerprint was
recorded on) and on batches of other sizes (one image, and an odd size), and keeps the
compiled forward only when every probability is finite and within the package's
accepted fingerprint tolerance of the eager one. Otherwise, or when tracing fails, it
logs one warning line saying why and falls back to ``eager``; ``Forward.engine`` says
what runs and ``Forward.detail`` why. The model given to ``prepare`` is never changed.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from pnc_net.errors import InvalidInputError

log = logging.getLogger("pnc.fastpath")

ENGINES = ("jit", "eager")
DEFAULT_ENGINE = "jit"


def check_engine(engine: str) -> str:
    """``engine`` if it is one of ``ENGINES``, else ``InvalidInputError`` naming them."""
    if engine not in ENGINES:
        raise InvalidInputError(f"--predict-engine {engine!r}: use one of {', '.join(ENGINES)}")
    return engine


class _ChannelsLast(nn.Module):
    """A channels-last copy of a model that takes NCHW inputs (the eager engine)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.inner(x)


@dataclass(frozen=True, eq=False)
class Forward:
    """What Predict runs for one package: ``forward(x)`` -> probabilities, no gradients.

    ``engine`` is what runs (``jit`` or ``eager``), ``asked`` what was asked for,
    ``max_diff`` the largest probability difference from the eager superbody measured
    by the check (None for eager), ``detail`` why a compiled forward was not used."""

    module: nn.Module
    engine: str
    asked: str
    build_s: float = 0.0
    max_diff: float | None = None
    detail: str = ""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities for the batch ``x`` ``(N, C, H, W)``."""
        with torch.inference_mode():
            return self.module(x)


def check_inputs(input_shape: tuple[int, ...], probes: torch.Tensor) -> list[torch.Tensor]:
    """The batches a compiled forward is compared on: the probes, one image, an odd size
    (a trace that fixed the batch size would fail or differ on them)."""
    if probes.ndim != 4 or tuple(probes.shape[1:]) != tuple(input_shape) or not len(probes):
        raise InvalidInputError(f"probe batch of shape {tuple(probes.shape)} does not fit "
                                f"input shape {tuple(input_shape)}")
    return [probes, probes[:1], torch.cat([probes, probes])[: 2 * len(probes) - 1]]


def compile_jit(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """Traced, frozen and optimized for inference (the ``jit`` engine); raises what
    tracing raises for a model it cannot handle."""
    with warnings.catch_warnings(), torch.no_grad():
        # trace/freeze are deprecated in favour of torch.compile, which took 40 s to compile
        # this superbody on 2 cores and ran no faster; the trace's shape warnings concern
        # the input's spatial size, fixed for a package.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model.eval(), example, check_trace=False)
        frozen = torch.jit.freeze(traced.eval())
        return torch.jit.optimize_for_inference(frozen)


def prepare(model: nn.Module, input_shape: tuple[int, ...], probes: torch.Tensor,
            tolerance: float, engine: str = DEFAULT_ENGINE, name: str = "") -> Forward:
    """The ``Forward`` for ``model`` (see the module doc): compiled when ``engine`` is
    ``jit`` and it agrees with the eager model within ``tolerance`` on ``probes`` and the
    other check batches, else eager. ``name`` labels the log lines (a package id)."""
    check_engine(engine)
    t0 = time.perf_counter()
    if engine == "eager":
        return Forward(_ChannelsLast(model).eval(), "eager", engine, time.perf_counter() - t0)
    try:
        batches = check_inputs(input_shape, probes)
        compiled = Forward(compile_jit(model, batches[0]), "jit", engine)
        diff = 0.0
        for x in batches:
            with torch.inference_mode():
                want = model(x)
            got = compiled(x)
            if got.shape != want.shape:
                raise InvalidInputError(f"compiled forward gave shape {tuple(got.shape)} for "
                                        f"{len(x)} inputs, eager {tuple(want.shape)}")
            d = float((got - want).abs().max())
            diff = max(diff, d if math.isfinite(d) else math.inf)
    except Exception as err:  # noqa: BLE001 - any failure of the compiled path means eager
        detail = f"jit forward unavailable ({type(err).__name__}: {str(err)[:200]}); eager"
        log.warning("%s: %s", name or "model", detail)
        return Forward(_ChannelsLast(model).eval(), "eager", engine, time.perf_counter() - t0,
                       None, detail)
    if not diff <= tolerance:  # also refuses NaN
        detail = (f"jit forward differs from eager by {diff:.3g} (tolerance {tolerance:.3g}); "
                  "eager")
        log.warning("%s: %s", name or "model", detail)
        return Forward(_ChannelsLast(model).eval(), "eager", engine, time.perf_counter() - t0,
                       diff, detail)
    seconds = time.perf_counter() - t0
    log.info("%s: jit forward, max difference from eager %.3g (tolerance %.3g), built in "
             "%.2f s", name or "model", diff, tolerance, seconds)
    return Forward(compiled.module, "jit", engine, seconds, diff)
