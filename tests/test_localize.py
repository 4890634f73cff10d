"""Localization: localized samples, per-filter masks, determinism, and no writes to the source."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pnc_net.localize import (
    LocalizeConfig,
    cloned_view,
    localize,
    localized_samples,
    taylor_scores,
    top_fraction_masks,
)
from pnc_net.metrics import sim_matrix
from pnc_net.zoo import state_digest

# Small budgets: about a second per localization on 2 idle cores.
FAST = LocalizeConfig(perturbations_per_sample=2, refine_steps=8)
CLONED = (0, 1)  # digits 5 and 6 in a 5-9 source's label space


@pytest.fixture(scope="module")
def new_samples(mnist):
    """12 training digits of each cloned class, labelled 0..1 in the cloned space."""
    xs, ys = [], []
    for i, digit in enumerate((5, 6)):
        idx = torch.nonzero(mnist.y_train == digit).flatten()[:12]
        xs.append(mnist.x_train[idx])
        ys.append(torch.full((len(idx),), i, dtype=torch.long))
    return torch.cat(xs), torch.cat(ys)


@pytest.fixture(scope="module", params=["mnist-cnn-5to9", "mnist-resnet-5to9"])
def source(request, zoo_dir):
    from pnc_net.zoo import Zoo

    return Zoo(zoo_dir).load(request.param)[0]


@pytest.fixture(scope="module")
def localized(source, new_samples, mnist):
    """One localization per source, with the source's digest and outputs before and after."""
    x_probe = mnist.x_test[:32]
    with torch.no_grad():
        out_before = source(x_probe)
    before = state_digest(source)
    masks = localize(source, *new_samples, CLONED, FAST, seed=7)
    with torch.no_grad():
        out_after = source(x_probe)
    return {"masks": masks, "before": before, "after": state_digest(source),
            "out_before": out_before, "out_after": out_after}


def test_localized_samples_shapes_and_weights(new_samples):
    x, _ = new_samples
    cfg = LocalizeConfig(perturbations_per_sample=3)
    samples, weights = localized_samples(x, cfg, torch.Generator().manual_seed(0))
    assert samples.shape == (4 * len(x), *x.shape[1:])
    assert weights.shape == (4 * len(x),)
    assert torch.equal(samples[: len(x)], x)  # the originals come first, weight 1
    assert torch.all(weights[: len(x)] == 1)
    w = weights[len(x):]
    assert torch.all(w > 0) and torch.all(w <= 1)
    # Occlusion only hides pixels, never adds any.
    perturbed = samples[len(x):].view(3, *x.shape)
    assert torch.all((perturbed == 0) | (perturbed == x.unsqueeze(0)))
    assert len(set(w.tolist())) > 1  # different occlusions, different proximity


def test_localized_samples_hide_nothing_is_the_original(new_samples):
    x, _ = new_samples
    samples, weights = localized_samples(x, LocalizeConfig(), torch.Generator().manual_seed(0),
                                         hide_prob=0.0, copies=2)
    assert torch.equal(samples, x.repeat(3, 1, 1, 1))
    assert torch.all(weights == 1)


def test_localized_samples_hide_everything_gives_blank_images(new_samples):
    x, _ = new_samples
    samples, weights = localized_samples(x, LocalizeConfig(), torch.Generator().manual_seed(0),
                                         hide_prob=1.0, copies=1)
    assert torch.all(samples[len(x):] == 0)
    assert torch.allclose(weights[len(x):], torch.full((len(x),), float(torch.exp(
        torch.tensor(-1.0 / LocalizeConfig().kernel_width**2)))))


def test_masks_cover_every_unit_with_the_right_widths(source, localized):
    masks = localized["masks"]
    widths = source.mask_widths()
    assert set(masks) == set(widths)
    for name, m in masks.items():
        assert m.dtype == torch.bool and m.shape == (widths[name],), name
        assert int(m.sum()) >= min(FAST.min_keep, widths[name]), name
    kept = sum(int(m.sum()) for m in masks.values())
    assert 0 < kept < sum(widths.values())  # a real selection, not all or nothing


