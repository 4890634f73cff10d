"""The package bytes: round trips per dtype, old formats stay readable, every malformed
input is refused with the project's own error (hypothesis fuzzing, >= 1,000 cases)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_decode_budget import ATTACKS, GIB, rle_bomb

from pnc_net import codec, rebuild, wire
from pnc_net._proto import package_pb2 as pb
from pnc_net.errors import IntegrityError, InvalidInputError, PncError
from pnc_net.fsutil import sha256_bytes
from pnc_net.package import Fingerprint, ModuleConfig

DATA = Path(__file__).parent / "data"
V1 = DATA / "package_v1_fp16.pnc"
V1_INT8 = DATA / "package_v1_int8.pnc"


def fuzz(n: int) -> settings:
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def package():
    return wire.decode(V1.read_bytes())


def _raw(pkg, **kw) -> bytes:
    return wire.to_proto(pkg, **kw).SerializeToString(deterministic=True)


def _compress(raw: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(raw)


def _decodes_or_pnc_error(data: bytes) -> None:
    try:
        wire.decode(data)
    except PncError:
        pass


# ----------------------------------------------------------------------------- formats


def test_old_format_fixtures_stay_readable():
    manifest = json.loads((DATA / "packages.json").read_text())
    for name, meta in manifest.items():
        data = (DATA / name).read_bytes()
        assert sha256_bytes(data) == meta["id"], f"{name} changed on disk"
        pkg = wire.decode(data)
        assert pkg.format_version == meta["format_version"] == 1
        assert list(pkg.label_names) == meta["label_names"]
        assert {k: int(v.numel()) for k, v in pkg.modules[0].masks.items()} == meta["mask_widths"]
        assert sorted(pkg.modules[0].tensors) == meta["tensors"]


def test_v1_int8_uses_one_scale_and_v2_one_per_row(package):
    v1 = wire.decode(V1_INT8.read_bytes())
    msg1 = wire.to_proto(package, "int8", format_version=1)
    msg2 = wire.to_proto(package, "int8")
    t1 = next(t for t in msg1.modules[0].tensors if len(t.shape) >= 2)
    t2 = next(t for t in msg2.modules[0].tensors if t.name == t1.name)
    assert not t1.scales and t1.scale > 0
    assert len(t2.scales) == t2.shape[0]
    ref = package.modules[0].tensors
    err1 = max(float((v1.modules[0].tensors[k] - ref[k]).abs().max()) for k in ref)
    back2 = wire.decode(_compress(msg2.SerializeToString())).modules[0].tensors
    err2 = max(float((back2[k] - ref[k]).abs().max()) for k in ref)
    assert err2 <= err1 + 1e-7  # per-row scales are never coarser


#: worst error per wire dtype, relative to a tensor's peak
WIRE_ERROR = {"fp32": 0.0, "fp16": 2e-3, "int8": 2e-2}


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
def test_round_trip(package, dtype):
    data = wire.encode(package, dtype)
    back = wire.decode(data)
    assert back.format_version == wire.FORMAT_VERSION
    assert back.label_names == package.label_names and back.target == package.target
    for a, b in zip(package.modules, back.modules):
        assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
        for k, v in a.tensors.items():
            scale = max(float(v.abs().max()), 1e-6)
            bound = WIRE_ERROR[wire.wire_dtype(k, dtype, v.dim())]  # INT8_WHEN_FP16 too
            assert float((b.tensors[k] - v).abs().max()) <= bound * scale, k
    assert torch.equal(back.fingerprint.probabilities, package.fingerprint.probabilities)
    assert wire.encode(package, dtype) == data  # deterministic: same id every time


def test_int8_writes_matrices_int8_and_vectors_fp16(package):
    """One int8 scale over a bias vector rounds its small entries away; an int8 package
    keeps vectors (and scalars) fp16 and writes only the matrices int8."""
    msg = wire.to_proto(package, "int8")
    dtypes = {t.name: (len(t.shape), t.dtype) for t in msg.modules[0].tensors}
    assert any(ndim < 2 for ndim, _ in dtypes.values())
    assert any(ndim >= 2 for ndim, _ in dtypes.values())
    for name, (ndim, dtype) in dtypes.items():
        assert dtype == (pb.INT8 if ndim >= 2 else pb.FLOAT16), name


def test_sizes_shrink_with_dtype(package):
    sizes = {d: len(wire.encode(package, d)) for d in ("fp32", "fp16", "int8")}
    assert sizes["int8"] < sizes["fp16"] < sizes["fp32"]


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("mutate,needle", [
    (lambda m: setattr(m, "format_version", 99), "format version 99"),
    (lambda m: setattr(m, "format_version", 0), "format version 0"),
    (lambda m: m.modules[0].masks[0].__setattr__("width", 7), "width 7"),
    (lambda m: m.modules[0].tensors[0].shape.__setitem__(0, 999), "holds"),
    (lambda m: m.modules[0].tensors[0].__setattr__("name", "../../etc/passwd"), "neither"),
    (lambda m: m.target.__setattr__("sha256", "../x"), "invalid sha256"),
    (lambda m: m.label_names.append(m.label_names[0]), "repeats"),
    (lambda m: m.modules[0].__setattr__("position_r", 0), "position"),
    (lambda m: m.__setattr__("report_json", "[1, 2]"), "JSON object"),
    (lambda m: m.__setattr__("report_json", "[" * 100000), "JSON"),
    (lambda m: m.fingerprint.__setattr__("tolerance", float("nan")), "tolerance"),
    (lambda m: m.ClearField("modules"), "0 cloned modules"),
])
def test_malformed_messages_are_refused_clearly(package, mutate, needle):
    msg = wire.to_proto(package)
    mutate(msg)
    with pytest.raises(InvalidInputError, match=needle.replace("(", r"\(")):
        wire.decode(_compress(msg.SerializeToString()))


def test_truncated_and_corrupt_bytes(package):
    data = wire.encode(package)
    for cut in (0, 1, 10, len(data) // 2, len(data) - 1):
        with pytest.raises(InvalidInputError, match="truncated|not a valid|zstd"):
            wire.decode(data[:cut])
    with pytest.raises(InvalidInputError):
        wire.decode(b"\x28\xb5\x2f\xfd" + b"\x00" * 64)


def test_every_single_byte_corruption_is_detected(package):
    """zstd's content checksum (format 2 writers set it) catches any flipped byte."""
    data = wire.encode(package)
    for i in range(0, len(data), 5):
        bad = bytearray(data)
        bad[i] ^= 0x5A
        with pytest.raises(InvalidInputError):
            wire.decode(bytes(bad))


