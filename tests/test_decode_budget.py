"""The decoding budget, proved: decode + rebuild of every known attack package costs at
most ``MEMORY_BUDGET_MB`` above an idle receiver and ``CPU_BUDGET_S`` of CPU, and ends
in the project's own error (never MemoryError, never killed).

Each package is checked in its own child process (forked by ``_RUNNER`` after it has
imported torch and pnc), which reads its own virtual size and sets ``RLIMIT_AS`` to that
plus the budget. RLIMIT_AS counts address space, not resident memory, so measuring the baseline
inside the child (after the imports, with one thread and two malloc arenas, so no
thread pool reserves more later) makes the limit mean "this much new memory"; the child
also reports its peak-RSS growth (VmHWM) and CPU time, which the test asserts too. An
allocation past the budget raises MemoryError in the child, which fails the test.

The attack builders (``ATTACKS``) are reused by tests/test_wire.py's unit tests.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pnc_net import codec, wire
from pnc_net._proto import package_pb2 as pb

MEMORY_BUDGET_MB = 256  # new memory (address space) one package may cost a receiver
CPU_BUDGET_S = 2.0  # CPU seconds of decode + rebuild + fingerprint check of one package

GIB = 1 << 30


# ----------------------------------------------------------------------------- attacks


def rle_bomb(content_bytes: int, declared: int | None) -> bytes:
    """A hand-made zstd frame of RLE blocks (4 bytes per 128 KiB of zeros: 4 GiB in
    128 KiB), whose header states ``declared`` content bytes (None: states nothing)."""
    block = 128 << 10
    if declared is None:
        header = bytes([0x00, 0x38])  # no content size, window 128 KiB
    else:
        header = bytes([0xC0, 0x38]) + struct.pack("<Q", declared)  # 8-byte content size
    n = content_bytes // block
    body = bytearray()
    for i in range(n):
        last = 1 if i == n - 1 else 0
        body += ((block << 3) | (1 << 1) | last).to_bytes(3, "little") + b"\x00"
    return b"\x28\xb5\x2f\xfd" + header + bytes(body)


def _frame(msg: pb.Package) -> bytes:
    return codec.compress(msg.SerializeToString(deterministic=True))


def _with(mutate: Callable[[pb.Package], None]) -> Callable[[pb.Package], bytes]:
    def build(msg: pb.Package) -> bytes:
        out = pb.Package()
        out.CopyFrom(msg)
        mutate(out)
        return _frame(out)
    return build


def _config(value: str) -> Callable[[pb.Package], None]:
    return lambda m: setattr(m.modules[0], "config_json", value)


def _probes(count: int) -> Callable[[pb.Package], None]:
    """``count`` int8 zero probes with scale 0: kilobytes on the wire."""
    def mutate(m: pb.Package) -> None:
        m.fingerprint.probe_count = count
        m.fingerprint.probabilities.CopyFrom(pb.Tensor(
            name="probabilities", dtype=pb.INT8, shape=[count, len(m.label_names)],
            data=bytes(count * len(m.label_names)), scale=0.0))
    return mutate


def _huge_shape(m: pb.Package) -> None:
    del m.modules[0].tensors[0].shape[:]
    m.modules[0].tensors[0].shape.extend([1 << 24] * 8)


def _many_labels(m: pb.Package) -> None:
    m.label_names.extend(f"l{i}" for i in range(700_000))  # 6 MB: under the byte cap


def _many_shape_entries(m: pb.Package) -> None:
    m.modules[0].tensors[0].shape.extend([1] * 3_000_000)


def _many_modules(m: pb.Package) -> None:
    """64 copies of the module and enough labels to decode: the rebuild's label clash
    is found only after building branches."""
    for _ in range(codec.MAX_MODULES - 1):
        m.modules.append(m.modules[0])
    m.label_names.extend(f"extra{i}" for i in range(sum(len(x.cloned_classes)
                                                        for x in m.modules)))
    _probes(m.fingerprint.probe_count)(m)


ATTACKS: dict[str, Callable[[pb.Package], bytes]] = {
    "zstd_bomb_declared_4gib": lambda m: rle_bomb(4 * GIB, 4 * GIB),
    "zstd_bomb_declared_6e18": lambda m: rle_bomb(1 << 20, 6_600_000_000_000_000_000),
    "zstd_bomb_undeclared_4gib": lambda m: rle_bomb(4 * GIB, None),
    "zstd_bomb_declared_small": lambda m: rle_bomb(4 * GIB, 1000),
    "trailing_bytes": lambda m: _frame(m) + b"\x00junk",
    "two_frames": lambda m: _frame(m) + _frame(m),
    "gate_hidden_1e7": _with(_config('{"adapter_rank": 8, "gate_hidden": 10000000}')),
    "adapter_rank_x": _with(_config('{"adapter_rank": "x", "gate_hidden": 16}')),
    "gate_hidden_negative": _with(_config('{"adapter_rank": 8, "gate_hidden": -1}')),
    "gate_hidden_null": _with(_config('{"adapter_rank": 8, "gate_hidden": null}')),
    "gate_hidden_list": _with(_config('{"adapter_rank": 8, "gate_hidden": [16]}')),
    "gate_hidden_float": _with(_config('{"adapter_rank": 8, "gate_hidden": 16.0}')),
    "config_unknown_key": _with(_config('{"adapter_rank": 8, "gate_hidden": 16, "x": 1}')),
    "config_not_object": _with(_config("[8, 16]")),
    "probe_count_300000": _with(_probes(300_000)),
    "huge_tensor_shape": _with(_huge_shape),
    "million_labels": _with(_many_labels),
    "three_million_shape_entries": _with(_many_shape_entries),
}

# Packages at the limits that still decode: their rebuild is the budget's worst case.
AT_LIMITS: dict[str, Callable[[pb.Package], bytes]] = {
    "gate_hidden_4096": _with(_config('{"adapter_rank": 256, "gate_hidden": 4096}')),
    "probe_count_256": _with(_probes(codec.MAX_PROBE_COUNT)),
    "64_modules": _with(_many_modules),
}


# ----------------------------------------------------------------------------- child

# One runner process imports torch and pnc and opens the zoo once, then forks one child
# per package: each child measures its own baseline, sets RLIMIT_AS, decodes + verifies,
# and writes its report to a pipe. (A fresh interpreter per package costs ~10 s of imports.)
_RUNNER = r"""
import json, os, resource, sys, time
import torch
from pnc_net import rebuild, wire
from pnc_net.errors import PncError
from pnc_net.zoo import Zoo

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)

