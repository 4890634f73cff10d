"""Cloning between plain ``nn.Module``s, without a zoo on disk (PEFT's ``get_peft_model``).

``clone_modules(target, source, data, classes=...)`` runs the same job as
``cloning.clone`` on two networks held in memory: torchvision or timm classifiers
(wrapped in a ``GraphNet``, input shape from ``data``), pnc's own ``ZooNet``\\ s, or a
``GraphNet`` built by the caller (with its ``mean``/``std``). It hands ``clone`` a
``ModuleZoo``, a read-only zoo of the two networks that lives in memory, so the plan's
checks (labels, input shapes, positions) and every later step are ``clone``'s own.

The networks cloning runs are frozen deep copies: the modules passed in are not
written to, not even their train/eval mode or ``requires_grad`` flags.

Each network's identity is the digest the zoo would give it: the sha256 of
``checkpoints.canonical_bytes(state_dict, arch)``. With ``target_arch`` /
``source_arch`` naming the architecture a zoo imports the weights under
(``"cnn"``, ``"torchvision:resnet18"``), the result's package rebuilds on any zoo that
holds the same weights under that name (``pnc zoo add``, ``Zoo.add``), and only there;
without them the architecture is ``module:<ClassName>``, which no zoo holds, and the
package records the clone but rebuilds nowhere.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from torch import nn

from pnc_net import checkpoints
from pnc_net.cloning import CloneConfig, CloneResult, SourceSpec, clone
from pnc_net.data import Dataset
from pnc_net.errors import IncompatibleError, InvalidInputError, PreconditionError
from pnc_net.fsutil import sha256_bytes
from pnc_net.models import ZooNet
from pnc_net.superbody import Branch, check_branch_name
from pnc_net.zoo import Manifest, Zoo

#: The branch's name when ``clone_modules`` is given none.
DEFAULT_BRANCH_NAME = "clone"
#: The networks' names in the package's references and the report (labels only).
TARGET_NAME, SOURCE_NAME = "target-module", "source-module"


class ModuleZoo(Zoo):
    """A read-only zoo of networks held in memory: ``load`` hands them out by name or
    digest as ``Zoo.load`` does; nothing is read from or written to disk."""

    def __init__(self, nets: Mapping[str, tuple[ZooNet, Manifest]]) -> None:
        super().__init__(Path("<in memory>"))
        self._entries = {m.name: (net, m) for net, m in nets.values()}

    def manifests(self) -> list[Manifest]:
        """The networks' manifests, sorted by name."""
        return sorted((m for _, m in self._entries.values()), key=lambda m: m.name)

    def has(self, sha256: str) -> bool:
        """True when a network of this digest is held."""
        return any(m.sha256 == sha256 for _, m in self._entries.values())

    def load(self, ref: str) -> tuple[ZooNet, Manifest]:
        """The network a name, digest or digest prefix names, and its manifest."""
        return self._entries[self.resolve(ref).name]

    def load_module(self, ref: str) -> tuple[nn.Module, Manifest]:
        """The plain module of a network (a ``GraphNet``'s wrapped module)."""
        net, manifest = self.load(ref)
        plain = getattr(net, "plain", None)
        return (plain[0] if plain else net), manifest

    def read_weights(self, manifest: Manifest) -> bytes:
        """Refused: the networks have no weights file (``Zoo.add`` them to get one)."""
        raise PreconditionError(f"{manifest.name} lives in memory; it has no weights file")

    def _store(self, manifest: Manifest, data: bytes) -> Manifest:
        raise PreconditionError("an in-memory zoo stores nothing; use a Zoo on disk")


def _network(module: nn.Module, input_shape: tuple[int, ...], role: str,
             ) -> tuple[ZooNet, nn.Module]:
    """A frozen deep copy of ``module`` as a ``ZooNet`` (plain modules in a ``GraphNet``)
    and the module whose state_dict is its identity."""
    if not isinstance(module, nn.Module):
        raise InvalidInputError(f"{role} must be a torch nn.Module, got {type(module).__name__}")
    net = checkpoints.frozen(copy.deepcopy(module))
    if isinstance(net, ZooNet):
        plain = getattr(net, "plain", None)  # a GraphNet: its weights are the wrapped module's
        return net, (plain[0] if plain else net)
    from pnc_net.graphnet import GraphNet  # torch.fx and Torch-Pruning: only for plain modules

    return GraphNet(net, input_shape), net


def _labels(given: Sequence[str] | None, net: ZooNet, data: Dataset, role: str) -> tuple[str, ...]:
    """The label name of each of ``net``'s outputs: ``given``, else ``data``'s when their
    counts agree."""
    outputs = net.head.fc.out_features
    if given is None:
        if outputs != len(data.label_names):
            raise InvalidInputError(
                f"the {role} has {outputs} outputs but dataset {data.name!r} has "
                f"{len(data.label_names)} labels ({', '.join(data.label_names)}); pass "
                f"{role}_labels=(...) naming the {role}'s outputs in order")
        return tuple(data.label_names)
    if isinstance(given, str):
        raise InvalidInputError(f"{role}_labels={given!r}: give a list of label names")
    labels = tuple(str(n) for n in given)
    if len(labels) != outputs:
        raise InvalidInputError(f"{role}_labels names {len(labels)} labels but the {role} "
                                f"has {outputs} outputs")
    if len(set(labels)) != len(labels):
        raise InvalidInputError(f"{role}_labels {list(labels)} repeat a label")
    return labels