def test_zip_bomb_is_refused():
    bomb = zstandard.ZstdCompressor(level=3).compress(b"\x00" * (wire.MAX_PACKAGE_BYTES + 1))
    with pytest.raises(InvalidInputError):
        wire.decode(bomb)


# ----------------------------------------------------------------------------- attacks (issue 13)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_packages_are_refused_at_decode(package, name):
    """Each attack (tests/test_decode_budget.py, which also proves their memory cost)."""
    with pytest.raises(InvalidInputError):
        wire.decode(ATTACKS[name](wire.to_proto(package)))


def test_zstd_bomb_declaring_4gib_is_refused_before_allocating():
    bomb = rle_bomb(4 * GIB, 4 * GIB)
    assert len(bomb) < 200_000
    with pytest.raises(InvalidInputError, match="declares 4294967296 bytes"):
        codec.parse(bomb)


def test_zstd_bomb_without_declared_size_stops_at_the_cap():
    with pytest.raises(InvalidInputError, match="more than"):
        codec.decompress(rle_bomb(4 * GIB, None))
    assert len(codec.decompress(rle_bomb(1 << 20, None))) == 1 << 20  # honest and undeclared


@pytest.mark.parametrize("extra", [b"\x00", b"junk", "frame"])
def test_one_package_has_one_id(package, extra):
    data = wire.encode(package)
    with pytest.raises(InvalidInputError, match="after its zstd frame"):
        wire.decode(data + (data if extra == "frame" else extra))


