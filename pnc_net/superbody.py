"""The superbody: a frozen target plus removable cloned branches.

``Superbody(target, [branch, ...])`` runs the target unchanged and, for each
branch, the path ``t_1..R -> adapter -> masked source blocks S+1..K -> source
head``. A fusion gate ``g(x)`` weighs the two heads (``docs/method.md``)::

    p(y) = (1 - g) * softmax(z_t)_y   for y in Y_t
    p(y) =      g  * softmax(z_c)_y   for y in Y_c

With several branches, each gate's odds ``g/(1-g)`` weigh its head against the
target's (weight 1): one branch reduces to the formula above. ``detach()`` hands
back the very target module, untouched, so its outputs are bit-identical.

Branches are named, as PEFT names adapters: ``attach(name, branch)``,
``detach(name)``, ``set_branches([names])`` (which attached branches run; the others
stay attached but inactive) and ``disable_branches()``. A branch attached without a
name keeps the one it had, or gets ``branch0``, ``branch1``, ...
"""

from __future__ import annotations

import copy
import keyword
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from pnc_net.errors import IncompatibleError, InvalidInputError, NotFoundError
from pnc_net.models import FeatureInfo, Head, ZooNet
from pnc_net.training import fixed_views


@dataclass(frozen=True)
class Layout:
    """How a boundary tensor is laid out (``graphnet.LAYOUTS``): ``"chw"`` (b, c, h, w),
    ``"hwc"`` (b, h, w, c) or ``"tokens"`` (b, prefix + h*w, c), with its grid ``(h, w)``
    and, for tokens, how many class/register tokens come before the patch grid."""

    kind: str = "chw"
    grid: tuple[int, int] = (1, 1)
    prefix: int = 0

    @staticmethod
    def of(info: FeatureInfo) -> Layout:
        """The layout a ``FeatureInfo`` describes (pnc's own nets: always ``"chw"``)."""
        return Layout(getattr(info, "layout", "chw"), (info.spatial[0], info.spatial[1]),
                      getattr(info, "prefix_tokens", 0))


