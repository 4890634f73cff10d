"""The activation-size batch cap (``pnc_net/memory.py``): measured, bounded, harmless
where memory is not short."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from pnc_net.errors import InvalidInputError
from pnc_net.memory import (
    DEFAULT_ACTIVATION_BUDGET,
    LARGEST_DEFAULT_BATCH,
    activation_budget,
    activation_bytes,
    batch_cap,
)
from pnc_net.models import build_model
from pnc_net.zoo import state_digest


def test_activation_bytes_add_up_every_leaf_output():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    before = state_digest(net)
    # conv 4x4x4 + relu 4x4x4 + flatten 64 + linear 3, float32
    assert activation_bytes(net, (1, 4, 4)) == (64 + 64 + 64 + 3) * 4
    assert state_digest(net) == before and not net._forward_hooks  # nothing left behind
    assert all(not m._forward_hooks for m in net.modules())


def test_the_mnist_zoo_keeps_its_batches():
    nets = [build_model(a, in_channels=1, num_classes=5).eval() for a in ("cnn", "resnet")]
    assert batch_cap(nets, (1, 28, 28)) > LARGEST_DEFAULT_BATCH  # no step is lowered


def test_a_resnet50_at_224_gets_a_batch_that_fits_the_budget():
    torch.manual_seed(0)
    r50 = torchvision.models.resnet50(num_classes=5).eval()
    per_image = activation_bytes(r50, (3, 224, 224))
    assert 80e6 < per_image < 200e6  # about 128 MB: what a backward pass keeps, per image
    cap = batch_cap([r50], (3, 224, 224))
    assert 1 <= cap < 64 and cap * 2 * per_image <= DEFAULT_ACTIVATION_BUDGET
    assert batch_cap([r50], (3, 224, 224), budget_bytes=1) == 1  # never zero


def test_the_budget_is_read_from_the_environment(monkeypatch):
    monkeypatch.delenv("PNC_ACTIVATION_BUDGET", raising=False)
    assert activation_budget() == DEFAULT_ACTIVATION_BUDGET
    for text, value in (("2G", 2 << 30), ("512m", 512 << 20), ("1000", 1000), ("1.5K", 1536)):
        monkeypatch.setenv("PNC_ACTIVATION_BUDGET", text)
        assert activation_budget() == value
    for bad in ("lots", "-1G", "0"):
        monkeypatch.setenv("PNC_ACTIVATION_BUDGET", bad)
        with pytest.raises(InvalidInputError, match="is not a size"):
            activation_budget()


def test_plan_lowers_every_step_to_the_cap_and_the_report_says_so(zoo, mnist, monkeypatch):
    from pnc_net.cloning import CloneConfig, plan, settings_of

    cfg = CloneConfig.single("mnist-cnn-0to4", "mnist-cnn-5to9", ("5",), per_class=4,
                             target_per_class=2, positions=((3, 3),), synthesize=False)
    monkeypatch.delenv("PNC_ACTIVATION_BUDGET", raising=False)
    assert plan(zoo, mnist, cfg).cfg == cfg  # the default budget leaves MNIST as it was
    per_image = max(activation_bytes(zoo.load(n)[0], (1, 28, 28))
                    for n in ("mnist-cnn-0to4", "mnist-cnn-5to9"))
    monkeypatch.setenv("PNC_ACTIVATION_BUDGET", str(int(per_image * 2 * 24)))
    capped = plan(zoo, mnist, cfg).cfg
    assert capped.batch_size == 24
    assert capped.localize.batch_size == capped.insert.eval_batch_size == 24
    assert capped.insert.batch_size == 24
    assert settings_of(capped)["batch_size"] == 24
    given = cfg.with_batch_size(100)  # a batch the user chose is theirs
    assert plan(zoo, mnist, given).cfg == given


def test_mask_refinement_in_chunks_holds_a_chunk_and_steps_as_one_batch(zoo, monkeypatch):
    from pnc_net.localize import LocalizeConfig, refine_masks

    source = copy.deepcopy(zoo.load("mnist-cnn-5to9")[0])  # gates are set on it
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(100, 1, 28, 28, generator=gen)
    weights = torch.rand(100, generator=gen) + 0.5
    init = {k: torch.rand(n, generator=gen) > 0.5 for k, n in source.mask_widths().items()}
    cloned = torch.tensor([0, 1])
    # a large learning rate: one Adam step moves every gate by about lr in the
    # direction of its gradient's sign, so the masks show the gradient of the step
    cfg = LocalizeConfig(refine_steps=1, refine_lr=5.0, batch_size=256)
    whole = refine_masks(source, x, weights, cloned, init, cfg, torch.Generator().manual_seed(1))
    seen: list[int] = []
    hook = source.register_forward_pre_hook(lambda _m, args: seen.append(len(args[0])))
    chunked = refine_masks(source, x, weights, cloned, init,
                           LocalizeConfig(refine_steps=1, refine_lr=5.0, batch_size=32),
                           torch.Generator().manual_seed(1))
    hook.remove()
    assert max(seen) <= 32 and sum(seen) >= 100  # the teacher and the step, in chunks
    flips = {k: int((whole[k] != init[k]).sum()) for k in init}
    assert sum(flips.values()) > 0  # the step did move gates across the threshold
    assert all(torch.equal(chunked[k], whole[k]) for k in whole)