@pytest.mark.parametrize("config,needle", [
    ('{"adapter_rank": 8, "gate_hidden": 10000000}', "gate_hidden=10000000"),
    ('{"adapter_rank": "x"}', "adapter_rank='x'"),
    ('{"gate_hidden": -1}', "gate_hidden=-1"),
    ('{"gate_classes": 4097}', "gate_classes=4097"),
    ('{"gate_classes": -1}', "gate_classes=-1"),
    ('{"gate_hidden": null}', "gate_hidden=None"),
    ('{"adapter_rank": [8]}', "adapter_rank=\\[8\\]"),
    ('{"adapter_rank": true}', "adapter_rank=True"),
    ('{"adapter_rank": 8.0}', "adapter_rank=8.0"),
    ('{"adapter_rank": 8, "seed": 1}', "unknown keys"),
    ('[8, 16]', "JSON object"),
])
def test_poison_configs_are_refused_at_decode(package, config, needle):
    msg = wire.to_proto(package)
    msg.modules[0].config_json = config
    with pytest.raises(InvalidInputError, match=needle):
        wire.decode(_compress(msg.SerializeToString()))


def test_module_config_defaults_keep_old_packages_readable():
    assert ModuleConfig.from_mapping({}) == ModuleConfig(8, 8)
    assert ModuleConfig.from_mapping({}).gate_classes == 0  # the MLP gate
    assert "gate_classes" not in ModuleConfig(8, 8).as_dict()  # MLP packages: bytes as before
    assert ModuleConfig(8, 8, 7).as_dict()["gate_classes"] == 7
    assert ModuleConfig.from_mapping({"adapter_rank": 8, "gate_hidden": 16}).gate_hidden == 16


@pytest.mark.parametrize("count", [300_000, 257, 0])
def test_probe_count_is_bounded(package, count):
    msg = wire.to_proto(package)
    msg.fingerprint.probe_count = count
    msg.fingerprint.probabilities.CopyFrom(pb.Tensor(
        name="probabilities", dtype=pb.INT8, shape=[count, len(msg.label_names)],
        data=bytes(count * len(msg.label_names)), scale=0.0))
    with pytest.raises(InvalidInputError, match="probes"):
        wire.decode(_compress(msg.SerializeToString()))


@pytest.mark.parametrize("shape", [[1 << 24] * 8, [1 << 11] * 3, [1] * 9])
def test_declared_tensor_sizes_are_bounded(package, shape):
    msg = wire.to_proto(package)
    msg.modules[0].tensors[0].ClearField("shape")
    msg.modules[0].tensors[0].shape.extend(shape)
    with pytest.raises(InvalidInputError, match="limit"):
        wire.decode(_compress(msg.SerializeToString()))


def test_sender_chosen_tolerance_is_capped(package):
    loose = Fingerprint(1, 16, package.fingerprint.probabilities, tolerance=1.0)
    strict = Fingerprint(1, 16, package.fingerprint.probabilities, tolerance=1e-3)
    assert rebuild.accepted_tolerance(loose) == rebuild.MAX_FINGERPRINT_TOLERANCE
    assert rebuild.accepted_tolerance(strict) == 1e-3  # a package may ask for less
    assert rebuild.accepted_tolerance(loose, receiver_max=0.01) == 0.01
    assert wire.decode(wire.encode(package)).fingerprint.tolerance <= (
        rebuild.MAX_FINGERPRINT_TOLERANCE)  # what clone writes passes the cap


def test_nan_outputs_never_verify(package):
    """A superbody whose probe outputs are NaN or infinite has an infinite error."""
    fp = package.fingerprint
    for bad in (float("nan"), float("inf")):
        def superbody(x, bad=bad):
            return torch.full((x.shape[0], fp.probabilities.shape[1]), bad)
        err = rebuild.fingerprint_error(superbody, fp, (1, 28, 28))
        assert err == float("inf") and not err <= rebuild.accepted_tolerance(fp)


