"""Ordinary checkpoints in and out of the zoo: reading, architectures, digests.

``pnc zoo add`` imports a plain state_dict (``.pth`` through ``torch.load(weights_only=True)``,
or ``.safetensors``) for an architecture named ``cnn`` / ``resnet`` (pnc's own,
``pnc_net.models``), ``torchvision:NAME`` (``torchvision.models.get_model``) or
``timm:NAME`` (``timm.create_model(..., pretrained=False)``). Every check runs
before anything is written: the file parses without running code, the
architecture exists, the keys and shapes fit it, its head has one output per
label, and it runs on the declared input.

Two digests describe the weights (``docs/zoo.md``):

- the sha256 of the file as published (``origin.sha256``), what a user compares
  with the publisher's (torch.hub puts its first hex digits in the file name);
- ``tensors_digest``: a canonical digest of the tensors themselves (name, dtype,
  shape and bytes, in sorted key order), the same whatever container, pickle
  protocol or key order carried them.

The zoo stores ``canonical_bytes(tensors, arch)``: a deterministic safetensors
serialization, so the zoo id (the sha256 of the stored file) is a function of
the architecture and the tensors alone, the same on every node.
"""

from __future__ import annotations

import collections
import difflib
import hashlib
import importlib.util
import inspect
import io
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pnc_net.errors import IncompatibleError, InvalidInputError, NotFoundError, PreconditionError
from pnc_net.fsutil import sha256_bytes
from pnc_net.models import ARCHITECTURES

TORCHVISION = "torchvision"
TIMM = "timm"
PTH_SUFFIXES = (".pth", ".pt", ".bin")
SAFETENSORS_SUFFIXES = (".safetensors",)
#: Keys under which training scripts commonly nest the state_dict in a checkpoint dict.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
#: Arguments pnc sets itself: the class count comes from --labels, weights never download.
RESERVED_ARGS = ("num_classes", "pretrained", "weights", "pretrained_cfg", "pretrained_cfg_overlay")
#: The tag that starts every tensor digest (a new digest definition gets a new tag).
DIGEST_TAG = b"pnc-tensors-v1\n"

#: safetensors' dtype names, used in the tensor digest so it names dtypes as the file does.
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


def one_line(text: object, limit: int = 240) -> str:
    """``text`` as one line (errors are printed on one line), cut to ``limit`` characters."""
    line = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(text)).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


# ----------------------------------------------------------------------------- digests


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """Hex sha256 over the tensors in sorted key order: name, dtype, shape, bytes.

    Per tensor: one JSON line ``["name", "F32", [3, 4]]``, then the byte count as 8
    little-endian bytes, then the raw little-endian, C-order bytes; the whole after
    ``DIGEST_TAG``. Independent of container, pickle protocol, storage sharing and
    insertion order, so two nodes that hold the same weights compute the same digest.
    """
    h = hashlib.sha256(DIGEST_TAG)
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype not in DTYPE_NAMES:
            raise InvalidInputError(f"tensor {name!r} has dtype {t.dtype}, which pnc does not store")
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        h.update(json.dumps([name, DTYPE_NAMES[t.dtype], list(t.shape)]).encode() + b"\n")
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    return h.hexdigest()


def canonical_bytes(tensors: Mapping[str, torch.Tensor], arch: str) -> bytes:
    """The zoo's stored form: safetensors of ``tensors`` with ``{"arch": arch}`` metadata.

    safetensors orders tensors by dtype and name and the header has one metadata key,
    so the bytes depend on the tensors and ``arch`` only (``Zoo.add`` writes the same).
    """
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    return save(state, metadata={"arch": arch})


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Checkpoint:
    """The tensors of a checkpoint file and where they came from."""

    tensors: dict[str, torch.Tensor]
    origin: dict = field(default_factory=dict)  # file, sha256, size_bytes, format, [key, prefix]


