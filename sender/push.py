"""Keeping receivers in sync: one pusher thread per receiver.

Each pusher wakes when the store gains a package (a Write, or a file another
tool put there, seen by polling) and at least every ``resync_s``; it asks its
receiver which packages it lacks (FindMissing) and writes them, resuming from
the committed offset. Unreachable receivers are retried with exponential
backoff and jitter; a receiver that refuses a package for good
(INVALID_ARGUMENT, FAILED_PRECONDITION) is not asked again until the resync.
"""

from __future__ import annotations

import logging
import threading
import time

from pnc_net.errors import BusyError, PncError, RemoteError, UnauthenticatedError
from pnc_net.serve.client import PncClient
from pnc_net.serve.retry import Backoff
from pnc_net.serve.store import PackageStore

log = logging.getLogger("pnc.sender")
BACKOFF = Backoff(first_s=0.1, max_s=10.0)  # a receiver that is down is retried forever
TRANSIENT = (RemoteError, BusyError, UnauthenticatedError)


class Pusher(threading.Thread):
    def __init__(self, store: PackageStore, address: str, client_kwargs: dict,
                 resync_s: float) -> None:
        super().__init__(daemon=True, name=f"push-{address}")
        self.store, self.address, self.client_kwargs = store, address, client_kwargs
        self.resync_s = resync_s
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.synced: set[str] = set()
        self.refused: dict[str, str] = {}

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    def run(self) -> None:
        client = PncClient(self.address, timeout_s=10, max_attempts=3, **self.client_kwargs)
        delays = BACKOFF.delays()
        last_full = 0.0
        while not self.stopping.is_set():
            full = time.monotonic() - last_full >= self.resync_s
            self.wake.clear()  # before the scan: a package stored during it wakes us again
            try:
                self.sync_once(client, full)
                last_full = time.monotonic() if full else last_full
                delays = BACKOFF.delays()
                self.wake.wait(self.resync_s)
            except PncError as err:
                delay = next(delays)
                log.warning("push to %s failed: %s (retry in %.1f s)", self.address, err, delay)
                self.stopping.wait(delay)
        client.close()

    def sync_once(self, client: PncClient, full: bool) -> int:
        ids = self.store.ids()
        if full:
            self.synced.clear()
            self.refused.clear()
        todo = [i for i in ids if i not in self.synced and i not in self.refused]
        if not todo:
            return 0
        sizes = {i: (self.store.packages_dir / f"{i}.pnc").stat().st_size for i in todo}
        missing = {s for s, _ in client.find_missing("packages", list(sizes.items()))}
        pushed = 0
        for pid in todo:
            if pid not in missing:
                self.synced.add(pid)
                continue
            try:
                client.send_package(self.store.get(pid))
            except TRANSIENT:
                raise  # unreachable, busy, or not accepting our token yet: back off, retry
            except PncError as err:  # refused for good: remember why
                self.refused[pid] = str(err)
                log.warning("receiver %s refused %s: %s", self.address, pid[:12], err)
                continue
            state = client.last_write.state if client.last_write else ""
            log.info("pushed", extra={"package": pid[:12], "to": self.address, "state": state})
            self.synced.add(pid)
            pushed += 1
        return pushed


class StoreWatcher(threading.Thread):
    """Wakes the pushers when a package appears in the store by any route."""

    def __init__(self, store: PackageStore, pushers: list[Pusher], poll_s: float) -> None:
        super().__init__(daemon=True, name="store-watch")
        self.store, self.pushers, self.poll_s = store, pushers, poll_s
        self.stopping = threading.Event()

    def run(self) -> None:
        seen = set(self.store.ids())
        while not self.stopping.wait(self.poll_s):
            now = set(self.store.ids())
            if now - seen:
                self.notify()
            seen = now

    def notify(self, _pid: str | None = None) -> None:
        for p in self.pushers:
            p.wake.set()

    def stop(self) -> None:
        self.stopping.set()
        for p in self.pushers:
            p.stop()
