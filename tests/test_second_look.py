"""The router's second look (``--gate-views``): fixed views of the inputs it is unsure of,
averaged into its log-odds; the target's answer and every sure input stay as they were,
and the views travel in the package."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pnc_net import wire
from pnc_net.errors import IncompatibleError, InvalidInputError
from pnc_net.insert import InsertConfig
from pnc_net.package import ModuleConfig
from pnc_net.rebuild import branch_config, build_superbody, fingerprint_of, load_ref, verify
from pnc_net.superbody import SECOND_LOOK_LOG_ODDS, energy_allowed
from pnc_net.training import VIEW_SHIFTS, fixed_views
from pnc_net.zoo import Zoo


def test_fixed_views_are_the_same_for_every_image_whatever_its_batch():
    x = torch.rand(6, 3, 9, 9, generator=torch.Generator().manual_seed(0))
    views = fixed_views(x, ("affine", "permute", "invert"), 8)
    again = fixed_views(x[2:3], ("affine", "permute", "invert"), 8)
    assert len(views) == 8 and all(v.shape == x.shape for v in views)
    for v, one in zip(views, again):
        assert torch.allclose(v[2:3], one, atol=1e-6)  # an input's views ignore its batch
    plain = fixed_views(x, (), 2)  # shifts only: view 0 moves one pixel right
    dx, dy = VIEW_SHIFTS[0]
    assert (dx, dy) == (1, 0)
    assert torch.equal(plain[0][..., 1:], x[..., :-1]) and bool((plain[0][..., 0] == 0).all())
    inverted = fixed_views(x, ("invert",), 2)
    assert torch.allclose(inverted[0], 1 - plain[0]) and torch.equal(inverted[1], plain[1])
    rolled = fixed_views(x, ("permute",), 1)[0]
    assert torch.equal(rolled, plain[0].roll(1, dims=1))


def test_gate_views_need_a_discriminant_and_a_range():
    assert InsertConfig(gate_views=8).gate_views == 8
    for bad in (-1, 9, 33):  # views 9 on would repeat the 8 one-pixel shifts
        with pytest.raises(InvalidInputError, match="gate_views"):
            InsertConfig(gate_views=bad)
    views = fixed_views(torch.rand(2, 1, 8, 8), ("affine",), 16)
    assert torch.equal(views[8], views[0])  # why 8 is the most a clone may ask for
    with pytest.raises(InvalidInputError, match="mlp"):
        InsertConfig(gate_views=4, gate="mlp")


def _with_views(sb, n: int = 8, transforms: tuple[str, ...] = ("affine",)):
    gate = sb.branches[0].gate
    gate.views, gate.view_transforms = n, transforms
    return sb


@pytest.mark.slow
def test_second_look_moves_only_unsure_inputs_to_the_mean_of_their_views(default_clone, zoo_dir,
                                                                        mnist):
    zoo = Zoo(zoo_dir)
    plain = build_superbody(zoo, default_clone.package)
    looked = _with_views(build_superbody(zoo, default_clone.package))
    x = mnist.x_test[:300]
    with torch.no_grad():
        before, after = plain.parts(x), looked.parts(x)
        z_t, _, (own,) = plain._looks(x, plain.attached())
    assert torch.equal(before["z_t"], after["z_t"])  # the target's answer is its own
    unsure = own.abs() < SECOND_LOOK_LOG_ODDS
    assert 0 < int(unsure.sum()) < len(x)  # some of both on real digits
    g0, g1 = before["gates"][0], after["gates"][0]
    assert torch.equal(g0[~unsure], g1[~unsure])
    branch = looked.branches[0]
    for i in unsure.nonzero().flatten()[:5].tolist():  # one input alone: its own views
        with torch.no_grad():
            logits = [own[i : i + 1]] + [looked._looks(v, [branch])[2][0]
                                         for v in fixed_views(x[i : i + 1], ("affine",), 8)]
        expected = (torch.stack(logits).mean(0).sigmoid()
                    * energy_allowed(z_t[i : i + 1], branch.gate.energy_max))
        assert torch.allclose(g1[i : i + 1], expected, atol=1e-5)
    assert not torch.equal(g0[unsure], g1[unsure])


@pytest.mark.slow
def test_views_travel_in_the_package(default_clone, zoo_dir, mnist):
    zoo = Zoo(zoo_dir)
    looked = _with_views(build_superbody(zoo, default_clone.package).eval())
    config = branch_config(looked.branches[0])
    assert config["gate_views"] == 8 and config["gate_view_transforms"] == 1  # bit 0: affine
    assert "gate_views" not in default_clone.package.modules[0].config  # absent at 0
    shape = load_ref(zoo, default_clone.package.target)[2]
    module = dataclasses.replace(default_clone.package.modules[0], config=config)
    package = dataclasses.replace(default_clone.package, modules=[module],
                                  fingerprint=fingerprint_of(looked, shape))
    rebuilt, err = verify(zoo, wire.decode(wire.encode(package, "fp32")))
    gate = rebuilt.branches[0].gate
    assert (gate.views, gate.view_transforms) == (8, ("affine",)) and err < 1e-5
    x = mnist.x_test[:300]
    blind = build_superbody(zoo, default_clone.package)  # the same package without the keys
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), looked(x), atol=1e-6)
        assert not torch.allclose(blind(x), looked(x), atol=1e-4)  # the keys are what decides


def test_module_config_bounds_the_view_keys():
    assert ModuleConfig.from_mapping({"gate_views": 8, "gate_view_transforms": 7}).gate_views == 8
    assert "gate_views" not in ModuleConfig().as_dict()  # absent at 0: earlier bytes
    for bad in ({"gate_views": 9}, {"gate_view_transforms": 8}, {"gate_views": True}):
        with pytest.raises(InvalidInputError, match="gate_view"):
            ModuleConfig.from_mapping(bad)


@pytest.mark.slow
def test_rebuild_refuses_view_transforms_without_views(default_clone, zoo_dir):
    module = default_clone.package.modules[0]
    bad = dataclasses.replace(module, config={**module.config, "gate_view_transforms": 1})
    package = dataclasses.replace(default_clone.package, modules=[bad])
    with pytest.raises(IncompatibleError, match="gate_view_transforms 1 need"):
        build_superbody(Zoo(zoo_dir), package)
