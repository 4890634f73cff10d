"""Between packages and superbodies: build one from the other, verify fingerprints.

``build_superbody(zoo, package)`` is the receiver's half (PEFT's
``from_pretrained``): it refuses zoo models whose digest differs from the
package's references and masks whose widths do not match the source.

The fingerprint's tolerance is the sender's to tighten, never to loosen: a receiver
checks against ``accepted_tolerance(fp)``, at most ``MAX_FINGERPRINT_TOLERANCE``,
and a rebuilt superbody whose probe outputs are NaN or infinite never verifies.
"""

from __future__ import annotations

import math

import torch

from pnc_net.codec import MAX_PROBE_COUNT
from pnc_net.errors import IncompatibleError, IntegrityError, InvalidInputError, PreconditionError
from pnc_net.models import ZooNet
from pnc_net.package import ClonedModule, Fingerprint, ModuleConfig, Package, ZooRef, probe_batch
from pnc_net.superbody import (
    Branch,
    DiscriminantGate,
    Superbody,
    build_branch,
    taps_from_mask,
    taps_mask,
)
from pnc_net.training import AUGMENTS
from pnc_net.zoo import Zoo

PROBE_SEED = 20230317
PROBE_COUNT = 16
# The loosest fingerprint check a receiver accepts, whatever the package asks: max abs
# difference of probe probabilities. Clone writes 2e-2 (float32 0.0199999996); int8 packages
# rebuild within ~1e-2 of it, repair aims below the package's tolerance.
MAX_FINGERPRINT_TOLERANCE = 0.05


def load_ref(zoo: Zoo, ref: ZooRef) -> tuple[ZooNet, tuple[str, ...], tuple[int, ...]]:
    """The zoo model a reference names, by digest (the name is only a label)."""
    if not zoo.has(ref.sha256):
        raise PreconditionError(
            f"zoo model {ref.name} (sha256 {ref.sha256}) is not in the zoo at {zoo.root}; "
            "fetch it from a mirror or run `pnc zoo build`")
    model, manifest = zoo.load(ref.sha256)
    return model, manifest.label_names, tuple(manifest.input_shape)


def branch_tensors(branch: Branch) -> dict[str, torch.Tensor]:
    """The learned tensors of a branch, as a package stores them."""
    out = {f"adapter.{k}": v for k, v in branch.adapter.state_dict().items()}
    out.update({f"gate.{k}": v for k, v in branch.gate.state_dict().items()})
    return {k: v.detach().clone().float() for k, v in out.items()}


def branch_config(branch: Branch) -> dict[str, int]:
    """The shape of a branch's adapter and gate, as ``ClonedModule.config`` holds it."""
    gate = branch.gate
    if isinstance(gate, DiscriminantGate):
        shape = ModuleConfig(adapter_rank=branch.adapter.down.out_channels,
                             gate_classes=gate.linear.out_features,
                             gate_taps=taps_mask(gate.taps), gate_features=gate.kept,
                             gate_views=gate.views,
                             gate_view_transforms=transforms_mask(gate.view_transforms))
    else:
        shape = ModuleConfig(adapter_rank=branch.adapter.down.out_channels,
                             gate_hidden=gate.hidden)
    return shape.as_dict()


