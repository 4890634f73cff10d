"""The forward a receiver's Predict runs (``pnc_net/serve/fastpath.py``): the compiled
superbody agrees with the eager one, and falls back to eager (with a log line) when it
does not; and the input shapes Predict accepts (issue 11: one ``(C, H, W)`` image is a
batch of one, not C grayscale images), through real receivers."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from pnc_net import wire
from pnc_net.errors import IncompatibleError, InvalidInputError, PncError
from pnc_net.package import probe_batch
from pnc_net.rebuild import accepted_tolerance, build_superbody
from pnc_net.serve import fastpath
from pnc_net.serve.node import Node, as_batch
from pnc_net.serve.store import PackageStore
from pnc_net.testing import two_cnn_package
from pnc_net.zoo import Zoo

MNIST = (1, 28, 28)
RGB = (3, 32, 32)


@pytest.fixture(scope="module")
def served(zoo_dir, default_clone):
    """The superbody a receiver rebuilds from the default package, its probes, tolerance."""
    package = wire.decode(wire.encode(default_clone.package))
    fp = package.fingerprint
    assert fp is not None
    sb = build_superbody(Zoo(zoo_dir), package)
    return sb, probe_batch(fp.probe_seed, fp.probe_count, MNIST), accepted_tolerance(fp)


@pytest.fixture()
def fastpath_log():
    """Records of the ``pnc.fastpath`` logger (a daemon's setup stops propagation)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("pnc.fastpath")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(old)


# ----------------------------------------------------------------------------- fastpath


def test_jit_forward_matches_the_eager_superbody(served, mnist):
    sb, probes, tol = served
    before = {k: v.clone() for k, v in sb.state_dict().items()}
    f = fastpath.prepare(sb, MNIST, probes, tol, "jit")
    assert (f.engine, f.asked, f.detail) == ("jit", "jit", "")
    assert f.max_diff is not None and f.max_diff <= 1e-4
    assert isinstance(f.module, torch.jit.ScriptModule)
    for n in (1, 7, 64):
        x = mnist.x_test[:n]
        with torch.no_grad():
            want = sb(x)
        got = f(x)
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-5)
        assert torch.equal(got.argmax(1), want.argmax(1))
    assert all(torch.equal(v, before[k]) for k, v in sb.state_dict().items())


def test_eager_engine_runs_a_channels_last_copy(served, mnist):
    sb, probes, tol = served
    f = fastpath.prepare(sb, MNIST, probes, tol, "eager")
    assert (f.engine, f.asked, f.max_diff) == ("eager", "eager", None)
    inner = f.module.inner
    assert inner is not sb
    assert inner.target.blocks[0].conv.weight.data_ptr() != sb.target.blocks[0].conv.weight.data_ptr()
    x = mnist.x_test[:9]
    with torch.no_grad():
        assert torch.allclose(f(x), sb(x), atol=1e-5)


class _Off(nn.Module):
    """A "compiled" forward that is wrong by ``delta`` (NaN: not finite)."""

    def __init__(self, inner: nn.Module, delta: float) -> None:
        super().__init__()
        self.inner, self.delta = inner, delta

    def forward(self, x):
        return self.inner(x) + self.delta


