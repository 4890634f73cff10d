"""Predict throughput of one real receiver under many concurrent edge clients (issue 13).

Starts a receiver (``python -m receiver``) on 127.0.0.1, sends it a package, then runs
``--clients`` edge clients, each with its own ``PncClient`` (its own channel), calling
``predict(package, x)`` with 8 real MNIST digits in a loop for ``--seconds``. The
clients live in ``--procs`` separate processes (a few threads each), so the GIL of one
client process does not cap the load and the clients look like separate edge devices;
``--procs 0`` runs them as threads of this process instead. Reports requests/s,
images/s, p50/p99 latency and errors counted by status, and writes JSON (``--out``).

    python bench/bench_predict.py --zoo /tmp/pnc/zoo --package /tmp/pnc/p56.pnc \\
        --label batched --out bench/results/predict_throughput.json

Each run is stored under its ``--label`` in the JSON (other labels are kept), with the
load average before it, the commit and the settings, so a baseline measured on older
code stays next to later runs.
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
                seconds: float) -> tuple[list[float], Counter]:
    """All clients, started together once every one has made its warm-up call."""
    xs = [np.roll(x, i, axis=0) for i in range(clients)]  # each client its own row order
    if procs <= 0:
        window = [0.0, 0.0]

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


def commit() -> str:
    """HEAD, with ``+dirty`` when the files the receiver runs differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout

    head = git("rev-parse", "--short", "HEAD").strip()
    dirty = git("status", "--porcelain", "--untracked-files=no", "pnc_net", "receiver").strip()
    return head + ("+dirty" if dirty else "")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", type=Path, default=os.environ.get("PNC_TEST_ZOO", "/tmp/pnc/zoo"))
    ap.add_argument("--package", type=Path, default=Path("/tmp/pnc/p56.pnc"))
    ap.add_argument("--address", help="use this running receiver instead of starting one")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--procs", type=int, default=5,
                    help="client processes (0: client threads in this process) [5]")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--torch-threads", type=int, default=None)
    ap.add_argument("--env", action="append", default=[],
                    help="KEY=VALUE for the receiver's environment (repeatable)")
    ap.add_argument("--label", default="run", help="key of this run in the JSON [run]")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/predict_throughput.json")
    ap.add_argument("--note", default="")
    a = ap.parse_args(argv)

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
        lat, errors = run_clients(addr, pid[:16], digits(), a.clients, a.procs, a.seconds)
        if proc is not None and proc.poll() is not None:
            errors["RECEIVER_DIED"] += 1
    finally:
        if proc is not None:
            stop_daemon(proc)
        tmp.cleanup()
    result = {**summary(lat, errors, a.seconds), "clients": a.clients, "client_procs": a.procs,
              "seconds": a.seconds, "images_per_request": BATCH,
              "torch_threads": a.torch_threads or 1, "receiver_env": a.env,
              "loadavg_before": [round(v, 2) for v in load], "cpus": os.cpu_count(),
              "commit": commit(), "at": time.strftime("%Y-%m-%dT%H:%M:%S"), "note": a.note}
    print(json.dumps(result, indent=1))
    old = json.loads(a.out.read_text()) if a.out.exists() else {}
    old[a.label] = result
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(old, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
