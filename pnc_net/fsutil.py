"""Crash-safe file writes (temp file in the same folder, fsync, rename) and sha256 helpers."""

from __future__ import annotations

import hashlib
import os
import queue
import tempfile
import threading
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = 0o644,
                       exclusive: bool = False) -> Path:
    """Write ``data`` so that ``path`` either holds all of it or is untouched.

    ``exclusive``: never replace an existing file (``FileExistsError``, atomically: the
    temp file is hard-linked to ``path``); the mode is set before the name appears."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if exclusive:
            os.link(tmp, path)
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``: the identity of zoo weights and package blobs."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (equals ``sha256_bytes`` of its contents)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


class Sha256Stream:
    """sha256 fed in order; past ``inline_bytes`` the hashing moves to a thread of its own
    (hashlib releases the GIL), so it overlaps receiving or writing the bytes. Small
    streams never start one. At most ``max_pending`` pieces wait for the thread (then
    ``update`` blocks), so a fast sender cannot pile up memory behind a slow hash.

    The pieces must stay unchanged until hashed: pass bytes or views of bytes."""

    def __init__(self, inline_bytes: int = 4 << 20, max_pending: int = 8) -> None:
        self._h = hashlib.sha256()
        self._inline = inline_bytes
        self._max_pending = max_pending
        self._queue: queue.Queue[bytes | memoryview | None] | None = None
        self._thread: threading.Thread | None = None

    def update(self, piece: bytes | memoryview) -> None:
        """Feed the next piece (hashed now, or queued for the thread)."""
        if self._queue is None:
            self._h.update(piece)
            self._inline -= len(piece)
            if self._inline <= 0:
                self._queue = queue.Queue(self._max_pending)
                self._thread = threading.Thread(target=self._run, name="pnc-sha256",
                                                daemon=True)
                self._thread.start()
        else:
            self._queue.put(piece)

    def _run(self) -> None:
        assert self._queue is not None
        while (piece := self._queue.get()) is not None:
            self._h.update(piece)

    def hexdigest(self) -> str:
        """The digest of everything fed (waits for the thread)."""
        self.close()
        return self._h.hexdigest()

    def close(self) -> None:
        """Stop the thread once it has hashed what it was given (idempotent)."""
        if self._thread is not None and self._queue is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
