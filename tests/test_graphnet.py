"""Real architectures through ``GraphNet``: boundaries, coupled masks, pruning, cloning.

Random-init torchvision models at 32x32 (the loading code is real; pretrained weights
cannot be downloaded here). Per family: boundaries found, the wrapped net computes the
module's function, masked == pruned at several boundaries, and a clone between two
imported models round-trips through a package, rebuilds, verifies and detaches exactly.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torchvision
from torch import nn

from pnc_net.errors import IncompatibleError, PreconditionError
from pnc_net.graphnet import GraphNet
from pnc_net.testing import (
    assert_round_trip,
    frozen_randomized,
    masked_and_pruned,
    random_masks,
    short_rgb_clone,
)
from pnc_net.zoo import Zoo, state_digest

SHAPE = (3, 32, 32)

#: family -> (builder, at least this many boundaries, at least this many mask units)
FAMILIES = {
    "resnet-basic": (lambda: torchvision.models.resnet18(num_classes=5), 10, 12),
    "resnet-bottleneck": (lambda: torchvision.models.resnet50(num_classes=5), 18, 30),
    "mobilenet_v3": (lambda: torchvision.models.mobilenet_v3_small(num_classes=5), 12, 20),
    "efficientnet": (lambda: torchvision.models.efficientnet_b0(num_classes=5), 8, 30),
    "regnet": (lambda: torchvision.models.regnet_y_400mf(num_classes=5), 16, 15),
    "vgg": (lambda: torchvision.models.vgg11_bn(num_classes=5), 12, 8),
    "convnext": (lambda: torchvision.models.convnext_tiny(num_classes=5), 8, 10),
    # timm (random init): BatchNormAct2d (BatchNorm then an activation, in one module),
    # timm's own Linear subclass as the head, and a head followed by an Identity
    "timm-efficientnet": (lambda: timm_model("efficientnet_b0"), 8, 30),
    "timm-mobilenetv3": (lambda: timm_model("mobilenetv3_small_100"), 12, 20),
    "timm-regnetx": (lambda: timm_model("regnetx_002"), 12, 5),
}


def timm_model(name: str) -> nn.Module:
    import timm

    return timm.create_model(name, num_classes=5, pretrained=False)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    torch.manual_seed(0)
    build, min_boundaries, min_units = FAMILIES[request.param]
    module = frozen_randomized(build())
    return request.param, module, GraphNet(module, SHAPE), min_boundaries, min_units


def test_boundaries_and_units_are_found(family):
    name, _, net, min_boundaries, min_units = family
    assert net.num_blocks >= min_boundaries, (name, net.boundary_names)
    assert len(net.mask_widths()) >= min_units, name
    infos = net.feature_info(SHAPE)
    assert len(infos) == net.num_blocks + 1 and infos[0].channels == 3
    x = torch.rand(2, *SHAPE)
    for info in infos[1:]:
        h = net.forward_features(x, info.boundary)
        assert h.shape[1:] == (info.channels, *info.spatial)
        if info.masked_by is not None:
            assert net.mask_widths()[info.masked_by] == info.channels


def test_the_wrapped_net_is_the_module(family):
    _, module, net, _, _ = family
    x = torch.rand(3, *SHAPE)
    with torch.no_grad():
        assert torch.equal(net(x), module(x))
        for r in (1, net.num_blocks // 2, net.num_blocks):
            assert torch.equal(net.forward_from(net.forward_features(x, r), r), module(x))


def test_pruned_tail_equals_masked_net(family):
    name, module, net, _, _ = family
    before = state_digest(module)
    masks = random_masks(net.mask_widths(), seed=1)
    x = torch.rand(3, *SHAPE)
    for s in sorted({net.num_blocks // 2, net.num_blocks - 1, net.num_blocks}):
        check = masked_and_pruned(net, masks, x, s)
        scale = float(check.masked.abs().max())
        assert torch.allclose(check.pruned, check.masked, atol=1e-5 * max(scale, 1.0)), (name, s)
        assert check.pruned_params < check.full_params or (
            s == net.num_blocks and check.keep is None), (name, s)
    assert state_digest(module) == before  # the module handed in is never written


def test_gates_of_ones_change_nothing_and_none_resets(family):
    _, module, net, _, _ = family
    x = torch.rand(2, *SHAPE)
    with torch.no_grad():
        ref = module(x)
        net.set_gates({k: torch.ones(w) for k, w in net.mask_widths().items()})
        ones = net(x)
        net.set_gates(None)
        again = net(x)
    assert torch.allclose(ones, ref, atol=1e-5) and torch.equal(again, ref)


def test_units_after_s_are_exactly_the_ones_a_pass_from_s_reads(family):
    """Joint refinement refines only these: gating every other unit (bar S's owner, whose
    channels are the adapter's outputs) leaves a pass from S as it was."""
    from pnc_net.localize import units_after

    name, _, net, _, _ = family
    s = net.num_blocks // 2
    tail = set(units_after(net, s, SHAPE))
    owner = net.feature_info(SHAPE)[s].masked_by
    assert owner not in tail and tail <= set(net.mask_widths()), name
    h = net.forward_features(torch.rand(2, *SHAPE), s)
    others = {k: torch.rand(w) for k, w in net.mask_widths().items()
              if k not in tail and k != owner}
    with torch.no_grad():
        ref = net.forward_from(h, s)
        net.set_gates(others)
        gated = net.forward_from(h, s)
        net.set_gates({k: torch.zeros(w) for k, w in net.mask_widths().items() if k in tail})
        cut = net.forward_from(h, s)
        net.set_gates(None)
    assert torch.equal(gated, ref), name
    # and the tail's units do matter (ConvNeXt's layer scale of 1e-6 at init makes it tiny)
    assert not tail or not torch.equal(cut, ref), name


def test_normalization_is_applied_first():
    module = frozen_randomized(torchvision.models.resnet18(num_classes=3))
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    net = GraphNet(module, SHAPE, mean=mean, std=std)
    x = torch.rand(2, *SHAPE)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(net(x), module((x - m) / s), atol=1e-6)
    with pytest.raises(IncompatibleError, match="must be positive"):
        GraphNet(module, SHAPE, mean=mean, std=(0.2, 0.0, 0.3))


def test_a_model_without_a_linear_head_is_refused_clearly():
    squeeze = torchvision.models.squeezenet1_0(num_classes=3).eval()  # a conv classifier
    with pytest.raises(IncompatibleError, match="not a final nn.Linear"):
        GraphNet(squeeze, SHAPE)


def test_a_model_without_feature_boundaries_is_refused_clearly():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 16), nn.ReLU(),
                        nn.Linear(16, 3)).eval()  # only (b, features) tensors
    with pytest.raises(IncompatibleError, match="has no feature boundary"):
        GraphNet(mlp, SHAPE)


