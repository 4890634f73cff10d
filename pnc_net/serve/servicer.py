"""The pnc services (CAS, ByteStream, Packages) over one ``Node``.

Handlers parse and check what the peer sent, call the node and build the
answer; they raise the project's errors and leave the mapping to statuses to
``interceptors.ErrorInterceptor``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from itertools import chain
from pathlib import Path

from pnc_net import __version__, wire
from pnc_net._proto import transport_pb2 as tpb
from pnc_net._proto import transport_pb2_grpc as tgrpc
from pnc_net.errors import BusyError, InvalidInputError
from pnc_net.serve.channel import CHUNK_BYTES, MAX_BLOB_BYTES, MAX_MESSAGE_BYTES
from pnc_net.serve.framing import WriteChunk, frame_read_response, parse_write_request
from pnc_net.serve.limits import Limits, UploadSlot, UploadSlots
from pnc_net.serve.node import Node
from pnc_net.serve.store import KINDS, PackageRecord, check_digest

log = logging.getLogger("pnc.rpc")
_SIZE = re.compile(r"[0-9]{1,20}")  # ASCII digits only: str.isdigit() accepts '²'


def parse_resource(name: str, need_size: bool) -> tuple[str, str, int | None]:
    """``kind/sha256[/size]`` -> parts; anything else (paths, ``../x``) is refused."""
    parts = name.split("/")
    if len(parts) not in (2, 3) or parts[0] not in KINDS or (need_size and len(parts) != 3):
        raise InvalidInputError(
            f"resource name {name[:100]!r} is not "
            f"{'|'.join(KINDS)}/<sha256>{'/<size>' if need_size else '[/<size>]'}")
    sha = check_digest(parts[1], what="resource digest")
    size = None
    if len(parts) == 3:
        if not _SIZE.fullmatch(parts[2]):
            raise InvalidInputError(f"resource size {parts[2][:40]!r} is not a number")
        size = int(parts[2])
        limit = wire.MAX_PACKAGE_BYTES if parts[0] == "packages" else MAX_BLOB_BYTES
        if size > limit:
            raise InvalidInputError(f"{parts[0]} of {size} bytes exceed the limit {limit}")
    return parts[0], sha, size


def info_proto(r: PackageRecord) -> tpb.PackageInfo:
    """A store record as the ``PackageInfo`` message of List and Stat."""
    return tpb.PackageInfo(
        id=r.id, size_bytes=r.size_bytes, state=r.state, detail=r.detail,
        received_unix_s=r.received_unix_s, target=r.target, sources=r.sources,
        label_names=r.label_names, format_version=r.format_version,
        fingerprint_error=r.fingerprint_error or 0.0,
        fingerprint_error_before=r.fingerprint_error_before or 0.0,
        metadata_json=json.dumps(r.metadata, sort_keys=True, default=float))


class Servicer(tgrpc.CasServicer, tgrpc.ByteStreamServicer, tgrpc.PackagesServicer):
    """All three services over one ``Node``."""

    def __init__(self, node: Node, auth_required: bool = False, on_package=None,
                 limits: Limits | None = None) -> None:
        self.node, self.auth_required, self.on_package = node, auth_required, on_package
        self.limits = limits or Limits()
        self.slots = UploadSlots(self.limits, on_tick=self.collect_stale_uploads)
        self.collect_stale_uploads()
        self._writing: set[str] = set()
        self._writing_lock = threading.Lock()

    def collect_stale_uploads(self) -> None:
        """Remove ``uploads/*.part`` files nobody has written to for ``part_ttl_s``."""
        removed = self.node.store.remove_stale_uploads(self.limits.part_ttl_s)
        if removed:
            log.info("removed %d stale partial uploads", removed)

    # ------------------------------------------------------------------ CAS
    def FindMissing(self, request, context):
        if request.kind not in KINDS:
            raise InvalidInputError(f"unknown kind {request.kind!r}; use one of {list(KINDS)}")
        missing = [d for d in request.digests
                   if not self.node.has(request.kind, check_digest(d.sha256))]
        return tpb.FindMissingResponse(missing=missing)

    def GetCapabilities(self, request, context):
        return tpb.Capabilities(max_message_bytes=MAX_MESSAGE_BYTES, chunk_bytes=CHUNK_BYTES,
                                package_format_versions=list(wire.READABLE_VERSIONS),
                                role=self.node.role, pnc_version=__version__,
                                auth_required=self.auth_required)

    # ------------------------------------------------------------------ ByteStream
    def QueryWriteStatus(self, request, context):
        kind, sha, size = parse_resource(request.resource_name, need_size=True)
        if self.node.has(kind, sha):
            return tpb.QueryWriteStatusResponse(committed_size=size, complete=True)
        committed = self.node.store.upload(kind, sha, size).committed_size()
        return tpb.QueryWriteStatusResponse(committed_size=committed, complete=False)

    def Read(self, request, context):
        kind, sha, _ = parse_resource(request.resource_name, need_size=False)
        path = self.node.blob_path(kind, sha)
        total = path.stat().st_size
        if request.read_offset > total:
            raise InvalidInputError(f"read_offset {request.read_offset} is past the end ({total})")
        end = total if not request.read_limit else min(total, request.read_offset
                                                       + request.read_limit)
        return self._read_file(path, request.read_offset, end)

    def _read_file(self, path: Path, offset: int, end: int):
        with open(path, "rb") as f:
            f.seek(offset)
            while offset < end:
                data = f.read(min(CHUNK_BYTES, end - offset))
                if not data:
                    break
                offset += len(data)
                self.node.stats_bytes("out", len(data))
                yield frame_read_response(data)  # serialized: server.add_bytestream

    def Write(self, request_iterator, context):
        """Each request arrives serialized (``server.add_bytestream``) and is parsed by
        ``framing.parse_write_request``: its data is a view, never copied by protobuf."""
        with self.slots.admit(context) as slot:  # before the first read: a stall holds a slot
            requests = map(parse_write_request, request_iterator)
            return self._admitted_write(requests, context, slot)

    def _admitted_write(self, requests: Iterator[WriteChunk], context,
                        slot: UploadSlot) -> tpb.WriteResponse:
        first = next(requests, None)
        if first is None:
            raise InvalidInputError("empty write stream")
        kind, sha, size = parse_resource(first.resource_name, need_size=True)
        assert size is not None  # need_size=True
        slot.expect(size)
        name = f"{kind}/{sha}/{size}"
        if self.node.has(kind, sha):
            return self._already(kind, sha, size)
        with self._writing_lock:
            if name in self._writing:
                raise BusyError(f"{name} is being written by another client; retry after it "
                                "finishes")
            self._writing.add(name)
        try:
            return self._write(kind, sha, size, chain([first], requests), slot)
        finally:
            with self._writing_lock:
                self._writing.discard(name)

    def _already(self, kind: str, sha: str, size: int) -> tpb.WriteResponse:
        state = self.node.store.record(sha).state if kind == "packages" else ""
        return tpb.WriteResponse(committed_size=size, state=state)

    def _write(self, kind: str, sha: str, size: int, requests: Iterator[WriteChunk],
               slot: UploadSlot) -> tpb.WriteResponse:
        upload = self.node.store.upload(kind, sha, size)
        expected, finished = None, False
        try:
            for req in requests:
                if expected is None:
                    upload.open(req.write_offset)
                    expected = req.write_offset
                elif req.write_offset != expected:
                    raise InvalidInputError(f"write_offset {req.write_offset} where {expected} "
                                            "was expected")
                data = req.data  # a view of the received message
                expected = upload.append(data)
                slot.progress()
                self.node.stats_bytes("in", len(data))
                if req.finish_write:
                    finished = True
                    break
            if not finished:  # the client stopped early: keep what arrived, for resumption
                return tpb.WriteResponse(committed_size=upload.committed_size())
            path = upload.finish()
        finally:
            upload.close()
        return self._commit(kind, sha, size, path)

    def _commit(self, kind: str, sha: str, size: int, path: Path) -> tpb.WriteResponse:
        if kind == "blobs":
            final = self.node.store.blob_path(sha)
            os.replace(path, final)
            _fsync_dir(final.parent)
            return tpb.WriteResponse(committed_size=size)
        try:
            record = self.node.accept(path.read_bytes())
        finally:
            path.unlink(missing_ok=True)
        if self.on_package is not None:
            self.on_package(record.id)
        return tpb.WriteResponse(committed_size=size, state=record.state, detail=record.detail)

    # ------------------------------------------------------------------ Packages
    def List(self, request, context):
        return tpb.ListResponse(packages=[info_proto(r) for r in self.node.store.list()])

    def Stat(self, request, context):
        return info_proto(self.node.store.record(request.id))

    def ZooManifest(self, request, context):
        return tpb.ZooManifestResponse(manifest_json=self.node.zoo_manifest(request.sha256))

    def Predict(self, request, context):
        self._check_predict_size(request.inputs)
        x = wire.tensor_from_proto(request.inputs)
        pid, sb, probs = self.node.predict(request.package_id, x)
        if not bool(probs.isfinite().all()):
            raise InvalidInputError("these inputs drive the superbody to NaN or infinite outputs; "
                                    "send images scaled to [0, 1] (or 0..255 as uint8)")
        names = list(sb.label_names)
        preds = []
        for row in probs.tolist():  # plain floats: a third of the time of per-row tensors
            best = max(row)
            preds.append(tpb.Prediction(label=names[row.index(best)], probability=best,
                                        probabilities=row))
        return tpb.PredictResponse(package_id=pid, label_names=names, predictions=preds)

    def _check_predict_size(self, inputs) -> None:
        """The Predict batch limits, in bytes and in images, before anything is decoded."""
        n_bytes, shape = len(inputs.data), list(inputs.shape)
        if n_bytes > self.limits.predict_max_bytes:
            raise InvalidInputError(f"Predict inputs of {n_bytes:,} bytes exceed the limit "
                                    f"{self.limits.predict_max_bytes:,}; send fewer images")
        if shape and shape[0] > self.limits.predict_max_images:
            raise InvalidInputError(f"Predict batch of {shape[0]} images exceeds the limit "
                                    f"{self.limits.predict_max_images}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


