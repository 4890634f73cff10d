"""Stand-in target samples for the k_t = 0 regime, inverted from the target."""

from __future__ import annotations

import torch

from pnc_net.synthesize import SynthesizeConfig, synthesize_target_samples
from pnc_net.training import predict_logits
from pnc_net.zoo import state_digest


def test_inverted_samples_are_read_as_their_class_and_leave_the_target_untouched(zoo):
    target, _manifest = zoo.load("mnist-cnn-0to4")
    before = state_digest(target)
    x = synthesize_target_samples(target, 5, (1, 28, 28),
                                  SynthesizeConfig(per_class=4, steps=40), seed=3)
    assert x.shape == (20, 1, 28, 28)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    predicted = predict_logits(target, x).argmax(1)
    assert (predicted == torch.arange(5).repeat(4)).float().mean() >= 0.8
    assert state_digest(target) == before
    assert not any(p.requires_grad for p in target.parameters())


def test_inversion_is_deterministic_for_a_seed(zoo):
    target, _ = zoo.load("mnist-cnn-0to4")
    cfg = SynthesizeConfig(per_class=1, steps=5)
    a = synthesize_target_samples(target, 5, (1, 28, 28), cfg, seed=1)
    b = synthesize_target_samples(target, 5, (1, 28, 28), cfg, seed=1)
    c = synthesize_target_samples(target, 5, (1, 28, 28), cfg, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cache_returns_equal_copies_and_evicts_oldest():
    from pnc_net.synthesize import SynthesisCache

    cache, calls = SynthesisCache(max_entries=2), []

    def make(v):
        return lambda: calls.append(v) or torch.full((2,), float(v))

    a = cache.get_or_make(("a",), make(1))
    a += 5  # a copy: the cached tensor is unchanged
    assert torch.equal(cache.get_or_make(("a",), make(1)), torch.full((2,), 1.0))
    cache.get_or_make(("b",), make(2))
    cache.get_or_make(("c",), make(3))  # evicts "a"
    cache.get_or_make(("a",), make(1))
    assert calls == [1, 2, 3, 1]
