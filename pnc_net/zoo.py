"""The local model zoo: content-addressed safetensors weights plus JSON manifests.

Layout of a zoo folder (default ``~/.cache/pnc/zoo``, or ``PNC_ZOO``)::

    models/<sha256>.safetensors   weights, read-only, named by their digest
    models/<sha256>.json          the manifest (name, architecture, labels, recipe, ...)

A name such as ``mnist-cnn-0to4`` is a label; the sha256 of the weights file is
the identity. Anywhere a model is named, its name, its sha256 or a unique
prefix of the sha256 works. Loading always verifies the digest, and nothing in
pnc ever writes to a stored model.
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
from safetensors.torch import save as save_safetensors

from pnc_net.errors import IntegrityError, InvalidInputError, NotFoundError
from pnc_net.fsutil import atomic_write_bytes, sha256_bytes
from pnc_net.models import ZooNet, build_model

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

    def to_json(self) -> str:
        """The manifest as stored beside the weights (sorted keys: stable bytes)."""
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse ``to_json``'s text; JSON lists become the tuples the fields declare."""
        raw = json.loads(text)
        raw["input_shape"] = tuple(raw["input_shape"])
        raw["label_names"] = tuple(raw["label_names"])
        return cls(**raw)


def default_zoo_dir() -> Path:
    """``$PNC_ZOO``, else ``~/.cache/pnc/zoo``."""
    return Path(os.environ.get("PNC_ZOO", Path.home() / ".cache" / "pnc" / "zoo"))


class Zoo:
    """A folder of zoo models. ``Zoo(dir).load("mnist-cnn-0to4")`` -> (model, manifest)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_zoo_dir()
        self.models_dir = self.root / "models"
        self._cache: dict[str, ZooNet] = {}

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
        """A frozen, eval-mode model (verified by digest) and its manifest.

        Models are cached per zoo instance; callers get the same frozen module,
        which is safe because nothing in pnc writes to zoo weights.
        """
        manifest = self.resolve(ref)
        if manifest.sha256 not in self._cache:
            model = model_from_weights(manifest, self.read_weights(manifest))
            self._cache[manifest.sha256] = model
        return self._cache[manifest.sha256], manifest

    # ------------------------------------------------------------------ writing
    def add(self, model: ZooNet, manifest_fields: dict) -> Manifest:
        """Store a trained model (weights read-only) and return its manifest."""
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        data = save_safetensors(state, metadata={"arch": manifest_fields["arch"]})
        manifest = Manifest(
            sha256=sha256_bytes(data), size_bytes=len(data), created=time.time(),
            num_params=sum(p.numel() for p in model.parameters()), **manifest_fields,
        )
        self.add_blob(manifest, data)
        return manifest

    def add_blob(self, manifest: Manifest, data: bytes) -> Manifest:
        """Store weights received from a peer, refusing bytes that do not match the manifest."""
        actual = sha256_bytes(data)
        if actual != manifest.sha256 or len(data) != manifest.size_bytes:
            raise IntegrityError(
                f"weights for {manifest.name} have digest {actual} ({len(data)} bytes); "
                f"the manifest promises {manifest.sha256} ({manifest.size_bytes} bytes)"
            )
        model_from_weights(manifest, data)  # refuse weights that do not fit the architecture
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
                model_from_weights(m, self.read_weights(m))
                report.append((m, None))
            except (IntegrityError, NotFoundError, InvalidInputError) as err:
                report.append((m, str(err)))
        return report


def model_from_weights(manifest: Manifest, data: bytes) -> ZooNet:
    """A frozen, eval-mode model of ``manifest``'s architecture holding ``data``'s weights.

    Raises:
        InvalidInputError: the bytes are not safetensors, or do not fit the architecture.
    """
    model = build_model(manifest.arch, **manifest.arch_args)
    try:
        state = load_safetensors(data)
        model.load_state_dict(state, strict=True)
    except Exception as err:  # noqa: BLE001 - safetensors/torch raise several types
        raise InvalidInputError(
            f"weights of {manifest.name} do not fit architecture {manifest.arch}: {err}"
        ) from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def state_digest(model: torch.nn.Module) -> str:
    """sha256 over a module's state dict: tests use it to prove zoo weights never change."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
