"""Cloning on a real local Ray cluster: same package as in process, a killed worker
does not fail the job, a bad batch task fails alone. Specs parse or fail clearly."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ray_fixtures import ray_cluster  # noqa: F401 - the shared session cluster

from pnc_cli.daemons import spawn_daemon
from pnc_net import wire
from pnc_net.cloning import CloneConfig, clone
from pnc_net.cluster import ClusterConfig, RayRunner, WorkerResources
from pnc_net.errors import InvalidInputError, NotFoundError, PncError, PreconditionError
from pnc_net.insert import InsertConfig
from pnc_net.jobs import BatchSpec, load_spec, parse_task, publish_sink, run_batch, store_sink
from pnc_net.localize import LocalizeConfig
from pnc_net.training import torch_threads

POSITIONS = ((2, 2), (3, 3), (3, 4), (4, 4))


def small_config(positions=POSITIONS) -> CloneConfig:
    """A real clone with budgets small enough for a test (seconds per candidate)."""
    return CloneConfig.single(
        "mnist-cnn-0to4", "mnist-cnn-5to9", ("5", "6"), per_class=20, target_per_class=5,
        positions=positions, localize=LocalizeConfig(refine_steps=15),
        insert=InsertConfig(epochs=2, gate_steps=80))


def encoded(result):
    return wire.decode(wire.encode(result.package, "fp32"))


def assert_same_package(a, b) -> None:
    assert [m.source.sha256 for m in a.modules] == [m.source.sha256 for m in b.modules]
    for ma, mb in zip(a.modules, b.modules):
        assert (ma.position_r, ma.position_s) == (mb.position_r, mb.position_s)
        assert ma.masks.keys() == mb.masks.keys()
        assert all(torch.equal(ma.masks[k], mb.masks[k]) for k in ma.masks)
        assert ma.tensors.keys() == mb.tensors.keys()
        assert all(torch.equal(ma.tensors[k], mb.tensors[k]) for k in ma.tensors)
    assert torch.equal(a.fingerprint.probabilities, b.fingerprint.probabilities)
    assert a.report["search"] == b.report["search"]


@pytest.fixture(scope="module")
def one_thread():
    """Ray workers run torch on 1 intra-op thread; the in-process reference must too."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def reference(zoo_dir, mnist, one_thread):
    from pnc_net.zoo import Zoo

    return clone(Zoo(zoo_dir), mnist, small_config())


@pytest.fixture(scope="module")
def runner(ray_cluster, one_thread):  # noqa: F811
    with RayRunner(ClusterConfig(num_workers=2)) as r:
        yield r


# ----------------------------------------------------------------------------- without Ray


@pytest.mark.parametrize("resources, cfg, expected", [
    ({"CPU": 2.0}, ClusterConfig(), (WorkerResources(1, 0), 2)),
    ({"CPU": 16.0, "GPU": 2.0}, ClusterConfig(), (WorkerResources(1, 1), 2)),
    ({"CPU": 16.0, "GPU": 2.0}, ClusterConfig(use_gpu=False), (WorkerResources(1, 0), 16)),
    ({"CPU": 8.0}, ClusterConfig(num_workers=3), (WorkerResources(1, 0), 3)),
])
def test_one_worker_per_gpu_else_per_cpu_slot(resources, cfg, expected):
    assert WorkerResources.for_cluster(cfg, resources) == expected


def test_asking_for_a_gpu_on_a_cpu_cluster_is_a_precondition_error():
    with pytest.raises(PreconditionError, match="no GPU"):
        WorkerResources.for_cluster(ClusterConfig(use_gpu=True), {"CPU": 2.0})


@pytest.mark.parametrize("kw", [{"num_workers": 0}, {"torch_threads": 0}, {"max_restarts": -1}])
def test_cluster_config_rejects_nonsense(kw):
    with pytest.raises(InvalidInputError):
        ClusterConfig(**kw)