def branch_from_module(target: ZooNet, target_labels: tuple[str, ...],
                       input_shape: tuple[int, ...], source: ZooNet,
                       source_labels: tuple[str, ...], module: ClonedModule) -> Branch:
    """A pruned branch with the module's adapter and gate loaded, after checking shapes."""
    widths = source.mask_widths()
    for name, mask in module.masks.items():
        if name not in widths:
            raise IncompatibleError(
                f"mask layer {name!r} does not exist in source {module.source.name}; "
                f"its mask units are {', '.join(widths)}")
        if mask.numel() != widths[name]:
            raise IncompatibleError(
                f"mask {name!r} has width {mask.numel()} but source {module.source.name} "
                f"has {widths[name]} filters there")
    if set(module.masks) != set(widths):
        raise IncompatibleError(f"package lacks masks for {sorted(set(widths) - set(module.masks))}")
    if any(int(m.sum()) == 0 for m in module.masks.values()):
        raise IncompatibleError("a mask drops every filter of a layer; the package is corrupt")
    bad = [c for c in module.cloned_classes if not 0 <= c < len(source_labels)]
    if bad or not module.cloned_classes:
        raise IncompatibleError(f"cloned classes {list(module.cloned_classes)} are not in the "
                                f"source's {len(source_labels)} labels")
    if not (1 <= module.position_r <= target.num_blocks and
            1 <= module.position_s <= source.num_blocks):
        raise IncompatibleError(f"position {module.position_r}:{module.position_s} is outside "
                                "the target's or source's block boundaries")
    labels = tuple(source_labels[c] for c in module.cloned_classes)
    settings = module.settings()  # typed and bounded: InvalidInputError before any allocation
    n_cloned = len(module.cloned_classes)
    if settings.gate_classes and not n_cloned < settings.gate_classes <= n_cloned + len(target_labels):
        raise IncompatibleError(
            f"gate_classes {settings.gate_classes} does not fit {n_cloned} cloned and "
            f"{len(target_labels)} target classes; the package is corrupt")
    taps = taps_from_mask(settings.gate_taps)
    if taps and (not settings.gate_classes or taps[-1] > target.num_blocks):
        raise IncompatibleError(
            f"gate_taps {settings.gate_taps} names boundaries {list(taps)[:8]}, but the target "
            f"has {target.num_blocks} and only a discriminant gate reads taps; the package "
            "is corrupt")
    if settings.gate_features and not settings.gate_classes:
        raise IncompatibleError(f"gate_features {settings.gate_features} without a discriminant "
                                "gate (gate_classes); the package is corrupt")
    if (settings.gate_views and not settings.gate_classes) or (
            settings.gate_view_transforms and not settings.gate_views):
        raise IncompatibleError(f"gate_views {settings.gate_views} and gate_view_transforms "
                                f"{settings.gate_view_transforms} need a discriminant gate "
                                "(gate_classes) and views; the package is corrupt")
    branch, _ = build_branch(target, source, input_shape, module.position_r, module.position_s,
                          module.masks, module.cloned_classes, labels, settings.adapter_rank,
                          settings.gate_hidden, len(target_labels), settings.gate_classes, taps,
                          settings.gate_features)
    state = {**{f"adapter.{k}": v for k, v in branch.adapter.state_dict().items()},
             **{f"gate.{k}": v for k, v in branch.gate.state_dict().items()}}
    tensors = dict(module.tensors)
    tensors.setdefault("gate.energy_max", branch.gate.energy_max)  # older packages: no veto
    if set(state) != set(tensors):
        raise IncompatibleError(
            f"package tensors {sorted(module.tensors)} do not match the branch's {sorted(state)}")
    for name, value in tensors.items():
        if tuple(value.shape) != tuple(state[name].shape):
            raise IncompatibleError(
                f"tensor {name} has shape {tuple(value.shape)}, expected {tuple(state[name].shape)}")
    if not torch.isfinite(tensors["gate.energy_max"]).all():
        raise IncompatibleError("tensor gate.energy_max is not finite; the package is corrupt")
    if "gate.feature_mask" in tensors:
        mask = tensors["gate.feature_mask"]
        if not ((mask == 0) | (mask == 1)).all() or int(mask.sum()) != settings.gate_features:
            raise IncompatibleError(
                f"tensor gate.feature_mask must hold {settings.gate_features} ones and zeros "
                "elsewhere (gate_features); the package is corrupt")
    branch.adapter.load_state_dict({k[8:]: v.float() for k, v in tensors.items()
                                    if k.startswith("adapter.")})
    branch.gate.load_state_dict({k[5:]: v.float() for k, v in tensors.items()
                                 if k.startswith("gate.")})
    if settings.gate_views:  # a discriminant gate: checked above
        branch.gate.views = settings.gate_views
        branch.gate.view_transforms = transforms_from_mask(settings.gate_view_transforms)
    return branch.eval()


def transforms_mask(transforms: tuple[str, ...]) -> int:
    """``transforms`` as ``gate_view_transforms`` writes them: bit i for ``AUGMENTS[i]``."""
    return sum(1 << i for i, name in enumerate(AUGMENTS) if name in transforms)


def transforms_from_mask(mask: int) -> tuple[str, ...]:
    """The transforms ``gate_view_transforms`` names, in ``AUGMENTS``' order."""
    return tuple(name for i, name in enumerate(AUGMENTS) if mask >> i & 1)


