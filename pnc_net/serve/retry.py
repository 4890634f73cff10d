"""One retry policy for every call that crosses the network: jittered exponential backoff.

``retry(fn, attempts=..., retryable=...)`` runs ``fn`` until it returns, raises
an error that is not retryable, or runs out of attempts (then the last error is
raised). ``Backoff`` is the delay schedule; the sender's pushers, which retry
forever, iterate it themselves.
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
          backoff: Backoff = Backoff(), sleep: Callable[[float], None] = time.sleep) -> T:
    """``fn()``, tried up to ``attempts`` times while it raises a ``retryable`` error."""
    delays = backoff.delays()
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as err:
            if attempt == attempts or not retryable(err):
                raise
            sleep(next(delays))
    raise ValueError(f"attempts must be >= 1, got {attempts}")
