"""Named branches (attach / detach / set_branches) and ``clone_modules`` on plain modules.

The lifecycle tests build branches directly (``build_branch`` on random-init pnc
networks: no training), so they need no zoo. ``clone_modules`` runs on random-init
pnc networks and torchvision models with tiny budgets; one test clones trained zoo
models and rebuilds the package from the zoo that holds them.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision

from pnc_net import clone_modules
from pnc_net.errors import IncompatibleError, InvalidInputError, NotFoundError
from pnc_net.insert import InsertConfig
from pnc_net.localize import LocalizeConfig
from pnc_net.models import ZooNet, build_model
from pnc_net.rebuild import fingerprint_error
from pnc_net.superbody import Branch, Superbody, build_branch
from pnc_net.testing import randomize_batchnorm
from pnc_net.zoo import Zoo, state_digest

SHAPE = (1, 28, 28)
OLD, NEW = tuple("01234"), tuple("56789")
#: budgets that keep a clone to seconds (its quality is not what these tests check)
TINY = {"per_class": 8, "target_per_class": 4, "synthesize": False,
        "localize": LocalizeConfig(refine_steps=5), "insert": InsertConfig(epochs=1, gate_steps=20)}


def _branch(target: ZooNet, source: ZooNet, cloned: tuple[int, ...], seed: int,
            r: int = 2, s: int = 2) -> Branch:
    """A branch with every source filter kept and a seeded random adapter and gate."""
    torch.manual_seed(seed)
    masks = {n: torch.ones(w, dtype=torch.bool) for n, w in source.mask_widths().items()}
    branch, _ = build_branch(target, source, SHAPE, r, s, masks, cloned,
                             tuple(NEW[c] for c in cloned), 4, 8, len(OLD))
    with torch.no_grad():  # an open gate, so that branches change the outputs
        branch.gate.net[-1].bias.fill_(2.0)
    return branch


@pytest.fixture(scope="module")
def nets() -> tuple[ZooNet, ZooNet]:
    torch.manual_seed(0)
    return (build_model("cnn", num_classes=5).eval(), build_model("cnn", num_classes=5).eval())


@pytest.fixture()
def parts(nets):
    """A fresh superbody of a copy of the target, and three branches: ``five_six``,
    ``seven`` and ``alt`` (another branch for 5 and 6)."""
    target, source = nets
    target = copy.deepcopy(target)
    a, b, c = (_branch(target, source, (0, 1), 1), _branch(target, source, (2,), 2, 3, 3),
               _branch(target, source, (0, 1), 3, 1, 1))
    return Superbody(target, OLD), a, b, c


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.rand(6, *SHAPE, generator=torch.Generator().manual_seed(5))


def _probs(sb: Superbody, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return sb(x)


# ----------------------------------------------------------------------------- named branches


def test_attach_names_and_label_order(parts, x):
    sb, a, b, _ = parts
    sb.attach("five_six", a).attach("seven", b)
    assert sb.branch_names == ("five_six", "seven") == sb.active_branches
    assert sb.label_names == (*OLD, "5", "6", "7")
    assert sb.branch("seven") is b and sb.branches == [a, b] == sb.attached()
    assert _probs(sb, x).shape == (len(x), 8)


def test_unnamed_branches_get_default_names_and_keep_them(nets, parts):
    sb, a, b, _ = parts
    sb = Superbody(sb.target, OLD, [a, b])
    assert sb.branch_names == ("branch0", "branch1")
    sb.detach()
    sb.attach(b)  # a detached branch comes back under its name
    sb.attach(a)
    assert sb.branch_names == ("branch1", "branch0")
    named = Superbody(sb.target, OLD, {"x": a, "y": b})
    assert named.branch_names == ("x", "y")


@pytest.mark.parametrize("name", ["1x", "a.b", "", "five six", "class", "keys", "training", 3])
def test_bad_names_are_refused(parts, name):
    sb, a, _, _ = parts
    with pytest.raises(InvalidInputError, match="branch name"):
        sb.attach(name, a)
    assert sb.branch_names == ()


def test_duplicates_are_refused(parts):
    sb, a, b, c = parts
    sb.attach("five_six", a)
    with pytest.raises(IncompatibleError, match="already attached"):
        sb.attach("five_six", b)
    with pytest.raises(IncompatibleError, match="already attached as 'five_six'"):
        sb.attach("again", a, active=False)
    with pytest.raises(IncompatibleError, match="already predicted"):
        sb.attach("alt", c)  # active: its labels clash
    with pytest.raises(InvalidInputError, match="not two branches"):
        sb.attach(a, b)
    assert sb.branch_names == ("five_six",)


def test_detach_by_name_index_and_all(parts, x):
    sb, a, b, _ = parts
    fresh = copy.deepcopy(sb.target)
    sb.attach("five_six", a).attach("seven", b)
    assert sb.detach("seven") is b and sb.branch_names == ("five_six",)
    with pytest.raises(NotFoundError, match="no branch named 'seven'"):
        sb.detach("seven")
    with pytest.raises(NotFoundError, match="index 3"):
        sb.detach(3)
    sb.attach("seven", b)
    assert sb.detach(0) is a and sb.label_names == (*OLD, "7")
    target = sb.detach()
    assert target is sb.target and sb.branch_names == () and sb.label_names == OLD
    with torch.no_grad():
        assert torch.equal(target(x), fresh(x))
        assert torch.equal(sb(x), fresh(x).softmax(1))
    assert state_digest(target) == state_digest(fresh)


def test_set_branches_chooses_the_active_ones(parts, x):
    sb, a, b, c = parts
    sb.attach("five_six", a).attach("seven", b).attach("alt", c, active=False)
    assert sb.branch_names == ("five_six", "seven", "alt")
    assert sb.active_branches == ("five_six", "seven")
    with_a = _probs(sb, x)
    sb.set_branches(["seven", "alt"])  # the output columns follow the order given
    assert sb.label_names == (*OLD, "7", "5", "6") and sb.branches == [b, c]
    only = Superbody(copy.deepcopy(sb.target), OLD, {"seven": b, "alt": c})
    assert torch.equal(_probs(sb, x), _probs(only, x))
    assert not torch.allclose(_probs(sb, x)[:, :5], with_a[:, :5])
    sb.set_branches([])
    assert sb.label_names == OLD
    with torch.no_grad():
        assert torch.equal(sb(x), sb.target(x).softmax(1))
    sb.set_branches(["five_six", "seven"])
    assert torch.equal(_probs(sb, x), with_a)
    assert sb.module_bytes() == Superbody(sb.target, OLD, {"a": a, "b": b}).module_bytes()


def test_set_branches_refusals(parts):
    sb, a, b, c = parts
    sb.attach("five_six", a).attach("alt", c, active=False)
    with pytest.raises(IncompatibleError, match="already predicted"):
        sb.set_branches(["five_six", "alt"])
    with pytest.raises(NotFoundError, match="attached: five_six, alt"):
        sb.set_branches(["nope"])
    with pytest.raises(InvalidInputError, match="twice"):
        sb.set_branches(["alt", "alt"])
    with pytest.raises(InvalidInputError, match="list of names"):
        sb.set_branches("alt")
    assert sb.active_branches == ("five_six",)  # unchanged by a refusal


def test_disable_branches_restores_the_active_set(parts, x):
    sb, a, b, c = parts
    sb.attach("five_six", a).attach("seven", b).attach("alt", c, active=False)
    before = _probs(sb, x)
    with sb.disable_branches():
        assert sb.active_branches == () and sb.label_names == OLD
        assert sb.branch_names == ("five_six", "seven", "alt")
        sb.detach("seven")  # detached inside the block: not restored
    assert sb.active_branches == ("five_six",)
    sb.attach("seven", b)
    assert torch.equal(_probs(sb, x), before)


def test_a_subset_of_branches_traces_like_eager(parts, x):
    """The receiver's jit fastpath traces the superbody: only active branches are traced."""
    from pnc_net.serve.fastpath import compile_jit

    sb, a, b, c = parts
    sb.attach("five_six", a).attach("seven", b).attach("alt", c, active=False)
    sb.set_branches(["alt", "seven"])
    compiled = compile_jit(sb, x)
    with torch.inference_mode():
        got = compiled(x)
    assert got.shape == (len(x), 8)
    assert torch.allclose(got, _probs(sb, x), atol=1e-5)


