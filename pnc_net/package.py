"""The clone package as plain Python objects: what travels instead of a model.

A ``Package`` holds zoo references (by sha256), one ``ClonedModule`` per source
(position ``(R, S)``, per-filter masks, adapter and fusion-gate tensors), the
superbody's label map and a fingerprint. ``pnc_net.wire`` turns it into bytes
(protobuf + zstd); this module knows nothing about the wire.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields

import torch

from pnc_net.errors import InvalidInputError
from pnc_net.zoo import Manifest

# A package may ask for a tighter fingerprint check than this, never a looser one
# (``pnc_net.rebuild.accepted_tolerance``); clone writes 2e-2.
DEFAULT_FINGERPRINT_TOLERANCE = 2e-2


@dataclass(frozen=True)
class ZooRef:
    """A zoo model by identity: its name is a label, its sha256 the identity."""

    name: str
    sha256: str
    size_bytes: int
    arch: str

    @classmethod
    def of(cls, manifest: Manifest) -> ZooRef:
        """The reference a package writes for a zoo model."""
        return cls(manifest.name, manifest.sha256, manifest.size_bytes, manifest.arch)


@dataclass(frozen=True)
class ModuleConfig:
    """The typed, bounded shape of a module's branch: what ``ClonedModule.config`` may hold.

    The rule for keys: each field below may be present (a JSON integer within its bounds,
    never a bool, float, string, null or list) or absent (its default, as pnc 0.1 read
    it); any other key is refused, so a new key needs a new format version and one
    package cannot hide junk that gives it another id. The bounds keep a crafted package
    from making the receiver allocate a huge branch (``gate_hidden: 10**7`` is 640 MB).
    """

    adapter_rank: int = 8  # rank of the adapter's 1x1 map
    gate_hidden: int = 8  # hidden units of the fusion gate
    # 0: the MLP FusionGate; more: a DiscriminantGate with that many classes (cloned first)
    gate_classes: int = 0
    # the target boundaries a discriminant gate also reads: bit r - 1 for boundary r
    # (superbody.taps_mask); 0, the default, is none
    gate_taps: int = 0
    # how many of its features a discriminant gate keeps (``gate.feature_mask`` says
    # which); 0, the default, is all
    gate_features: int = 0
    # the discriminant gate's second look: how many fixed views of an unsure input it also
    # reads (``training.fixed_views``), and their transforms besides shifts (bit i for
    # ``training.AUGMENTS[i]``); 0, the default, is none
    gate_views: int = 0
    gate_view_transforms: int = 0

    BOUNDS = {"adapter_rank": (1, 256), "gate_hidden": (1, 4096), "gate_classes": (0, 4096),
              "gate_taps": (0, 2**62), "gate_features": (0, 2**20), "gate_views": (0, 8),
              "gate_view_transforms": (0, 7)}  # gate_views: len(training.VIEW_SHIFTS)
    #: absent when 0, so a package without them is byte for byte what pnc wrote before them
    OPTIONAL = ("gate_classes", "gate_taps", "gate_features", "gate_views", "gate_view_transforms")

    def __post_init__(self) -> None:
        for f in fields(self):
            value, (low, high) = getattr(self, f.name), self.BOUNDS[f.name]
            if type(value) is not int or not low <= value <= high:
                raise InvalidInputError(f"module config {f.name}={value!r:.40} must be an "
                                        f"integer in {low}..{high}")

    @classmethod
    def from_mapping(cls, raw: Mapping) -> ModuleConfig:
        """The config a decoded JSON object (or a clone's dict) describes, or
        ``InvalidInputError`` naming the bad key or value."""
        if not isinstance(raw, Mapping):
            raise InvalidInputError(f"module config must be a JSON object, not "
                                    f"{type(raw).__name__}")
        unknown = sorted(str(k)[:40] for k in raw if k not in cls.BOUNDS)
        if unknown:
            raise InvalidInputError(f"module config has unknown keys {unknown[:5]}; known: "
                                    f"{sorted(cls.BOUNDS)}")
        return cls(**raw)

    def as_dict(self) -> dict[str, int]:
        """The fields as ``config_json`` writes them: every one, defaults included, except
        the ``OPTIONAL`` ones at 0, so a package without them is byte for byte what pnc
        wrote before them (and a reader older than them refuses a package that has them by
        the unknown-key rule rather than misreading it)."""
        out = asdict(self)
        for key in self.OPTIONAL:  # absent at 0: earlier packages' bytes
            if not out[key]:
                del out[key]
        return out


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
    config: dict = field(default_factory=dict)  # ModuleConfig's fields, as JSON writes them

    def settings(self) -> ModuleConfig:
        """The config, typed and checked (``InvalidInputError`` for a bad key or value)."""
        return ModuleConfig.from_mapping(self.config)

    def kept_filters(self) -> dict[str, tuple[int, int]]:
        """``unit -> (kept, width)``."""
        return {k: (int(m.sum()), int(m.numel())) for k, m in self.masks.items()}


@dataclass
class Fingerprint:
    """Superbody outputs on a seeded probe batch, to verify a rebuild."""

    probe_seed: int
    probe_count: int
    probabilities: torch.Tensor  # (probe_count, n_labels) float32
    tolerance: float = DEFAULT_FINGERPRINT_TOLERANCE

    def __post_init__(self) -> None:
        if not (isinstance(self.tolerance, (int, float)) and math.isfinite(self.tolerance)
                and self.tolerance >= 0):
            raise InvalidInputError(f"fingerprint tolerance {self.tolerance!r} must be a finite "
                                    "number >= 0")


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
    name: str = ""  # the publisher's name for it ("" for an unnamed package)
    version: int = 0  # 1.. with a name: a receiver refuses a lower version of a name it holds
    signer: str | None = None  # key id of the signature it carried when decoded (unchecked)

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
