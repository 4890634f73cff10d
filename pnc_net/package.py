"""The clone package as plain Python objects: what travels instead of a model.

A ``Package`` holds zoo references (by sha256), one ``ClonedModule`` per source
(position ``(R, S)``, per-filter masks, adapter and fusion-gate tensors), the
superbody's label map and a fingerprint. ``pnc_net.wire`` turns it into bytes
(protobuf + zstd); this module knows nothing about the wire.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pnc_net.zoo import Manifest


@dataclass(frozen=True)
class ZooRef:
    """A zoo model by identity: its name is a label, its sha256 the identity."""

    name: str
    sha256: str
    size_bytes: int
    arch: str

    @classmethod
    def of(cls, manifest: Manifest) -> ZooRef:
        return cls(manifest.name, manifest.sha256, manifest.size_bytes, manifest.arch)


@dataclass
class ClonedModule:
    """One inserted branch: source blocks after ``position_s`` fed from target boundary
    ``position_r`` through an adapter, with masks on the source's filters and a gate."""

    source: ZooRef
    cloned_classes: tuple[int, ...]  # indices into the source's label space
    position_r: int
    position_s: int
    masks: dict[str, torch.Tensor]  # unit name -> bool (width,)
    tensors: dict[str, torch.Tensor]  # "adapter.*", "gate.*" -> float32
    config: dict = field(default_factory=dict)  # adapter_rank, gate_hidden, ...

    def kept_filters(self) -> dict[str, tuple[int, int]]:
        """``unit -> (kept, width)``."""
        return {k: (int(m.sum()), int(m.numel())) for k, m in self.masks.items()}


@dataclass
class Fingerprint:
    """Superbody outputs on a seeded probe batch, to verify a rebuild."""

    probe_seed: int
    probe_count: int
    probabilities: torch.Tensor  # (probe_count, n_labels) float32
    tolerance: float = 2e-2


@dataclass
class Package:
    """Everything a receiver needs, besides the zoo, to rebuild a superbody."""

    target: ZooRef
    modules: list[ClonedModule]
    label_names: tuple[str, ...]
    fingerprint: Fingerprint | None = None
    report: dict = field(default_factory=dict)
    created_unix_s: float = 0.0
    format_version: int = 1
    writer_version: str = ""

    def zoo_refs(self) -> list[ZooRef]:
        """The target and every source: what a node must hold to rebuild."""
        return [self.target, *(m.source for m in self.modules)]


def probe_batch(seed: int, count: int, input_shape: tuple[int, ...]) -> torch.Tensor:
    """The fixed probe inputs of a fingerprint: seeded uniform noise blended with
    seeded blobs, so both heads and the gate see varied activations."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand(count, *input_shape, generator=gen)
    blobs = torch.nn.functional.avg_pool2d(
        torch.rand(count, *input_shape, generator=gen), 5, stride=1, padding=2)
    mix = torch.linspace(0, 1, count).view(count, *([1] * len(input_shape)))
    return (mix * noise + (1 - mix) * (blobs > 0.5).float()).clamp(0, 1)
