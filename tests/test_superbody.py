"""The superbody: exact detach, re-attach, disabled branches, fusion, labels, pruning, bytes.

Tests that change a superbody work on one rebuilt from the package with a fresh
``Zoo`` instance (so its own target module), never on the shared fixture's,
except ``test_detach_on_the_clone_result`` which restores it in ``finally``.
"""

from __future__ import annotations

import pytest
import torch

from pnc_net.errors import IncompatibleError, InvalidInputError
from pnc_net.models import ZooNet
from pnc_net.rebuild import build_superbody
from pnc_net.superbody import NO_ENERGY_VETO, DiscriminantGate, FusionGate, Superbody
from pnc_net.zoo import Zoo, model_from_weights, state_digest

pytestmark = pytest.mark.slow  # every test here needs the shared clone

NEW = ("5", "6")


def _fresh_target(zoo: Zoo, sha256: str) -> ZooNet:
    """The target as stored on disk, loaded anew (not the cached module)."""
    m = zoo.resolve(sha256)
    return model_from_weights(m, zoo.read_weights(m))


@pytest.fixture()
def sb(default_clone, zoo_dir) -> Superbody:
    """A private superbody rebuilt from the shared clone's package."""
    return build_superbody(Zoo(zoo_dir), default_clone.package)


@pytest.fixture(scope="module")
def x_mix(mnist):
    """Test digits of every class: target classes, cloned classes and others."""
    return mnist.x_test[:200]


def _new_class_samples(mnist, labels=NEW, n=60):
    x, y = mnist.x_test, mnist.y_test
    keep = torch.isin(y, torch.tensor([int(c) for c in labels]))
    return x[keep][:n], [mnist.label_names[i] for i in y[keep][:n].tolist()]


def _old_class_samples(mnist, n=100):
    keep = mnist.y_test < 5
    return mnist.x_test[keep][:n], mnist.y_test[keep][:n]


# ----------------------------------------------------------------------------- detach / attach


def test_detach_returns_the_exact_target(sb, zoo, x_mix, default_clone):
    target = sb.target
    fresh = _fresh_target(zoo, default_clone.package.target.sha256)
    detached = sb.detach()
    assert detached is target
    assert len(sb.branches) == 0
    with torch.no_grad():
        assert torch.equal(detached(x_mix), fresh(x_mix))
        assert torch.equal(sb(x_mix), fresh(x_mix).softmax(1))  # the empty superbody too
    assert state_digest(detached) == state_digest(fresh)
    assert sb.label_names == default_clone.package.label_names[:5]


def test_detach_on_the_clone_result(default_clone, zoo, x_mix):
    """The superbody ``clone()`` returned, detached and restored."""
    sb = default_clone.superbody
    branches = list(sb.branches)
    fresh = _fresh_target(zoo, default_clone.package.target.sha256)
    try:
        with torch.no_grad():
            assert torch.equal(sb.detach()(x_mix), fresh(x_mix))
    finally:
        for b in branches:
            sb.attach(b)
    assert len(sb.branches) == len(branches)


def test_outputs_differ_while_attached(sb, mnist):
    x_new, _ = _new_class_samples(mnist)
    with torch.no_grad():
        p = sb(x_new)
        p_target = sb.target(x_new).softmax(1)
    assert p.shape == (len(x_new), 7)
    assert torch.allclose(p.sum(1), torch.ones(len(x_new)), atol=1e-5)
    assert not torch.allclose(p[:, :5], p_target, atol=1e-3)
    assert float(p[:, 5:].sum(1).mean()) > 0.5  # the branch claims its classes' inputs


def test_attach_again_restores_the_same_outputs(sb, x_mix):
    with torch.no_grad():
        before = sb(x_mix)
    branch = sb.detach(0)
    assert len(sb.branches) == 0
    with torch.no_grad():
        assert torch.equal(sb(x_mix), sb.target(x_mix).softmax(1))
    sb.attach(branch)
    with torch.no_grad():
        assert torch.equal(sb(x_mix), before)
    # Detach all, attach again: still the same.
    sb.detach()
    sb.attach(branch)
    with torch.no_grad():
        assert torch.equal(sb(x_mix), before)


def test_attach_refuses_clashing_labels_and_bad_positions(sb):
    branch = sb.branches[0]
    with pytest.raises(IncompatibleError, match="already predicted"):
        sb.attach(branch)
    other = Superbody(sb.target, sb.target_labels)
    branch.position_r = sb.target.num_blocks + 1
    try:
        with pytest.raises(IncompatibleError, match="outside the target"):
            other.attach(branch)
    finally:
        branch.position_r = sb.branches[0].position_r
    assert len(other.branches) == 0


