"""Issue 11 item 5: a zoo blob at real size, pnc against the bare parts, in one run.

    .venv/bin/python bench/bench_blob.py [--mib 200] [--repeats 5]
        [--out bench/results/blob_transfer.json]

For one random blob (200 MiB by default), each repetition measures, side by side:

* ``bare_grpc_read`` / ``bare_grpc_write``: a server-streaming and a client-streaming
  call of the same bytes in 1 MiB messages against a minimal gRPC server in its own
  process (no protobuf, no hashing, no disk): the loopback transport's ceiling;
* ``bare_sha256``: one sha256 pass over the blob in 1 MiB steps;
* ``bare_write_fsync``: one write of the blob to a file beside the store, then fsync;
* ``pnc_read``: ``PncClient.read_blob`` from a receiver daemon (its own process),
  digest verified by the client;
* ``pnc_write`` (the default, paced: at most one chunk in flight), ``pnc_write_unpaced``
  and ``pnc_write_known_digest`` (unpaced, the digest given as a zoo manifest gives it,
  so the client does not hash first): ``PncClient.write_blob``; the server hashes while
  receiving and the blob is visible only after size, digest and fsync.

Every figure is MB/s (10^6 bytes), the median over the repetitions; the run records the
load average before it starts, since the development machine is shared. All traffic
stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

import grpc

OPTS = [("grpc.max_send_message_length", 4 << 20), ("grpc.max_receive_message_length", 4 << 20)]
CHUNK = 1 << 20


def _ident(b: bytes) -> bytes:
    return b


def serve_bare(mib: int) -> None:
    """The bare gRPC server (run in a child): Down streams ``mib`` MiB, Up counts bytes."""
    chunks = [os.urandom(CHUNK) for _ in range(8)]

    def down(req: bytes, ctx):
        size = int(req)
        for i in range(0, size, CHUNK):
            c = chunks[(i // CHUNK) % len(chunks)]
            yield c if size - i >= CHUNK else c[: size - i]

    def up(it, ctx):
        return str(sum(len(c) for c in it)).encode()

    handler = grpc.method_handlers_generic_handler("bare.B", {
        "Down": grpc.unary_stream_rpc_method_handler(down, _ident, _ident),
        "Up": grpc.stream_unary_rpc_method_handler(up, _ident, _ident)})
    server = grpc.server(futures.ThreadPoolExecutor(4), options=OPTS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"port={port}", flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    server.stop(0)


def mbps(n: int, seconds: float) -> float:
    return round(n / seconds / 1e6, 1)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bare_sha256(blob: bytes) -> None:
    h, view = hashlib.sha256(), memoryview(blob)
    for i in range(0, len(blob), CHUNK):
        h.update(view[i: i + CHUNK])
    h.hexdigest()


def bare_write_fsync(blob: bytes, path: Path) -> None:
    with open(path, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("bench/results/blob_transfer.json"))
    ap.add_argument("--only", default="bare_grpc_read,bare_grpc_write,bare_sha256,"
                    "bare_write_fsync,pnc_read,pnc_write,pnc_write_unpaced,"
                    "pnc_write_known_digest")
    ap.add_argument("--serve-bare", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_bare:
        serve_bare(args.mib)
        return

    from pnc_cli.daemons import spawn_daemon, stop_daemon
    from pnc_net.serve.client import PncClient

    load_before = os.getloadavg()
    size = args.mib << 20
    blob = os.urandom(size)
    sha = hashlib.sha256(blob).hexdigest()
    tmp = Path(tempfile.mkdtemp(prefix="pnc-bench-blob-"))
    (tmp / "zoo").mkdir()
    bare = subprocess.Popen([sys.executable, __file__, "--serve-bare", "--mib", str(args.mib)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = bare.stdout.readline() if bare.stdout else ""
    bare_port = int(line.strip().split("=")[1])
    proc, port = spawn_daemon("receiver", ["--listen", "127.0.0.1:0", "--zoo",
                                           str(tmp / "zoo"), "--store", str(tmp / "store")])
    channel = grpc.insecure_channel(f"127.0.0.1:{bare_port}", options=OPTS)
    down = channel.unary_stream("/bare.B/Down", request_serializer=_ident,
                                response_deserializer=_ident)
    up = channel.stream_unary("/bare.B/Up", request_serializer=_ident,
                              response_deserializer=_ident)
    pieces = [blob[i: i + CHUNK] for i in range(0, size, CHUNK)]
    seconds: dict[str, list[float]] = {k: [] for k in args.only.split(",")}
    n_write = 0

    def fresh_blob() -> tuple[bytes, str]:
        nonlocal n_write
        n_write += 1
        b = n_write.to_bytes(8, "little") + blob[8:]  # a new digest, the same size
        return b, hashlib.sha256(b).hexdigest()

    try:
        with PncClient(f"127.0.0.1:{port}", timeout_s=120) as c:
            c.wait_ready(30)
            c.write_blob("blobs", blob, max_unacked=None)  # the blob pnc_read reads back
            assert c.read_blob("blobs", sha, size) == blob
            for _ in range(args.repeats):
                for name in seconds:
                    if name == "bare_grpc_read":
                        s = timed(lambda: sum(len(m) for m in down(str(size).encode(),
                                                                   timeout=120)))
                    elif name == "bare_grpc_write":
                        s = timed(lambda: up(iter(pieces), timeout=120))
                    elif name == "bare_sha256":
                        s = timed(lambda: bare_sha256(blob))
                    elif name == "bare_write_fsync":
                        path = tmp / "store" / "bare.bin"
                        s = timed(lambda path=path: bare_write_fsync(blob, path))
                        path.unlink()
                    elif name == "pnc_read":
                        got: list[bytes] = []
                        s = timed(lambda got=got: got.append(c.read_blob("blobs", sha, size)))
                        assert got[0] == blob
                        del got
                    else:
                        b, bsha = fresh_blob()
                        kw: dict = {"max_unacked": 0 if name == "pnc_write" else None}
                        if name == "pnc_write_known_digest":
                            kw["sha256"] = bsha
                        s = timed(lambda b=b, kw=kw: c.write_blob("blobs", b, **kw))
                        final = tmp / "store" / "blobs" / bsha
                        assert final.stat().st_size == size
                        final.unlink()
                        del b
                    seconds[name].append(s)
                print(json.dumps({k: mbps(size, v[-1]) for k, v in seconds.items()}),
                      flush=True)
    finally:
        channel.close()
        stop_daemon(proc)
        if bare.stdin:
            bare.stdin.close()
        bare.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)

    med = {k: mbps(size, statistics.median(v)) for k, v in seconds.items()}
    out = {
        "blob_bytes": size, "repeats": args.repeats, "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "median_MB_per_s": med,
        "all_MB_per_s": {k: [mbps(size, s) for s in v] for k, v in seconds.items()},
        "command": "OMP_NUM_THREADS=1 .venv/bin/python bench/bench_blob.py " + " ".join(
            sys.argv[1:]),
    }
    pairs = {"pnc_read/bare_grpc_read": ("pnc_read", "bare_grpc_read"),
             "pnc_write/bare_write_fsync": ("pnc_write", "bare_write_fsync"),
             "pnc_write_unpaced/bare_write_fsync": ("pnc_write_unpaced", "bare_write_fsync"),
             "pnc_write_known_digest/bare_write_fsync": ("pnc_write_known_digest",
                                                         "bare_write_fsync"),
             "pnc_write_known_digest/bare_grpc_write": ("pnc_write_known_digest",
                                                        "bare_grpc_write")}
    # the same repetition's bare figure as the yardstick: steadier on a shared machine
    out["median_ratio_in_the_same_repetition"] = {
        k: round(statistics.median(seconds[b][i] / seconds[a][i]
                                   for i in range(len(seconds[a]))), 2)
        for k, (a, b) in pairs.items() if a in seconds and b in seconds}
    if "pnc_read" in med:
        out["target_read_ok"] = med["pnc_read"] >= 700
    if "pnc_write" in med and "bare_write_fsync" in med:
        out["write_vs_bare_write_fsync"] = round(med["pnc_write"] / med["bare_write_fsync"], 2)
        out["target_write_ok"] = med["pnc_write"] >= 0.8 * med["bare_write_fsync"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