class Adapter(nn.Module):
    """Maps target features at boundary R to source features at boundary S.

    Every layout is read as a grid ``(b, c, h, w)``: a channels-last map is permuted, a
    token sequence's patch tokens are laid back on their grid. The grid is resized to
    the source's (average-pooled down, repeated up), mapped by a low-rank 1x1
    convolution (``c_in -> rank -> c_out``; on tokens this is a low-rank linear map over
    the feature dim, the same for every token) and laid out as the source expects.

    - A ``"chw"`` output goes through a ReLU, as the source's conv blocks expect
      post-activation inputs. Token and channels-last outputs are residual streams
      (signed): no ReLU.
    - A token output's class tokens (``prefix``) are the same map applied to a summary
      of the input (its own class tokens' mean, or the grid's mean for a CNN target)
      plus a learned offset ``prefix`` per class token: a ViT's class token is not a
      patch, and the offset (started at the least-squares residual) says how it differs.

    Conv -> conv adapters hold exactly ``down`` and ``up`` (the only kind before token
    layouts), so their packages are unchanged. Low rank keeps every package small.
    """

    def __init__(self, c_in: int, c_out: int, rank: int, out_hw: tuple[int, int],
                 in_layout: Layout | None = None, out_layout: Layout | None = None) -> None:
        super().__init__()
        rank = max(1, min(rank, c_in, c_out))
        self.out_hw: tuple[int, int] = (out_hw[0], out_hw[1])
        self.in_layout = in_layout or Layout()
        self.out_layout = out_layout or Layout("chw", self.out_hw)
        self.down = nn.Conv2d(c_in, rank, 1, bias=False)
        self.up = nn.Conv2d(rank, c_out, 1, bias=True)
        if self.out_layout.kind == "tokens" and self.out_layout.prefix > 0:
            self.prefix = nn.Parameter(torch.zeros(self.out_layout.prefix, c_out))

    # -- layouts
    def in_grid(self, h: torch.Tensor) -> torch.Tensor:
        """Target features as a ``(b, c, H, W)`` grid (a token input's patches only)."""
        return _as_grid(h, self.in_layout)

    def out_grid(self, f: torch.Tensor) -> torch.Tensor:
        """Source-layout features as a ``(b, c, h, w)`` grid (a token output's patches)."""
        return _as_grid(f, self.out_layout)

    def summary(self, h: torch.Tensor) -> torch.Tensor:
        """``(b, c_in, 1, 1)``: what a token output's class tokens are made from."""
        lay = self.in_layout
        if lay.kind == "tokens" and lay.prefix > 0:
            return h[:, : lay.prefix].mean(1)[:, :, None, None]
        return self.in_grid(h).mean(dim=(2, 3), keepdim=True)

    def resize(self, h: torch.Tensor) -> torch.Tensor:  # (b, c, H, W) -> (b, c, h, w)
        """A grid at the source's spatial size: average-pooled down, or repeated up."""
        if tuple(h.shape[2:]) == self.out_hw:
            return h
        if h.shape[2] >= self.out_hw[0] and h.shape[3] >= self.out_hw[1]:
            return F.adaptive_avg_pool2d(h, self.out_hw)
        return F.interpolate(h, size=self.out_hw, mode="nearest")

    # -- the map
    def map_grid(self, h: torch.Tensor) -> torch.Tensor:
        """The low-rank map on the resized input grid, ``(b, c_out, h, w)``."""
        return self.up(self.down(self.resize(self.in_grid(h))))

    def linear(self, h: torch.Tensor) -> torch.Tensor:
        """The adapter before its ReLU (what the least-squares start fits), laid out as
        the source's features at S."""
        g = self.map_grid(h)
        lay = self.out_layout
        if lay.kind == "chw":
            return g
        if lay.kind == "hwc":
            return g.permute(0, 2, 3, 1)
        tokens = g.flatten(2).transpose(1, 2)  # (b, h*w, c_out)
        if lay.prefix == 0:
            return tokens
        cls = self.up(self.down(self.summary(h))).flatten(1)  # (b, c_out)
        return torch.cat([cls[:, None, :] + self.prefix, tokens], dim=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Source-like features at boundary S for target features at boundary R."""
        u = self.linear(h)
        return F.relu(u) if self.out_layout.kind == "chw" else u

    # -- the least-squares start (``insert.fit_adapter_lstsq``)
    def lstsq_rows(self, h: torch.Tensor, f: torch.Tensor,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)`` one row per grid position: the resized input grid
        ``(n*h*w, c_in)`` and the source's features there ``(n*h*w, c_out)``."""
        x = self.resize(self.in_grid(h)).permute(0, 2, 3, 1).reshape(-1, self.down.in_channels)
        y = self.out_grid(f).permute(0, 2, 3, 1).reshape(-1, self.up.out_channels)
        return x, y

    def fit_prefix(self, h: torch.Tensor, f: torch.Tensor) -> None:
        """Set the class-token offsets to the mean residual of the map on them."""
        if not hasattr(self, "prefix"):
            return
        with torch.no_grad():
            cls = self.up(self.down(self.summary(h))).flatten(1)  # (n, c_out)
            self.prefix.copy_((f[:, : self.out_layout.prefix] - cls[:, None, :]).mean(0))


def _as_grid(h: torch.Tensor, lay: Layout) -> torch.Tensor:
    """``h`` of layout ``lay`` as a ``(b, c, h, w)`` grid; a token sequence drops its
    class tokens and lays its patches back in row-major order."""
    if lay.kind == "chw":
        return h
    if lay.kind == "hwc":
        return h.permute(0, 3, 1, 2)
    patches = h[:, lay.prefix:]  # (b, h*w, c)
    return patches.transpose(1, 2).reshape(h.shape[0], h.shape[2], *lay.grid)


def gate_features(z_t: torch.Tensor, z_s: torch.Tensor, f_b: torch.Tensor) -> torch.Tensor:
    """What the fusion gate sees: both heads' logits, their confidences, and the
    branch's pooled penultimate features ``f_b``.

    The source's scores for its *non-cloned* classes are included on purpose:
    they tell a cloned-class input from the rest (``docs/method.md``, k_t = 0).
    The branch features raised test locality from 0.972 to 0.982 on the default
    task in our measurements (``docs/method.md`` of this project).
    """
    p_t, p_s = z_t.softmax(1), z_s.softmax(1)
    ent_t = -(p_t * p_t.clamp_min(1e-8).log()).sum(1, keepdim=True)
    ent_s = -(p_s * p_s.clamp_min(1e-8).log()).sum(1, keepdim=True)
    stats = [p_t.max(1, keepdim=True).values, ent_t, p_s.max(1, keepdim=True).values, ent_s,
             z_t.logsumexp(1, keepdim=True), z_s.logsumexp(1, keepdim=True)]
    return torch.cat([z_t, z_s, *stats, f_b], dim=1)


#: ``FusionGate.energy_max`` when no veto was calibrated: no logsumexp of real logits reaches it.
NO_ENERGY_VETO = 1e4


class FusionGate(nn.Module):
    """``g(x) in [0, 1]``: a small MLP over ``gate_features``, vetoed where the target
    is sure of itself.

    The veto: the gate stays shut when the target's logits have a logsumexp (the
    negative of its *energy*, Liu et al. 2020) above ``energy_max``. A network's
    energy is low on inputs like its training data and high elsewhere, and here it
    is calibrated on the cloned-class samples alone: ``energy_max`` is a quantile of
    the target's logsumexp on them (``insert.calibrate_energy_veto``). Without
    target data the MLP learns "closed" only from inverted stand-ins, whose target
    logsumexp (about 3) is that of cloned digits, not of real target digits (6.5 to
    8.5), so it cannot learn this rule itself (``docs/method.md``, the router).
    """

    energy_max: torch.Tensor  # (1,) buffer, travels in the package as ``gate.energy_max``

    def __init__(self, n_target: int, n_source: int, n_features: int, hidden: int = 8) -> None:
        super().__init__()
        self.hidden = hidden
        self.net = nn.Sequential(nn.Linear(n_target + n_source + 6 + n_features, hidden),
                                 nn.ReLU(), nn.Linear(hidden, 1))
        self.register_buffer("energy_max", torch.tensor([NO_ENERGY_VETO]))

    #: whether ``forward`` reads the target's penultimate features ``f_t``
    needs_target_features = False

    def logit(self, z_t: torch.Tensor, z_s: torch.Tensor, f_b: torch.Tensor,
              f_t: torch.Tensor | None = None) -> torch.Tensor:
        """The MLP before its sigmoid, ``(b,)``: what the gate's BCE training works on."""
        return self.net(gate_features(z_t, z_s, f_b)).squeeze(1)  # (b,)

    def forward(self, z_t: torch.Tensor, z_s: torch.Tensor, f_b: torch.Tensor,
                f_t: torch.Tensor | None = None) -> torch.Tensor:
        """``g(x)`` per input, ``(b,)``: how much the branch's head is trusted."""
        return torch.sigmoid(self.logit(z_t, z_s, f_b, f_t)) * energy_allowed(z_t, self.energy_max)


def energy_allowed(z_t: torch.Tensor, energy_max: torch.Tensor) -> torch.Tensor:
    """1 where the target's logsumexp is at most ``energy_max`` (the veto lets the gate
    open), else 0; ``(b,)`` in ``z_t``'s dtype."""
    return (z_t.logsumexp(1) <= energy_max).to(z_t.dtype)


#: ``DiscriminantGate``'s log-odds are bounded softly (softsign) to +-8: an LDA's run to
#: hundreds, which makes ``sigmoid`` exactly 0 or 1 in float32 with no gradient, so a
#: receiver's repair could not move a gate that transmission loss had flipped. Near the
#: decision boundary the slope is 1; a gate stays within 3.4e-4 of 0 or 1 beyond it.
LOG_ODDS_BOUND = 8.0

#: a gate with views looks again at the inputs whose log-odds are within this of 0 (its
#: probability between 0.018 and 0.982): 7-10% of the rgb pairs' test digits, 7% of MNIST's
SECOND_LOOK_LOG_ODDS = 4.0


class DiscriminantGate(nn.Module):
    """``g(x)``: the posterior mass of the cloned classes under a linear discriminant
    (LDA) over the target's and the branch's pooled penultimate features, vetoed like
    ``FusionGate``.

    One Gaussian per cloned class and one per target class (target-side samples
    grouped by the target's own prediction), all sharing one covariance: the
    quadratic terms cancel and every class's log-likelihood is linear, so the whole
    router is ``linear`` (``n_classes`` rows, the cloned classes first) and
    ``g = sigmoid(logsumexp(cloned rows) - logsumexp(target rows))``. Fitted in
    closed form (``insert.fit_discriminant_gate``), the default router: with real target
    samples it raised test locality on the default task from 0.987 to 0.996 (k = 20,
    k_t = 20, 3 zoo x 3 clone seeds, ``docs/method.md``), and with only inverted
    stand-ins, under the energy veto, from 0.983 to 0.993 (k_t = 0). Reading ``f_t`` as
    well as ``f_b`` is what wins: the target's own features say best what it knows.

    With ``taps`` (target boundaries, ``--gate-taps``) ``f_t`` also holds the target's
    features pooled at those boundaries (``target_gate_features``): early layers still
    tell a cloned digit from the target's own where the penultimate features, trained to
    map everything onto the target's classes, no longer do (``docs/method.md``).

    With ``kept`` features (``--gate-features``) the gate reads only that many of its
    candidate columns ``[f_t, f_b]``, those the discriminant weighed most when it was
    fitted on all of them; ``feature_mask`` (1 = kept) says which. Half the untapped width,
    chosen among the taps too, beat every tap set in full at fewer bytes than no taps.
    """

    energy_max: torch.Tensor  # (1,) buffer, as in FusionGate
    feature_scale: torch.Tensor  # (n_kept,) buffer, only with taps or a selection
    feature_mask: torch.Tensor  # (n_features,) buffer of 0/1, only with a selection
    needs_target_features = True

    def __init__(self, n_cloned: int, n_classes: int, n_features: int,
                 taps: tuple[int, ...] = (), kept: int = 0) -> None:
        super().__init__()
        if not 0 < n_cloned < n_classes:
            raise IncompatibleError(f"a discriminant gate needs more classes ({n_classes}) "
                                    f"than cloned classes ({n_cloned}) and at least one cloned")
        if not 0 <= kept <= n_features:
            raise IncompatibleError(f"a discriminant gate cannot keep {kept} of its "
                                    f"{n_features} features")
        self.n_cloned = n_cloned
        self.taps = tuple(sorted(taps))
        self.kept = kept
        # the second look (``Superbody.parts``): how many fixed views of an input the gate
        # also reads where it is unsure, and their transforms besides shifts; 0: none
        self.views = 0
        self.view_transforms: tuple[str, ...] = ()
        self.linear = nn.Linear(kept or n_features, n_classes)
        self.register_buffer("energy_max", torch.tensor([NO_ENERGY_VETO]))
        if kept:
            self.register_buffer("feature_mask", torch.ones(n_features))
        if self.taps or kept:
            # per-feature scales (1 / std, fp16): the weight stays in standardized units,
            # where one int8 scale per row suits every column. Folded into the weight, the
            # taps' small-variance columns took the rows' peaks and the int8 grid rounded
            # the other columns away (locality -0.004 to -0.018, measured)
            self.register_buffer("feature_scale", torch.ones(kept or n_features))

    def logit(self, z_t: torch.Tensor, z_s: torch.Tensor, f_b: torch.Tensor,
              f_t: torch.Tensor | None = None) -> torch.Tensor:
        """The log-odds of "a cloned class", ``(b,)``."""
        if f_t is None:
            raise InvalidInputError("a discriminant gate reads the target's features f_t")
        x = torch.cat([f_t, f_b], dim=1)
        if self.kept:
            x = x[:, self.feature_mask > 0.5]
        scores = self.linear(x * self.feature_scale if self.taps or self.kept else x)
        k = self.n_cloned
        log_odds = scores[:, :k].logsumexp(1) - scores[:, k:].logsumexp(1)
        return LOG_ODDS_BOUND * log_odds / (LOG_ODDS_BOUND + log_odds.abs())

    def forward(self, z_t: torch.Tensor, z_s: torch.Tensor, f_b: torch.Tensor,
                f_t: torch.Tensor | None = None) -> torch.Tensor:
        """``g(x)`` per input, ``(b,)``."""
        return torch.sigmoid(self.logit(z_t, z_s, f_b, f_t)) * energy_allowed(z_t, self.energy_max)


Gate = FusionGate | DiscriminantGate

#: ``--gate-taps``: which target boundaries a discriminant gate reads besides the
#: penultimate features (``tap_boundaries``)
GATE_TAPS = ("none", "early", "all")


def tap_boundaries(kind: str, num_blocks: int) -> tuple[int, ...]:
    """The target boundaries ``kind`` names: none, the first half (``early``: 1..L/2,
    the measured winner, ``docs/method.md``) or every one (1..L)."""
    if kind not in GATE_TAPS:
        raise InvalidInputError(f"unknown gate taps {kind!r}; use one of {', '.join(GATE_TAPS)}")
    last = {"none": 0, "early": num_blocks // 2, "all": num_blocks}[kind]
    return tuple(range(1, last + 1))


def taps_mask(taps: Iterable[int]) -> int:
    """Boundaries as the package's ``gate_taps`` integer: bit ``r - 1`` for boundary r."""
    return sum(1 << (r - 1) for r in set(taps))


def taps_from_mask(mask: int) -> tuple[int, ...]:
    """``taps_mask``'s inverse."""
    return tuple(r + 1 for r in range(mask.bit_length()) if mask >> r & 1)


def target_gate_features(target: ZooNet, f_pen: torch.Tensor, feats: Mapping[int, torch.Tensor],
                         taps: tuple[int, ...]) -> torch.Tensor:
    """What a discriminant gate reads of the target: its penultimate features, then its
    features pooled at each tap boundary (``feats[r]``), in boundary order."""
    if not taps:
        return f_pen
    return torch.cat([f_pen, *(target.pooled(feats[r], r) for r in taps)], dim=1)


class Branch(nn.Module):
    """One cloned module, physically pruned: adapter, kept source filters, source head."""

    cloned_index: torch.Tensor  # a buffer: the cloned classes' rows of the source head

    def __init__(self, position_r: int, position_s: int, adapter: Adapter,
                 blocks: nn.ModuleList, head: Head, cloned_classes: tuple[int, ...],
                 gate: Gate, label_names: tuple[str, ...]) -> None:
        super().__init__()
        self.position_r, self.position_s = position_r, position_s
        self.adapter, self.blocks, self.head, self.gate = adapter, blocks, head, gate
        self.register_buffer("cloned_index", torch.tensor(cloned_classes, dtype=torch.long))
        self.label_names = label_names
        self.name: str | None = None  # the name it was last attached under
        for p in [*self.blocks.parameters(), *self.head.parameters()]:
            p.requires_grad_(False)  # source weights stay frozen

    def run(self, h_r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(source logits, pooled penultimate features)`` for target features at R."""
        u = self.adapter(h_r)
        for block in self.blocks:
            u = block(u)
        f_b = self.head.features(u)  # (b, c)
        return self.head.fc(f_b), f_b

    def source_logits(self, h_r: torch.Tensor) -> torch.Tensor:
        """All of the source head's logits for target features at R."""
        return self.run(h_r)[0]


_RESERVED = nn.ModuleDict()  # names a ModuleDict cannot hold: its own attributes


def check_branch_name(name: object) -> str:
    """``name`` if it can name a branch: a Python identifier that is not a keyword and
    not an attribute of ``nn.ModuleDict`` (``keys``, ``training``, ...).

    Raises:
        InvalidInputError: any other name.
    """
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise InvalidInputError(
            f"branch name {name!r} is not a Python identifier (letters, digits and _, "
            "not starting with a digit, not a keyword)")
    if hasattr(_RESERVED, name):
        raise InvalidInputError(f"branch name {name!r} is reserved (an attribute of "
                                "nn.ModuleDict); choose another")
    return name


class Superbody(nn.Module):
    """Target + named branches. ``forward`` returns probabilities over ``label_names``.

    ``branches`` may be a list (named ``branch0``, ``branch1``, ... unless a branch
    remembers a name) or a mapping of names to branches; every one is active.
    """

    def __init__(self, target: ZooNet, target_labels: tuple[str, ...],
                 branches: Sequence[Branch] | Mapping[str, Branch] | nn.ModuleDict | None = None,
                 ) -> None:
        super().__init__()
        self.target = target
        self.target_labels = tuple(target_labels)
        self.branch_modules = nn.ModuleDict()  # every attached branch, in attach order
        self._active: list[str] = []  # the names forward runs, in output order
        if isinstance(branches, (Mapping, nn.ModuleDict)):
            for name, branch in branches.items():
                self.attach(name, cast(Branch, branch))  # attach checks it is a Branch
        else:
            for branch in branches or []:
                self.attach(branch)

    @property
    def label_names(self) -> tuple[str, ...]:
        """The target's labels, then each active branch's cloned labels: the output columns."""
        names = list(self.target_labels)
        for b in self.attached():
            names.extend(b.label_names)
        return tuple(names)

    @property
    def branch_names(self) -> tuple[str, ...]:
        """Every attached branch's name, active or not, in attach order."""
        return tuple(self.branch_modules.keys())

    @property
    def active_branches(self) -> tuple[str, ...]:
        """The names of the branches ``forward`` runs, in output order."""
        return tuple(self._active)

    @property
    def branches(self) -> list[Branch]:
        """The active branches, in output order (``attached()``)."""
        return self.attached()

    def attached(self) -> list[Branch]:
        """The active branches, in output order, as ``Branch``es."""
        return [self.branch(name) for name in self._active]

    def branch(self, name: str) -> Branch:
        """The attached branch called ``name`` (active or not).

        Raises:
            NotFoundError: no branch has that name.
        """
        if name not in self.branch_modules:
            raise NotFoundError(f"no branch named {name!r}; attached: "
                                f"{', '.join(self.branch_names) or 'none'}")
        return cast(Branch, self.branch_modules[name])

    # ---------------------------------------------------------------- lifecycle
    def _free_name(self, preferred: str | None) -> str:
        if preferred is not None and preferred not in self.branch_modules:
            return preferred
        i = 0
        while f"branch{i}" in self.branch_modules:
            i += 1
        return f"branch{i}"

    def _check_labels(self, branches: Iterable[Branch]) -> None:
        seen = set(self.target_labels)
        for b in branches:
            clash = seen & set(b.label_names)
            if clash:
                raise IncompatibleError(
                    f"labels {sorted(clash)} are already predicted by the superbody")
            seen.update(b.label_names)

    def attach(self, name: str | Branch, branch: Branch | None = None, *,
               active: bool = True) -> Superbody:
        """Add a cloned branch as ``name`` (``attach(branch)``: the name it had, else the
        first free ``branchN``); it runs unless ``active=False``. The target is not touched.

        Raises:
            InvalidInputError: a name that is not an identifier.
            IncompatibleError: the name is taken, the branch is already attached, its
                position is outside the target, or (active) its labels are predicted already.
        """
        if isinstance(name, Branch):
            if branch is not None:
                raise InvalidInputError("attach(name, branch) or attach(branch), not two branches")
            branch, name = name, self._free_name(name.name)
        if not isinstance(branch, Branch):
            raise InvalidInputError(f"attach needs a Branch, got {type(branch).__name__}")
        check_branch_name(name)
        if not 0 < branch.position_r <= self.target.num_blocks:
            raise IncompatibleError(
                f"insertion position R={branch.position_r} is outside the target's "
                f"boundaries 1..{self.target.num_blocks}")
        if active:
            self._check_labels([*self.attached(), branch])
        if name in self.branch_modules:
            raise IncompatibleError(f"a branch named {name!r} is already attached; detach it "
                                    "first or choose another name")
        for other, b in self.branch_modules.items():
            if b is branch:
                raise IncompatibleError(f"this branch is already attached as {other!r}")
        self.branch_modules[name] = branch
        branch.name = name
        if active:
            self._active.append(name)
        return self

    def detach(self, which: int | str | None = None) -> ZooNet | Branch:
        """Remove one branch, by name or by index in ``branch_names``, and return it;
        or, with no argument, every branch, returning the exact target.

        Raises:
            NotFoundError: no such branch.
        """
        if which is None:
            self.branch_modules = nn.ModuleDict()
            self._active = []
            return self.target
        if isinstance(which, int):
            names = self.branch_names
            if not -len(names) <= which < len(names):
                raise NotFoundError(f"no branch at index {which}; {len(names)} attached")
            which = names[which]
        branch = self.branch(which)
        del self.branch_modules[which]
        self._active = [n for n in self._active if n != which]
        return branch

    def set_branches(self, names: Iterable[str]) -> Superbody:
        """Run exactly the attached branches ``names``, in that order (the output
        columns follow it); the others stay attached, inactive. ``[]`` = the bare target.

        Raises:
            NotFoundError: a name is not attached.
            InvalidInputError: a name is given twice.
            IncompatibleError: two of them predict the same label.
        """
        if isinstance(names, str):
            raise InvalidInputError(f"set_branches takes a list of names, not the string "
                                    f"{names!r}; write set_branches([{names!r}])")
        chosen = list(names)
        if len(set(chosen)) != len(chosen):
            raise InvalidInputError(f"set_branches({chosen}) names a branch twice")
        self._check_labels([self.branch(n) for n in chosen])
        self._active = chosen
        return self

    @contextmanager
    def disable_branches(self) -> Iterator[Superbody]:
        """Run as the bare target inside the block (PEFT's ``disable_adapter``)."""
        saved = self._active
        self._active = []
        try:
            yield self
        finally:
            self._active = [n for n in saved if n in self.branch_modules]

    # ---------------------------------------------------------------- inference
    def parts(self, x: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Target logits, every branch's source logits and gate, for training and metrics.

        A gate with ``views`` takes a second look where it is unsure (log-odds within
        ``SECOND_LOOK_LOG_ODDS`` of 0): its log-odds there are the mean over the input and
        ``views`` fixed views of it (``training.fixed_views``). The target's and the
        branch's logits stay the input's own, so the target's answer is unchanged."""
        branches = self.attached()
        z_t, runs, log_odds = self._looks(x, branches)
        gates = [torch.sigmoid(self._second_look(x, b, lo)) * energy_allowed(z_t, b.gate.energy_max)
                 for b, lo in zip(branches, log_odds)]
        return {"z_t": z_t, "z_s": [zs for zs, _ in runs], "gates": gates}

    def _looks(self, x: torch.Tensor, branches: list[Branch]) -> tuple[
            torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]:
        """One pass of the target and ``branches`` over ``x``: the target's logits, each
        branch's ``(source logits, features)`` and its gate's log-odds before the veto."""
        wanted = {b.position_r for b in branches}.union(*(gate_taps(b.gate) for b in branches))
        h, feats = x, {}
        for r, block in enumerate(self.target.blocks, start=1):
            h = block(h)
            if r in wanted:
                feats[r] = h
        z_t = self.target.head(h)
        f_pen = (self.target.head.features(h)
                 if any(b.gate.needs_target_features for b in branches)
                 else None)  # only a discriminant gate reads them
        runs = [b.run(feats[b.position_r]) for b in branches]
        log_odds = [b.gate.logit(z_t, zs, fb, None if f_pen is None else
                                 target_gate_features(self.target, f_pen, feats, gate_taps(b.gate)))
                    for b, (zs, fb) in zip(branches, runs)]
        return z_t, runs, log_odds

    def _second_look(self, x: torch.Tensor, branch: Branch, log_odds: torch.Tensor) -> torch.Tensor:
        """``log_odds``, averaged over ``branch.gate.views`` fixed views where unsure."""
        gate = branch.gate
        if not isinstance(gate, DiscriminantGate) or not gate.views:
            return log_odds
        unsure = log_odds.abs() < SECOND_LOOK_LOG_ODDS
        if not bool(unsure.any()):
            return log_odds
        # every view of every unsure input in passes of at most len(x) rows: as few passes
        # as the input's own, and no more activation memory than it took
        n = gate.views
        views = torch.cat(fixed_views(x[unsure], gate.view_transforms, n))
        seen = torch.cat([self._looks(views[i : i + len(x)], [branch])[2][0]
                          for i in range(0, len(views), len(x))])
        total = log_odds[unsure] + seen.view(n, -1).sum(0)
        return log_odds.masked_scatter(unsure, total / (n + 1))

    def fuse(self, parts: dict[str, Any]) -> torch.Tensor:
        """Probabilities over ``label_names`` from ``parts``."""
        z_t = parts["z_t"]
        if not self._active:
            return z_t.softmax(1)
        odds = [g / (1 - g).clamp_min(1e-6) for g in parts["gates"]]  # g = 0 -> exactly 0
        norm = 1 + sum(odds)
        probs = [z_t.softmax(1) / norm.unsqueeze(1)]
        for b, zs, o in zip(self.attached(), parts["z_s"], odds):
            probs.append(zs[:, b.cloned_index].softmax(1) * (o / norm).unsqueeze(1))
        return torch.cat(probs, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities ``(b, len(label_names))``; the target's own softmax without branches."""
        if not self._active:
            return self.target(x).softmax(1)
        return self.fuse(self.parts(x))

    def predict(self, x: torch.Tensor) -> list[tuple[str, float]]:
        """``(label name, probability)`` of the top class for each input."""
        with torch.no_grad():
            p = self(x)
        conf, idx = p.max(1)
        return [(self.label_names[i], float(c)) for i, c in zip(idx.tolist(), conf)]

    def module_bytes(self) -> int:
        """fp32 bytes of every weight this superbody uses (``superbody_bytes``)."""
        tensors = list(self.target.state_dict().values())
        for b in self.attached():
            tensors += [v for k, v in b.state_dict().items() if k != "cloned_index"]
        return sum(t.numel() * 4 for t in tensors if t.is_floating_point())


def gate_taps(gate: Gate) -> tuple[int, ...]:
    """The target boundaries ``gate`` reads (none for the MLP gate)."""
    return getattr(gate, "taps", ())


def build_branch(target: ZooNet, source: ZooNet, input_shape: tuple[int, ...],
                 position_r: int, position_s: int, masks: dict[str, torch.Tensor],
                 cloned_classes: tuple[int, ...], label_names: tuple[str, ...],
                 adapter_rank: int, gate_hidden: int, n_target: int, gate_classes: int = 0,
                 gate_taps: tuple[int, ...] = (), gate_kept: int = 0,
                 ) -> tuple[Branch, torch.Tensor | None]:
    """A physically pruned branch with fresh adapter and gate (weights loaded by the
    caller), and the source channels kept at boundary S (None = all).

    ``gate_classes`` 0 makes a ``FusionGate`` (``gate_hidden`` units); more makes a
    ``DiscriminantGate`` of that many classes, the cloned ones first, reading the
    target's boundaries ``gate_taps`` as well and keeping ``gate_kept`` of its features
    (0 = all)."""
    t_info = target.feature_info(input_shape)[position_r]
    s_info = source.feature_info(input_shape)[position_s]
    blocks, head, adapter_keep = source.pruned_tail(position_s, masks)
    c_out = s_info.channels if adapter_keep is None else len(adapter_keep)
    adapter = Adapter(t_info.channels, c_out, adapter_rank, s_info.spatial,
                      Layout.of(t_info), Layout.of(s_info))
    gate: Gate
    if gate_classes:
        infos = target.feature_info(input_shape)
        taps_width = sum(infos[r].channels for r in gate_taps)
        gate = DiscriminantGate(len(cloned_classes), gate_classes,
                                target.head.fc.in_features + taps_width + head.fc.in_features,
                                gate_taps, gate_kept)
    else:
        gate = FusionGate(n_target, head.fc.out_features, head.fc.in_features, gate_hidden)
    branch = Branch(position_r, position_s, adapter, copy.deepcopy(blocks), head,
                    cloned_classes, gate, label_names).eval()
    return branch, adapter_keep
