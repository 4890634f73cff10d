"""A source whose channels cannot be masked exactly is cloned whole.

ShuffleNetV2 shuffles channels with a 5-d view that Torch-Pruning cannot follow, so
``GraphNet`` finds no mask units in it. Cloning from it must still work: no masks
to learn (localization keeps everything), a package with an empty mask list that
decodes, rebuilds and verifies on a receiver, and a superbody that detaches to the
exact target.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

from pnc_net import wire
from pnc_net.cloning import CloneConfig, clone
from pnc_net.data import Dataset
from pnc_net.insert import InsertConfig
from pnc_net.localize import LocalizeConfig
from pnc_net.rebuild import verify
from pnc_net.testing import frozen_randomized
from pnc_net.training import torch_threads
from pnc_net.zoo import Zoo, state_digest

SHAPE = (3, 32, 32)


def random_images(seed: int, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(10).repeat_interleave(per_class)
    return torch.rand(len(y), *SHAPE, generator=gen), y


@pytest.fixture(scope="module")
def whole_source_clone(tmp_path_factory):
    with torch_threads(1):
        return _whole_source_clone(tmp_path_factory)


def _whole_source_clone(tmp_path_factory):
    root = tmp_path_factory.mktemp("whole")
    torch.manual_seed(0)
    files = {"r18": root / "r18.pth", "shuffle": root / "shuffle.pth"}
    torch.save(frozen_randomized(torchvision.models.resnet18(num_classes=5)).state_dict(),
               files["r18"])
    torch.save(frozen_randomized(torchvision.models.shufflenet_v2_x0_5(num_classes=5), 1)
               .state_dict(), files["shuffle"])
    zoo = Zoo(root / "zoo")
    zoo.add_checkpoint(files["r18"], "torchvision:resnet18", tuple("01234"), SHAPE, name="r18")
    zoo.add_checkpoint(files["shuffle"], "torchvision:shufflenet_v2_x0_5", tuple("56789"),
                       SHAPE, name="shuffle")
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = (random_images(s, n) for s, n in
                                               ((0, 6), (1, 3), (2, 3)))
    data = Dataset("random", tuple(str(i) for i in range(10)), x_tr, y_tr, x_va, y_va,
                   x_te, y_te)
    digests = {n: state_digest(zoo.load_module(n)[0]) for n in ("r18", "shuffle")}
    source, _ = zoo.load("shuffle")
    assert not source.mask_widths()  # the premise: nothing to mask
    cfg = CloneConfig.single("r18", "shuffle", ("5", "6"), per_class=4, target_per_class=2,
                             positions=((8, source.num_blocks),),
                             localize=LocalizeConfig(refine_steps=2),
                             insert=InsertConfig(epochs=1, gate_steps=5))
    return clone(zoo, data, cfg), zoo, digests


def test_a_source_without_mask_units_is_cloned_whole(whole_source_clone):
    result, zoo, digests = whole_source_clone
    (module,) = result.package.modules
    assert module.masks == {}
    package = wire.decode(wire.encode(result.package))
    assert package.modules[0].masks == {}
    superbody, err = verify(Zoo(zoo.root), package)  # a receiver's fresh zoo
    assert err <= package.fingerprint.tolerance
    target, _ = Zoo(zoo.root).load("r18")
    x = torch.rand(3, *SHAPE)
    with torch.no_grad():
        assert torch.equal(superbody.detach()(x), target(x))
    assert {n: state_digest(zoo.load_module(n)[0]) for n in digests} == digests