def test_layernorm_groups_are_not_masked():
    net = GraphNet(frozen_randomized(torchvision.models.convnext_tiny(num_classes=3)), SHAPE)
    # the residual streams pass through LayerNorms: only the MLP hidden units are units
    assert net.mask_widths() and all(".block." in name for name in net.mask_widths())


# ----------------------------------------------------------------------------- cloning


@pytest.fixture(scope="module")
def imported_zoo(tmp_path_factory):
    """A zoo with a resnet18 (0-4) and a mobilenet_v3_small (5-9, with mean/std), both
    random-init, added through the user's path (`Zoo.add_checkpoint` of .pth files)."""
    root = tmp_path_factory.mktemp("imported")
    torch.manual_seed(0)
    r18 = root / "r18.pth"
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), r18)
    mb = root / "mb.pth"
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=5).state_dict(), mb)
    zoo = Zoo(root / "zoo")
    zoo.add_checkpoint(r18, "torchvision:resnet18", tuple("01234"), SHAPE, name="r18")
    zoo.add_checkpoint(mb, "torchvision:mobilenet_v3_small", tuple("56789"), SHAPE, name="mb",
                       mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    return zoo


@pytest.fixture(scope="module")
def rgb_clone(imported_zoo):
    from pnc_net.cloning import CloneConfig, clone
    from pnc_net.data import load_rgb_digits
    from pnc_net.insert import InsertConfig
    from pnc_net.localize import LocalizeConfig

    digests = {n: state_digest(imported_zoo.load_module(n)[0]) for n in ("r18", "mb")}
    cfg = CloneConfig.single("r18", "mb", ("5", "6"), per_class=8, target_per_class=4,
                             positions=((8, 10),), localize=LocalizeConfig(refine_steps=5),
                             insert=InsertConfig(epochs=1, gate_steps=20, joint_rounds=1))
    return clone(imported_zoo, load_rgb_digits(), cfg), digests


def test_clone_between_imported_models_round_trips(rgb_clone, imported_zoo, tmp_path):
    from pnc_net import wire
    from pnc_net.rebuild import verify

    result, digests = rgb_clone
    # joint refinement ran through the torchvision graph (kept or not, what travels is
    # the branch that was kept, and it verifies)
    (rounds,) = result.report["joint_refinement"]
    assert len(rounds) == 1 and rounds[0]["tail_filters_before"] > 0
    assert rounds[0]["kept"] == (rounds[0]["score"] >= rounds[0]["score_before"]
                                 and "unchanged" not in rounds[0])
    package = wire.decode(wire.encode(result.package))
    sb, err = verify(Zoo(imported_zoo.root), package)  # a fresh zoo instance: a receiver
    assert err <= package.fingerprint.tolerance
    x = torch.rand(4, *SHAPE)
    target, _ = Zoo(imported_zoo.root).load_module("r18")
    with torch.no_grad():
        assert sb(x).shape == (4, 7)
        assert torch.equal(sb.detach()(x), target(x))  # the exact target comes back
    # the receiver's compiled forward traces through the graph segments and their gates
    from pnc_net.package import probe_batch
    from pnc_net.serve import fastpath

    fp = package.fingerprint
    forward = fastpath.prepare(sb, SHAPE, probe_batch(fp.probe_seed, fp.probe_count, SHAPE),
                               fp.tolerance, "jit")
    assert forward.engine == "jit" and forward.max_diff is not None and forward.max_diff < 1e-4
    for name, digest in digests.items():  # zoo weights are sacred
        assert state_digest(imported_zoo.load_module(name)[0]) == digest


def test_rebuild_refuses_a_wrong_source(rgb_clone, imported_zoo, tmp_path):
    from pnc_net.rebuild import build_superbody

    result, _ = rgb_clone
    root = tmp_path / "other"
    shutil.copytree(imported_zoo.root, root)
    other = Zoo(root)
    for manifest in other.manifests():
        if manifest.name == "mb":
            (root / "models" / f"{manifest.sha256}.json").unlink()
    with pytest.raises(PreconditionError, match="is not in the zoo"):
        build_superbody(other, result.package)


def test_timm_models_clone_as_target_and_source(tmp_path):
    """timm's efficientnet_b0 <- mobilenetv3_small_100 (random init, BatchNorms
    randomized), imported from .pth files as ``timm:NAME``: a short clone round-trips
    through the wire, rebuilds on a fresh zoo and detaches to the exact target."""
    zoo = Zoo(tmp_path / "zoo")
    for name, labels, seed in (("efficientnet_b0", "01234", 0), ("mobilenetv3_small_100",
                                                                 "56789", 1)):
        torch.manual_seed(seed)
        path = tmp_path / f"{name}.pth"
        torch.save(frozen_randomized(timm_model(name), seed).state_dict(), path)
        zoo.add_checkpoint(path, f"timm:{name}", tuple(labels), SHAPE, name=name)
    target, _ = zoo.load("efficientnet_b0")
    source, _ = zoo.load("mobilenetv3_small_100")
    assert source.mask_widths()  # the source is localized, not cloned whole
    digests = {n: state_digest(zoo.load_module(n)[0])
               for n in ("efficientnet_b0", "mobilenetv3_small_100")}
    position = (round(0.75 * target.num_blocks), round(0.75 * source.num_blocks))
    result = short_rgb_clone(zoo, "efficientnet_b0", "mobilenetv3_small_100", position)
    x = torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(5))
    sb = assert_round_trip(zoo, result.package, x)
    assert sb(x).shape == (4, 7)
    for name, digest in digests.items():  # zoo weights are never written
        assert state_digest(zoo.load_module(name)[0]) == digest


