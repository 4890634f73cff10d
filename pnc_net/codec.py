"""The torch-free half of the wire format: the zstd frame, the protobuf message, tensors as numpy.

``parse(data)`` turns package bytes into a checked ``pb.Package`` message
(decompressed size capped, format version known) without importing torch, so
the edge client can check a package before it sends it; ``pnc_net.wire``
builds the ``Package`` objects (torch tensors) on top of it.
"""

from __future__ import annotations

import math

import numpy as np
import zstandard
from google.protobuf.message import DecodeError

from pnc_net import __version__
from pnc_net._proto import package_pb2 as pb
from pnc_net.errors import InvalidInputError

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # every released version stays readable (tests/data/ fixtures)
ZSTD_LEVEL = 3
MAX_PACKAGE_BYTES = 64 << 20  # decompressed; a package is kilobytes, this stops zip bombs
WIRE_DTYPES = {"fp32": pb.FLOAT32, "fp16": pb.FLOAT16, "int8": pb.INT8}
_NP = {pb.FLOAT32: np.float32, pb.FLOAT16: np.float16, pb.INT8: np.int8}


# ----------------------------------------------------------------------------- tensors


def _int8_scales(arr: np.ndarray, per_row: bool) -> np.ndarray:
    """Symmetric scales: one per row (format 2) or one for the tensor (format 1)."""
    rows = arr.reshape(arr.shape[0], -1) if per_row and arr.ndim >= 1 and arr.size else (
        arr.reshape(1, -1))
    peak = np.abs(rows).max(axis=1) if rows.size else np.zeros(len(rows), np.float32)
    return np.where(peak > 0, peak / 127, 1.0).astype(np.float32)


def array_to_proto(name: str, arr: np.ndarray, dtype: str = "fp32",
                   format_version: int = FORMAT_VERSION) -> pb.Tensor:
    """A float array as a ``pb.Tensor`` in ``dtype`` (fp32, fp16 or int8 with scales)."""
    if dtype not in WIRE_DTYPES:
        raise InvalidInputError(f"unknown tensor dtype {dtype!r}; use one of {list(WIRE_DTYPES)}")
    arr = np.asarray(arr, dtype=np.float32)
    msg = pb.Tensor(name=name, dtype=WIRE_DTYPES[dtype], shape=list(arr.shape))
    if dtype == "int8":
        per_row = format_version >= 2 and arr.ndim >= 2
        scales = _int8_scales(arr, per_row)
        if per_row:
            msg.scales.extend(scales.tolist())
            div = scales.reshape(-1, *([1] * (arr.ndim - 1)))
        else:
            msg.scale = float(scales[0])
            div = np.float32(msg.scale)
        msg.data = np.clip(np.round(arr / div), -127, 127).astype("<i1").tobytes()
    else:
        msg.data = arr.astype(np.dtype(_NP[msg.dtype]).newbyteorder("<")).tobytes()
    return msg


def array_from_proto(msg: pb.Tensor) -> np.ndarray:
    """A checked float32 array (shape, byte count, finite values) from a ``pb.Tensor``."""
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
        arr = arr * _scale_of(msg, shape)
    elif msg.scales:
        raise InvalidInputError(f"tensor {msg.name!r} carries int8 scales but is not int8")
    if not np.isfinite(arr).all():
        raise InvalidInputError(f"tensor {msg.name!r} holds NaN or infinite values")
    return arr.copy()


def _scale_of(msg: pb.Tensor, shape: tuple[int, ...]) -> np.ndarray | np.float32:
    if msg.scales:
        if not shape or len(msg.scales) != shape[0]:
            raise InvalidInputError(f"tensor {msg.name!r} has {len(msg.scales)} int8 scales for "
                                    f"shape {shape}; it needs one per row")
        scales = np.asarray(msg.scales, np.float32)
        if not np.isfinite(scales).all():
            raise InvalidInputError(f"tensor {msg.name!r} has a non-finite int8 scale")
        return scales.reshape(-1, *([1] * (len(shape) - 1)))
    if not math.isfinite(msg.scale):
        raise InvalidInputError(f"tensor {msg.name!r} has a non-finite int8 scale")
    return np.float32(msg.scale)


# ----------------------------------------------------------------------------- bytes


def parse(data: bytes) -> pb.Package:
    """The package message from its bytes, or ``InvalidInputError``: valid zstd within
    ``MAX_PACKAGE_BYTES``, a valid message, a format version this pnc reads."""
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
    check_version(msg.format_version)
    return msg


def check_version(format_version: int) -> None:
    """``InvalidInputError`` for a package format this pnc cannot read."""
    if format_version not in READABLE_VERSIONS:
        raise InvalidInputError(
            f"package format version {format_version} is not supported by pnc {__version__} "
            f"(it reads {list(READABLE_VERSIONS)}); upgrade pnc")


def compress(raw: bytes) -> bytes:
    """One zstd frame with a checksum (the only framing a package has)."""
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).compress(raw)