@pytest.mark.parametrize("delta", [0.1, float("nan")])
def test_a_compiled_forward_that_differs_falls_back_to_eager(served, monkeypatch, fastpath_log,
                                                             delta):
    sb, probes, tol = served
    monkeypatch.setattr(fastpath, "compile_jit", lambda model, example: _Off(model, delta))
    f = fastpath.prepare(sb, MNIST, probes, tol, "jit", name="package abc123")
    assert (f.engine, f.asked) == ("eager", "jit")
    assert "differs from eager" in f.detail and "eager" in f.detail
    assert isinstance(f.module, fastpath._ChannelsLast)
    warned = [r.getMessage() for r in fastpath_log if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "package abc123" in warned[0], warned


def test_within_tolerance_is_kept(served, monkeypatch):
    sb, probes, tol = served
    monkeypatch.setattr(fastpath, "compile_jit", lambda model, example: _Off(model, tol / 2))
    f = fastpath.prepare(sb, MNIST, probes, tol, "jit")
    assert f.engine == "jit" and f.max_diff == pytest.approx(tol / 2, rel=1e-3)


def test_a_trace_that_fixes_the_batch_size_falls_back(fastpath_log):
    class BatchBaked(nn.Module):
        """Answers differently for the probe batch's size: a trace bakes the branch in."""

        def forward(self, x):
            z = x.flatten(1)[:, :4]
            if x.shape[0] == 16:
                return z.softmax(1)
            return (2 * z).softmax(1)

    f = fastpath.prepare(BatchBaked(), MNIST, probe_batch(1, 16, MNIST), 0.02, "jit")
    assert f.engine == "eager" and "differs" in f.detail, f.detail
    assert any(r.levelno == logging.WARNING for r in fastpath_log)


def test_a_model_that_cannot_be_traced_falls_back(served, monkeypatch, fastpath_log):
    sb, probes, tol = served

    def broken(model, example):
        raise RuntimeError("tracer says no")

    monkeypatch.setattr(fastpath, "compile_jit", broken)
    f = fastpath.prepare(sb, MNIST, probes, tol, "jit")
    assert f.engine == "eager" and "tracer says no" in f.detail
    assert any("unavailable" in r.getMessage() for r in fastpath_log)


def test_engine_names_are_checked(served):
    sb, probes, tol = served
    with pytest.raises(InvalidInputError, match="jit, eager"):
        fastpath.prepare(sb, MNIST, probes, tol, "onnx")
    from receiver.config import ReceiverConfig

    with pytest.raises(InvalidInputError, match="--predict-engine"):
        ReceiverConfig(zoo="z", store="s", predict_engine="fast")
    assert ReceiverConfig(zoo="z", store="s").predict_engine == "jit"


def test_node_serves_through_the_engine_it_was_given(tmp_path, zoo_dir, default_clone, mnist):
    data = wire.encode(default_clone.package)
    x = mnist.x_test[:5]
    got = {}
    for engine in fastpath.ENGINES:
        node = Node("receiver", PackageStore(tmp_path / engine), Zoo(zoo_dir),
                    predict_engine=engine)
        pid = node.accept(data).id
        assert node.loaded(pid)[1].forward.engine == engine
        got[engine] = node.predict(pid[:10], x)[2]
        # after a restart the package is loaded from the store, through the same engine
        again = Node("receiver", PackageStore(tmp_path / engine), Zoo(zoo_dir),
                     predict_engine=engine)
        assert again.loaded(pid[:12])[1].forward.engine == engine
    assert torch.allclose(got["jit"], got["eager"], atol=1e-5)
    with pytest.raises(InvalidInputError, match="--predict-engine"):
        Node("receiver", PackageStore(tmp_path / "x"), Zoo(zoo_dir), predict_engine="nope")


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("shape,n", [((1, 28, 28), 1), ((28, 28), 1), ((4, 1, 28, 28), 4)])
def test_as_batch_one_channel(shape, n):
    x = torch.rand(shape)
    b = as_batch(x, MNIST)
    assert b.shape == (n, *MNIST)
    assert torch.equal(b.flatten(), x.flatten())


@pytest.mark.parametrize("shape,n", [((3, 32, 32), 1), ((1, 3, 32, 32), 1), ((5, 3, 32, 32), 5)])
def test_as_batch_rgb(shape, n):
    assert as_batch(torch.rand(shape), RGB).shape == (n, *RGB)


@pytest.mark.parametrize("shape,want", [
    ((3, 28, 28), MNIST), ((2, 28, 28), MNIST), ((1, 1, 1, 28, 28), MNIST), ((28,), MNIST),
    ((4, 3, 28, 28), MNIST), ((32, 32), RGB), ((32, 32, 3), RGB), ((2, 32, 32, 3), RGB),
    ((1, 32, 32), RGB), ((0, 3, 32, 32), RGB),
])
def test_as_batch_refuses_other_shapes(shape, want):
    with pytest.raises(InvalidInputError) as info:
        as_batch(torch.rand(shape), want)
    msg = str(info.value)
    if shape[0] != 0:
        assert isinstance(info.value, IncompatibleError)
        assert str(want) in msg and str(shape) in msg
        assert ("(28, 28)" in msg) == (want == MNIST)  # the (H, W) form only for one channel


# ----------------------------------------------------------------------------- daemons


def rgb_package(zoo_root) -> bytes:
    """A package over two random-init RGB CNNs (3, 32, 32) that a receiver serves."""
    return two_cnn_package(Zoo(zoo_root), RGB, ("rgb-t", "rgb-s"), seed=0)


def _probs(resp) -> np.ndarray:
    return np.array([list(p.probabilities) for p in resp.predictions])


def _refused(c, pid, x) -> str:
    with pytest.raises(PncError) as info:
        c.predict(pid, x)
    assert info.value.grpc_code == "INVALID_ARGUMENT", info.value
    return str(info.value)


@pytest.mark.grpc
@pytest.mark.parametrize("engine", fastpath.ENGINES)
def test_one_rgb_image_is_a_batch_of_one(tmp_path, engine):
    """Issue 11: a (3, 32, 32) image through a real receiver's Predict gets one
    prediction, the one the same image gets in a batch (it used to be three)."""
    from pnc_cli.daemons import spawn_daemon, stop_daemon
    from pnc_net.serve.client import PncClient

    data = rgb_package(tmp_path / "zoo")
    proc, port = spawn_daemon("receiver", ["--listen", "127.0.0.1:0", "--zoo",
                                           str(tmp_path / "zoo"), "--store",
                                           str(tmp_path / "store"), "--predict-engine", engine])
    try:
        with PncClient(f"127.0.0.1:{port}") as c:
            pid, _ = c.send_package(data)
            assert c.last_write.state == "verified", c.last_write.detail
            rng = np.random.default_rng(1)
            batch = rng.random((4, *RGB), dtype=np.float32)
            many = c.predict(pid[:12], batch)
            assert len(many.predictions) == 4
            for i in range(4):
                one = c.predict(pid[:12], batch[i])
                of_one = c.predict(pid[:12], batch[i : i + 1])
                assert len(one.predictions) == 1 and len(of_one.predictions) == 1
                assert one.predictions[0].label == of_one.predictions[0].label
                assert one.predictions[0].label == many.predictions[i].label
                np.testing.assert_allclose(_probs(one), _probs(of_one), atol=1e-6)
                np.testing.assert_allclose(_probs(one)[0], _probs(many)[i], atol=1e-5)
            for bad in ((32, 32), (32, 32, 3), (2, 32, 32), (1, 1, 32, 32)):
                msg = _refused(c, pid, np.zeros(bad, np.float32))
                assert "(3, 32, 32)" in msg and str(bad) in msg, msg
            assert c.health() == "SERVING"
    finally:
        stop_daemon(proc)


@pytest.mark.grpc
def test_one_grayscale_image_in_every_form(tmp_path, zoo_dir, default_clone, mnist):
    """A digit as (28, 28), (1, 28, 28) and (1, 1, 28, 28) gets one and the same
    prediction; an RGB-shaped input is refused with the shape this package takes."""
    from pnc_cli.daemons import spawn_daemon, stop_daemon
    from pnc_net.serve.client import PncClient

    proc, port = spawn_daemon("receiver", ["--listen", "127.0.0.1:0", "--zoo", str(zoo_dir),
                                           "--store", str(tmp_path / "store")])
    try:
        with PncClient(f"127.0.0.1:{port}") as c:
            pid, _ = c.send_package(wire.encode(default_clone.package))
            digit = mnist.x_test[3].numpy()  # (1, 28, 28)
            forms = [c.predict(pid[:12], x) for x in (digit[0], digit, digit[None])]
            assert all(len(r.predictions) == 1 for r in forms)
            assert len({r.predictions[0].label for r in forms}) == 1
            for r in forms[1:]:
                np.testing.assert_allclose(_probs(r), _probs(forms[0]), atol=1e-6)
            msg = _refused(c, pid, np.zeros((3, 32, 32), np.float32))
            assert "(1, 28, 28)" in msg and "(28, 28)" in msg, msg
            _refused(c, pid, np.zeros((3, 28, 28), np.float32))  # not three grayscale images
    finally:
        stop_daemon(proc)
