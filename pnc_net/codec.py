"""The torch-free half of the wire format: the zstd frame, the protobuf message, tensors as numpy.

``parse(data)`` turns package bytes into a checked ``pb.Package`` message
(exactly one zstd frame, decompressed size capped, every declared size within
the limits below, format version known) without importing torch, so the edge
client can check a package before it sends it; ``pnc_net.wire`` builds the
``Package`` objects (torch tensors) on top of it.

The decoding budget: the limits below bound what any package, however crafted,
makes a receiver allocate. The decompressed message is at most
``MAX_PACKAGE_BYTES`` (whatever the frame header claims: decompression streams and
stops at the cap), and its declared sizes (tensor elements, mask widths, probe
and label counts, string lengths) are checked against these limits before any
array is built. ``tests/test_decode_budget.py`` proves the figure for decode +
rebuild of every known attack package in a child process under a memory rlimit.
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
# Limits (the decoding budget). A real package is a few kilobytes: 1 module, ~1,200 tensor
# elements, 4 masks of <= 128 filters, 16 probes x ~7 labels. Every limit is >= 100x that.
MAX_PACKAGE_BYTES = 8 << 20  # compressed and decompressed size of one package, bytes
MAX_TENSOR_ELEMENTS = 1 << 20  # one tensor (4 MiB as float32)
MAX_PACKAGE_ELEMENTS = 1 << 21  # all tensors of a package together (8 MiB as float32)
MAX_TENSOR_DIMS = 8
MAX_MASK_WIDTH = 1 << 16  # filters in one mask layer
MAX_MASKS_PER_MODULE = 256
MAX_TENSORS_PER_MODULE = 256
MAX_MODULES = 64
MAX_LABELS = 4096  # label names of a package (and cloned classes of a module)
MAX_PROBE_COUNT = 256  # fingerprint probes (clone writes 16); each is a forward pass
MAX_NAME_CHARS = 256  # names, labels, architectures, versions
MAX_JSON_CHARS = 1 << 16  # config and report JSON (a report is ~1 KB)
# Decompression feeds the zstd frame in slices of this many bytes, so one call can never
# produce more than ~FEED * 32768 bytes (zstd's largest ratio, RLE blocks): the output cap
# overshoots by at most 4 MiB, whatever the frame's header declares.
ZSTD_FEED_BYTES = 128
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
        div: np.ndarray | np.float32
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
    shape = _checked_shape(msg)
    np_dtype = np.dtype(_NP[msg.dtype]).newbyteorder("<")
    expected = math.prod(shape) * np_dtype.itemsize
    if len(msg.data) != expected:
        raise InvalidInputError(f"tensor {msg.name!r} holds {len(msg.data)} bytes; shape {shape} "
                                f"as {np_dtype.name} needs {expected}")
    arr = np.frombuffer(msg.data, dtype=np_dtype).astype(np.float32).reshape(shape)
    if msg.dtype == pb.INT8:
        arr = np.asarray(arr * _scale_of(msg, shape), dtype=np.float32)  # 0-d stays an array
    elif msg.scales:
        raise InvalidInputError(f"tensor {msg.name!r} carries int8 scales but is not int8")
    if not np.isfinite(arr).all():
        raise InvalidInputError(f"tensor {msg.name!r} holds NaN or infinite values")
    return arr.copy()


def _checked_shape(msg: pb.Tensor) -> tuple[int, ...]:
    """The declared shape, refused before anything is allocated when it has too many
    dimensions or elements."""
    if len(msg.shape) > MAX_TENSOR_DIMS:
        raise InvalidInputError(f"tensor {msg.name[:80]!r} has {len(msg.shape)} dimensions; the "
                                f"limit is {MAX_TENSOR_DIMS}")
    shape = tuple(int(s) for s in msg.shape)
    count = math.prod(shape)
    if count > MAX_TENSOR_ELEMENTS:
        raise InvalidInputError(f"tensor {msg.name[:80]!r} has shape {shape} ({count} elements); "
                                f"the limit is {MAX_TENSOR_ELEMENTS}")
    return shape


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
    """The package message from its bytes, or ``InvalidInputError``: exactly one valid zstd
    frame and nothing after it, within ``MAX_PACKAGE_BYTES``, a valid message, a format
    version this pnc reads, every declared size within the limits (``check_limits``)."""
    return parse_message(decompress(data))


def parse_message(raw: bytes) -> pb.Package:
    """The checked message from the frame's content (``parse`` without the frame)."""
    msg = pb.Package()
    try:
        msg.ParseFromString(raw)
    except (DecodeError, RuntimeError, ValueError) as err:
        raise InvalidInputError(f"package is not a valid pnc message ({err})") from None
    check_version(msg.format_version)
    check_limits(msg)
    return msg


