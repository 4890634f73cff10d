"""Issue 3's transport targets, measured with real daemons in their own processes.

    .venv/bin/python bench/bench_transport.py --package P.pnc --zoo DIR [--blob-mib 200]
        [--receivers 8] [--json]

1. wire bytes for the package (every byte both ways through a loopback TCP meter,
   HTTP/2 framing and headers included) <= package file size + 2 KB
2. send -> receiver rebuilt and verified <= 1 s (cold receiver: zoo read from disk)
3. a 200 MB blob moves at >= 300 MB/s with its digest verified (write and read)
4. one sender keeps N=8 receivers in sync: a new package verified on all within 2 s
5. a receiver SIGKILLed mid-transfer resumes from its committed offset after restart,
   re-sending at most one chunk (1 MiB)
All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path

from pnc_cli.daemons import spawn_daemon, stop_daemon
from pnc_net import wire
from pnc_net.errors import PncError
from pnc_net.fsutil import sha256_bytes
from pnc_net.serve.client import CHUNK_BYTES, PncClient
from pnc_net.serve.store import PackageStore
from pnc_net.serve.wiremeter import WireMeter


def receiver(zoo: Path, store: Path, port: int = 0):
    return spawn_daemon("receiver", ["--listen", f"127.0.0.1:{port}", "--zoo", str(zoo),
                                     "--store", str(store)])


def bench_send(tmp: Path, zoo: Path, data: bytes, repeats: int) -> dict:
    wire_bytes, seconds, inside = [], [], []
    for i in range(repeats):
        proc, port = receiver(zoo, tmp / f"send{i}")
        try:
            with WireMeter(port) as meter, PncClient(meter.address) as c:
                c.wait_ready(30)
                c.health()
                base = meter.total  # connection setup and the health call, not the send
                t0 = time.perf_counter()
                c.send_package(data)
                seconds.append(time.perf_counter() - t0)
                assert c.last_write.state == "verified", c.last_write.detail
                wire_bytes.append(meter.total - base)
                inside.append(json.loads(c.stat(sha256_bytes(data)).metadata_json)["timings_s"])
                setup = base
        finally:
            stop_daemon(proc)
    return {"package_bytes": len(data), "wire_bytes_send": max(wire_bytes),
            "wire_overhead_bytes": max(wire_bytes) - len(data),
            "connection_setup_bytes": setup,
            "target_wire_ok": max(wire_bytes) <= len(data) + 2048,
            "send_to_verified_s": [round(s, 4) for s in seconds],
            "send_to_verified_s_median": round(statistics.median(seconds), 4),
            "receiver_side_s": inside,
            "target_verify_ok": max(seconds) <= 1.0}


def bench_blob(tmp: Path, zoo: Path, mib: int) -> dict:
    blob = os.urandom(mib << 20)
    sha = sha256_bytes(blob)
    proc, port = receiver(zoo, tmp / "blob")
    try:
        with PncClient(f"127.0.0.1:{port}", timeout_s=120) as c:
            t0 = time.perf_counter()
            c.write_blob("blobs", blob, max_unacked=None)  # unpaced; the server hashes it all
            w = time.perf_counter() - t0
            t0 = time.perf_counter()
            back = c.read_blob("blobs", sha, len(blob))  # the client hashes what it reads
            r = time.perf_counter() - t0
            assert back == blob
            blob2 = os.urandom(len(blob))
            t0 = time.perf_counter()
            c.write_blob("blobs", blob2, max_unacked=0)  # paced: one chunk in flight
            paced = time.perf_counter() - t0
    finally:
        stop_daemon(proc)
    return {"blob_mb": round(len(blob) / 1e6, 1), "write_MB_per_s": round(len(blob) / w / 1e6, 1),
            "read_MB_per_s": round(len(blob) / r / 1e6, 1),
            "paced_write_MB_per_s": round(len(blob) / paced / 1e6, 1),
            "target_blob_ok": min(len(blob) / w, len(blob) / r) >= 300e6}


def bench_fanout(tmp: Path, zoo: Path, data: bytes, n: int) -> dict:
    procs, ports = [], []
    try:
        for i in range(n):
            p, port = receiver(zoo, tmp / f"fan{i}")
            procs.append(p)
            ports.append(port)
        for port in ports:  # warm: each receiver has its zoo models cached
            with PncClient(f"127.0.0.1:{port}") as c:
                c.wait_ready(30)
        s, _ = spawn_daemon("sender", ["--listen", "127.0.0.1:0", "--store",
                                           str(tmp / "fan-sender"), "--push-to",
                                           ",".join(f"127.0.0.1:{p}" for p in ports)])
        procs.append(s)
        time.sleep(1.0)  # pushers connected
        t0 = time.perf_counter()
        pid = PackageStore(tmp / "fan-sender").put(data)  # as `pnc clone` or a cluster job would
        done: dict[int, float] = {}
        inside: dict[int, dict] = {}
        clients = [PncClient(f"127.0.0.1:{p}", timeout_s=5, max_attempts=1) for p in ports]
        while len(done) < n and time.perf_counter() - t0 < 60:
            for i, c in enumerate(clients):
                if i not in done:
                    try:
                        info = c.stat(pid)
                        if info.state == "verified":
                            done[i] = time.perf_counter() - t0
                            inside[i] = json.loads(info.metadata_json)["timings_s"]
                    except PncError:
                        continue  # not there yet
            time.sleep(0.02)
        for c in clients:
            c.close()
    finally:
        for p in procs:
            stop_daemon(p)
    worst = max(done.values()) if len(done) == n else float("inf")
    return {"receivers": n, "all_verified_s": round(worst, 3),
            "per_receiver_s": sorted(round(v, 3) for v in done.values()),
            "receiver_side_s": [inside[i] for i in sorted(inside)],
            "target_fanout_ok": worst <= 2.0}


def bench_kill_resume(tmp: Path, zoo: Path, mib: int, kill_after: float,
                      max_unacked: int | None) -> dict:
    blob = os.urandom(mib << 20)
    store = tmp / f"kill{max_unacked}"
    proc, port = receiver(zoo, store)
    state = {"proc": proc}

    def kill_and_restart():
        """SIGKILL once the receiver has stored ``kill_after`` of the blob (mid-transfer)."""
        end = time.monotonic() + 120
        while time.monotonic() < end:
            part = next((store / "uploads").glob("blobs-*.part"), None)
            if part is not None and part.stat().st_size >= kill_after * len(blob):
                break
            time.sleep(0.001)
        os.kill(state["proc"].pid, signal.SIGKILL)
        state["proc"].wait()
        part = next((store / "uploads").glob("blobs-*.part"), None)
        state["committed_at_kill"] = part.stat().st_size if part else 0
        state["proc"], _ = receiver(zoo, store, port)

    killer = threading.Thread(target=kill_and_restart)
    try:
        with PncClient(f"127.0.0.1:{port}", timeout_s=120, max_attempts=30) as c:
            killer.start()
            t0 = time.perf_counter()
            sent = c.write_blob("blobs", blob, max_unacked=max_unacked)
            total_s = time.perf_counter() - t0
            killer.join()
            ok = c.read_blob("blobs", sha256_bytes(blob)) == blob
    finally:
        killer.join()
        stop_daemon(state["proc"])
    resent = sent - len(blob)
    mode = "paced" if max_unacked == 0 else "unpaced"
    return {f"kill_{mode}": {
        "blob_mb": round(len(blob) / 1e6, 1), "committed_at_kill_bytes":
        state.get("committed_at_kill"), "resent_bytes": resent,
        "resent_chunks": round(resent / CHUNK_BYTES, 2), "resume_total_s": round(total_s, 2),
        "resumed_blob_intact": ok, "target_resume_ok": ok and resent <= CHUNK_BYTES}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", type=Path, required=True)
    ap.add_argument("--zoo", type=Path, default=Path(os.environ.get("PNC_ZOO", "")))
    ap.add_argument("--blob-mib", type=int, default=200)
    ap.add_argument("--receivers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kill-after", type=float, default=0.4,
                    help="fraction of the blob stored when the receiver is killed")
    ap.add_argument("--only", default="send,blob,fanout,kill,kill_unpaced")
    args = ap.parse_args()
    data = args.package.read_bytes()
    wire.decode(data)
    tmp = Path(tempfile.mkdtemp(prefix="pnc-bench-"))
    out = {"cpus": os.cpu_count()}
    try:
        steps = {"send": lambda: bench_send(tmp, args.zoo, data, args.repeats),
                 "blob": lambda: bench_blob(tmp, args.zoo, args.blob_mib),
                 "fanout": lambda: bench_fanout(tmp, args.zoo, data, args.receivers),
                 "kill": lambda: bench_kill_resume(tmp, args.zoo, args.blob_mib,
                                                   args.kill_after, 0),
                 "kill_unpaced": lambda: bench_kill_resume(tmp, args.zoo, args.blob_mib,
                                                           args.kill_after, None)}
        for name in args.only.split(","):
            out.update(steps[name]())
            print(json.dumps(out), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