def test_min_keep_holds_even_under_strong_sparsity(source, new_samples):
    initial = localize(source, *new_samples, CLONED,
                       dataclasses.replace(FAST, keep_ratio=0.0, refine_steps=0, min_keep=3))
    assert all(int(m.sum()) == 3 for m in initial.values())
    refined = localize(source, *new_samples, CLONED,
                       dataclasses.replace(FAST, keep_ratio=0.05, sparsity=50.0, min_keep=5,
                                           refine_lr=0.5, refine_steps=4))
    assert all(int(m.sum()) >= 5 for m in refined.values())


def test_keep_ratio_one_keeps_everything_before_refinement(source, new_samples):
    masks = localize(source, *new_samples, CLONED,
                     dataclasses.replace(FAST, keep_ratio=1.0, refine_steps=0))
    assert all(bool(m.all()) for m in masks.values())


def test_deterministic_with_a_seed(source, new_samples, localized):
    a = localized["masks"]
    b = localize(source, *new_samples, CLONED, FAST, seed=7)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_seed_changes_the_perturbations(new_samples):
    x, _ = new_samples
    s1, _ = localized_samples(x, FAST, torch.Generator().manual_seed(1))
    s2, _ = localized_samples(x, FAST, torch.Generator().manual_seed(2))
    assert not torch.equal(s1, s2)


def test_localization_never_changes_the_source(source, localized):
    assert localized["after"] == localized["before"]
    assert torch.equal(localized["out_after"], localized["out_before"])
    assert all(g.gate is None
               for g in source.mask_gates().values())
    assert not source.training
    assert not any(p.requires_grad for p in source.parameters())


def test_taylor_scores_and_top_fraction(source, new_samples):
    x, y = new_samples
    import copy

    work = copy.deepcopy(source)
    scores = taylor_scores(work, x, y, torch.ones(len(x)), torch.tensor(CLONED))
    assert set(scores) == set(source.mask_widths())
    for name, s in scores.items():
        assert s.shape == (source.mask_widths()[name],)
        assert torch.all(s >= 0) and float(s.sum()) > 0
    masks = top_fraction_masks(scores, keep_ratio=0.25, min_keep=2)
    for name, m in masks.items():
        k = max(2, round(0.25 * len(m)))
        assert int(m.sum()) == k
        # The kept filters are the best-scored ones.
        assert float(scores[name][m].min()) >= float(scores[name][~m].max())


def test_cloned_view_adds_one_rest_of_source_bucket():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    view = cloned_view(logits, torch.tensor([3, 1]))
    assert view.shape == (1, 3)
    assert torch.equal(view[:, :2], logits[:, [3, 1]])
    assert torch.allclose(view[:, 2], logits[:, [0, 2, 4]].logsumexp(1))
    # Every class cloned: no bucket to add.
    assert torch.equal(cloned_view(logits, torch.arange(5)), logits)


def test_one_cloned_class_still_gets_a_localized_mask(source, new_samples):
    """With one cloned class the softmax over the cloned logits alone is constant; the
    rest-of-source bucket gives scores and refinement a signal, so the masks do not
    collapse to ``min_keep`` filters (they did before the bucket)."""
    x, y = new_samples
    one = y == 0  # the digit 5 alone
    scores = taylor_scores(source, x[one], y[one], torch.ones(int(one.sum())),
                           torch.tensor([0]))
    assert all(float(s.sum()) > 0 for s in scores.values())
    masks = localize(source, x[one], y[one], (0,), dataclasses.replace(FAST, refine_steps=30))
    assert any(int(m.sum()) > FAST.min_keep for m in masks.values())


def test_sim_matrix_full_masks_is_identity_similarity(zoo, mnist):
    source = zoo.load("mnist-cnn-5to9")[0]
    ones = {k: torch.ones(w, dtype=torch.bool) for k, w in source.mask_widths().items()}
    sim = sim_matrix(source, ones, mnist)
    assert sim["labels"] == list(mnist.label_names)
    assert all(v == pytest.approx(1.0, abs=1e-5) for v in sim["per_class"])
    assert all(sim["matrix"][i][i] == pytest.approx(1.0, abs=1e-5) for i in range(10))
    assert all(g.gate is None for g in source.mask_gates().values())  # a copy was gated