def decompress(data: bytes) -> bytes:
    """The content of the one zstd frame ``data`` must be, never more than
    ``MAX_PACKAGE_BYTES``: the header's declared size is checked first, then the frame is
    streamed in small slices, so a header that lies (or states nothing) cannot make us
    allocate beyond the cap. Trailing bytes or a second frame would give one package many
    ids, so they are refused."""
    if len(data) > MAX_PACKAGE_BYTES:
        raise InvalidInputError(f"package is {len(data)} bytes; the limit is {MAX_PACKAGE_BYTES}")
    _check_declared_size(data)
    dobj = zstandard.ZstdDecompressor().decompressobj()
    parts, size, pos = [], 0, 0
    try:
        while pos < len(data) and not dobj.eof:
            parts.append(dobj.decompress(data[pos:pos + ZSTD_FEED_BYTES]))
            pos += ZSTD_FEED_BYTES
            size += len(parts[-1])
            if size > MAX_PACKAGE_BYTES:
                raise InvalidInputError(f"package decompresses to more than {MAX_PACKAGE_BYTES} "
                                        "bytes; the limit stops zip bombs")
    except zstandard.ZstdError as err:
        raise _not_zstd(err) from None
    if not dobj.eof:
        raise _not_zstd("the frame does not end")
    if dobj.unused_data or pos < len(data):
        raise InvalidInputError("package has bytes after its zstd frame; a package is exactly "
                                "one frame")
    return b"".join(parts)


def _check_declared_size(data: bytes) -> None:
    """Refuse a frame whose header states a content size beyond the cap, before anything
    is allocated for it."""
    try:
        declared = zstandard.get_frame_parameters(data).content_size
    except zstandard.ZstdError as err:
        raise _not_zstd(err) from None
    if declared != zstandard.CONTENTSIZE_UNKNOWN and declared > MAX_PACKAGE_BYTES:
        raise InvalidInputError(f"package frame declares {declared} bytes of content; the "
                                f"limit is {MAX_PACKAGE_BYTES}")


def _not_zstd(err: object) -> InvalidInputError:
    return InvalidInputError(f"package is not valid zstd data ({err}); it may be truncated "
                             "or corrupted")


def check_limits(msg: pb.Package) -> None:
    """Every size a package declares, against the budget's limits, before any tensor,
    mask or probe batch is built from it (``InvalidInputError`` naming the field)."""
    _at_most(len(msg.modules), MAX_MODULES, "cloned modules")
    _at_most(len(msg.label_names), MAX_LABELS, "label names")
    _strings([msg.writer_version, *msg.label_names], "name")
    _at_most(len(msg.report_json), MAX_JSON_CHARS, "characters of report JSON")
    elements = 0
    for module in msg.modules:
        _at_most(len(module.masks), MAX_MASKS_PER_MODULE, "masks in a module")
        _at_most(len(module.tensors), MAX_TENSORS_PER_MODULE, "tensors in a module")
        _at_most(len(module.cloned_classes), MAX_LABELS, "cloned classes in a module")
        _at_most(len(module.config_json), MAX_JSON_CHARS, "characters of module config JSON")
        for mask in module.masks:
            _at_most(mask.width, MAX_MASK_WIDTH, f"filters in mask {mask.layer[:80]!r}")
        _strings([m.layer for m in module.masks] + [t.name for t in module.tensors], "name")
        elements += sum(math.prod(_checked_shape(t)) for t in module.tensors)
    if msg.HasField("fingerprint"):
        _at_most(msg.fingerprint.probe_count, MAX_PROBE_COUNT, "fingerprint probes")
        elements += math.prod(_checked_shape(msg.fingerprint.probabilities))
    _at_most(elements, MAX_PACKAGE_ELEMENTS, "tensor elements in the package")


def _at_most(value: int, limit: int, what: str) -> None:
    if value > limit:
        raise InvalidInputError(f"package declares {value} {what}; the limit is {limit}")


def _strings(texts: list[str], what: str) -> None:
    for text in texts:
        if len(text) > MAX_NAME_CHARS:
            raise InvalidInputError(f"package has a {what} of {len(text)} characters "
                                    f"({text[:40]!r}...); the limit is {MAX_NAME_CHARS}")


def check_version(format_version: int) -> None:
    """``InvalidInputError`` for a package format this pnc cannot read."""
    if format_version not in READABLE_VERSIONS:
        raise InvalidInputError(
            f"package format version {format_version} is not supported by pnc {__version__} "
            f"(it reads {list(READABLE_VERSIONS)}); upgrade pnc")


def compress(raw: bytes) -> bytes:
    """One zstd frame with a checksum (the only framing a package has)."""
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).compress(raw)
