"""Baselines: same data as PNC, zoo weights untouched, metrics and bytes defined as PNC's."""

from __future__ import annotations

import copy

import pytest
import torch

from pnc_net.bench.baselines import (
    Evaluated,
    TuneConfig,
    delta_bytes,
    delta_payload,
    distill,
    extra_loss_for,
    fresh_network,
    run_oracle,
    run_pnc_f,
    run_tuning,
    task_data,
    tuned_energy_vetoes,
    widened,
)
from pnc_net.cloning import CloneConfig, SourceSpec, plan
from pnc_net.errors import InvalidInputError
from pnc_net.metrics import clone_metrics
from pnc_net.superbody import NO_ENERGY_VETO
from pnc_net.zoo import state_digest

TINY = TuneConfig(lrs=(1e-3,), epochs=1, min_steps=2, warmup_epochs=1, oracle_lrs=(3e-3,),
                  oracle_epochs=1)
TWO_SOURCES = CloneConfig(target="mnist-cnn-0to4", sources=(
    SourceSpec("mnist-cnn-5to9", ("5", "6")), SourceSpec("mnist-resnet-5to9", ("7",))),
    per_class=6, target_per_class=4, seed=1)


@pytest.fixture(scope="module")
def td(zoo_dir, mnist):
    from pnc_net.zoo import Zoo

    return task_data(Zoo(zoo_dir), mnist, TWO_SOURCES)


def test_task_data_is_the_very_draw_pnc_uses(zoo, mnist, td):
    job = plan(zoo, mnist, TWO_SOURCES)
    n_t = 5
    x_new = torch.cat([m.data.x_new for m in job.modules])
    assert torch.equal(td.x[: len(x_new)], x_new)
    assert torch.equal(td.x_val_new, torch.cat([m.data.x_val_new for m in job.modules]))
    assert torch.equal(td.x_val_old, job.modules[0].data.x_val_old)
    assert torch.equal(td.x[len(x_new):], job.modules[0].data.x_old[: 4 * n_t])
    assert td.label_names == ("0", "1", "2", "3", "4", "5", "6", "7")
    # cloned labels follow the superbody's order; old samples carry the target's predictions
    assert td.y[:12].tolist() == [5] * 6 + [6] * 6 and td.y[12:18].tolist() == [7] * 6
    assert torch.equal(td.y[18:], td.target(td.x[18:]).argmax(1))


def test_without_target_samples_the_baselines_get_none(zoo, mnist):
    cfg = CloneConfig.single("mnist-cnn-0to4", "mnist-cnn-5to9", ("5",), per_class=3,
                             target_per_class=0)
    d = task_data(zoo, mnist, cfg)
    assert len(d.x) == 3 and len(d.x_val_old) == 0 and set(d.y.tolist()) == {5}


@pytest.mark.parametrize("method", ["FT", "LwF", "KD"])
def test_tuning_leaves_zoo_weights_unchanged_and_reports_its_delta(method, td, mnist):
    before = [state_digest(td.target)] + [state_digest(s) for s, _ in td.sources]
    res = run_tuning(method, td, mnist, TINY, seed=0)
    after = [state_digest(td.target)] + [state_digest(s) for s, _ in td.sources]
    assert before == after
    assert res.model.head.fc.out_features == 8
    n_params = sum(p.numel() for p in res.model.parameters())
    assert 0 < res.params_modified <= n_params + sum(
        b.numel() for b in res.model.buffers() if b.is_floating_point())
    assert res.bytes > 10_000  # a dense fp16 delta of ~0.2 M weights does not vanish
    assert set(res.metrics) >= {"acc_old", "acc_new", "acc_all", "locality", "source_acc_new"}


def test_pnc_f_tunes_a_copy_and_ships_package_plus_delta(default_clone, zoo, mnist):
    cfg = CloneConfig.single("mnist-cnn-0to4", "mnist-cnn-5to9", ("5", "6"), per_class=40,
                             target_per_class=10)
    d = task_data(zoo, mnist, cfg)
    sb = default_clone.superbody
    before = state_digest(sb)
    res = run_pnc_f(sb, d, mnist, TINY, seed=0, package_bytes=1000, pnc_seconds=1.0)
    assert state_digest(sb) == before
    assert res.bytes > 1000 and res.seconds > 1.0 and res.params_modified > 0