def default_branch_name(i: int) -> str:
    """The name of a package's ``i``-th module's branch: ``branch{i}``. Packages carry no
    branch names (the wire format is unchanged), and ``Superbody(target, labels, [b0, b1])``
    names a list of new branches the same way, so ``clone()``'s superbody and the one
    rebuilt from its package agree."""
    return f"branch{i}"


def build_superbody(zoo: Zoo, package: Package) -> Superbody:
    """Rebuild the superbody a package describes from the local zoo (branches named
    ``branch0``, ``branch1``, ... in the package's order)."""
    target, target_labels, input_shape = load_ref(zoo, package.target)
    sb = Superbody(target, target_labels)
    for i, module in enumerate(package.modules):  # named as clone()'s superbody names them
        source, source_labels, _ = load_ref(zoo, module.source)
        sb.attach(default_branch_name(i), branch_from_module(
            target, target_labels, input_shape, source, source_labels, module))
    if sb.label_names != tuple(package.label_names):
        raise IncompatibleError(
            f"package label map {list(package.label_names)} does not match the rebuilt "
            f"superbody's {list(sb.label_names)}")
    return sb.eval()


def accepted_tolerance(fingerprint: Fingerprint,
                       receiver_max: float = MAX_FINGERPRINT_TOLERANCE) -> float:
    """The tolerance a receiver checks a fingerprint against: the package's own, capped at
    ``receiver_max``. A package may ask for a stricter check, never a looser one, so a
    sender cannot get garbage verified by writing ``tolerance: 1.0``."""
    tol = fingerprint.tolerance
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise InvalidInputError(f"fingerprint tolerance {tol!r} is not a finite number >= 0")
    return min(float(tol), float(receiver_max))


def fingerprint_of(superbody: Superbody, input_shape: tuple[int, ...],
                   seed: int = PROBE_SEED, count: int = PROBE_COUNT) -> Fingerprint:
    """The superbody's probabilities on the seeded probe batch (what a package records)."""
    with torch.no_grad():
        probs = superbody(probe_batch(seed, count, input_shape)).float()
    return Fingerprint(seed, count, probs)


def fingerprint_error(superbody: Superbody, fingerprint: Fingerprint,
                      input_shape: tuple[int, ...]) -> float:
    """Max absolute difference between the superbody's probe outputs and the recorded ones;
    ``inf`` when the rebuilt outputs are NaN or infinite (a NaN difference would compare
    as "within tolerance" and verify anything)."""
    if not 1 <= fingerprint.probe_count <= MAX_PROBE_COUNT:
        raise InvalidInputError(f"fingerprint has {fingerprint.probe_count} probes; "
                                f"1..{MAX_PROBE_COUNT} allowed")
    now = fingerprint_of(superbody, input_shape, fingerprint.probe_seed, fingerprint.probe_count)
    if now.probabilities.shape != fingerprint.probabilities.shape:
        raise IntegrityError(
            f"fingerprint shape {tuple(fingerprint.probabilities.shape)} does not match the "
            f"rebuilt superbody's {tuple(now.probabilities.shape)}")
    if not bool(torch.isfinite(now.probabilities).all()):
        return math.inf
    err = float((now.probabilities - fingerprint.probabilities).abs().max())
    return err if math.isfinite(err) else math.inf


def verify(zoo: Zoo, package: Package,
           receiver_max: float = MAX_FINGERPRINT_TOLERANCE) -> tuple[Superbody, float]:
    """Rebuild and check the fingerprint; ``IntegrityError`` beyond the accepted tolerance
    (the package's, capped at ``receiver_max``) or for non-finite outputs."""
    sb = build_superbody(zoo, package)
    if package.fingerprint is None:
        raise IntegrityError("package has no fingerprint; it cannot be verified")
    _, _, shape = load_ref(zoo, package.target)
    err = fingerprint_error(sb, package.fingerprint, shape)
    tol = accepted_tolerance(package.fingerprint, receiver_max)
    if not err <= tol:
        raise IntegrityError(
            f"rebuilt superbody differs from the package's fingerprint by {err:.4f} "
            f"(tolerance {tol:.4f}: the package's {package.fingerprint.tolerance:.4f}, capped "
            f"at {receiver_max}); the package or the zoo differs from the sender's")
    return sb, err
