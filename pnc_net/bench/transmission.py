"""What travels and what it costs: package, superbody, full model, information bound.

``transmission_of`` measures one PNC result the way the benchmark reports it
(``docs/benchmarks.md``): the package as encoded (fp16 and int8 tensors), the
fp32 superbody, the zstd-compressed fp16 cloned model (what shipping the whole
model would cost), and a lower bound for the payload: the entropy of the mask
bits (``n * H2(kept / n)`` per layer, the cost of naming which filters stay)
plus the adapter and fusion tensors as an fp16 package stores them. Encode, decode and rebuild times
are medians of a few repeats. The int8 package's own test metrics say what its
extra third of savings costs.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

from pnc_net import wire
from pnc_net.bench.baselines import TUNING_METHODS, delta_payload, zstd_size
from pnc_net.data import Dataset
from pnc_net.metrics import clone_metrics, sim_matrix
from pnc_net.package import Package
from pnc_net.rebuild import build_superbody
from pnc_net.zoo import Zoo


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _h2(p: float) -> float:
    return 0.0 if p <= 0 or p >= 1 else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def information_bound(package: Package) -> dict[str, float]:
    """Mask entropy in bytes plus the adapter/fusion bytes of an fp16 package (names and
    refs excluded; a discriminant gate's weight is int8 there, ``wire.INT8_WHEN_FP16``)."""
    mask_bits = 0.0
    adapter = gate = 0

    def size(name: str, t) -> int:
        return t.numel() * (1 if wire.wire_dtype(name, "fp16") == "int8" else 2)

    for m in package.modules:
        for mask in m.masks.values():
            n = mask.numel()
            mask_bits += n * _h2(int(mask.sum()) / n)
        adapter += sum(size(k, t) for k, t in m.tensors.items() if k.startswith("adapter."))
        gate += sum(size(k, t) for k, t in m.tensors.items() if k.startswith("gate."))
    mask_bytes = mask_bits / 8
    return {"mask_entropy_bytes": mask_bytes, "adapter_fp16_bytes": adapter,
            "fusion_fp16_bytes": gate, "bound_bytes": mask_bytes + adapter + gate}


def received_metrics(zoo: Zoo, blobs: dict[str, bytes], data: Dataset) -> dict[str, float]:
    """Test metrics of the superbody a receiver rebuilds from each encoded package
    (``{"fp16": bytes, "int8": bytes}``, no repair): what the smaller encoding costs."""
    out = {}
    for dtype, blob in blobs.items():
        m = clone_metrics(build_superbody(zoo, wire.decode(blob)), data)
        out.update({f"{dtype}_{k}": m[k] for k in ("acc_old", "acc_new", "acc_all", "locality")})
    return out


def transmission_of(zoo: Zoo, pnc, rows: list[dict], data: Dataset | None = None,
                    repeats: int = 5) -> dict:
    """Every size and time of the transmission table, for one PNC clone result
    (with ``data``, also the accuracy of the fp16 and int8 packages as received)."""
    package = pnc.package
    blob, blob_int8 = wire.encode(package), wire.encode(package, dtype="int8")
    full_fp16 = zstd_size(delta_payload(pnc.superbody.state_dict(), {})[0])
    tuning = {r["method"]: r["bytes"] for r in rows if r["method"] in TUNING_METHODS}
    kept = {f"{i}:{k}": [int(v.sum()), v.numel()] for i, m in enumerate(package.modules)
            for k, v in m.masks.items()}
    out = {
        "package_bytes": len(blob),
        "package_int8_bytes": len(blob_int8),
        "superbody_bytes": pnc.report["metrics"]["superbody_bytes"],
        "full_model_zstd_fp16_bytes": full_fp16,
        **information_bound(package),
        "encode_ms": _median_ms(lambda: wire.encode(package), repeats),
        "decode_ms": _median_ms(lambda: wire.decode(blob), repeats),
        "rebuild_ms": _median_ms(lambda: build_superbody(zoo, wire.decode(blob)), max(1, repeats // 2)),
        "tuning_bytes": tuning,
        "kept_filters": kept,
    }
    if tuning:
        out["smallest_tuning_over_package"] = min(tuning.values()) / len(blob)
    if data is not None:
        out.update(received_metrics(zoo, {"fp16": blob, "int8": blob_int8}, data))
    return out


def sim_of(zoo: Zoo, pnc, data: Dataset) -> list[dict]:
    """The ``Sim`` matrix of every cloned module against its own source."""
    out = []
    for m in pnc.package.modules:
        source, manifest = zoo.load(m.source.sha256)
        sim = sim_matrix(source, m.masks, data)
        out.append({"source": manifest.name,
                    "cloned": [manifest.label_names[i] for i in m.cloned_classes], **sim})
    return out
