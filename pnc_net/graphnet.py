"""Any torchvision or timm classifier as a ``ZooNet``: boundaries from its graph,
mask units from Torch-Pruning's dependency groups.

Cloning only asks a network for block boundaries (``forward_features`` /
``forward_from``), mask units and a pruned copy of its tail (``models.ZooNet``).
``GraphNet`` gives an arbitrary ``nn.Module`` that interface without per-model
code (``docs/method.md``, real architectures):

* **Boundaries** are *cut points* of the module's ``torch.fx`` graph: nodes where
  exactly one tensor is live, so the rest of the network depends on that tensor
  alone and the target can be tapped, and the source entered, there. Many cut
  points sit inside a block (after a conv, before its BatchNorm), so a boundary
  must also be where one module ends and the next begins at the shallowest
  depth of the module tree that gives at least ``MIN_BOUNDARIES`` of them (the
  8 BasicBlocks of a resnet18, the 13 ``features`` of a MobileNetV3, the
  encoder layers of a ViT), and must not be followed by a pointwise op on it
  (a conv's output before its BatchNorm and ReLU is not a feature).
* **Mask units** are Torch-Pruning's groups of coupled channels (a residual
  stream and every conv that reads or writes it; an expansion conv, its
  depthwise conv, squeeze-excite and projection). A unit's mask multiplies its
  channels *where they are consumed* (the inputs of the convs and linears of
  the group), which is exactly what physically removing them does: pruned
  outputs equal masked outputs. Groups with a cross-channel op that pruning
  changes (LayerNorm, GroupNorm, attention, grouped convs) are left whole.
* **Physical pruning** is Torch-Pruning's, on a private copy of the module.

The segments share their modules with the module handed in; nothing here
writes to its weights.
"""

from __future__ import annotations

import copy
import math
import operator
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from pnc_net.errors import IncompatibleError
from pnc_net.models import ChannelGate, FeatureInfo, Head, ZooNet

#: A boundary set at the shallowest module depth that gives at least this many.
MIN_BOUNDARIES = 8

#: Ops that map each channel to itself: a cut point followed by one is not a boundary,
#: and walking back through them from a boundary finds the unit that owns its channels.
_POINTWISE_MODULES = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid,
                      nn.SiLU, nn.GELU, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Mish,
                      nn.Dropout, nn.Identity)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d)
_POINTWISE_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.hardswish, F.silu, F.gelu,
                        torch.sigmoid, F.hardsigmoid, F.dropout, "relu", "relu_", "sigmoid"}
_ELEMENTWISE_BINARY = {operator.add, operator.iadd, torch.add, operator.mul, torch.mul,
                       "add", "add_", "mul", "mul_"}
#: Cross-channel ops whose result changes when channels are removed rather than zeroed.
_UNPRUNABLE = (nn.LayerNorm, nn.GroupNorm, nn.MultiheadAttention, nn.InstanceNorm2d,
               nn.LocalResponseNorm)


