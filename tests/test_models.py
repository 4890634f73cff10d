"""Architecture registry, block-boundary interface and physical pruning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pnc_net.errors import InvalidInputError
from pnc_net.models import ARCHITECTURES, ZooNet, build_model, register
from pnc_net.testing import randomize_batchnorm

ARCHS = sorted(ARCHITECTURES)
SHAPES = [(1, 28, 28), (3, 32, 32)]


def _randomized(arch: str, input_shape, num_classes: int = 5, seed: int = 0) -> ZooNet:
    """A model whose BN statistics and affine terms are not the identity, in eval mode,
    so pruning bugs (a wrong slice of a BN or a conv) change the outputs."""
    torch.manual_seed(seed)
    model = build_model(arch, in_channels=input_shape[0], num_classes=num_classes)
    return randomize_batchnorm(model, seed).eval()


def _random_masks(model: ZooNet, seed: int, keep: float = 0.5) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for name, width in model.mask_widths().items():
        m = torch.rand(width, generator=gen) < keep
        m[torch.randint(0, width, (1,), generator=gen)] = True  # never empty
        m[(int(torch.nonzero(m)[0]) + 1) % width] = False  # never full
        masks[name] = m
    return masks


# ----------------------------------------------------------------------------- registry


def test_registry_has_the_default_architectures():
    assert {"cnn", "resnet"} <= set(ARCHITECTURES)


def test_unknown_architecture_lists_known_ones():
    with pytest.raises(InvalidInputError, match="unknown architecture 'vgg'") as info:
        build_model("vgg")
    for arch in ARCHS:
        assert arch in str(info.value)


def test_duplicate_registration_is_an_error():
    before = dict(ARCHITECTURES)
    with pytest.raises(ValueError, match="'cnn' is registered twice"):
        register("cnn")(lambda **kw: None)
    assert ARCHITECTURES == before  # the original builder is kept


def test_register_new_architecture_then_remove():
    name = "test-tiny-arch"

    @register(name)
    def tiny(in_channels: int = 1, num_classes: int = 2) -> ZooNet:
        return build_model("cnn", in_channels=in_channels, num_classes=num_classes,
                           widths=(4, 4, 4, 4))

    try:
        assert build_model(name, num_classes=3).head.fc.out_features == 3
    finally:
        del ARCHITECTURES[name]


def test_build_model_accepts_json_lists():
    # Manifests are JSON, so tuples come back as lists.
    model = build_model("cnn", in_channels=1, num_classes=4, widths=[8, 8, 16, 16])
    assert [b.conv.out_channels for b in model.blocks] == [8, 8, 16, 16]


# ----------------------------------------------------------------------------- block boundaries


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("input_shape", SHAPES)
def test_feature_info_matches_real_features(arch, input_shape):
    model = _randomized(arch, input_shape)
    infos = model.feature_info(input_shape)
    assert [i.boundary for i in infos] == list(range(model.num_blocks + 1))
    assert infos[0].channels == input_shape[0] and infos[0].spatial == input_shape[1:]
    assert infos[0].masked_by is None
    x = torch.rand(2, *input_shape)
    gates = model.mask_gates()
    for info in infos:
        h = model.forward_features(x, info.boundary)
        assert h.shape[1:] == (info.channels, *info.spatial)
        if info.masked_by is not None:
            assert info.masked_by in gates
            assert gates[info.masked_by].width == info.channels


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_from_every_boundary_equals_forward(arch):
    model = _randomized(arch, (1, 28, 28))
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        full = model(x)
        assert full.shape == (3, 5)
        for r in range(model.num_blocks + 1):
            assert torch.equal(model.forward_from(model.forward_features(x, r), r), full)
            mid = model.forward_features(x, r)
            assert torch.equal(model.forward_features(mid, model.num_blocks, start=r),
                               model.forward_features(x, model.num_blocks))


@pytest.mark.parametrize("arch", ARCHS)
def test_mask_units_have_stable_names_and_widths(arch):
    model = _randomized(arch, (1, 28, 28))
    widths = model.mask_widths()
    assert widths, "every architecture needs at least one mask unit"
    assert all(name.startswith("blocks.") for name in widths)
    assert all(w > 0 for w in widths.values())
    again = _randomized(arch, (1, 28, 28), seed=1)
    assert again.mask_widths() == widths


@pytest.mark.parametrize("arch", ARCHS)
def test_gates_all_ones_change_nothing_and_none_resets(arch):
    model = _randomized(arch, (1, 28, 28))
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
        model.set_gates({k: torch.ones(w) for k, w in model.mask_widths().items()})
        assert torch.equal(model(x), ref)
        model.set_gates({k: torch.zeros(w) for k, w in model.mask_widths().items()})
        assert not torch.equal(model(x), ref)
        model.set_gates(None)
        assert torch.equal(model(x), ref)


# ----------------------------------------------------------------------------- pruning


def _pruned_forward(model: ZooNet, masks, start: int, x: torch.Tensor):
    blocks, head, first_keep = model.pruned_tail(start, masks)
    with torch.no_grad():
        # The boundary-``start`` features with the gates on: dropped channels are zero,
        # and the pruned tail must not need them.
        model.set_gates({k: v.float() for k, v in masks.items()})
        h = model.forward_features(x, start)
        model.set_gates(None)
        if first_keep is not None:
            assert torch.all(h[:, ~masks[f"blocks.{start - 1}.out"]] == 0)
            h = h[:, first_keep]
        for block in blocks:
            h = block.eval()(h)
        return head.eval()(h), blocks, head


def _gated_forward(model: ZooNet, masks, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        model.set_gates({k: v.float() for k, v in masks.items()})
        try:
            return model(x)
        finally:
            model.set_gates(None)


def _n_params(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("input_shape", SHAPES)
def test_pruned_tail_equals_gated_model(arch, input_shape):
    model = _randomized(arch, input_shape)
    masks = _random_masks(model, seed=1)
    x = torch.rand(4, *input_shape)
    gated = _gated_forward(model, masks, x)
    for start in range(model.num_blocks + 1):
        pruned, blocks, head = _pruned_forward(model, masks, start, x)
        assert torch.allclose(pruned, gated, rtol=1e-5, atol=1e-5), (
            f"{arch} start={start}: max diff {(pruned - gated).abs().max():.2e}")
        full = _n_params(*model.blocks[start:], model.head)
        if start < model.num_blocks:
            assert _n_params(blocks, head) < full, f"{arch} start={start} did not prune"
    # Pruning works on copies: the model itself is untouched.
    assert all(g.gate is None for g in model.mask_gates().values())
    assert model.mask_widths() == _randomized(arch, input_shape).mask_widths()


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_tail_keeps_exactly_the_kept_filters(arch):
    model = _randomized(arch, (1, 28, 28))
    masks = _random_masks(model, seed=2)
    blocks, _, _ = model.pruned_tail(0, masks)
    pruned = ZooNet(list(blocks), model.head)
    for name, width in pruned.mask_widths().items():
        assert width == int(masks[name].sum()), name


@pytest.mark.parametrize("arch", ARCHS)
def test_all_ones_masks_prune_nothing(arch):
    model = _randomized(arch, (1, 28, 28))
    masks = {k: torch.ones(w, dtype=torch.bool) for k, w in model.mask_widths().items()}
    x = torch.rand(2, 1, 28, 28)
    pruned, blocks, head = _pruned_forward(model, masks, 0, x)
    assert _n_params(blocks, head) == _n_params(model.blocks, model.head)
    with torch.no_grad():
        assert torch.allclose(pruned, model(x), rtol=1e-6, atol=1e-6)


def test_resnet_refuses_a_pruned_input_stream():
    model = _randomized("resnet", (1, 28, 28))
    with pytest.raises(InvalidInputError, match="residual block"):
        model.blocks[1].pruned(torch.tensor([0, 1]), {})


@pytest.mark.parametrize("name", ["mnist-cnn-5to9", "mnist-resnet-5to9"])
def test_pruning_real_zoo_models(zoo, mnist, name):
    model, _ = zoo.load(name)
    masks = _random_masks(model, seed=3, keep=0.6)
    x = mnist.x_test[:16]
    gated = _gated_forward(model, masks, x)
    start = model.num_blocks // 2
    pruned, _, _ = _pruned_forward(model, masks, start, x)
    assert torch.allclose(pruned, gated, rtol=1e-5, atol=1e-5)