@pytest.mark.parametrize("raw, match", [
    ({"source": "a", "classes": [5]}, "'target' is missing"),
    ({"target": "t"}, "give 'source' and 'classes'"),
    ({"target": "t", "source": "s", "classes": []}, "classes must be"),
    ({"target": "t", "source": "s", "classes": "5", "positions": "3-3"}, "is not R:S"),
    ({"target": "t", "source": "s", "classes": "5", "per_class": "many"}, "must be an integer"),
    ({"target": "t", "source": "s", "classes": "5", "colour": 1}, "unknown setting"),
    ({"target": "t", "source": "s", "classes": "5", "dtype": "fp64"}, "dtype"),
    ({"target": "t", "sources": [{"classes": "5"}]}, "needs 'source' and 'classes'"),
    ("just text", "expected a mapping"),
])
def test_a_malformed_task_says_what_is_wrong(raw, match):
    with pytest.raises(InvalidInputError, match=match):
        parse_task(raw, 0)


def test_spec_defaults_apply_and_bad_tasks_are_kept_as_errors(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"defaults": {"per_class": 7, "positions": "4:4"}, "tasks": [
        {"name": "a", "target": "t", "source": "s", "classes": "5,6"},
        {"name": "b", "target": "t"}]}))
    spec = load_spec(path)
    assert spec.names == ("a", "b")
    assert spec.tasks[0].config.per_class == 7 and spec.tasks[0].config.positions == ((4, 4),)
    assert spec.tasks[0].config.sources[0].classes == ("5", "6")
    assert isinstance(spec.tasks[1], InvalidInputError)


@pytest.mark.parametrize("text", ["", "{tasks: 3}", "[unclosed", "- 1\n- 2\n"])
def test_an_unusable_spec_file_is_an_error(tmp_path, text):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    if text == "- 1\n- 2\n":  # a list of non-tasks parses; each task is an error
        assert all(isinstance(t, InvalidInputError) for t in load_spec(path).tasks)
        return
    with pytest.raises(InvalidInputError):
        load_spec(path)


def test_a_missing_spec_file_is_not_found(tmp_path):
    with pytest.raises(NotFoundError):
        load_spec(tmp_path / "nope.yaml")


# ----------------------------------------------------------------------------- on Ray