# ----------------------------------------------------------------------------- clone_modules


@pytest.mark.slow
def test_clone_modules_on_two_pnc_networks_without_a_zoo(mnist, x):
    torch.manual_seed(1)
    target, source = build_model("cnn", num_classes=5), build_model("resnet", num_classes=5)
    target.train()  # left in train mode: cloning must not touch it, nor its flags
    before = state_digest(target), state_digest(source)
    result = clone_modules(target, source, mnist, classes=("5", "6"), target_labels=OLD,
                           source_labels=NEW, config={**TINY, "positions": ((3, 3),)},
                           name="five_six")
    assert (state_digest(target), state_digest(source)) == before
    assert target.training and all(p.requires_grad for p in target.parameters())
    sb = result.superbody
    assert sb.branch_names == ("five_six",) and sb.label_names == (*OLD, "5", "6")
    assert result.package.label_names == sb.label_names
    assert result.package.target.arch == "module:ZooNet"
    assert fingerprint_error(sb, result.package.fingerprint, SHAPE) == 0.0
    assert {"acc_new", "locality"} <= set(result.report["metrics"])
    with torch.no_grad():  # the bare target is the module handed in, output for output
        sb.set_branches([])
        assert torch.equal(sb(x), target.eval()(x).softmax(1))
        assert torch.equal(sb.detach()(x), target(x))


def test_missing_labels_are_a_clear_error(mnist, nets):
    target, source = nets
    with pytest.raises(InvalidInputError, match=r"target has 5 outputs .* pass target_labels"):
        clone_modules(target, source, mnist, classes=("5",))
    with pytest.raises(InvalidInputError, match=r"source has 5 outputs .* pass source_labels"):
        clone_modules(target, source, mnist, classes=("5",), target_labels=OLD)
    with pytest.raises(InvalidInputError, match="names 3 labels but the target has 5"):
        clone_modules(target, source, mnist, classes=("5",), target_labels=("0", "1", "2"),
                      source_labels=NEW)