# ----------------------------------------------------------------------------- the rgb zoo


def test_an_rgb_zoo_model_is_trained_exported_and_imported(tmp_path):
    from pnc_net.data import load_rgb_digits
    from pnc_net.zoo_train import RGB_ZOO, ZooSpec, train_zoo_model

    data = load_rgb_digits(split=(12, 4, 8))
    assert data.input_shape == SHAPE and data.name == "rgb-digits"
    assert float(data.x_train.min()) >= 0 and float(data.x_train.max()) <= 1
    assert {s.arch for s in RGB_ZOO} == {"torchvision:resnet18", "torchvision:mobilenet_v3_small",
                                         "torchvision:VisionTransformer"}
    zoo = Zoo(tmp_path / "zoo")
    spec = ZooSpec("t-r18", "torchvision:resnet18", tuple("01234"), epochs=1)
    manifest = train_zoo_model(zoo, data, spec, progress=False)
    assert manifest.arch == "torchvision:resnet18" and manifest.origin["format"]
    assert manifest.test_accuracy is not None and 0 <= manifest.test_accuracy <= 1
    net, stored = Zoo(zoo.root).load("t-r18")  # a GraphNet over the imported file
    assert isinstance(net, GraphNet) and stored.sha256 == manifest.sha256


def test_zoo_build_refuses_an_unknown_set(tmp_path):
    from test_cli import assert_user_error, pnc

    assert_user_error(pnc("zoo", "build", "--set", "imagenet", zoo=tmp_path), 2,
                      "not a zoo set")
    assert not (tmp_path / "models").exists()
