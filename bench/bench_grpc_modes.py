"""grpc.aio vs the sync server: the measurement behind pnc's choice (docs/protocol.md).

Each mode serves the same two calls on 127.0.0.1: a client-streaming upload of
N MiB in 1 MiB chunks (sha256 over the bytes, like ByteStream.Write) and a
unary call; the client is the same sync client. Prints MB/s and calls/s.

    .venv/bin/python bench/bench_grpc_modes.py [--mib 200] [--calls 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import threading
import time
from concurrent import futures

import grpc

OPTS = [("grpc.max_send_message_length", 4 << 20), ("grpc.max_receive_message_length", 4 << 20)]


def ident(b: bytes) -> bytes:
    return b



def sync_server():
    def upload(it, ctx):
        h, n = hashlib.sha256(), 0
        for chunk in it:
            h.update(chunk)
            n += len(chunk)
        return h.hexdigest().encode()

    def ping(req, ctx):
        return req

    handler = grpc.method_handlers_generic_handler("b.B", {
        "Up": grpc.stream_unary_rpc_method_handler(upload, ident, ident),
        "Ping": grpc.unary_unary_rpc_method_handler(ping, ident, ident)})
    server = grpc.server(futures.ThreadPoolExecutor(16), options=OPTS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return port, lambda: server.stop(0)


def aio_server():
    ready, box = threading.Event(), {}

    async def upload(it, ctx):
        h = hashlib.sha256()
        async for chunk in it:
            h.update(chunk)
        return h.hexdigest().encode()

    async def ping(req, ctx):
        return req

    async def main():
        handler = grpc.method_handlers_generic_handler("b.B", {
            "Up": grpc.stream_unary_rpc_method_handler(upload, ident, ident),
            "Ping": grpc.unary_unary_rpc_method_handler(ping, ident, ident)})
        server = grpc.aio.server(options=OPTS)
        server.add_generic_rpc_handlers((handler,))
        box["port"] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        box["stop"] = asyncio.Event()
        ready.set()
        await box["stop"].wait()
        await server.stop(0)

    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    t.start()
    ready.wait()
    return box["port"], lambda: loop.call_soon_threadsafe(box["stop"].set)


def measure(port: int, mib: int, calls: int) -> dict:
    chunk = os.urandom(1 << 20)
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=OPTS) as ch:
        up = ch.stream_unary("/b.B/Up", ident, ident)
        ping = ch.unary_unary("/b.B/Ping", ident, ident)
        ping(b"x", timeout=10)
        t0 = time.perf_counter()
        up(iter([chunk] * mib), timeout=120)
        stream_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(calls):
            ping(b"x" * 64, timeout=10)
        unary_s = time.perf_counter() - t0
    return {"upload_MB_per_s": round(mib * (1 << 20) / stream_s / 1e6, 1),
            "unary_calls_per_s": round(calls / unary_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=200)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    out = {}
    for name, make in (("sync", sync_server), ("aio", aio_server)):
        port, stop = make()
        runs = [measure(port, args.mib, args.calls) for _ in range(args.repeat)]
        stop()
        out[name] = {k: max(r[k] for r in runs) for k in runs[0]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
