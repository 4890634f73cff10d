"""What a daemon lets one caller, and all callers together, hold: the limits against starvation.

A grpc sync server runs every call on one thread pool. A client that opens a
``Write`` stream and then sends nothing holds a worker until the stream ends;
forty such streams once made ``List`` and even ``Health.Check`` time out.
``UploadSlots`` admits a ``Write`` only while its caller holds fewer than
``max_streams_per_caller`` and all callers fewer than ``max_uploads`` (well
under the pool's ``max_workers``, so unary calls and health always find a
thread), and a watchdog cancels an upload that sends nothing for
``upload_idle_s`` or outlives its total deadline, which grows with its size
(``upload_min_rate_bytes_s``) so a slow but moving transfer is never cut.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc

from pnc_net.errors import InvalidInputError, ResourceExhaustedError
from pnc_net.serve.channel import MAX_MESSAGE_BYTES

log = logging.getLogger("pnc.limits")
MAX_PREDICT_IMAGES = 1024  # the most images one Predict may carry (also Node.predict's guard)


@dataclass(frozen=True)
class Limits:
    """A daemon's resource limits (every field is a daemon flag; ``docs/operations.md``)."""

    max_workers: int = 32  # gRPC worker threads
    max_streams_per_caller: int = 4  # concurrent Write streams of one caller
    max_uploads: int = 16  # concurrent Write streams of all callers (< max_workers)
    upload_idle_s: float = 30.0  # an upload that sends nothing this long is cancelled
    upload_min_total_s: float = 120.0  # total deadline of an upload: at least this ...
    upload_min_rate_bytes_s: float = 32_000.0  # ... or its size at this rate (~256 kbit/s)
    part_ttl_s: float = 24 * 3600.0  # uploads/*.part untouched this long are removed
    predict_max_images: int = MAX_PREDICT_IMAGES
    predict_max_bytes: int = MAX_MESSAGE_BYTES

    def __post_init__(self) -> None:
        if not 1 <= self.max_uploads < self.max_workers:
            raise InvalidInputError(f"--max-uploads must be 1..{self.max_workers - 1} (below "
                                    "--max-workers, so health and reads always find a thread)")
        if not 1 <= self.max_streams_per_caller <= self.max_uploads:
            raise InvalidInputError("--max-streams-per-caller must be 1..--max-uploads")
        if min(self.upload_idle_s, self.upload_min_total_s, self.upload_min_rate_bytes_s,
               self.part_ttl_s) <= 0:
            raise InvalidInputError("upload deadlines, rates and --part-ttl must be > 0")
        if self.predict_max_images < 1 or self.predict_max_bytes < 1:
            raise InvalidInputError("--predict-max-images and --predict-max-bytes must be >= 1")

    def upload_deadline_s(self, size_bytes: int) -> float:
        """The total time an upload of ``size_bytes`` may take."""
        return max(self.upload_min_total_s, size_bytes / self.upload_min_rate_bytes_s)


def caller_of(context: grpc.ServicerContext) -> str:
    """Who is calling: the peer's host and (a digest of) its credentials, so callers behind
    one address with different tokens are counted apart."""
    peer = context.peer() or ""
    host = peer.split(":", 1)[1].rsplit(":", 1)[0] if ":" in peer else peer
    auth = dict(context.invocation_metadata() or ()).get("authorization", "")
    return f"{host}/{hashlib.sha256(str(auth).encode()).hexdigest()[:8]}"


@dataclass
class UploadSlot:
    """One admitted upload, as the watchdog sees it."""

    context: grpc.ServicerContext
    limits: Limits
    started: float = field(default_factory=time.monotonic)
    last_progress: float = field(default_factory=time.monotonic)
    deadline: float = 0.0
    reason: str = ""  # why the watchdog cancelled it

    def __post_init__(self) -> None:
        self.expect(0)

    def expect(self, size_bytes: int) -> None:
        """The upload's size is known: its total deadline follows from it."""
        self.deadline = self.started + self.limits.upload_deadline_s(size_bytes)

    def progress(self) -> None:
        """A chunk arrived: the idle clock starts again."""
        self.last_progress = time.monotonic()


class UploadSlots:
    """Admission of Write streams and their idle and total deadlines."""

    def __init__(self, limits: Limits, on_tick: Callable[[], None] | None = None) -> None:
        self.limits = limits
        self._per_caller: Counter[str] = Counter()
        self._watches: dict[int, UploadSlot] = {}
        self._lock = threading.Lock()
        self._on_tick = on_tick  # periodic housekeeping (stale .part files)
        self._stop = threading.Event()
        threading.Thread(target=self._watchdog, daemon=True, name="upload-watchdog").start()

    @contextmanager
    def admit(self, context: grpc.ServicerContext) -> Iterator[UploadSlot]:
        """Hold a slot for one upload (call its ``progress()`` on every chunk).
        ``ResourceExhaustedError`` when the caller or the daemon is at its limit."""
        caller = caller_of(context)
        with self._lock:
            if self._per_caller[caller] >= self.limits.max_streams_per_caller:
                raise ResourceExhaustedError(
                    f"this caller already has {self._per_caller[caller]} uploads open (limit "
                    f"{self.limits.max_streams_per_caller}); retry when one finishes")
            if sum(self._per_caller.values()) >= self.limits.max_uploads:
                raise ResourceExhaustedError(f"the daemon has {self.limits.max_uploads} uploads "
                                             "open; retry later")
            self._per_caller[caller] += 1
            watch = UploadSlot(context, self.limits)
            self._watches[id(watch)] = watch
        try:
            yield watch
        finally:
            with self._lock:
                self._per_caller[caller] -= 1
                if self._per_caller[caller] <= 0:
                    del self._per_caller[caller]
                self._watches.pop(id(watch), None)
            if watch.reason:
                log.warning("upload cancelled: %s", watch.reason, extra={"caller": caller})

    def open_uploads(self) -> int:
        """Uploads holding a slot now."""
        with self._lock:
            return sum(self._per_caller.values())

    def stop(self) -> None:
        """End the watchdog (the server is stopping)."""
        self._stop.set()

    def _watchdog(self, every_s: float = 0.5) -> None:
        ticks = 0
        while not self._stop.wait(every_s):
            now = time.monotonic()
            with self._lock:
                watches = list(self._watches.values())
            for w in watches:
                if not w.reason and now - w.last_progress > self.limits.upload_idle_s:
                    w.reason = f"no data for {self.limits.upload_idle_s:.0f} s"
                elif not w.reason and now > w.deadline:
                    w.reason = "total upload deadline passed"
                else:
                    continue
                w.context.cancel()  # unblocks the handler's read of the next chunk
            ticks += 1
            if self._on_tick is not None and ticks % 120 == 0:  # about once a minute
                self._on_tick()