def read_checkpoint(path: str | Path) -> Checkpoint:
    """A plain state_dict from ``.pth``/``.pt``/``.bin`` (weights only) or ``.safetensors``.

    Raises:
        NotFoundError: no such file.
        InvalidInputError: another suffix; pickled code; a truncated or corrupt file; no
            state_dict inside (one line each).
    """
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"checkpoint {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in PTH_SUFFIXES + SAFETENSORS_SUFFIXES:
        raise InvalidInputError(
            f"checkpoint {path.name}: pnc reads {', '.join(PTH_SUFFIXES)} (torch.save of a "
            f"state_dict) and .safetensors files, not {suffix or 'files without a suffix'}")
    data = path.read_bytes()
    origin: dict[str, Any] = {"file": path.name, "sha256": sha256_bytes(data),
                              "size_bytes": len(data)}
    if suffix in SAFETENSORS_SUFFIXES:
        origin["format"] = "safetensors"
        obj: object = _load_safetensors(path.name, data)
    else:
        origin["format"] = "pth"
        obj = _load_pth(path.name, data)
    tensors = _state_dict_of(path.name, obj, origin)
    if not tensors:
        raise InvalidInputError(f"checkpoint {path.name} holds no tensors")
    return Checkpoint(tensors, origin)


def _load_safetensors(name: str, data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as err:  # noqa: BLE001 - SafetensorError, and the header's JSON errors
        raise InvalidInputError(
            f"checkpoint {name} is not a readable .safetensors file (truncated or corrupt?): "
            f"{one_line(err)}") from None


def _load_pth(name: str, data: bytes) -> object:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, KeyError...
        # torch names the refused callable: "Unsupported global: GLOBAL x.y" or
        # "unsupported GLOBAL os.system whose module os is blocked"
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found:
            # A zip checkpoint (torch >= 1.6) is whole when its central directory reads; a
            # legacy file cut short can stop at a half-written global name instead.
            whole = data[:4] == b"PK\x03\x04"
            raise InvalidInputError(
                f"checkpoint {name} contains pickled code ({found.group(1)}"
                f"{'' if whole else ', or the file is cut short'}); pnc loads .pth files with "
                "torch.load(weights_only=True) and never runs a checkpoint's code: save "
                "model.state_dict() instead, or convert it to .safetensors") from None
        detail = one_line(err).split(". ")[0] or type(err).__name__  # torch's first sentence
        raise InvalidInputError(
            f"checkpoint {name} is not a readable .pth file (truncated or corrupt?): "
            f"{detail}") from None


def _state_dict_of(name: str, obj: object, origin: dict) -> dict[str, torch.Tensor]:
    """The flat name -> tensor mapping in ``obj``, unwrapping ``{"state_dict": ...}``
    and a ``module.`` prefix (``nn.DataParallel``); both are recorded in ``origin``."""
    if isinstance(obj, Mapping) and not _all_tensors(obj):
        nested = [k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
        if nested and _all_tensors(obj[nested[0]]):
            origin["key"] = nested[0]
            obj = obj[nested[0]]
    if not isinstance(obj, Mapping) or not _all_tensors(obj):
        what = (f"a dict with non-tensor values ({', '.join(_non_tensor_keys(obj))})"
                if isinstance(obj, Mapping) else f"a {type(obj).__name__}")
        raise InvalidInputError(
            f"checkpoint {name} holds {what}, not a state_dict; save one with "
            "torch.save(model.state_dict(), path)")
    tensors = {str(k): v for k, v in obj.items()}
    if tensors and all(k.startswith("module.") for k in tensors):
        origin["prefix"] = "module."
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def _all_tensors(obj: Mapping) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _non_tensor_keys(obj: Mapping, most: int = 4) -> list[str]:
    keys = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    return keys[:most] + ([f"{len(keys) - most} more"] if len(keys) > most else [])


# ----------------------------------------------------------------------------- architectures


def family(arch: str) -> str:
    """``"pnc"``, ``"torchvision"`` or ``"timm"`` for an architecture name."""
    prefix, sep, _ = arch.partition(":")
    return prefix if sep and prefix in (TORCHVISION, TIMM) else "pnc"


def is_pnc_arch(arch: str) -> bool:
    """True for pnc's own architectures (``ZooNet``s that cloning can use)."""
    return arch in ARCHITECTURES


def check_arch(arch: str) -> None:
    """Refuse an unknown architecture name (before any file is read).

    Raises:
        InvalidInputError: unknown name, with the closest known ones.
        PreconditionError: a ``timm:`` name without timm installed.
    """
    _builder(arch)


def _unknown(arch: str, known: list[str], how: str) -> InvalidInputError:
    _, _, name = arch.partition(":")
    close = difflib.get_close_matches(name or arch, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return InvalidInputError(f"unknown architecture {arch!r} ({how}){hint}")


def _builder(arch: str) -> Callable[..., nn.Module]:
    kind = family(arch)
    name = arch.partition(":")[2]
    if kind == TORCHVISION:
        import torchvision.models as tvm

        names = tvm.list_models(module=tvm)
        if name in names:
            return lambda **kw: tvm.get_model(name, **kw)
        cls = getattr(tvm, name, None)  # a model class, e.g. VisionTransformer with --arch-args
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls
        raise _unknown(arch, names, "not a torchvision classification model; see "
                       "torchvision.models.list_models(module=torchvision.models)")
    if kind == TIMM:
        if importlib.util.find_spec("timm") is None:
            raise PreconditionError(f"{arch} needs timm, which is not installed; "
                                    "pip install 'pnc[full]'")
        import timm

        if not timm.is_model(name):
            raise _unknown(arch, timm.list_models(), "not a timm model; see timm.list_models()")
        return lambda **kw: timm.create_model(name, pretrained=False, **kw)
    if arch not in ARCHITECTURES:
        raise _unknown(arch, sorted(ARCHITECTURES),
                       f"give one of {', '.join(sorted(ARCHITECTURES))}, torchvision:NAME "
                       "or timm:NAME")
    return ARCHITECTURES[arch]


def build_arch(arch: str, arch_args: Mapping[str, Any]) -> nn.Module:
    """A random-init module of ``arch`` built with ``arch_args`` (never downloads weights).

    Raises:
        InvalidInputError: unknown architecture, or arguments it does not take.
    """
    builder = _builder(arch)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in arch_args.items()}
    try:
        return builder(**kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as err:
        raise InvalidInputError(
            f"cannot build {arch} with {json.dumps(dict(arch_args), sort_keys=True)}: "
            f"{one_line(err)}") from None


def import_arch_args(arch: str, num_classes: int, tensors: Mapping[str, torch.Tensor],
                     extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The constructor arguments an imported checkpoint is built with.

    ``num_classes`` comes from the labels; pnc's ``cnn``/``resnet`` also read their input
    channels and widths off the checkpoint (widths only when not the default, so an
    exported pnc model comes back with the manifest it had). ``extra`` (``--arch-args``)
    is passed through, e.g. ``{"image_size": 32}`` for a torchvision ViT.
    """
    extra = dict(extra or {})
    taken = [k for k in RESERVED_ARGS if k in extra]
    if taken:
        raise InvalidInputError(
            f"--arch-args may not set {', '.join(taken)}: the class count comes from --labels "
            "and pnc never downloads weights")
    args: dict[str, Any] = {}
    if is_pnc_arch(arch):
        args.update(_pnc_shape_args(arch, tensors))
    args.update(extra)
    args["num_classes"] = num_classes
    return args


def _pnc_shape_args(arch: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    stem = tensors.get("blocks.0.conv.weight")
    if stem is None or stem.dim() != 4:
        return {}  # the strict load names the missing keys
    widths = [int(stem.shape[0])]
    key = "blocks.{}.conv.weight" if arch == "cnn" else "blocks.{}.body.conv2.weight"
    i = 1
    while key.format(i) in tensors:
        widths.append(int(tensors[key.format(i)].shape[0]))
        i += 1
    args: dict[str, Any] = {"in_channels": int(stem.shape[1])}
    default = inspect.signature(ARCHITECTURES[arch]).parameters["widths"].default
    if tuple(widths) != tuple(default):
        args["widths"] = widths
    return args


# ----------------------------------------------------------------------------- checks


def find_head(model: nn.Module, num_classes: int) -> tuple[str, nn.Module]:
    """The classifier of a model built for ``num_classes``: ``(qualified name, layer)``.

    timm models name theirs (``get_classifier()``); elsewhere it is the last ``nn.Linear``
    with ``num_classes`` outputs (torchvision's ``fc``, ``classifier[-1]``, ``heads.head``;
    pnc's ``head.fc``), else the last such conv (SqueezeNet's ``classifier.1``).

    Raises:
        IncompatibleError: no layer of the model has ``num_classes`` outputs.
    """
    root, prefix = model, ""
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        clf = get_classifier()
        for name, mod in model.named_modules():
            if isinstance(clf, nn.Module) and mod is clf:
                root, prefix = mod, name
                break
    for kinds in ((nn.Linear,), (nn.Conv2d, nn.Conv1d)):
        found = [(name, mod) for name, mod in root.named_modules(prefix=prefix)
                 if isinstance(mod, kinds) and _outputs(mod) == num_classes]
        if found:
            return found[-1]
    raise IncompatibleError(
        f"{type(model).__name__} has no linear or conv layer with {num_classes} outputs to "
        "serve as its classifier")


def _outputs(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return layer.out_features
    return layer.out_channels if isinstance(layer, nn.Conv1d | nn.Conv2d) else -1


def _few(keys: list[str], most: int = 3) -> str:
    return ", ".join(keys[:most]) + (f" and {len(keys) - most} more" if len(keys) > most else "")


def check_fits(model: nn.Module, tensors: Mapping[str, torch.Tensor], arch: str,
               labels: tuple[str, ...], file: str) -> None:
    """Refuse a checkpoint whose keys, head size or shapes do not fit ``model``.

    Raises:
        IncompatibleError: missing or unexpected keys; a head for another number of
            classes than ``labels``; another tensor's shape (one line each).
    """
    want = model.state_dict()
    missing = sorted(set(want) - set(tensors))
    unexpected = sorted(set(tensors) - set(want))
    if missing or unexpected:
        parts = ([f"{len(missing)} missing key(s) ({_few(missing)})"] if missing else []) + (
            [f"{len(unexpected)} unexpected key(s) ({_few(unexpected)})"] if unexpected else [])
        raise IncompatibleError(
            f"checkpoint {file} does not fit {arch}: {'; '.join(parts)}; is --arch right?")
    head_name, _ = find_head(model, len(labels))
    head_key = f"{head_name}.weight"
    if head_key in tensors and tensors[head_key].shape[:1] != want[head_key].shape[:1]:
        raise IncompatibleError(
            f"checkpoint {file} has a head ({head_name}) for {tensors[head_key].shape[0]} "
            f"classes but --labels names {len(labels)} ({','.join(labels)}); give one label "
            "per output of the head")
    for key in sorted(want):
        if tuple(tensors[key].shape) != tuple(want[key].shape):
            raise IncompatibleError(
                f"checkpoint {file} does not fit {arch}: {key} has shape "
                f"{list(tensors[key].shape)}, the architecture wants {list(want[key].shape)}; "
                "are --arch and --arch-args right?")


def load_into(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Load a plain state_dict into ``model`` (strict), as the model's own version.

    ``torch.save`` keeps a state_dict's per-module ``_metadata`` (its ``version``),
    safetensors cannot, and some torchvision modules refuse a state_dict without it
    (MNASNet: "version should be set to 1 or 2"). A file without metadata is taken
    to be of the architecture's current version, the one that wrote its key names.
    """
    state = collections.OrderedDict(tensors)
    metadata = getattr(tensors, "_metadata", None)
    if metadata is None:
        metadata = getattr(model.state_dict(), "_metadata", None)
    if metadata is not None:
        state._metadata = metadata  # type: ignore[attr-defined]
    model.load_state_dict(state, strict=True)


def check_runs(model: nn.Module, input_shape: tuple[int, ...], num_classes: int,
               arch: str) -> None:
    """Run ``model`` (eval mode) on one zero input: it must give ``(1, num_classes)`` logits.

    Raises:
        IncompatibleError: the input does not fit the architecture, or the output is not
            one logit per label.
    """
    shape = "x".join(map(str, input_shape))
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *input_shape))
    except Exception as err:  # noqa: BLE001 - a wrong input raises whatever the layer raises
        raise IncompatibleError(
            f"--input {shape} does not fit {arch}: {one_line(err)}") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise IncompatibleError(
            f"{arch} on --input {shape} gives {got}, not one logit per label [1, {num_classes}]")


def frozen(model: nn.Module) -> nn.Module:
    """``model`` in eval mode without gradients (how every zoo model is handed out)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
