"""The local model zoo: content-addressed safetensors weights plus JSON manifests.

Layout of a zoo folder (default ``~/.cache/pnc/zoo``, or ``PNC_ZOO``)::

    models/<sha256>.safetensors   weights, read-only, named by their digest
    models/<sha256>.json          the manifest (name, architecture, labels, recipe, ...)

A name such as ``mnist-cnn-0to4`` is a label; the sha256 of the weights file is
the identity. Anywhere a model is named, its name, its sha256 or a unique
prefix of the sha256 works. Loading always verifies the digest, and nothing in
pnc ever writes to a stored model.

Models come from pnc's own training (``Zoo.add``), from a peer (``Zoo.add_blob``)
or from an ordinary checkpoint (``Zoo.add_checkpoint``: ``pnc zoo add``, any
torchvision or timm classifier; ``docs/zoo.md``). The stored file is always the
canonical safetensors of the tensors (``checkpoints.canonical_bytes``), so the
id is the same on every node that imports the same weights for the same
architecture. ``Zoo.load`` hands out pnc's ``ZooNet`` (what cloning needs) and
refuses other architectures with an ``IncompatibleError``; ``Zoo.load_module``
hands out any model as a plain ``nn.Module``.
"""

from __future__ import annotations

import difflib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from pnc_net import checkpoints
from pnc_net.errors import (
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    PreconditionError,
)
from pnc_net.fsutil import atomic_write_bytes, sha256_bytes
from pnc_net.models import ZooNet

MIN_PREFIX = 6


@dataclass(frozen=True)
class Manifest:
    """Everything a node needs to know about a zoo model, besides its weights."""

    name: str
    sha256: str
    size_bytes: int
    arch: str
    arch_args: dict
    input_shape: tuple[int, ...]
    label_names: tuple[str, ...]
    dataset: str
    recipe: dict = field(default_factory=dict)
    test_accuracy: float | None = None
    num_params: int = 0
    created: float = 0.0
    # Preprocessing: per-channel mean and std, x' = (x - mean) / std on [0, 1] pixels;
    # None = inputs are used as they are (pnc's own models).
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    tensors_sha256: str = ""  # checkpoints.tensors_digest of the weights ("" = not recorded)
    origin: dict = field(default_factory=dict)  # an imported file: name, sha256, size, format

    def to_json(self) -> str:
        """The manifest as stored beside the weights (sorted keys: stable bytes)."""
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse ``to_json``'s text; JSON lists become the tuples the fields declare."""
        raw = json.loads(text)
        raw["input_shape"] = tuple(raw["input_shape"])
        raw["label_names"] = tuple(raw["label_names"])
        for key in ("mean", "std"):
            if raw.get(key) is not None:
                raw[key] = tuple(raw[key])
        return cls(**raw)

    @property
    def is_pnc(self) -> bool:
        """True for pnc's own architectures (``ZooNet``: the ones cloning works on)."""
        return checkpoints.is_pnc_arch(self.arch)


def default_zoo_dir() -> Path:
    """``$PNC_ZOO``, else ``~/.cache/pnc/zoo``."""
    return Path(os.environ.get("PNC_ZOO", Path.home() / ".cache" / "pnc" / "zoo"))


