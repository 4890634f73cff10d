"""The cloning samples' augmentation besides shifts: the transforms, and the check that
picks them."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pnc_net import insert
from pnc_net.errors import InvalidInputError
from pnc_net.insert import (
    AUGMENT_DRAWS,
    AUGMENT_KEEPS,
    InsertConfig,
    augment_transforms,
    kept_share,
)
from pnc_net.training import AFFINE_RADIANS, random_augment


def images(n: int = 64, channels: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_permute_reorders_each_images_channels_and_invert_flips_about_half():
    x = images()
    gen = torch.Generator().manual_seed(1)
    permuted = random_augment(x, ("permute",), gen)
    # every image is itself with its channels reordered: the same sorted values per pixel
    assert torch.equal(permuted.sort(1).values, x.sort(1).values)
    assert not torch.equal(permuted, x)  # 64 images: some order moved
    inverted = random_augment(x, ("invert",), gen)
    flipped = torch.isclose(inverted, 1 - x).flatten(1).all(1)
    assert bool((flipped | (inverted == x).flatten(1).all(1)).all())
    assert 16 <= int(flipped.sum()) <= 48


def test_affine_rotates_by_at_most_its_bound():
    """A centred bar comes back as a bar turned by less than AFFINE_RADIANS (its
    principal axis), and the mass stays near the centre (zoom 0.9-1.1)."""
    x = torch.zeros(32, 1, 33, 33)
    x[:, :, 16, 6:27] = 1.0  # a horizontal bar through the centre
    out = random_augment(x, ("affine",), torch.Generator().manual_seed(2))
    coords = torch.stack(torch.meshgrid(torch.arange(33.0), torch.arange(33.0), indexing="ij"), -1) - 16
    for img in out[:, 0]:
        w = img.flatten() / img.sum()
        yx = coords.reshape(-1, 2)
        mean = (w[:, None] * yx).sum(0)
        assert mean.abs().max() < 1.0
        cov = (w[:, None, None] * (yx - mean)[:, :, None] * (yx - mean)[:, None, :]).sum(0)
        angle = 0.5 * math.atan2(2 * float(cov[0, 1]), float(cov[1, 1] - cov[0, 0]))
        assert abs(angle) <= AFFINE_RADIANS + 0.02
    assert not torch.equal(out, x)


def test_no_transforms_draw_nothing():
    x, gen = images(), torch.Generator().manual_seed(3)
    state = gen.get_state()
    assert random_augment(x, (), gen) is x
    assert torch.equal(gen.get_state(), state)  # a clone without them keeps its draws
    one_channel = images(channels=1)
    assert torch.equal(random_augment(one_channel, ("permute",), gen), one_channel)


class ColourBlind(nn.Module):
    """Reads only |x - 1/2| summed over channels: blind to channel order and inversion."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(64, 4)
        torch.nn.init.normal_(self.head.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((x - 0.5).abs().sum(1).flatten(1))


class RedOnly(ColourBlind):
    """Reads only the first channel: channel order and inversion change its answers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x[:, 0].flatten(1) - 0.5)


def test_auto_keeps_a_transform_only_where_every_judge_keeps_its_answers():
    x = images(200)
    blind, red = ColourBlind().eval(), RedOnly().eval()
    labels = blind(x).argmax(1)  # the blind network is right on every sample
    cfg = InsertConfig()
    kept, checks = augment_transforms(cfg, 3, [("source", blind, x, labels),
                                               ("target", blind, x, None)], seed=0)
    assert "permute" in kept and "invert" in kept
    assert checks["invert"] == {"source": 1.0, "target": 1.0, "kept": True}
    kept, checks = augment_transforms(cfg, 3, [("source", blind, x, labels),
                                               ("target", red, x, None)], seed=0)
    assert "permute" not in kept and "invert" not in kept  # one judge reading colour vetoes
    assert checks["permute"]["source"] == 1.0 and checks["permute"]["target"] < AUGMENT_KEEPS
    assert not checks["permute"]["kept"] and not checks["invert"]["kept"]
    for check in checks.values():  # what the report says is what decided
        assert check["kept"] == all(v >= AUGMENT_KEEPS for k, v in check.items() if k != "kept")


class Counting(RedOnly):
    """RedOnly that counts the samples it is shown."""

    seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += len(x)
        return super().forward(x)


def test_a_clear_first_draw_decides_alone_and_a_close_one_gets_every_draw(monkeypatch):
    x = images(50)
    net = Counting().eval()
    before = net(x).argmax(1)

    def share(sure: float) -> tuple[float, int]:
        monkeypatch.setattr(insert, "AUGMENT_SURE", sure)
        net.seen = 0
        value = kept_share(net, x, None, before, "permute", torch.Generator().manual_seed(0), 64)
        return value, net.seen
    one, seen_one = share(0.0)  # every share is "clear" of the threshold
    every, seen_every = share(2.0)  # no share is
    assert seen_one == len(x) and seen_every == AUGMENT_DRAWS * len(x)
    assert 0 < one < 1 and 0 < every < 1  # channel order moves some of RedOnly's answers
    # the same generator: the first draw is shared, so the full share contains it
    first = (net(random_augment(x, ("permute",), torch.Generator().manual_seed(0))).argmax(1)
             == before).float().mean()
    assert one == pytest.approx(float(first))
    labels = before.clone()
    monkeypatch.setattr(insert, "AUGMENT_SURE", 0.0)
    assert kept_share(net, x, labels, before, "permute", torch.Generator().manual_seed(0), 64) \
        == pytest.approx(one)  # right on every plain sample: accuracy ratio = agreement


def test_named_or_off_skip_the_check_and_unknown_names_are_refused():
    judges = [("target", RedOnly().eval(), images(32), None)]
    named = InsertConfig(augment="invert,affine")
    assert augment_transforms(named, 3, judges, 0) == (("affine", "invert"), {})
    assert augment_transforms(InsertConfig(augment="off"), 3, judges, 0) == ((), {})
    _, checks = augment_transforms(InsertConfig(), 1, judges, 0)
    assert set(checks) == {"affine", "invert"}  # one channel: no order to permute
    for bad in ("sometimes", "affine,", "affine,flip"):
        with pytest.raises(InvalidInputError, match="unknown augmentation"):
            InsertConfig(augment=bad)


@pytest.mark.slow
def test_mnist_networks_pass_the_affine_and_fail_inversion(default_clone):
    """The real check on the real digits: MNIST's networks have only seen white on
    black, so the source's accuracy on the cloned digits collapses under inversion, and
    small rotations and zooms keep it; the default clone's copies get the affine."""
    (augment,) = default_clone.report["augment"]
    assert augment["transforms"] == ["affine"]
    assert set(augment["checks"]) == {"affine", "invert"}
    assert augment["checks"]["invert"]["source"] < 0.5
    assert augment["checks"]["invert"]["kept"] is False
    assert min(augment["checks"]["affine"]["source"], augment["checks"]["affine"]["target"]) >= AUGMENT_KEEPS
    assert "augment" not in default_clone.report["settings"]  # the default, auto
