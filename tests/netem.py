"""A slow, lossy link on loopback for the tests (``tc netem`` is not in this kernel).

``with Netem(target_port, delay_s=0.2, rate_bps=1e6, reset_every=256 << 10) as link:``
forwards ``link.address`` (127.0.0.1, a free port) to ``127.0.0.1:target_port`` and,
in each direction of each connection:

* delays every byte by ``delay_s`` (one way, so a round trip costs twice that);
* limits the rate to ``rate_bps`` bits per second with a token bucket of
  ``burst_bytes`` (computed in virtual time, so sleeping threads do not drift);
* resets the connection (SO_LINGER 0, then close: an RST to both ends) once it has
  forwarded ``reset_every`` bytes, both directions counted together; each new
  connection gets a fresh allowance, so a client that reconnects and resumes gets on.

Plain sockets and threads, nothing outside the standard library. The proxy holds at
most ``queue_pieces`` pieces of ``PIECE_BYTES`` per direction, so TCP's own back
pressure reaches the sender (a router's queue, not an infinite buffer). It stops on
``__exit__`` (live connections reset, threads joined with a bound) and also by itself
after ``lifetime_s``, so a failing test cannot leave it running. Counters:
``bytes_up`` (client to server), ``bytes_down``, ``resets``, ``connections``.
"""

from __future__ import annotations

import queue
import select
import socket
import struct
import threading
import time
from typing import Self

HOST = "127.0.0.1"
PIECE_BYTES = 16 << 10  # the proxy reads, schedules and forwards in pieces of at most this
POLL_S = 0.05  # how often blocked threads look at the stop flags