class Zoo:
    """A folder of zoo models. ``Zoo(dir).load("mnist-cnn-0to4")`` -> (model, manifest)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_zoo_dir()
        self.models_dir = self.root / "models"
        self._cache: dict[str, torch.nn.Module] = {}
        self._nets: dict[str, ZooNet] = {}

    def __repr__(self) -> str:
        return f"Zoo({str(self.root)!r})"

    # ------------------------------------------------------------------ reading
    def manifests(self) -> list[Manifest]:
        """All manifests, sorted by name."""
        if not self.models_dir.exists():
            return []
        out = []
        for path in sorted(self.models_dir.glob("*.json")):
            try:
                out.append(Manifest.from_json(path.read_text()))
            except (ValueError, TypeError, KeyError) as err:
                raise IntegrityError(f"zoo manifest {path} is unreadable: {err}") from None
        return sorted(out, key=lambda m: (m.name, m.created))

    def resolve(self, ref: str) -> Manifest:
        """The manifest for a name, a sha256, or a unique sha256 prefix."""
        manifests = self.manifests()
        by_name = [m for m in manifests if m.name == ref]
        if by_name:
            return by_name[-1]  # the newest model under a re-used name
        ref_l = ref.lower()
        by_digest = [m for m in manifests if m.sha256 == ref_l]
        if not by_digest and len(ref_l) >= MIN_PREFIX:
            by_digest = [m for m in manifests if m.sha256.startswith(ref_l)]
        if len(by_digest) == 1:
            return by_digest[0]
        if len(by_digest) > 1:
            raise InvalidInputError(
                f"model prefix {ref!r} is ambiguous: it matches "
                + ", ".join(f"{m.name} ({m.sha256[:12]})" for m in by_digest)
            )
        names = sorted({m.name for m in manifests})
        close = difflib.get_close_matches(ref, names, n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        what = "is empty; run `pnc zoo build`" if not names else "has no such model"
        raise NotFoundError(
            f"model {ref!r} is not in the zoo at {self.root} ({what}){hint} Run `pnc zoo list`."
        )

    def has(self, sha256: str) -> bool:
        """True when both the weights and the manifest of ``sha256`` are stored (unverified)."""
        return (self.models_dir / f"{sha256}.safetensors").exists() and (
            self.models_dir / f"{sha256}.json").exists()

    def weights_path(self, sha256: str) -> Path:
        """Where the weights of ``sha256`` live (whether or not they exist yet)."""
        return self.models_dir / f"{sha256}.safetensors"

    def read_weights(self, manifest: Manifest) -> bytes:
        """The weights file's bytes, after checking its digest against the manifest."""
        path = self.weights_path(manifest.sha256)
        if not path.exists():
            raise NotFoundError(f"weights of {manifest.name} are missing at {path}")
        data = path.read_bytes()
        actual = sha256_bytes(data)
        if actual != manifest.sha256:
            raise IntegrityError(
                f"zoo model {manifest.name}: weights digest {actual} does not match the "
                f"manifest's {manifest.sha256}; the file at {path} is corrupt, rebuild it"
            )
        return data

    def load(self, ref: str) -> tuple[ZooNet, Manifest]:
        """A frozen, eval-mode model as cloning sees it (verified by digest) and its manifest.

        A pnc model is its ``ZooNet``; a torchvision or timm import is wrapped in a
        ``GraphNet`` (block boundaries from its graph, mask units from its coupled
        channels, the manifest's mean/std applied first). Models are cached per zoo
        instance; callers get the same frozen module, which is safe because nothing
        in pnc writes to zoo weights.

        Raises:
            IncompatibleError: an import that cannot be traced or has no linear head.
        """
        manifest = self.resolve(ref)
        if manifest.sha256 not in self._nets:
            model, _ = self.load_module(manifest.sha256)
            self._nets[manifest.sha256] = as_network(model, manifest)
        return self._nets[manifest.sha256], manifest

    def load_module(self, ref: str) -> tuple[torch.nn.Module, Manifest]:
        """Any zoo model as a frozen, eval-mode ``nn.Module`` (verified by digest).

        A torchvision or timm import is the plain module its builder makes (with the
        manifest's ``arch_args``); a pnc model is its ``ZooNet``.
        """
        manifest = self.resolve(ref)
        if manifest.sha256 not in self._cache:
            model = module_from_weights(manifest, self.read_weights(manifest))
            self._cache[manifest.sha256] = model
        return self._cache[manifest.sha256], manifest

    # ------------------------------------------------------------------ writing
    def add(self, model: ZooNet, manifest_fields: dict) -> Manifest:
        """Store a trained model (weights read-only) and return its manifest."""
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        data = checkpoints.canonical_bytes(state, manifest_fields["arch"])
        manifest = Manifest(
            sha256=sha256_bytes(data), size_bytes=len(data), created=time.time(),
            num_params=sum(p.numel() for p in model.parameters()),
            tensors_sha256=checkpoints.tensors_digest(state), **manifest_fields,
        )
        self.add_blob(manifest, data)
        return manifest

    def add_checkpoint(self, path: str | Path, arch: str, labels: tuple[str, ...],
                       input_shape: tuple[int, ...], mean: tuple[float, ...] | None = None,
                       std: tuple[float, ...] | None = None, name: str | None = None,
                       arch_args: dict | None = None, expect_sha256: str | None = None,
                       ) -> tuple[Manifest, bool]:
        """Import an ordinary checkpoint (``pnc zoo add``); returns (manifest, newly added).

        Every check runs before anything is written (``docs/zoo.md``): the architecture
        exists, the file parses without running code (and matches ``expect_sha256``, a
        hex prefix of the published file's digest), its keys and shapes fit, its head
        has one output per label, and the model runs on ``input_shape``. Importing the
        same weights again with the same description adds nothing.

        Raises:
            InvalidInputError, IncompatibleError, NotFoundError, IntegrityError,
            PreconditionError: one line each; the zoo is unchanged.
        """
        labels = tuple(labels)
        check_description(labels, input_shape, mean, std)
        checkpoints.check_arch(arch)  # a mistyped name costs nothing
        ckpt = checkpoints.read_checkpoint(path)
        if expect_sha256 is not None and not ckpt.origin["sha256"].startswith(
                expect_sha256.lower()):
            raise IntegrityError(
                f"checkpoint {ckpt.origin['file']} has sha256 {ckpt.origin['sha256']}, not "
                f"{expect_sha256}: the file is not the one published (or was damaged on the way)")
        args = checkpoints.import_arch_args(arch, len(labels), ckpt.tensors, arch_args)
        model = checkpoints.build_arch(arch, args)
        checkpoints.check_fits(model, ckpt.tensors, arch, labels, ckpt.origin["file"])
        checkpoints.load_into(model, ckpt.tensors)
        checkpoints.check_runs(checkpoints.frozen(model), input_shape, len(labels), arch)
        data = checkpoints.canonical_bytes(ckpt.tensors, arch)
        manifest = Manifest(
            name=name or Path(path).stem, sha256=sha256_bytes(data), size_bytes=len(data),
            arch=arch, arch_args=args, input_shape=tuple(input_shape), label_names=labels,
            dataset="", recipe={}, test_accuracy=None,
            num_params=sum(p.numel() for p in model.parameters()), created=time.time(),
            mean=mean, std=std, tensors_sha256=checkpoints.tensors_digest(ckpt.tensors),
            origin=ckpt.origin,
        )
        if self.has(manifest.sha256):
            return self._same_import(manifest), False
        self._store(manifest, data)
        return manifest, True

    def _same_import(self, new: Manifest) -> Manifest:
        """The stored manifest of weights imported again, if it describes them the same."""
        old = self.resolve(new.sha256)
        keys = ("name", "arch", "arch_args", "input_shape", "label_names", "mean", "std")
        differ = [k for k in keys if getattr(old, k) != getattr(new, k)]
        if differ:
            raise InvalidInputError(
                f"these weights are already in the zoo as {old.name} ({old.sha256[:12]}) with "
                f"another {', '.join(differ)}; a zoo holds one manifest per weights file")
        return old

    def export(self, ref: str, out: str | Path) -> tuple[Manifest, Path]:
        """Write a model's weights to ``out`` as a plain state_dict (``.safetensors``).

        The file is the stored one, byte for byte (its sha256 is the model's id), after
        its digest is checked; ``safetensors.torch.load_file(out)`` gives the state_dict.
        """
        out = Path(out)
        if out.suffix.lower() not in checkpoints.SAFETENSORS_SUFFIXES:
            raise InvalidInputError(
                f"--out {out.name}: pnc exports .safetensors files (a plain state_dict)")
        manifest = self.resolve(ref)
        data = self.read_weights(manifest)
        if out.resolve() == self.weights_path(manifest.sha256).resolve():
            raise InvalidInputError(f"--out {out} is the zoo's own copy of {manifest.name}")
        atomic_write_bytes(out, data)
        return manifest, out

    def add_blob(self, manifest: Manifest, data: bytes) -> Manifest:
        """Store weights received from a peer, refusing bytes that do not match the manifest."""
        actual = sha256_bytes(data)
        if actual != manifest.sha256 or len(data) != manifest.size_bytes:
            raise IntegrityError(
                f"weights for {manifest.name} have digest {actual} ({len(data)} bytes); "
                f"the manifest promises {manifest.sha256} ({manifest.size_bytes} bytes)"
            )
        module_from_weights(manifest, data)  # refuse weights that do not fit the architecture
        return self._store(manifest, data)

    def _store(self, manifest: Manifest, data: bytes) -> Manifest:
        """Write checked weights (read-only) and then the manifest, each atomically."""
        path = self.weights_path(manifest.sha256)
        if not path.exists():
            atomic_write_bytes(path, data, mode=0o444)
        atomic_write_bytes(self.models_dir / f"{manifest.sha256}.json", manifest.to_json().encode())
        return manifest

    def verify(self) -> list[tuple[Manifest, str | None]]:
        """``(manifest, problem or None)`` for every model."""
        report: list[tuple[Manifest, str | None]] = []
        for m in self.manifests():
            try:
                module_from_weights(m, self.read_weights(m))
                report.append((m, None))
            except (IntegrityError, NotFoundError, InvalidInputError, PreconditionError) as err:
                report.append((m, str(err)))
        return report


