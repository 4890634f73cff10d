"""The real ``pnc`` console script in a subprocess, against the session zoo.

Every user mistake must end with ONE line on stderr, no traceback, and a
non-zero exit code (the code of its ``PncError`` class).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from pnc_net import wire
from pnc_net.fsutil import sha256_file

_BIN = Path(sys.executable).parent / "pnc"
PNC = [str(_BIN)] if _BIN.exists() else [sys.executable, "-c", "import pnc_cli; pnc_cli.main()"]
METRIC_KEYS = ("acc_old", "acc_new", "acc_all", "locality", "target_acc_old", "source_acc_new")
DEFAULT_NAMES = ("mnist-cnn-0to4", "mnist-cnn-5to9", "mnist-resnet-0to4", "mnist-resnet-5to9")


def pnc(*args: str, zoo: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PNC_ZOO": str(zoo), "COLUMNS": "100",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    return subprocess.run([*PNC, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)


def assert_user_error(res: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    """One line on stderr naming the problem, no traceback, the error's exit code."""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in res.stderr, res.stderr
    assert len(lines) == 1, f"expected one stderr line, got:\n{res.stderr}"
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert res.returncode == code, (res.returncode, lines[0])
    assert res.stdout == ""
    return lines[0]


@pytest.fixture()
def zoo_copy(zoo_dir, tmp_path) -> Path:
    root = tmp_path / "zoo"
    shutil.copytree(zoo_dir, root)
    return root