@pytest.mark.ray
@pytest.mark.slow
def test_ray_clone_gives_the_in_process_package(runner, reference, zoo_dir, mnist):
    from pnc_net.jobs import clone_on_cluster
    from pnc_net.zoo import Zoo

    seen: list = []
    runner.on_result = lambda position, res: seen.append((position, res["score"]))
    try:
        result = clone_on_cluster(Zoo(zoo_dir), mnist, small_config(), runner)
    finally:
        runner.on_result = None
    assert_same_package(encoded(reference), encoded(result))
    scores = {tuple(s["position"]): s["score"] for s in result.report["search"][0]}
    assert sorted(seen) == sorted(scores.items())  # progress callback: every candidate once
    info = runner.worker_info()
    assert len({i["pid"] for i in info}) == 2 and all(i["threads"] == 1 for i in info)
    # each worker loaded the target and the source once, however many candidates it ran
    assert all(i["model_loads"] <= 2 for i in info) and sum(i["model_loads"] for i in info) >= 2


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_worker_does_not_fail_the_job(runner, reference, zoo_dir, mnist):
    from pnc_net.jobs import clone_on_cluster
    from pnc_net.zoo import Zoo

    victim = runner.worker_info()[0]["pid"]
    out: dict = {}

    def job():
        try:
            out["result"] = clone_on_cluster(Zoo(zoo_dir), mnist, small_config(), runner)
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            out["error"] = err

    before = runner.submitted
    thread = threading.Thread(target=job)
    thread.start()
    deadline = time.monotonic() + 300
    while runner.submitted < before + 2 and time.monotonic() < deadline:
        time.sleep(0.1)  # until both workers hold a candidate
    time.sleep(1.0)  # into the candidate's training (each takes seconds)
    os.kill(victim, signal.SIGKILL)  # a crash, not a polite ray.kill
    thread.join(timeout=600)
    assert "error" not in out, out.get("error")
    assert_same_package(encoded(reference), encoded(out["result"]))
    assert victim not in {i["pid"] for i in runner.worker_info()}  # it was restarted


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.grpc
def test_a_bad_task_fails_alone_and_good_ones_are_stored_and_published(runner, zoo, tmp_path):
    bad_data = tmp_path / "bad.npz"
    np.savez(bad_data, x_train=np.zeros((3, 5)))
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(
        "defaults: {per_class: 10, target_per_class: 5, positions: '4:4'}\n"
        "tasks:\n"
        "  - {name: unknown-model, target: mnist-cnn-0to4, source: nope, classes: [5]}\n"
        "  - {name: good, target: mnist-cnn-0to4, source: mnist-cnn-5to9, classes: [5, 6]}\n"
        f"  - {{name: bad-data, target: mnist-cnn-0to4, source: mnist-cnn-5to9, classes: [5],"
        f" data: '{bad_data}'}}\n"
        "  - {name: no-target}\n")
    spec: BatchSpec = load_spec(spec_path)
    sender_store = tmp_path / "sender-store"
    proc, port = spawn_daemon("sender", ["--listen", "127.0.0.1:0", "--store", str(sender_store)])
    try:
        to_store, to_sender = store_sink(tmp_path / "store"), publish_sink(f"127.0.0.1:{port}")
        records = run_batch(spec, zoo, runner, lambda data: {**to_store(data), **to_sender(data)})
    finally:
        proc.terminate()
        proc.wait(30)
    by_name = {r["task"]: r for r in records}
    assert [r["task"] for r in records] == ["unknown-model", "good", "bad-data", "no-target"]
    assert by_name["good"]["ok"], by_name["good"]
    assert "NotFoundError" in by_name["unknown-model"]["error"]
    assert "InvalidInputError" in by_name["bad-data"]["error"]
    assert "'target' is missing" in by_name["no-target"]["error"]
    stored = Path(by_name["good"]["stored"]).read_bytes()
    package = wire.decode(stored)
    assert wire.package_id(stored) == by_name["good"]["package_id"]
    assert package.label_names[-2:] == ("5", "6")
    assert by_name["good"]["published"] == f"127.0.0.1:{port}"
    published = sender_store / "packages" / f"{by_name['good']['package_id']}.pnc"
    assert published.read_bytes() == stored  # the sender holds the very same package
    assert len(list((sender_store / "packages").glob("*.pnc"))) == 1


def test_publishing_to_a_sender_that_is_not_there_fails_before_any_work():
    with pytest.raises(PncError):
        publish_sink("127.0.0.1:9")


@pytest.mark.ray
@pytest.mark.slow
def test_localization_of_several_sources_on_workers_matches_in_process(runner, zoo, mnist):
    from pnc_net.cloning import SourceSpec, localize_module, plan, prepare_module

    cfg = CloneConfig("mnist-cnn-0to4", (SourceSpec("mnist-cnn-5to9", ("5",)),
                                         SourceSpec("mnist-resnet-5to9", ("6",))),
                      per_class=10, target_per_class=5, positions=((4, 4),),
                      localize=LocalizeConfig(refine_steps=10))
    job = plan(zoo, mnist, cfg)
    remote = runner.localize_all(job)
    assert len(remote) == 2
    for i, (masks, prepared) in enumerate(remote):
        local_masks, local_prepared = localize_module(job, i), prepare_module(job, i)
        assert masks.keys() == local_masks.keys()
        assert all(torch.equal(masks[k], local_masks[k]) for k in masks)
        for name in ("x", "y", "z_src", "x_neg", "x_val_neg"):
            assert torch.equal(getattr(prepared, name), getattr(local_prepared, name)), name
