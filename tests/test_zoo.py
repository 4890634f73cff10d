"""The content-addressed zoo: identity by sha256, resolution, integrity, training on user data.

Corruption tests work on a copy of the session zoo in ``tmp_path``: the shared
fixture is never written.
"""

from __future__ import annotations

import json
import os
import shutil
import stat

import numpy as np
import pytest
import torch

from pnc_net.data import load_npz
from pnc_net.errors import IntegrityError, InvalidInputError, NotFoundError
from pnc_net.fsutil import sha256_file
from pnc_net.zoo import MIN_PREFIX, Manifest, Zoo, model_from_weights, state_digest
from pnc_net.zoo_train import DEFAULT_ZOO, ZooSpec, build_default_zoo, train_zoo_model

DEFAULT_NAMES = [s.name for s in DEFAULT_ZOO]


@pytest.fixture()
def zoo_copy(zoo_dir, tmp_path):
    """A private copy of the session zoo that a test may damage."""
    root = tmp_path / "zoo"
    shutil.copytree(zoo_dir, root)
    return Zoo(root)


def _corrupt(zoo: Zoo, name: str) -> Manifest:
    m = zoo.resolve(name)
    path = zoo.weights_path(m.sha256)
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of a tensor
    path.write_bytes(bytes(data))
    return m


# ----------------------------------------------------------------------------- content addressing


def test_default_zoo_has_the_stable_names(zoo):
    names = [m.name for m in zoo.manifests()]
    for name in DEFAULT_NAMES:
        assert name in names
    archs = {m.arch for m in zoo.manifests() if m.name in DEFAULT_NAMES}
    assert archs == {"cnn", "resnet"}


@pytest.mark.parametrize("name", DEFAULT_NAMES)
def test_weights_are_named_by_their_sha256(zoo, name):
    m = zoo.resolve(name)
    path = zoo.weights_path(m.sha256)
    assert path.name == f"{m.sha256}.safetensors"
    assert sha256_file(path) == m.sha256
    assert path.stat().st_size == m.size_bytes
    manifest_file = zoo.models_dir / f"{m.sha256}.json"
    assert Manifest.from_json(manifest_file.read_text()) == m
    raw = json.loads(manifest_file.read_text())
    for key in ("name", "arch", "arch_args", "input_shape", "label_names", "dataset", "sha256",
                "size_bytes", "recipe", "test_accuracy"):
        assert key in raw, key
    assert m.input_shape == (1, 28, 28) and m.dataset == "mnist"
    assert m.test_accuracy > 0.9
    assert m.num_params > 0


@pytest.mark.parametrize("name", DEFAULT_NAMES)
def test_weights_files_are_read_only(zoo, name):
    path = zoo.weights_path(zoo.resolve(name).sha256)
    assert path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) == 0


def test_load_gives_a_frozen_eval_model(zoo, mnist):
    model, manifest = zoo.load("mnist-cnn-0to4")
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.head.fc.out_features == len(manifest.label_names) == 5
    fresh = model_from_weights(manifest, zoo.weights_path(manifest.sha256).read_bytes())
    assert state_digest(fresh) == state_digest(model)


def test_build_default_zoo_is_idempotent(zoo_copy, mnist):
    before = {p.name: p.stat().st_mtime_ns for p in zoo_copy.models_dir.iterdir()}
    result = build_default_zoo(zoo_copy, mnist, progress=False)
    assert [m.name for m, _ in result] == DEFAULT_NAMES
    assert not any(new for _, new in result)
    assert {p.name: p.stat().st_mtime_ns for p in zoo_copy.models_dir.iterdir()} == before


def test_adding_the_same_weights_twice_keeps_one_file(zoo_copy):
    model, m = zoo_copy.load("mnist-cnn-0to4")
    fields = {k: getattr(m, k) for k in ("name", "arch", "arch_args", "input_shape",
                                         "label_names", "dataset", "recipe", "test_accuracy")}
    again = zoo_copy.add(model, fields)
    assert again.sha256 == m.sha256
    assert len(list(zoo_copy.models_dir.glob("*.safetensors"))) == len(DEFAULT_NAMES)


# ----------------------------------------------------------------------------- resolution


def test_resolve_by_name_sha_and_prefix(zoo):
    m = zoo.resolve("mnist-resnet-5to9")
    assert zoo.resolve(m.sha256) == m
    assert zoo.resolve(m.sha256.upper()) == m
    assert zoo.resolve(m.sha256[:MIN_PREFIX]) == m
    assert zoo.resolve(m.sha256[:20]) == m
    assert zoo.load(m.sha256[:12])[1] == m