@pytest.mark.slow
def test_garbage_fingerprint_with_tolerance_one_fails_verify(default_clone, zoo):
    pkg = default_clone.package
    garbage = Fingerprint(pkg.fingerprint.probe_seed, pkg.fingerprint.probe_count,
                          1 - pkg.fingerprint.probabilities, tolerance=1.0)
    bad = wire.decode(wire.encode(type(pkg)(**{**vars(pkg), "fingerprint": garbage})))
    with pytest.raises(IntegrityError, match="capped"):
        rebuild.verify(zoo, bad)
    rebuild.verify(zoo, wire.decode(wire.encode(pkg)))  # the honest one still verifies


# ----------------------------------------------------------------------------- fuzz


@fuzz(300)
@given(st.binary(max_size=4096))
def test_fuzz_arbitrary_bytes(data):
    _decodes_or_pnc_error(data)
    _decodes_or_pnc_error(_compress(data))  # gets past zstd: exercises the protobuf parser


@pytest.fixture(scope="module")
def raw_v2(package) -> bytes:
    return _raw(package)


@fuzz(500)
@given(st.data())
def test_fuzz_mutated_packages(raw_v2, data):
    """Flip, drop and insert bytes inside a real serialized package, then recompress."""
    buf = bytearray(raw_v2)
    for _ in range(data.draw(st.integers(1, 8))):
        op = data.draw(st.sampled_from(["flip", "set", "cut", "insert"]))
        i = data.draw(st.integers(0, len(buf) - 1))
        if op == "flip":
            buf[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set":
            buf[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del buf[i: i + data.draw(st.integers(1, 64))]
        else:
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=16))
        if not buf:
            break
    _decodes_or_pnc_error(_compress(bytes(buf)))


_tensors = st.builds(
    pb.Tensor, name=st.sampled_from(["adapter.w", "gate.b", "x", ""]),
    dtype=st.integers(0, 4), shape=st.lists(st.integers(0, 40), max_size=4),
    data=st.binary(max_size=256), scale=st.floats(allow_nan=True, width=32),
    scales=st.lists(st.floats(width=32), max_size=4))
_masks = st.builds(pb.Mask, layer=st.text(max_size=8), width=st.integers(0, 70),
                   bits=st.binary(max_size=10))
_refs = st.builds(pb.ZooRef, name=st.text(max_size=8),
                  sha256=st.sampled_from(["a" * 64, "A" * 64, "", "0" * 63]),
                  size_bytes=st.integers(0, 10), arch=st.text(max_size=5))


@fuzz(300)
@given(st.builds(
    pb.Package, format_version=st.sampled_from([0, 1, 2, 3]), target=_refs,
    label_names=st.lists(st.text(max_size=3), max_size=6),
    modules=st.lists(st.builds(
        pb.ClonedModule, source=_refs, cloned_classes=st.lists(st.integers(0, 9), max_size=3),
        position_r=st.integers(0, 5), position_s=st.integers(0, 5),
        masks=st.lists(_masks, max_size=3), tensors=st.lists(_tensors, max_size=3),
        config_json=st.sampled_from(["", "{}", "[", '{"adapter_rank": 4}'])), max_size=2),
    fingerprint=st.builds(pb.Fingerprint, probe_count=st.integers(0, 4),
                          probabilities=_tensors, tolerance=st.floats(width=32)),
    report_json=st.sampled_from(["", "{}", "null", "{\"a\": 1}"]),
    created_unix_s=st.floats()))
def test_fuzz_structured_messages(msg):
    _decodes_or_pnc_error(_compress(msg.SerializeToString()))


def test_generated_code_is_current():
    """Regenerating pnc_net/_proto from proto/ changes nothing (needs grpcio-tools)."""
    pytest.importorskip("grpc_tools")
    from pnc_net import protogen

    assert protogen.main(["--check"]) == 0


def test_a_zero_dimensional_int8_tensor_decodes_to_a_tensor():
    """Found by the servicer fuzz: a scalar int8 tensor came back as a numpy scalar, and
    ``torch.from_numpy`` raised TypeError (INTERNAL) instead of a tensor or a pnc error."""
    t = wire.tensor_from_proto(pb.Tensor(dtype=pb.INT8, data=b"\x02", scale=0.5))
    assert t.shape == () and float(t) == 1.0