class ConsumerGate(nn.Module):
    """Multiplies the input channels of one conv or linear by the gates of the mask
    units that feed it (identity while no unit is gated)."""

    def __init__(self, n_in: int, channel_dim: int,
                 feeds: Sequence[tuple[ChannelGate, list[int], list[int]]]) -> None:
        super().__init__()
        self.n_in, self.channel_dim = n_in, channel_dim
        self.units = [unit for unit, _, _ in feeds]  # plain list: not submodules
        for i, (_, idx, root) in enumerate(feeds):
            self.register_buffer(f"idx{i}", torch.tensor(idx, dtype=torch.long), persistent=False)
            self.register_buffer(f"root{i}", torch.tensor(root, dtype=torch.long),
                                 persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with each fed channel times its unit's gate (per sample for ``(b, c)`` gates)."""
        active = [(i, u.gate) for i, u in enumerate(self.units) if u.gate is not None]
        if not active:
            return x
        rows = max(g.reshape(-1, g.shape[-1]).shape[0] for _, g in active)
        factor = torch.ones(rows, self.n_in, dtype=x.dtype, device=x.device)
        for i, gate in active:
            g = gate.reshape(-1, gate.shape[-1]).to(x.dtype)
            factor = factor.index_copy(1, getattr(self, f"idx{i}"),
                                       g[:, getattr(self, f"root{i}")].expand(rows, -1))
        if self.channel_dim == 1:  # (b, c, h, w) or (b, c)
            shape = (rows, self.n_in) + (1,) * (x.dim() - 2)
        else:  # channels last: (b, ..., c)
            shape = (rows,) + (1,) * (x.dim() - 2) + (self.n_in,)
        return x * factor.view(shape)


class GraphHead(Head):
    """The part after the last boundary: ``features`` (pooling, flatten, any hidden
    layers) up to the input of the final linear layer ``fc``."""

    def __init__(self, features: nn.Module, fc: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.pool = features
        self.fc = fc

    def features(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """The penultimate features: the input of the final linear layer."""
        out: torch.Tensor = self.pool(x)
        return out


#: A boundary tensor's layout: ``"chw"`` (b, c, h, w), ``"hwc"`` (b, h, w, c: a Swin
#: stage) or ``"tokens"`` (b, n, c: a ViT's stream, ``prefix_tokens`` class/register
#: tokens first, then a ``spatial`` grid of patches in row-major order).
LAYOUTS = ("chw", "hwc", "tokens")


@dataclass(frozen=True)
class LayoutInfo(FeatureInfo):
    """A boundary's ``FeatureInfo`` plus its layout: ``channels`` is the feature width
    (a ViT's dim), ``spatial`` the grid (a ViT's patch grid), whatever the layout.
    The adapter reads these to map between any two layouts (``superbody.Adapter``)."""

    layout: str = "chw"
    prefix_tokens: int = 0  # tokens before the patch grid (a ViT's class token)


@dataclass(frozen=True)
class MaskUnit:
    """One group of coupled channels: its root module and where its channels are read."""

    name: str  # the root module's qualified name: the mask's name in a package
    width: int
    consumers: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]  # (module, idx, root)
    out_modules: tuple[str, ...]  # modules whose output channels are this unit's


class _Tracer(fx.Tracer):
    """fx's tracer, with every subclass of ``nn.Linear`` and of BatchNorm kept whole.

    fx keeps only ``torch.nn``'s own modules as leaves. timm's ``Linear`` (a subclass
    that casts its input) would otherwise become a bare ``F.linear`` with no head to
    find, and its ``BatchNormAct2d`` (BatchNorm, then an activation) a bare
    ``F.batch_norm`` that the walk from a boundary to its mask unit cannot cross."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (isinstance(m, (nn.Linear, nn.modules.batchnorm._BatchNorm))
                or super().is_leaf_module(m, module_qualified_name))


def trace(module: nn.Module, input_shape: tuple[int, ...]) -> fx.GraphModule:
    """The module's fx graph, with each node's output shape in ``meta["tensor_meta"]``."""
    try:
        gm = fx.GraphModule(module, _Tracer().trace(module), type(module).__name__)
    except Exception as exc:  # fx raises TraceError, TypeError, ...: all mean "not traceable"
        raise IncompatibleError(
            f"{type(module).__name__} cannot be traced by torch.fx ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}); pnc needs a traceable classifier") from None
    ShapeProp(gm).propagate(torch.zeros(1, *input_shape))
    return gm


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def cut_points(graph: fx.Graph) -> list[fx.Node]:
    """Nodes after which exactly one value (themselves) is still needed."""
    nodes = list(graph.nodes)
    last_use: dict[fx.Node, int] = {}
    for i, n in enumerate(nodes):
        for a in n.all_input_nodes:
            last_use[a] = i
    live: set[fx.Node] = set()
    cuts = []
    for i, n in enumerate(nodes):
        live = {m for m in live if last_use.get(m, -1) > i}
        if n.op != "get_attr" and last_use.get(n, -1) > i:
            live.add(n)
        if live == {n} and n.op != "output":
            cuts.append(n)
    return cuts


def _module_path(node: fx.Node, depth: int) -> str | None:
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if node.op == "call_module":
        stack.append((node.target, None))
    if len(stack) < depth:
        return None
    entry = stack[depth - 1]
    return str(entry[0] if isinstance(entry, tuple) else entry)


def _is_pointwise_on(node: fx.Node, user: fx.Node, gm: fx.GraphModule) -> bool:
    if user.all_input_nodes != [node]:
        return False
    if user.op == "call_module":
        return isinstance(gm.get_submodule(str(user.target)), _POINTWISE_MODULES)
    return user.op in ("call_function", "call_method") and user.target in _POINTWISE_FUNCTIONS


def _is_global_pool(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)),
                          (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d))
    return node.op == "call_function" and node.target in (F.adaptive_avg_pool2d,
                                                          F.adaptive_max_pool2d)


def find_boundaries(gm: fx.GraphModule, final_fc: fx.Node) -> list[fx.Node]:
    """Feature boundaries (cut points before the head), chosen as the module docstring says.

    A network whose ``(b, c, h, w)`` cut points give boundaries that are all
    channels-first (every CNN) keeps exactly the boundaries it always had, so packages
    naming its positions rebuild the same. Any other (a ViT's ``(b, tokens, dim)``
    stream, a Swin's ``(b, h, w, c)`` stages) gets ``_token_boundaries``.
    """
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    pools = [n for n in nodes[: order[final_fc]] if _is_global_pool(n, gm)]
    stop = pools[-1] if pools else final_fc  # the head's pooling (not a squeeze-excite's)
    before = [c for c in cut_points(gm.graph)
              if c.op != "placeholder" and order[c] < order[stop]
              and not _is_pointwise_on(c, nodes[order[c] + 1], gm)]
    cuts = [c for c in before if len(_shape(c) or ()) == 4]
    best: list[fx.Node] = []
    for depth in range(1, 8):
        chosen = [c for c in cuts
                  if _module_path(c, depth) != _module_path(nodes[order[c] + 1], depth)]
        best = chosen
        if len(chosen) >= MIN_BOUNDARIES:
            break
    # the last 4-d cut point before the head is always a boundary: the head starts there
    if cuts and (not best or best[-1] is not cuts[-1]):
        best = [*best, cuts[-1]]
    if best and all(_channel_dim(gm, b) == 1 for b in best):
        return best
    return _token_boundaries(gm, [c for c in before if len(_shape(c) or ()) in (3, 4)])


def _token_boundaries(gm: fx.GraphModule, cuts: list[fx.Node]) -> list[fx.Node]:
    """Boundaries of a token network: cut points that *end* a module at one depth of
    the module tree (the output of ``encoder.layers.encoder_layer_3``, of a Swin stage's
    block), at the shallowest depth giving ``MIN_BOUNDARIES``, else the depth giving
    the most (a 4-layer ViT: its embedding, each layer's output and the final norm).

    A ViT's cut points also include the residual sum between a layer's attention and
    its MLP; it begins the MLP without ending a module, so requiring the end of one
    keeps boundaries at layer outputs, where the source's blocks are whole layers.
    """
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    best: list[fx.Node] = []
    for depth in range(1, 8):
        chosen = [c for c in cuts if (p := _module_path(c, depth)) is not None
                  and p != _module_path(nodes[order[c] + 1], depth)]
        if len(chosen) > len(best):
            best = chosen
        if len(best) >= MIN_BOUNDARIES:
            break
    if cuts and (not best or best[-1] is not cuts[-1]):
        best = [*best, cuts[-1]]
    return best


def _layout(gm: fx.GraphModule, node: fx.Node) -> tuple[str, tuple[int, int], int]:
    """``(layout, grid, prefix tokens)`` of a boundary tensor (``LAYOUTS``).

    A token sequence's grid is that of the last 4-d tensor before it whose grid leaves
    at most 8 extra tokens (a ViT's patch embedding: 64 patches + 1 class token);
    failing that, a square grid (after one class token if need be), else one row.
    """
    shape = _shape(node) or ()
    if len(shape) == 4:
        dim = _channel_dim(gm, node)
        if dim == 1:
            return "chw", (shape[2], shape[3]), 0
        if dim == 3:
            return "hwc", (shape[1], shape[2]), 0
        raise IncompatibleError(f"boundary {node.name} holds its channels in dimension {dim} "
                                "of a 4-d tensor; pnc reads (b, c, h, w) and (b, h, w, c)")
    if len(shape) != 3:
        raise IncompatibleError(f"boundary {node.name} is {len(shape)}-d; pnc reads 3-d "
                                "(b, tokens, dim) and 4-d feature boundaries")
    n = shape[1]
    nodes = list(gm.graph.nodes)
    for prev in reversed(nodes[: nodes.index(node)]):
        s = _shape(prev)
        if s is not None and len(s) == 4:
            grid = (s[2], s[3]) if _channel_dim(gm, prev) == 1 else (s[1], s[2])
            if 0 <= n - grid[0] * grid[1] <= 8:
                return "tokens", grid, n - grid[0] * grid[1]
    for prefix in (0, 1):
        side = math.isqrt(n - prefix)
        if side > 0 and side * side == n - prefix:
            return "tokens", (side, side), prefix
    return "tokens", (1, n), 0


def _channel_dim(gm: fx.GraphModule, node: fx.Node) -> int:
    """Which dimension of a 4-d tensor holds its channels: 1 unless it went through a
    ``permute``/``transpose`` since the last conv or BatchNorm (or the input). Walks back
    through the first 4-d input of each op; a reshape ends the walk (answering 1)."""
    perms: list[list[int]] = []
    for _ in range(100_000):
        if node.op == "placeholder" or (node.op == "call_module" and isinstance(
                gm.get_submodule(str(node.target)), (nn.Conv2d, nn.BatchNorm2d))):
            break
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        if name in ("view", "reshape", "flatten", "unflatten"):
            break
        rest = node.args[1:]
        if name == "permute":
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
            if len(dims) == 4:
                perms.append([int(d) % 4 for d in dims])  # type: ignore[arg-type]
        elif name == "transpose" and len(rest) == 2:
            order = [0, 1, 2, 3]
            i, j = (int(d) % 4 for d in rest)  # type: ignore[arg-type]
            order[i], order[j] = order[j], order[i]
            perms.append(order)
        inputs = [a for a in node.all_input_nodes if len(_shape(a) or ()) == 4]
        if not inputs:
            break
        node = inputs[0]
    dim = 1
    for dims in reversed(perms):  # the oldest permutation first
        dim = dims.index(dim)
    return dim


def _final_linear(gm: fx.GraphModule) -> fx.Node:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    node = out.args[0]
    while (isinstance(node, fx.Node) and node.op == "call_module"  # timm's head.flatten
           and isinstance(gm.get_submodule(str(node.target)), nn.Identity)):
        node = node.args[0]
    if (isinstance(node, fx.Node) and node.op == "call_module"
            and isinstance(gm.get_submodule(str(node.target)), nn.Linear)):
        return node
    raise IncompatibleError("the model's output is not a final nn.Linear layer; pnc clones "
                            "classifiers whose logits come from one linear head")


def _segment(gm: fx.GraphModule, start: fx.Node | None, end: fx.Node) -> fx.GraphModule:
    """The nodes after ``start`` (or the input) up to ``end``, as a module of one input."""
    nodes = list(gm.graph.nodes)
    i0 = 0 if start is None else nodes.index(start) + 1
    i1 = nodes.index(end)
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    if start is None:
        placeholder = next(n for n in nodes if n.op == "placeholder")
        env[placeholder] = g.placeholder("x")
        i0 = nodes.index(placeholder) + 1
    else:
        env[start] = g.placeholder("x")

    def lookup(a: fx.Node) -> fx.Node:
        if a not in env:
            if a.op != "get_attr":
                raise IncompatibleError(f"graph node {a.name} crosses boundary {end.name}")
            env[a] = g.node_copy(a)
        return env[a]

    for n in nodes[i0 : i1 + 1]:
        if n.op in ("placeholder", "output"):
            continue
        for a in n.all_input_nodes:
            lookup(a)
        env[n] = g.node_copy(n, lookup)
    g.output(env[end])
    return fx.GraphModule(gm, g)


def _dependency_graph(module: nn.Module, input_shape: tuple[int, ...]):  # -> tp.DependencyGraph
    """Torch-Pruning's graph of ``module``: it records one forward through autograd, so
    gradients are switched on even where a caller (a receiver's Predict) turned them off.
    Its warning about parameters outside a layer (ConvNeXt's layer scales, a ViT's class
    token) is silenced: their groups hold a LayerNorm or attention and are not masked."""
    import torch_pruning as tp

    with torch.inference_mode(False), torch.enable_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unwrapped parameters")
        warnings.filterwarnings("ignore", message="Maximum recursive depth")
        return tp.DependencyGraph().build_dependency(
            module, example_inputs=torch.zeros(1, *input_shape))


def _traceable_copy(module: nn.Module) -> nn.Module:
    copy_ = copy.deepcopy(module).eval()
    for p in copy_.parameters():
        p.requires_grad_(True)
    return copy_


def _norm_fed_roots(graph) -> list[nn.Module]:  # graph: tp.DependencyGraph
    """Convs and linears whose outputs reach an op that pruning changes (``_UNPRUNABLE``:
    a LayerNorm, ...) through parameter-free ops (activations, adds, reshapes).

    Their groups hold that op, so ``mask_units`` would drop them; not grouping them
    at all saves the time: Torch-Pruning's index mappings for a Swin's last stage (a
    residual stream through windows, rolls and LayerNorms) did not finish in minutes
    and took over 14 GB. A search stops at the next conv or linear, whose inputs are
    where a channel ends."""
    fed: list[nn.Module] = []
    for module, node in graph.module2node.items():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        todo, seen = list(node.outputs), set()
        while todo:
            nxt = todo.pop()
            if id(nxt) in seen or isinstance(nxt.module, (nn.Conv2d, nn.Linear)):
                continue
            seen.add(id(nxt))
            if isinstance(nxt.module, _UNPRUNABLE):
                fed.append(module)
                break
            todo.extend(nxt.outputs)
    return fed


def mask_units(module: nn.Module, input_shape: tuple[int, ...], final_fc_name: str,
               ) -> list[MaskUnit]:
    """Torch-Pruning's coupled-channel groups that can be masked exactly (module docstring)."""

    module = _traceable_copy(module)  # Torch-Pruning follows autograd: frozen weights hide it
    final_fc = module.get_submodule(final_fc_name)
    try:
        graph = _dependency_graph(module, input_shape)
        with warnings.catch_warnings():  # its shape inference warns on long reshape chains
            warnings.filterwarnings("ignore", message="Maximum recursive depth")
            groups = [list(g) for g in graph.get_all_groups(
                ignored_layers=[final_fc, *_norm_fed_roots(graph)],
                root_module_types=[nn.Conv2d, nn.Linear])]
    except Exception as exc:  # noqa: BLE001 - Torch-Pruning's index mappings raise anything
        raise IncompatibleError(
            f"Torch-Pruning cannot group the coupled channels of {type(module).__name__} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})"
            ) from None
    names = {m: n for n, m in module.named_modules()}
    units = []
    for items in groups:
        mods = [it.dep.target.module for it in items]
        if any(isinstance(m, _UNPRUNABLE) for m in mods):
            continue
        if any(isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels for m in mods):
            continue
        if any(m not in names for m in mods if isinstance(m, nn.Module) and
               not type(m).__module__.startswith("torch_pruning")):
            continue
        root = items[0].dep.target.module
        consumers, outs = [], []
        for it in items:
            m, fn = it.dep.target.module, getattr(it.dep.handler, "__name__", "")
            if fn == "prune_in_channels" and isinstance(m, (nn.Conv2d, nn.Linear)):
                if isinstance(m, nn.Conv2d) and m.groups > 1:
                    continue  # depthwise: each channel maps to itself
                consumers.append((names[m], tuple(int(i) for i in it.idxs),
                                  tuple(int(i) for i in it.root_idxs)))
            elif fn == "prune_out_channels" and m in names:
                outs.append(names[m])
        if root not in names or not consumers:
            continue
        units.append(MaskUnit(names[root], len(items[0].idxs), tuple(consumers), tuple(outs)))
    return sorted(units, key=lambda u: u.name)


class GraphNet(ZooNet):
    """An arbitrary classifier behind ``ZooNet``'s interface (module docstring).

    ``blocks`` are the fx segments between boundaries, ``head`` the rest; both
    call the modules of ``module`` itself, so the target runs unchanged.
    """

    def __init__(self, module: nn.Module, input_shape: Sequence[int],
                 boundaries: Sequence[str] | None = None, maskable: bool = True,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 ) -> None:
        shape = tuple(int(s) for s in input_shape)
        gm = trace(module, shape)
        if mean is not None or std is not None:
            _normalize_input(gm, mean or [0.0] * shape[0], std or [1.0] * shape[0])
        fc_node = _final_linear(gm)
        by_name = {n.name: n for n in gm.graph.nodes}
        if boundaries is None:
            cuts = find_boundaries(gm, fc_node)
        else:
            missing = [b for b in boundaries if b not in by_name]
            if missing:
                raise IncompatibleError(f"graph has no nodes {missing}")
            cuts = [by_name[b] for b in boundaries]
        if not cuts:
            raise IncompatibleError(f"{type(module).__name__} has no feature boundary "
                                    "((b, c, h, w), (b, h, w, c) or (b, tokens, dim)) "
                                    "before its head")
        fc = gm.get_submodule(str(fc_node.target))
        assert isinstance(fc, nn.Linear)  # _final_linear checked it
        layouts = [_layout(gm, c) for c in cuts]
        units: list[MaskUnit] = []
        unmasked = _splits_channels(gm) if maskable else None
        if maskable and unmasked is None:
            try:
                units = mask_units(module, shape, str(fc_node.target))
            except IncompatibleError as err:
                unmasked = str(err)
        gates = {u.name: ChannelGate(u.width) for u in units}
        _insert_consumer_gates(gm, units, gates)
        penultimate = fc_node.args[0]
        assert isinstance(penultimate, fx.Node)
        segments = [_segment(gm, a, b) for a, b in zip([None, *cuts[:-1]], cuts)]
        head = GraphHead(_segment(gm, cuts[-1], penultimate), fc)
        super().__init__([], head)
        self.blocks = nn.ModuleList(segments)
        self.input_shape = shape
        self.normalization = (tuple(mean) if mean else None, tuple(std) if std else None)
        self.boundary_names = tuple(c.name for c in cuts)
        self.units = {u.name: u for u in units}
        self._gates = gates  # plain dict: ChannelGates hold no weights, only the current gate
        self.plain = [module]  # in a list: not a submodule (its weights are the segments')
        self._layouts: list[tuple[str, tuple[int, int], int]] = [
            ("chw", (shape[1], shape[2]), 0), *layouts]
        # a token or channels-last boundary is a residual stream (never one unit's channels)
        self._owners = [None, *(_owner(gm, c, units) if lay[0] == "chw" else None
                                for c, lay in zip(cuts, layouts))]
        self._parts = [None, *(_concat_parts(gm, c, units) if lay[0] == "chw" else None
                               for c, lay in zip(cuts, layouts))]
        #: why the model has no mask units although asked to (None: it has them, or none
        #: were asked for); such a source is cloned whole
        self.unmasked_reason = unmasked

    def pooled(self, h: torch.Tensor, boundary: int) -> torch.Tensor:
        """``h`` at ``boundary`` averaged over its grid (or tokens), whatever the layout."""
        layout = self._layouts[boundary][0]
        if layout == "chw":
            return h.mean((2, 3))
        return h.mean((1, 2)) if layout == "hwc" else h.mean(1)

    def mask_gates(self) -> dict[str, ChannelGate]:
        """Every mask unit by name (its root module's qualified name)."""
        return dict(self._gates)

    def feature_info(self, input_shape: tuple[int, ...]) -> list[FeatureInfo]:
        """Width, grid, owning mask unit and layout (``LayoutInfo``) at every boundary 0..L."""
        with torch.no_grad():
            h = torch.zeros(1, *input_shape, device=next(self.parameters()).device)
            infos: list[FeatureInfo] = [LayoutInfo(0, h.shape[1], (h.shape[2], h.shape[3]),
                                                   None)]
            for i in range(self.num_blocks):
                h = self.block(i)(h)
                layout, grid, prefix = self._layouts[i + 1]
                if layout == "chw":
                    width, grid = h.shape[1], (h.shape[2], h.shape[3])
                elif layout == "hwc":
                    width, grid = h.shape[3], (h.shape[1], h.shape[2])
                else:
                    width = h.shape[2]
                infos.append(LayoutInfo(i + 1, width, grid, self._owners[i + 1], layout,
                                        prefix))
        return infos

    def pruned_tail(self, start: int, masks: dict[str, torch.Tensor],
                    ) -> tuple[nn.ModuleList, Head, torch.Tensor | None]:
        """Segments ``start..L-1`` and the head of a copy pruned by Torch-Pruning."""
        pruned = prune_module(self.plain[0], self.input_shape, masks, self.units)
        mean, std = self.normalization
        net = GraphNet(pruned, self.input_shape, self.boundary_names, maskable=False,
                       mean=mean, std=std)
        keep = self._kept_channels(net, start, masks)
        for p in net.parameters():
            p.requires_grad_(False)
        return nn.ModuleList(list(net.blocks)[start:]), net.head, keep


    def _kept_channels(self, pruned: GraphNet, start: int, masks: dict[str, torch.Tensor],
                       ) -> torch.Tensor | None:
        """Which channels of boundary ``start`` survive pruning (None = all): the owning
        unit's mask, or for a concatenation each part's (its unit's mask, or all of an
        unmasked part), in order. Any other channel count is refused."""
        channels = pruned.feature_info(self.input_shape)[start].channels
        owner = self._owners[start]
        if owner is not None and owner in masks and int(masks[owner].sum()) == channels:
            return torch.nonzero(masks[owner]).flatten()
        parts = self._parts[start]
        if parts is not None and any(o in masks for o, _ in parts):
            keep, offset = [], 0
            for o, width in parts:
                m = masks.get(o) if o is not None else None
                kept = (torch.nonzero(m).flatten() if m is not None and m.numel() == width
                        else torch.arange(width))
                keep.append(kept + offset)
                offset += width
            kept_all = torch.cat(keep)
            if len(kept_all) == channels:
                return kept_all
        if channels == self.feature_info(self.input_shape)[start].channels:
            return None
        raise IncompatibleError(
            f"boundary {start} ({self.boundary_names[start - 1]}) carries channels of several "
            "mask units (a concatenation); choose another position for the source")


def _normalize_input(gm: fx.GraphModule, mean: Sequence[float], std: Sequence[float]) -> None:
    """``(x - mean) / std`` as the graph's first op: inputs stay ``[0, 1]`` pixels on every
    data path, and the module sees what it was trained on (the manifest's preprocessing)."""
    if len(mean) != len(std):
        raise IncompatibleError(f"mean has {len(mean)} values but std has {len(std)}")
    if any(float(s) <= 0 for s in std):
        raise IncompatibleError(f"std {list(std)} must be positive")
    gm.register_buffer("pnc_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
    gm.register_buffer("pnc_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    users = list(x.users)
    with gm.graph.inserting_after(x):
        m = gm.graph.get_attr("pnc_mean")
    with gm.graph.inserting_after(m):
        s = gm.graph.get_attr("pnc_std")
    with gm.graph.inserting_after(s):
        centred = gm.graph.call_function(operator.sub, (x, m))
    with gm.graph.inserting_after(centred):
        scaled = gm.graph.call_function(operator.truediv, (centred, s))
    for u in users:
        u.replace_input_with(x, scaled)
    gm.recompile()


def _insert_consumer_gates(gm: fx.GraphModule, units: Sequence[MaskUnit],
                           gates: dict[str, ChannelGate]) -> None:
    """A ``ConsumerGate`` before every call of a module that reads a unit's channels."""
    feeds: dict[str, list[tuple[ChannelGate, list[int], list[int]]]] = {}
    for u in units:
        for name, idx, root in u.consumers:
            feeds.setdefault(name, []).append((gates[u.name], list(idx), list(root)))
    for k, node in enumerate([n for n in gm.graph.nodes
                              if n.op == "call_module" and n.target in feeds]):
        mod = gm.get_submodule(str(node.target))
        assert isinstance(mod, (nn.Conv2d, nn.Linear))  # mask_units only lists these
        n_in = mod.in_channels if isinstance(mod, nn.Conv2d) else mod.in_features
        shape = _shape(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        dim = 1 if isinstance(mod, nn.Conv2d) or (shape is not None and len(shape) == 2) else -1
        gate_name = f"pnc_gate_{k}"
        gm.add_submodule(gate_name, ConsumerGate(n_in, dim, feeds[str(node.target)]))
        with gm.graph.inserting_before(node):
            gated = gm.graph.call_module(gate_name, (node.args[0],))
        node.args = (gated, *node.args[1:])
    gm.recompile()


def _owner(gm: fx.GraphModule, node: fx.Node, units: Sequence[MaskUnit]) -> str | None:
    """The mask unit whose channels a boundary tensor carries (None: unmasked channels).

    Walks back through ops that keep each channel where it is (activations, BatchNorm,
    pools, weightless modules, residual adds: every input of an add is the same unit,
    so the first that resolves decides). ``pruned_tail`` checks the answer by count.
    """
    owner_of = {m: u.name for u in units for m in u.out_modules}
    if node.op == "call_module" and str(node.target) in owner_of:
        return owner_of[str(node.target)]
    if not _keeps_channels(gm, node):
        return None
    same = [a for a in node.args if isinstance(a, fx.Node) and _shape(a) == _shape(node)]
    for arg in same or [a for a in node.args if isinstance(a, fx.Node)][:1]:
        found = _owner(gm, arg, units)
        if found is not None:
            return found
    return None


def _keeps_channels(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An op that keeps each channel where it is (``_owner`` walks back through these)."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        weightless = next(mod.parameters(), None) is None  # StochasticDepth, a custom act
        return isinstance(mod, (*_POINTWISE_MODULES, *_POOLS, ConsumerGate)) or weightless
    if node.op in ("call_function", "call_method"):
        return (node.target in _POINTWISE_FUNCTIONS | _ELEMENTWISE_BINARY | {F.max_pool2d}
                or getattr(node.target, "__name__", "") == "stochastic_depth")
    return False


def _concat_parts(gm: fx.GraphModule, node: fx.Node, units: Sequence[MaskUnit],
                  ) -> list[tuple[str | None, int]] | None:
    """``(owning unit or None, channels)`` of each part of a boundary that concatenates
    channels (``torch.cat`` on dim 1, then ops that keep channels, as ``_owner`` walks:
    GoogLeNet's and Inception's blocks, a DenseNet); None for any other boundary."""
    while node.op != "call_function" or node.target is not torch.cat:
        if not _keeps_channels(gm, node):
            return None
        width = (_shape(node) or (0, 0))[1:2]
        inputs = [a for a in node.all_input_nodes if (_shape(a) or (0, 0))[1:2] == width]
        if not inputs:
            return None
        node = inputs[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    tensors = node.args[0]
    if dim not in (1, -3) or not isinstance(tensors, (list, tuple)):
        return None
    parts: list[tuple[str | None, int]] = []
    for x in tensors:
        if not isinstance(x, fx.Node) or _shape(x) is None:
            return None
        inner = _concat_parts(gm, x, units)
        parts += inner if inner is not None else [(_owner(gm, x, units), (_shape(x) or ())[1])]
    return parts


def _splits_channels(gm: fx.GraphModule) -> str | None:
    """Why Torch-Pruning cannot follow this graph's channels (None: it can): a view of a
    ``(b, c, h, w)`` tensor into more dimensions (ShuffleNet's channel shuffle, MaxViT's
    window partition) makes its index mapping fail or grow without bound."""
    for n in gm.graph.nodes:
        name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
        if name in ("view", "reshape") and n.all_input_nodes:
            before, after = _shape(n.all_input_nodes[0]), _shape(n)
            if before is not None and after is not None and len(before) == 4 and len(after) > 4:
                return (f"node {n.name} views a (b, c, h, w) tensor as {len(after)}-d (a channel "
                        "shuffle or window partition), which Torch-Pruning cannot follow")
    return None


def prune_module(module: nn.Module, input_shape: tuple[int, ...],
                 masks: dict[str, torch.Tensor], units: dict[str, MaskUnit]) -> nn.Module:
    """A copy of ``module`` with every unit's dropped channels physically removed."""
    import torch_pruning as tp

    copy_ = _traceable_copy(module)
    drops = {}
    for name, mask in masks.items():
        if name not in units:
            raise IncompatibleError(f"mask {name!r} names no mask unit of this model")
        drop = torch.nonzero(~mask.bool()).flatten().tolist()
        if drop:
            drops[name] = drop
    graph = _dependency_graph(copy_, input_shape) if drops else None
    for name, drop in drops.items():
        assert graph is not None
        root = copy_.get_submodule(name)
        fn = tp.prune_conv_out_channels if isinstance(root, nn.Conv2d) else tp.prune_linear_out_channels
        graph.get_pruning_group(root, fn, idxs=drop).prune()
    for p in copy_.parameters():
        p.requires_grad_(False)
    return copy_
