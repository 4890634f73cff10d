"""The Predict micro-batcher with a tiny real torch module (no daemon), and one real
receiver serving many concurrent clients through it."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn

from pnc_net.errors import BusyError, InvalidInputError, PreconditionError
from pnc_net.serve.batcher import MicroBatcher


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 5), nn.Softmax(1)).eval()


class Recording(nn.Module):
    """Wraps a module and records the batch size of each forward."""

    def __init__(self, inner: nn.Module, delay_s: float = 0.0) -> None:
        super().__init__()
        self.inner, self.delay_s = inner, delay_s
        self.sizes: list[int] = []

    def forward(self, x):
        self.sizes.append(len(x))
        time.sleep(self.delay_s)
        return self.inner(x)


class Gate(nn.Module):
    """Blocks every forward until ``release`` is set (to fill the queue)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def forward(self, x):
        self.entered.set()
        self.release.wait(10)
        return x.flatten(1)


def in_threads(fn, n: int) -> list:
    out: list = [None] * n

    def one(i: int) -> None:
        try:
            out[i] = fn(i)
        except Exception as err:  # noqa: BLE001 - the test looks at it
            out[i] = err

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def test_concurrent_callers_get_their_own_rows():
    model = Recording(tiny(), delay_s=0.01)
    xs = [torch.rand(1 + i % 5, 1, 8, 8) for i in range(40)]
    with MicroBatcher(workers=2, max_images=32) as b:
        got = in_threads(lambda i: b.run("pkg", model, xs[i]), len(xs))
    with torch.no_grad():
        want = [model.inner(x) for x in xs]
    for g, w in zip(got, want):
        assert isinstance(g, torch.Tensor) and g.shape == w.shape
        assert torch.allclose(g, w, atol=1e-6)
        assert torch.equal(g.argmax(1), w.argmax(1))
    assert sum(model.sizes) == sum(len(x) for x in xs)
    assert max(model.sizes) > 5, f"nothing was batched: {model.sizes}"
    assert max(model.sizes) <= 32


def test_the_forward_runs_without_autograd():
    seen: list = []

    def forward(x):
        seen.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
        return x.flatten(1) * 2

    with MicroBatcher(workers=1) as b:
        assert torch.equal(b.run("pkg", forward, torch.ones(2, 1, 2, 2)), torch.full((2, 4), 2.0))
    assert seen == [(False, True)]


def test_keys_are_not_mixed():
    a, b_model = Recording(tiny()), Recording(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)))
    x = torch.rand(2, 1, 8, 8)
    with MicroBatcher(workers=2) as b:
        got = in_threads(lambda i: b.run(f"k{i % 2}", a if i % 2 == 0 else b_model, x), 20)
    assert all(g.shape == ((2, 5) if i % 2 == 0 else (2, 3)) for i, g in enumerate(got))


def test_a_forward_error_reaches_every_caller_of_the_batch():
    class Broken(nn.Module):
        def forward(self, x):
            time.sleep(0.05)
            raise RuntimeError("boom")

    with MicroBatcher(workers=1) as b:
        got = in_threads(lambda i: b.run("pkg", Broken(), torch.rand(2, 1, 8, 8)), 8)
        assert all(isinstance(g, RuntimeError) and "boom" in str(g) for g in got)
        # the worker survives a failed batch
        assert b.run("ok", tiny(), torch.rand(1, 1, 8, 8)).shape == (1, 5)


def test_full_queue_refuses_with_busy():
    gate = Gate()
    b = MicroBatcher(workers=1, max_images=4, max_queued_images=8)
    first = threading.Thread(target=b.run, args=("pkg", gate, torch.rand(4, 1, 2, 2)))
    first.start()
    assert gate.entered.wait(5)  # the worker holds the first call; the queue is empty
    queued = [threading.Thread(target=b.run, args=("pkg", gate, torch.rand(4, 1, 2, 2)))
              for _ in range(2)]
    for t in queued:
        t.start()
    deadline = time.monotonic() + 5
    while b._queued_images < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(BusyError, match="queued"):
        b.run("pkg", gate, torch.rand(1, 1, 2, 2))
    gate.release.set()
    for t in [first, *queued]:
        t.join(5)
    assert b.run("pkg", gate, torch.rand(1, 1, 2, 2)).shape == (1, 4)  # room again
    b.stop()


