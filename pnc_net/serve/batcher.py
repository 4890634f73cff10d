"""Micro-batching of Predict calls: one forward pass for the requests of many clients.

A superbody forward on CPU costs a fixed overhead per layer call plus a part that
grows with the batch, so eight requests of 8 images each run much faster as one
forward of 64 than as eight forwards of 8 (``bench/bench_predict.py`` measures it on
a real receiver). ``MicroBatcher.run(key, model, x)`` queues ``x`` and blocks; a few
worker threads each take every request queued for one key (up to ``max_images``
images, whole requests only), run ONE forward under ``torch.no_grad()`` and hand each
caller its own rows. There is no waiting for a batch to fill by default
(``max_wait_s=0``): while one worker runs a forward, the next requests queue up and
the next free worker takes them all, so a lone client pays no extra latency and a
busy receiver batches by itself.

What runs is the callable the caller passes: a receiver's ``Node`` passes the package's
``fastpath.Forward`` (the compiled superbody, or its eager channels-last copy; see
``pnc_net/serve/fastpath.py``), run under ``torch.inference_mode()``. Rows are the same
as an unbatched forward up to float rounding (the layers, batch norm included in eval
mode, treat each sample on its own; only the kernels' summation order differs with the
batch size).

The queue is bounded (``max_queued_images``): past it a call is refused with
``BusyError`` (gRPC ABORTED, which clients may retry) instead of waiting behind work
it will time out on. A forward that raises fails every call of that batch with the
same error. ``stop()`` refuses new calls, lets the workers finish what is queued and
joins them; the workers are daemon threads, so a process never hangs on them.

A receiver builds one from its flags (``MicroBatcher.from_settings``):
``--predict-batch N`` images at most per forward (0 turns batching off: one forward
per request, as before) and ``--predict-workers`` (0: one per core, at most 4).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Self

import torch

from pnc_net.errors import BusyError, InvalidInputError, PreconditionError

log = logging.getLogger("pnc.batcher")


@dataclass(eq=False)
class _Call:
    """One queued request: its inputs and the future its caller waits on."""

    model: Callable[[torch.Tensor], torch.Tensor]
    x: torch.Tensor
    queued_at: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)


class MicroBatcher:
    """Batches forwards of the same model across concurrent callers (see the module doc)."""

    def __init__(self, *, workers: int | None = None, max_images: int = 64,
                 max_wait_s: float = 0.0, max_queued_images: int = 8192,
                 timeout_s: float = 60.0) -> None:
        # 64 images: the fastest batch per image of the default superbody on CPU; larger
        # batches fall out of cache and get slower per image (bench/bench_predict.py).
        workers = workers or min(4, os.cpu_count() or 1)
        if workers < 1 or max_images < 1 or max_queued_images < 1:
            raise InvalidInputError("workers, max_images and max_queued_images must be >= 1")
        if max_wait_s < 0 or timeout_s <= 0:
            raise InvalidInputError("max_wait_s must be >= 0 and timeout_s > 0")
        self.workers, self.max_images, self.max_wait_s = workers, max_images, max_wait_s
        self.max_queued_images, self.timeout_s = max_queued_images, timeout_s
        self._cond = threading.Condition()
        self._queues: dict[str, deque[_Call]] = {}  # per key, oldest first
        self._queued_images = 0
        self._busy: set[str] = set()  # keys a worker is taking from (waiting out max_wait_s)
        self._threads: list[threading.Thread] = []
        self._stopping = False

    @classmethod
    def from_settings(cls, batch_images: int, workers: int = 0) -> Self | None:
        """The batcher a receiver's ``--predict-batch`` and ``--predict-workers`` ask for;
        None (one forward per request) when ``batch_images`` is 0."""
        if batch_images < 0 or workers < 0:
            raise InvalidInputError("--predict-batch and --predict-workers must be >= 0")
        return cls(workers=workers or None, max_images=batch_images) if batch_images else None

    # ------------------------------------------------------------------ callers
    def run(self, key: str, model: Callable[[torch.Tensor], torch.Tensor],
            x: torch.Tensor) -> torch.Tensor:
        """``model(x)`` computed in a batch with other callers' inputs for ``key``.

        Calls with the same ``key`` must pass the same model. Raises what the forward
        raised, ``BusyError`` when the queue is full or no answer came within
        ``timeout_s``, and ``PreconditionError`` once ``stop()`` was called."""
        call = _Call(model, x)
        with self._cond:
            if self._stopping:
                raise PreconditionError("the receiver is shutting down; predict elsewhere")
            if self._queued_images + len(x) > self.max_queued_images:
                raise BusyError(f"the receiver has {self._queued_images} images queued to "
                                f"predict (at most {self.max_queued_images}); retry shortly")
            self._queues.setdefault(key, deque()).append(call)
            self._queued_images += len(x)
            self._start_workers()
            self._cond.notify()
        try:
            return call.future.result(self.timeout_s)
        except FutureTimeout:
            if call.future.cancel():  # still queued: take it out of the count
                with self._cond:
                    self._drop(key, call)
            raise BusyError(f"no prediction within {self.timeout_s:.0f} s; the receiver "
                            "is overloaded, retry later") from None

    def stop(self, timeout_s: float = 30.0) -> None:
        """Refuse new calls, finish the queued ones, and join the workers."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ workers
    def _start_workers(self) -> None:
        """Workers start with the first call (a sender's node never starts any)."""
        while len(self._threads) < self.workers:
            t = threading.Thread(target=self._work, daemon=True,
                                 name=f"pnc-predict-{len(self._threads)}")
            self._threads.append(t)
            t.start()

    def _drop(self, key: str, call: _Call) -> None:
        queue = self._queues.get(key)
        if queue is not None and call in queue:
            queue.remove(call)
            self._queued_images -= len(call.x)
            if not queue:
                del self._queues[key]

    def _work(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            self._forward(batch)

    def _take(self) -> list[_Call] | None:
        """Every queued call of the key whose oldest call waited longest (whole calls, up
        to ``max_images``; always at least one); None once stopping and drained."""
        with self._cond:
            while True:
                free = [k for k in self._queues if k not in self._busy]
                if free:
                    break
                if self._stopping and not self._queues:
                    return None
                self._cond.wait()
            key = min(free, key=lambda k: self._queues[k][0].queued_at)
            queue = self._queues[key]
            if self.max_wait_s > 0 and not self._stopping:
                # wait for the batch to fill, at most max_wait_s after its first call
                self._busy.add(key)
                until = queue[0].queued_at + self.max_wait_s
                while (sum(len(c.x) for c in queue) < self.max_images
                       and (left := until - time.monotonic()) > 0 and not self._stopping):
                    self._cond.wait(left)
                self._busy.discard(key)
            batch: list[_Call] = []
            n = 0
            while queue and (not batch or n + len(queue[0].x) <= self.max_images):
                call = queue.popleft()
                self._queued_images -= len(call.x)
                if call.future.set_running_or_notify_cancel():  # False: its caller gave up
                    batch.append(call)
                    n += len(call.x)
            if not queue:
                del self._queues[key]
            if self._queues:
                self._cond.notify()  # more work: wake another worker
            return batch

    def _forward(self, batch: list[_Call]) -> None:
        """One forward for the batch; each caller gets its rows, or the batch's error."""
        if not batch:
            return
        try:
            x = batch[0].x if len(batch) == 1 else torch.cat([c.x for c in batch])
            with torch.inference_mode():
                out = batch[0].model(x).contiguous()
            if len(out) != len(x):
                raise PreconditionError(f"the model returned {len(out)} rows for {len(x)} "
                                        "inputs; it cannot be batched")
        except BaseException as err:  # noqa: BLE001 - every caller of the batch gets it
            for c in batch:
                c.future.set_exception(err)
            if not isinstance(err, Exception):
                raise
            return
        i = 0
        for c in batch:
            c.future.set_result(out[i : i + len(c.x)])
            i += len(c.x)
