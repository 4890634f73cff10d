"""What a daemon does with packages, independent of gRPC: accept, verify, repair, predict.

A ``Node`` owns a ``PackageStore`` and (for a receiver) a zoo. ``accept`` is
the receiver's pipeline: decode (``InvalidInputError``), make sure every
referenced zoo model is here, fetching a missing one by digest from a mirror
peer (``PreconditionError`` naming what is missing), rebuild and check
shapes (``IncompatibleError``), and check the fingerprint. Any of those
failures stores nothing. A package that rebuilds but misses its fingerprint is
repaired when repair data is configured, otherwise stored as ``failed`` with
the reason, so ``pnc status`` can show it.

Trust and rollback (``docs/security.md``): a node given ``trust`` keys refuses, before
decoding its tensors, a package not signed by one of them (``PermissionDeniedError``); a
receiver refuses a lower version of a package name it holds, and the same name and
version with other bytes (``PermissionDeniedError``, "rollback"). Both store nothing.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from pnc_net import signing, wire
from pnc_net.devices import CPU, Compute
from pnc_net.errors import (
    IncompatibleError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionError,
)
from pnc_net.fsutil import sha256_bytes
from pnc_net.package import probe_batch
from pnc_net.rebuild import (
    MAX_FINGERPRINT_TOLERANCE,
    PROBE_COUNT,
    PROBE_SEED,
    accepted_tolerance,
    build_superbody,
    fingerprint_error,
    load_ref,
)
from pnc_net.serve import fastpath
from pnc_net.serve.batcher import MicroBatcher
from pnc_net.serve.limits import MAX_PREDICT_IMAGES
from pnc_net.serve.repair import RepairConfig, repair
from pnc_net.serve.store import PackageRecord, PackageStore, check_digest, record_for
from pnc_net.superbody import Superbody
from pnc_net.zoo import Manifest, Zoo

log = logging.getLogger("pnc.node")


class ModelFetcher(Protocol):
    """Fetches a zoo model the node lacks: ``(manifest JSON, weights)`` or None.
    ``str(fetcher)`` names where it looks (for the error a node raises when none has it).
    The receiver passes ``pnc_net.serve.client.MirrorFetcher``; tests pass their own."""

    def __call__(self, sha256: str, size: int) -> tuple[str, bytes] | None:
        """``(manifest JSON, weights)`` of the model, or None when no source has it."""


@dataclass(frozen=True, eq=False)
class DeviceForward:
    """A ``fastpath.Forward`` built on a GPU copy of a superbody: each batch moves to
    ``device`` and its probabilities come back to the CPU (what Predict answers)."""

    inner: fastpath.Forward
    device: str

    @property
    def engine(self) -> str:
        """What runs (``jit`` or ``eager``), as ``fastpath.Forward.engine``."""
        return self.inner.engine

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities for the batch ``x`` ``(N, C, H, W)``, on the CPU."""
        return self.inner(x.to(self.device)).cpu()


@dataclass(frozen=True)
class Loaded:
    """A verified package's superbody, the input shape its models take, and the forward
    Predict runs (``fastpath.prepare``: compiled and checked against the superbody, or
    eager)."""

    superbody: Superbody
    input_shape: tuple[int, ...]
    forward: fastpath.Forward | DeviceForward


