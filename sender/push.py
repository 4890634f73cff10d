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
import math
import threading
import time
from collections.abc import Iterator

from pnc_net.errors import (
    BusyError,
    PncError,
    RemoteError,
    ResourceExhaustedError,
    UnauthenticatedError,
)
from pnc_net.serve.client import PncClient
from pnc_net.serve.retry import Backoff
from pnc_net.serve.store import PackageStore

log = logging.getLogger("pnc.sender")
BACKOFF = Backoff(first_s=0.1, max_s=10.0)  # a receiver that is down is retried forever


def _unreachable(err: PncError) -> bool:
    """The error means "this receiver", not "this package": down, or refusing our token."""
    return isinstance(err, UnauthenticatedError) or (
        isinstance(err, RemoteError) and err.grpc_code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"))


#: The receiver is busy with this package: retry it alone, later.
DEFERRED = (BusyError, ResourceExhaustedError)


class Pusher(threading.Thread):
    """Keeps one receiver in sync with the store.

    Each package is classified by the receiver's answer: delivered; refused for good
    (malformed, incompatible, untrusted, a receiver bug: recorded in the package's record
    with the reason and not sent again until the next resync); or deferred (the receiver
    is busy with it: that package alone backs off). Only an unreachable receiver, or one
    that refuses our token, makes the whole queue wait."""

    def __init__(self, store: PackageStore, address: str, client_kwargs: dict,
                 resync_s: float) -> None:
        super().__init__(daemon=True, name=f"push-{address}")
        self.store, self.address, self.client_kwargs = store, address, client_kwargs
        self.resync_s = resync_s
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.synced: set[str] = set()
        self.refused: dict[str, str] = {}
        self.deferred: dict[str, tuple[float, Iterator[float]]] = {}  # pid -> (retry at, delays)

    def stop(self) -> None:
        """Ask the thread to end after its current step."""
        self.stopping.set()
        self.wake.set()

    def run(self) -> None:
        """Sync, sleep until woken or the resync, repeat; back off while unreachable."""
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
                self.wake.wait(self._next_wait())
            except PncError as err:
                delay = next(delays)
                log.warning("push to %s failed: %s (retry in %.1f s)", self.address, err, delay)
                self.stopping.wait(delay)
        client.close()

    def _next_wait(self) -> float:
        soonest = min((at for at, _ in self.deferred.values()), default=math.inf)
        return max(0.0, min(self.resync_s, soonest - time.monotonic()))

    def sync_once(self, client: PncClient, full: bool) -> int:
        """Push every package the receiver lacks; the number delivered."""
        ids = self.store.ids()
        if full:
            self.synced.clear()
            self.refused.clear()
        now = time.monotonic()
        todo = [i for i in ids if i not in self.synced and i not in self.refused
                and self.deferred.get(i, (0.0, None))[0] <= now]
        if not todo:
            return 0
        sizes = {i: (self.store.packages_dir / f"{i}.pnc").stat().st_size for i in todo}
        missing = {s for s, _ in client.find_missing("packages", list(sizes.items()))}
        pushed = 0
        for pid in todo:
            if pid not in missing:
                self.synced.add(pid)
                continue
            pushed += self._push_one(client, pid)
        return pushed

    def _push_one(self, client: PncClient, pid: str) -> int:
        try:
            client.send_package(self.store.get(pid))
        except PncError as err:
            if _unreachable(err):
                raise  # the whole receiver is down or refuses us: the queue backs off
            if isinstance(err, DEFERRED):
                self._defer(pid, err)
                return 0
            self.refused[pid] = str(err)  # refused for good: remember why, in the record
            self.deferred.pop(pid, None)
            self._note(pid, "refused", str(err))
            log.warning("receiver %s refused %s: %s", self.address, pid[:12], err)
            return 0
        self.deferred.pop(pid, None)
        state = client.last_write.state if client.last_write else ""
        self._note(pid, state or "delivered", client.last_write.detail if client.last_write else "")
        log.info("pushed", extra={"package": pid[:12], "to": self.address, "state": state})
        self.synced.add(pid)
        return 1

    def _defer(self, pid: str, err: PncError) -> None:
        _, delays = self.deferred.get(pid, (0.0, BACKOFF.delays()))
        delay = next(delays)
        self.deferred[pid] = (time.monotonic() + delay, delays)
        log.info("receiver %s deferred %s: %s (this package retries in %.1f s)",
                 self.address, pid[:12], err, delay)

    def _note(self, pid: str, state: str, reason: str) -> None:
        """Record this receiver's answer in the package's record (``pnc status`` shows it)."""
        try:
            self.store.note_delivery(pid, self.address, state, reason)
        except PncError as err:  # the package was removed meanwhile
            log.info("could not record delivery of %s: %s", pid[:12], err)


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
