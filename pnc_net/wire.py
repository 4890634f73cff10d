"""The package's bytes: protobuf + zstd (the only module that knows the wire format).

``encode(package)`` -> bytes; ``decode(bytes)`` -> ``Package``. A package's id
is the sha256 of its encoded bytes. Adapter and fusion tensors travel as fp16
by default (``fp32`` is lossless, ``int8`` is smallest and may need the
receiver's repair step); masks travel as packed bits.

Decoding validates structure (format version, tensor sizes, mask widths, label
map) and raises ``InvalidInputError`` for anything malformed: never a crash,
never a half-built object. Checks against the zoo happen in ``pnc_net.rebuild``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import zstandard
from google.protobuf.message import DecodeError

from pnc_net import __version__
from pnc_net._proto import package_pb2 as pb
from pnc_net.errors import InvalidInputError, NotFoundError
from pnc_net.fsutil import atomic_write_bytes, sha256_bytes
from pnc_net.package import ClonedModule, Fingerprint, Package, ZooRef

FORMAT_VERSION = 1
READABLE_VERSIONS = (1,)
ZSTD_LEVEL = 3
MAX_PACKAGE_BYTES = 64 << 20  # decompressed; a package is kilobytes, this stops zip bombs
WIRE_DTYPES = {"fp32": pb.FLOAT32, "fp16": pb.FLOAT16, "int8": pb.INT8}
_NP = {pb.FLOAT32: np.float32, pb.FLOAT16: np.float16, pb.INT8: np.int8}


# ----------------------------------------------------------------------------- tensors


def tensor_to_proto(name: str, t: torch.Tensor, dtype: str = "fp32") -> pb.Tensor:
    if dtype not in WIRE_DTYPES:
        raise InvalidInputError(f"unknown tensor dtype {dtype!r}; use one of {list(WIRE_DTYPES)}")
    arr = t.detach().cpu().float().numpy()
    msg = pb.Tensor(name=name, dtype=WIRE_DTYPES[dtype], shape=list(arr.shape))
    if dtype == "int8":
        scale = float(np.abs(arr).max()) / 127 if arr.size and np.abs(arr).max() > 0 else 1.0
        msg.scale = scale
        msg.data = np.clip(np.round(arr / scale), -127, 127).astype("<i1").tobytes()
    else:
        msg.data = arr.astype(np.dtype(_NP[msg.dtype]).newbyteorder("<")).tobytes()
    return msg


def tensor_from_proto(msg: pb.Tensor) -> torch.Tensor:
    if msg.dtype not in _NP:
        raise InvalidInputError(f"tensor {msg.name!r} has unknown dtype {msg.dtype}")
    shape = tuple(int(s) for s in msg.shape)
    if len(shape) > 8 or any(s > 1 << 24 for s in shape):
        raise InvalidInputError(f"tensor {msg.name!r} has an implausible shape {shape}")
    np_dtype = np.dtype(_NP[msg.dtype]).newbyteorder("<")
    expected = math.prod(shape) * np_dtype.itemsize
    if len(msg.data) != expected:
        raise InvalidInputError(f"tensor {msg.name!r} holds {len(msg.data)} bytes; shape {shape} "
                                f"as {np_dtype.name} needs {expected}")
    arr = np.frombuffer(msg.data, dtype=np_dtype).astype(np.float32).reshape(shape)
    if msg.dtype == pb.INT8:
        if not math.isfinite(msg.scale):
            raise InvalidInputError(f"tensor {msg.name!r} has a non-finite int8 scale")
        arr = arr * np.float32(msg.scale)
    if not np.isfinite(arr).all():
        raise InvalidInputError(f"tensor {msg.name!r} holds NaN or infinite values")
    return torch.from_numpy(arr.copy())


def mask_to_proto(layer: str, mask: torch.Tensor) -> pb.Mask:
    bits = np.packbits(mask.cpu().numpy().astype(bool), bitorder="little")
    return pb.Mask(layer=layer, width=int(mask.numel()), bits=bits.tobytes())


def mask_from_proto(msg: pb.Mask) -> torch.Tensor:
    if msg.width == 0 or msg.width > 1 << 20 or len(msg.bits) != (msg.width + 7) // 8:
        raise InvalidInputError(
            f"mask {msg.layer!r} of width {msg.width} holds {len(msg.bits)} bytes")
    bits = np.unpackbits(np.frombuffer(msg.bits, np.uint8), bitorder="little")[: msg.width]
    return torch.from_numpy(bits.astype(bool))


# ----------------------------------------------------------------------------- messages


def _ref_to_proto(ref: ZooRef) -> pb.ZooRef:
    return pb.ZooRef(name=ref.name, sha256=ref.sha256, size_bytes=ref.size_bytes, arch=ref.arch)


def _ref_from_proto(msg: pb.ZooRef, role: str) -> ZooRef:
    digest = msg.sha256
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise InvalidInputError(f"{role} reference has an invalid sha256 {digest[:80]!r}")
    return ZooRef(msg.name, digest, int(msg.size_bytes), msg.arch)


def to_proto(package: Package, dtype: str = "fp16") -> pb.Package:
    msg = pb.Package(format_version=FORMAT_VERSION, writer_version=__version__,
                     target=_ref_to_proto(package.target), label_names=list(package.label_names),
                     created_unix_s=package.created_unix_s,
                     report_json=json.dumps(package.report, sort_keys=True, default=float))
    for m in package.modules:
        msg.modules.append(pb.ClonedModule(
            source=_ref_to_proto(m.source), cloned_classes=list(m.cloned_classes),
            position_r=m.position_r, position_s=m.position_s,
            masks=[mask_to_proto(k, v) for k, v in sorted(m.masks.items())],
            tensors=[tensor_to_proto(k, v, dtype) for k, v in sorted(m.tensors.items())],
            config_json=json.dumps(m.config, sort_keys=True)))
    if package.fingerprint is not None:
        fp = package.fingerprint
        msg.fingerprint.CopyFrom(pb.Fingerprint(
            probe_seed=fp.probe_seed, probe_count=fp.probe_count, tolerance=fp.tolerance,
            probabilities=tensor_to_proto("probabilities", fp.probabilities, "fp32")))
    return msg


def _json(text: str, what: str) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        raise InvalidInputError(f"package {what} is not valid JSON") from None
    if not isinstance(value, dict):
        raise InvalidInputError(f"package {what} must be a JSON object")
    return value


def _module_from_proto(msg: pb.ClonedModule) -> ClonedModule:
    masks = {}
    for m in msg.masks:
        if m.layer in masks:
            raise InvalidInputError(f"mask {m.layer!r} appears twice")
        masks[m.layer] = mask_from_proto(m)
    tensors = {}
    for t in msg.tensors:
        if t.name in tensors:
            raise InvalidInputError(f"tensor {t.name!r} appears twice")
        tensors[t.name] = tensor_from_proto(t)
    if not masks or not tensors:
        raise InvalidInputError("a cloned module needs masks and tensors")
    if not msg.cloned_classes or len(set(msg.cloned_classes)) != len(msg.cloned_classes):
        raise InvalidInputError(f"cloned classes {list(msg.cloned_classes)} are empty or repeat")
    return ClonedModule(_ref_from_proto(msg.source, "source"), tuple(msg.cloned_classes),
                        int(msg.position_r), int(msg.position_s), masks, tensors,
                        _json(msg.config_json, "module config"))


def from_proto(msg: pb.Package) -> Package:
    if msg.format_version not in READABLE_VERSIONS:
        raise InvalidInputError(
            f"package format version {msg.format_version} is not supported by pnc {__version__} "
            f"(it reads {list(READABLE_VERSIONS)}); upgrade pnc")
    if not msg.modules:
        raise InvalidInputError("package holds no cloned module")
    modules = [_module_from_proto(m) for m in msg.modules]
    labels = tuple(msg.label_names)
    if len(set(labels)) != len(labels) or not labels:
        raise InvalidInputError(f"package label map {list(labels)[:20]} is empty or repeats a name")
    n_new = sum(len(m.cloned_classes) for m in modules)
    if n_new >= len(labels):
        raise InvalidInputError("package label map is shorter than its cloned classes")
    fingerprint = None
    if msg.HasField("fingerprint"):
        probs = tensor_from_proto(msg.fingerprint.probabilities)
        if probs.ndim != 2 or probs.shape != (msg.fingerprint.probe_count, len(labels)):
            raise InvalidInputError(f"fingerprint shape {tuple(probs.shape)} does not match "
                                    f"{msg.fingerprint.probe_count} probes x {len(labels)} labels")
        fingerprint = Fingerprint(int(msg.fingerprint.probe_seed), int(msg.fingerprint.probe_count),
                                  probs, float(msg.fingerprint.tolerance))
    return Package(target=_ref_from_proto(msg.target, "target"), modules=modules,
                   label_names=labels, fingerprint=fingerprint,
                   report=_json(msg.report_json, "report"), created_unix_s=msg.created_unix_s,
                   format_version=msg.format_version, writer_version=msg.writer_version)


# ----------------------------------------------------------------------------- bytes


def encode(package: Package, dtype: str = "fp16") -> bytes:
    """Serialized, zstd-compressed package bytes."""
    raw = to_proto(package, dtype).SerializeToString(deterministic=True)
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(raw)


def decode(data: bytes) -> Package:
    """A validated ``Package`` from bytes, or ``InvalidInputError``."""
    try:
        raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=MAX_PACKAGE_BYTES)
    except zstandard.ZstdError as err:
        raise InvalidInputError(f"package is not valid zstd data ({err}); it may be truncated "
                                "or corrupted") from None
    msg = pb.Package()
    try:
        msg.ParseFromString(raw)
    except (DecodeError, RuntimeError, ValueError) as err:
        raise InvalidInputError(f"package is not a valid pnc message ({err})") from None
    return from_proto(msg)


def package_id(data: bytes) -> str:
    return sha256_bytes(data)


def write_package(path: str | Path, package: Package, dtype: str = "fp16") -> tuple[str, int]:
    """Write atomically; returns ``(package id, bytes)``."""
    data = encode(package, dtype)
    atomic_write_bytes(path, data)
    return package_id(data), len(data)


def read_package(path: str | Path) -> tuple[Package, bytes]:
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"package file {path} does not exist")
    data = path.read_bytes()
    return decode(data), data
