"""A node's package and blob store on disk: content-addressed, crash-safe.

Layout of a store folder::

    packages/<sha256>.pnc    package bytes (the id is their sha256)
    packages/<sha256>.json   the node's record of it: state, errors, metadata
    blobs/<sha256>           other blobs (zoo weights, large artifacts)
    uploads/<kind>-<sha256>-<size>.part   resumable writes in progress

Everything visible under ``packages/`` and ``blobs/`` was written with temp
file + fsync + rename after its digest was checked, so a crash never leaves a
half package behind; an interrupted upload stays in ``uploads/`` and resumes
from its size. Ids come from clients: they are checked to be hex before they
go near a path (``../x`` is refused, never resolved).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

from pnc_net import wire
from pnc_net.errors import IntegrityError, InvalidInputError, NotFoundError
from pnc_net.fsutil import Sha256Stream, atomic_write_bytes, sha256_bytes
from pnc_net.package import Package
from pnc_net.serve.channel import HEX, check_digest  # noqa: F401 - re-exported

KINDS = ("packages", "blobs")
STATES = ("stored", "received", "verified", "repaired", "failed")


@dataclass
class PackageRecord:
    """What a node knows about one package it holds."""

    id: str
    size_bytes: int
    state: str = "stored"
    detail: str = ""
    received_unix_s: float = 0.0
    target: str = ""
    sources: list[str] = field(default_factory=list)
    label_names: list[str] = field(default_factory=list)
    format_version: int = 0
    fingerprint_error: float | None = None
    fingerprint_error_before: float | None = None
    metadata: dict = field(default_factory=dict)

    def to_json(self) -> str:
        """The record as sorted JSON (the ``.json`` beside each package)."""
        return json.dumps(asdict(self), sort_keys=True, default=float)

    @classmethod
    def from_json(cls, text: str) -> PackageRecord:
        """A record from its JSON; keys a newer pnc added are ignored."""
        raw = json.loads(text)
        return cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__})


class PackageStore:
    """Packages and blobs of one node. ``put(bytes) -> id``; ``get(id or prefix) -> bytes``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.packages_dir = self.root / "packages"
        self.blobs_dir = self.root / "blobs"
        self.uploads_dir = self.root / "uploads"
        for d in (self.packages_dir, self.blobs_dir, self.uploads_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"PackageStore({str(self.root)!r})"

    # ------------------------------------------------------------------ packages
    def put(self, data: bytes, state: str = "stored", record: PackageRecord | None = None,
            package: Package | None = None) -> str:
        """Store atomically, return the id (sha256 of ``data``). Bytes come validated:
        with their ``record`` or their decoded ``package``, else they are decoded here.

        The record is written before the bytes: a package is listed once its ``.pnc``
        exists, and by then its record is complete."""
        pid = sha256_bytes(data)
        path = self.packages_dir / f"{pid}.pnc"
        if record is None:
            record = record_for(pid, data, package or wire.decode(data), state)
        if path.exists():
            return pid
        self.save_record(record)
        atomic_write_bytes(path, data)
        return pid

    def has_package(self, pid: str) -> bool:
        """Whether the store holds this package id."""
        return (self.packages_dir / f"{check_digest(pid)}.pnc").exists()

    def ids(self) -> list[str]:
        """Every stored package id, sorted."""
        return sorted(p.stem for p in self.packages_dir.glob("*.pnc") if HEX.match(p.stem))

    def resolve(self, id_or_prefix: str) -> str:
        """The full id for an id or a unique prefix."""
        want = check_digest(id_or_prefix, prefix_ok=True, what="package id")
        hits = [i for i in self.ids() if i.startswith(want)]
        if len(hits) == 1:
            return hits[0]
        if hits:
            raise InvalidInputError(f"package id prefix {want!r} is ambiguous: it matches "
                                    + ", ".join(h[:16] for h in hits[:5]))
        raise NotFoundError(f"package {want!r} is not in the store ({len(self.ids())} packages); "
                            "run `pnc status` to list them")

    def get(self, id_or_prefix: str) -> bytes:
        """A package's bytes, digest checked against its id."""
        pid = self.resolve(id_or_prefix)
        data = (self.packages_dir / f"{pid}.pnc").read_bytes()
        if sha256_bytes(data) != pid:
            raise IntegrityError(f"stored package {pid} is corrupt on disk (digest mismatch)")
        return data

    def record(self, id_or_prefix: str) -> PackageRecord:
        """A package's record (described on the fly when none was written)."""
        pid = self.resolve(id_or_prefix)
        path = self.packages_dir / f"{pid}.json"
        if not path.exists():  # written by an older pnc or by hand: describe it, write nothing
            data = self.get(pid)
            return record_for(pid, data, wire.decode(data), "stored")
        return PackageRecord.from_json(path.read_text())

    def save_record(self, record: PackageRecord) -> None:
        """Write a record atomically."""
        if record.state not in STATES:
            raise InvalidInputError(f"unknown package state {record.state!r}")
        atomic_write_bytes(self.packages_dir / f"{record.id}.json", record.to_json().encode())

    def list(self) -> list[PackageRecord]:
        """Every package's record, oldest first."""
        recs = [self.record(i) for i in self.ids()]
        return sorted(recs, key=lambda r: (r.received_unix_s, r.id))

    def note_delivery(self, pid: str, receiver: str, state: str, reason: str = "") -> None:
        """A sender's record of what ``receiver`` answered for this package: ``delivered``
        (or the receiver's state) or ``refused`` with the reason, shown by ``pnc status``."""
        with self._lock:
            record = self.record(pid)
            record.metadata.setdefault("push", {})[receiver] = {
                "state": state, "reason": reason[:500], "unix_s": round(time.time(), 3)}
            refused = {r: v["reason"] for r, v in record.metadata["push"].items()
                       if v["state"] in ("refused", "failed")}
            record.detail = "; ".join(f"{r} refused it: {why}" for r, why in refused.items())
            self.save_record(record)

    def remove(self, pid: str) -> None:
        """Forget a package: its record and its bytes."""
        pid = check_digest(pid)
        (self.packages_dir / f"{pid}.json").unlink(missing_ok=True)
        (self.packages_dir / f"{pid}.pnc").unlink(missing_ok=True)

    # ------------------------------------------------------------------ blobs
    def blob_path(self, sha256: str) -> Path:
        """Where a zoo blob with this digest lives in the store."""
        return self.blobs_dir / check_digest(sha256)

    def has(self, kind: str, sha256: str) -> bool:
        """Whether a package or blob with this digest is stored."""
        if kind == "packages":
            return self.has_package(sha256)
        if kind == "blobs":
            return self.blob_path(sha256).exists()
        raise InvalidInputError(f"unknown blob kind {kind!r}; use one of {list(KINDS)}")

    # ------------------------------------------------------------------ uploads
    def remove_stale_uploads(self, max_age_s: float) -> int:
        """Delete partial uploads not written to for ``max_age_s``; how many went."""
        cutoff, removed = time.time() - max_age_s, 0
        for part in self.uploads_dir.glob("*.part"):
            try:
                if part.stat().st_mtime < cutoff:
                    part.unlink()
                    removed += 1
            except FileNotFoundError:  # finished or removed meanwhile
                continue
        return removed

    def upload(self, kind: str, sha256: str, size: int) -> Upload:
        """The resumable upload of one blob (its ``.part`` file in ``uploads/``)."""
        if kind not in KINDS:
            raise InvalidInputError(f"unknown blob kind {kind!r}; use one of {list(KINDS)}")
        return Upload(self, kind, check_digest(sha256), int(size))


WRITEBACK_BYTES = 8 << 20  # an upload asks the kernel to start writing back every 8 MiB
HASH_THREAD_AFTER_BYTES = 4 << 20  # an upload hashes on a second thread past this


class Upload:
    """A resumable write of one blob: appends to ``uploads/…part``; ``finish`` verifies the
    digest and returns the bytes' path, or raises ``IntegrityError`` and deletes them.

    Each chunk is written straight to the unbuffered ``.part`` file and hashed as it
    arrives: one pass over the bytes, nothing buffered; past ``HASH_THREAD_AFTER_BYTES``
    the hash runs on a second thread while the chunk is written (``Sha256Stream``). Every ``WRITEBACK_BYTES`` the
    kernel is asked to start writing the new range to disk (``posix_fadvise``
    ``DONTNEED`` starts writeback of dirty pages on Linux; the pages stay cached while
    dirty), so the fsync in ``finish`` waits for the tail only, not the whole blob."""

    def __init__(self, store: PackageStore, kind: str, sha256: str, size: int) -> None:
        self.store, self.kind, self.sha256, self.size = store, kind, sha256, size
        self.path = store.uploads_dir / f"{kind}-{sha256}-{size}.part"
        self._hash: Sha256Stream | None = None
        self._file: BinaryIO | None = None
        self._offset = 0  # bytes in the .part file (the committed size)
        self._flushed = 0  # where the last writeback request ended

    def committed_size(self) -> int:
        """Bytes of this upload already on disk (where a client resumes)."""
        return self.path.stat().st_size if self.path.exists() else 0

    def open(self, offset: int) -> None:
        """Start appending at ``offset``, which must equal the committed size. The bytes
        already there are hashed again from disk, so a resumed upload is verified whole."""
        committed = self.committed_size()
        if offset != committed:
            raise InvalidInputError(f"write_offset {offset} does not match the committed size "
                                    f"{committed}; ask QueryWriteStatus and resume from there")
        if committed > self.size:
            raise InvalidInputError(f"the partial upload holds {committed} bytes, more than the "
                                    f"declared size {self.size}")
        self._hash = Sha256Stream(inline_bytes=HASH_THREAD_AFTER_BYTES)
        if committed:
            with open(self.path, "rb") as f:
                while chunk := f.read(1 << 22):
                    self._hash.update(chunk)
        # unbuffered: each chunk goes to the kernel as it arrives, so the committed size
        # QueryWriteStatus reports (the file's size) is what was written
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - held across appends
        self._offset = self._flushed = committed

    def append(self, data: bytes | memoryview) -> int:
        """Write one chunk (hashing it as it goes); the committed size after it."""
        assert self._file is not None and self._hash is not None
        n = len(data)
        if self._offset + n > self.size:
            raise InvalidInputError(f"write runs past the declared size {self.size}")
        view, done = memoryview(data), 0
        self._hash.update(view)  # on its own thread past the first chunks: overlaps the write
        while done < n:  # a raw write may take less than it was given
            wrote = self._file.write(view[done:])
            if not wrote:
                raise OSError(f"no progress writing {self.path}")
            done += wrote
        self._offset += n
        if self._offset - self._flushed >= WRITEBACK_BYTES:
            self._start_writeback()
        return self._offset

    def _start_writeback(self) -> None:
        assert self._file is not None
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._file.fileno(), self._flushed, self._offset - self._flushed,
                             os.POSIX_FADV_DONTNEED)
        self._flushed = self._offset

    def close(self) -> None:
        """Close the ``.part`` file; what arrived stays for resumption."""
        if self._hash is not None:
            self._hash.close()
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self) -> Path:
        """Verify size and digest; on success the bytes are durable at the returned path."""
        assert self._file is not None and self._hash is not None
        got_size = self._offset
        digest = self._hash.hexdigest()
        if got_size != self.size or digest != self.sha256:
            self.discard()
            raise InvalidInputError(
                f"blob digest mismatch: received {got_size} bytes with sha256 {digest}, "
                f"the resource name promised {self.size} bytes with {self.sha256}; nothing stored")
        os.fsync(self._file.fileno())
        self.close()
        return self.path

    def discard(self) -> None:
        """Close and delete what arrived."""
        self.close()
        self.path.unlink(missing_ok=True)


def record_for(pid: str, data: bytes, package, state: str) -> PackageRecord:
    """A fresh record for a decoded package."""
    return PackageRecord(
        id=pid, size_bytes=len(data), state=state, received_unix_s=time.time(),
        target=package.target.name, sources=[m.source.name for m in package.modules],
        label_names=list(package.label_names), format_version=package.format_version,
        metadata={"created_unix_s": package.created_unix_s,
                  "writer_version": package.writer_version,
                  "cloned_classes": [list(m.cloned_classes) for m in package.modules],
                  "positions": [[m.position_r, m.position_s] for m in package.modules],
                  "zoo_refs": [r.sha256 for r in package.zoo_refs()]})
