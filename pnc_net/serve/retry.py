"""One retry policy for every call that crosses the network: jittered exponential backoff.

``retry(fn, attempts=..., retryable=...)`` runs ``fn`` until it returns, raises
an error that is not retryable, or runs out of attempts (then the last error is
raised). With ``progress=`` (a count that grows as the work gets done, such as the
bytes a server has committed), an attempt that advanced it is not held against the
budget: ``attempts`` then bounds *consecutive attempts without progress*, and the
backoff starts over, so a slow or often-broken link that keeps moving is never given
up on, while one that is stuck still fails after ``attempts`` tries. ``Backoff`` is
the delay schedule; the sender's pushers, which retry forever, iterate it themselves.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Delays ``first_s, first_s * factor, ...`` capped at ``max_s``, each stretched by up
    to ``jitter`` (so clients that failed together do not retry together)."""

    first_s: float = 0.2
    max_s: float = 5.0
    factor: float = 2.0
    jitter: float = 0.5

    def delays(self) -> Iterator[float]:
        """The delay before each retry, forever (the caller stops)."""
        delay = self.first_s
        while True:
            yield delay * (1 + random.random() * self.jitter)
            delay = min(delay * self.factor, self.max_s)


def retry(fn: Callable[[], T], *, attempts: int, retryable: Callable[[BaseException], bool],
          backoff: Backoff = Backoff(), sleep: Callable[[float], None] = time.sleep,
          progress: Callable[[], int] | None = None) -> T:
    """``fn()``, tried while it raises a ``retryable`` error, up to ``attempts`` times in a row
    without progress.

    ``progress()`` is read before the first attempt and after each failure; a failed
    attempt that raised it resets the count of attempts and the backoff. Without
    ``progress`` every attempt counts (``attempts`` in all)."""
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    delays = backoff.delays()
    mark = progress() if progress is not None else 0
    stalled = 0  # consecutive failed attempts without progress
    while True:
        try:
            return fn()
        except Exception as err:
            now = progress() if progress is not None else mark
            advanced = now > mark
            if advanced:
                mark, stalled, delays = now, 0, backoff.delays()
            else:
                stalled += 1
            if stalled >= attempts or not retryable(err):
                raise
            sleep(next(delays))
