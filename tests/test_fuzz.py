"""Fuzzing the receiver: every input decodes and rebuilds (and verifies or not), or raises a
``PncError`` subclass; never another exception, never a crash.

Inputs start from a real package (the ``default_clone`` fixture, so rebuilds run against
the test zoo) and are mutated at two levels: bytes of the serialized message (flip, set,
cut, insert; then recompressed, or the compressed frame itself), and fields of the
protobuf message (declared shapes, dtypes, scales, data, config_json values, probe_count,
tolerance, masks, classes, positions, labels, references). CI runs 10,000 cases
(``@pytest.mark.slow``); outside CI, a longer run counts the non-project exceptions:

    python tests/test_fuzz.py --cases 100000 [--package FILE.pnc] [--zoo DIR]
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pnc_net import codec, rebuild, wire
from pnc_net._proto import package_pb2 as pb
from pnc_net.errors import PncError
from pnc_net.zoo import Zoo

BYTE_CASES = 8000  # decode is ~1 ms; most byte mutations do not decode
FIELD_CASES = 2000  # most field mutations decode, and each rebuild costs ~50 ms


def check(data: bytes, zoo: Zoo) -> str:
    """Decode, rebuild and verify ``data``; the stage that refused it (a ``PncError``) or
    ``verified``. Any other exception propagates: that is the bug a fuzz looks for."""
    try:
        package = wire.decode(data)
    except PncError:
        return "refused at decode"
    try:
        rebuild.verify(zoo, package)
    except PncError:
        return "refused at rebuild"
    return "verified"


# ----------------------------------------------------------------------------- bytes


def mutate_bytes(raw: bytes, rng: random.Random) -> bytes:
    """1-8 flips, sets, cuts and inserts inside ``raw``."""
    buf = bytearray(raw)
    for _ in range(rng.randint(1, 8)):
        if not buf:
            break
        i, op = rng.randrange(len(buf)), rng.choice(("flip", "set", "cut", "insert"))
        if op == "flip":
            buf[i] ^= 1 << rng.randrange(8)
        elif op == "set":
            buf[i] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif op == "cut":
            del buf[i: i + rng.randint(1, 64)]
        else:
            buf[i:i] = rng.randbytes(rng.randint(1, 16))
    return bytes(buf)


def byte_case(raw: bytes, rng: random.Random) -> bytes:
    """Mostly a mutated message recompressed (reaches the parser); sometimes a mutated
    frame, or the frame with trailing bytes or a second frame."""
    roll = rng.random()
    if roll < 0.8:
        return codec.compress(mutate_bytes(raw, rng))
    frame = codec.compress(raw)
    if roll < 0.95:
        return mutate_bytes(frame, rng)
    return frame + (frame if rng.random() < 0.5 else rng.randbytes(rng.randint(1, 8)))


# ----------------------------------------------------------------------------- fields

_INTS = (0, 1, 2, 3, 7, 8, 16, 255, 256, 257, 4096, 4097, 1 << 16, 1 << 20, 1 << 24,
         (1 << 32) - 1)
_FLOATS = (0.0, -0.0, 1.0, -1.0, 1e-9, 0.02, 0.05, 0.5, 1.0, 1.5, 1e30, -1e30,
           float("nan"), float("inf"), float("-inf"))
_JSON_VALUES = ("8", "16", "1", "0", "-1", "256", "257", "4096", "4097", "10000000",
                '"x"', "null", "[]", "[8]", "{}", "1.5", "8.0", "true", "false", "1e400",
                '"8"', "99999999999999999999999")


def _tensor(m: pb.Package, rng: random.Random) -> pb.Tensor:
    module_tensors = [t for mod in m.modules for t in mod.tensors]
    pool = module_tensors + ([m.fingerprint.probabilities] if m.HasField("fingerprint") else [])
    return rng.choice(pool) if pool else pb.Tensor()


def _mutate_tensor(m: pb.Package, rng: random.Random) -> None:
    t = _tensor(m, rng)
    op = rng.choice(("shape", "dims", "dtype", "scale", "scales", "data", "name"))
    if op == "shape" and t.shape:
        t.shape[rng.randrange(len(t.shape))] = rng.choice(_INTS)
    elif op == "dims":
        if t.shape and rng.random() < 0.5:
            del t.shape[rng.randrange(len(t.shape))]
        else:
            t.shape.append(rng.choice(_INTS))
    elif op == "dtype":
        t.dtype = rng.randint(0, 4)
    elif op == "scale":
        t.scale = rng.choice(_FLOATS)
    elif op == "scales":
        if t.scales and rng.random() < 0.5:
            t.scales[rng.randrange(len(t.scales))] = rng.choice(_FLOATS)
        else:
            t.scales.extend([rng.choice(_FLOATS)] * rng.randint(1, 3))
    elif op == "data":
        t.data = mutate_bytes(t.data, rng) if t.data else rng.randbytes(4)
    else:
        t.name = rng.choice(("adapter.x", "gate.net.0.weight", "adapter.down.weight", ""))


def _mutate_config(m: pb.Package, rng: random.Random) -> None:
    mod = rng.choice(m.modules)
    keys = ("adapter_rank", "gate_hidden")
    if rng.random() < 0.1:
        mod.config_json = rng.choice(("", "{", "[]", "null", "1", '{"x": 1}', "{}"))
        return
    items = {k: rng.choice(("8", "16")) for k in keys if rng.random() < 0.8}
    items[rng.choice(keys + ("extra",))] = rng.choice(_JSON_VALUES)
    mod.config_json = "{" + ", ".join(f'"{k}": {v}' for k, v in items.items()) + "}"


def _mutate_fingerprint(m: pb.Package, rng: random.Random) -> None:
    fp = m.fingerprint
    op = rng.choice(("count", "tolerance", "seed", "probs", "clear"))
    if op == "count":
        fp.probe_count = rng.choice(_INTS)
    elif op == "tolerance":
        fp.tolerance = rng.choice(_FLOATS)
    elif op == "seed":
        fp.probe_seed = rng.choice((0, 1, (1 << 64) - 1, rng.getrandbits(64)))
    elif op == "probs":
        count = rng.choice((1, 16, 256, fp.probe_count))
        fp.probe_count = count
        fp.probabilities.CopyFrom(pb.Tensor(
            name="probabilities", dtype=rng.choice((pb.INT8, pb.FLOAT16, pb.FLOAT32)),
            shape=[count, len(m.label_names)], scale=rng.choice(_FLOATS)))
        width = {pb.INT8: 1, pb.FLOAT16: 2, pb.FLOAT32: 4}[fp.probabilities.dtype]
        fp.probabilities.data = rng.choice((bytes, rng.randbytes))(count * len(m.label_names)
                                                                  * width)
    else:
        m.ClearField("fingerprint")


def _mutate_mask(m: pb.Package, rng: random.Random) -> None:
    mod = rng.choice(m.modules)
    if not mod.masks:
        return
    mask = rng.choice(mod.masks)
    op = rng.choice(("width", "bits", "zero", "layer", "drop"))
    if op == "width":
        mask.width = rng.choice(_INTS)
    elif op == "bits":
        mask.bits = mutate_bytes(mask.bits, rng)
    elif op == "zero":
        mask.bits = bytes(len(mask.bits))
    elif op == "layer":
        mask.layer = rng.choice(("blocks.9.out", "", "blocks.0.out", "x" * 300))
    else:
        mod.masks.remove(mask)


def _mutate_module(m: pb.Package, rng: random.Random) -> None:
    mod = rng.choice(m.modules)
    op = rng.choice(("classes", "position_r", "position_s", "duplicate", "source", "drop"))
    if op == "classes":
        mod.cloned_classes.append(rng.choice(_INTS))
    elif op == "position_r":
        mod.position_r = rng.choice(_INTS)
    elif op == "position_s":
        mod.position_s = rng.choice(_INTS)
    elif op == "duplicate":
        m.modules.append(mod)
    elif op == "source":
        mod.source.sha256 = rng.choice(("0" * 64, m.target.sha256, "x"))
    elif m.modules:
        del m.modules[0]


def _mutate_labels(m: pb.Package, rng: random.Random) -> None:
    op = rng.choice(("add", "drop", "rename", "duplicate", "swap_target"))
    if op == "add":
        m.label_names.append(rng.choice(("new", "7", "", "\x00")))
    elif op == "drop" and m.label_names:
        del m.label_names[-1]
    elif op == "rename" and m.label_names:
        m.label_names[rng.randrange(len(m.label_names))] = rng.choice(("z", "5", ""))
    elif op == "duplicate" and m.label_names:
        m.label_names.append(m.label_names[0])
    elif m.modules:
        m.target.sha256, m.modules[0].source.sha256 = m.modules[0].source.sha256, m.target.sha256


MUTATORS: tuple[Callable[[pb.Package, random.Random], None], ...] = (
    _mutate_tensor, _mutate_tensor, _mutate_config, _mutate_config, _mutate_fingerprint,
    _mutate_fingerprint, _mutate_mask, _mutate_module, _mutate_labels)


def field_case(msg: pb.Package, rng: random.Random) -> bytes:
    """1-3 field mutations of a copy of ``msg``, encoded as a package."""
    out = pb.Package()
    out.CopyFrom(msg)
    for _ in range(rng.randint(1, 3)):
        if not out.modules:
            break
        rng.choice(MUTATORS)(out, rng)
    return codec.compress(out.SerializeToString(deterministic=True))


# ----------------------------------------------------------------------------- CI


def _fuzz(n: int) -> settings:
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def base(default_clone) -> pb.Package:
    return wire.to_proto(default_clone.package)


@pytest.fixture(scope="module")
def fuzz_zoo(zoo_dir) -> Zoo:
    """One zoo for every case: its model cache makes a rebuild ~50 ms."""
    return Zoo(zoo_dir)


@pytest.mark.slow
@_fuzz(BYTE_CASES)
@given(rng=st.randoms(use_true_random=False))
def test_fuzz_bytes_decode_and_rebuild(base, fuzz_zoo, rng):
    check(byte_case(base.SerializeToString(deterministic=True), rng), fuzz_zoo)


@pytest.mark.slow
@_fuzz(FIELD_CASES)
@given(rng=st.randoms(use_true_random=False))
def test_fuzz_fields_decode_and_rebuild(base, fuzz_zoo, rng):
    check(field_case(base, rng), fuzz_zoo)


def test_base_package_verifies(base, fuzz_zoo):
    """The fuzz starts from a package that rebuilds and verifies."""
    assert check(codec.compress(base.SerializeToString(deterministic=True)),
                 fuzz_zoo) == "verified"


# ----------------------------------------------------------------------------- long run


def _base_package(path: str | None, zoo: Zoo) -> pb.Package:
    if path:
        return wire.to_proto(wire.decode(Path(path).read_bytes()))
    from pnc_net.cloning import CloneConfig, clone
    from pnc_net.data import load_mnist

    cfg = CloneConfig.single("mnist-cnn-0to4", "mnist-cnn-5to9", ("5", "6"), per_class=40,
                             target_per_class=10, positions=((3, 3),))
    return wire.to_proto(clone(zoo, load_mnist(), cfg).package)


def main(argv: list[str] | None = None) -> int:
    """The long run: ``--cases`` inputs (half byte-, half field-mutated); prints the outcome
    counts and every non-project exception; exit 1 if there was any."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--package", help="a package that rebuilds against --zoo (else: clone one)")
    ap.add_argument("--zoo", default=os.environ.get("PNC_TEST_ZOO", "/tmp/pnc/zoo"))
    args = ap.parse_args(argv)
    zoo = Zoo(args.zoo)
    msg = _base_package(args.package, zoo)
    raw, rng = msg.SerializeToString(deterministic=True), random.Random(args.seed)
    counts: collections.Counter[str] = collections.Counter()
    for i in range(args.cases):
        data = byte_case(raw, rng) if i % 2 == 0 else field_case(msg, rng)
        try:
            counts[check(data, zoo)] += 1
        except Exception as err:  # noqa: BLE001 - counting exactly these is the point
            counts[f"NON-PROJECT {type(err).__name__}"] += 1
            print(f"case {i}: {type(err).__name__}: {err}", file=sys.stderr)
            traceback.print_exc(limit=3)
        if (i + 1) % 10_000 == 0:
            print(f"{i + 1} cases: {dict(counts)}", flush=True)
    for outcome, n in sorted(counts.items()):
        print(f"{n:8d}  {outcome}")
    return 1 if any(k.startswith("NON-PROJECT") for k in counts) else 0


if __name__ == "__main__":
    sys.exit(main())
