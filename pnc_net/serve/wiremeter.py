"""Count the bytes that really cross the wire: a loopback TCP forwarder.

``with WireMeter(("127.0.0.1", port)) as m: ...connect to m.address...`` then
``m.bytes_up`` / ``m.bytes_down`` hold every byte of HTTP/2 framing, headers
and payload in each direction. Used by the transport benchmark and ``pnc demo``.
It listens on 127.0.0.1 only.
"""

from __future__ import annotations

import socket
import threading
from typing import Self


class WireMeter:
    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.bytes_up = 0
        self.bytes_down = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True, name="wiremeter")

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._listener.close()

    @property
    def total(self) -> int:
        """Bytes in both directions so far."""
        return self.bytes_up + self.bytes_down

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                down, _ = self._listener.accept()
            except OSError:
                return
            up = socket.create_connection(self.upstream)
            for a, b, attr in ((down, up, "bytes_up"), (up, down, "bytes_down")):
                threading.Thread(target=self._pump, args=(a, b, attr), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, attr: str) -> None:
        try:
            while data := src.recv(1 << 20):
                with self._lock:
                    setattr(self, attr, getattr(self, attr) + len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
