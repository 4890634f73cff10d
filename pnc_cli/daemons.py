"""Start and stop the daemons as child processes (``pnc demo``, the tests, the benchmarks).

The library builds servers (``pnc_net.serve.server.build_server``) but never
starts a daemon process by module name; this helper does, from the layer above.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from typing import IO

from pnc_net.errors import InvalidInputError, PreconditionError

ROLES = ("sender", "receiver")


def spawn_daemon(role: str, args: list[str], timeout_s: float = 120.0,
                 env: dict | None = None) -> tuple[subprocess.Popen, int]:
    """Start ``python -m <role> ARGS`` and wait for the line announcing its port.

    Returns ``(process, port)``. Its stderr (the JSON log) is drained in the
    background so the child never blocks on a full pipe.
    """
    if role not in ROLES:
        raise InvalidInputError(f"unknown daemon role {role!r}; use one of {list(ROLES)}")
    proc = subprocess.Popen([sys.executable, "-m", role, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    port: list[int] = []
    ready = threading.Event()

    def read_stdout() -> None:
        for line in proc.stdout:
            m = re.search(r"port=(\d+)", line)
            if m and not port:
                port.append(int(m.group(1)))
                ready.set()
        ready.set()

    threading.Thread(target=read_stdout, daemon=True).start()
    if not ready.wait(timeout_s) or not port:
        proc.kill()
        err = proc.stderr.read()[-2000:] if proc.stderr else ""
        raise PreconditionError(f"{role} did not start within {timeout_s:.0f} s: {err}")
    threading.Thread(target=_drain, args=(proc.stderr,), daemon=True).start()
    return proc, port[0]


def stop_daemon(proc: subprocess.Popen, sig: int = signal.SIGTERM,
                timeout_s: float = 30.0) -> int | None:
    """Signal a daemon (graceful shutdown on SIGTERM), kill it if it lingers; its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def _drain(stream: IO[str]) -> None:
    for _ in stream:
        pass