def check(data, zoo, budget):
    base_as, base_hwm = status("VmSize"), status("VmHWM")
    resource.setrlimit(resource.RLIMIT_AS, (base_as + budget, base_as + budget))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    out = {"stage": "decode"}
    try:
        package = wire.decode(data)
        out["stage"] = "rebuild"
        rebuild.verify(zoo, package)
        out["outcome"] = "ok"
    except PncError as err:
        out.update(outcome="pnc", error=type(err).__name__, message=str(err)[:200])
    except BaseException as err:
        out.update(outcome="other", error=type(err).__name__, message=str(err)[:200])
    out.update(cpu_s=time.process_time() - cpu0, wall_s=time.perf_counter() - wall0,
               peak_rss_growth_mb=(status("VmHWM") - base_hwm) / 2**20,
               baseline_as_mb=base_as / 2**20)
    return out

zoo, budget = Zoo(sys.argv[1]), int(sys.argv[2]) << 20
for manifest in zoo.manifests():  # a receiver's zoo is loaded once and cached, and its
    model, _ = zoo.load(manifest.sha256)  # torch has run (first-op setup is not the package's)
    with torch.no_grad():
        model(torch.rand(16, *manifest.input_shape))
reports = {}
for path in sys.argv[3:]:
    data = open(path, "rb").read()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        os.write(write, json.dumps(check(data, zoo, budget)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    _, code = os.waitpid(pid, 0)
    reports[os.path.basename(path)] = json.loads(text) if text else {
        "outcome": "killed", "wait_status": code}
print(json.dumps(reports))
"""


def run_checks(paths: list[Path], zoo_dir: Path, budget_mb: int = MEMORY_BUDGET_MB,
               ) -> dict[str, dict]:
    """Decode + verify each package file in its own memory-limited child; the reports
    by file name (``outcome`` ok, pnc (a PncError), other or killed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "MALLOC_ARENA_MAX": "2"}
    proc = subprocess.run([sys.executable, "-c", _RUNNER, str(zoo_dir), str(budget_mb),
                           *map(str, paths)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, f"runner died ({proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def reports(default_clone, zoo_dir, tmp_path_factory) -> dict[str, dict]:
    """Every attack, every at-the-limits package and the real one, checked once."""
    base = wire.to_proto(default_clone.package)
    folder = tmp_path_factory.mktemp("budget")
    builders = {**ATTACKS, **AT_LIMITS, "real": _frame}
    paths = []
    for name, build in builders.items():
        paths.append(folder / name)
        paths[-1].write_bytes(build(base))
    return run_checks(paths, zoo_dir)


def _within_budget(report: dict) -> None:
    assert report["peak_rss_growth_mb"] < MEMORY_BUDGET_MB, report
    assert report["cpu_s"] < CPU_BUDGET_S, report


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_is_refused_within_budget(name, reports):
    report = reports[name]
    assert report["outcome"] == "pnc", report
    assert report["error"] in ("InvalidInputError", "IncompatibleError"), report
    _within_budget(report)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(AT_LIMITS))
def test_packages_at_the_limits_cost_at_most_the_budget(name, reports):
    assert reports[name]["outcome"] in ("pnc", "ok"), reports[name]
    _within_budget(reports[name])


@pytest.mark.slow
def test_the_real_package_verifies_within_budget(reports):
    """The limits are not so tight that an honest package fails under them."""
    assert reports["real"]["outcome"] == "ok", reports["real"]
    _within_budget(reports["real"])