def check_description(labels: tuple[str, ...], input_shape: tuple[int, ...],
                      mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> None:
    """Refuse labels, an input shape or a normalization that cannot describe a classifier."""
    if len(labels) < 2 or len(set(labels)) != len(labels) or not all(labels):
        raise InvalidInputError(
            f"--labels {','.join(labels)!r}: a zoo model needs at least two distinct, "
            "non-empty labels, one per output of its head")
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise InvalidInputError(
            f"--input {'x'.join(map(str, input_shape))}: give channels x height x width, "
            "e.g. 3x32x32")
    for flag, values in (("--mean", mean), ("--std", std)):
        if values is not None and len(values) != input_shape[0]:
            raise InvalidInputError(
                f"{flag} has {len(values)} value(s) but --input has {input_shape[0]} channel(s)")
    if std is not None and min(std) <= 0:
        raise InvalidInputError(f"--std {','.join(map(str, std))}: every std must be > 0")


def as_network(model: torch.nn.Module, manifest: Manifest) -> ZooNet:
    """``model`` as cloning sees it: a pnc ``ZooNet`` as it is, any other in a ``GraphNet``."""
    if isinstance(model, ZooNet):
        return model
    from pnc_net.graphnet import GraphNet  # torch.fx and Torch-Pruning: only for imports

    return GraphNet(model, manifest.input_shape, mean=manifest.mean, std=manifest.std)


def module_from_weights(manifest: Manifest, data: bytes) -> torch.nn.Module:
    """A frozen, eval-mode module of ``manifest``'s architecture holding ``data``'s weights.

    Raises:
        InvalidInputError: the bytes are not safetensors, or do not fit the architecture.
        PreconditionError: the architecture needs a package that is not installed (timm).
    """
    model = checkpoints.build_arch(manifest.arch, manifest.arch_args)
    try:
        state = load_safetensors(data)
        checkpoints.load_into(model, state)
    except Exception as err:  # noqa: BLE001 - safetensors/torch raise several types
        raise InvalidInputError(
            f"weights of {manifest.name} do not fit architecture {manifest.arch}: "
            f"{checkpoints.one_line(err)}"
        ) from None
    return checkpoints.frozen(model)


def model_from_weights(manifest: Manifest, data: bytes) -> ZooNet:
    """``as_network`` of a frozen, eval-mode model holding ``data``'s weights.

    Raises:
        IncompatibleError: an import that cannot be traced or has no linear head.
        InvalidInputError: the bytes are not safetensors, or do not fit the architecture.
    """
    return as_network(module_from_weights(manifest, data), manifest)


def state_digest(model: torch.nn.Module) -> str:
    """sha256 over a module's state dict: tests use it to prove zoo weights never change."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
