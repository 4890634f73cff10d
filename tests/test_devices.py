"""``--device`` / ``--precision``: parsing, resolution, errors, and the CPU path unchanged.

This machine has no GPU, so the CUDA branches are exercised through a patched
``torch.cuda`` (resolution only) and the rest checks what must hold on CPU: nothing
moves, nothing is patched process-wide, and a CPU package is bit-identical with or
without the flag. ``scripts/gpu_check.sh`` runs the GPU side on a GPU machine.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEFAULT_CLONE_THREADS
from ray_fixtures import ray_cluster  # noqa: F401 - the shared session cluster

from pnc_net import wire
from pnc_net.devices import (
    CPU,
    Compute,
    check_precision,
    gpu_ids_device,
    on_device,
    parse_device,
    resolve_device,
)
from pnc_net.errors import InvalidInputError
from pnc_net.training import torch_threads

_BIN = Path(sys.executable).parent / "pnc"
PNC = [str(_BIN)] if _BIN.exists() else [sys.executable, "-c", "import pnc_cli; pnc_cli.main()"]


def fake_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize("spec, want", [("cpu", "cpu"), (" CPU ", "cpu"), ("auto", "auto"),
                                        ("cuda", "cuda"), ("CUDA:1", "cuda:1")])
def test_parse_device_normalises_known_devices(spec, want):
    assert parse_device(spec) == want


@pytest.mark.parametrize("spec", ["", "gpu", "tpu", "cuda:", "cuda:x", "cuda:-1", "mps", "cpu:0"])
def test_parse_device_refuses_anything_else_in_one_line(spec):
    with pytest.raises(InvalidInputError, match="is not a device; use auto, cpu, cuda") as err:
        parse_device(spec)
    assert "\n" not in str(err.value)


def test_resolution_without_a_gpu(monkeypatch):
    fake_gpus(monkeypatch, 0)
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu") == "cpu"
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(InvalidInputError, match="no CUDA GPU is visible"):
            resolve_device(spec)


def test_resolution_with_two_gpus(monkeypatch):
    fake_gpus(monkeypatch, 2)
    assert resolve_device("auto") == "cuda:0"
    assert resolve_device("cuda") == "cuda:0"
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(InvalidInputError, match=r"sees 2 GPU\(s\), cuda:0..cuda:1"):
        resolve_device("cuda:2")


def test_precision_is_checked_against_the_device():
    assert check_precision("fp32", "cpu") == "fp32"
    assert check_precision("bf16", "cuda:0") == "bf16"
    with pytest.raises(InvalidInputError, match="bf16 needs a CUDA device"):
        check_precision("bf16", "cpu")
    with pytest.raises(InvalidInputError, match="is not one of fp32, bf16"):
        check_precision("fp16", "cuda:0")


def test_the_cpu_path_moves_and_copies_nothing():
    t = torch.ones(3)
    model = torch.nn.Linear(2, 2)
    assert Compute.of("cpu") == CPU
    assert CPU.put(t) is t  # no copy: CPU results are what they were before devices
    assert on_device(model, CPU) is model
    assert on_device(model, None) is model
    with CPU.autocast():
        assert not torch.is_autocast_enabled()


def test_ray_actor_device_comes_from_its_gpu_ids(monkeypatch):
    monkeypatch.delenv("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_ids_device([]) == "cpu"
    assert gpu_ids_device([3]) == "cuda:0"  # Ray narrows CUDA_VISIBLE_DEVICES to the actor's
    assert gpu_ids_device(["3"]) == "cuda:0"
    monkeypatch.setenv("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", "1")
    assert gpu_ids_device([3]) == "cuda:3"


def test_actor_device_asks_ray_for_the_actors_gpus(monkeypatch):
    ray = pytest.importorskip("ray")
    from pnc_net import cluster

    assert cluster.actor_device() in ("cpu", "cuda:0")  # outside an actor: no GPUs of its own
    monkeypatch.delenv("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [0])
    assert cluster.actor_device() == "cuda:0"
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    assert cluster.actor_device() == "cpu"


def test_a_clone_worker_sets_no_process_wide_defaults():
    from pnc_net.cluster import CloneWorker

    generator = torch.Generator
    worker = CloneWorker(torch_threads=torch.get_num_threads())
    assert worker.device == "cpu"
    assert torch.get_default_device() == torch.device("cpu")
    assert torch.Generator is generator  # not patched
    assert torch.Generator().device == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInputError, match="no CUDA GPU"):
            CloneWorker(device="cuda")
        assert torch.get_default_device() == torch.device("cpu")


@pytest.mark.slow
def test_a_ray_cpu_actor_runs_on_the_cpu_with_no_default_device(ray_cluster):  # noqa: F811
    from pnc_net.cluster import ClusterConfig, RayRunner

    runner = RayRunner(ClusterConfig(num_workers=1, use_gpu=False))
    try:
        (info,) = runner.worker_info()
    finally:
        runner.close()
    assert info["device"] == "cpu" and info["default_device"] == "cpu"
    assert "cuda_max_allocated" not in info


def test_clone_config_checks_the_device_spelling_only():
    from pnc_net.cloning import CloneConfig

    cfg = CloneConfig.single("t", "s", ("5",), device="CUDA:0")
    assert cfg.device == "cuda:0"  # resolved against the GPUs when planned, not here
    with pytest.raises(InvalidInputError, match="is not a device"):
        CloneConfig.single("t", "s", ("5",), device="gpu")
    with pytest.raises(InvalidInputError, match="--precision"):
        CloneConfig.single("t", "s", ("5",), precision="fp8")


def test_planning_on_a_missing_gpu_fails_before_any_work(zoo, mnist, monkeypatch):
    from pnc_net.cloning import CloneConfig, plan

    fake_gpus(monkeypatch, 0)
    loads = []
    monkeypatch.setattr(type(zoo), "load", lambda self, ref: loads.append(ref))
    with pytest.raises(InvalidInputError, match="no CUDA GPU"):
        plan(zoo, mnist, CloneConfig.single("mnist-cnn-0to4", "mnist-cnn-5to9", ("5",),
                                            device="cuda"))
    assert loads == []


def test_a_cpu_clone_is_the_same_package_with_or_without_the_flag(default_clone, zoo, mnist):
    from pnc_net.cloning import clone

    cfg = default_clone_config()
    assert cfg.device == "cpu"
    with torch_threads(DEFAULT_CLONE_THREADS):  # bit for bit needs the fixture's thread count
        again = clone(zoo, mnist, dataclasses.replace(cfg, device="cpu")).package
    first = default_clone.package
    again.created_unix_s = first.created_unix_s
    again.report = {**again.report, "seconds": first.report["seconds"]}
    assert "device" not in again.report["settings"]  # the report of a CPU run is unchanged
    assert torch.equal(again.fingerprint.probabilities, first.fingerprint.probabilities)
    assert wire.encode(again, "fp32") == wire.encode(first, "fp32")


def default_clone_config():
    """The config the shared ``default_clone`` fixture ran (conftest.py)."""
    from pnc_net.cloning import CloneConfig

    return CloneConfig.single("mnist-cnn-0to4", "mnist-cnn-5to9", ("5", "6"), per_class=40,
                              target_per_class=10, positions=((3, 3),))


def run_pnc(*args: str, zoo: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PNC_ZOO": str(zoo), "COLUMNS": "100", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([*PNC, *args], capture_output=True, text=True, env=env, timeout=120,
                          check=False)


def assert_one_line_error(res: subprocess.CompletedProcess, *fragments: str) -> None:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in res.stderr, res.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert res.returncode == 2 and res.stdout == ""


def test_cli_refuses_a_missing_gpu_and_a_bad_device_writing_nothing(zoo_dir, tmp_path):
    out = tmp_path / "p.pnc"
    clone = ("clone", "--target", "mnist-cnn-0to4", "--source", "mnist-cnn-5to9",
             "--classes", "5", "--out", str(out))
    assert_one_line_error(run_pnc(*clone, "--device", "cuda", zoo=zoo_dir), "no CUDA GPU")
    assert_one_line_error(run_pnc(*clone, "--device", "gpu", zoo=zoo_dir), "is not a device")
    assert_one_line_error(run_pnc(*clone, "--precision", "bf16", zoo=zoo_dir),
                          "bf16 needs a CUDA device")
    assert not out.exists()
    data = tmp_path / "none.npz"
    assert_one_line_error(run_pnc("zoo", "train", "--data", str(data), "--classes", "0,1",
                                  "--device", "cuda:1", "--zoo", str(tmp_path / "zoo"),
                                  zoo=zoo_dir), "no CUDA GPU")
    assert not (tmp_path / "zoo").exists()


def test_receiver_refuses_a_missing_gpu(tmp_path, monkeypatch):
    from receiver.config import ReceiverConfig

    fake_gpus(monkeypatch, 0)
    args = ["--zoo", str(tmp_path / "zoo"), "--store", str(tmp_path / "store")]
    assert ReceiverConfig.load([*args, "--device", "auto"]).device == "cpu"
    with pytest.raises(InvalidInputError, match="no CUDA GPU"):
        ReceiverConfig.load([*args, "--device", "cuda"])


# A second name for the CPU ("cpu:0") takes every branch a GPU takes (private copies,
# moves, results brought back) with the CPU's arithmetic, so the device path must give
# exactly the CPU's answer: what is checked here stands in for a GPU this machine lacks.
OTHER = Compute("cpu:0")


@pytest.mark.slow
def test_the_device_path_gives_the_cpu_package(default_clone, zoo, mnist, monkeypatch):
    from pnc_net.cloning import clone
    from pnc_net.zoo import state_digest

    models = [zoo.load(n)[0] for n in ("mnist-cnn-0to4", "mnist-cnn-5to9")]
    digests = [state_digest(m) for m in models]
    monkeypatch.setattr(Compute, "of", classmethod(lambda cls, device="cpu", precision="fp32":
                                                   OTHER))
    with torch_threads(DEFAULT_CLONE_THREADS):
        result = clone(zoo, mnist, default_clone_config())
    first = default_clone.package
    assert torch.equal(result.package.fingerprint.probabilities, first.fingerprint.probabilities)
    for a, b in zip(result.package.modules, first.modules):
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in b.tensors)
        assert all(torch.equal(a.masks[k], b.masks[k]) for k in b.masks)
    assert result.report["metrics"] == default_clone.report["metrics"]
    assert [state_digest(m) for m in models] == digests  # zoo models copied, never written
    assert all(p.device.type == "cpu" for p in result.superbody.parameters())


def test_repair_on_the_device_path_copies_back_only_adapters_and_gates(default_clone, zoo,
                                                                       mnist):
    from lossy import damaged

    from pnc_net.rebuild import build_superbody, load_ref
    from pnc_net.serve.repair import RepairConfig, repair

    pkg = damaged(default_clone.package, zoo, seed=1)
    _, _, shape = load_ref(zoo, pkg.target)
    results, states = [], []
    for compute in (CPU, OTHER):
        sb = build_superbody(zoo, pkg)
        names = list(sb.label_names)
        keep = [i for i, c in enumerate(mnist.y_train.tolist()) if mnist.label_names[c] in names]
        y = torch.tensor([names.index(mnist.label_names[c]) for c in mnist.y_train[keep][::12]])
        results.append(repair(sb, pkg.fingerprint, shape, mnist.x_train[keep][::12], y,
                              RepairConfig(steps=8, batch=16), compute))
        states.append(sb.state_dict())
    assert results[1].error_after == results[0].error_after < results[1].error_before
    assert results[1].zoo_digests == results[0].zoo_digests
    assert all(torch.equal(v, states[1][k]) for k, v in states[0].items())