def test_a_caller_that_times_out_is_dropped_from_the_queue():
    gate = Gate()
    b = MicroBatcher(workers=1, timeout_s=0.2)
    t = threading.Thread(target=lambda: pytest.raises(BusyError, b.run, "pkg", gate,
                                                      torch.rand(1, 1, 2, 2)))
    t.start()
    assert gate.entered.wait(5)
    with pytest.raises(BusyError, match="no prediction within"):
        b.run("pkg", gate, torch.rand(3, 1, 2, 2))
    assert b._queued_images == 0
    gate.release.set()
    t.join(5)
    b.stop()


def test_stop_finishes_queued_calls_then_refuses():
    model = Recording(tiny(), delay_s=0.02)
    b = MicroBatcher(workers=1, max_images=2)
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(
        b.run("pkg", model, torch.rand(2, 1, 8, 8)))) for _ in range(5)]
    for t in threads:
        t.start()
    time.sleep(0.01)
    b.stop()
    for t in threads:
        t.join(5)
    assert len(results) == 5 and all(r.shape == (2, 5) for r in results)
    assert not any(t.is_alive() for t in b._threads)
    with pytest.raises(PreconditionError, match="shutting down"):
        b.run("pkg", model, torch.rand(1, 1, 8, 8))


def test_max_wait_fills_a_batch():
    model = Recording(tiny())
    with MicroBatcher(workers=1, max_images=64, max_wait_s=0.2) as b:
        got = in_threads(lambda i: b.run("pkg", model, torch.rand(1, 1, 8, 8)), 10)
    assert all(g.shape == (1, 5) for g in got)
    assert len(model.sizes) < 10


def test_from_settings():
    assert MicroBatcher.from_settings(0) is None
    b = MicroBatcher.from_settings(16, workers=3)
    assert b is not None and (b.workers, b.max_images, b.max_wait_s) == (3, 16, 0.0)
    with pytest.raises(InvalidInputError):
        MicroBatcher.from_settings(-1)
    with pytest.raises(InvalidInputError):
        MicroBatcher(max_images=0)


@pytest.mark.grpc
def test_receiver_batches_concurrent_clients(tmp_path, zoo_dir, default_clone, mnist):
    """Many edge clients at once against a real receiver: each gets the predictions an
    unbatched forward gives for its own images."""
    from pnc_cli.daemons import spawn_daemon, stop_daemon
    from pnc_net import wire
    from pnc_net.serve.client import PncClient

    proc, port = spawn_daemon("receiver", ["--listen", "127.0.0.1:0", "--zoo", str(zoo_dir),
                                           "--store", str(tmp_path / "store")])
    try:
        addr = f"127.0.0.1:{port}"
        with PncClient(addr) as c:
            pid, _ = c.send_package(wire.encode(default_clone.package))
        xs = [mnist.x_test[8 * i : 8 * i + 8].numpy() for i in range(16)]
        from pnc_net.rebuild import build_superbody
        from pnc_net.zoo import Zoo

        package = wire.decode(wire.encode(default_clone.package))  # what the receiver decodes
        sb = build_superbody(Zoo(zoo_dir), package).eval()
        with torch.no_grad():
            want = [sb(torch.from_numpy(x)) for x in xs]

        def one(i: int):
            with PncClient(addr) as c:
                return [c.predict(pid[:12], xs[i]) for _ in range(3)]

        got = in_threads(one, len(xs))
        for resps, w in zip(got, want):
            assert not isinstance(resps, Exception), resps
            for r in resps:
                probs = torch.tensor([list(p.probabilities) for p in r.predictions])
                assert torch.allclose(probs, w, atol=1e-6)
                assert [p.label for p in r.predictions] == [r.label_names[i]
                                                            for i in w.argmax(1).tolist()]
    finally:
        stop_daemon(proc)