def test_too_short_prefix_is_not_a_match(zoo):
    m = zoo.resolve("mnist-cnn-5to9")
    with pytest.raises(NotFoundError, match="not in the zoo"):
        zoo.resolve(m.sha256[: MIN_PREFIX - 1])


def test_ambiguous_prefix_names_the_candidates(zoo_copy):
    m = zoo_copy.resolve("mnist-cnn-0to4")
    # A second manifest whose digest shares the first 10 hex digits with a real one.
    twin_sha = m.sha256[:10] + ("0" if m.sha256[10] != "0" else "1") + m.sha256[11:]
    twin = Manifest.from_json(m.to_json().replace(m.sha256, twin_sha).replace(
        '"mnist-cnn-0to4"', '"twin-model"'))
    (zoo_copy.models_dir / f"{twin_sha}.json").write_text(twin.to_json())
    with pytest.raises(InvalidInputError, match="ambiguous") as info:
        zoo_copy.resolve(m.sha256[:8])
    assert "mnist-cnn-0to4" in str(info.value) and "twin-model" in str(info.value)
    assert zoo_copy.resolve(m.sha256[:11]) == m  # one more digit disambiguates
    assert zoo_copy.resolve(m.sha256) == m


def test_unknown_name_suggests_close_names(zoo):
    with pytest.raises(NotFoundError) as info:
        zoo.resolve("mnist-cnn-0to5")
    msg = str(info.value)
    assert "'mnist-cnn-0to5' is not in the zoo" in msg
    assert "did you mean" in msg and "'mnist-cnn-0to4'" in msg
    assert "\n" not in msg and not msg.startswith("'")  # no KeyError quoting


def test_unknown_name_without_close_match(zoo):
    with pytest.raises(NotFoundError) as info:
        zoo.resolve("imagenet-vit")
    assert "did you mean" not in str(info.value)
    assert "pnc zoo list" in str(info.value)


def test_empty_zoo_says_how_to_build(tmp_path):
    empty = Zoo(tmp_path / "nothing-here")
    assert empty.manifests() == []
    with pytest.raises(NotFoundError, match="is empty; run `pnc zoo build`"):
        empty.resolve("mnist-cnn-0to4")


def test_unreadable_manifest_is_an_integrity_error(zoo_copy):
    (zoo_copy.models_dir / ("f" * 64 + ".json")).write_text("{not json")
    with pytest.raises(IntegrityError, match="unreadable"):
        zoo_copy.manifests()


# ----------------------------------------------------------------------------- integrity


def test_corrupt_weights_name_both_digests(zoo_copy):
    m = _corrupt(zoo_copy, "mnist-cnn-5to9")
    actual = sha256_file(zoo_copy.weights_path(m.sha256))
    with pytest.raises(IntegrityError) as info:
        zoo_copy.load("mnist-cnn-5to9")
    msg = str(info.value)
    assert actual in msg and m.sha256 in msg and actual != m.sha256
    assert info.value.exit_code == 4


def test_missing_weights_file(zoo_copy):
    m = zoo_copy.resolve("mnist-resnet-0to4")
    zoo_copy.weights_path(m.sha256).unlink()
    with pytest.raises(NotFoundError, match="missing"):
        zoo_copy.load(m.name)


def test_verify_reports_each_problem(zoo, zoo_copy):
    assert all(problem is None for _, problem in zoo.verify())
    bad = _corrupt(zoo_copy, "mnist-cnn-5to9")
    gone = zoo_copy.resolve("mnist-resnet-0to4")
    zoo_copy.weights_path(gone.sha256).unlink()
    report = {m.name: problem for m, problem in zoo_copy.verify()}
    assert bad.sha256 in report["mnist-cnn-5to9"]
    assert "missing" in report["mnist-resnet-0to4"]
    assert report["mnist-cnn-0to4"] is None and report["mnist-resnet-5to9"] is None


def test_add_blob_refuses_wrong_digest_and_wrong_architecture(zoo, tmp_path):
    m = zoo.resolve("mnist-cnn-0to4")
    data = zoo.weights_path(m.sha256).read_bytes()
    other = Zoo(tmp_path / "peer")
    with pytest.raises(IntegrityError, match="manifest promises"):
        other.add_blob(m, data[:-1])
    # The right bytes under a manifest that claims another architecture.
    lying = Manifest.from_json(m.to_json().replace('"arch": "cnn"', '"arch": "resnet"'))
    with pytest.raises(InvalidInputError, match="do not fit architecture resnet"):
        other.add_blob(lying, data)
    assert not other.weights_path(m.sha256).exists()
    other.add_blob(m, data)
    assert other.load(m.sha256)[1] == m


