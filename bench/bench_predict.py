"""Predict throughput of one real receiver under many concurrent edge clients (issue 13).

Starts a receiver (``python -m receiver``) on 127.0.0.1, sends it a package, then runs
``--clients`` edge clients, each with its own ``PncClient`` (its own channel), calling
``predict(package, x)`` with 8 real MNIST digits in a loop for ``--seconds``. The
clients live in ``--procs`` separate processes (a few threads each), so the GIL of one
client process does not cap the load and the clients look like separate edge devices;
``--procs 0`` runs them as threads of this process instead. Reports requests/s,
images/s, p50/p99 latency and errors counted by status, and writes JSON (``--out``).
The clients run on the same cores as the receiver (on 2 cores they take about a third
of the CPU), so the figure is that of the whole machine.

Each run is stored under its ``--label`` in the JSON (other labels are kept), with the
load average before it, the commit and the settings, so a baseline measured on older
code stays next to later runs. ``--forward-only`` measures the forward alone instead
(no gRPC, no clients): microseconds per image of each Predict engine at each batch size.

To rerun the figures of bench/results/predict_throughput.json on idle cores (check
that ``uptime`` shows a load average well under 1 first; the package is the one
``pnc clone --zoo ZOO --target mnist-cnn-0to4 --source mnist-cnn-5to9 --classes 5,6
--per-class 20 --positions 3:3 --out /tmp/pnc/p56.pnc`` writes):

    export OMP_NUM_THREADS=1
    python bench/bench_predict.py --zoo ZOO --package /tmp/pnc/p56.pnc \\
        --engine jit --label idle_jit --note "2 idle cores"
    python bench/bench_predict.py --zoo ZOO --package /tmp/pnc/p56.pnc \\
        --engine eager --label idle_eager --note "2 idle cores"
    python bench/bench_predict.py --zoo ZOO --package /tmp/pnc/p56.pnc --forward-only \\
        --label idle_forward

The receiver runs with its defaults (``--predict-batch 64``, ``--predict-workers`` one
per core, ``--torch-threads 1``) unless ``--engine``, ``--predict-batch`` or ``--env``
say otherwise.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BATCH = 8  # images per request, as the issue says


def digits(n: int = BATCH) -> np.ndarray:
    """``n`` real test digits (n, 1, 28, 28) float32."""
    from pnc_net.data import load_mnist

    return np.ascontiguousarray(load_mnist().x_test.numpy()[:n], dtype=np.float32)


def client_loop(addr: str, package: str, x: np.ndarray, ready: threading.Barrier,
                go: threading.Event, window: list[float], out: dict) -> None:
    """One edge client: its own channel and one warm-up call; then, once every client
    is ready (``go``), predict until ``window[1]``."""
    from pnc_net.errors import PncError
    from pnc_net.serve.client import PncClient

    lat: list[float] = []
    errors: Counter[str] = Counter()
    with PncClient(addr, timeout_s=30.0) as c:
        try:
            c.wait_ready(60)
            c.predict(package, x)
        except PncError as err:
            errors["warmup:" + str(err.grpc_code)] += 1
        ready.wait()
        go.wait()
        time.sleep(max(0.0, window[0] - time.time()))
        while time.time() < window[1]:
            t0 = time.perf_counter()
            try:
                resp = c.predict(package, x)
            except PncError as err:
                errors[str(err.grpc_code)] += 1
                continue
            if len(resp.predictions) != len(x):
                errors["SHORT_RESPONSE"] += 1
                continue
            # a call that started before the end counts even if it ends after it
            lat.append(time.perf_counter() - t0)
    out["lat"], out["errors"] = lat, dict(errors)


def _client_threads(addr: str, package: str, xs: list[np.ndarray], on_ready, window):
    """Start one client thread per input; ``on_ready()`` (after every warm-up call) must
    fill ``window`` with ``[start, stop]``. Returns ``(latencies, errors)``."""
    go = threading.Event()
    ready = threading.Barrier(len(xs) + 1)
    outs: list[dict] = [{} for _ in xs]
    threads = [threading.Thread(target=client_loop, daemon=True,
                                args=(addr, package, x, ready, go, window, o))
               for x, o in zip(xs, outs)]
    for t in threads:
        t.start()
    ready.wait()
    on_ready()
    go.set()
    for t in threads:
        t.join(window[1] - time.time() + 90)
    lat: list[float] = []
    errors: Counter[str] = Counter()
    for o in outs:
        if "lat" not in o:
            errors["CLIENT_HUNG"] += 1
            continue
        lat += o["lat"]
        errors.update(o["errors"])
    return lat, errors


def _proc_main(addr: str, package: str, xs: list[np.ndarray], ready_q, go, shared, out_q):
    """A client process (spawned): one client thread per input, results back via ``out_q``."""
    window = [0.0, 0.0]

    def on_ready() -> None:
        ready_q.put(len(xs))
        go.wait()
        window[:] = list(shared)

    lat, errors = _client_threads(addr, package, xs, on_ready, window)
    out_q.put((lat, dict(errors)))


def run_clients(addr: str, package: str, x: np.ndarray, clients: int, procs: int,
                seconds: float, window: list[float] | None = None,
                ) -> tuple[list[float], Counter]:
    """All clients, started together once every one has made its warm-up call;
    ``window`` (if given) gets the ``[start, stop]`` of the measured time."""
    xs = [np.roll(x, i, axis=0) for i in range(clients)]  # each client its own row order
    window = window if window is not None else [0.0, 0.0]
    if procs <= 0:
        def on_ready() -> None:
            window[:] = [time.time() + 0.5, time.time() + 0.5 + seconds]

        return _client_threads(addr, package, xs, on_ready, window)
    ctx = mp.get_context("spawn")
    ready_q, out_q, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    shared = ctx.Array("d", 2)
    parts = [xs[i::procs] for i in range(procs)]
    ps = [ctx.Process(target=_proc_main, daemon=True,
                      args=(addr, package, part, ready_q, go, shared, out_q))
          for part in parts if part]
    for p in ps:
        p.start()
    for _ in ps:
        ready_q.get(timeout=300)
    t = time.time() + 0.5
    shared[0], shared[1] = t, t + seconds
    window[:] = [t, t + seconds]
    go.set()
    lat: list[float] = []
    errors: Counter[str] = Counter()
    for _ in ps:
        got = out_q.get(timeout=seconds + 180)
        lat += got[0]
        errors.update(got[1])
    for p in ps:
        p.join(10)
    return lat, errors


class CpuMeter:
    """CPU seconds a process and the whole machine used, sampled every 0.25 s (Linux
    ``/proc``), so a run can report what the receiver itself spent per request: on cores
    shared with other work that is steadier than requests per second."""

    def __init__(self, pid: int) -> None:
        self.pid, self.samples = pid, []  # (time, process cpu s, machine busy cpu s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> tuple[float, float, float]:
        tick = os.sysconf("SC_CLK_TCK")
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/stat") as f:
            cpu = [int(v) for v in f.readline().split()[1:]]
        busy = sum(cpu) - cpu[3] - cpu[4]  # all but idle and iowait
        return time.time(), (int(fields[11]) + int(fields[12])) / tick, busy / tick

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            try:
                self.samples.append(self._read())
            except OSError:
                return

    def __enter__(self) -> CpuMeter:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(2)

    def within(self, start: float, stop: float) -> dict:
        """CPU cores used on average between ``start`` and ``stop`` by the process and by
        the machine (every process, other work included)."""
        inside = [s for s in self.samples if start <= s[0] <= stop]
        if len(inside) < 2:
            return {}
        (t0, p0, m0), (t1, p1, m1) = inside[0], inside[-1]
        return {"receiver_cores": round((p1 - p0) / (t1 - t0), 2),
                "machine_busy_cores": round((m1 - m0) / (t1 - t0), 2)}


def summary(lat: list[float], errors: Counter, seconds: float) -> dict:
    """Requests/s, images/s, latency percentiles (ms) and errors of one run."""
    a = np.sort(np.asarray(lat)) if lat else np.zeros(1)
    ok = len(lat)
    return {"ok_requests": ok, "requests_per_s": round(ok / seconds, 1),
            "images_per_s": round(ok * BATCH / seconds, 1),
            "p50_ms": round(float(np.percentile(a, 50)) * 1e3, 2),
            "p99_ms": round(float(np.percentile(a, 99)) * 1e3, 2),
            "mean_ms": round(float(a.mean()) * 1e3, 2),
            "errors": sum(errors.values()), "errors_by_status": dict(errors)}


def forward_only(zoo: Path, package: Path, batches: list[int], rounds: int,
                 seconds_per_cell: float = 0.3) -> dict:
    """Per-image forward time (us) of each engine at each batch size on one torch thread,
    in this process: no gRPC, no clients. The engines are measured in turns, ``rounds``
    times over, and the best round of each cell is reported (the least disturbed by
    other processes on shared cores); ``speedup`` is eager / jit at each batch."""
    import torch

    from pnc_net import wire
    from pnc_net.package import probe_batch
    from pnc_net.rebuild import accepted_tolerance, build_superbody
    from pnc_net.serve import fastpath
    from pnc_net.zoo import Zoo

    torch.set_num_threads(1)
    pkg = wire.decode(package.read_bytes())
    sb = build_superbody(Zoo(zoo), pkg)
    shape = tuple(Zoo(zoo).resolve(pkg.target.sha256).input_shape)
    fp = pkg.fingerprint
    assert fp is not None
    probes = probe_batch(fp.probe_seed, fp.probe_count, shape)
    forwards = {e: fastpath.prepare(sb, shape, probes, accepted_tolerance(fp), e)
                for e in fastpath.ENGINES}
    x_all = torch.from_numpy(digits(max(batches)))
    best: dict[str, dict[int, float]] = {e: {} for e in forwards}
    for _ in range(rounds):
        for b in batches:
            x = x_all[:b]
            for e, f in forwards.items():
                f(x)  # warm (a new batch size is profiled once by TorchScript)
                n, t0 = 0, time.perf_counter()
                while (dt := time.perf_counter() - t0) < seconds_per_cell or n < 3:
                    f(x)
                    n += 1
                us = dt / n / b * 1e6
                best[e][b] = round(min(best[e].get(b, us), us), 1)
    return {"us_per_image": best, "engines": {e: f.engine for e, f in forwards.items()},
            "max_diff_jit_vs_eager": forwards["jit"].max_diff,
            "speedup": {b: round(best["eager"][b] / best["jit"][b], 2) for b in batches},
            "rounds": rounds, "torch_threads": 1}


def commit() -> str:
    """HEAD, with ``+dirty`` when the files the receiver runs differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout

    head = git("rev-parse", "--short", "HEAD").strip()
    dirty = git("status", "--porcelain", "--untracked-files=no", "pnc_net", "receiver").strip()
    return head + ("+dirty" if dirty else "")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=os.environ.get("PNC_TEST_ZOO", "/tmp/pnc/zoo"))
    ap.add_argument("--package", type=Path, default=Path("/tmp/pnc/p56.pnc"))
    ap.add_argument("--address", help="use this running receiver instead of starting one")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--procs", type=int, default=5,
                    help="client processes (0: client threads in this process) [5]")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--torch-threads", type=int, default=None)
    ap.add_argument("--engine", choices=("jit", "eager"),
                    help="the receiver's --predict-engine (via $PNC_PREDICT_ENGINE) [its "
                    "default: jit]")
    ap.add_argument("--predict-batch", type=int,
                    help="the receiver's --predict-batch (via $PNC_PREDICT_BATCH) [its "
                    "default: 64]")
    ap.add_argument("--env", action="append", default=[],
                    help="KEY=VALUE for the receiver's environment (repeatable)")
    ap.add_argument("--forward-only", action="store_true",
                    help="time the forward of each engine in this process instead (no "
                    "receiver, no clients)")
    ap.add_argument("--batches", default="8,16,32,64",
                    help="batch sizes of --forward-only [8,16,32,64]")
    ap.add_argument("--rounds", type=int, default=5,
                    help="rounds of --forward-only; the best of each cell is kept [5]")
    ap.add_argument("--label", default="run", help="key of this run in the JSON [run]")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/predict_throughput.json")
    ap.add_argument("--note", default="")
    a = ap.parse_args(argv)
    if a.engine:
        a.env.append(f"PNC_PREDICT_ENGINE={a.engine}")
    if a.predict_batch is not None:
        a.env.append(f"PNC_PREDICT_BATCH={a.predict_batch}")
    if a.forward_only:
        return _store(a, {**forward_only(a.zoo, a.package, [int(b) for b in a.batches.split(",")],
                                         a.rounds), **_context(os.getloadavg(), a)})

    from pnc_cli.daemons import spawn_daemon, stop_daemon
    from pnc_net.serve.client import PncClient

    proc = None
    tmp = tempfile.TemporaryDirectory(prefix="pnc-bench-predict-")
    try:
        if a.address:
            addr = a.address
        else:
            args = ["--listen", "127.0.0.1:0", "--zoo", str(a.zoo), "--store", tmp.name]
            if a.torch_threads:
                args += ["--torch-threads", str(a.torch_threads)]
            env = dict(kv.split("=", 1) for kv in a.env)
            proc, port = spawn_daemon("receiver", args, env=env)
            addr = f"127.0.0.1:{port}"
        with PncClient(addr) as c:
            pid, _ = c.send_package(a.package.read_bytes())
            state = c.last_write.state if c.last_write else "?"
        load = os.getloadavg()
        print(f"receiver {addr}, package {pid[:12]} ({state}); load average {load}",
              file=sys.stderr)
        window = [0.0, 0.0]
        cpu: dict = {}
        if proc is not None:
            with CpuMeter(proc.pid) as meter:
                lat, errors = run_clients(addr, pid[:16], digits(), a.clients, a.procs,
                                          a.seconds, window)
            cpu = meter.within(*window)
        else:
            lat, errors = run_clients(addr, pid[:16], digits(), a.clients, a.procs, a.seconds)
        if proc is not None and proc.poll() is not None:
            errors["RECEIVER_DIED"] += 1
    finally:
        if proc is not None:
            stop_daemon(proc)
        tmp.cleanup()
    result = summary(lat, errors, a.seconds)
    if cpu and result["requests_per_s"]:
        cpu["receiver_cpu_ms_per_request"] = round(
            cpu["receiver_cores"] * 1e3 / result["requests_per_s"], 3)
    result = {**result, **cpu, "clients": a.clients,
              "client_procs": a.procs,
              "seconds": a.seconds, "images_per_request": BATCH,
              "torch_threads": a.torch_threads or 1, "receiver_env": a.env,
              **_context(load, a)}
    return _store(a, result)


def _context(load: tuple[float, ...], a: argparse.Namespace) -> dict:
    """Where and when: load average before the run, cores, commit, time, note."""
    return {"loadavg_before": [round(v, 2) for v in load], "cpus": os.cpu_count(),
            "commit": commit(), "at": time.strftime("%Y-%m-%dT%H:%M:%S"), "note": a.note}


def _store(a: argparse.Namespace, result: dict) -> dict:
    """Print the run and keep it under its label in ``--out`` (other labels stay)."""
    print(json.dumps(result, indent=1))
    old = json.loads(a.out.read_text()) if a.out.exists() else {}
    old[a.label] = result
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(old, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