def test_disable_branches(sb, x_mix):
    with torch.no_grad():
        before = sb(x_mix)
        with sb.disable_branches() as bare:
            assert bare is sb and len(sb.branches) == 0
            assert sb.label_names == sb.target_labels
            assert torch.equal(sb(x_mix), sb.target(x_mix).softmax(1))
        assert torch.equal(sb(x_mix), before)


def test_disable_branches_restores_after_an_error(sb):
    n = len(sb.branches)
    with pytest.raises(RuntimeError, match="boom"), sb.disable_branches():
        raise RuntimeError("boom")
    assert len(sb.branches) == n


# ----------------------------------------------------------------------------- fusion


def _force_gate(branch, logit: float) -> None:
    """Give ``branch`` an MLP gate whose pre-sigmoid logit is ``logit`` on every input:
    these tests check the fusion arithmetic, and a discriminant gate's log-odds are
    bounded (``LOG_ODDS_BOUND``), so it never reaches exactly 0 or 1 by itself."""
    head = branch.head.fc
    gate = FusionGate(5, head.out_features, head.in_features, 8)
    gate.energy_max.copy_(branch.gate.energy_max)
    last = gate.net[-1]
    last.weight.data.zero_()
    last.bias.data.fill_(logit)
    branch.gate = gate


def test_gate_zero_is_the_target(sb, x_mix):
    _force_gate(sb.branches[0], -1e4)  # sigmoid(-1e4) == 0.0 exactly in float32
    with torch.no_grad():
        parts = sb.parts(x_mix)
        assert torch.equal(parts["gates"][0], torch.zeros(len(x_mix)))
        p = sb(x_mix)
        p_target = sb.target(x_mix).softmax(1)
    # The fused probabilities over Y_t are the target's (up to fusion's 1e-6 clamp).
    assert torch.allclose(p[:, :5], p_target, rtol=1e-5, atol=1e-6)
    assert float(p[:, 5:].max()) <= 1e-5
    assert torch.equal(p.argmax(1), p_target.argmax(1))


def test_gate_one_gives_the_source_head(sb, x_mix):
    _force_gate(sb.branches[0], 1e4)
    sb.branches[0].gate.energy_max.fill_(NO_ENERGY_VETO)  # no veto: g = 1 everywhere
    with torch.no_grad():
        parts = sb.parts(x_mix)
        p = sb(x_mix)
    branch = sb.branches[0]
    p_src = parts["z_s"][0][:, branch.cloned_index].softmax(1)
    assert torch.allclose(p[:, 5:], p_src, rtol=1e-5, atol=1e-6)
    assert float(p[:, :5].max()) <= 1e-5


# ----------------------------------------------------------------------------- labels


def test_labels_and_predictions(sb, mnist, default_clone):
    assert sb.label_names == ("0", "1", "2", "3", "4", "5", "6")
    assert sb.target_labels == ("0", "1", "2", "3", "4")
    assert default_clone.package.label_names == sb.label_names
    x_new, y_new = _new_class_samples(mnist)
    preds = sb.predict(x_new)
    assert all(name in sb.label_names for name, _ in preds)
    assert all(0.0 <= conf <= 1.0 for _, conf in preds)
    correct = sum(name == y for (name, _), y in zip(preds, y_new))
    assert correct / len(y_new) > 0.8
    x_old, y_old = _old_class_samples(mnist)
    preds = sb.predict(x_old)
    assert sum(name == str(int(y)) for (name, _), y in zip(preds, y_old)) / len(y_old) > 0.9


# ----------------------------------------------------------------------------- pruning / bytes


def test_branch_has_no_dropped_filters(sb, default_clone, zoo):
    module = default_clone.package.modules[0]
    branch = sb.branches[0]
    source, _ = zoo.load(module.source.sha256)
    s = branch.position_s
    assert (branch.position_r, s) == (module.position_r, module.position_s)
    assert len(branch.blocks) == source.num_blocks - s
    for j, block in enumerate(branch.blocks):
        i = s + j
        for unit, gate in block.mask_gates().items():
            name = f"blocks.{i}.{unit}"
            assert gate.width == int(module.masks[name].sum()), name
    # Every conv in the branch computes only kept channels: fewer weights than the source tail.
    n_branch = sum(p.numel() for p in branch.blocks.parameters())
    n_tail = sum(p.numel() for p in source.blocks[s:].parameters())
    assert n_branch < n_tail or n_tail == 0  # at S = K the branch runs no source block
    # The adapter feeds exactly the kept channels at boundary S.
    info = source.feature_info((1, 28, 28))[s]
    expected = (int(module.masks[info.masked_by].sum()) if info.masked_by else info.channels)
    assert branch.adapter.up.out_channels == expected
    # Source weights in the branch are frozen.
    assert not any(p.requires_grad for p in [*branch.blocks.parameters(),
                                             *branch.head.parameters()])