def test_pnc_f_lifts_the_energy_veto_while_tuning_and_sets_it_again_by_pncs_rule(
        default_clone, mnist):
    """A veto shuts the gate with no gradient: tuned under it, PNC-F read every input as
    class 0. The veto is lifted while the weights tune, then recalibrated to let through
    the same fraction of the cloned training samples on the tuned target."""
    sb = copy.deepcopy(default_clone.superbody)
    (gate,) = [b.gate for b in sb.branch_modules.values()]
    cloned_x = mnist.x_train[(mnist.y_train == 5) | (mnist.y_train == 6)][:40]
    lse = sb.target(cloned_x).logsumexp(1).detach()
    gate.energy_max.fill_(float(lse.median()))
    passed = float((lse <= gate.energy_max).float().mean())
    with tuned_energy_vetoes(sb, cloned_x):
        assert float(gate.energy_max) == NO_ENERGY_VETO
        with torch.no_grad():  # what tuning does: the target's logits move
            sb.target.head.fc.bias.add_(3.0)
    after = sb.target(cloned_x).logsumexp(1).detach()
    assert float(gate.energy_max) > float(lse.median()) + 2.0  # moved with the target
    assert abs(float((after <= gate.energy_max).float().mean()) - passed) <= 1 / 40


def test_pnc_f_leaves_a_superbody_without_veto_without_one(default_clone, mnist):
    sb = copy.deepcopy(default_clone.superbody)
    (gate,) = [b.gate for b in sb.branch_modules.values()]
    gate.energy_max.fill_(NO_ENERGY_VETO)
    with tuned_energy_vetoes(sb, mnist.x_train[:16]):
        pass
    assert float(gate.energy_max) == NO_ENERGY_VETO


def test_oracle_trains_from_scratch_over_all_classes(td, mnist):
    res = run_oracle(td, mnist, TINY, seed=0)
    assert res.model.head.fc.out_features == 8
    assert res.params_modified == sum(p.numel() for p in res.model.parameters())
    assert 0.0 <= res.metrics["locality"] <= 1.0


def test_the_oracle_builds_torchvision_targets_too():
    """``pnc bench --tasks rgb`` stopped at its first Oracle cell: the Oracle built only
    pnc's own architectures. A torchvision target's Oracle is the same torchvision
    network, random-init, with the manifest's preprocessing, and it trains."""
    from pnc_net.zoo import Manifest

    man = Manifest(name="r18", sha256="0" * 64, size_bytes=0, arch="torchvision:resnet18",
                   arch_args={}, input_shape=(3, 32, 32), label_names=tuple("01234"),
                   dataset="rgb-digits", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    net = fresh_network(man, 7)
    x = torch.rand(4, 3, 32, 32)
    assert net(x).shape == (4, 7)
    params = [p for p in net.parameters() if p.requires_grad]
    assert params and sum(p.numel() for p in params) > 1_000_000
    before = params[0].detach().clone()
    opt = torch.optim.SGD(params, lr=0.1)
    torch.nn.functional.cross_entropy(net.train()(x), torch.tensor([0, 1, 5, 6])).backward()
    opt.step()
    assert not torch.equal(params[0], before)
    cnn = Manifest(name="c", sha256="0" * 64, size_bytes=0, arch="cnn", arch_args={},
                   input_shape=(1, 28, 28), label_names=tuple("01234"), dataset="mnist")
    assert fresh_network(cnn, 7)(torch.rand(2, 1, 28, 28)).shape == (2, 7)


def test_widened_target_that_never_predicts_new_classes_has_perfect_locality(td, mnist):
    """The metric is PNC's own ``clone_metrics``: a widened target whose new rows can never
    win must agree with the target everywhere and score acc_old = target_acc_old."""
    model = widened(td.target, len(td.label_names), seed=0)
    with torch.no_grad():
        model.head.fc.bias[5:] = -1e9
    m = clone_metrics(Evaluated(model, td.target, ("0", "1", "2", "3", "4"), td.label_names),
                      mnist)
    assert m["locality"] == 1.0 and m["acc_new"] == 0.0
    assert m["acc_old"] == m["target_acc_old"]


def test_delta_of_an_unchanged_model_is_zero_and_new_rows_travel_whole(td):
    same = copy.deepcopy(td.target)
    payload, changed = delta_payload(same.state_dict(), td.target.state_dict())
    assert changed == 0 and set(payload) == {0}
    wide = widened(td.target, 8, seed=0)
    nbytes, changed = delta_bytes(wide, td.target)
    assert changed == 3 * wide.head.fc.in_features + 3  # three new rows + biases
    assert nbytes < 2_000  # zeros compress away; only the new rows remain


def test_lwf_term_is_zero_when_the_old_outputs_are_kept(td):
    model = widened(td.target, len(td.label_names), seed=0).eval()
    x = td.x[:8]
    loss = extra_loss_for("LwF", td, TINY)(x, model(x))
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-5)
    assert extra_loss_for("FT", td, TINY) is None
    kd = extra_loss_for("KD", td, TINY)(x, model(x))  # new rows are untrained: KD pulls
    assert float(kd.detach()) > 0.01
    assert float(distill(torch.zeros(2, 3), torch.zeros(2, 3), 2.0)) == 0.0


def test_bad_settings_are_rejected():
    with pytest.raises(InvalidInputError):
        TuneConfig(lrs=())
    with pytest.raises(InvalidInputError):
        TuneConfig(lrs=(-1.0,))
    with pytest.raises(InvalidInputError):
        TuneConfig(epochs=0)