class Node:
    """A sender (``verify=False``: stores what it is given) or a receiver (verifies)."""

    def __init__(self, role: str, store: PackageStore, zoo: Zoo | None,
                 fetch_model: ModelFetcher | None = None, repair_data: Path | None = None,
                 metrics=None, max_tolerance: float = MAX_FINGERPRINT_TOLERANCE,
                 trust: Iterable[bytes] = (), batcher: MicroBatcher | None = None,
                 predict_engine: str = fastpath.DEFAULT_ENGINE, compute: Compute = CPU) -> None:
        if role not in ("sender", "receiver"):
            raise InvalidInputError(f"unknown role {role!r}")
        if role == "receiver" and zoo is None:
            raise InvalidInputError("a receiver needs --zoo DIR")
        self.role, self.store, self.zoo, self.fetch_model = role, store, zoo, fetch_model
        self.repair_set = _load_repair_data(repair_data) if repair_data else None
        self.metrics = metrics
        self.max_tolerance = max_tolerance  # the receiver decides what counts as verified
        self.trust = tuple(bytes(k) for k in trust)  # raw ed25519 keys; () accepts unsigned
        self._versions = _held_versions(store) if role == "receiver" else {}
        if self.trust:
            log.info("accepting only packages signed by %s",
                     ", ".join(signing.key_id(k) for k in self.trust))
        self._cache: dict[str, Loaded] = {}
        # Predict's id or prefix -> package id; cleared when a package is stored (a prefix
        # may then be ambiguous), checked with one stat per call (a package may be removed)
        self._resolved: dict[str, str] = {}
        self._lock = threading.Lock()
        self.warm = threading.Event()
        if zoo is not None:
            threading.Thread(target=self._warm_up, daemon=True, name="zoo-warm-up").start()
        else:
            self.warm.set()
        self.batcher = batcher  # Predict calls of all clients, batched (None: one by one)
        self.predict_engine = fastpath.check_engine(predict_engine)  # jit or eager
        # where Predict and repair compute (receiver --device); verification stays on CPU
        self.compute = compute

    def _warm_up(self) -> None:
        """Load (digest-checked) every zoo model once at start, so the first package a
        receiver gets is rebuilt from memory instead of disk."""
        try:
            zoo = self._zoo()
            for m in zoo.manifests():
                model, _ = zoo.load_module(m.sha256)  # imports too: any model warms
                with torch.no_grad():
                    model(torch.zeros(1, *m.input_shape))
        except Exception as err:  # noqa: BLE001 - a broken model is reported when it is used
            log.warning("zoo warm-up stopped: %s", err)
        finally:
            self.warm.set()

    def _zoo(self) -> Zoo:
        """The node's zoo; a sender started without one cannot rebuild or predict."""
        if self.zoo is None:
            raise PreconditionError(f"this {self.role} has no zoo; ask a receiver to predict")
        return self.zoo

    # ------------------------------------------------------------------ accept
    def accept(self, data: bytes) -> PackageRecord:
        """Store ``data`` as a package (verifying it on a receiver); the stored record."""
        t0 = time.perf_counter()
        signer = self._check_trust(data)  # before the tensors are decoded; nothing stored
        package = wire.decode(data)
        pid = sha256_bytes(data)
        decode_s = time.perf_counter() - t0
        with self._lock:
            if self.store.has_package(pid):
                return self.store.record(pid)
            if self.role == "sender":
                self.store.put(data, "stored", package=package)
                return self._count(self.store.record(pid))
            self._check_rollback(package, pid)
            self.ensure_zoo(package)
            record = record_for(pid, data, package, "received")
            if package.name:
                record.metadata.update(name=package.name, version=package.version,
                                       signer=signer)
            t1 = time.perf_counter()
            sb = build_superbody(self._zoo(), package)  # IncompatibleError: nothing stored
            _, _, shape = load_ref(self._zoo(), package.target)
            t2 = time.perf_counter()
            self._observe("rebuild", t2 - t1)
            self._check(sb, package, shape, record)
            record.metadata["timings_s"] = {"decode": round(decode_s, 5),
                                            "rebuild": round(t2 - t1, 5),
                                            "verify": round(time.perf_counter() - t2, 5)}
            self.store.put(data, record.state, record)
            self._resolved.clear()
            if record.state != "failed":
                self._cache[pid] = self._loaded(pid, sb, tuple(shape), package)
                if package.name:
                    self._versions[package.name] = (package.version, pid)
            log.info("package %s %s (fingerprint error %s)", pid[:12], record.state,
                     record.fingerprint_error)
            return self._count(record)

    def _check_trust(self, data: bytes) -> str | None:
        """The signer's key id when this node trusts keys and one of them signed ``data``;
        ``PermissionDeniedError`` for an unsigned or otherwise signed package. None when
        no key is trusted (then unsigned packages are accepted, signatures unchecked)."""
        if not self.trust:
            return None
        found = signing.verify(data, self.trust)
        log.info("package signed by trusted key %s (%s v%d)", found.key_id, found.name,
                 found.version)
        return found.key_id

    def _check_rollback(self, package, pid: str) -> None:
        """Refuse a lower version of a name this receiver holds, or the version it holds
        with other bytes (``PermissionDeniedError``); unnamed packages are not versioned."""
        held = self._versions.get(package.name) if package.name else None
        if held is None:
            return
        version, held_id = held
        if package.version < version:
            raise PermissionDeniedError(
                f"rollback refused: this receiver holds {package.name!r} version {version} "
                f"(package {held_id[:12]}); version {package.version} is older")
        if package.version == version and pid != held_id:
            raise PermissionDeniedError(
                f"rollback refused: this receiver holds {package.name!r} version {version} as "
                f"package {held_id[:12]}; package {pid[:12]} claims the same version with "
                "other bytes (publish a higher version)")

    def _check(self, sb: Superbody, package, shape, record: PackageRecord) -> None:
        """Fingerprint check, then repair if needed and possible; fills ``record``."""
        fp = package.fingerprint
        if fp is None:
            record.state, record.detail = "failed", "package has no fingerprint"
            return
        tolerance = accepted_tolerance(fp, self.max_tolerance)
        err = fingerprint_error(sb, fp, shape)
        record.fingerprint_error = err
        if err <= tolerance:
            record.state = "verified"
            return
        reason = (f"rebuilt superbody differs from the fingerprint by {err:.4f} "
                  f"(tolerance {tolerance:.4f})")
        if self.repair_set is None:
            record.state, record.detail = "failed", reason + "; no repair data configured"
            return
        x, y = self._repair_xy(sb)
        result = repair(sb, fp, shape, x, y, RepairConfig(), self.compute)
        self._observe("repair", result.seconds)
        record.fingerprint_error_before, record.fingerprint_error = err, result.error_after
        record.metadata["repair"] = {"seconds": result.seconds, "steps": result.steps,
                                     "trained_params": result.trained_params,
                                     "zoo_digests": result.zoo_digests}
        if result.error_after <= tolerance:
            record.state = "repaired"
        else:
            record.state = "failed"
            record.detail = reason + f"; repair reached {result.error_after:.4f}, still too far"

    def _repair_xy(self, sb: Superbody) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.repair_set is not None  # _check repairs only when it is configured
        x, y, names = self.repair_set
        labels = list(sb.label_names)
        keep = [i for i, c in enumerate(y.tolist()) if names[c] in labels]
        if not keep:
            raise PreconditionError("repair data holds none of the package's labels "
                                    f"{labels}; give --repair-data with matching labels")
        idx = torch.tensor(keep)
        return x[idx], torch.tensor([labels.index(names[c]) for c in y[idx].tolist()])

    # ------------------------------------------------------------------ zoo
    def ensure_zoo(self, package) -> None:
        """Every zoo model the package references is local, fetched from a mirror if not."""
        missing = [r for r in package.zoo_refs() if not self._zoo().has(r.sha256)]
        for ref in missing:
            if not self.fetch_zoo_model(ref.sha256, ref.size_bytes):
                tried = str(self.fetch_model or "no mirror configured")
                raise PreconditionError(
                    f"receiver lacks zoo model {ref.name} (sha256 {ref.sha256}, "
                    f"{ref.size_bytes} bytes) and no mirror has it ({tried}); "
                    "add it with `pnc zoo` or start with --mirror HOST:PORT")

    def fetch_zoo_model(self, sha256: str, size: int) -> bool:
        """Ask the fetcher for a missing model; add it when its manifest is the one asked
        for (the zoo checks the weights' digest)."""
        got = self.fetch_model(sha256, size) if self.fetch_model is not None else None
        if got is None:
            return False
        manifest = Manifest.from_json(got[0])
        if manifest.sha256 != sha256 or manifest.size_bytes != size:
            log.warning("%s sent a manifest for another model", self.fetch_model)
            return False
        self._zoo().add_blob(manifest, got[1])
        log.info("fetched zoo model %s from %s", manifest.name, self.fetch_model)
        return True

    def zoo_manifest(self, sha256: str) -> str:
        """The manifest JSON of a zoo model this node holds (what a mirror serves)."""
        sha256 = check_digest(sha256, what="zoo model digest")
        if self.zoo is None or not self.zoo.has(sha256):
            raise NotFoundError(f"this {self.role} holds no zoo model {sha256}")
        return (self.zoo.models_dir / f"{sha256}.json").read_text()

    def blob_path(self, kind: str, sha256: str) -> Path:
        """Where a readable blob lives (store or zoo weights); ``NotFoundError`` if nowhere."""
        sha256 = check_digest(sha256, what="blob digest")
        if kind == "packages":
            path = self.store.packages_dir / f"{sha256}.pnc"
        elif kind == "blobs":
            path = self.store.blob_path(sha256)
            if not path.exists() and self.zoo is not None and self.zoo.has(sha256):
                path = self.zoo.weights_path(sha256)
        else:
            raise InvalidInputError(f"unknown blob kind {kind!r}; use packages or blobs")
        if not path.exists():
            raise NotFoundError(f"this {self.role} holds no {kind[:-1]} {sha256}")
        return path

    def has(self, kind: str, sha256: str) -> bool:
        """Whether a blob of ``kind`` with this digest is readable here."""
        try:
            self.blob_path(kind, sha256)
            return True
        except NotFoundError:
            return False

    # ------------------------------------------------------------------ predict
    def loaded(self, id_or_prefix: str) -> tuple[str, Loaded]:
        """The package's superbody, rebuilt once (the package is decoded once, then cached)."""
        pid = self._resolved.get(id_or_prefix)
        if pid is None or not self.store.has_package(pid):  # one stat, not a listing
            pid = self.store.resolve(id_or_prefix)
            if len(self._resolved) >= 1024:
                self._resolved.clear()
            self._resolved[id_or_prefix] = pid
        if pid in self._cache:
            return pid, self._cache[pid]
        record = self.store.record(pid)
        if record.state == "failed":
            raise PreconditionError(f"package {pid[:12]} failed verification: {record.detail}")
        zoo = self._zoo()
        package = wire.decode(self.store.get(pid))
        self.ensure_zoo(package)
        with self._lock:
            if pid not in self._cache:
                sb = build_superbody(zoo, package)
                shape = tuple(zoo.resolve(package.target.sha256).input_shape)
                self._cache[pid] = self._loaded(pid, sb, shape, package)
        return pid, self._cache[pid]

    def _loaded(self, pid: str, sb: Superbody, shape: tuple[int, ...], package) -> Loaded:
        """The cache entry of a verified package: its superbody and the forward Predict
        runs, checked against the superbody on the package's fingerprint probes within
        the tolerance the package was verified with (``fastpath.prepare``)."""
        fp = package.fingerprint
        if fp is not None:
            seed, count, tol = fp.probe_seed, fp.probe_count, accepted_tolerance(
                fp, self.max_tolerance)
        else:  # not verifiable, so never loaded as verified; checked all the same
            seed, count, tol = PROBE_SEED, PROBE_COUNT, self.max_tolerance
        probes = probe_batch(seed, count, shape)
        if self.compute.is_cpu:
            return Loaded(sb, shape, fastpath.prepare(sb, shape, probes, tol, self.predict_engine,
                                                      name=f"package {pid[:12]}"))
        # a private GPU copy: sb's target is the zoo's shared (CPU) model
        on_gpu = copy.deepcopy(sb).to(self.compute.device)
        forward = fastpath.prepare(on_gpu, shape, self.compute.put(probes), tol,
                                   self.predict_engine, name=f"package {pid[:12]}")
        return Loaded(sb, shape, DeviceForward(forward, self.compute.device))

    def predict(self, id_or_prefix: str, x: torch.Tensor) -> tuple[str, Superbody, torch.Tensor]:
        """Probabilities of the package's superbody for ``x``: one image of the models'
        input shape ``(C, H, W)`` (or ``(H, W)`` for one channel), or a batch
        ``(N, C, H, W)`` (``as_batch``)."""
        pid, loaded = self.loaded(id_or_prefix)
        x = as_batch(x, loaded.input_shape).float()
        if self.batcher is None:  # --predict-batch 0: one forward per request
            return pid, loaded.superbody, loaded.forward(x)
        return pid, loaded.superbody, self.batcher.run(pid, loaded.forward, x)

    # ------------------------------------------------------------------ metrics
    def stats_bytes(self, direction: str, n: int) -> None:
        """Count bytes moved, when metrics are on."""
        if self.metrics is not None:
            self.metrics.bytes(direction, n)

    def _count(self, record: PackageRecord) -> PackageRecord:
        if self.metrics is not None:
            self.metrics.package(record.state)
        return record

    def _observe(self, what: str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.observe(what, seconds)


def as_batch(x: torch.Tensor, input_shape: tuple[int, ...]) -> torch.Tensor:
    """``x`` as a batch ``(N, C, H, W)`` for models that take ``input_shape`` ``(C, H, W)``:
    a batch as it is, one image ``(C, H, W)`` as a batch of one, and for one-channel
    models one ``(H, W)`` image as a batch of one. Anything else (a ``(3, 32, 32)`` sent
    to a one-channel model is not three grayscale images) is ``InvalidInputError``
    naming the shapes accepted; so is a batch of 0 or more than ``MAX_PREDICT_IMAGES``."""
    shape, want = tuple(x.shape), tuple(input_shape)
    if shape == want:
        x = x.unsqueeze(0)
    elif len(want) == 3 and want[0] == 1 and shape == want[1:]:
        x = x.reshape(1, *want)
    elif not (len(shape) == len(want) + 1 and shape[1:] == want):
        one = f"{want}" + (f" or {want[1:]}" if len(want) == 3 and want[0] == 1 else "")
        raise IncompatibleError(
            f"inputs of shape {shape}: this package's models take one image of shape {one} "
            f"or a batch (N, {', '.join(map(str, want))})")
    if not 0 < len(x) <= MAX_PREDICT_IMAGES:
        raise InvalidInputError(f"a batch of {len(x)} images; send 1..{MAX_PREDICT_IMAGES}")
    return x


def _held_versions(store: PackageStore) -> dict[str, tuple[int, str]]:
    """Package name -> ``(highest version, its id)`` over the store's records that did not
    fail (a failed package is not held: a lower version may replace it)."""
    held: dict[str, tuple[int, str]] = {}
    for record in store.list():
        name, version = record.metadata.get("name"), record.metadata.get("version")
        if record.state == "failed" or not isinstance(name, str) or not isinstance(version, int):
            continue
        if name not in held or version > held[name][0]:
            held[name] = (version, record.id)
    return held


def _load_repair_data(path: Path) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    from pnc_net.data import load_npz

    ds = load_npz(path)
    x = torch.cat([ds.x_train[:], ds.x_val[:]]) if len(ds.x_val) else ds.x_train[:]
    y = torch.cat([ds.y_train, ds.y_val]) if len(ds.y_val) else ds.y_train
    return x.float(), y.long(), tuple(ds.label_names)