def test_module_bytes(sb):
    def fp32_bytes(module, skip=()):
        return sum(v.numel() * 4 for k, v in module.state_dict().items()
                   if v.is_floating_point() and k not in skip)

    target_bytes = fp32_bytes(sb.target)
    branch_bytes = sum(fp32_bytes(b, skip=("cloned_index",)) for b in sb.branches)
    assert branch_bytes > 0
    assert sb.module_bytes() == target_bytes + branch_bytes
    sb.detach()
    assert sb.module_bytes() == target_bytes


def test_clone_result_metrics_match_a_rebuild(sb, default_clone, mnist):
    from pnc_net.metrics import clone_metrics

    m = clone_metrics(sb, mnist)
    reported = default_clone.report["metrics"]
    # The package carries fp32 tensors in memory: the rebuild is the same superbody.
    for key in ("acc_old", "acc_new", "acc_all", "locality", "target_acc_old"):
        assert m[key] == pytest.approx(reported[key], abs=1e-6), key
    assert m["superbody_bytes"] == reported["superbody_bytes"]


def test_discriminant_gate_log_odds_are_bounded_and_keep_a_gradient():
    """An LDA's log-odds run to hundreds; bounded, its gate is never exactly 0 or 1, so
    a receiver's repair still has a gradient through it (``serve.repair``)."""
    torch.manual_seed(0)
    gate = DiscriminantGate(n_cloned=2, n_classes=7, n_features=6)
    gate.linear.weight.data = 1e3 * torch.randn(7, 6)
    f_t, f_b = torch.randn(8, 3), torch.randn(8, 3, requires_grad=True)
    g = gate(torch.zeros(8, 5), torch.zeros(8, 10), f_b, f_t)
    raw = gate.linear(torch.cat([f_t, f_b], 1)).detach()
    assert float((raw[:, :2].logsumexp(1) - raw[:, 2:].logsumexp(1)).abs().min()) > 50
    assert bool(((g > 0) & (g < 1)).all()), g
    g.sum().backward()
    assert f_b.grad is not None and bool((f_b.grad.abs().sum(1) > 0).all())


def test_gate_taps_name_boundaries_and_round_trip_through_the_package_integer():
    from pnc_net.insert import InsertConfig
    from pnc_net.superbody import tap_boundaries, taps_from_mask, taps_mask

    assert tap_boundaries("none", 10) == ()
    assert tap_boundaries("early", 10) == (1, 2, 3, 4, 5)
    assert tap_boundaries("early", 1) == ()  # a one-block target has no early half
    assert tap_boundaries("all", 4) == (1, 2, 3, 4)
    for taps in [(), (1,), (2, 5), tuple(range(1, 53))]:  # resnet152 has 52 boundaries
        assert taps_from_mask(taps_mask(taps)) == taps
    assert taps_mask((1, 2)) == 0b11
    with pytest.raises(InvalidInputError, match="gate taps 'late'"):
        InsertConfig(gate_taps="late")
    with pytest.raises(InvalidInputError, match="none, early, all"):
        tap_boundaries("late", 4)


def test_pooled_features_follow_each_boundary_layout():
    """A tap averages over the grid (chw and hwc) or the tokens, whatever the layout."""
    import torchvision

    from pnc_net.graphnet import GraphNet

    vit = GraphNet(torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=3).eval(), (3, 32, 32))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        for r in range(1, vit.num_blocks + 1):
            h = vit.forward_features(x, r)
            info = vit.feature_info((3, 32, 32))[r]
            assert vit.pooled(h, r).shape == (2, info.channels), (r, info)
    cnn = GraphNet(torchvision.models.resnet18(num_classes=3).eval(), (3, 32, 32))
    h = cnn.forward_features(x, 2)
    assert torch.equal(cnn.pooled(h, 2), h.mean((2, 3)))