class _Conn:
    """One proxied connection: the client's and the server's sockets and their fate."""

    def __init__(self, link: Netem, client: socket.socket, server: socket.socket) -> None:
        self.link, self.client, self.server = link, client, server
        self.dead = threading.Event()
        self.lock = threading.Lock()
        self.forwarded = 0  # both directions, for the reset allowance
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        for name, src, dst, up in (("up", self.client, self.server, True),
                                   ("down", self.server, self.client, False)):
            pipe: queue.Queue = queue.Queue(maxsize=self.link.queue_pieces)
            self.threads += [
                threading.Thread(target=self._read, args=(src, pipe), daemon=True,
                                 name=f"netem-read-{name}"),
                threading.Thread(target=self._write, args=(dst, pipe, up), daemon=True,
                                 name=f"netem-write-{name}")]
        for t in self.threads:
            t.start()

    def _read(self, src: socket.socket, pipe: queue.Queue) -> None:
        """Read pieces from ``src`` as they come, stamped with their arrival time."""
        try:
            while not self.dead.is_set():
                ready, _, _ = select.select([src], [], [], POLL_S)
                if not ready:
                    continue
                data = src.recv(PIECE_BYTES)
                self._put(pipe, (time.monotonic(), data))
                if not data:  # EOF: the writer closes both sides once it has delivered all
                    return
        except (OSError, ValueError):
            self.close(reset=True)

    def _put(self, pipe: queue.Queue, item) -> None:
        while not self.dead.is_set():
            try:
                pipe.put(item, timeout=POLL_S)
                return
            except queue.Full:
                continue

    def _write(self, dst: socket.socket, pipe: queue.Queue, up: bool) -> None:
        """Deliver pieces to ``dst`` at their scheduled time; reset at the allowance."""
        link = self.link
        rate = link.rate_bps / 8.0  # bytes per second
        t_last, tokens = time.monotonic(), float(link.burst_bytes)
        try:
            while not self.dead.is_set():
                try:
                    arrived, data = pipe.get(timeout=POLL_S)
                except queue.Empty:
                    continue
                if not data:
                    self.close(reset=False)
                    return
                # token bucket in virtual time: when the last byte of this piece leaves
                t = max(arrived, t_last)
                tokens = min(float(link.burst_bytes), tokens + (t - t_last) * rate)
                if tokens < len(data):
                    t += (len(data) - tokens) / rate
                    tokens = float(len(data))
                tokens -= len(data)
                t_last = t
                wait = t + link.delay_s - time.monotonic()
                if wait > 0 and self.dead.wait(wait):
                    return
                with self.lock:
                    allowed = len(data) if not link.reset_every else min(
                        len(data), link.reset_every - self.forwarded)
                    self.forwarded += allowed
                    cut = bool(link.reset_every) and self.forwarded >= link.reset_every
                if allowed:
                    self._send(dst, data[:allowed])
                    link._count(up, allowed)
                if cut:
                    self.close(reset=True, counted=True)
                    return
        except (OSError, ValueError):
            self.close(reset=True)

    def _send(self, dst: socket.socket, data: bytes) -> None:
        view = memoryview(data)
        while view and not self.dead.is_set():
            _, ready, _ = select.select([], [dst], [], POLL_S)
            if ready:
                view = view[dst.send(view):]

    def close(self, reset: bool, counted: bool = False) -> None:
        """Close both sides once: abruptly (RST) if ``reset``, else gracefully."""
        with self.lock:
            if self.dead.is_set():
                return
            self.dead.set()
        if counted:
            self.link._count_reset()
        for s in (self.client, self.server):
            try:
                if reset:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
            except OSError:
                pass

    def join(self, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        for t in self.threads:
            if t is not threading.current_thread():
                t.join(max(0.0, end - time.monotonic()))


class Netem:
    """A TCP proxy 127.0.0.1:``listen_port`` -> 127.0.0.1:``target_port`` with delay,
    a rate limit and periodic connection resets (see the module docstring)."""

    def __init__(self, target_port: int, *, delay_s: float = 0.2, rate_bps: float = 1e6,
                 reset_every: int = 256 << 10, burst_bytes: int = PIECE_BYTES,
                 listen_port: int = 0, queue_pieces: int = 8,
                 lifetime_s: float = 300.0) -> None:
        if burst_bytes < PIECE_BYTES:
            raise ValueError(f"burst_bytes must be >= one piece ({PIECE_BYTES})")
        self.target_port, self.delay_s, self.rate_bps = target_port, delay_s, rate_bps
        self.reset_every, self.burst_bytes = reset_every, burst_bytes
        self.queue_pieces, self.lifetime_s = queue_pieces, lifetime_s
        self.listen_port = listen_port
        self.bytes_up = self.bytes_down = self.resets = self.connections = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._conns: list[_Conn] = []
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT`` to connect to instead of the target."""
        return f"{HOST}:{self.listen_port}"

    def stats(self) -> dict[str, int]:
        """The counters: bytes each way, resets done, connections accepted."""
        with self._lock:
            return {"bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                    "resets": self.resets, "connections": self.connections}

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Listen and start accepting (in a background thread)."""
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind((HOST, self.listen_port))
        lst.listen(16)
        self.listen_port = lst.getsockname()[1]
        self._listener = lst
        self._acceptor = threading.Thread(target=self._accept, daemon=True, name="netem-accept")
        self._acceptor.start()

    def _accept(self) -> None:
        assert self._listener is not None
        end = time.monotonic() + self.lifetime_s
        try:
            while not self._stop.is_set() and time.monotonic() < end:
                ready, _, _ = select.select([self._listener], [], [], POLL_S)
                if not ready:
                    continue
                client, _ = self._listener.accept()
                try:
                    server = socket.create_connection((HOST, self.target_port), timeout=5)
                except OSError:
                    client.close()  # the target is down: the client sees a closed connection
                    continue
                for s in (client, server):
                    s.setblocking(False)
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn = _Conn(self, client, server)
                with self._lock:
                    self._conns = [c for c in self._conns if not c.dead.is_set()] + [conn]
                    self.connections += 1
                conn.start()
        except (OSError, ValueError):
            pass
        finally:
            if time.monotonic() >= end:  # stopped by itself: drop what is still open
                self._close_all()

    def _close_all(self) -> list[_Conn]:
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.close(reset=True)
        return conns

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, reset live connections, join every thread (bounded)."""
        self._stop.set()
        end = time.monotonic() + timeout_s
        if self._acceptor is not None:
            self._acceptor.join(timeout_s)
        if self._listener is not None:
            self._listener.close()
        for c in self._close_all():
            c.join(max(0.0, end - time.monotonic()))

    def _count(self, up: bool, n: int) -> None:
        with self._lock:
            if up:
                self.bytes_up += n
            else:
                self.bytes_down += n

    def _count_reset(self) -> None:
        with self._lock:
            self.resets += 1
