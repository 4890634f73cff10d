"""The package's bytes: protobuf + zstd (the only module that knows the wire format).

``encode(package)`` -> bytes; ``decode(bytes)`` -> ``Package`` (the zstd frame,
the message and numpy-level tensors are in the torch-free ``pnc_net.codec``). A package's id
is the sha256 of its encoded bytes. Adapter and fusion tensors travel as fp16
by default, with the weight matrices of the adapter and of a discriminant gate int8
(``fp32`` is lossless; ``int8`` writes every matrix int8 and may need the receiver's
repair step); masks travel as packed bits.

Decoding validates structure (one zstd frame, format version, every declared size
against the budget in ``pnc_net.codec``, tensor sizes, mask widths, label map, the
typed module config ``ModuleConfig``) and raises ``InvalidInputError`` for anything
malformed: never a crash, never a half-built object. Checks against the zoo happen
in ``pnc_net.rebuild``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from pnc_net import __version__, codec, signing
from pnc_net._proto import package_pb2 as pb
from pnc_net.codec import (  # noqa: F401 - part of this module's interface
    FORMAT_VERSION,
    MAX_JSON_CHARS,
    MAX_MASK_WIDTH,
    MAX_MODULES,
    MAX_NAME_CHARS,
    MAX_PACKAGE_BYTES,
    READABLE_VERSIONS,
    WIRE_DTYPES,
)
from pnc_net.errors import InvalidInputError, NotFoundError
from pnc_net.fsutil import atomic_write_bytes, sha256_bytes
from pnc_net.package import ClonedModule, Fingerprint, ModuleConfig, Package, ZooRef

# ----------------------------------------------------------------------------- tensors


def tensor_to_proto(name: str, t: torch.Tensor, dtype: str = "fp32",
                    format_version: int = FORMAT_VERSION) -> pb.Tensor:
    """A tensor as a ``pb.Tensor`` in ``dtype`` (see ``codec.array_to_proto``)."""
    return codec.array_to_proto(name, t.detach().cpu().float().numpy(), dtype, format_version)


def tensor_from_proto(msg: pb.Tensor) -> torch.Tensor:
    """A checked float32 tensor from a ``pb.Tensor`` (see ``codec.array_from_proto``)."""
    return torch.from_numpy(codec.array_from_proto(msg))


def mask_to_proto(layer: str, mask: torch.Tensor) -> pb.Mask:
    """A bool mask as packed bits (little bit order), 8 filters a byte."""
    bits = np.packbits(mask.cpu().numpy().astype(bool), bitorder="little")
    return pb.Mask(layer=layer, width=int(mask.numel()), bits=bits.tobytes())


def mask_from_proto(msg: pb.Mask) -> torch.Tensor:
    """A bool mask, after checking its width (bounded) against its byte count."""
    if msg.width == 0 or msg.width > MAX_MASK_WIDTH or len(msg.bits) != (msg.width + 7) // 8:
        raise InvalidInputError(
            f"mask {msg.layer!r} of width {msg.width} holds {len(msg.bits)} bytes")
    bits = np.unpackbits(np.frombuffer(msg.bits, np.uint8), bitorder="little")[: msg.width]
    return torch.from_numpy(bits.astype(bool))


# ----------------------------------------------------------------------------- messages


def _ref_to_proto(ref: ZooRef) -> pb.ZooRef:
    return pb.ZooRef(name=ref.name, sha256=ref.sha256, size_bytes=ref.size_bytes, arch=ref.arch)


def _name(text: str, what: str) -> str:
    if not text or len(text) > MAX_NAME_CHARS or not text.isprintable():
        raise InvalidInputError(f"{what} {text[:80]!r} is empty, too long or not printable")
    return text


def _ref_from_proto(msg: pb.ZooRef, role: str) -> ZooRef:
    digest = msg.sha256
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise InvalidInputError(f"{role} reference has an invalid sha256 {digest[:80]!r}")
    if msg.size_bytes == 0:
        raise InvalidInputError(f"{role} reference {msg.name[:80]!r} has size 0")
    return ZooRef(_name(msg.name, f"{role} model name"), digest, int(msg.size_bytes),
                  _name(msg.arch, f"{role} architecture"))


#: Tensors a package written as fp16 stores as int8 with per-row scales instead: the
#: discriminant gate's weight (``superbody.DiscriminantGate``) is most of its branch's
#: bytes, and int8 left every test decision of the default task unchanged (fingerprint
#: error 3e-5, 1.4 KB less: ``docs/method.md``); the adapter's weights, whose int8
#: grid the training ends on (``insert.round_adapter_weights``), pay for an adapter of
#: twice the rank (``docs/method.md``). fp32 stays fp32 for whoever asks for it.
INT8_WHEN_FP16 = frozenset({"gate.linear.weight", "adapter.down.weight", "adapter.up.weight"})


def wire_dtype(name: str, dtype: str, ndim: int = 2) -> str:
    """The dtype tensor ``name`` (of ``ndim`` dimensions) is written in, in a package
    written as ``dtype``.

    An int8 package writes only weight matrices (2 or more dimensions, one scale per
    row) as int8; vectors and scalars (biases, feature scales, the energy veto) stay
    fp16, as quantized PyTorch layers keep their bias in float. One int8 scale over a
    vector as varied as a gate's bias rounded it by up to 1/254 of its peak, which cost
    k_t = 0 clones up to 0.006 of locality (``docs/method.md``); the vectors are a few
    hundred bytes of a package."""
    if dtype == "fp16" and name in INT8_WHEN_FP16:
        return "int8"
    return "fp16" if dtype == "int8" and ndim < 2 else dtype


def to_proto(package: Package, dtype: str = "fp16",
             format_version: int = FORMAT_VERSION) -> pb.Package:
    """``format_version`` below the current one writes an older release's format (for
    fixtures and for peers that have not upgraded yet)."""
    if format_version not in READABLE_VERSIONS:
        raise InvalidInputError(f"cannot write package format {format_version}; "
                                f"known: {list(READABLE_VERSIONS)}")
    msg = pb.Package(format_version=format_version, writer_version=__version__,
                     target=_ref_to_proto(package.target), label_names=list(package.label_names),
                     created_unix_s=package.created_unix_s,
                     report_json=json.dumps(package.report, sort_keys=True, default=float),
                     name=package.name, version=package.version)  # never a signature: see sign
    signing.check_identity(msg)
    for m in package.modules:
        msg.modules.append(pb.ClonedModule(
            source=_ref_to_proto(m.source), cloned_classes=list(m.cloned_classes),
            position_r=m.position_r, position_s=m.position_s,
            masks=[mask_to_proto(k, v) for k, v in sorted(m.masks.items())],
            tensors=[tensor_to_proto(k, v, wire_dtype(k, dtype, v.dim()), format_version)
                     for k, v in sorted(m.tensors.items())],
            config_json=json.dumps(m.settings().as_dict(), sort_keys=True)))
    if package.fingerprint is not None:
        fp = package.fingerprint
        msg.fingerprint.CopyFrom(pb.Fingerprint(
            probe_seed=fp.probe_seed, probe_count=fp.probe_count, tolerance=fp.tolerance,
            probabilities=tensor_to_proto("probabilities", fp.probabilities, "fp32")))
    codec.check_limits(msg)  # never write what a receiver would refuse to read
    return msg


def _json(text: str, what: str) -> dict:
    if not text:
        return {}
    if len(text) > MAX_JSON_CHARS:
        raise InvalidInputError(f"package {what} is {len(text)} characters; the limit is "
                                f"{MAX_JSON_CHARS}")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise InvalidInputError(f"package {what} is not valid JSON") from None
    if not isinstance(value, dict):
        raise InvalidInputError(f"package {what} must be a JSON object")
    return value


def _module_from_proto(msg: pb.ClonedModule) -> ClonedModule:
    masks = {}
    for m in msg.masks:
        _name(m.layer, "mask layer")
        if m.layer in masks:
            raise InvalidInputError(f"mask {m.layer!r} appears twice")
        masks[m.layer] = mask_from_proto(m)
    tensors = {}
    for t in msg.tensors:
        if not t.name.startswith(("adapter.", "gate.")) or len(t.name) > MAX_NAME_CHARS:
            raise InvalidInputError(f"tensor {t.name[:80]!r} is neither an adapter nor a gate "
                                    "tensor")
        if t.name in tensors:
            raise InvalidInputError(f"tensor {t.name!r} appears twice")
        tensors[t.name] = tensor_from_proto(t)
    if not tensors:  # masks may be empty: a source without mask units is cloned whole
        raise InvalidInputError("a cloned module needs adapter and gate tensors")
    if not msg.cloned_classes or len(set(msg.cloned_classes)) != len(msg.cloned_classes):
        raise InvalidInputError(f"cloned classes {list(msg.cloned_classes)} are empty or repeat")
    if not 1 <= msg.position_r <= 1024 or not 1 <= msg.position_s <= 1024:
        raise InvalidInputError(f"insertion position {msg.position_r}:{msg.position_s} is not "
                                "a block boundary (R and S start at 1)")
    return ClonedModule(_ref_from_proto(msg.source, "source"), tuple(msg.cloned_classes),
                        int(msg.position_r), int(msg.position_s), masks, tensors,
                        ModuleConfig.from_mapping(_json(msg.config_json, "module config"))
                        .as_dict())


def from_proto(msg: pb.Package) -> Package:
    """A validated ``Package`` from a message (limits re-checked: callers may skip parse)."""
    codec.check_version(msg.format_version)
    codec.check_limits(msg)
    signing.check_identity(msg)
    if not msg.modules or len(msg.modules) > MAX_MODULES:
        raise InvalidInputError(f"package holds {len(msg.modules)} cloned modules "
                                f"(1..{MAX_MODULES} allowed)")
    modules = [_module_from_proto(m) for m in msg.modules]
    labels = tuple(_name(n, "label name") for n in msg.label_names)
    if len(set(labels)) != len(labels) or not labels:
        raise InvalidInputError(f"package label map {list(labels)[:20]} is empty or repeats a name")
    n_new = sum(len(m.cloned_classes) for m in modules)
    if n_new >= len(labels):
        raise InvalidInputError("package label map is shorter than its cloned classes")
    fingerprint = _fingerprint_from_proto(msg.fingerprint, len(labels)) if msg.HasField(
        "fingerprint") else None
    if not math.isfinite(msg.created_unix_s):
        raise InvalidInputError("package creation time is not a finite number")
    return Package(target=_ref_from_proto(msg.target, "target"), modules=modules,
                   label_names=labels, fingerprint=fingerprint,
                   report=_json(msg.report_json, "report"), created_unix_s=msg.created_unix_s,
                   format_version=msg.format_version, writer_version=msg.writer_version,
                   name=msg.name, version=int(msg.version),
                   signer=signing.key_id(msg.signature.public_key) if msg.HasField("signature")
                   else None)


def _fingerprint_from_proto(msg: pb.Fingerprint, n_labels: int) -> Fingerprint:
    """The recorded probe outputs: at least one probe (zero would verify anything), one
    probability row per probe, tolerance in [0, 1] (the receiver caps it further)."""
    if msg.probe_count < 1:
        raise InvalidInputError("fingerprint has 0 probes; it would verify any rebuild")
    probs = tensor_from_proto(msg.probabilities)
    if probs.ndim != 2 or probs.shape != (msg.probe_count, n_labels):
        raise InvalidInputError(f"fingerprint shape {tuple(probs.shape)} does not match "
                                f"{msg.probe_count} probes x {n_labels} labels")
    tol = float(msg.tolerance)
    in_range = bool(((probs > -1e-3) & (probs < 1 + 1e-3)).all())
    if not (math.isfinite(tol) and 0 <= tol <= 1) or not in_range:
        raise InvalidInputError(f"fingerprint tolerance {tol} or probabilities are outside "
                                "[0, 1]")
    return Fingerprint(int(msg.probe_seed), int(msg.probe_count), probs, tol)


# ----------------------------------------------------------------------------- bytes


def encode(package: Package, dtype: str = "fp16", format_version: int = FORMAT_VERSION) -> bytes:
    """Serialized, zstd-compressed package bytes."""
    return codec.compress(to_proto(package, dtype, format_version)
                          .SerializeToString(deterministic=True))


def decode(data: bytes) -> Package:
    """A validated ``Package`` from bytes, or ``InvalidInputError``."""
    return from_proto(codec.parse(data))


def package_id(data: bytes) -> str:
    """The id of a package: the sha256 of its exact bytes (hence one frame, no trailer)."""
    return sha256_bytes(data)


def write_package(path: str | Path, package: Package, dtype: str = "fp16") -> tuple[str, int]:
    """Write atomically; returns ``(package id, bytes)``."""
    data = encode(package, dtype)
    atomic_write_bytes(path, data)
    return package_id(data), len(data)


def read_package(path: str | Path) -> tuple[Package, bytes]:
    """A package file's decoded package and its bytes; ``NotFoundError`` if missing."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"package file {path} does not exist")
    data = path.read_bytes()
    return decode(data), data