@pytest.fixture(scope="module")
def package_file(default_clone, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pkg") / "default.pnc"
    wire.write_package(path, default_clone.package)
    return path


# ----------------------------------------------------------------------------- zoo


def test_zoo_list_json_returns_manifests(zoo_dir):
    res = pnc("zoo", "list", "--json", zoo=zoo_dir)
    assert res.returncode == 0, res.stderr
    manifests = json.loads(res.stdout)
    assert isinstance(manifests, list)
    by_name = {m["name"]: m for m in manifests}
    for name in DEFAULT_NAMES:
        m = by_name[name]
        for key in ("sha256", "size_bytes", "arch", "arch_args", "input_shape", "label_names",
                    "dataset", "recipe", "test_accuracy"):
            assert key in m, key
        path = zoo_dir / "models" / f"{m['sha256']}.safetensors"
        assert sha256_file(path) == m["sha256"]
        assert path.stat().st_size == m["size_bytes"]


def test_zoo_list_human_and_empty(zoo_dir, tmp_path):
    res = pnc("zoo", "list", zoo=zoo_dir)
    assert res.returncode == 0 and "mnist-cnn-0to4" in res.stdout
    res = pnc("zoo", "list", "--zoo", str(tmp_path / "empty"), zoo=zoo_dir)
    assert res.returncode == 0 and "is empty" in res.stdout


def test_zoo_verify_ok_then_corrupt(zoo_dir, zoo_copy):
    res = pnc("zoo", "verify", "--json", zoo=zoo_dir)
    assert res.returncode == 0, res.stderr
    assert all(entry["ok"] for entry in json.loads(res.stdout))
    manifest = next(m for m in json.loads(pnc("zoo", "list", "--json", zoo=zoo_copy).stdout)
                    if m["name"] == "mnist-cnn-5to9")
    path = zoo_copy / "models" / f"{manifest['sha256']}.safetensors"
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x55
    path.write_bytes(bytes(data))
    res = pnc("zoo", "verify", zoo=zoo_copy)
    assert res.returncode == 4
    fail = [ln for ln in res.stdout.splitlines() if ln.startswith("FAIL")]
    assert len(fail) == 1 and "mnist-cnn-5to9" in fail[0] and manifest["sha256"] in fail[0]
    assert "Traceback" not in res.stderr


# ----------------------------------------------------------------------------- clone: user mistakes

CLONE = ("clone", "--target", "mnist-cnn-0to4", "--source", "mnist-cnn-5to9")
BAD_NPZ = "{bad_npz}"  # replaced by a malformed .npz the fixture writes

# case -> (arguments, exit code, fragments the one error line must hold)
CLONE_MISTAKES = {
    "unknown model id": (
        ("clone", "--target", "mnist-cnn-0to5", "--source", "mnist-cnn-5to9", "--classes", "5,6"),
        3, ("'mnist-cnn-0to5' is not in the zoo", "did you mean", "'mnist-cnn-0to4'")),
    "unknown sha prefix": (
        ("clone", "--target", "0000000000ab", "--source", "mnist-cnn-5to9", "--classes", "5,6"),
        3, ("'0000000000ab' is not in the zoo",)),
    "classes not in the source": (
        (*CLONE, "--classes", "5,x"), 2, ("['x']", "not in source mnist-cnn-5to9")),
    "classes the target has": (
        (*CLONE, "--classes", "3,5"), 2, ("already predicted by target mnist-cnn-0to4",)),
    "empty classes": ((*CLONE, "--classes", ","), 2, ("names no class",)),
    "one --classes per --source": (
        (*CLONE, "--classes", "5", "--classes", "6"), 2, ("one --classes per --source",)),
    "dtype bogus": ((*CLONE, "--classes", "5,6", "--dtype", "bogus"), 2,
                    ("--dtype 'bogus'", "fp16")),
    "gate bogus": ((*CLONE, "--classes", "5,6", "--gate", "knn"), 2,
                   ("unknown gate 'knn'", "auto, mlp, lda")),
    "gate taps bogus": ((*CLONE, "--classes", "5,6", "--gate-taps", "late"), 2,
                        ("unknown gate taps 'late'", "none, early, all")),
    "augment bogus": ((*CLONE, "--classes", "5,6", "--augment", "affine,flip"), 2,
                      ("unknown augmentation 'affine,flip'", "affine, permute, invert")),
    "joint rounds out of range": ((*CLONE, "--classes", "5,6", "--joint-rounds", "11"), 2,
                                  ("joint_rounds 11 must be in 0..10",)),
    "positions not R:S": ((*CLONE, "--classes", "5,6", "--positions", "3-3"), 2,
                          ("'3-3' is not R:S",)),
    "positions not numbers": ((*CLONE, "--classes", "5,6", "--positions", "3:x"), 2,
                              ("'3:x' is not R:S",)),
    "positions too deep": ((*CLONE, "--classes", "5,6", "--positions", "9:9"), 2,
                           ("position 9:9 is out of range",)),
    "positions at the input": ((*CLONE, "--classes", "5,6", "--positions", "0:2"), 2,
                               ("position 0:2 is out of range",)),
    "per-class zero": ((*CLONE, "--classes", "5,6", "--per-class", "0"), 2,
                       ("--per-class must be at least 1",)),
    "malformed data file": ((*CLONE, "--classes", "5,6", "--data", BAD_NPZ), 2,
                            ("y_train", "3 labels but the images have 4")),
}


@pytest.fixture(scope="module")
def clone_mistakes(zoo_dir, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every case of ``CLONE_MISTAKES`` run once, two at a time (each is mostly the
    interpreter importing torch, so this halves the wall time on 2 cores)."""
    bad = tmp_path_factory.mktemp("bad") / "bad.npz"
    np.savez(bad, x_train=np.zeros((4, 28, 28), np.uint8), y_train=np.zeros(3, np.int64),
             x_test=np.zeros((2, 28, 28), np.uint8), y_test=np.zeros(2, np.int64))
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {case: pool.submit(pnc, *(str(bad) if a == BAD_NPZ else a for a in args),
                                     zoo=zoo_dir)
                   for case, (args, _, _) in CLONE_MISTAKES.items()}
        return {case: f.result() for case, f in futures.items()}


@pytest.mark.parametrize("case", list(CLONE_MISTAKES))
def test_clone_user_mistake(clone_mistakes, case):
    _, code, fragments = CLONE_MISTAKES[case]
    assert_user_error(clone_mistakes[case], code, *fragments)


def _rgb_npz(path: Path) -> Path:
    """A tiny 3-channel 32x32 data set: bright red squares vs bright blue squares."""
    rng = np.random.default_rng(0)

    def make(n):
        x = (rng.random((n, 3, 32, 32)) * 60).astype(np.uint8)
        y = np.arange(n) % 2
        for i, label in enumerate(y):
            r, c = rng.integers(0, 20, size=2)
            x[i, 0 if label == 0 else 2, r:r + 12, c:c + 12] = 250
        return x, y

    x_train, y_train = make(48)
    x_test, y_test = make(16)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
             label_names=np.array(["red", "blue"]))
    return path


@pytest.mark.slow
def test_target_and_source_with_different_input_shapes(zoo_copy, tmp_path):
    data = _rgb_npz(tmp_path / "rgb.npz")
    res = pnc("zoo", "train", "--data", str(data), "--classes", "red,blue", "--arch", "cnn",
              "--name", "rgb-cnn", "--epochs", "1", "--json", zoo=zoo_copy)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["name"] == "rgb-cnn" and len(info["sha256"]) == 64
    res = pnc("clone", "--target", "mnist-cnn-0to4", "--source", "rgb-cnn", "--classes", "red",
              zoo=zoo_copy)
    assert_user_error(res, 6, "rgb-cnn", "(3, 32, 32)", "(1, 28, 28)")
    # The other way round: the target does not fit the (default MNIST) cloning data.
    res = pnc("clone", "--target", "rgb-cnn", "--source", "mnist-cnn-5to9", "--classes", "5",
              zoo=zoo_copy)
    assert_user_error(res, 6, "rgb-cnn", "(3, 32, 32)")


def test_zoo_train_user_mistakes(zoo_copy, tmp_path):
    data = _rgb_npz(tmp_path / "rgb.npz")
    res = pnc("zoo", "train", "--data", str(data), "--classes", "red,green", zoo=zoo_copy)
    assert_user_error(res, 2, "'green' is not in dataset 'rgb'")
    res = pnc("zoo", "train", "--data", str(data), "--classes", "red,blue", "--arch", "mlp",
              zoo=zoo_copy)
    assert_user_error(res, 2, "unknown architecture 'mlp'")
    res = pnc("zoo", "train", "--data", str(tmp_path / "none.npz"), "--classes", "a,b",
              zoo=zoo_copy)
    assert_user_error(res, 3, "does not exist")


# ----------------------------------------------------------------------------- eval / inspect


@pytest.mark.slow
def test_eval_json_has_every_metric_and_detach_exact(zoo_dir, package_file, default_clone):
    res = pnc("eval", str(package_file), "--json", zoo=zoo_dir)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    for key in (*METRIC_KEYS, "package", "package_bytes", "superbody_bytes", "position",
                "detach_exact", "fingerprint_error", "seconds"):
        assert key in info, key
    assert info["detach_exact"] is True
    assert info["package_bytes"] == package_file.stat().st_size
    assert info["position"] == [default_clone.package.modules[0].position_r,
                                default_clone.package.modules[0].position_s]
    assert info["fingerprint_error"] <= default_clone.package.fingerprint.tolerance
    reported = default_clone.report["metrics"]
    for key in METRIC_KEYS:
        assert 0.0 <= info[key] <= 1.0, key
        # fp16 adapter/gate on the wire: the rebuilt superbody is very nearly the same.
        assert info[key] == pytest.approx(reported[key], abs=0.02), key
    assert info["package_bytes"] < 0.05 * info["superbody_bytes"]


@pytest.mark.slow
def test_inspect_json(zoo_dir, package_file, default_clone):
    res = pnc("inspect", str(package_file), "--json", zoo=zoo_dir)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    pkg = default_clone.package
    assert info["target"]["sha256"] == pkg.target.sha256
    assert info["target"]["name"] == "mnist-cnn-0to4"
    assert info["label_names"] == list(pkg.label_names)
    assert info["package_bytes"] == package_file.stat().st_size
    assert info["package_id"] == sha256_file(package_file)
    (module,) = info["modules"]
    assert module["source"]["sha256"] == pkg.modules[0].source.sha256
    assert module["cloned_classes"] == list(pkg.modules[0].cloned_classes)
    assert {k: tuple(v) for k, v in module["kept_filters"].items()} == \
        pkg.modules[0].kept_filters()
    assert {k: tuple(v) for k, v in module["tensors"].items()} == \
        {k: tuple(v.shape) for k, v in pkg.modules[0].tensors.items()}
    res = pnc("inspect", str(package_file), zoo=zoo_dir)
    assert res.returncode == 0 and "mnist-cnn-5to9" in res.stdout


DAMAGES = ("flip", "truncate", "garbage", "empty")


def _damaged(data: bytes, damage: str) -> bytes:
    if damage == "flip":
        out = bytearray(data)
        out[len(out) // 2] ^= 0xFF
        return bytes(out)
    if damage == "truncate":
        return data[: len(data) // 2]
    if damage == "garbage":
        return np.random.default_rng(0).bytes(2048)
    return b""


@pytest.fixture(scope="module")
def damaged_runs(zoo_dir, package_file, tmp_path_factory) -> dict:
    """``pnc eval`` and ``pnc inspect`` on each damaged copy of a real package, two at a time."""
    folder = tmp_path_factory.mktemp("damaged")
    jobs = {}
    for damage in DAMAGES:
        path = folder / f"{damage}.pnc"
        path.write_bytes(_damaged(package_file.read_bytes(), damage))
        for command in ("eval", "inspect"):
            jobs[(command, damage)] = (command, str(path))
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {k: pool.submit(pnc, *args, zoo=zoo_dir) for k, args in jobs.items()}
        return {k: f.result() for k, f in futures.items()}


@pytest.mark.slow
@pytest.mark.parametrize("command", ["eval", "inspect"])
@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_package(damaged_runs, command, damage):
    assert_user_error(damaged_runs[(command, damage)], 2, "package")


@pytest.mark.parametrize("command", ["eval", "inspect"])
def test_missing_package(zoo_dir, tmp_path, command):
    res = pnc(command, str(tmp_path / "nope.pnc"), zoo=zoo_dir)
    assert_user_error(res, 3, "nope.pnc", "does not exist")


@pytest.mark.slow
def test_eval_with_a_zoo_that_lacks_the_models(package_file, tmp_path):
    res = pnc("eval", str(package_file), "--zoo", str(tmp_path / "empty"), zoo=tmp_path)
    assert_user_error(res, 5, "mnist-cnn-0to4", "is not in the zoo")


@pytest.mark.slow
def test_eval_with_a_corrupt_zoo_model(package_file, zoo_copy, default_clone):
    sha = default_clone.package.target.sha256
    path = zoo_copy / "models" / f"{sha}.safetensors"
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    res = pnc("eval", str(package_file), zoo=zoo_copy)
    assert_user_error(res, 4, sha, sha256_file(path))


def test_unwritable_zoo_is_one_line(zoo_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    data = _rgb_npz(tmp_path / "rgb.npz")
    res = pnc("zoo", "train", "--data", str(data), "--classes", "red,blue", "--epochs", "1",
              "--zoo", str(blocker / "zoo"), "--json", zoo=zoo_dir)
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in res.stderr and len(lines) == 1, res.stderr
    assert "a-file" in lines[0]


@pytest.mark.slow
def test_eval_with_data_of_another_shape(zoo_dir, package_file, tmp_path):
    data = _rgb_npz(tmp_path / "rgb.npz")
    res = pnc("eval", str(package_file), "--data", str(data), zoo=zoo_dir)
    assert_user_error(res, 6, "(3, 32, 32)", "(1, 28, 28)")


@pytest.mark.slow
def test_eval_with_data_lacking_the_labels(zoo_dir, package_file, tmp_path):
    path = tmp_path / "few.npz"
    x = np.zeros((6, 28, 28), np.uint8)
    y = np.arange(6) % 2
    np.savez(path, x_train=x, y_train=y, x_test=x, y_test=y, label_names=np.array(["0", "1"]))
    res = pnc("eval", str(package_file), "--data", str(path), zoo=zoo_dir)
    assert_user_error(res, 6, "lacks the package's label(s)", "'5'")