def _manifest(name: str, net: ZooNet, identity: nn.Module, arch: str | None,
              labels: tuple[str, ...], data: Dataset) -> Manifest:
    """The manifest ``Zoo.add`` would write for these weights under ``arch``."""
    arch = arch or f"module:{type(identity).__name__}"
    state = identity.state_dict()
    raw = checkpoints.canonical_bytes(state, arch)
    mean, std = getattr(net, "normalization", (None, None))
    return Manifest(
        name=name, sha256=sha256_bytes(raw), size_bytes=len(raw), arch=arch, arch_args={},
        input_shape=tuple(data.input_shape), label_names=labels, dataset=data.name,
        num_params=sum(p.numel() for p in identity.parameters()), created=time.time(),
        mean=mean, std=std, tensors_sha256=checkpoints.tensors_digest(state),
        origin={"module": type(identity).__name__})


def _config(config: CloneConfig | Mapping[str, Any] | None,
            classes: tuple[str, ...]) -> CloneConfig:
    """The clone's settings with the two modules as target and source."""
    sources = (SourceSpec(SOURCE_NAME, classes),)
    if config is None:
        return CloneConfig(target=TARGET_NAME, sources=sources)
    if isinstance(config, CloneConfig):
        return dataclasses.replace(config, target=TARGET_NAME, sources=sources)
    if not isinstance(config, Mapping):
        raise InvalidInputError(f"config must be a CloneConfig or a dict of its fields, got "
                                f"{type(config).__name__}")
    fields = {f.name for f in dataclasses.fields(CloneConfig)} - {"target", "sources"}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise InvalidInputError(f"config keys {unknown} are not CloneConfig settings "
                                f"({', '.join(sorted(fields))})")
    return CloneConfig(target=TARGET_NAME, sources=sources, **dict(config))


def clone_modules(target: nn.Module, source: nn.Module, data: Dataset, *,
                  classes: Sequence[str], target_labels: Sequence[str] | None = None,
                  source_labels: Sequence[str] | None = None,
                  config: CloneConfig | Mapping[str, Any] | None = None,
                  name: str = DEFAULT_BRANCH_NAME, target_arch: str | None = None,
                  source_arch: str | None = None,
                  log: Callable[[str], None] | None = None) -> CloneResult:
    """Clone ``classes`` of ``source`` into ``target``; both are plain modules, no zoo.

    Args:
        target, source: classifiers ending in a linear layer (torchvision, traceable
            timm, pnc's ``ZooNet``, or a ``GraphNet`` with its preprocessing); they see
            ``data``'s images as they are, ``[0, 1]`` pixels.
        data: a ``pnc_net.data.Dataset`` (train, validation and test splits: cloning
            draws from the first two, the report's metrics use the third).
        classes: the source's label names to clone.
        target_labels, source_labels: the label name of each output, in order; default
            ``data.label_names`` when the output count matches it.
        config: the budgets, as a ``CloneConfig`` (its target and sources are replaced)
            or a dict of its other fields (``{"per_class": 20, "positions": ((3, 3),)}``).
        name: the branch's name in the superbody.
        target_arch, source_arch: the zoo architecture names of the weights, so that the
            package's references match a zoo holding them (module docstring).
        log: progress lines.

    Returns:
        ``clone``'s ``CloneResult``: ``superbody`` (the branch named ``name``),
        ``package`` and ``report`` (metrics on ``data``'s test split).

    Raises:
        InvalidInputError: bad labels, classes, name or settings.
        IncompatibleError: a module cloning cannot use, or inputs that do not fit.
    """
    check_branch_name(name)
    if not isinstance(data, Dataset):
        raise InvalidInputError(
            f"data must be a pnc_net.data.Dataset (train/val/test splits and label names), got "
            f"{type(data).__name__}; load_dataset(path) or Dataset(...) makes one")
    if isinstance(classes, str):
        raise InvalidInputError(f"classes={classes!r}: give a list of label names")
    shape = tuple(data.input_shape)
    t_net, t_plain = _network(target, shape, "target")
    s_net, s_plain = _network(source, shape, "source")
    for role, net in (("target", t_net), ("source", s_net)):
        if not isinstance(getattr(net.head, "fc", None), nn.Linear):
            raise IncompatibleError(f"the {role} does not end in a linear layer")
    t_labels = _labels(target_labels, t_net, data, "target")
    s_labels = _labels(source_labels, s_net, data, "source")
    cfg = _config(config, tuple(str(c) for c in classes))
    zoo = ModuleZoo({
        TARGET_NAME: (t_net, _manifest(TARGET_NAME, t_net, t_plain, target_arch, t_labels, data)),
        SOURCE_NAME: (s_net, _manifest(SOURCE_NAME, s_net, s_plain, source_arch, s_labels, data)),
    })
    result = clone(zoo, data, cfg, log=log)
    sb = result.superbody
    sb.attach(name, cast(Branch, sb.detach(0)))  # clone() names it branch0; same outputs
    return result
