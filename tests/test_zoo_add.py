"""``pnc zoo add`` / ``pnc zoo export``: ordinary checkpoints in and out of the zoo.

Every checkpoint here is written by the test from a random-init model (nothing is
downloaded). CLI tests run the real ``pnc`` console script in a subprocess, as
``tests/test_cli.py`` does; every mistake is one line on stderr, a non-zero exit
code, and a zoo folder left exactly as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file
from test_cli import assert_user_error  # one line on stderr, no traceback, the exit code

from pnc_net.checkpoints import read_checkpoint, tensors_digest
from pnc_net.errors import IncompatibleError, IntegrityError, InvalidInputError
from pnc_net.fsutil import sha256_file
from pnc_net.training import torch_threads
from pnc_net.zoo import Zoo, state_digest

_BIN = Path(sys.executable).parent / "pnc"
PNC = [str(_BIN)] if _BIN.exists() else [sys.executable, "-c", "import pnc_cli; pnc_cli.main()"]
R18 = ("--arch", "torchvision:resnet18", "--labels", "a,b,c", "--input", "3x32x32")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: the test machine's cores are shared."""
    with torch_threads(1):
        yield


def pnc(*args: str | Path, zoo: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PNC_ZOO": str(zoo), "COLUMNS": "100", "OMP_NUM_THREADS": "1",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    return subprocess.run([*PNC, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)


def ok_json(res: subprocess.CompletedProcess) -> dict:
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def listing(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden temp files included) with its sha256."""
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints as users have them: a torchvision resnet18 .pth (3 classes), a copy of
    it cut in half, one with pickled code, and plain text named .pth."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    out = {"r18": root / "resnet18-3.pth", "cut": root / "cut.pth",
           "code": root / "code.pth", "text": root / "text.safetensors"}
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), out["r18"])
    data = out["r18"].read_bytes()
    out["cut"].write_bytes(data[: len(data) // 2])
    torch.save({"fc.weight": torch.zeros(3, 512), "hook": Exploit()}, out["code"])
    out["text"].write_text("not a checkpoint\n" * 10)
    return out


class Exploit:
    """What a malicious checkpoint carries: unpickling it would call ``os.system``."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


# ----------------------------------------------------------------------------- identity


def test_same_file_gives_the_same_id_on_two_zoos(files, tmp_path):
    one = ok_json(pnc("zoo", "add", *R18, "--weights", files["r18"], "--json", zoo=tmp_path / "a"))
    two = ok_json(pnc("zoo", "add", *R18, "--weights", files["r18"], "--json", zoo=tmp_path / "b"))
    assert one["id"] == two["id"] == one["sha256"]
    assert len(one["id"]) == 64 and int(one["id"], 16) >= 0
    assert one["tensors_sha256"] == two["tensors_sha256"]
    assert one["added"] and two["added"]
    # the published file's digest, and the canonical digest of its tensors
    assert one["origin"] == {"file": files["r18"].name, "format": "pth",
                             "sha256": sha256_file(files["r18"]),
                             "size_bytes": files["r18"].stat().st_size}
    state = torch.load(files["r18"], weights_only=True)
    assert one["tensors_sha256"] == tensors_digest(state)
    # the manifest carries the preprocessing and what the model is
    assert one["input_shape"] == [3, 32, 32] and one["label_names"] == ["a", "b", "c"]
    assert one["arch"] == "torchvision:resnet18" and one["arch_args"] == {"num_classes": 3}
    assert one["mean"] is None and one["std"] is None
    stored = tmp_path / "a" / "models" / f"{one['id']}.safetensors"
    assert sha256_file(stored) == one["id"]
    assert stat.S_IMODE(stored.stat().st_mode) == 0o444

    # the same file again adds nothing, and says so
    again = ok_json(pnc("zoo", "add", *R18, "--weights", files["r18"], "--json",
                        zoo=tmp_path / "a"))
    assert again["id"] == one["id"] and not again["added"]
    assert len(list((tmp_path / "a" / "models").iterdir())) == 2


def test_imported_torchvision_model_loads_as_the_plain_module(files, tmp_path):
    zoo = Zoo(tmp_path / "z")
    m, _ = zoo.add_checkpoint(files["r18"], "torchvision:resnet18", ("a", "b", "c"), (3, 32, 32),
                              mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    model, manifest = zoo.load_module(m.name)
    assert type(model) is torchvision.models.ResNet and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert manifest.mean == (0.485, 0.456, 0.406) and manifest.std == (0.229, 0.224, 0.225)
    reference = torchvision.models.resnet18(num_classes=3).eval()
    reference.load_state_dict(torch.load(files["r18"], weights_only=True))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    # cloning sees it through a GraphNet: the same function, with the manifest's mean/std
    net, _ = zoo.load(m.name)
    mean = torch.tensor(manifest.mean).view(1, 3, 1, 1)
    std = torch.tensor(manifest.std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(net(x), reference((x - mean) / std), atol=1e-6)
    assert Zoo(zoo.root).verify() == [(manifest, None)]


def test_a_versioned_module_imports_from_safetensors(tmp_path):
    """MNASNet refuses a state_dict without ``_metadata`` ("version should be set");
    safetensors cannot carry it, so the import takes the architecture's own version."""
    torch.manual_seed(0)
    reference = torchvision.models.mnasnet0_5(num_classes=3).eval()
    file = tmp_path / "mnas.safetensors"
    save_file(reference.state_dict(), file)
    zoo = Zoo(tmp_path / "z")
    m, _ = zoo.add_checkpoint(file, "torchvision:mnasnet0_5", ("a", "b", "c"), (3, 32, 32))
    model, _ = Zoo(zoo.root).load_module(m.name)  # the stored safetensors blob, reloaded
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_cloning_across_input_shapes_is_refused_clearly(files, zoo_dir, mnist, tmp_path):
    from pnc_net.cloning import CloneConfig, clone

    root = tmp_path / "zoo"
    shutil.copytree(zoo_dir, root)
    zoo = Zoo(root)
    zoo.add_checkpoint(files["r18"], "torchvision:resnet18", ("x", "y", "z"), (3, 32, 32),
                       name="r18")
    for target, source, classes in (("r18", "mnist-cnn-5to9", ("5",)),
                                    ("mnist-cnn-0to4", "r18", ("x",))):
        cfg = CloneConfig.single(target, source, classes)
        with pytest.raises(IncompatibleError, match="takes inputs"):
            clone(zoo, mnist, cfg)


def test_export_then_add_round_trips_the_tensors(files, tmp_path):
    first = ok_json(pnc("zoo", "add", *R18, "--weights", files["r18"], "--name", "r18",
                        "--json", zoo=tmp_path / "a"))
    out = tmp_path / "r18.safetensors"
    exported = ok_json(pnc("zoo", "export", "r18", "--out", out, "--json", zoo=tmp_path / "a"))
    assert exported["id"] == first["id"] and exported["out"] == str(out)
    assert sha256_file(out) == first["id"]  # the stored file, byte for byte
    state = load_file(out)  # a plain state_dict
    torchvision.models.resnet18(num_classes=3).load_state_dict(state, strict=True)
    assert tensors_digest(state) == first["tensors_sha256"]

    back = ok_json(pnc("zoo", "add", *R18, "--weights", out, "--name", "r18", "--json",
                       zoo=tmp_path / "b"))
    assert back["tensors_sha256"] == first["tensors_sha256"]
    assert back["id"] == first["id"]  # .pth or .safetensors: the same weights, the same id
    assert back["origin"]["format"] == "safetensors"


def test_pnc_model_export_and_add_gives_back_its_id(zoo_dir, tmp_path):
    root = tmp_path / "zoo"
    shutil.copytree(zoo_dir, root)
    zoo = Zoo(root)
    before = listing(root)
    model, m = zoo.load("mnist-cnn-0to4")
    digest = state_digest(model)
    _, out = zoo.export("mnist-cnn-0to4", tmp_path / "cnn.safetensors")
    fresh = Zoo(tmp_path / "other")
    back, new = fresh.add_checkpoint(out, "cnn", m.label_names, m.input_shape,
                                     name="mnist-cnn-0to4")
    assert new and back.sha256 == m.sha256  # the same bytes as pnc's own file
    assert back.arch_args == m.arch_args
    assert back.tensors_sha256 == tensors_digest(load_file(out))
    again, _ = fresh.load("mnist-cnn-0to4")  # a pnc model imported is a ZooNet again
    assert state_digest(again) == digest
    # exporting and importing never touched the zoo's weights
    assert listing(root) == before
    assert state_digest(zoo.load("mnist-cnn-0to4")[0]) == digest


def test_timm_checkpoint_imports(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=2, pretrained=False)
    wrapped = tmp_path / "test_resnet.pth"  # as training scripts save it
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, wrapped)
    plain = tmp_path / "test_resnet.safetensors"
    save_file(model.state_dict(), plain)
    args = ("--arch", "timm:test_resnet", "--labels", "cat,dog", "--input", "3x32x32",
            "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--json")
    one = ok_json(pnc("zoo", "add", *args, "--weights", wrapped, zoo=tmp_path / "z"))
    assert one["added"] and one["origin"]["key"] == "state_dict"
    assert one["mean"] == [0.5] * 3 and one["std"] == [0.25] * 3
    assert one["tensors_sha256"] == tensors_digest(model.state_dict())
    two = ok_json(pnc("zoo", "add", *args, "--weights", plain, zoo=tmp_path / "z"))
    assert two["id"] == one["id"] and not two["added"]
    loaded, _ = Zoo(tmp_path / "z").load_module(one["id"])
    assert loaded.get_classifier().out_features == 2


# ----------------------------------------------------------------------------- mistakes


MISTAKES = {
    "wrong head size": (("--arch", "torchvision:resnet18", "--labels", "a,b", "--input",
                         "3x32x32"), "r18", 6, "head (fc) for 3 classes but --labels names 2"),
    "unknown arch": (("--arch", "torchvision:resnet81", "--labels", "a,b,c", "--input",
                      "3x32x32"), "r18", 2, "unknown architecture 'torchvision:resnet81'"),
    "pickled code": (R18, "code", 2, "contains pickled code ("),
    "truncated file": (R18, "cut", 2, "is not a readable .pth file (truncated or corrupt?)"),
    "not safetensors": (R18, "text", 2, "is not a readable .safetensors file"),
    "missing keys": (("--arch", "torchvision:resnet34", "--labels", "a,b,c", "--input",
                      "3x32x32"), "r18", 6, "does not fit torchvision:resnet34: 96 missing key"),
    "input does not fit": (("--arch", "torchvision:resnet18", "--labels", "a,b,c", "--input",
                            "1x32x32"), "r18", 6, "--input 1x32x32 does not fit"),
}


@pytest.mark.parametrize("case", list(MISTAKES))
def test_a_bad_import_is_one_line_and_adds_nothing(case, files, zoo_dir, tmp_path):
    args, file, code, fragment = MISTAKES[case]
    root = tmp_path / "zoo"
    shutil.copytree(zoo_dir, root)
    before = listing(root)
    res = pnc("zoo", "add", *args, "--weights", files[file], "--json", zoo=root)
    assert_user_error(res, code, fragment)
    assert listing(root) == before


def test_bad_imports_in_process_add_nothing(files, tmp_path):
    zoo = Zoo(tmp_path / "z")
    r18 = (files["r18"], "torchvision:resnet18", ("a", "b", "c"), (3, 32, 32))
    with pytest.raises(IntegrityError, match="is not the one published"):
        zoo.add_checkpoint(*r18, expect_sha256="00000000")
    with pytest.raises(InvalidInputError, match="--mean has 1 value"):
        zoo.add_checkpoint(*r18, mean=(0.5,))
    with pytest.raises(InvalidInputError, match="every std must be > 0"):
        zoo.add_checkpoint(*r18, std=(1.0, 0.0, 1.0))
    with pytest.raises(InvalidInputError, match="at least two distinct"):
        zoo.add_checkpoint(files["r18"], "torchvision:resnet18", ("a", "a", "b"), (3, 32, 32))
    with pytest.raises(InvalidInputError, match="may not set num_classes"):
        zoo.add_checkpoint(*r18, arch_args={"num_classes": 3})
    with pytest.raises(InvalidInputError, match="not .npz"):
        zoo.add_checkpoint(_touch(tmp_path / "x.npz"), *r18[1:])
    assert not zoo.root.exists() or not any(zoo.root.rglob("*.json"))

    m, new = zoo.add_checkpoint(*r18, expect_sha256=sha256_file(files["r18"])[:12])
    assert new
    with pytest.raises(InvalidInputError, match="already in the zoo as resnet18-3"):
        zoo.add_checkpoint(*r18[:2], ("x", "y", "z"), r18[3])
    assert zoo.resolve(m.sha256).label_names == ("a", "b", "c")


def _touch(path: Path) -> Path:
    path.write_bytes(b"\0")
    return path


def test_export_refuses_other_formats_and_unknown_models(zoo_dir, tmp_path):
    res = pnc("zoo", "export", "mnist-cnn-0to4", "--out", tmp_path / "x.pth", zoo=zoo_dir)
    assert_user_error(res, 2, "pnc exports .safetensors files")
    res = pnc("zoo", "export", "no-such-model", "--out", tmp_path / "x.safetensors", zoo=zoo_dir)
    assert_user_error(res, 3, "'no-such-model' is not in the zoo")
    assert not list(tmp_path.glob("x.*"))


# ----------------------------------------------------------------------------- reading and digests


def test_tensor_digest_ignores_container_order_and_sharing(tmp_path):
    a = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    state = {"w": a, "b": torch.ones(3, dtype=torch.float16), "n": torch.tensor(7)}
    shared = {"n": state["n"], "w": a.t().contiguous().t(), "b": state["b"]}
    assert tensors_digest(state) == tensors_digest(shared)
    assert tensors_digest(state) != tensors_digest({**state, "b": torch.ones(3)})  # dtype
    assert tensors_digest(state) != tensors_digest({**state, "w": a.reshape(3, 2)})  # shape
    assert tensors_digest(state) != tensors_digest({"v": a, "b": state["b"], "n": state["n"]})
    torch.save(state, tmp_path / "s.pth")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "dp.pth",
               _use_new_zipfile_serialization=False)
    save_file(state, tmp_path / "s.safetensors")
    digests = {tensors_digest(read_checkpoint(tmp_path / f).tensors)
               for f in ("s.pth", "dp.pth", "s.safetensors")}
    assert digests == {tensors_digest(state)}
    assert read_checkpoint(tmp_path / "dp.pth").origin["prefix"] == "module."


def test_a_checkpoint_that_is_not_a_state_dict_is_refused(tmp_path):
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pth")
    with pytest.raises(InvalidInputError, match=r"non-tensor values \(epoch, lr\)"):
        read_checkpoint(tmp_path / "meta.pth")
    torch.save(torch.ones(3), tmp_path / "tensor.pth")
    with pytest.raises(InvalidInputError, match="holds a Tensor, not a state_dict"):
        read_checkpoint(tmp_path / "tensor.pth")
