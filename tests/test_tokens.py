"""Token features: a ViT as target and as source, and adapters between any two layouts.

Random-init tiny models at 32x32 (no download, no training): torchvision
``VisionTransformer``s and pnc's own CNN on three channels. Per pair (ViT <- CNN,
CNN <- ViT, ViT <- ViT with another patch grid): boundaries found, a short clone runs,
its package round-trips through the wire format, rebuilds from the zoo to the same
outputs, and detaching gives back the exact target. A ViT source's masked MLP units
equal its physically pruned copy.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

import pytest
import torch
import torchvision

from pnc_net.graphnet import GraphNet, LayoutInfo
from pnc_net.models import build_model
from pnc_net.superbody import Adapter, Branch, Layout
from pnc_net.testing import (
    assert_round_trip,
    frozen_randomized,
    masked_and_pruned,
    random_masks,
    short_rgb_clone,
)
from pnc_net.zoo import Zoo, state_digest

SHAPE = (3, 32, 32)
VIT = "torchvision:VisionTransformer"


def vit_args(dim: int = 32, layers: int = 4, patch: int = 4) -> dict:
    return {"image_size": 32, "patch_size": patch, "num_layers": layers, "num_heads": 2,
            "hidden_dim": dim, "mlp_dim": 2 * dim}


def tiny_vit(seed: int = 0, **kw) -> torchvision.models.VisionTransformer:
    torch.manual_seed(seed)
    return torchvision.models.VisionTransformer(**vit_args(**kw), num_classes=5).eval()


# ----------------------------------------------------------------------------- boundaries


def test_vit_boundaries_are_its_encoder_layers():
    vit = frozen_randomized(tiny_vit())
    net = GraphNet(vit, SHAPE)
    # the embedding (after position and dropout), each layer's output, the final norm
    assert net.boundary_names == ("encoder_dropout", "add_2", "add_4", "add_6", "add_8",
                                  "encoder_ln")
    infos = net.feature_info(SHAPE)
    x = torch.rand(2, *SHAPE)
    for info in infos[1:]:
        assert isinstance(info, LayoutInfo)
        assert (info.layout, info.prefix_tokens, info.spatial, info.channels) == (
            "tokens", 1, (8, 8), 32)
        assert info.masked_by is None  # the token stream is a residual stream
        with torch.no_grad():
            h = net.forward_features(x, info.boundary)
            assert h.shape == (2, 65, 32)
            assert torch.equal(net.forward_from(h, info.boundary), vit(x))
    # the MLP hidden units are the mask units; attention and the stream stay whole
    assert sorted(net.mask_widths()) == [f"encoder.layers.encoder_layer_{i}.mlp.0"
                                         for i in range(4)]


def test_swin_boundaries_are_channels_last_and_its_mlp_units_masked():
    """A Swin transformer's stages are (b, h, w, c) streams through LayerNorms; its last
    stage's stream grouping took Torch-Pruning minutes and 14 GB before groups that reach
    a LayerNorm were left out up front (``graphnet._norm_fed_roots``)."""
    torch.manual_seed(0)
    swin = frozen_randomized(torchvision.models.swin_t(num_classes=5))
    before = state_digest(swin)
    net = GraphNet(swin, SHAPE)
    infos = net.feature_info(SHAPE)[1:]
    assert len(infos) >= 8 and {i.layout for i in infos[:-1]} == {"hwc"}
    assert infos[-1].layout == "chw"  # the final norm, permuted for the head's pooling
    x = torch.rand(2, *SHAPE)
    with torch.no_grad():
        for info in infos[::3]:
            h = net.forward_features(x, info.boundary)
            assert torch.equal(net.forward_from(h, info.boundary), swin(x))
    depths = (2, 2, 6, 2)  # blocks per stage, in features.1, .3, .5, .7
    assert sorted(net.mask_widths()) == sorted(
        f"features.{2 * s + 1}.{b}.mlp.0" for s, n in enumerate(depths) for b in range(n))
    masks = random_masks(net.mask_widths(), seed=3)
    check = masked_and_pruned(net, masks, x, infos[4].boundary)  # before stage 3's blocks
    assert torch.allclose(check.pruned, check.masked, atol=1e-5)
    assert check.pruned_params < check.full_params
    assert state_digest(swin) == before


def test_vit_source_masked_equals_pruned():
    vit = frozen_randomized(tiny_vit(1))
    net = GraphNet(vit, SHAPE)
    before = state_digest(vit)
    masks = random_masks(net.mask_widths(), seed=2)
    x = torch.rand(3, *SHAPE)
    for s in (1, 3, 4):  # boundary 4 is after layer 2: layer 3 is pruned
        check = masked_and_pruned(net, masks, x, s)
        assert check.keep is None  # tokens: every channel of the stream is kept
        assert torch.allclose(check.pruned, check.masked, atol=1e-5), s
        assert check.pruned_params < check.full_params, s
    assert state_digest(vit) == before


# ----------------------------------------------------------------------------- adapters

CHW = Layout("chw", (8, 8))
LAYOUT_PAIRS = {  # name -> (input layout, its tensor shape, output layout, c_in, c_out)
    "chw->chw": (Layout("chw", (16, 16)), (6, 16, 16), Layout("chw", (8, 8)), 6, 5),
    "chw->tokens": (Layout("chw", (16, 16)), (6, 16, 16), Layout("tokens", (4, 4), 1), 6, 5),
    "tokens->chw": (Layout("tokens", (8, 8), 1), (65, 6), Layout("chw", (4, 4)), 6, 5),
    "tokens->tokens": (Layout("tokens", (8, 8), 1), (65, 6), Layout("tokens", (4, 4), 1), 6, 5),
    "tokens->tokens, no class token in": (Layout("tokens", (4, 4), 0), (16, 6),
                                          Layout("tokens", (8, 8), 2), 6, 5),
    "hwc->tokens": (Layout("hwc", (8, 8)), (8, 8, 6), Layout("tokens", (8, 8), 1), 6, 5),
    "tokens->hwc": (Layout("tokens", (8, 8), 1), (65, 6), Layout("hwc", (2, 2)), 6, 5),
}


def _out_shape(lay: Layout, c: int) -> tuple[int, ...]:
    h, w = lay.grid
    return {"chw": (c, h, w), "hwc": (h, w, c), "tokens": (lay.prefix + h * w, c)}[lay.kind]


@pytest.mark.parametrize("pair", sorted(LAYOUT_PAIRS))
def test_adapter_maps_between_layouts_and_its_lstsq_start_fits(pair):
    """Features made by a random adapter of the same form are fitted back by the
    least-squares start, class tokens included (full rank: nothing is truncated)."""
    from pnc_net.insert import fit_adapter_lstsq

    in_lay, in_shape, out_lay, c_in, c_out = LAYOUT_PAIRS[pair]
    torch.manual_seed(0)
    truth = Adapter(c_in, c_out, 8, out_lay.grid, in_lay, out_lay)
    if hasattr(truth, "prefix"):
        torch.nn.init.normal_(truth.prefix)
    h = torch.randn(64, *in_shape)
    with torch.no_grad():
        f = truth.linear(h)
        assert f.shape == (64, *_out_shape(out_lay, c_out))
        assert truth(h).shape == f.shape
        if out_lay.kind == "chw":
            assert torch.equal(truth(h), f.relu())
        else:  # a token or channels-last stream is signed: no ReLU
            assert torch.equal(truth(h), f)
    fitted = Adapter(c_in, c_out, 8, out_lay.grid, in_lay, out_lay)
    fit_adapter_lstsq(cast(Branch, SimpleNamespace(adapter=fitted)), h, f, ridge=1e-6)
    with torch.no_grad():
        err = (fitted.linear(h) - f).abs().max() / f.abs().max()
    assert err < 1e-3, (pair, float(err))


def test_a_conv_adapter_keeps_its_tensors():
    """Packages written before token layouts hold ``down`` and ``up`` only: unchanged."""
    a = Adapter(32, 16, 8, (4, 4))
    assert {k: tuple(v.shape) for k, v in a.state_dict().items()} == {
        "down.weight": (8, 32, 1, 1), "up.weight": (16, 8, 1, 1), "up.bias": (16,)}
    assert a.down.out_channels == 8  # what make_package records as adapter_rank
    h = torch.rand(2, 32, 8, 8)
    with torch.no_grad():
        assert torch.equal(a(h), torch.relu(a.up(a.down(torch.nn.functional.adaptive_avg_pool2d(
            h, (4, 4))))))
    tokens = Adapter(32, 16, 8, (4, 4), CHW, Layout("tokens", (4, 4), 1))
    assert sorted(tokens.state_dict()) == ["down.weight", "prefix", "up.bias", "up.weight"]


# ----------------------------------------------------------------------------- cloning


@pytest.fixture(scope="module")
def token_zoo(tmp_path_factory):
    """Two random-init tiny ViTs (8x8 patches of dim 32 for 0-4; 4x4 patches of dim 48,
    three layers, for 5-9) and pnc CNNs on three channels (0-4 and 5-9), each imported
    through ``Zoo.add_checkpoint`` as a user's checkpoint is."""
    root = tmp_path_factory.mktemp("tokens")
    zoo = Zoo(root / "zoo")
    small = {"dim": 48, "layers": 3, "patch": 8}
    for name, labels, args in (("vit-old", "01234", vit_args()),
                               ("vit-new", "56789", vit_args(**small))):
        torch.manual_seed(len(name) + int(labels[0]))
        path = root / f"{name}.pth"
        torch.save(torchvision.models.VisionTransformer(**args, num_classes=5).state_dict(),
                   path)
        zoo.add_checkpoint(path, VIT, tuple(labels), SHAPE, name=name, arch_args=args)
    for name, labels, seed in (("cnn-old", "01234", 3), ("cnn-new", "56789", 4)):
        torch.manual_seed(seed)
        model = frozen_randomized(build_model("cnn", in_channels=3, num_classes=5,
                                       widths=(16, 32, 32, 32)))
        path = root / f"{name}.pth"
        torch.save(model.state_dict(), path)
        zoo.add_checkpoint(path, "cnn", tuple(labels), SHAPE, name=name)
    return zoo


#: (target, source, position R:S): every pair of layouts a ViT brings
PAIRS = {"vit <- cnn": ("vit-old", "cnn-new", (4, 3)),
         "cnn <- vit": ("cnn-old", "vit-new", (3, 2)),
         "vit <- vit": ("vit-old", "vit-new", (4, 3))}


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_token_clone_round_trips_and_detaches_exactly(pair, token_zoo):
    target_name, source_name, position = PAIRS[pair]
    digests = {n: state_digest(token_zoo.load_module(n)[0]) for n in (target_name, source_name)}
    result = short_rgb_clone(token_zoo, target_name, source_name, position, per_class=6,
                             target_per_class=3)
    x = torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(9))
    sb = assert_round_trip(token_zoo, result.package, x)
    assert [(b.position_r, b.position_s) for b in sb.branches] == [position]
    with torch.no_grad():
        # the package stores fp16 tensors: the rebuilt branch is within the fingerprint tolerance
        assert torch.allclose(sb(x), result.superbody(x), atol=result.package.fingerprint.tolerance)
        assert sb(x).shape == (4, 7)
    for name, digest in digests.items():  # zoo weights are never written
        assert state_digest(token_zoo.load_module(name)[0]) == digest
