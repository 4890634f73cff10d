"""Where tensors are computed: the ``--device`` and ``--precision`` flags, resolved once.

Every step takes its device explicitly (a ``Compute``) instead of relying on
process-wide defaults (``torch.set_default_device``): a Ray actor, a receiver and
a test can then run different devices in one process, and the CPU path stays
what it always was (every move below is a no-op on CPU, so CPU packages are
bit-identical to those made before devices existed).

The rules the steps follow:

- models run on a private copy moved to the device (``on_device``): zoo models
  are cached, shared modules, never moved in place;
- data stays on the CPU; each batch is moved to the device where it is used,
  and results come back to the CPU (``Compute.put`` / ``.cpu()``);
- random draws use CPU generators (``torch.Generator()``) and their results are
  moved, so a seed draws the same numbers on every device.

torch is imported lazily: ``parse_device`` is syntax only, so a command line can
check the flag before loading torch.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from pnc_net.errors import InvalidInputError

if TYPE_CHECKING:
    import torch

DEVICES_HELP = "auto, cpu, cuda or cuda:N"
PRECISIONS = ("fp32", "bf16")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")

T = TypeVar("T")


def parse_device(spec: str) -> str:
    """``spec`` normalised (lower case, stripped) if it names a device pnc knows.

    Raises:
        InvalidInputError: anything but auto, cpu, cuda or cuda:N.
    """
    text = spec.strip().lower()
    if not _DEVICE.match(text):
        raise InvalidInputError(f"--device {spec!r} is not a device; use {DEVICES_HELP}")
    return text


def resolve_device(spec: str) -> str:
    """The concrete device ``spec`` names on this machine: ``cpu`` or ``cuda:N``.

    ``auto`` is ``cuda:0`` when a GPU is visible, else ``cpu``.

    Raises:
        InvalidInputError: an unknown device, ``cuda`` without a GPU, or an index
            past the GPUs this process sees.
    """
    text = parse_device(spec)
    if text == "cpu":
        return "cpu"
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if text == "auto":
        return "cuda:0" if count else "cpu"
    index = int(text.partition(":")[2] or 0)
    if count == 0:
        raise InvalidInputError(
            f"--device {spec}: no CUDA GPU is visible to this process "
            "(torch.cuda.is_available() is False); use --device cpu or auto")
    if index >= count:
        raise InvalidInputError(
            f"--device {spec}: this process sees {count} GPU(s), cuda:0..cuda:{count - 1}")
    return f"cuda:{index}"


def check_precision(precision: str, device: str) -> str:
    """``precision`` if it is allowed on ``device`` (a resolved device string).

    bf16 autocast is offered on CUDA only: on CPU it is slower than fp32 for these
    models and would change packages that are meant to be reproducible.

    Raises:
        InvalidInputError: an unknown precision, or bf16 off CUDA.
    """
    if precision not in PRECISIONS:
        raise InvalidInputError(
            f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and not device.startswith("cuda"):
        raise InvalidInputError("--precision bf16 needs a CUDA device (--device cuda or auto "
                                f"on a GPU machine); this run is on {device}")
    return precision


@dataclass(frozen=True)
class Compute:
    """A resolved device and precision, passed explicitly to every step that computes.

    ``precision="bf16"`` autocasts forward passes without gradients (and the
    adapter's training when ``train_autocast``) on CUDA; fp32 never autocasts.
    """

    device: str = "cpu"
    precision: str = "fp32"
    train_autocast: bool = False

    @classmethod
    def of(cls, device: str = "cpu", precision: str = "fp32") -> Compute:
        """A ``Compute`` from flag values (``auto`` resolved, both checked)."""
        resolved = resolve_device(device)
        return cls(resolved, check_precision(precision, resolved))

    @property
    def is_cpu(self) -> bool:
        """True when nothing needs to move (the reference path)."""
        return self.device == "cpu"

    def put(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on this device (the same tensor when it is already there)."""
        return t if self.is_cpu else t.to(self.device, non_blocking=True)

    @contextmanager
    def autocast(self, training: bool = False) -> Iterator[None]:
        """bf16 autocast on CUDA when asked for, else nothing (fp32 as before)."""
        if self.precision != "bf16" or (training and not self.train_autocast):
            yield
            return
        import torch

        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield


CPU = Compute()


def on_device(model: T, compute: Compute | None) -> T:
    """``model`` itself on CPU, else a private copy moved to the device.

    Zoo models are cached and shared (``Zoo.load`` hands every caller the same
    module), so moving one in place would move it for everyone: the copy keeps
    zoo weights where they are and unwritten.
    """
    if compute is None or compute.is_cpu:
        return model
    return copy.deepcopy(model).to(compute.device)  # type: ignore[attr-defined]


def gpu_ids_device(gpu_ids: list) -> str:
    """The device of a Ray actor that was given ``gpu_ids`` (``ray.get_gpu_ids()``).

    Ray sets ``CUDA_VISIBLE_DEVICES`` to the actor's GPUs, so its first GPU is
    ``cuda:0`` inside the actor, unless ``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES``
    told Ray to leave the variable alone (then the id is the physical index). No GPU
    means CPU.
    """
    if not gpu_ids:
        return "cpu"
    import os

    if os.environ.get("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"):
        return f"cuda:{int(gpu_ids[0])}"
    return "cuda:0"