# ----------------------------------------------------------------------------- training on user data


def _user_npz(mnist, path, classes=(1, 7, 3), per_class=120):
    """Real digits written as a user would: uint8 (N, H, W) with label names."""
    names = np.array(["one", "seven", "three"])

    def take(split, n):
        x, y = mnist.split(split)
        idx = torch.cat([torch.nonzero(y == c).flatten()[:n] for c in classes])
        remap = {c: i for i, c in enumerate(classes)}
        xs = (x[idx, 0] * 255).round().to(torch.uint8).numpy()
        return xs, np.array([remap[int(v)] for v in y[idx]], dtype=np.int64)

    x_train, y_train = take("train", per_class)
    x_test, y_test = take("test", 60)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
             label_names=names)
    return path


@pytest.mark.slow
def test_train_on_user_npz(mnist, tmp_path):
    data = load_npz(_user_npz(mnist, tmp_path / "digits.npz"))
    zoo = Zoo(tmp_path / "userzoo")
    m = train_zoo_model(zoo, data, ZooSpec("my-digits", "cnn", ("one", "seven", "three"),
                                           epochs=2), progress=False)
    assert m.dataset == "digits" and m.label_names == ("one", "seven", "three")
    assert m.input_shape == (1, 28, 28)
    assert m.recipe["epochs"] == 2 and m.recipe["train_samples"] == len(data.x_train)
    assert m.test_accuracy > 0.8  # three easy digits, far above chance (1/3)
    assert sha256_file(zoo.weights_path(m.sha256)) == m.sha256
    assert zoo.weights_path(m.sha256).stat().st_mode & 0o222 == 0
    model, again = zoo.load("my-digits")
    assert again == m and model.head.fc.out_features == 3


def test_zoo_spec_errors(mnist, tmp_path):
    zoo = Zoo(tmp_path / "z")
    with pytest.raises(InvalidInputError, match="at least two distinct classes"):
        train_zoo_model(zoo, mnist, ZooSpec("x", "cnn", ("1",)), progress=False)
    with pytest.raises(InvalidInputError, match="at least two distinct classes"):
        train_zoo_model(zoo, mnist, ZooSpec("x", "cnn", ("1", "1")), progress=False)
    with pytest.raises(InvalidInputError, match="'q' is not in dataset"):
        train_zoo_model(zoo, mnist, ZooSpec("x", "cnn", ("1", "q")), progress=False)
    with pytest.raises(InvalidInputError, match="unknown architecture"):
        train_zoo_model(zoo, mnist, ZooSpec("x", "mlp", ("1", "2")), progress=False)
    assert zoo.manifests() == []


# ----------------------------------------------------------------------------- cloning never writes


def _zoo_state(zoo: Zoo) -> dict[str, tuple]:
    """Per model: file digest, state digest of a fresh load, mtime and mode of the weights."""
    out = {}
    for m in zoo.manifests():
        path = zoo.weights_path(m.sha256)
        model = model_from_weights(m, path.read_bytes())
        st = path.stat()
        out[m.name] = (sha256_file(path), state_digest(model), st.st_mtime_ns, st.st_mode)
    return out


@pytest.mark.slow
def test_zoo_digests_unchanged_after_a_clone(request, zoo_dir):
    zoo = Zoo(zoo_dir)
    before = _zoo_state(zoo)  # before the shared clone, when this test is the first to need it
    result = request.getfixturevalue("default_clone")
    after = _zoo_state(zoo)
    assert after == before
    for name, (file_sha, _, _, mode) in after.items():
        assert file_sha == zoo.resolve(name).sha256
        assert mode & 0o222 == 0
    # The very target module the clone ran on (the zoo's cached instance) is bit-identical
    # to the model on disk.
    t = result.package.target
    assert state_digest(result.superbody.target) == before[t.name][1]
    # The branch's frozen source layers are exact slices of the source on disk.
    module = result.package.modules[0]
    source = model_from_weights(zoo.resolve(module.source.sha256),
                                zoo.weights_path(module.source.sha256).read_bytes())
    blocks, head, _ = source.pruned_tail(module.position_s, module.masks)
    branch = result.superbody.branches[0]
    assert state_digest(blocks) == state_digest(branch.blocks)
    assert state_digest(head) == state_digest(branch.head)
    assert len(list(zoo.models_dir.iterdir())) == 2 * len(before)  # nothing new in the zoo