def test_clone_modules_refusals_before_any_work(mnist, nets):
    target, source = nets
    kw = {"target_labels": OLD, "source_labels": NEW}
    with pytest.raises(InvalidInputError, match="branch name"):
        clone_modules(target, source, mnist, classes=("5",), name="my clone", **kw)
    with pytest.raises(InvalidInputError, match="Dataset"):
        clone_modules(target, source, (mnist.x_train, mnist.y_train), classes=("5",), **kw)
    with pytest.raises(InvalidInputError, match="not CloneConfig settings"):
        clone_modules(target, source, mnist, classes=("5",), config={"epochs": 1}, **kw)
    with pytest.raises(InvalidInputError, match="not in source"):
        clone_modules(target, source, mnist, classes=("x",), **kw)
    with pytest.raises(InvalidInputError, match="list of label names"):
        clone_modules(target, source, mnist, classes="5", **kw)


@pytest.mark.slow
def test_on_zoo_weights_it_is_the_zoo_clone(zoo, mnist):
    """Modules whose weights a zoo holds, named with their zoo architecture: the same
    package as ``clone()`` on the zoo (same references, masks, tensors, fingerprint),
    and the zoo rebuilds and verifies it."""
    from pnc_net import wire
    from pnc_net.cloning import CloneConfig, clone
    from pnc_net.rebuild import verify

    target, _ = zoo.load_module("mnist-cnn-0to4")
    source, _ = zoo.load_module("mnist-cnn-5to9")
    cfg = CloneConfig.single("mnist-cnn-0to4", "mnist-cnn-5to9", ("5", "6"),
                             **{**TINY, "positions": ((3, 3),)})
    result = clone_modules(target, source, mnist, classes=("5", "6"), target_labels=OLD,
                           source_labels=NEW, config=cfg, target_arch="cnn", source_arch="cnn")
    assert result.superbody.branch_names == ("clone",)
    ours, theirs = result.package, clone(zoo, mnist, cfg).package
    assert ours.target.sha256 == theirs.target.sha256
    assert ours.modules[0].source.sha256 == theirs.modules[0].source.sha256
    assert all(torch.equal(ours.modules[0].masks[k], v) for k, v in theirs.modules[0].masks.items())
    assert all(torch.equal(ours.modules[0].tensors[k], v)
               for k, v in theirs.modules[0].tensors.items())
    assert torch.equal(ours.fingerprint.probabilities, theirs.fingerprint.probabilities)
    package = wire.decode(wire.encode(ours))
    sb, err = verify(Zoo(zoo.root), package)
    assert err <= package.fingerprint.tolerance
    assert sb.branch_names == ("branch0",)  # a package carries no branch names


@pytest.mark.slow
def test_clone_modules_on_torchvision_models(tmp_path):
    """Random-init resnet18 (target) and mobilenet_v3_small (source, with preprocessing
    through a GraphNet) on the colour digits; the package rebuilds on a zoo that imports
    the same weights with ``add_checkpoint``."""
    from pnc_net.data import load_rgb_digits
    from pnc_net.graphnet import GraphNet
    from pnc_net.rebuild import verify

    torch.manual_seed(0)
    shape, mean, std = (3, 32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    r18 = randomize_batchnorm(torchvision.models.resnet18(num_classes=5), 0).eval()
    mb = randomize_batchnorm(torchvision.models.mobilenet_v3_small(num_classes=5), 1).eval()
    before = state_digest(r18), state_digest(mb)
    data = load_rgb_digits()
    result = clone_modules(
        r18, GraphNet(mb, shape, mean=mean, std=std), data, classes=("5", "6"),
        target_labels=OLD, source_labels=NEW, name="five_six",
        config={**TINY, "positions": ((8, 10),)},
        target_arch="torchvision:resnet18", source_arch="torchvision:mobilenet_v3_small")
    assert (state_digest(r18), state_digest(mb)) == before
    sb = result.superbody
    assert sb.branch_names == ("five_six",) and sb.label_names == (*OLD, "5", "6")
    labels = sb.label_names
    xb = data.x_test[:4]
    with torch.no_grad():
        assert torch.equal(sb.detach()(xb), r18(xb))
    torch.save(r18.state_dict(), tmp_path / "r18.pth")
    torch.save(mb.state_dict(), tmp_path / "mb.pth")
    zoo = Zoo(tmp_path / "zoo")
    zoo.add_checkpoint(tmp_path / "r18.pth", "torchvision:resnet18", OLD, shape, name="r18")
    zoo.add_checkpoint(tmp_path / "mb.pth", "torchvision:mobilenet_v3_small", NEW, shape,
                       mean=mean, std=std, name="mb")
    rebuilt, err = verify(zoo, result.package)
    assert err <= 1e-4 and rebuilt.label_names == labels

